"""Immutable rows returned by the store, the functions that build them, and JSON in and out of SQL.

asyncpg hands jsonb over as text; ``encode_json`` and ``decode_json`` are the only place that
converts, so every query passes jsonb parameters as ``$n::jsonb`` text.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Literal, TypeVar, cast
from uuid import UUID

from chatd.domain.chat_status import ChatStatus
from chatd.store.database import Record

T = TypeVar("T")

JsonObject = dict[str, Any]
ProviderKind = Literal["openai", "anthropic", "openai-compatible"]
MessageRole = Literal["user", "assistant", "tool", "summary"]
NotificationKind = Literal["turn_finished", "failed", "action_required"]
PullRequestState = Literal["open", "draft", "closed", "merged"]


class Unset(Enum):
    """The type of ``UNSET``: "leave this column as it is" in partial updates (``None`` is NULL)."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET = Unset.UNSET


def change(value: T | Unset) -> tuple[bool, T | None]:
    """A partial-update column as the (changed, value) pair that the static UPDATEs take."""
    if value is UNSET:
        return False, None
    return True, value


# -- JSON ----------------------------------------------------------------------------------


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_json(value: object) -> str | None:
    """Text for a ``$n::jsonb`` parameter; ``None`` stays SQL NULL. NaN is refused, as by jsonb."""
    if value is None:
        return None
    return json.dumps(
        value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_plain
    )


def decode_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


# -- paging --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PageCursor:
    """Where a keyset page ended: the (timestamp, id) of its last row.

    ``encode`` gives the opaque string handed to clients; ``decode`` raises ``ValueError`` on
    anything it did not produce.
    """

    at: datetime
    id: UUID

    def encode(self) -> str:
        raw = f"{self.at.isoformat()}|{self.id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> PageCursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
            at_text, id_text = raw.split("|")
            at = datetime.fromisoformat(at_text)
            cursor_id = UUID(id_text)
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise ValueError("malformed page cursor") from exc
        if at.tzinfo is None:
            raise ValueError("malformed page cursor")
        return cls(at, cursor_id)


# -- rows ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class User:
    id: UUID
    name: str
    is_admin: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ApiToken:
    """A token's metadata; neither the secret nor its hash ever leaves the store."""

    id: UUID
    user_id: UUID
    label: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class Provider:
    id: UUID
    name: str
    kind: ProviderKind
    base_url: str | None
    api_key: str | None = field(repr=False)
    enabled: bool
    created_at: datetime
    updated_at: datetime

    @property
    def has_api_key(self) -> bool:
        return bool(self.api_key)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    id: UUID
    provider_id: UUID
    name: str
    model: str
    context_limit: int
    compression_threshold: float
    options: JsonObject
    is_default: bool
    created_at: datetime
    updated_at: datetime
    # The built-in tools its model may call (chatd.tools.registry names; migration 0005).
    tools: tuple[str, ...] = ("current_time", "calculate")


@dataclass(frozen=True, slots=True)
class UserPrompt:
    user_id: UUID
    prompt: str
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ShardLease:
    shard: int
    worker_id: str
    epoch: int
    expires_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Chat:
    id: UUID
    owner_id: UUID
    shard: int
    title: str
    status: ChatStatus
    archived: bool
    history_version: int
    generation_attempt: int
    retry_count: int
    retry_at: datetime | None
    last_error: JsonObject | None
    action_deadline: datetime | None
    dynamic_tools: list[JsonObject]
    model_config_id: UUID | None
    system_prompt: str
    last_message_seq: int
    created_at: datetime
    updated_at: datetime
    # The chat's own allow-list of built-in tools (None: its model config's); token totals of
    # every model call made for it; a summary asked for by hand is being made (migration 0005).
    tools: tuple[str, ...] | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    compacting: bool = False


@dataclass(frozen=True, slots=True)
class UserUsage:
    """A user's token totals over every chat it ever had (deleted ones included)."""

    user_id: UUID
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class ChatMessage:
    id: UUID
    chat_id: UUID
    seq: int
    role: MessageRole
    content: list[JsonObject]
    usage: JsonObject | None
    history_version: int
    created_at: datetime
    deleted_at: datetime | None


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    id: UUID
    chat_id: UUID
    position: int
    content: list[JsonObject]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class InboxNotification:
    id: UUID
    user_id: UUID
    chat_id: UUID | None
    kind: NotificationKind
    title: str
    body: str
    read_at: datetime | None
    created_at: datetime

    @property
    def read(self) -> bool:
        return self.read_at is not None


