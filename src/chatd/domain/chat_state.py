"""A chat's execution state, as the state machine sees it, and the limits it enforces."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from uuid import UUID

from chatd.domain.chat_status import ChatStatus
from chatd.domain.events import Episode, PendingToolCall, QueuedEntry
from chatd.domain.provider_failure import ProviderFailure
from chatd.domain.retry_policy import RetryPolicy


@dataclass(frozen=True, slots=True)
class UserMessageRef:
    """A live user message: edits address it by id and truncate history after its seq."""

    id: UUID
    seq: int


@dataclass(frozen=True, slots=True)
class ChatState:
    chat_id: UUID
    status: ChatStatus = ChatStatus.WAITING
    archived: bool = False
    history_version: int = 0
    generation_attempt: int = 0
    # Failed attempts of the current step (durable: a retry countdown survives restarts).
    retry_count: int = 0
    # Wall-clock epoch seconds of the armed retry; None while a generation runs.
    retry_at: float | None = None
    last_error: ProviderFailure | None = None
    action_deadline: float | None = None
    pending_calls: tuple[PendingToolCall, ...] = ()
    queue: tuple[QueuedEntry, ...] = ()
    last_message_seq: int = 0
    # Live user messages after the newest summary boundary (the ones an edit may address).
    user_messages: tuple[UserMessageRef, ...] = ()
    # Built-in calls chatd is running (status running, between two model steps): the calls of
    # the assistant message at ``tools_message_seq`` not answered yet. The dynamic calls of the
    # same message wait in ``pending_calls`` until they are done.
    running_tools: tuple[PendingToolCall, ...] = ()
    tools_message_seq: int = 0
    # The seq of the newest summary message (0: none); messages up to it cannot be edited.
    summary_seq: int = 0
    # A summary asked for by hand is being made (status running, nothing to answer).
    compacting: bool = False

    @property
    def episode(self) -> Episode:
        return Episode(self.history_version, self.generation_attempt)

    @property
    def generating(self) -> bool:
        """A provider stream is (or should be) running right now."""
        return self.status is ChatStatus.RUNNING and self.retry_at is None


@dataclass(frozen=True, slots=True)
class ChatPolicy:
    """The limits the state machine applies; built from Settings."""

    max_queue_length: int = 16
    action_timeout_s: float = 300.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)


def derived_message_id(chat_id: UUID, seq: int) -> UUID:
    """Ids of messages chatd writes itself (assistant, tool results): stable, no randomness,
    so the state machine stays a pure function."""
    return uuid.uuid5(chat_id, f"message:{seq}")
