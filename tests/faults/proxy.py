"""A TCP proxy in front of PostgreSQL that a test or a benchmark breaks on purpose.

The proxy accepts TCP on 127.0.0.1 (a free port) and forwards every connection to the real
server, over TCP or its unix socket. While it runs, its owner can:

- ``pause()``: hold every byte in both directions; connections stay open (a network stall);
  ``resume()`` lets the held bytes through in order;
- ``cut()``: close every open connection at once and close each new one as soon as it is
  accepted (the server is gone); ``restore()`` accepts connections again;
- ``delay_s``: wait this long before forwarding each chunk (a slow network).

Faults are injected between chatd and the database, never inside either, so the code under
test runs exactly as in production. ``proxied_url`` turns the database URL chatd would use into
the same URL through the proxy.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import trio

_CHUNK_BYTES = 65536
# PostgreSQL's default port, and the name of its unix socket file in the socket directory.
_PG_DEFAULT_PORT = 5432
_PG_SOCKET_FILE = ".s.PGSQL.{port}"


@dataclass(frozen=True, slots=True)
class TcpTarget:
    host: str
    port: int

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream(self.host, self.port)


@dataclass(frozen=True, slots=True)
class UnixTarget:
    path: str

    async def connect(self) -> trio.SocketStream:
        return await trio.open_unix_socket(self.path)


Target = TcpTarget | UnixTarget


def target_of_url(url: str) -> Target:
    """Where the PostgreSQL server of a ``postgresql://`` URL listens.

    Follows libpq's rules for the one-host forms chatd uses: ``host`` (in the authority or the
    query) starting with ``/`` is the directory of the unix socket ``.s.PGSQL.<port>``.
    """
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    host = query.get("host") or (unquote(parts.hostname) if parts.hostname else "")
    port = int(query.get("port") or parts.port or _PG_DEFAULT_PORT)
    if not host:
        raise ValueError(f"no host in the database URL {_without_password(url)!r}")
    if host.startswith("/"):
        return UnixTarget(f"{host.rstrip('/')}/{_PG_SOCKET_FILE.format(port=port)}")
    return TcpTarget(host, port)


def proxied_url(url: str, address: tuple[str, int]) -> str:
    """``url`` with its server replaced by the proxy at ``address`` (user, password, database
    and the other parameters kept)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port")]
    userinfo = parts.netloc.rpartition("@")[0]
    host, port = address
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment))


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


class _Link:
    """One client connection and its upstream twin, cancelled together."""

    def __init__(self, client: trio.SocketStream) -> None:
        self.client = client
        self.upstream: trio.SocketStream | None = None
        self.scope = trio.CancelScope()


@dataclass(eq=False)
class Trigger:
    """A fault armed on one transaction: once a client sends ``marker`` (a bind parameter of a
    statement, such as a message's unique text), the next ``then`` it sends on the same
    connection (``COMMIT``) sets off ``action`` (``cut`` or ``pause``), either before those bytes
    reach the server (``at="request"``: the commit is lost) or once the server answered them
    (``at="reply"``: the commit is done, its acknowledgement is lost)."""

    marker: bytes
    then: bytes
    action: Literal["cut", "pause"]
    at: Literal["request", "reply"]
    fired: trio.Event = field(default_factory=trio.Event)
    _link: _Link | None = None
    _awaiting_reply: bool = False


