"""Database over the asyncio bridge, against the session's real PostgreSQL server.

What the server sees is read from ``pg_stat_activity`` through an observer: a second Database on
the server's ``postgres`` database, so that observing never takes a connection of the pool under
test. Waiting for something the server does is a poll with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import quote

import asyncpg
import pytest
import trio

from chatd.store.database import (
    Connection,
    Database,
    DatabaseUnavailable,
    ListenEvent,
    Notification,
    NotificationsLost,
)

T = TypeVar("T")

RECEIVE_TIMEOUT_S = 10.0


# -- helpers -------------------------------------------------------------------------------


async def wait_until(check: Callable[[], Awaitable[T]], *, what: str, timeout_s: float = 10.0) -> T:
    """Poll ``check`` until it returns something truthy; return that."""
    try:
        with trio.fail_after(timeout_s):
            while True:
                value = await check()
                if value:
                    return value
                await trio.sleep(0.01)
    except trio.TooSlowError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from None


async def receive(events: trio.MemoryReceiveChannel[ListenEvent]) -> ListenEvent:
    with trio.fail_after(RECEIVE_TIMEOUT_S):
        return await events.receive()


class SessionServer(Protocol):
    """What these tests use of the ``pg_server`` fixture."""

    def url_for(self, database: str) -> str: ...


def bridge_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "chatd-db"}


class Server:
    """Reads pg_stat_activity (client backends of one database) through the observer."""

    def __init__(self, observer: Database, dbname: str) -> None:
        self._observer = observer
        self.dbname = dbname

    async def active_sleep_pids(self) -> list[int]:
        rows = await self._observer.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND state = 'active'"
            " AND query LIKE '%pg_sleep%'",
            self.dbname,
        )
        return [row["pid"] for row in rows]

    async def state_of(self, pid: int) -> str | None:
        state: str | None = await self._observer.fetchval(
            "SELECT state FROM pg_stat_activity WHERE pid = $1", pid
        )
        return state

    async def last_query_of(self, pid: int) -> str | None:
        query: str | None = await self._observer.fetchval(
            "SELECT query FROM pg_stat_activity WHERE pid = $1", pid
        )
        return query

    async def idle_in_transaction(self) -> int:
        count: int = await self._observer.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
            " AND state LIKE 'idle in transaction%'",
            self.dbname,
        )
        return count

    async def connections(self) -> int:
        count: int = await self._observer.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
            " AND backend_type = 'client backend'",
            self.dbname,
        )
        return count

    async def listener_pids(self) -> list[int]:
        rows = await self._observer.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'LISTEN%'",
            self.dbname,
        )
        return [row["pid"] for row in rows]

    async def terminate(self, pid: int) -> bool:
        done: bool = await self._observer.fetchval("SELECT pg_terminate_backend($1)", pid)
        return done


@pytest.fixture
async def observer(pg_server: SessionServer) -> AsyncIterator[Database]:
    async with Database.connect(pg_server.url_for("postgres"), min_size=1, max_size=2) as obs:
        yield obs


@pytest.fixture
async def server(db: Database, observer: Database) -> Server:
    dbname: str = await db.fetchval("SELECT current_database()")
    return Server(observer, dbname)


async def cancel_while_sleeping(
    server: Server, call: Callable[[], Awaitable[object]]
) -> tuple[int, float, trio.CancelScope]:
    """Start ``call`` (which runs pg_sleep), cancel it once the server shows the sleep running.

    Returns the sleeping backend's pid, the seconds from cancel to the caller's return, and the
    caller's cancel scope.
    """
    scope = trio.CancelScope()
    returned = trio.Event()
    timing: list[float] = []

    async def caller() -> None:
        with scope:
            await call()
        timing.append(trio.current_time())
        returned.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            pids = await wait_until(server.active_sleep_pids, what="pg_sleep running")
            assert len(pids) == 1
            cancelled_at = trio.current_time()
            scope.cancel()
            await returned.wait()
    return pids[0], timing[0] - cancelled_at, scope


async def open_and_close(url: str) -> None:
    async with Database.connect(url, connect_timeout_s=5):
        pass


# -- cancellation --------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["fetchval", "run"])
async def test_cancelled_query_is_cancelled_on_the_server_and_its_connection_returned(
    db: Database, server: Server, via: str
) -> None:
    await db.ping()
    size_before, idle_before = db.pool_size, db.pool_idle
    assert idle_before == size_before

    async def sleep_on(conn: Connection) -> None:
        await conn.execute("SELECT pg_sleep(30)")

    async def call() -> object:
        if via == "fetchval":
            return await db.fetchval("SELECT pg_sleep(30)")
        return await db.run(sleep_on)

    pid, took_s, scope = await cancel_while_sleeping(server, call)

    assert scope.cancelled_caught  # the caller got trio.Cancelled
    assert took_s < 5, f"cancelling took {took_s:.2f} s"
    # Checked at once, no polling: the caller returned only after asyncpg finished cancelling.
    assert await server.active_sleep_pids() == []
    assert await server.state_of(pid) == "idle"  # cancelled, not killed
    assert (db.pool_size, db.pool_idle) == (size_before, idle_before)
    # The very same connection serves the next query.
    assert await db.fetchval("SELECT pg_backend_pid()") == pid


async def test_cancelled_transaction_is_rolled_back(db: Database, server: Server) -> None:
    await db.execute("CREATE TABLE probe (id int PRIMARY KEY)")
    size_before, idle_before = db.pool_size, db.pool_idle

    async def insert_then_sleep(conn: Connection) -> None:
        await conn.execute("INSERT INTO probe VALUES (1)")
        await conn.execute("SELECT pg_sleep(30)")

    _, took_s, scope = await cancel_while_sleeping(
        server, lambda: db.transaction(insert_then_sleep)
    )

    assert scope.cancelled_caught
    assert took_s < 5
    assert await server.idle_in_transaction() == 0
    assert await db.fetchval("SELECT count(*) FROM probe") == 0
    assert (db.pool_size, db.pool_idle) == (size_before, idle_before)


async def test_pool_skips_the_reset_query_but_still_rolls_back_an_open_transaction(
    db: Database, server: Server
) -> None:
    async def reset_query(conn: Connection) -> str:
        return conn.get_reset_query()

    assert await db.run(reset_query) == ""

    # Nothing runs on release: the backend's last statement is still ours, not a RESET.
    pid = await db.fetchval("SELECT pg_backend_pid()")
    assert await server.last_query_of(pid) == "SELECT pg_backend_pid()"

    # A transaction opened by hand and left open by a cancelled task is rolled back on release.
    await db.execute("CREATE TABLE probe (id int PRIMARY KEY)")

    async def begin_insert_sleep(conn: Connection) -> None:
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO probe VALUES (1)")
        await conn.execute("SELECT pg_sleep(30)")

    _, _, scope = await cancel_while_sleeping(server, lambda: db.run(begin_insert_sleep))

    assert scope.cancelled_caught

    # asyncpg releases a connection under asyncio.shield: the cancelled caller is back before
    # the release's ROLLBACK is done (under load, measurably so), and the connection is not
    # handed out again until it is. So the rollback is waited for, with a deadline.
    async def rolled_back() -> bool:
        return await server.idle_in_transaction() == 0 and db.pool_idle == db.pool_size

    await wait_until(rolled_back, what="the released connection's ROLLBACK")
    assert await db.fetchval("SELECT count(*) FROM probe") == 0


# -- exception types -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "error", "sqlstate"),
    [
        ("SELECT * FROM no_such_table", asyncpg.UndefinedTableError, "42P01"),
        ("SELEC 1", asyncpg.PostgresSyntaxError, "42601"),
        ("SELECT 1 / 0", asyncpg.DivisionByZeroError, "22012"),
    ],
)
async def test_asyncpg_errors_keep_their_type(
    db: Database, sql: str, error: type[asyncpg.PostgresError], sqlstate: str
) -> None:
    with pytest.raises(error) as info:
        await db.fetch(sql)
    assert type(info.value) is error
    assert info.value.sqlstate == sqlstate
    assert await db.fetchval("SELECT 1") == 1
    assert db.pool_idle == db.pool_size


async def test_unique_violation_keeps_its_type_and_rolls_the_transaction_back(
    db: Database,
) -> None:
    await db.execute("CREATE TABLE probe (id int PRIMARY KEY)")
    await db.execute("INSERT INTO probe VALUES (1)")

    with pytest.raises(asyncpg.UniqueViolationError) as direct:
        await db.execute("INSERT INTO probe VALUES (1)")
    assert direct.value.constraint_name == "probe_pkey"

    async def insert_two_then_duplicate(conn: Connection) -> None:
        await conn.execute("INSERT INTO probe VALUES (2)")
        await conn.execute("INSERT INTO probe VALUES (1)")

    with pytest.raises(asyncpg.UniqueViolationError):
        await db.transaction(insert_two_then_duplicate)
    assert [row["id"] for row in await db.fetch("SELECT id FROM probe")] == [1]


# -- notifications -------------------------------------------------------------------------


async def test_notify_is_delivered_into_trio(db: Database) -> None:
    async with db.listen("chat_events") as events:
        await db.notify("other_channel", "not for us")
        await db.notify("chat_events", "hello")
        # Committed in that order: had the other channel's been delivered, it would come first.
        assert await receive(events) == Notification("chat_events", "hello")


async def test_two_listeners_of_one_channel_both_receive(db: Database) -> None:
    async with db.listen("shared") as first, db.listen("shared") as second:
        await db.notify("shared", "one")
        assert await receive(first) == Notification("shared", "one")
        assert await receive(second) == Notification("shared", "one")


async def test_unsubscribed_listener_receives_nothing_further(db: Database, server: Server) -> None:
    async with db.listen("shared") as stays:
        [listener_pid] = await server.listener_pids()
        async with db.listen("shared") as leaves:
            left_behind = leaves.clone()  # outlives the block, to look at afterwards
            await db.notify("shared", "one")
            assert await receive(stays) == Notification("shared", "one")
            assert await receive(leaves) == Notification("shared", "one")

        await db.notify("shared", "two")
        await db.notify("shared", "three")
        assert await receive(stays) == Notification("shared", "two")
        assert await receive(stays) == Notification("shared", "three")
        with pytest.raises(trio.EndOfChannel):
            left_behind.receive_nowait()
        left_behind.close()

    # With its last subscriber gone, the channel is no longer listened to on the server.
    assert await server.last_query_of(listener_pid) == 'UNLISTEN "shared"'


async def test_listeners_subscribing_at_once_share_one_connection(
    db: Database, server: Server
) -> None:
    channels = [f"chan_{i}" for i in range(5)]
    got: dict[str, ListenEvent] = {}
    subscribed = 0
    all_subscribed = trio.Event()

    async def listener(channel: str) -> None:
        nonlocal subscribed
        async with db.listen(channel) as events:
            subscribed += 1
            if subscribed == len(channels):
                all_subscribed.set()
            got[channel] = await receive(events)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for channel in channels:
                nursery.start_soon(listener, channel)
            await all_subscribed.wait()
            # The pool (one connection) plus exactly one LISTEN connection.
            assert await server.connections() == db.pool_size + 1
            for channel in channels:
                await db.notify(channel, f"to {channel}")

    assert got == {channel: Notification(channel, f"to {channel}") for channel in channels}


async def test_listener_overflow_yields_notifications_lost_then_continues(db: Database) -> None:
    stats = db.stats
    async with db.listen("burst", buffer=2) as events:
        received, dropped = stats.notifications_received, stats.notifications_dropped
        for i in range(5):
            await db.notify("burst", str(i))

        async def all_five_arrived() -> bool:
            arrived = stats.notifications_received - received
            lost = stats.notifications_dropped - dropped
            return arrived + lost == 5

        await wait_until(all_five_arrived, what="five notifications to reach the subscriber")
        assert stats.notifications_received - received == 2

        assert await receive(events) == Notification("burst", "0")
        assert await receive(events) == Notification("burst", "1")
        await db.notify("burst", "5")
        assert await receive(events) == NotificationsLost()
        assert await receive(events) == Notification("burst", "5")


async def test_listen_connection_is_remade_after_the_server_kills_it(
    database_url: str, observer: Database
) -> None:
    async with Database.connect(
        database_url, min_size=1, max_size=2, listen_reconnect_delay_s=0.05
    ) as db:
        server = Server(observer, await db.fetchval("SELECT current_database()"))
        async with db.listen("survivor") as events:
            await db.notify("survivor", "before")
            assert await receive(events) == Notification("survivor", "before")

            [old_pid] = await server.listener_pids()
            assert await server.terminate(old_pid)

            assert await receive(events) == NotificationsLost()
            await db.notify("survivor", "after")
            assert await receive(events) == Notification("survivor", "after")
            [new_pid] = await server.listener_pids()
            assert new_pid != old_pid


# -- start and shutdown --------------------------------------------------------------------


async def test_leaving_connect_leaves_no_thread_and_no_connection(
    database_url: str, observer: Database
) -> None:
    threads_before = bridge_threads()
    async with Database.connect(database_url, min_size=2, max_size=4) as db:
        [bridge_thread] = bridge_threads() - threads_before
        server = Server(observer, await db.fetchval("SELECT current_database()"))

        async def hold(conn: Connection) -> None:
            await conn.execute("SELECT 1")

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(db.transaction, hold)
        async with db.listen("bye") as events:
            await db.notify("bye", "x")
            assert await receive(events) == Notification("bye", "x")
        assert await server.connections() >= 3  # pool connections plus the LISTEN one

    assert not bridge_thread.is_alive()
    assert bridge_threads() == threads_before

    async def no_connection_left() -> bool:
        return await server.connections() == 0

    await wait_until(no_connection_left, what="every connection to the database to close")


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize("kind", ["closed tcp port", "missing unix socket dir"])
async def test_unreachable_server_raises_database_unavailable_in_one_line(
    kind: str, tmp_path: Path
) -> None:
    password = "Secret-pw-4d1c"
    if kind == "closed tcp port":
        port = closed_port()
        url = f"postgresql://chatd:{password}@127.0.0.1:{port}/chatd"
        where = f"127.0.0.1:{port}"
    else:
        missing = tmp_path / "no-such-dir"
        url = f"postgresql://chatd:{password}@/chatd?host={quote(str(missing), safe='')}&port=5432"
        where = str(missing)
    threads_before = bridge_threads()

    with trio.fail_after(20), pytest.raises(DatabaseUnavailable) as info:
        await open_and_close(url)

    message = str(info.value)
    assert "\n" not in message
    assert where in message
    assert password not in message
    assert message.startswith("cannot reach PostgreSQL at ")
    assert bridge_threads() == threads_before


def test_an_outage_logged_by_the_pool_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """asyncpg's pool logs each failed reconnection with a traceback; an outage is one line."""
    pool_log = logging.getLogger("asyncpg.pool")
    with caplog.at_level(logging.WARNING, logger="asyncpg.pool"):
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError:
            pool_log.warning("Failed to restore the pool connection floor; retrying", exc_info=True)
        try:
            raise ValueError("a bug")
        except ValueError:
            pool_log.warning("something else", exc_info=True)
    outage, bug = caplog.records
    assert outage.exc_info is None
    assert outage.getMessage() == (
        "Failed to restore the pool connection floor; retrying: "
        "ConnectionRefusedError: [Errno 111] Connection refused"
    )
    assert bug.exc_info is not None, "a failure that is not an outage keeps its traceback"


async def test_a_statement_cancelled_while_prepared_leaves_its_connection_in_sync(
    database_url: str,
) -> None:
    """asyncpg cancelled between a statement's Parse and its Sync left the server inside the
    implicit transaction of that Parse; the next ``BEGIN ISOLATION LEVEL`` on the connection
    failed. The cancellation moment is swept over the first 2 ms of a fresh statement (each
    text is new, so each is parsed), on a pool of one connection."""

    async def repeatable_read(conn: Connection) -> int:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            value: int = await conn.fetchval("SELECT 1")
            return value

    async with Database.connect(database_url, min_size=1, max_size=1) as db:
        for i in range(600):
            with trio.move_on_after(0.002 * i / 600):
                await db.fetchval(f"SELECT count(*) + {i} FROM pg_class")
            assert await db.run(repeatable_read) == 1
