"""Serve the app over HTTP/1.1 and WebSockets with Hypercorn's protocol code and our own
listener loop, with chatd's limits instead of Hypercorn's defaults.

Hypercorn's ``worker_serve`` runs every connection in one nursery shared with the server
itself, so an exception escaping one connection (a bug in Hypercorn's protocol state machine,
a peer that vanished at a bad moment) ended the whole process. Here each connection runs in
``Connection.run``, which contains and logs (one line) whatever that connection raises, and
the accept loop counts connections against ``max_connections``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any, cast

import h11
import trio
from hypercorn.config import Config, Sockets
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import (
    AppWrapper,
    ASGIFramework,
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    ConnectionState,
    Scope,
)
from hypercorn.utils import parse_socket_addr, repr_socket_addr, wrap_app
from quart import request, websocket
from quart_trio import QuartTrio

from chatd.config import Settings
from chatd.logs import begin_request, end_request, note_route, request_done
from chatd.web.context import Services, services
from chatd.web.metrics import PROMETHEUS_TEXT, HttpMetrics, exposition, http_metrics

log = logging.getLogger(__name__)

_RECEIVE_BYTES = 65536

# What a connection past ``max_connections`` gets before it is closed.
_OVER_CAPACITY_BODY = (
    b'{"error": {"code": "unavailable", '
    b'"message": "the server is at its connection limit; retry shortly"}}'
)
_OVER_CAPACITY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: application/json\r\n"
    b"retry-after: 1\r\n"
    b"connection: close\r\n"
    b"content-length: %d\r\n"
    b"\r\n" % len(_OVER_CAPACITY_BODY)
) + _OVER_CAPACITY_BODY


def hypercorn_config(settings: Settings, *, host: str, port: int, listen_fd: int = -1) -> Config:
    """Hypercorn's config for chatd; with ``listen_fd`` >= 0 it serves that inherited, already
    listening socket (``chatd serve --workers``: the parent bound it) instead of binding."""
    config = Config()
    config.bind = [f"fd://{listen_fd}" if listen_fd >= 0 else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = _hypercorn_log()
    config.include_server_header = False
    config.graceful_timeout = settings.shutdown_grace_s
    config.backlog = settings.listen_backlog
    # Hypercorn's defaults allow 16 MiB bodies and WebSocket messages.
    config.wsgi_max_body_size = settings.max_body_bytes
    config.websocket_max_message_size = settings.max_body_bytes
    config.websocket_ping_interval = settings.ws_ping_interval_s or None
    return config


async def serve(
    app: QuartTrio,
    settings: Settings,
    *,
    host: str,
    port: int,
    shutdown_trigger: Callable[[], Awaitable[None]],
    listen_fd: int = -1,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns; ``task_status`` gets the bound URLs.

    With ``listen_fd`` >= 0, on that inherited listening socket (shared with the other workers
    of ``chatd serve --workers``: the kernel hands each connection to one of them) instead of
    binding ``host:port``.

    Hypercorn leaves open WebSockets to time out on shutdown (clients would see 1006), so the
    app is told first and closes each one with 1001. Open connections then get
    ``shutdown_grace_s`` to finish; idle keep-alive connections are closed at once.
    """
    config = hypercorn_config(settings, host=host, port=port, listen_fd=listen_fd)
    inner = close_after_unread_body(app)
    # The public API is logged and measured; the internal link between workers (served by this
    # loop too) is not: its requests are the API's, forwarded, and logged where they came in.
    api = isinstance(app.extensions.get("chatd"), Services)
    if api:
        note_routes(app)
        inner = access_logged(inner, http_metrics(app))
    asgi = wrap_app(inner, config.wsgi_max_body_size, "asgi")
    sockets = listening_sockets(config, settings)
    metrics_socket = bind_metrics(settings) if api and settings.metrics_port else None
    context = WorkerContext(None)
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(asgi, config, lifespan_state)
    gate = ConnectionGate(settings.max_connections)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await serve_connection(stream)
        except* Exception as group:  # noqa: BLE001 - the last wall: nothing reaches the server
            log.warning("connection failed: %s", _summary(group))

    async def serve_connection(stream: trio.SocketStream) -> None:
        if not gate.enter():
            await refuse_over_capacity(stream, settings)
            return
        connection = Connection(
            asgi,
            config,
            context,
            lifespan_state,
            stream,
            close_grace_s=settings.shutdown_grace_s,
            close_linger_s=settings.close_linger_s,
            on_close=gate.leave,
        )
        await connection.run()

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        if metrics_socket is not None:
            lifespan_nursery.start_soon(serve_metrics, app, metrics_socket, settings)
        listeners = [
            trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            for sock in sockets.insecure_sockets
        ]
        urls = [
            "http://" + repr_socket_addr(sock.family, sock.getsockname())
            for sock in sockets.insecure_sockets
        ]
        for url in urls:
            log.info("listening on %s", url)
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(
                    partial(trio.serve_listeners, handle, listeners, handler_nursery=connections)
                )
                task_status.started(urls)
                await shutdown_trigger()
                services(app).closing.set()
                accepting.cancel_scope.cancel()
            for listener in listeners:
                await listener.aclose()
            # Idle keep-alive connections close now; busy ones get the grace period.
            await context.terminated.set()
            connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


