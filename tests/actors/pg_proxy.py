"""A TCP proxy in front of the test's PostgreSQL that a test can cut and restore.

``cut()`` is what a client sees when the server goes away: every open connection is closed
under it (mid-query too) and new ones are refused (the listening socket is closed). ``restore()``
listens again on the same port, and the server, which never stopped, answers as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qs, quote, unquote, urlsplit

import trio

_CHUNK = 65536


class PgProxy:
    def __init__(self, connect_upstream: Callable[[], Awaitable[trio.abc.Stream]]) -> None:
        self._connect_upstream = connect_upstream
        self.port = 0
        self._up = trio.Event()
        self._up.set()
        self._listening = trio.Event()
        self._scope: trio.CancelScope | None = None
        self.connections = 0  # accepted since start (so a test can see a reconnect)

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    def cut(self) -> None:
        """Close every connection and stop listening, at once."""
        self._up = trio.Event()
        self._listening = trio.Event()
        if self._scope is not None:
            self._scope.cancel()

    async def restore(self) -> None:
        """Listen again (on the same port); returns once connections are accepted."""
        self._up.set()
        with trio.fail_after(10):
            await self._listening.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            await self._up.wait()
            # trio sets SO_REUSEADDR on listeners, so the port can be bound again at once.
            [listener] = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            sockname = listener.socket.getsockname()
            self.port = int(sockname[1])
            with trio.CancelScope() as self._scope:
                async with listener, trio.open_nursery() as connections:
                    self._listening.set()
                    if not started:
                        started = True
                        task_status.started()
                    while True:
                        client = await listener.accept()
                        self.connections += 1
                        connections.start_soon(self._pipe, client)
            self._scope = None

    async def _pipe(self, client: trio.abc.Stream) -> None:
        async with client:
            try:
                upstream = await self._connect_upstream()
            except OSError:
                return
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(_copy, client, upstream, nursery.cancel_scope)
                nursery.start_soon(_copy, upstream, client, nursery.cancel_scope)


async def _copy(source: trio.abc.Stream, sink: trio.abc.Stream, scope: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(_CHUNK):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()  # one side is done: so is the connection


def _upstream_of(url: str) -> Callable[[], Awaitable[trio.abc.Stream]]:
    """How to reach the server of a ``postgresql://`` URL (unix socket or TCP)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
    port = int(query.get("port", [str(parts.port or 5432)])[0])

    async def connect() -> trio.abc.Stream:
        if host.startswith("/"):
            return await trio.open_unix_socket(f"{host}/.s.PGSQL.{port}")
        return await trio.open_tcp_stream(host, port)

    return connect


def proxied_url(url: str, port: int) -> str:
    """``url`` with the server replaced by the proxy on 127.0.0.1:``port``."""
    parts = urlsplit(url)
    user = quote(unquote(parts.username or ""), safe="")
    password = quote(unquote(parts.password or ""), safe="")
    return f"postgresql://{user}:{password}@127.0.0.1:{port}{parts.path}"


@contextlib.asynccontextmanager
async def pg_proxy(url: str) -> AsyncIterator[tuple[PgProxy, str]]:
    """A proxy in front of the server of ``url``, and the URL that goes through it."""
    proxy = PgProxy(_upstream_of(url))
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        yield proxy, proxied_url(url, proxy.port)
        nursery.cancel_scope.cancel()
