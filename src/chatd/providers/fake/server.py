"""The fake provider's HTTP server: trio sockets and h11, one task per connection, keep-alive.

A client that leaves is noticed when a send fails, and at once during a long pause (a slow
first chunk, a silent stream): those are spent reading the socket. Short pauses between chunks
park on a shared ticker instead (with a thousand streams, a fifth of the CPU of a trio timeout),
and one deadline per response bounds every send rather than a cancel scope per chunk.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import h11
import msgspec
import trio

from chatd.providers.fake import wire_anthropic, wire_openai
from chatd.providers.fake.scenario import (
    KNOB_HEADER,
    STREAM_FAULTS,
    ErrorCase,
    Fault,
    InvalidRequest,
    Purpose,
    ReplyPlan,
    RequestFacts,
    Scenario,
    StreamScript,
    plan_reply,
    request_digest,
    resolve,
    retry_after_headers,
)
from chatd.tuning import tune_for_many_connections

_RECEIVE_BYTES = 65536
# Pauses at least this long read the socket meanwhile (prompt disconnect detection); shorter
# ones use the cheaper ticker and learn of a departed client from the next send.
_WATCHED_PAUSE_S = 0.05
_LINGER_S = 2.0  # after refusing a request, how long to read what the client still sends
_JSON = b"application/json"
_SSE = b"text/event-stream; charset=utf-8"


class Wire(Protocol):
    """What the server needs from a wire module (``wire_openai``, ``wire_anthropic``)."""

    PROVIDER: str

    def parse_request(self, body: Any) -> RequestFacts: ...

    def digest_parts(self, body: Any) -> tuple[Any, ...]: ...

    def system_text(self, body: Any) -> str: ...

    def conversation(self, body: Any) -> list[tuple[str, str]]: ...

    def api_key(self, headers: Mapping[str, str]) -> str | None: ...

    def headers(self, request_id: str, content_type: bytes) -> list[tuple[bytes, bytes]]: ...

    def render_stream(
        self, plan: ReplyPlan, *, token: str, created: int, include_usage: bool
    ) -> StreamScript: ...

    def render_message(self, plan: ReplyPlan, *, token: str, created: int) -> bytes: ...

    def render_error(self, case: ErrorCase) -> tuple[int, bytes]: ...


_ROUTES: dict[bytes, Wire] = {
    b"/v1/chat/completions": wire_openai,
    b"/v1/messages": wire_anthropic,
}
_WIRES: dict[str, Wire] = {wire.PROVIDER: wire for wire in _ROUTES.values()}


@dataclass(eq=False)
class RecordedRequest:
    """One request as the server saw it, and how its answer went."""

    index: int
    connection: int  # which connection it came on (keep-alive reuses one)
    method: str
    path: str
    headers: dict[str, str]
    body: Any = None  # the parsed JSON body; None if missing or not JSON
    provider: str | None = None  # "openai" | "anthropic" for the two API routes
    purpose: Purpose | None = None  # chat, or chatd's summary / title call (once parsed)
    scenario: Scenario | None = None  # the knobs in effect (None if the request was rejected)
    knobs: dict[str, Any] = field(default_factory=dict)  # the request's own knobs
    fault: Fault | None = None  # the fault actually injected
    stream: bool = False
    status: int | None = None  # once the status line went out
    completed: bool = False  # the HTTP response was sent to its end
    client_disconnected: bool = False  # the client left before the end of the response
    finished: bool = False  # the server is done with this request

    def system_text(self) -> str:
        """The system prompt: Anthropic's ``system`` field (its text blocks joined), or OpenAI's
        system and developer messages (joined by a blank line); "" if none or not parseable."""
        wire = _WIRES.get(self.provider or "")
        return "" if wire is None else wire.system_text(self.body)

    def messages(self) -> list[tuple[str, str]]:
        """The conversation as ``(role, text)`` pairs, the same for both wire formats: roles
        ``user``, ``assistant`` and ``tool`` (OpenAI's tool messages; each of Anthropic's
        tool_result blocks, before the user text of its message if it has some); no system
        messages (see ``system_text``); tool calls carry no text."""
        wire = _WIRES.get(self.provider or "")
        return [] if wire is None else wire.conversation(self.body)


class _ClientGone(Exception):
    """The client closed or reset the connection, or stopped reading for too long."""


class FakeLLM:
    """A fake OpenAI + Anthropic server. Run it with ``open_fake_llm`` or ``serve``."""

    def __init__(
        self,
        defaults: Scenario | None = None,
        *,
        expected_api_key: str | None = None,
        record: bool = True,
        keepalive_timeout_s: float = 120.0,
        send_timeout_s: float = 60.0,
        silent_max_s: float = 3600.0,
        max_body_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.defaults = defaults or Scenario()
        self.expected_api_key = expected_api_key
        self.record = record
        self.keepalive_timeout_s = keepalive_timeout_s
        self.send_timeout_s = send_timeout_s
        self.silent_max_s = silent_max_s
        self.max_body_bytes = max_body_bytes
        self.requests: list[RecordedRequest] = []  # filled only when `record` is true
        self.request_count = 0
        self.connection_count = 0
        self._fault_counts: dict[str, int] = {}
        self._changed = trio.Event()
        self._token_prefix = secrets.token_hex(4)
        self._url: str | None = None
        self._ticker = _Ticker()

    @property
    def url(self) -> str:
        """``http://host:port``: the OpenAI base URL is this + ``/v1``, Anthropic's is this."""
        if self._url is None:
            raise RuntimeError("the fake LLM server is not serving yet")
        return self._url

    # -- waiting for things, for tests -------------------------------------------------------

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; it is checked after every request state change."""
        while not predicate():
            await self._changed.wait()

    async def wait_for_requests(self, n: int) -> list[RecordedRequest]:
        """Wait until ``n`` requests have arrived (headers and body read)."""
        await self.wait_until(lambda: self.request_count >= n)
        return list(self.requests)

    async def wait_for_disconnect(self, index: int | None = None) -> RecordedRequest:
        """Wait until the client of request ``index`` (or of any request) left mid-response."""

        def gone() -> RecordedRequest | None:
            if index is not None:
                r = self.requests[index] if index < len(self.requests) else None
                return r if r is not None and r.client_disconnected else None
            return next((r for r in self.requests if r.client_disconnected), None)

        await self.wait_until(lambda: gone() is not None)
        found = gone()
        assert found is not None
        return found

    async def wait_for_finished(self, index: int) -> RecordedRequest:
        """Wait until the server is done with request ``index`` (answered, cut, or abandoned)."""
        await self.wait_until(lambda: index < len(self.requests) and self.requests[index].finished)
        return self.requests[index]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- serving -------------------------------------------------------------------------------

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on bound ``listeners`` until cancelled; cancelling closes every connection."""
        host, port = listeners[0].socket.getsockname()[:2]
        self._url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ticker.run)
            await nursery.start(trio.serve_listeners, self._serve_connection, listeners)
            task_status.started()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        conn = _Connection(stream, self.connection_count, self._ticker, self.send_timeout_s)
        self.connection_count += 1
        try:
            while True:
                request = await conn.read_request(self.keepalive_timeout_s, self.max_body_bytes)
                if request is None or not await self._respond(conn, *request):
                    return
                if conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
                    return
                conn.h11.start_next_cycle()
        except _ClientGone:
            return
        except _TooLarge:
            await _send_plain(conn, 413, b"request body too large")
        except h11.RemoteProtocolError as exc:
            await _send_plain(conn, exc.error_status_hint, str(exc).encode())

    async def _respond(self, conn: _Connection, request: h11.Request, raw: bytes) -> bool:
        """Answer one request; False when the connection must close afterwards."""
        index = self.request_count
        self.request_count += 1
        headers: dict[str, str] = {}
        for name, value in request.headers:
            key, text = name.decode("latin-1"), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        record = RecordedRequest(
            index=index,
            connection=conn.number,
            method=request.method.decode("ascii"),
            path=request.target.decode("latin-1"),
            headers=headers,
        )
        if self.record:
            self.requests.append(record)
        self._notify()
        try:
            with trio.CancelScope() as conn.budget:
                return await self._dispatch(
                    conn, record, request, raw, f"{self._token_prefix}{index:06d}"
                )
            raise _ClientGone  # the response overran its time budget: the client stopped reading
        except _ClientGone:
            record.client_disconnected = not record.completed
            return False
        finally:
            record.finished = True
            self._notify()

    async def _dispatch(
        self,
        conn: _Connection,
        record: RecordedRequest,
        request: h11.Request,
        raw: bytes,
        token: str,
    ) -> bool:
        route = request.target.split(b"?", 1)[0]
        wire = _ROUTES.get(route)
        request_id = f"req_{token}"
        if wire is None or request.method != b"POST":
            return await self._not_routed(conn, record, request, route, known=wire is not None)
        record.provider = wire.PROVIDER
        if self.expected_api_key is not None:
            key = wire.api_key(record.headers)
            if key != self.expected_api_key:
                case = ErrorCase(Fault.AUTH, request_id, api_key=key)
                return await self._send_error(conn, record, wire, case)
        try:
            try:
                record.body = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                raise InvalidRequest(
                    "We could not parse the JSON body of your request. The request body must "
                    "be valid JSON."
                ) from None
            facts = wire.parse_request(record.body)
            record.purpose = facts.purpose
            # The conversation chatd summarizes or names holds its users' markers: not for it.
            marked = facts.last_user_text if facts.purpose is Purpose.CHAT else None
            scenario, record.knobs, fault_key = resolve(
                self.defaults, record.headers.get(KNOB_HEADER), marked
            )
        except InvalidRequest as exc:
            case = ErrorCase(Fault.BAD_REQUEST, request_id, message=exc.message, param=exc.param)
            return await self._send_error(conn, record, wire, case)
        record.scenario, record.stream = scenario, facts.stream
        fault = self._take_fault(scenario, fault_key)
        if fault is Fault.MIDSTREAM_ERROR and not facts.stream:
            fault = Fault.SERVER_ERROR  # a plain response has no "mid-stream"
        record.fault = fault
        digest = ""
        if scenario.steps and facts.purpose is Purpose.CHAT:
            digest = request_digest(*wire.digest_parts(record.body))
        plan = plan_reply(scenario, facts, token, digest=digest)
        if fault is not None and fault not in STREAM_FAULTS:
            case = ErrorCase(
                fault,
                request_id,
                model=facts.model,
                input_tokens=plan.input_tokens,
                context_window=scenario.context_window,
                api_key=wire.api_key(record.headers),
            )
            return await self._send_error(conn, record, wire, case, scenario)
        reply = _Reply(conn, record, wire, scenario, fault, plan, token, request_id)
        if facts.stream:
            return await reply.stream(
                include_usage=facts.include_usage, silent_max_s=self.silent_max_s
            )
        return await reply.message(silent_max_s=self.silent_max_s)

    def _take_fault(self, scenario: Scenario, key: str) -> Fault | None:
        """The fault to inject, counting requests per key for ``fault_times``."""
        if scenario.fault is None or scenario.fault_times is None:
            return scenario.fault
        seen = self._fault_counts.get(key, 0)
        self._fault_counts[key] = seen + 1
        return scenario.fault if seen < scenario.fault_times else None

    async def _send_error(
        self,
        conn: _Connection,
        record: RecordedRequest,
        wire: Wire,
        case: ErrorCase,
        scenario: Scenario | None = None,
    ) -> bool:
        status, body = wire.render_error(case)
        headers = wire.headers(case.request_id, _JSON)
        if scenario is not None:
            headers += retry_after_headers(scenario, case.fault, time.time())
        record.status = status
        await conn.send_whole(status, headers, body)
        record.completed = True
        return True

    async def _not_routed(
        self,
        conn: _Connection,
        record: RecordedRequest,
        request: h11.Request,
        route: bytes,
        *,
        known: bool,
    ) -> bool:
        if route == b"/healthz" and request.method == b"GET":
            status, body = 200, b'{"status":"ok"}'
        else:
            status = 405 if known else 404
            message = f"Unknown request URL: {record.method} {record.path}."
            error = {"message": message, "type": "invalid_request_error", "param": None}
            body = msgspec.json.encode({"error": {**error, "code": "unknown_url"}})
        record.status = status
        await conn.send_whole(status, [(b"content-type", _JSON)], body)
        record.completed = True
        return True


