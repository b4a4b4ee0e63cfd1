"""The load driver's SDK client: a refused command is retried with the key that makes it done
once, and counted; requests waiting for a shared connection do not time out."""

from __future__ import annotations

import functools

import h11
import pytest
import trio

from chatd.client import AsyncClient, Unavailable
from chatd.scaletest.driver import load_client
from chatd.scaletest.run import ChatLoad

_ACCEPTED = b'{"message_id": "m", "queued": false}'


class Server:
    """A real HTTP/1.1 server on a loopback socket: 503 (Retry-After: 0) for the first
    ``refusals`` requests, then 201; records each request's Idempotency-Key."""

    def __init__(self, refusals: int, delay_s: float = 0.0) -> None:
        self.refusals = refusals
        self.delay_s = delay_s
        self.keys: list[str | None] = []

    async def serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                headers = dict(event.headers)
                key = headers.get(b"idempotency-key")
                self.keys.append(None if key is None else key.decode())
            elif isinstance(event, h11.EndOfMessage):
                await trio.sleep(self.delay_s)
                refused = len(self.keys) <= self.refusals
                status, body = (503, b'{"error": {}}') if refused else (201, _ACCEPTED)
                extra = [(b"retry-after", b"0")] if refused else []
                head = [(b"content-type", b"application/json"), *extra]
                head.append((b"content-length", str(len(body)).encode()))
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=head)))
                await stream.send_all(conn.send(h11.Data(data=body)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return


async def _client(
    nursery: trio.Nursery, server: Server, *, connections: int = 2, timeout_s: float = 10
) -> AsyncClient:
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, server.serve, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    load = ChatLoad(
        url=f"http://127.0.0.1:{port}",
        token="t",
        chats=1,
        turns=1,
        run_id="r",
        http_timeout_s=timeout_s,
        http_max_attempts=3,
    )
    return load_client(load, load.token, connections=connections)


async def test_a_retried_command_carries_the_same_idempotency_key_and_is_counted() -> None:
    server = Server(refusals=2)
    async with trio.open_nursery() as nursery:
        client = await _client(nursery, server)
        with trio.fail_after(10):
            await client.send_message("c", "hello")
            await client.send_message("c", "again")
        await client.aclose()
        nursery.cancel_scope.cancel()
    first, second = server.keys[:3], server.keys[3:]
    assert len(set(first)) == 1
    assert first[0] is not None
    assert len(second) == 1
    assert second[0] not in first
    assert client.retries == 2


async def test_a_command_still_refused_after_its_attempts_fails_in_words() -> None:
    server = Server(refusals=5)
    async with trio.open_nursery() as nursery:
        client = await _client(nursery, server)
        with trio.fail_after(10), pytest.raises(Unavailable, match="HTTP 503"):
            await client.send_message("c", "hello")
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert len(server.keys) == 3
    assert len(set(server.keys)) == 1
    assert client.retries == 2


async def test_requests_queued_for_a_connection_wait_without_timing_out() -> None:
    # One connection, a slow server (0.2 s per answer), a 0.3 s timeout: the third request
    # waits 0.4 s for the connection (the driver's own queue) and still succeeds.
    server = Server(refusals=0, delay_s=0.2)
    async with trio.open_nursery() as nursery:
        client = await _client(nursery, server, connections=1, timeout_s=0.3)
        with trio.fail_after(10):
            async with trio.open_nursery() as senders:
                for i in range(3):
                    senders.start_soon(client.send_message, "c", f"m{i}")
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert len(server.keys) == 3
    assert client.retries == 0
