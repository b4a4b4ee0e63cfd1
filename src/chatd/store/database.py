"""The process's PostgreSQL access: an asyncpg pool and a LISTEN connection behind the bridge.

Store code is written as plain asyncpg coroutines taking a connection; ``Database.transaction``
runs one such coroutine inside one transaction, on the asyncio thread, in a single crossing of
the bridge. Nothing outside ``chatd.store`` sees asyncpg.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg
import trio

from chatd.store.bridge import AsyncioBridge

T = TypeVar("T")

log = logging.getLogger(__name__)

Record = asyncpg.Record
# Store code takes either a pooled connection or a plain one; both have the Connection API.
# asyncpg's classes are generic only in its stubs: subscripting them at runtime is a TypeError.
if TYPE_CHECKING:
    Connection: TypeAlias = asyncpg.Connection[Record] | asyncpg.pool.PoolConnectionProxy[Record]
    _BaseConnection: TypeAlias = asyncpg.Connection[Record]
else:
    Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
    _BaseConnection = asyncpg.Connection


class DatabaseUnavailable(RuntimeError):
    """PostgreSQL cannot be reached, or dropped the connection mid-statement; the message names
    the server and what to check.

    An outage, not a bug: whoever gets it waits and retries (the edge answers 503 with
    Retry-After, an actor backs off without spending its restart budget). Whether a write that
    failed this way was committed is unknown to the caller; chat writes are fenced and
    idempotent by their sequence numbers, so a retry after reloading is safe.
    """


# Failures that say "the server or the link to it is gone", not "this statement is wrong":
# connection refused or reset, a connection closed under a query, the server shutting down or
# starting up, no connection slot free, a timeout waiting for a connection or an answer.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)


def is_unavailable(exc: BaseException) -> bool:
    """True for a failure of the database itself or of the link to it (see ``_UNAVAILABLE``)."""
    if isinstance(exc, (DatabaseUnavailable, *_UNAVAILABLE)):
        return True
    # asyncpg reports "connection was closed in the middle of operation" as a bare InterfaceError.
    return isinstance(exc, asyncpg.InterfaceError) and "connection" in str(exc).lower()


class _OutageLineFilter(logging.Filter):
    """asyncpg's pool logs a full traceback each time it fails to restore its connection floor
    (every 1-60 s for as long as PostgreSQL is down); an outage is expected, not a bug, so such
    a record becomes one line naming the failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.exc_info
            and record.exc_info[1] is not None
            and is_unavailable(record.exc_info[1])
        ):
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


logging.getLogger("asyncpg.pool").addFilter(_OutageLineFilter())


@dataclass(slots=True)
class DatabaseStats:
    """Counters of work sent to PostgreSQL by this process (read by metrics and benchmarks).

    Each field has one writing thread, so no increment is lost without a lock: ``statements``
    is counted by the pooled connections on the asyncio thread, the others on the trio thread.
    """

    transactions: int = 0
    # Every statement sent on a pooled connection, whichever way store code sent it (inside
    # ``run`` and ``transaction`` too); a transaction's BEGIN and COMMIT are one each.
    statements: int = 0
    notifications_received: int = 0
    notifications_dropped: int = 0


class _Connection(_BaseConnection):
    """No session state is ever set on pooled connections, so skip asyncpg's reset query.

    The default reset (``RESET ALL; UNLISTEN *; ...``) costs a round trip on every release.
    An open transaction is still rolled back on release by asyncpg itself.
    """

    def get_reset_query(self) -> str:
        return ""