@dataclass(slots=True)
class _Reply:
    """A successful answer (possibly broken by a stream fault) to one request."""

    conn: _Connection
    record: RecordedRequest
    wire: Wire
    scenario: Scenario
    fault: Fault | None  # a stream fault, or None
    plan: ReplyPlan
    token: str
    request_id: str

    async def stream(self, *, include_usage: bool, silent_max_s: float) -> bool:
        conn, fault = self.conn, self.fault
        conn.set_budget(self._planned_s())
        script = self.wire.render_stream(
            self.plan, token=self.token, created=int(time.time()), include_usage=include_usage
        )
        headers = [*self.wire.headers(self.request_id, _SSE), (b"cache-control", b"no-cache")]
        self.record.status = 200
        await conn.send(conn.response(200, headers) + conn.data(script.head))
        first = self.scenario.first_chunk_delay_ms / 1000
        interval = self.scenario.chunk_interval_ms / 1000
        count = len(script.chunks)
        if fault is not None:
            count = min(count, self.scenario.fault_after_chunks)
        elif count == 0:
            await conn.pause(first)
        for i in range(count):
            await conn.pause(first if i == 0 else interval)
            await conn.send(conn.data(script.chunks[i]))
        if fault is Fault.CUT:
            return False
        if fault is Fault.SILENT:
            conn.set_budget(silent_max_s)
            await conn.pause(silent_max_s)
            return False
        if fault is Fault.TRUNCATED:
            await conn.send(conn.end())
        else:
            ending = script.error if fault is Fault.MIDSTREAM_ERROR else script.tail
            await conn.send(conn.data(ending) + conn.end())
        self.record.completed = True
        return True

    async def message(self, *, silent_max_s: float) -> bool:
        conn, fault = self.conn, self.fault
        conn.set_budget(self._planned_s())
        await conn.pause(self._planned_s())  # as long as streaming it would take
        body = self.wire.render_message(self.plan, token=self.token, created=int(time.time()))
        if fault is Fault.TRUNCATED:
            body = body[: len(body) // 2]
        headers = [*self.wire.headers(self.request_id, _JSON), _content_length(body)]
        self.record.status = 200
        head = conn.response(200, headers)
        if fault is Fault.CUT:
            await conn.send(head + conn.data(body[: len(body) // 2]))
            return False
        if fault is Fault.SILENT:
            await conn.send(head)
            conn.set_budget(silent_max_s)
            await conn.pause(silent_max_s)
            return False
        await conn.send(head + conn.data(body) + conn.end())
        self.record.completed = True
        return True

    def _planned_s(self) -> float:
        """How long the reply takes by its knobs (the send budget comes on top)."""
        delays = self.scenario.first_chunk_delay_ms
        delays += self.scenario.chunk_interval_ms * max(0, self.plan.chunk_count - 1)
        return delays / 1000


class _TooLarge(Exception):
    pass


class _Connection:
    """One client connection: h11 state plus the socket, with bounded waits."""

    __slots__ = ("budget", "chunked", "h11", "number", "send_timeout_s", "stream", "ticker")

    def __init__(
        self, stream: trio.SocketStream, number: int, ticker: _Ticker, send_timeout_s: float
    ) -> None:
        self.stream = stream
        self.number = number
        self.ticker = ticker
        self.h11 = h11.Connection(h11.SERVER)
        self.send_timeout_s = send_timeout_s
        # The current response's deadline: its planned duration plus `send_timeout_s`.
        self.budget = trio.CancelScope()
        self.chunked = False  # the current response body uses chunked transfer encoding

    async def read_request(
        self, idle_timeout_s: float, max_body: int
    ) -> tuple[h11.Request, bytes] | None:
        """The next request and its body; None when the client closed or stayed idle too long."""
        request: h11.Request | None = None
        body: list[bytes] = []
        size = 0
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = b""
                with trio.move_on_after(idle_timeout_s):
                    try:
                        data = await self.stream.receive_some(_RECEIVE_BYTES)
                    except trio.BrokenResourceError:
                        return None
                if not data:
                    return None
                self.h11.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > max_body:
                    raise _TooLarge
                body.append(event.data)
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                return request, b"".join(body)
            else:
                return None

    def set_budget(self, seconds: float) -> None:
        """The rest of this response must be sent within ``seconds`` plus the send timeout."""
        self.budget.deadline = trio.current_time() + seconds + self.send_timeout_s

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds``; a long pause reads the socket to notice a client leaving at once.

        Bytes that arrive meanwhile (an early next request) are kept by h11 for later.
        """
        if seconds <= 0:
            return
        deadline = trio.current_time() + seconds
        if seconds < _WATCHED_PAUSE_S:
            await self.ticker.sleep_until(deadline)
            return
        while trio.current_time() < deadline:
            with trio.move_on_at(deadline):
                try:
                    data = await self.stream.receive_some(_RECEIVE_BYTES)
                except trio.BrokenResourceError:
                    raise _ClientGone from None
                if not data:
                    raise _ClientGone
                self.h11.receive_data(data)

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _ClientGone from None

    def response(self, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        head = _out(
            self.h11.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
        )
        self.chunked = b"\r\ntransfer-encoding: chunked\r\n" in head.lower()
        return head

    def data(self, data: bytes) -> bytes:
        if self.chunked:  # framed here: h11 does not count chunked bytes, and costs 20x more
            return b"%x\r\n%b\r\n" % (len(data), data)
        return _out(self.h11.send(h11.Data(data=data)))

    def end(self) -> bytes:
        return _out(self.h11.send(h11.EndOfMessage()))

    async def send_whole(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        self.set_budget(0)
        head = self.response(status, [*headers, _content_length(body)])
        await self.send(head + self.data(body) + self.end())


class _Ticker:
    """Wakes paused responses at their deadlines, from one task.

    A pause is a heap push and a reschedule, where a trio timeout costs a cancel scope and a
    ``Cancelled`` exception; one wake-up of the ticker serves every pause then due (3 us per
    pause against 18 us for ``trio.sleep`` with 1,000 streams pausing 1 ms here).
    """

    def __init__(self) -> None:
        self._due: list[tuple[float, int, list[trio.lowlevel.Task | None]]] = []
        self._count = 0
        self._sleep = trio.CancelScope()

    async def run(self) -> None:
        due = self._due
        while True:
            now = trio.current_time()
            while due and due[0][0] <= now:
                task = heapq.heappop(due)[2][0]
                if task is not None:
                    trio.lowlevel.reschedule(task)
            with trio.CancelScope(deadline=due[0][0] if due else math.inf) as self._sleep:
                await trio.sleep_forever()

    async def sleep_until(self, deadline: float) -> None:
        waiter: list[trio.lowlevel.Task | None] = [trio.lowlevel.current_task()]
        self._count += 1
        heapq.heappush(self._due, (deadline, self._count, waiter))
        if deadline < self._sleep.deadline:  # noqa: PLR1730 (setting it re-sorts trio's timers)
            self._sleep.deadline = deadline

        def abort(_: Any) -> trio.lowlevel.Abort:
            waiter[0] = None  # left in the heap; skipped when due
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


def _out(data: bytes | None) -> bytes:
    assert data is not None
    return data


def _content_length(body: bytes) -> tuple[bytes, bytes]:
    return (b"content-length", str(len(body)).encode())


def _reason(status: int) -> bytes:
    if status == 529:
        return b"Site Overloaded"
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


async def _send_plain(conn: _Connection, status: int, message: bytes) -> None:
    """A last answer to a request the server cannot handle, if the connection still allows one."""
    if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    headers = [(b"content-type", b"text/plain"), (b"connection", b"close")]
    gone = (_ClientGone, h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError)
    with contextlib.suppress(*gone):
        with trio.move_on_after(conn.send_timeout_s):
            await conn.send_whole(status, headers, message)
        # Close gently: unread request bytes would turn the close into a reset, which can
        # destroy the answer before the client reads it.
        with trio.move_on_after(_LINGER_S):
            await conn.stream.send_eof()
            while await conn.stream.receive_some(_RECEIVE_BYTES):
                pass


@contextlib.asynccontextmanager
async def open_fake_llm(
    defaults: Scenario | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    expected_api_key: str | None = None,
    record: bool = True,
) -> AsyncIterator[FakeLLM]:
    """Serve a ``FakeLLM`` (on a free port by default) while the block runs.

    A bind failure raises ``OSError`` from the ``async with`` itself, outside any nursery.
    """
    server = FakeLLM(defaults, expected_api_key=expected_api_key, record=record)
    listeners = await trio.open_tcp_listeners(port, host=host)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listeners)
            yield server
            nursery.cancel_scope.cancel()
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


async def serve_fake_llm(
    host: str,
    port: int,
    *,
    defaults: Scenario | None = None,
    expected_api_key: str | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """The ``chatd fake-llm`` process: serve until SIGINT or SIGTERM (call from the main thread).

    Requests are not recorded (nothing could read them). Tuned for load tests with thousands
    of connections: the open-file limit goes up to its hard maximum, and the cyclic garbage
    collector runs every 100,000 allocations instead of 700 (with a thousand streams, that
    saves a quarter of the CPU here).
    """
    tune_for_many_connections()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_fake_llm(
            defaults, host=host, port=port, expected_api_key=expected_api_key, record=False
        ) as server:
            if on_ready is not None:
                on_ready(server.url)
            async for _ in signals:
                return