class ConnectionGate:
    """The process-wide count of open connections, against ``max_connections``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def enter(self) -> bool:
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def leave(self) -> None:
        self.open -= 1


async def refuse_over_capacity(stream: trio.SocketStream, settings: Settings) -> None:
    """Answer 503 without parsing the request, and close: the open connections are not
    slowed down, and the client knows to come back rather than seeing a reset."""
    log.warning("connection refused: at the limit of %d open connections", settings.max_connections)
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        with trio.move_on_after(settings.client_send_timeout_s):
            await stream.send_all(_OVER_CAPACITY)
        await stream.send_eof()
    await linger_and_close(stream, settings.close_linger_s)


async def linger_and_close(stream: trio.SocketStream, linger_s: float) -> None:
    """Close a stream whose sending side was shut, after reading (and discarding) what the
    client still sends, until it closes too or ``linger_s`` passed.

    Closing a socket with unread bytes makes the kernel reset the connection, and a reset can
    destroy our last answer (a 413, a 503) before the client read it: a client still sending
    its body would see "connection reset" instead.
    """
    with trio.move_on_after(linger_s):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await stream.receive_some(_RECEIVE_BYTES):
                pass
    with trio.CancelScope(shield=True):
        await stream.aclose()


class Connection:
    """One client connection: bytes in and out of Hypercorn's HTTP/1.1 (and h2c/WebSocket)
    protocol, an idle timer, and a wall around it.

    Whatever exception this connection raises (from the protocol, the socket, or a request
    task) ends this connection only, logged as one line. Once the connection is closed, its
    leftover tasks get ``close_grace_s`` before they are cancelled, so none can hang on;
    ``on_close`` is called once, when the socket is closed.
    """

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        lifespan_state: dict[str, Any],
        stream: trio.SocketStream,
        *,
        close_grace_s: float,
        close_linger_s: float,
        on_close: Callable[[], None],
    ) -> None:
        self.app = app
        self.config = config
        self.context = context
        self.lifespan_state = lifespan_state
        self.stream = stream
        self.close_grace_s = close_grace_s
        self.close_linger_s = close_linger_s
        self.on_close = on_close
        self.peer = "?"
        self._scope = trio.CancelScope()
        self._send_lock = trio.Lock()
        self._idle: trio.CancelScope | None = None
        self._tasks: TaskGroup | None = None
        self._protocol: ProtocolWrapper | None = None
        self._closed = False
        self._reading = False

    def is_closed(self) -> bool:
        return self._closed

    async def run(self) -> None:
        try:
            with self._scope:
                await self._serve()
        except* Exception as group:  # noqa: BLE001 - one connection's failure, whatever it is
            log.warning("connection from %s failed: %s", self.peer, _summary(group))
        finally:
            await self._close()
            with trio.CancelScope(shield=True):
                await self.stream.aclose()  # if the reader was cancelled before it closed it

    async def _serve(self) -> None:
        sock = self.stream.socket
        try:
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
        except OSError:
            return  # gone before we could look at it
        if client is not None:
            self.peer = f"{client[0]}:{client[1]}"
        async with TaskGroup() as tasks:
            self._tasks = tasks
            self._protocol = ProtocolWrapper(
                self.app,
                self.config,
                self.context,
                tasks,
                ConnectionState(self.lifespan_state.copy()),
                ssl=False,
                client=client,
                server=server,
                send=self._protocol_send,
                alpn_protocol="http/1.1",
            )
            await self._protocol.initiate()
            self._set_idle(idle=True)
            await self._read(self._protocol)

    async def _read(self, protocol: ProtocolWrapper) -> None:
        self._reading = True
        while not self.is_closed():
            try:
                data = await self.stream.receive_some(_RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if self.is_closed():  # closed by another task while we waited
                break  # bytes after our close are the linger's to discard
            # b"" (the peer's EOF) goes to the protocol too: h11 turns it into its own event.
            await protocol.handle(RawData(bytes(data)))
            if not data:
                break
        self._reading = False
        closed_by_us = self.is_closed()
        # What is left (a request task finishing, Hypercorn's WebSocket ping task asleep)
        # gets the grace period; the connection no longer counts against the limit.
        await self._close()
        if closed_by_us:
            await linger_and_close(self.stream, self.close_linger_s)
        await protocol.handle(Closed())

    async def _protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            broken = False
            async with self._send_lock:
                try:
                    # A half-written response or frame would corrupt the stream, so writes are
                    # shielded; TCP_USER_TIMEOUT bounds a peer that stops reading.
                    with trio.CancelScope(shield=True):
                        await self.stream.send_all(event.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    broken = True
            if broken:
                await self._close()
                await self._handle(Closed())
            elif self._response_ended_the_connection():
                # The reader sees the close and tells the protocol.
                await self._close()
        elif isinstance(event, Closed):
            await self._close()
            await self._handle(Closed())
        elif isinstance(event, Updated):
            self._set_idle(idle=event.idle)

    def _response_ended_the_connection(self) -> bool:
        """True once the response just written leaves HTTP/1.1 nothing more to say: it said
        ``Connection: close`` (or h11 gave up on the connection).

        Hypercorn usually closes such a connection itself, but not always: when a WebSocket
        client sends frames before the handshake's answer, Hypercorn refuses them with its own
        400 (``Connection: close``) while the app's task is still deciding; the app's answer is
        then dropped and nothing ever closes the connection. Reading h11's state here makes the
        close follow from what was sent, whichever part sent it.
        """
        protocol = getattr(self._protocol, "protocol", None)
        connection = getattr(protocol, "connection", None)
        # During and after a WebSocket handshake, Hypercorn wraps the h11 connection.
        connection = getattr(connection, "h11_connection", connection)
        return isinstance(connection, h11.Connection) and connection.our_state in (
            h11.MUST_CLOSE,
            h11.CLOSED,
            h11.ERROR,
        )

    async def _handle(self, event: Event) -> None:
        if self._protocol is not None:
            await self._protocol.handle(event)

    def _set_idle(self, *, idle: bool) -> None:
        """Idle (no request in progress): closed after the keep-alive timeout, or at once when
        the server shuts down. A connection that never sends a whole request is idle too."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if idle and self._tasks is not None and not self._closed:
            self._idle = trio.CancelScope()
            self._tasks.spawn(self._close_when_idle, self._idle)

    async def _close_when_idle(self, scope: trio.CancelScope) -> None:
        with scope:
            with trio.move_on_after(self.config.keep_alive_timeout):
                await self.context.terminated.wait()
            await self._close()
            await self._handle(Closed())

    async def _close(self) -> None:
        """End the connection (once): what is left of it gets the grace period.

        Our side is shut at once; while the reader runs, it lingers (see
        ``linger_and_close``) and closes the socket, otherwise the socket is closed here.
        """
        if self._closed:
            return
        self._closed = True
        self.on_close()
        self._scope.deadline = min(self._scope.deadline, trio.current_time() + self.close_grace_s)
        # Shielded: the caller is often a request task being cancelled (its response is sent),
        # and a close cut short at its first checkpoint would leave the socket open.
        with trio.CancelScope(shield=True):
            # Under the send lock: a write of another task in progress ends first (a shut
            # during it would fail that write with BusyResourceError).
            async with self._send_lock:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.stream.send_eof()
            if not self._reading:
                await self.stream.aclose()