class PgProxy:
    """The proxy; start it with ``open_pg_proxy`` (or ``nursery.start(proxy.serve)``)."""

    def __init__(self, target: Target, *, delay_s: float = 0.0) -> None:
        self.target = target
        self.delay_s = delay_s
        self.address: tuple[str, int] = ("", 0)
        # Counters for tests and for the chaos run's report.
        self.accepted = 0
        self.refused = 0
        self.cuts = 0
        self.bytes_forwarded = 0
        self.bytes_held = 0
        self._links: set[_Link] = set()
        self._flowing = trio.Event()
        self._flowing.set()
        self._cut = False
        self._changed = trio.Event()
        self._triggers: list[Trigger] = []

    # -- control ---------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return not self._flowing.is_set()

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def open_connections(self) -> int:
        return len(self._links)

    def pause(self) -> None:
        """Hold every byte both ways from now on; connections stay open."""
        if self._flowing.is_set():
            self._flowing = trio.Event()
        self._notify()

    def resume(self) -> None:
        """Let held and new bytes through again, in the order they came."""
        self._flowing.set()
        self._notify()

    def cut(self) -> None:
        """Close every open connection now (bytes held by a pause are dropped) and close each
        new one at once until ``restore()``."""
        self._cut = True
        self.cuts += 1
        for link in list(self._links):
            self._close_link(link)
        self._links.clear()
        self._notify()

    def restore(self) -> None:
        """Accept and forward connections again (a pause, if any, still holds their bytes)."""
        self._cut = False
        self._notify()

    def arm(
        self,
        marker: bytes,
        *,
        then: bytes = b"COMMIT",
        action: Literal["cut", "pause"] = "cut",
        at: Literal["request", "reply"] = "request",
    ) -> Trigger:
        """Set off ``action`` at the commit of the transaction that sends ``marker`` (see
        ``Trigger``); ``trigger.fired`` is set when it struck. One shot."""
        trigger = Trigger(marker, then, action, at)
        self._triggers.append(trigger)
        return trigger

    def disarm(self, trigger: Trigger) -> None:
        """Withdraw a trigger that has not struck (no effect once it has)."""
        if trigger in self._triggers:
            self._triggers.remove(trigger)

    def url_for(self, url: str) -> str:
        """``url`` (of the proxied server) through this proxy."""
        return proxied_url(url, self.address)

    async def wait_until(self, predicate: Callable[[PgProxy], bool]) -> None:
        """Until ``predicate(self)`` holds; bound it with ``trio.fail_after``."""
        while not predicate(self):
            await self._changed.wait()

    # -- serving ---------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        [listener] = listeners
        sockname = listener.socket.getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        async with listener, trio.open_nursery() as nursery:
            task_status.started(self.address)
            while True:
                client = await listener.accept()
                nursery.start_soon(self._handle, client)

    async def _handle(self, client: trio.SocketStream) -> None:
        if self._cut:
            self.refused += 1
            _abort(client)
            self._notify()
            return
        self.accepted += 1
        link = _Link(client)
        self._links.add(link)
        self._notify()
        try:
            with link.scope:
                try:
                    link.upstream = await self.target.connect()
                except OSError:
                    return  # the server itself is down: the client sees its connection close
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(self._pump, link, client, link.upstream, True)
                    pumps.start_soon(self._pump, link, link.upstream, client, False)
        finally:
            self._links.discard(link)
            self._close_link(link)
            self._notify()

    async def _pump(
        self, link: _Link, source: trio.SocketStream, sink: trio.SocketStream, upstream: bool
    ) -> None:
        try:
            while chunk := await source.receive_some(_CHUNK_BYTES):
                self.bytes_held += len(chunk)
                self._notify()
                try:
                    if self._triggers:
                        self._check_triggers(link, chunk, upstream=upstream)
                    if self._cut:
                        return
                    if self.delay_s > 0:
                        await trio.sleep(self.delay_s)
                    await self._flowing.wait()
                    await sink.send_all(chunk)
                    self.bytes_forwarded += len(chunk)
                finally:
                    self.bytes_held -= len(chunk)
                    self._notify()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        # One side ended or broke: so does the whole link, as when a real server goes away.
        link.scope.cancel()

    def _check_triggers(self, link: _Link, chunk: bytes, *, upstream: bool) -> None:
        for trigger in list(self._triggers):
            if upstream:
                start = 0
                if trigger._link is None:
                    found = chunk.find(trigger.marker)
                    if found < 0:
                        continue
                    trigger._link = link
                    start = found + len(trigger.marker)
                if trigger._link is not link or trigger._awaiting_reply:
                    continue
                if chunk.find(trigger.then, start) < 0:
                    continue
                if trigger.at == "reply":
                    trigger._awaiting_reply = True
                    continue
            elif not (trigger._link is link and trigger._awaiting_reply):
                continue
            self._triggers.remove(trigger)
            if trigger.action == "cut":
                self.cut()
            else:
                self.pause()
            trigger.fired.set()

    def _close_link(self, link: _Link) -> None:
        link.scope.cancel()
        _abort(link.client)
        if link.upstream is not None:
            _abort(link.upstream)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


def _abort(stream: trio.SocketStream) -> None:
    """Close at once, without waiting on the peer: TCP peers get a reset (linger 0), as when a
    host or a network path dies, so no side hangs in a graceful close."""
    sock = stream.socket
    with contextlib.suppress(OSError):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # trio's close() also wakes the tasks blocked on the socket (ClosedResourceError).
    sock.close()


@contextlib.asynccontextmanager
async def open_pg_proxy(url: str, *, delay_s: float = 0.0) -> AsyncIterator[PgProxy]:
    """A running proxy in front of the server of ``url``; ``proxy.url_for(url)`` is the URL
    through it. Everything is closed on exit."""
    proxy = PgProxy(target_of_url(url), delay_s=delay_s)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        try:
            yield proxy
        finally:
            proxy.cut()
            nursery.cancel_scope.cancel()


__all__ = [
    "PgProxy",
    "Target",
    "TcpTarget",
    "UnixTarget",
    "open_pg_proxy",
    "proxied_url",
    "target_of_url",
]
