"""A chatd client that logs everything: what it asked, what it was told, what its streams got.

``ApiClient`` sends each mutating request with an ``Idempotency-Key`` and retries it with the
same key, as a careful client does, while the answer is a transport failure or a 5xx, until a
deadline. Every request becomes an ``Op`` in the shared log: issued and finished times, every
attempt, the final status and reply. An op is *acknowledged* when it got a 2xx; it is
*ambiguous* when it did not, yet an attempt may have reached the server (a transport failure
or a 5xx), so it may or may not have happened.

``ChatStream`` keeps one chat's WebSocket open, reconnecting from its cursor whenever the
connection ends (or the client drops it on purpose), and records every connection with the
cursor it opened with and every event it delivered, for the checker.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlencode, urlsplit
from uuid import uuid4

import httpx2
import trio
from trio_websocket import ConnectionClosed, HandshakeError, wrap_client_stream

# Statuses of a chat that wait for someone else (a user, a client's tools): no run is pending.
SETTLED = frozenset({"waiting", "requires_action", "error"})
RETRYABLE_STATUSES = frozenset({500, 502, 503, 504})
Event = dict[str, Any]


class Changes:
    """A condition variable without a lock: ``notify()`` wakes every ``wait_until``."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate()`` holds; bound it with ``trio.fail_after``."""
        while not predicate():
            await self._event.wait()


@dataclass
class Attempt:
    at: float
    status: int | None  # None: no HTTP answer (connection refused, reset, timed out)
    error: str = ""


