"""The async client: one ``httpx2.AsyncClient`` and anyio WebSockets, under trio or asyncio."""

from __future__ import annotations

import inspect
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar
from urllib.parse import urlencode
from uuid import uuid4

import anyio
import httpx2
import msgspec

from chatd.client import _websocket
from chatd.client.errors import ApiError, ConnectionFailed, api_error
from chatd.client.events import (
    STATE_EVENTS,
    ActionRequiredEvent,
    Cursor,
    Notification,
    Reconnected,
    StatusEvent,
    StreamEvent,
    ToolCall,
    WatchEvent,
    decode_notification_frame,
    decode_stream_frame,
    decode_watch_frame,
)
from chatd.client.models import (
    Accepted,
    Chat,
    ChatPage,
    Message,
    MessagePage,
    ModelConfig,
    NewToken,
    Prompt,
    Provider,
    Token,
    Usage,
    User,
)

log = logging.getLogger(__name__)

API = "/api/v1"
T = TypeVar("T")
E = TypeVar("E")

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_RETRIES = 5
DEFAULT_MAX_CONNECTIONS = 100  # HTTP connections kept to the server (WebSockets apart)
RETRY_BASE_DELAY_S = 0.2
RETRY_MAX_DELAY_S = 10.0
RECONNECT_MAX_DELAY_S = 5.0
RECONNECT_GIVE_UP_S = 120.0
# Statuses a turn ends in (``answer_tools`` returns on them).
IDLE_STATUSES = frozenset({"waiting", "error"})
# Answers worth the same request again: a busy chat, a key still in progress, an outage.
_RETRY_STATUSES = frozenset({409, 429, 503, 504})

ToolHandler = Callable[[ToolCall], Any | Awaitable[Any]]


