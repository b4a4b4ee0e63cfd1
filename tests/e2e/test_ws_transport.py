"""WebSocket transport duties: server pings, and a client that stops reading cannot hold the
server (Hypercorn shields socket writes from cancellation; TCP_USER_TIMEOUT bounds them)."""

from __future__ import annotations

import socket
import uuid
from urllib.parse import urlsplit

import trio
import trio.testing
import wsproto
from wsproto.events import AcceptConnection, Event, Ping, Request

from chatd.domain.events import QueuedEntry, QueueUpdated
from chatd.providers.fake import knobs_marker
from chatd.store.database import Database
from tests.e2e.api_world import DEADLINE_S, ApiWorld, serve_api


class RawWebSocket:
    """A bare wsproto client, so a test sees pings and controls when (or whether) it reads."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)

    @classmethod
    async def open(cls, url: str, path: str, token: str, *, rcvbuf: int = 0) -> RawWebSocket:
        address = urlsplit(url)
        assert address.hostname is not None
        assert address.port is not None
        sock = trio.socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((address.hostname, address.port))
        raw = cls(trio.SocketStream(sock))
        request = Request(
            host=address.netloc,
            target=path,
            extra_headers=[(b"authorization", f"Bearer {token}".encode())],
        )
        await raw.stream.send_all(raw.ws.send(request))
        accepted = [
            e for e in await raw.events_until(AcceptConnection) if isinstance(e, AcceptConnection)
        ]
        assert accepted
        return raw

    async def events_until(self, kind: type[Event]) -> list[Event]:
        seen: list[Event] = []
        with trio.fail_after(DEADLINE_S):
            while not any(isinstance(e, kind) for e in seen):
                data = await self.stream.receive_some(65536)
                assert data, "the server closed the connection"
                self.ws.receive_data(data)
                seen.extend(self.ws.events())
        return seen


async def test_the_server_pings_idle_sockets(db: Database) -> None:
    async with serve_api(db, ws_ping_interval_s=0.2) as api:
        alice = await api.client("alice")
        raw = await RawWebSocket.open(api.url, "/api/v1/chats/watch", alice.token)
        async with raw.stream:
            pings = [e for e in await raw.events_until(Ping) if isinstance(e, Ping)]
            assert pings


async def test_a_client_that_stops_reading_cannot_hold_the_server(db: Database) -> None:
    ready, stop, stopped = trio.Event(), trio.Event(), trio.Event()
    served: list[tuple[ApiWorld, str, str]] = []  # the server, a chat id, its owner's token

    async def server() -> None:
        async with serve_api(db, client_send_timeout_s=1.0, shutdown_grace_s=1.0) as api:
            alice = await api.client("alice")
            chat = await alice.create_chat(f"{knobs_marker(chunks=1)} hi")
            await alice.wait_status(chat["id"], "waiting")
            served.append((api, chat["id"], alice.token))
            ready.set()
            await stop.wait()
        stopped.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        with trio.fail_after(DEADLINE_S):
            await ready.wait()
        [(api, chat_id, token)] = served
        path = f"/api/v1/chats/{chat_id}/stream"
        raw = await RawWebSocket.open(api.url, path, token, rcvbuf=4096)
        # Far more than the socket buffers hold, and the client never reads it.
        big = QueueUpdated((QueuedEntry(uuid.uuid4(), "x" * 60_000),))
        api.engine.hub.publish(uuid.UUID(chat_id), [big] * 300)
        # Until the server's send is stuck on the full socket (every task is then blocked).
        await trio.testing.wait_all_tasks_blocked(cushion=0.2)
        stop.set()
        with trio.move_on_after(DEADLINE_S) as waited:
            await stopped.wait()
        await raw.stream.aclose()  # frees a server stuck on the socket, so the test ends anyway
    assert not waited.cancelled_caught, "shutdown waited on a client that does not read"