class _CountingConnection(_Connection):
    """A pooled connection of a ``Database``: every statement it sends is counted.

    Counted here rather than at ``Database``'s methods because a ``run`` or a ``transaction``
    job sends any number of statements (a transaction's BEGIN and COMMIT too). asyncpg's public
    query methods never call one another, so each statement is counted once. ``_stats`` is set
    on a subclass made per pool (``_counting_connection``).
    """

    _stats: ClassVar[DatabaseStats]

    async def execute(self, query: str, *args: object, **options: Any) -> str:
        self._stats.statements += 1
        return await super().execute(query, *args, **options)

    async def executemany(self, command: str, args: Any, **options: Any) -> None:
        self._stats.statements += 1
        await super().executemany(command, args, **options)

    async def fetch(self, query: str, *args: object, **options: Any) -> Any:
        self._stats.statements += 1
        return await super().fetch(query, *args, **options)

    async def fetchrow(self, query: str, *args: object, **options: Any) -> Any:
        self._stats.statements += 1
        return await super().fetchrow(query, *args, **options)

    async def fetchval(self, query: str, *args: object, **options: Any) -> Any:
        self._stats.statements += 1
        return await super().fetchval(query, *args, **options)

    async def fetchmany(self, query: str, args: Any, **options: Any) -> Any:
        self._stats.statements += 1
        return await super().fetchmany(query, args, **options)


def _counting_connection(stats: DatabaseStats) -> type[_CountingConnection]:
    """The connection class of one pool, counting into that pool's ``stats``."""
    return type("_PoolConnection", (_CountingConnection,), {"_stats": stats})


@dataclass(frozen=True, slots=True)
class Notification:
    channel: str
    payload: str


@dataclass(frozen=True, slots=True)
class NotificationsLost:
    """Some notifications may have been missed (listener reconnected or a consumer fell behind).

    NOTIFY is only a hint: a consumer that sees this re-reads whatever it was watching.
    """


ListenEvent = Notification | NotificationsLost