class AsyncClient:
    """``async with AsyncClient(url, token) as chatd: ...``

    Every mutating request carries an ``Idempotency-Key``, so it is retried safely (after a
    503, a 504, a busy 429 or a lost connection) at most ``max_retries`` times with bounded
    backoff; reads are retried the same way.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        pool_timeout_s: float | None = DEFAULT_TIMEOUT_S,
        retry_max_delay_s: float = RETRY_MAX_DELAY_S,
        reconnect_max_delay_s: float = RECONNECT_MAX_DELAY_S,
        reconnect_give_up_s: float = RECONNECT_GIVE_UP_S,
    ) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._http = httpx2.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            # Connecting, sending and reading each get timeout_s; waiting for a free pooled
            # connection gets pool_timeout_s (None: unbounded, for a load driver that shares a
            # few connections among thousands of chats and bounds its run itself).
            timeout=httpx2.Timeout(timeout_s, pool=pool_timeout_s),
            limits=httpx2.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.retry_max_delay_s = retry_max_delay_s
        self.reconnect_max_delay_s = reconnect_max_delay_s
        self.reconnect_give_up_s = reconnect_give_up_s
        # Requests sent again (after a 503, a 504, a busy 409/429, a lost connection).
        self.retries = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- requests ---------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
    ) -> Any:
        """``method`` ``/api/v1{path}``: the decoded JSON answer (None for a 204), or the
        typed ``ApiError``."""
        query = {k: _param(v) for k, v in (params or {}).items() if v is not None}
        headers = {} if method == "GET" else {"Idempotency-Key": uuid4().hex}
        content = None if json is None else msgspec.json.encode(json)
        if content is not None:
            headers["Content-Type"] = "application/json"
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.request(
                    method, API + path, content=content, params=query, headers=headers
                )
            except httpx2.TransportError as exc:
                if attempt > self.max_retries:
                    raise ConnectionFailed(f"{method} {path}: {exc!r}") from exc
                await anyio.sleep(self._delay(attempt, None))
                continue
            if response.is_success:
                if response.status_code == 204:
                    return None
                return msgspec.json.decode(response.content)
            body = _json_or_none(response.content)
            error = api_error(response.status_code, body, response.headers.get("retry-after"))
            retryable = response.status_code in (503, 504) or (
                response.status_code in _RETRY_STATUSES and error.retry_after is not None
            )
            if not retryable or attempt > self.max_retries:
                raise error
            await anyio.sleep(self._delay(attempt, error.retry_after))

    def _delay(self, attempt: int, asked: float | None) -> float:
        self.retries += 1
        backoff = min(RETRY_BASE_DELAY_S * 2 ** (attempt - 1), self.retry_max_delay_s)
        backoff *= 0.5 + random.random() / 2  # noqa: S311 - jitter, not a secret
        delay: float = min(max(backoff, asked or 0.0), self.retry_max_delay_s)
        return delay

    async def _typed(self, cls: type[T], method: str, path: str, **kw: Any) -> T:
        return msgspec.convert(await self.request(method, path, **kw), cls)

    # -- chats ------------------------------------------------------------------------------

    async def create_chat(
        self,
        text: str,
        *,
        title: str | None = None,
        system_prompt: str | None = None,
        model_config_id: str | None = None,
        dynamic_tools: list[dict[str, Any]] | None = None,
        tools: list[str] | None = None,
    ) -> Chat:
        """A chat with its first message; its answer starts at once. A dynamic tool is
        ``{"name", "description", "input_schema"}``."""
        body = _given(
            text=text,
            title=title,
            system_prompt=system_prompt,
            model_config_id=model_config_id,
            dynamic_tools=dynamic_tools,
            tools=tools,
        )
        return await self._typed(Chat, "POST", "/chats", json=body)

    async def list_chats(
        self, *, limit: int | None = None, cursor: str | None = None, archived: bool | None = None
    ) -> ChatPage:
        params = {"limit": limit, "cursor": cursor, "archived": archived}
        return await self._typed(ChatPage, "GET", "/chats", params=params)

    async def get_chat(self, chat_id: str) -> Chat:
        return await self._typed(Chat, "GET", f"/chats/{chat_id}")

    async def update_chat(
        self, chat_id: str, *, title: str | None = None, archived: bool | None = None
    ) -> Chat:
        body = _given(title=title, archived=archived)
        return await self._typed(Chat, "PATCH", f"/chats/{chat_id}", json=body)

    async def delete_chat(self, chat_id: str) -> None:
        await self.request("DELETE", f"/chats/{chat_id}")

    async def compact(self, chat_id: str) -> None:
        await self.request("POST", f"/chats/{chat_id}/compact")

    async def list_messages(
        self, chat_id: str, *, after_seq: int | None = None, limit: int | None = None
    ) -> MessagePage:
        params = {"after_seq": after_seq, "limit": limit}
        return await self._typed(MessagePage, "GET", f"/chats/{chat_id}/messages", params=params)

    async def history(self, chat_id: str) -> list[Message]:
        """Every message of the chat, in order (all pages)."""
        messages: list[Message] = []
        after: int | None = 0
        while after is not None:
            page = await self.list_messages(chat_id, after_seq=after)
            messages.extend(page.messages)
            after = page.next_after_seq
        return messages

    async def send_message(
        self, chat_id: str, text: str, *, busy_behavior: Literal["queue", "interrupt"] = "queue"
    ) -> Accepted:
        body = {"text": text, "busy_behavior": busy_behavior}
        return await self._typed(Accepted, "POST", f"/chats/{chat_id}/messages", json=body)

    async def edit_message(self, chat_id: str, message_id: str, text: str) -> Accepted:
        path = f"/chats/{chat_id}/messages/{message_id}"
        return await self._typed(Accepted, "PATCH", path, json={"text": text})

    async def interrupt(self, chat_id: str) -> None:
        await self.request("POST", f"/chats/{chat_id}/interrupt")

    async def submit_tool_results(self, chat_id: str, outputs: Mapping[str, str]) -> None:
        """Answer every pending call at once: ``{call_id: output JSON text}``."""
        results = [{"call_id": k, "output": v} for k, v in outputs.items()]
        await self.request("POST", f"/chats/{chat_id}/tool-results", json={"results": results})

    async def delete_queued(self, chat_id: str, queued_id: str) -> None:
        await self.request("DELETE", f"/chats/{chat_id}/queue/{queued_id}")

    async def promote_queued(self, chat_id: str, queued_id: str) -> None:
        await self.request("POST", f"/chats/{chat_id}/queue/{queued_id}/promote")

    # -- streams ----------------------------------------------------------------------------

    def stream(self, chat_id: str, *, cursor: Cursor | None = None) -> ChatStream:
        """The chat's events from ``cursor`` (from the start by default), reconnecting and
        resuming by itself: ``async with chatd.stream(id) as events: async for e in events``."""
        return ChatStream(self, chat_id, cursor or Cursor())

    def watch(self) -> Feed[WatchEvent]:
        """Lifecycle events of all the caller's chats; ``Reconnected`` after a reconnection
        (events of the gap may be missed: list the chats again)."""
        return Feed(self, "/chats/watch", decode_watch_frame, Reconnected())

    def watch_inbox(self) -> Feed[Notification | Reconnected]:
        """New inbox notifications; ``Reconnected`` after a reconnection."""
        return Feed(self, "/notifications/inbox/watch", decode_notification_frame, Reconnected())

    async def answer_tools(self, chat_id: str, handler: ToolHandler) -> str:
        """Run the chat's dynamic tool calls with ``handler`` until the turn ends; the status
        it ended in (``waiting`` or ``error``).

        ``handler(call)`` (sync or async) returns the call's result, any JSON value; an
        exception is reported to the model as ``{"error": "..."}``.
        """
        answered: set[str] = set()
        async with self.stream(chat_id) as events:
            async for event in events:
                if isinstance(event, StatusEvent) and event.status in IDLE_STATUSES:
                    return event.status
                if isinstance(event, ActionRequiredEvent):
                    calls = [c for c in event.calls if c.id not in answered]
                    if not calls:
                        continue
                    outputs = {c.id: await _run(handler, c) for c in calls}
                    try:
                        await self.submit_tool_results(chat_id, outputs)
                    except ApiError as exc:
                        if exc.status != 409:  # 409: the chat moved on (an interrupt)
                            raise
                    answered.update(outputs)
        raise ConnectionFailed("the stream ended")  # pragma: no cover - streams do not end

    # -- admin ------------------------------------------------------------------------------

    async def create_provider(
        self,
        name: str,
        kind: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        enabled: bool = True,
    ) -> Provider:
        body = _given(name=name, kind=kind, base_url=base_url, api_key=api_key)
        return await self._typed(Provider, "POST", "/providers", json={**body, "enabled": enabled})

    async def list_providers(self) -> list[Provider]:
        answer = await self.request("GET", "/providers")
        return msgspec.convert(answer["providers"], list[Provider])

    async def get_provider(self, provider_id: str) -> Provider:
        return await self._typed(Provider, "GET", f"/providers/{provider_id}")

    async def update_provider(self, provider_id: str, **changes: Any) -> Provider:
        """Change the given fields; ``api_key=None`` removes the key."""
        return await self._typed(Provider, "PATCH", f"/providers/{provider_id}", json=changes)

    async def delete_provider(self, provider_id: str) -> None:
        await self.request("DELETE", f"/providers/{provider_id}")

    async def create_model_config(
        self,
        provider_id: str,
        name: str,
        model: str,
        *,
        context_limit: int,
        compression_threshold: float | None = None,
        options: dict[str, Any] | None = None,
        is_default: bool = False,
        tools: list[str] | None = None,
    ) -> ModelConfig:
        body = _given(
            provider_id=provider_id,
            name=name,
            model=model,
            context_limit=context_limit,
            compression_threshold=compression_threshold,
            options=options,
            tools=tools,
        )
        body["is_default"] = is_default
        return await self._typed(ModelConfig, "POST", "/model-configs", json=body)

    async def list_model_configs(self) -> list[ModelConfig]:
        answer = await self.request("GET", "/model-configs")
        return msgspec.convert(answer["model_configs"], list[ModelConfig])

    async def get_model_config(self, config_id: str) -> ModelConfig:
        return await self._typed(ModelConfig, "GET", f"/model-configs/{config_id}")

    async def update_model_config(self, config_id: str, **changes: Any) -> ModelConfig:
        path = f"/model-configs/{config_id}"
        return await self._typed(ModelConfig, "PATCH", path, json=changes)

    async def delete_model_config(self, config_id: str) -> None:
        await self.request("DELETE", f"/model-configs/{config_id}")

    # -- users and their tokens (admin) ------------------------------------------------------

    async def create_user(self, name: str, *, is_admin: bool = False) -> User:
        """A new user (``name``: 1 to 128 of ``A-Z a-z 0-9 . _ @ -``, the first a letter or
        digit); ``Conflict`` when the name is taken. Give it a token with ``create_token``."""
        body = {"name": name, "is_admin": is_admin}
        return await self._typed(User, "POST", "/users", json=body)

    async def list_users(self) -> list[User]:
        """Every user, in the order they were created."""
        answer = await self.request("GET", "/users")
        return msgspec.convert(answer["users"], list[User])

    async def create_token(self, user_id: str, *, label: str = "") -> NewToken:
        """A new API token of the user: ``.token`` is its secret, shown this once. Its owner
        lists and revokes it with ``list_tokens`` and ``revoke_token``."""
        path = f"/users/{user_id}/tokens"
        return await self._typed(NewToken, "POST", path, json={"label": label})

    # -- the caller -------------------------------------------------------------------------

    async def me(self) -> User:
        return await self._typed(User, "GET", "/users/me")

    async def usage(self) -> Usage:
        return await self._typed(Usage, "GET", "/users/me/usage")

    async def get_prompt(self) -> Prompt:
        return await self._typed(Prompt, "GET", "/users/me/prompt")

    async def set_prompt(self, prompt: str) -> Prompt:
        return await self._typed(Prompt, "PUT", "/users/me/prompt", json={"prompt": prompt})

    async def list_tokens(self) -> list[Token]:
        answer = await self.request("GET", "/users/me/tokens")
        return msgspec.convert(answer["tokens"], list[Token])

    async def revoke_token(self, token_id: str) -> None:
        await self.request("DELETE", f"/users/me/tokens/{token_id}")

    # -- inbox ------------------------------------------------------------------------------

    async def inbox(
        self, *, read: bool | None = None, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        """``{"notifications", "next_cursor", "unread_count"}``."""
        params = {"read": read, "limit": limit, "cursor": cursor}
        answer: dict[str, Any] = await self.request("GET", "/notifications/inbox", params=params)
        answer["notifications"] = msgspec.convert(answer["notifications"], list[Notification])
        return answer

    async def mark_read(self, notification_id: str, *, read: bool = True) -> None:
        path = f"/notifications/inbox/{notification_id}/read-status"
        await self.request("PUT", path, json={"read": read})

    async def mark_all_read(self) -> int:
        answer = await self.request("PUT", "/notifications/inbox/mark-all-as-read")
        return int(answer["changed"])

    # -- WebSockets -------------------------------------------------------------------------

    async def _open_socket(self, path: str, query: Mapping[str, int]) -> _websocket.WebSocket:
        url = "ws" + self.url.removeprefix("http") + API + path
        if query:
            url += "?" + urlencode(query)
        auth = [(b"authorization", f"Bearer {self._token}".encode())]
        return await _websocket.connect(url, auth, self.timeout_s)


class Feed(Generic[E]):
    """A WebSocket feed that reconnects by itself with bounded backoff. Use it as an async
    context manager: entering connects (a refusal raises its typed error there), leaving
    closes the socket; iterating connects too if it was not."""

    def __init__(
        self,
        client: AsyncClient,
        path: str,
        decode: Callable[[str], list[Any]],
        on_reconnect: Any = None,
    ) -> None:
        self._client = client
        self._path = path
        self._decode = decode
        self._on_reconnect = on_reconnect
        self._socket: _websocket.WebSocket | None = None
        self._pending: deque[Any] = deque()
        self._connected_once = False
        self._frames = 0  # received since the last connection
        self._empty_closes = 0  # connections in a row closed before their first frame
        self.reconnects = 0

    async def __aenter__(self) -> Self:
        if self._socket is None and not self._connected_once:
            await self._connect()
            self._connected_once = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._socket is not None:
            socket, self._socket = self._socket, None
            await socket.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> E:
        while True:
            while self._pending:
                event = self._accept(self._pending.popleft())
                if event is not None:
                    return event  # type: ignore[no-any-return]
            if self._socket is None:
                await self._connect()
                if self._connected_once and self._on_reconnect is not None:
                    self._pending.append(self._on_reconnect)
                self._connected_once = True
                continue
            try:
                text = await self._socket.receive()
            except _websocket.Closed:
                await self.aclose()
                self.reconnects += 1
                self._on_drop()
                # A server that accepts and closes at once is not hammered: back off.
                self._empty_closes = 0 if self._frames else self._empty_closes + 1
                self._frames = 0
                if self._empty_closes:
                    delay = RETRY_BASE_DELAY_S * 2 ** (self._empty_closes - 1)
                    await anyio.sleep(min(delay, self._client.reconnect_max_delay_s))
                continue
            self._frames += 1
            self._pending.extend(self._decode(text))
            self._on_frame()

    def _query(self) -> dict[str, int]:
        return {}

    def _accept(self, event: Any) -> Any:
        """The event to hand over (None to skip it)."""
        return event

    def _on_drop(self) -> None:
        pass

    def _on_frame(self) -> None:
        pass

    async def _connect(self) -> None:
        client = self._client
        give_up = anyio.current_time() + client.reconnect_give_up_s
        attempt = 0
        while True:
            attempt += 1
            try:
                socket = await client._open_socket(self._path, self._query())
            except ApiError as exc:
                if exc.status not in (429, 503, 504) and exc.status < 500:
                    raise
                asked: float | None = exc.retry_after
                failure: Exception = exc
            except (OSError, TimeoutError, ConnectionError) as exc:
                asked, failure = None, exc
            else:
                self._socket = socket
                return
            if anyio.current_time() >= give_up:
                raise ConnectionFailed(f"{self._path}: {failure!r}") from failure
            delay = min(RETRY_BASE_DELAY_S * 2 ** (attempt - 1), client.reconnect_max_delay_s)
            await anyio.sleep(max(delay, min(asked or 0.0, client.reconnect_max_delay_s)))


class ChatStream(Feed[StreamEvent]):
    """A chat's events, each once across reconnections: it reconnects with ``cursor`` (what
    was handed over so far), and drops the state events of a reconnection's snapshot that
    repeat the last ones handed over."""

    def __init__(self, client: AsyncClient, chat_id: str, cursor: Cursor) -> None:
        super().__init__(client, f"/chats/{chat_id}/stream", decode_stream_frame)
        self.cursor = cursor
        self._last_state: dict[type, Any] = {}
        self._snapshot = False  # the next frame is a reconnection's snapshot
        self._dedupe = False  # the events being handed over are from that snapshot

    def _query(self) -> dict[str, int]:
        return self.cursor.query()

    def _on_drop(self) -> None:
        self._snapshot = True

    def _on_frame(self) -> None:
        self._dedupe, self._snapshot = self._snapshot, False

    def _accept(self, event: Any) -> Any:
        if isinstance(event, STATE_EVENTS):
            if self._dedupe and self._last_state.get(type(event)) == event:
                return None
            self._last_state[type(event)] = event
        self.cursor = self.cursor.after(event)
        return event


async def _run(handler: ToolHandler, call: ToolCall) -> str:
    try:
        result = handler(call)
        if inspect.isawaitable(result):
            result = await result
    except Exception as exc:
        log.warning("tool %s (call %s) failed", call.name, call.id, exc_info=True)
        result = {"error": f"{type(exc).__name__}: {exc}"}
    return msgspec.json.encode(result).decode()


def _given(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _json_or_none(content: bytes) -> Any:
    try:
        return msgspec.json.decode(content)
    except msgspec.DecodeError:
        return None