@dataclass
class Op:
    """One logical request of one client (all its retries)."""

    client: str
    kind: str  # create | send | edit | interrupt | tool_results
    chat_id: str | None
    text: str | None = None
    target: str | None = None  # the edited message's id
    call_ids: tuple[str, ...] = ()
    key: str = field(default_factory=lambda: uuid4().hex)
    issued_at: float = 0.0
    done_at: float | None = None
    attempts: list[Attempt] = field(default_factory=list)
    status: int | None = None
    reply: Any = None

    @property
    def acked(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def ambiguous(self) -> bool:
        """Not acknowledged, but some attempt may have been carried out."""
        return not self.acked and any(a.status is None or a.status >= 500 for a in self.attempts)

    @property
    def message_id(self) -> str | None:
        """The id of the user message a send, edit or create made (create: unknown here)."""
        if isinstance(self.reply, dict):
            value = self.reply.get("message_id")
            return str(value) if value is not None else None
        return None

    def describe(self) -> str:
        tried = ", ".join(
            f"{a.status or a.error}@{a.at - self.issued_at:.1f}s" for a in self.attempts
        )
        told = f" -> {json.dumps(self.reply)[:200]}" if self.reply is not None else ""
        return f"{self.client} {self.kind} {self.text or self.call_ids or ''} [{tried}]{told}"


class ApiClient:
    """One client's HTTP side; every mutating request is an ``Op`` appended to ``log``."""

    def __init__(
        self,
        name: str,
        base_url: str,
        token: str,
        log: list[Op],
        *,
        op_deadline_s: float = 30.0,
        request_timeout_s: float = 5.0,
        changes: Changes | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url
        self.token = token
        self.log = log
        self.op_deadline_s = op_deadline_s
        self.changes = changes or Changes()
        self.http = httpx2.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=request_timeout_s,
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    # -- commands --------------------------------------------------------------------------

    async def create_chat(self, text: str, **fields: Any) -> Op:
        op = Op(self.name, "create", None, text=text)
        await self._run(op, "POST", "/api/v1/chats", {"text": text, **fields})
        if op.acked:
            op.chat_id = str(op.reply["id"])
        return op

    async def send(self, chat_id: str, text: str, busy_behavior: str = "queue") -> Op:
        op = Op(self.name, "send", chat_id, text=text)
        body = {"text": text, "busy_behavior": busy_behavior}
        await self._run(op, "POST", f"/api/v1/chats/{chat_id}/messages", body)
        return op

    async def edit(self, chat_id: str, message_id: str, text: str) -> Op:
        op = Op(self.name, "edit", chat_id, text=text, target=message_id)
        path = f"/api/v1/chats/{chat_id}/messages/{message_id}"
        await self._run(op, "PATCH", path, {"text": text})
        return op

    async def interrupt(self, chat_id: str) -> Op:
        op = Op(self.name, "interrupt", chat_id)
        await self._run(op, "POST", f"/api/v1/chats/{chat_id}/interrupt", None)
        return op

    async def tool_results(
        self, chat_id: str, call_ids: Sequence[str], *, key: str | None = None
    ) -> Op:
        """Answer ``call_ids``; each output carries the op's key, so the checker finds it."""
        op = Op(self.name, "tool_results", chat_id, call_ids=tuple(call_ids))
        if key is not None:
            op.key = key
        # "tool-output" marks every tool results commit for the fault proxy's triggers.
        output = json.dumps({"result": op.key, "note": "tool-output"})
        body = {"results": [{"call_id": c, "output": output} for c in call_ids]}
        await self._run(op, "POST", f"/api/v1/chats/{chat_id}/tool-results", body)
        return op

    async def _run(self, op: Op, method: str, path: str, body: Any) -> None:
        op.issued_at = trio.current_time()
        self.log.append(op)
        self.changes.notify()
        headers = {"Idempotency-Key": op.key}
        deadline = op.issued_at + self.op_deadline_s
        for backoff in _backoff():
            delay = backoff
            try:
                response = await self.http.request(method, path, json=body, headers=headers)
            except httpx2.TransportError as exc:
                op.attempts.append(Attempt(trio.current_time(), None, type(exc).__name__))
            else:
                op.attempts.append(Attempt(trio.current_time(), response.status_code))
                if not _retryable(response):
                    op.status = response.status_code
                    op.reply = response.json() if response.content else None
                    break
                delay = max(delay, _retry_after_s(response))
            self.changes.notify()
            if trio.current_time() + delay > deadline:
                break
            await trio.sleep(delay)  # backoff between retries, not a wait for a condition
        op.done_at = trio.current_time()
        self.changes.notify()

    # -- reads (retried until answered, for the checker and the tests' waits) ---------------

    async def get_json(self, path: str, *, deadline_s: float = 30.0) -> Any:
        with trio.fail_after(deadline_s):
            for delay in _backoff():
                try:
                    response = await self.http.get(path)
                except httpx2.TransportError:
                    pass
                else:
                    if not _retryable(response):
                        if response.status_code != 200:
                            raise AssertionError(
                                f"GET {path}: {response.status_code} {response.text}"
                            )
                        return response.json()
                await trio.sleep(delay)  # backoff between retries
        raise AssertionError("unreachable")

    async def chat(self, chat_id: str) -> dict[str, Any]:
        chat: dict[str, Any] = await self.get_json(f"/api/v1/chats/{chat_id}")
        return chat

    async def history(self, chat_id: str) -> list[dict[str, Any]]:
        """Every live message of the chat, in order, read page by page."""
        messages: list[dict[str, Any]] = []
        after = 0
        while True:
            page = await self.get_json(
                f"/api/v1/chats/{chat_id}/messages?after_seq={after}&limit=200"
            )
            messages.extend(page["messages"])
            if page["next_after_seq"] is None:
                return messages
            after = page["next_after_seq"]


def _retryable(response: httpx2.Response) -> bool:
    """A 5xx, or a 409 saying the first attempt with this idempotency key is still running."""
    if response.status_code in RETRYABLE_STATUSES:
        return True
    if response.status_code != 409:
        return False
    try:
        error = response.json().get("error", {})
    except ValueError:
        return False
    return isinstance(error, dict) and error.get("field") == "Idempotency-Key"


def _retry_after_s(response: httpx2.Response) -> float:
    try:
        return min(float(response.headers.get("retry-after", "0")), 5.0)
    except ValueError:
        return 0.0


def _backoff() -> Iterator[float]:
    delay = 0.05
    while True:
        yield delay
        delay = min(delay * 2, 0.5)


# -- streams ---------------------------------------------------------------------------------


@dataclass
class Cursor:
    message_seq: int = 0
    history_version: int | None = None
    generation_attempt: int | None = None
    part_seq: int = 0

    def query(self) -> str:
        params: dict[str, int] = {"message_seq": self.message_seq}
        if self.history_version is not None and self.generation_attempt is not None:
            params["history_version"] = self.history_version
            params["generation_attempt"] = self.generation_attempt
            params["part_seq"] = self.part_seq
        return urlencode(params)

    def copy(self) -> Cursor:
        return Cursor(
            self.message_seq, self.history_version, self.generation_attempt, self.part_seq
        )


@dataclass
class StreamConnection:
    cursor: Cursor  # the cursor the client opened it with
    opened_at: float
    events: list[Event] = field(default_factory=list)
    closed_at: float | None = None
    end: str = ""


class ChatStream:
    """One client's view of one chat's stream, kept open across failures (see module doc)."""

    def __init__(self, name: str, base_url: str, token: str, chat_id: str) -> None:
        self.name = name
        self.chat_id = chat_id
        self.token = token
        address = urlsplit(base_url)
        assert address.hostname is not None
        assert address.port is not None
        self._host, self._port, self._netloc = address.hostname, address.port, address.netloc
        self.cursor = Cursor()
        self.connections: list[StreamConnection] = []
        self.held: dict[int, str] = {}  # seq -> message id: the client's copy of the history
        self.status: str | None = None
        self.refusals = 0
        self.events = 0  # delivered so far, plus one per connection that ended
        self.changes = Changes()
        self._drop_scope: trio.CancelScope | None = None
        self._stopping = False

    @property
    def last_seq(self) -> int:
        return max(self.held, default=0)

    @property
    def connected(self) -> bool:
        return self._drop_scope is not None

    def drop(self) -> None:
        """Close the current connection as a client going away would; the stream reconnects
        from its cursor."""
        if self._drop_scope is not None:
            self._drop_scope.cancel()

    def stop(self) -> None:
        self._stopping = True
        self.drop()

    async def run(self) -> None:
        """Stream until ``stop()``: connect from the cursor, read, reconnect after any end."""
        delays = _backoff()
        while not self._stopping:
            if await self._connect_once():
                delays = _backoff()  # it was up: reconnect at once, then back off again
            if not self._stopping:
                await trio.sleep(next(delays))  # backoff between reconnects

    async def _connect_once(self) -> bool:
        """One connection, read to its end; ``False`` when none could be opened."""
        holder: list[StreamConnection] = []
        try:
            await self._session(holder)
        except* (HandshakeError, ConnectionClosed, trio.BrokenResourceError, OSError) as group:
            # A refused handshake (503 while the database is down) surfaces from
            # trio-websocket's reader task; a reset connection from either side.
            if holder:
                holder[0].end = f"ended: {group.exceptions[0]!r}"
            else:
                self.refusals += 1
        except* trio.TooSlowError:
            self.refusals += 1
        finally:
            self._drop_scope = None
            if holder:
                holder[0].closed_at = trio.current_time()
            self.events += 1
            self.changes.notify()
        return bool(holder)

    async def _session(self, holder: list[StreamConnection]) -> None:
        path = f"/api/v1/chats/{self.chat_id}/stream?{self.cursor.query()}"
        auth = [(b"authorization", f"Bearer {self.token}".encode())]
        with trio.fail_after(10):
            tcp = await trio.open_tcp_stream(self._host, self._port)
        async with tcp, trio.open_nursery() as nursery:
            with trio.fail_after(10):
                conn = await wrap_client_stream(
                    nursery, tcp, self._netloc, path, extra_headers=auth
                )
            record = StreamConnection(self.cursor.copy(), trio.current_time())
            holder.append(record)
            self.connections.append(record)
            with trio.CancelScope() as scope:
                self._drop_scope = scope
                try:
                    while True:
                        self._deliver(record, await conn.get_message())
                except ConnectionClosed as closed:
                    record.end = f"closed {closed.reason}"
            self._drop_scope = None
            if scope.cancelled_caught:
                record.end = "dropped by the client"
            with trio.move_on_after(2) as cleanup:
                cleanup.shield = True
                await conn.aclose()
            nursery.cancel_scope.cancel()

    def _deliver(self, record: StreamConnection, message: str | bytes) -> None:
        value = json.loads(message)
        for event in value if isinstance(value, list) else [value]:
            record.events.append(event)
            self._apply(event)
            self.events += 1
        self.changes.notify()

    def _apply(self, event: Event) -> None:
        cursor = self.cursor
        match event.get("type"):
            case "message":
                self.held[event["seq"]] = event["id"]
                cursor.message_seq = max(cursor.message_seq, event["seq"])
            case "history_reset":
                after = event["after_seq"]
                for seq in [s for s in self.held if s > after]:
                    del self.held[seq]
                cursor.message_seq = min(cursor.message_seq, after)
            case "message_part":
                cursor.history_version = event["history_version"]
                cursor.generation_attempt = event["generation_attempt"]
                cursor.part_seq = event["seq"]
            case "preview_reset":
                cursor.history_version = event["history_version"]
                cursor.generation_attempt = event["generation_attempt"]
                cursor.part_seq = 0
            case "status":
                self.status = event["status"]
            case _:
                pass

    def all_events(self) -> list[Event]:
        return [e for c in self.connections for e in c.events]

    def parts_seen(self, history_version: int, generation_attempt: int) -> int:
        """The highest part seq of that episode delivered so far (0: none)."""
        return max(
            (
                e["seq"]
                for c in self.connections
                for e in c.events
                if e.get("type") == "message_part"
                and e["history_version"] == history_version
                and e["generation_attempt"] == generation_attempt
            ),
            default=0,
        )

    def latest_part_seq(self) -> int:
        """The seq of the last part delivered, in whatever episode (0: none)."""
        for connection in reversed(self.connections):
            for event in reversed(connection.events):
                if event.get("type") == "message_part":
                    seq: int = event["seq"]
                    return seq
        return 0


async def settle(api: ApiClient, stream: ChatStream, *, deadline_s: float) -> dict[str, Any]:
    """Until the chat waits on someone (``SETTLED``) and ``stream`` holds its whole history;
    returns the chat as read then. ``TooSlowError`` past the deadline: the chat is stranded
    (or its stream is stuck)."""
    with trio.fail_after(deadline_s):
        while True:
            await stream.changes.wait_until(lambda: stream.status in SETTLED and stream.connected)
            seen = stream.events
            chat = await api.chat(stream.chat_id)
            if (
                chat["status"] == stream.status
                and chat["status"] in SETTLED
                and chat["last_message_seq"] == stream.last_seq
            ):
                return chat
            await stream.changes.wait_until(partial(_moved_past, stream, seen))


def _moved_past(stream: ChatStream, seen: int) -> bool:
    return stream.events > seen


@contextlib.asynccontextmanager
async def streaming(stream: ChatStream) -> Any:
    """Run ``stream`` in a task of its own while the block runs."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.run)
        try:
            yield stream
        finally:
            stream.stop()


def text_of(content: list[dict[str, Any]]) -> str:
    return "".join(p["text"] for p in content if p.get("type") == "text")
