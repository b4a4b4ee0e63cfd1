"""The fault proxy itself: it forwards, and it pauses, cuts and delays exactly as asked.

Each socket test owns both ends: the client's stream through the proxy and the upstream
server's side of the same connection, so what crossed the proxy is seen, not guessed.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Literal

import pytest
import trio

from chatd.store.database import Connection, Database, is_unavailable
from tests.conftest import PgServer
from tests.faults.proxy import (
    PgProxy,
    TcpTarget,
    UnixTarget,
    open_pg_proxy,
    proxied_url,
    target_of_url,
)

DEADLINE_S = 10.0
# How long a test watches for bytes that must NOT arrive (held by a pause). Only the
# absence is timed; everything that must happen is awaited as an event under DEADLINE_S.
QUIET_WINDOW_S = 0.2


# -- URLs ------------------------------------------------------------------------------------


def test_target_of_a_unix_socket_url() -> None:
    url = "postgresql://chatd:p%40ss@/db1?host=%2Ftmp%2Fpg%2Frun&port=5432"
    assert target_of_url(url) == UnixTarget("/tmp/pg/run/.s.PGSQL.5432")


def test_target_of_a_tcp_url_with_and_without_port() -> None:
    assert target_of_url("postgresql://u:p@127.0.0.1:6543/db") == TcpTarget("127.0.0.1", 6543)
    assert target_of_url("postgresql://u:p@db.local/db") == TcpTarget("db.local", 5432)


def test_target_of_a_url_without_host_names_the_url_without_its_password() -> None:
    with pytest.raises(ValueError, match=r"no host in the database URL 'postgresql://u:\*\*\*@/d'"):
        target_of_url("postgresql://u:secret@/d")


def test_proxied_url_keeps_credentials_database_and_other_parameters() -> None:
    url = "postgresql://chatd:p%40ss@/db1?host=%2Ftmp%2Frun&port=5432&sslmode=disable"
    assert proxied_url(url, ("127.0.0.1", 40001)) == (
        "postgresql://chatd:p%40ss@127.0.0.1:40001/db1?sslmode=disable"
    )
    assert proxied_url("postgresql://u:p@10.0.0.1:5433/x", ("127.0.0.1", 7)) == (
        "postgresql://u:p@127.0.0.1:7/x"
    )


# -- sockets ---------------------------------------------------------------------------------


class Upstream:
    """A server the proxy forwards to; each accepted connection is handed to the test."""

    def __init__(self) -> None:
        self.send, self.accepted = trio.open_memory_channel[trio.SocketStream](16)
        self.clients: list[trio.SocketStream] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            await self.send.send(stream)
            # Keep the connection open until the test's nursery ends.
            await trio.sleep_forever()

    async def connect(self, proxy: PgProxy) -> trio.SocketStream:
        """A client connection through the proxy, closed when the test ends."""
        stream = await trio.open_tcp_stream(*proxy.address)
        self.clients.append(stream)
        return stream

    async def next(self) -> trio.SocketStream:
        with trio.fail_after(DEADLINE_S):
            return await self.accepted.receive()


@contextlib.asynccontextmanager
async def upstream_and_proxy(
    kind: str, *, delay_s: float = 0.0
) -> AsyncIterator[tuple[Upstream, PgProxy]]:
    upstream = Upstream()
    async with trio.open_nursery() as nursery:
        if kind == "tcp":
            [listener] = await nursery.start(
                partial(trio.serve_tcp, upstream.handle, 0, host="127.0.0.1")
            )
            host, port = listener.socket.getsockname()[:2]
            target: TcpTarget | UnixTarget = TcpTarget(host, port)
        else:
            directory = tempfile.mkdtemp(prefix="proxy-")
            path = str(Path(directory) / "s.sock")
            sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            await sock.bind(path)
            sock.listen()
            nursery.start_soon(trio.serve_listeners, upstream.handle, [trio.SocketListener(sock)])
            target = UnixTarget(path)
        proxy = PgProxy(target, delay_s=delay_s)
        await nursery.start(proxy.serve)
        try:
            yield upstream, proxy
        finally:
            for client in upstream.clients:
                await client.aclose()
            nursery.cancel_scope.cancel()


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    with trio.fail_after(DEADLINE_S):
        while len(data) < size:
            chunk = await stream.receive_some(size - len(data))
            assert chunk, f"closed after {data!r}"
            data += chunk
    return data


async def assert_nothing_arrives(stream: trio.SocketStream) -> None:
    with trio.move_on_after(QUIET_WINDOW_S):
        chunk = await stream.receive_some(100)
        raise AssertionError(f"received {chunk!r} through a paused proxy")


async def assert_closed(stream: trio.SocketStream) -> None:
    """The peer closed or reset the connection (EOF or a broken stream), within the deadline."""
    with trio.fail_after(DEADLINE_S):
        try:
            data = await stream.receive_some(100)
        except trio.BrokenResourceError:
            return
    assert data == b"", f"received {data!r} instead of a close"


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_forwards_both_ways_in_order(kind: str) -> None:
    async with upstream_and_proxy(kind) as (upstream, proxy):
        client = await upstream.connect(proxy)
        server = await upstream.next()
        payload = bytes(range(256)) * 1000
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, payload)
            assert await receive_exactly(server, len(payload)) == payload
        await server.send_all(b"answer")
        assert await receive_exactly(client, 6) == b"answer"
        assert proxy.accepted == 1
        assert proxy.open_connections == 1
        await client.aclose()
        await assert_closed(server)
        with trio.fail_after(DEADLINE_S):
            await proxy.wait_until(lambda p: p.open_connections == 0)


async def test_pause_holds_bytes_both_ways_and_resume_delivers_them_in_order() -> None:
    async with upstream_and_proxy("tcp") as (upstream, proxy):
        client = await upstream.connect(proxy)
        server = await upstream.next()
        proxy.pause()
        await client.send_all(b"up-1")
        await server.send_all(b"down")
        await client.send_all(b"up-2")
        with trio.fail_after(DEADLINE_S):
            await proxy.wait_until(lambda p: p.bytes_held == 8)
        await assert_nothing_arrives(server)
        await assert_nothing_arrives(client)
        assert proxy.open_connections == 1, "a pause must keep connections open"
        # A connection made during the pause is accepted but held too.
        late = await upstream.connect(proxy)
        late_server = await upstream.next()
        await late.send_all(b"late")
        await assert_nothing_arrives(late_server)

        proxy.resume()
        assert await receive_exactly(server, 8) == b"up-1up-2"
        assert await receive_exactly(client, 4) == b"down"
        assert await receive_exactly(late_server, 4) == b"late"
        assert proxy.bytes_held == 0


async def test_cut_closes_every_connection_and_refuses_new_ones_until_restore() -> None:
    async with upstream_and_proxy("tcp") as (upstream, proxy):
        clients = [await upstream.connect(proxy) for _ in range(3)]
        servers = [await upstream.next() for _ in clients]
        proxy.pause()
        await clients[0].send_all(b"held, then dropped")
        with trio.fail_after(DEADLINE_S):
            await proxy.wait_until(lambda p: p.bytes_held > 0)

        proxy.cut()
        assert proxy.open_connections == 0
        for stream in clients + servers:
            await assert_closed(stream)
        refused = await upstream.connect(proxy)
        await assert_closed(refused)
        with trio.fail_after(DEADLINE_S):
            await proxy.wait_until(lambda p: p.refused == 1)
        assert proxy.accepted == 3

        proxy.restore()
        proxy.resume()
        again = await upstream.connect(proxy)
        server = await upstream.next()
        await again.send_all(b"back")
        assert await receive_exactly(server, 4) == b"back"
        assert proxy.cuts == 1


async def test_delay_is_added_to_each_forwarded_chunk() -> None:
    async with upstream_and_proxy("tcp", delay_s=0.25) as (upstream, proxy):
        client = await upstream.connect(proxy)
        server = await upstream.next()
        started = trio.current_time()
        await client.send_all(b"ping")
        assert await receive_exactly(server, 4) == b"ping"
        await server.send_all(b"pong")
        assert await receive_exactly(client, 4) == b"pong"
        assert trio.current_time() - started >= 0.5
        proxy.delay_s = 0.0
        started = trio.current_time()
        await client.send_all(b"fast")
        assert await receive_exactly(server, 4) == b"fast"
        assert trio.current_time() - started < 0.25


async def test_a_proxy_whose_server_is_down_closes_the_client() -> None:
    missing = UnixTarget(str(Path(tempfile.mkdtemp(prefix="proxy-")) / "none.sock"))
    async with trio.open_nursery() as nursery:
        proxy = PgProxy(missing)
        await nursery.start(proxy.serve)
        async with await trio.open_tcp_stream(*proxy.address) as client:
            await assert_closed(client)
        nursery.cancel_scope.cancel()


# -- in front of the real PostgreSQL ---------------------------------------------------------


async def test_in_front_of_postgresql_cut_fails_queries_and_restore_heals(
    pg_server: PgServer, database_url: str
) -> None:
    assert isinstance(target_of_url(database_url), UnixTarget | TcpTarget)
    async with open_pg_proxy(database_url) as proxy:
        url = proxy.url_for(database_url)
        async with Database.connect(url, min_size=1, max_size=1, command_timeout_s=5) as db:
            assert await db.fetchval("SELECT 41 + 1") == 42
            proxy.cut()
            with pytest.raises(Exception) as failure:  # noqa: PT011 - checked just below
                await db.fetchval("SELECT 1")
            assert is_unavailable(failure.value), repr(failure.value)
            proxy.restore()
            # The pool replaces the dead connection on the next acquire.
            with trio.fail_after(DEADLINE_S):
                assert await db.fetchval("SELECT 2") == 2


async def test_in_front_of_postgresql_pause_stalls_a_query_until_resume(
    database_url: str,
) -> None:
    async with open_pg_proxy(database_url) as proxy:
        url = proxy.url_for(database_url)
        async with Database.connect(url, min_size=1, max_size=1) as db:
            assert await db.fetchval("SELECT 1") == 1
            proxy.pause()
            answer: list[int] = []
            async with trio.open_nursery() as nursery:

                async def query() -> None:
                    answer.append(await db.fetchval("SELECT 7"))

                nursery.start_soon(query)
                with trio.fail_after(DEADLINE_S):
                    await proxy.wait_until(lambda p: p.bytes_held > 0)
                assert answer == []
                proxy.resume()
            assert answer == [7]


# -- triggers: a fault at one transaction's commit -------------------------------------------


async def _insert_in_transaction(db: Database, marker: str) -> None:
    async def write(conn: Connection) -> None:
        await conn.execute("INSERT INTO proxy_probe (note) VALUES ($1)", marker)

    await db.transaction(write)


async def _notes(database_url: str) -> list[str]:
    async with Database.connect(database_url, min_size=1, max_size=1) as direct:
        return [r["note"] for r in await direct.fetch("SELECT note FROM proxy_probe ORDER BY 1")]


@pytest.mark.parametrize(("at", "committed"), [("request", False), ("reply", True)])
async def test_a_trigger_cuts_at_the_commit_of_the_marked_transaction(
    database_url: str, at: Literal["request", "reply"], committed: bool
) -> None:
    async with open_pg_proxy(database_url) as proxy:
        url = proxy.url_for(database_url)
        async with Database.connect(url, min_size=1, max_size=1, command_timeout_s=5) as db:
            await db.execute("CREATE TABLE proxy_probe (note text)")
            await _insert_in_transaction(db, "unmarked")
            trigger = proxy.arm(b"marked-7f3a", action="cut", at=at)
            with pytest.raises(Exception) as failure:  # noqa: PT011 - checked just below
                await _insert_in_transaction(db, "marked-7f3a")
            assert is_unavailable(failure.value), repr(failure.value)
            assert trigger.fired.is_set()
            assert proxy.is_cut
            proxy.restore()
    expected = ["marked-7f3a", "unmarked"] if committed else ["unmarked"]
    assert await _notes(database_url) == expected


async def test_a_pause_trigger_holds_the_commits_answer_after_the_commit(
    database_url: str,
) -> None:
    async with open_pg_proxy(database_url) as proxy:
        url = proxy.url_for(database_url)
        async with Database.connect(url, min_size=1, max_size=1, command_timeout_s=5) as db:
            await db.execute("CREATE TABLE proxy_probe (note text)")
            trigger = proxy.arm(b"held-91c2", action="pause", at="reply")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_insert_in_transaction, db, "held-91c2")
                with trio.fail_after(DEADLINE_S):
                    await trigger.fired.wait()
                assert proxy.paused
                # Committed while its caller still waits for the answer.
                assert await _notes(database_url) == ["held-91c2"]
                proxy.resume()