@dataclass(frozen=True, slots=True)
class DiffStatus:
    chat_id: UUID
    branch: str | None
    remote: str | None
    pull_request_url: str | None
    pull_request_state: PullRequestState | None
    additions: int
    deletions: int
    changed_files: int
    updated_at: datetime


def user_from_row(row: Record) -> User:
    return User(
        id=row["id"], name=row["name"], is_admin=row["is_admin"], created_at=row["created_at"]
    )


def api_token_from_row(row: Record) -> ApiToken:
    return ApiToken(
        id=row["id"],
        user_id=row["user_id"],
        label=row["label"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


def provider_from_row(row: Record) -> Provider:
    return Provider(
        id=row["id"],
        name=row["name"],
        kind=cast(ProviderKind, row["kind"]),
        base_url=row["base_url"],
        api_key=row["api_key"],
        enabled=row["enabled"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def model_config_from_row(row: Record) -> ModelConfig:
    return ModelConfig(
        id=row["id"],
        provider_id=row["provider_id"],
        name=row["name"],
        model=row["model"],
        context_limit=row["context_limit"],
        compression_threshold=row["compression_threshold"],
        options=decode_json(row["options"]),
        is_default=row["is_default"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        tools=tuple(row["tools"]),
    )


def user_prompt_from_row(row: Record) -> UserPrompt:
    return UserPrompt(user_id=row["user_id"], prompt=row["prompt"], updated_at=row["updated_at"])


def shard_lease_from_row(row: Record) -> ShardLease:
    return ShardLease(
        shard=row["shard"],
        worker_id=row["worker_id"],
        epoch=row["epoch"],
        expires_at=row["expires_at"],
        updated_at=row["updated_at"],
    )


def chat_from_row(row: Record) -> Chat:
    return Chat(
        id=row["id"],
        owner_id=row["owner_id"],
        shard=row["shard"],
        title=row["title"],
        status=ChatStatus(row["status"]),
        archived=row["archived"],
        history_version=row["history_version"],
        generation_attempt=row["generation_attempt"],
        retry_count=row["retry_count"],
        retry_at=row["retry_at"],
        last_error=decode_json(row["last_error"]),
        action_deadline=row["action_deadline"],
        dynamic_tools=decode_json(row["dynamic_tools"]),
        model_config_id=row["model_config_id"],
        system_prompt=row["system_prompt"],
        last_message_seq=row["last_message_seq"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        tools=None if row["tools"] is None else tuple(row["tools"]),
        input_tokens=row["input_tokens"],
        output_tokens=row["output_tokens"],
        compacting=row["compacting"],
    )


def chat_message_from_row(row: Record) -> ChatMessage:
    return ChatMessage(
        id=row["id"],
        chat_id=row["chat_id"],
        seq=row["seq"],
        role=cast(MessageRole, row["role"]),
        content=decode_json(row["content"]),
        usage=decode_json(row["usage"]),
        history_version=row["history_version"],
        created_at=row["created_at"],
        deleted_at=row["deleted_at"],
    )


def queued_message_from_row(row: Record) -> QueuedMessage:
    return QueuedMessage(
        id=row["id"],
        chat_id=row["chat_id"],
        position=row["position"],
        content=decode_json(row["content"]),
        created_at=row["created_at"],
    )


def inbox_notification_from_row(row: Record) -> InboxNotification:
    return InboxNotification(
        id=row["id"],
        user_id=row["user_id"],
        chat_id=row["chat_id"],
        kind=cast(NotificationKind, row["kind"]),
        title=row["title"],
        body=row["body"],
        read_at=row["read_at"],
        created_at=row["created_at"],
    )


def diff_status_from_row(row: Record) -> DiffStatus:
    return DiffStatus(
        chat_id=row["chat_id"],
        branch=row["branch"],
        remote=row["remote"],
        pull_request_url=row["pull_request_url"],
        pull_request_state=cast(PullRequestState | None, row["pull_request_state"]),
        additions=row["additions"],
        deletions=row["deletions"],
        changed_files=row["changed_files"],
        updated_at=row["updated_at"],
    )
