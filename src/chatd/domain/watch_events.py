"""Lifecycle events of a user's chats: what the ``GET /api/v1/chats/watch`` WebSocket sends.

A chat list stays current with these alone (no per-chat stream): one event per change that a
list shows. They are state events, at-least-once: the last one received for a chat is its state.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from chatd.domain.chat_status import ChatStatus
from chatd.domain.events import PendingToolCall


@dataclass(frozen=True, slots=True)
class ChatCreated:
    chat_id: UUID
    title: str
    status: ChatStatus
    archived: bool


@dataclass(frozen=True, slots=True)
class ChatStatusChanged:
    chat_id: UUID
    status: ChatStatus
    archived: bool


@dataclass(frozen=True, slots=True)
class ChatTitleChanged:
    chat_id: UUID
    title: str


@dataclass(frozen=True, slots=True)
class ChatActionRequired:
    chat_id: UUID
    calls: tuple[PendingToolCall, ...]
    deadline: float  # wall-clock epoch seconds


@dataclass(frozen=True, slots=True)
class ChatDiffStatusChanged:
    chat_id: UUID
    branch: str | None
    remote: str | None
    pull_request_url: str | None
    pull_request_state: str | None
    additions: int
    deletions: int
    changed_files: int


@dataclass(frozen=True, slots=True)
class ChatDeleted:
    chat_id: UUID


WatchEvent = (
    ChatCreated
    | ChatStatusChanged
    | ChatTitleChanged
    | ChatActionRequired
    | ChatDiffStatusChanged
    | ChatDeleted
)
