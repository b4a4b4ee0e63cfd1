"""The sync client: the async one run in an event loop of its own thread (an anyio portal)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Generic, Literal, ParamSpec, Self, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from chatd.client._async import AsyncClient, Feed, ToolHandler
from chatd.client.events import Cursor, Notification, Reconnected, StreamEvent, WatchEvent
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

P = ParamSpec("P")
T = TypeVar("T")
E = TypeVar("E")


class Client:
    """``with Client(url, token) as chatd: ...``: the methods of ``AsyncClient``, blocking."""

    def __init__(self, url: str, token: str, **options: Any) -> None:
        self._stack = contextlib.ExitStack()
        self._portal: BlockingPortal = self._stack.enter_context(start_blocking_portal())
        self._async: AsyncClient = self._portal.call(lambda: AsyncClient(url, token, **options))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._stack:
            self._portal.call(self._async.aclose)

    def _run(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        return self._portal.call(lambda: fn(*args, **kwargs))

    def request(self, method: str, path: str, **kw: Any) -> Any:
        return self._run(self._async.request, method, path, **kw)

    def create_chat(self, text: str, **fields: Any) -> Chat:
        return self._run(self._async.create_chat, text, **fields)

    def list_chats(self, **params: Any) -> ChatPage:
        return self._run(self._async.list_chats, **params)

    def get_chat(self, chat_id: str) -> Chat:
        return self._run(self._async.get_chat, chat_id)

    def update_chat(self, chat_id: str, **changes: Any) -> Chat:
        return self._run(self._async.update_chat, chat_id, **changes)

    def delete_chat(self, chat_id: str) -> None:
        self._run(self._async.delete_chat, chat_id)

    def compact(self, chat_id: str) -> None:
        self._run(self._async.compact, chat_id)

    def list_messages(self, chat_id: str, **params: Any) -> MessagePage:
        return self._run(self._async.list_messages, chat_id, **params)

    def history(self, chat_id: str) -> list[Message]:
        return self._run(self._async.history, chat_id)

    def send_message(
        self, chat_id: str, text: str, *, busy_behavior: Literal["queue", "interrupt"] = "queue"
    ) -> Accepted:
        return self._run(self._async.send_message, chat_id, text, busy_behavior=busy_behavior)

    def edit_message(self, chat_id: str, message_id: str, text: str) -> Accepted:
        return self._run(self._async.edit_message, chat_id, message_id, text)

    def interrupt(self, chat_id: str) -> None:
        self._run(self._async.interrupt, chat_id)

    def submit_tool_results(self, chat_id: str, outputs: Mapping[str, str]) -> None:
        self._run(self._async.submit_tool_results, chat_id, outputs)

    def delete_queued(self, chat_id: str, queued_id: str) -> None:
        self._run(self._async.delete_queued, chat_id, queued_id)

    def promote_queued(self, chat_id: str, queued_id: str) -> None:
        self._run(self._async.promote_queued, chat_id, queued_id)

    def stream(self, chat_id: str, *, cursor: Cursor | None = None) -> SyncFeed[StreamEvent]:
        """``with chatd.stream(id) as events: for event in events: ...``"""
        return SyncFeed(self._portal, self._async.stream(chat_id, cursor=cursor))

    def watch(self) -> SyncFeed[WatchEvent]:
        return SyncFeed(self._portal, self._async.watch())

    def watch_inbox(self) -> SyncFeed[Notification | Reconnected]:
        return SyncFeed(self._portal, self._async.watch_inbox())

    def answer_tools(self, chat_id: str, handler: ToolHandler) -> str:
        return self._run(self._async.answer_tools, chat_id, handler)

    def create_provider(self, name: str, kind: str, **fields: Any) -> Provider:
        return self._run(self._async.create_provider, name, kind, **fields)

    def list_providers(self) -> list[Provider]:
        return self._run(self._async.list_providers)

    def update_provider(self, provider_id: str, **changes: Any) -> Provider:
        return self._run(self._async.update_provider, provider_id, **changes)

    def delete_provider(self, provider_id: str) -> None:
        self._run(self._async.delete_provider, provider_id)

    def create_model_config(
        self, provider_id: str, name: str, model: str, **fields: Any
    ) -> ModelConfig:
        return self._run(self._async.create_model_config, provider_id, name, model, **fields)

    def list_model_configs(self) -> list[ModelConfig]:
        return self._run(self._async.list_model_configs)

    def update_model_config(self, config_id: str, **changes: Any) -> ModelConfig:
        return self._run(self._async.update_model_config, config_id, **changes)

    def delete_model_config(self, config_id: str) -> None:
        self._run(self._async.delete_model_config, config_id)

    def create_user(self, name: str, *, is_admin: bool = False) -> User:
        return self._run(self._async.create_user, name, is_admin=is_admin)

    def list_users(self) -> list[User]:
        return self._run(self._async.list_users)

    def create_token(self, user_id: str, *, label: str = "") -> NewToken:
        return self._run(self._async.create_token, user_id, label=label)

    def me(self) -> User:
        return self._run(self._async.me)

    def usage(self) -> Usage:
        return self._run(self._async.usage)

    def get_prompt(self) -> Prompt:
        return self._run(self._async.get_prompt)

    def set_prompt(self, prompt: str) -> Prompt:
        return self._run(self._async.set_prompt, prompt)

    def list_tokens(self) -> list[Token]:
        return self._run(self._async.list_tokens)

    def revoke_token(self, token_id: str) -> None:
        self._run(self._async.revoke_token, token_id)

    def inbox(self, **params: Any) -> dict[str, Any]:
        return self._run(self._async.inbox, **params)

    def mark_read(self, notification_id: str, *, read: bool = True) -> None:
        self._run(self._async.mark_read, notification_id, read=read)

    def mark_all_read(self) -> int:
        return self._run(self._async.mark_all_read)


class SyncFeed(Generic[E]):
    """A feed as a blocking iterator; a context manager closing its socket on exit."""

    def __init__(self, portal: BlockingPortal, feed: Feed[E]) -> None:
        self._portal = portal
        self.feed = feed

    def __enter__(self) -> Self:
        self._portal.call(self.feed.__aenter__)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._portal.call(self.feed.aclose)

    def __iter__(self) -> Iterator[E]:
        return self

    def __next__(self) -> E:
        event: E = self._portal.call(self.feed.__anext__)
        return event
