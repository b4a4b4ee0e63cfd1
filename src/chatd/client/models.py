"""Typed views of the API's answers (unknown fields are ignored, so a newer server works)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from chatd.client.events import QueuedMessage, ToolCall


class Chat(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    title: str
    status: str
    archived: bool
    history_version: int = 0
    generation_attempt: int = 0
    last_message_seq: int = 0
    last_error: dict[str, Any] | None = None
    model_config_id: str | None = None  # the chat's own choice; None: it follows the default
    effective_model_config_id: str | None = None  # the one that answers it now
    system_prompt: str = ""
    dynamic_tools: list[dict[str, Any]] = []
    tools: list[str] | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    queue: list[QueuedMessage] = []
    pending_tool_calls: list[ToolCall] = []


class ChatPage(msgspec.Struct, frozen=True):
    chats: list[Chat]
    next_cursor: str | None


class Message(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    seq: int
    role: str
    content: list[dict[str, Any]]
    usage: dict[str, Any] | None = None
    history_version: int = 0
    created_at: datetime | None = None

    @property
    def text(self) -> str:
        """Its text parts, joined."""
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")


class MessagePage(msgspec.Struct, frozen=True):
    messages: list[Message]
    next_after_seq: int | None


class Accepted(msgspec.Struct, frozen=True):
    """``queued``: the chat was busy and the message waits in its queue."""

    message_id: str
    queued: bool


class Provider(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    kind: str
    base_url: str | None = None
    has_api_key: bool = False
    enabled: bool = True


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    provider_id: str
    name: str
    model: str
    context_limit: int
    compression_threshold: float = 0.7
    options: dict[str, Any] = {}
    is_default: bool = False
    tools: list[str] = []


class User(msgspec.Struct, frozen=True):
    id: str
    name: str
    is_admin: bool
    created_at: datetime | None = None  # in the admin's answers (create_user, list_users)


class Token(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    label: str
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class NewToken(msgspec.Struct, frozen=True, kw_only=True):
    """A token just made (``create_token``): ``token`` is its secret, which the server shows
    this once (it keeps only a hash). Kept out of ``repr`` so that a log line does not leak it."""

    id: str
    label: str
    created_at: datetime
    token: str

    def __repr__(self) -> str:
        return (
            f"NewToken(id={self.id!r}, label={self.label!r},"
            f" created_at={self.created_at!r}, token='...')"
        )


class Usage(msgspec.Struct, frozen=True):
    input_tokens: int
    output_tokens: int


class Prompt(msgspec.Struct, frozen=True):
    prompt: str
    updated_at: datetime | None