class Database:
    """Use ``async with Database.connect(url) as db:`` from trio."""

    def __init__(
        self,
        bridge: AsyncioBridge,
        pool: asyncpg.Pool[Record],
        url: str,
        *,
        listen_reconnect_delay_s: float = 1.0,
        stats: DatabaseStats | None = None,
    ) -> None:
        self._bridge = bridge
        self._pool = pool
        self._url = url
        self._listen_reconnect_delay_s = listen_reconnect_delay_s
        self._listener: _Listener | None = None
        # The pool's connections count statements into it (see ``_CountingConnection``).
        self.stats = DatabaseStats() if stats is None else stats

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        min_size: int = 2,
        max_size: int = 16,
        connect_timeout_s: float = 10.0,
        command_timeout_s: float = 30.0,
        listen_reconnect_delay_s: float = 1.0,
    ) -> AsyncIterator[Database]:
        bridge = AsyncioBridge(name="chatd-db")
        bridge.start()
        stats = DatabaseStats()
        try:
            try:
                pool: asyncpg.Pool[Record] = await bridge.run(
                    lambda: asyncpg.create_pool(
                        url,
                        min_size=min_size,
                        max_size=max_size,
                        timeout=connect_timeout_s,
                        command_timeout=command_timeout_s,
                        connection_class=_counting_connection(stats),
                    )
                )
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise DatabaseUnavailable(describe_failure(url, exc)) from exc
            db = cls(
                bridge,
                pool,
                url,
                listen_reconnect_delay_s=listen_reconnect_delay_s,
                stats=stats,
            )
            try:
                yield db
            finally:
                with trio.CancelScope(shield=True):
                    await db._close()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(bridge.stop)

    async def _close(self) -> None:
        listener = self._listener
        self._listener = None

        async def close_all() -> None:
            if listener is not None:
                await listener.close()
            await asyncio.wait_for(self._pool.close(), timeout=10)

        try:
            await self._bridge.run(close_all)
        except TimeoutError:
            log.warning("database pool did not close within 10 s; terminating its connections")
            await self._bridge.run(_async(self._pool.terminate))

    # -- queries ---------------------------------------------------------------------------

    async def run(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        """Run ``fn(conn)`` on a pooled connection, outside any explicit transaction."""
        return await self._crossing(lambda: _on_pooled_connection(self._pool, fn))

    async def transaction(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        """Run ``fn(conn)`` inside one transaction: committed if it returns, rolled back if not."""
        self.stats.transactions += 1

        async def in_transaction(conn: Connection) -> T:
            async with conn.transaction():
                return await fn(conn)

        return await self._crossing(lambda: _on_pooled_connection(self._pool, in_transaction))

    async def _crossing(self, job: Callable[[], Awaitable[T]]) -> T:
        """Run ``job`` on the asyncio thread; an outage comes back as ``DatabaseUnavailable``."""
        try:
            return await self._bridge.run(job)
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            if is_unavailable(exc):
                raise DatabaseUnavailable(describe_failure(self._url, exc)) from exc
            raise

    async def fetch(self, query: str, *args: Any) -> list[Record]:
        return await self.run(lambda conn: conn.fetch(query, *args))

    async def fetchrow(self, query: str, *args: Any) -> Record | None:
        return await self.run(lambda conn: conn.fetchrow(query, *args))

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self.run(lambda conn: conn.fetchval(query, *args))

    async def execute(self, query: str, *args: Any) -> str:
        return await self.run(lambda conn: conn.execute(query, *args))

    async def ping(self) -> None:
        """Raise unless the database answers a trivial query."""
        await self.fetchval("SELECT 1")

    @property
    def pool_size(self) -> int:
        return self._pool.get_size()

    @property
    def pool_idle(self) -> int:
        return self._pool.get_idle_size()

    # -- notifications ---------------------------------------------------------------------

    async def notify(self, channel: str, payload: str) -> None:
        await self.execute("SELECT pg_notify($1, $2)", channel, payload)

    @contextlib.asynccontextmanager
    async def listen(
        self, channel: str, *, buffer: int = 1024
    ) -> AsyncIterator[trio.MemoryReceiveChannel[ListenEvent]]:
        """Receive NOTIFY payloads of ``channel`` as trio events while the block runs.

        Delivery is a hint, never a guarantee: when the consumer falls more than ``buffer``
        behind or the listening connection is lost and re-made, it gets ``NotificationsLost``.
        """
        if self._listener is None:
            self._listener = _Listener(
                self._bridge, self._url, self.stats, self._listen_reconnect_delay_s
            )
        listener = self._listener
        send, receive = trio.open_memory_channel[ListenEvent](buffer)
        subscription = _Subscription(channel, send, trio.lowlevel.current_trio_token(), self.stats)
        await self._bridge.run(lambda: listener.subscribe(subscription))
        try:
            async with receive:
                yield receive
        finally:
            with trio.CancelScope(shield=True):
                await self._bridge.run(lambda: listener.unsubscribe(subscription))
                send.close()


class _Subscription:
    """One trio consumer of one channel; ``deliver`` runs on the asyncio thread."""

    def __init__(
        self,
        channel: str,
        send: trio.MemorySendChannel[ListenEvent],
        token: trio.lowlevel.TrioToken,
        stats: DatabaseStats,
    ) -> None:
        self.channel = channel
        self._send = send
        self._token = token
        self._stats = stats
        self._lost = False

    def deliver(self, event: ListenEvent) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._push, event)

    def _push(self, event: ListenEvent) -> None:  # trio thread
        try:
            if self._lost:
                self._send.send_nowait(NotificationsLost())
                self._lost = False
            self._send.send_nowait(event)
            if isinstance(event, Notification):
                self._stats.notifications_received += 1
        except trio.WouldBlock:
            self._lost = True
            self._stats.notifications_dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the consumer left


class _Listener:
    """The one LISTEN connection of the process; lives on the asyncio thread.

    It is made on the first subscription and re-made (with every channel listened to again)
    when it is lost; subscribers are told ``NotificationsLost`` after a reconnect.
    """

    def __init__(
        self, bridge: AsyncioBridge, url: str, stats: DatabaseStats, reconnect_delay_s: float
    ) -> None:
        self._bridge = bridge
        self._url = url
        self._stats = stats
        self._reconnect_delay_s = reconnect_delay_s
        self._conn: asyncpg.Connection[Record] | None = None
        self._subscriptions: dict[str, list[_Subscription]] = {}
        self._reconnecting: asyncio.Task[None] | None = None
        self._closed = False
        # One operation at a time on the connection (asyncpg refuses concurrent ones), and only
        # one connection made when several channels are subscribed to at once.
        self._lock = asyncio.Lock()

    async def subscribe(self, sub: _Subscription) -> None:
        async with self._lock:
            subs = self._subscriptions.setdefault(sub.channel, [])
            subs.append(sub)
            if len(subs) == 1:
                try:
                    conn = await self._connection()
                    await conn.add_listener(sub.channel, self._on_notify)
                except BaseException:
                    subs.remove(sub)
                    raise

    async def unsubscribe(self, sub: _Subscription) -> None:
        async with self._lock:
            subs = self._subscriptions.get(sub.channel, [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                self._subscriptions.pop(sub.channel, None)
                if self._conn is not None and not self._conn.is_closed():
                    with contextlib.suppress(
                        asyncpg.PostgresError, asyncpg.InterfaceError, OSError
                    ):
                        await self._conn.remove_listener(sub.channel, self._on_notify)

    async def close(self) -> None:
        self._closed = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnecting
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await asyncio.wait_for(conn.close(), timeout=5)

    async def _connection(self) -> asyncpg.Connection[Record]:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self._url)
            self._conn.add_termination_listener(self._on_terminated)
        return self._conn

    def _on_notify(self, _conn: Connection, _pid: int, channel: str, payload: object) -> None:
        for sub in self._subscriptions.get(channel, ()):
            sub.deliver(Notification(channel, str(payload)))

    def _on_terminated(self, _conn: object) -> None:
        if self._closed or self._reconnecting is not None:
            return
        self._conn = None
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        try:
            while not self._closed:
                await asyncio.sleep(self._reconnect_delay_s)
                try:
                    async with self._lock:
                        conn = await self._connection()
                        for channel in list(self._subscriptions):
                            await conn.add_listener(channel, self._on_notify)
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    log.warning(
                        "LISTEN connection lost; retrying in %.1f s", self._reconnect_delay_s
                    )
                    self._conn = None
                    continue
                for subs in self._subscriptions.values():
                    for sub in subs:
                        sub.deliver(NotificationsLost())
                return
        finally:
            self._reconnecting = None


async def _on_pooled_connection(
    pool: asyncpg.Pool[Record], fn: Callable[[Connection], Awaitable[T]]
) -> T:
    """``fn(conn)`` on a connection of ``pool``, which goes back to the pool in sync with the
    server even when ``fn`` was cancelled (a caller that went away, a command timeout).

    asyncpg prepares a statement with Parse, Describe and Flush, no Sync. Cancelled at that
    point, it leaves the server inside the implicit transaction the Parse opened, with a
    snapshot taken, while asyncpg believes the connection idle; asyncpg's release would end it
    only through the reset query, which chatd skips (``_Connection``). The next user's ``BEGIN
    ISOLATION LEVEL ...`` then failed ("must be called before any query"), and a plain
    ``BEGIN`` would have run inside the leftover. One simple query ends such a leftover; a
    connection that cannot answer it in ``_RESYNC_TIMEOUT_S`` is closed instead.
    """
    async with pool.acquire() as conn:
        try:
            return await fn(conn)
        except (asyncio.CancelledError, TimeoutError):
            await _resync(conn)
            raise


# A cancelled connection's clean-up query is a trivial round trip; past this, it is closed.
_RESYNC_TIMEOUT_S = 2.0


async def _resync(conn: Connection) -> None:
    try:
        async with asyncio.timeout(_RESYNC_TIMEOUT_S):
            await conn.execute("SELECT 1")
    except BaseException:  # noqa: BLE001 - whatever failed, the connection is not reused
        conn.terminate()


def _async(fn: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def call() -> None:
        fn()

    return call


def describe_failure(url: str, exc: BaseException) -> str:
    """One line naming the server and what to check, without the password."""
    where = server_location(url)
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        hint = "check the user name and password in CHATD_DATABASE_URL"
    elif isinstance(exc, asyncpg.InvalidCatalogNameError):
        hint = "create the database, or fix its name in CHATD_DATABASE_URL"
    else:
        hint = "check that the server is running and that CHATD_DATABASE_URL names it"
    return f"cannot reach PostgreSQL at {where}: {reason}; {hint}"


def server_location(url: str) -> str:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "localhost"])[0]
    port = query.get("port", [str(parts.port or 5432)])[0]
    return f"{host}:{port}" if not host.startswith("/") else f"{host} (port {port})"