def close_after_unread_body(app: ASGIFramework) -> ASGIFramework:
    """ASGI middleware: a response that starts before the request's body was read (a 401,
    403 or 413 decided from the headers) says ``Connection: close``, and the rest of the body
    is discarded rather than left queued.

    The server queues a request's body for the app. An app that answered without reading it
    leaves that queue full: the connection's reader then waits forever for room, and the next
    request on the connection is never answered. Closing is the one safe answer (the unread
    bytes cannot be told apart from the next request), and draining the queue lets the
    connection get to its close.
    """

    async def middleware(
        scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http" or not _declares_body(scope["headers"]):
            await app(scope, receive, send)
            return
        body_done = False

        async def receive_tracked() -> ASGIReceiveEvent:
            nonlocal body_done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def drain() -> None:
            while not body_done:
                await receive_tracked()

        async with trio.open_nursery() as nursery:

            async def send_closing(message: ASGISendEvent) -> None:
                if message["type"] == "http.response.start" and not body_done:
                    headers = [*message.get("headers", ()), (b"connection", b"close")]
                    message = cast(ASGISendEvent, {**message, "headers": headers})
                    nursery.start_soon(drain)
                await send(message)

            await app(scope, receive_tracked, send_closing)

    return middleware


def note_routes(app: QuartTrio) -> None:
    """Tell each request's access record the template of the route it matched (the raw path
    of one that matched none). Once per app, however often it is served."""
    if app.extensions.get("chatd.routes_noted"):
        return
    app.extensions["chatd.routes_noted"] = True

    async def note_http() -> None:
        rule = request.url_rule
        if rule is not None:
            note_route(rule.rule)

    async def note_websocket() -> None:
        rule = websocket.url_rule
        if rule is not None:
            note_route(rule.rule)

    app.before_request(note_http)
    app.before_websocket(note_websocket)


def access_logged(app: ASGIFramework, metrics: HttpMetrics) -> ASGIFramework:
    """ASGI middleware: one access line per request (``chatd.logs.request_done``) and its
    duration in ``metrics``, when its response ended; a WebSocket's when its handshake was
    answered (101, or the refusal's status).

    The method, the status and the time are seen here; the route's template and the caller
    are noted on the request's ``AccessRecord`` by the layers that know them. A request that
    ends without an answer (the client went away) is logged with 499, one the app failed
    without one with 500.
    """

    async def middleware(
        scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        kind = scope["type"]
        if kind not in {"http", "websocket"}:
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        record, token = begin_request()
        status = 0
        done = False

        def finish(code: int) -> None:
            nonlocal done
            done = True
            seconds = time.perf_counter() - started
            route = record.route or str(scope.get("path", ""))
            metrics.observe(route, code, seconds)
            method = str(scope.get("method", "GET"))
            request_done(method, route, code, seconds, record.user_id)

        async def send_watched(message: ASGISendEvent) -> None:
            nonlocal status
            event = message["type"]
            if event in {"http.response.start", "websocket.http.response.start"}:
                status = message["status"]  # type: ignore[typeddict-item]
            await send(message)
            if done:
                return
            if event in {"http.response.body", "websocket.http.response.body"}:
                if not message.get("more_body", False):
                    finish(status)
            elif event == "websocket.accept":
                finish(101)
            elif event == "websocket.close":
                finish(403)  # closed before the accept: Hypercorn answers the handshake 403

        try:
            await app(scope, receive, send_watched)
        except Exception:
            if not done:
                finish(500)
            raise
        finally:
            end_request(token)
            if not done:
                finish(status or 499)

    return middleware


def _declares_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name.lower() == b"transfer-encoding":
            return True
        if name.lower() == b"content-length" and value.strip() not in (b"0", b""):
            return True
    return False


def _summary(group: BaseExceptionGroup[Exception]) -> str:
    leaves: list[str] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        elif not isinstance(exc, trio.Cancelled):  # a consequence, not a cause
            leaves.append(f"{type(exc).__name__}: {exc}")

    walk(group)
    return "; ".join(dict.fromkeys(leaves))


class _OneLine(logging.Filter):
    """Hypercorn logs a failed request task with its traceback; chatd logs each failure of a
    connection as one line (the app's own 500s are logged with theirs by ``errors``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = (
                _summary(exc)
                if isinstance(exc, BaseExceptionGroup)
                else f"{type(exc).__name__}: {exc}"
            )
            record.msg = f"{record.getMessage()}: {text}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def _hypercorn_log() -> logging.Logger:
    logger = logging.getLogger("hypercorn.error")
    if not any(isinstance(f, _OneLine) for f in logger.filters):
        logger.addFilter(_OneLine())
    return logger


def listening_sockets(config: Config, settings: Settings) -> Sockets:
    """Hypercorn's sockets, with a bound on how long a client may refuse our data.

    Writes are shielded from cancellation, so a client that stops reading would hold its
    connection's task (and the server's shutdown) forever. ``TCP_USER_TIMEOUT``, inherited by
    accepted connections, makes the kernel drop such a connection instead.
    """
    sockets = config.create_sockets()
    timeout_ms = round(settings.client_send_timeout_s * 1000)
    for sock in sockets.insecure_sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout_ms)
        sock.listen(config.backlog)
    return sockets


# -- the metrics port --------------------------------------------------------------------------

_METRICS_REQUEST_MAX_BYTES = 8192
# With several workers on one host, each takes the first free port from metrics_port up.
_METRICS_PORT_TRIES = 256


def bind_metrics(settings: Settings) -> socket.socket:
    """The listening socket of the metrics port: ``metrics_host:metrics_port``; a worker of
    ``chatd serve --workers`` takes the first free one from there up (and logs it)."""
    tries = _METRICS_PORT_TRIES if settings.parent_fd >= 0 else 1
    last: OSError | None = None
    for port in range(settings.metrics_port, min(settings.metrics_port + tries, 65536)):
        info = socket.getaddrinfo(settings.metrics_host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(info[4])
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.listen(64)
        sock.setblocking(False)  # noqa: FBT003
        return sock
    raise OSError(
        f"metrics_port (CHATD_METRICS_PORT) {settings.metrics_port} on"
        f" {settings.metrics_host}: cannot listen ({last})"
    )


async def serve_metrics(app: QuartTrio, sock: socket.socket, settings: Settings) -> None:
    """``GET /metrics`` without a token, for scrapers: the text of ``/api/v1/metrics``. One
    request per connection, read within ``client_send_timeout_s``; anything else is a 404."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    host, port = sock.getsockname()[:2]
    log.info("metrics on http://%s:%d/metrics", host, port)
    svc = services(app)
    http = http_metrics(app)

    async def answer(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            with trio.move_on_after(settings.client_send_timeout_s):
                head = b""
                while b"\r\n\r\n" not in head and len(head) < _METRICS_REQUEST_MAX_BYTES:
                    data = await stream.receive_some(_METRICS_REQUEST_MAX_BYTES)
                    if not data:
                        break
                    head += data
                method, _, rest = head.partition(b" ")
                target = rest.partition(b" ")[0].partition(b"?")[0]
                if method in (b"GET", b"HEAD") and target == b"/metrics":
                    body = exposition(svc, http).encode()
                    status, kind = b"200 OK", PROMETHEUS_TEXT.encode()
                else:
                    body, status, kind = b"not found\n", b"404 Not Found", b"text/plain"
                await stream.send_all(
                    b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n%s"
                    % (status, kind, len(body), b"" if method == b"HEAD" else body)
                )
        with trio.CancelScope(shield=True):
            await stream.aclose()

    async with listener:
        await trio.serve_listeners(answer, [listener])
