"""Events a chat publishes to its stream subscribers, and lifecycle events of a user's chats.

Streamed parts carry ``(history_version, generation_attempt, seq)``: a new history version or
attempt starts a new *episode* (announced by ``PreviewReset``), and ``seq`` orders the parts of
one episode, so clients and relays drop what is stale and resume without gaps or repeats.
Committed messages carry their durable ``seq`` in the chat (the resume cursor).
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from chatd.domain.chat_status import ChatStatus
from chatd.domain.conversation import ContentPart
from chatd.domain.provider_failure import ProviderFailure
from chatd.domain.stream_parts import StreamPart


@dataclass(frozen=True, slots=True)
class Episode:
    """One provider attempt at one history version."""

    history_version: int
    generation_attempt: int


@dataclass(frozen=True, slots=True)
class MessagePart:
    episode: Episode
    seq: int  # 1, 2, ... within the episode
    part: StreamPart


@dataclass(frozen=True, slots=True)
class CommittedMessage:
    id: UUID
    seq: int  # durable position in the chat: the resume cursor
    role: str
    content: tuple[ContentPart, ...]
    history_version: int


@dataclass(frozen=True, slots=True)
class StatusChanged:
    status: ChatStatus
    archived: bool
    history_version: int
    generation_attempt: int


@dataclass(frozen=True, slots=True)
class ErrorRaised:
    failure: ProviderFailure


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    attempt: int  # the attempt that will run next (the first try is 1)
    delay_s: float
    failure: ProviderFailure
    retrying_at: float  # wall-clock epoch seconds


@dataclass(frozen=True, slots=True)
class QueuedEntry:
    id: UUID
    text: str


@dataclass(frozen=True, slots=True)
class QueueUpdated:
    queue: tuple[QueuedEntry, ...]


@dataclass(frozen=True, slots=True)
class PendingToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ActionRequired:
    calls: tuple[PendingToolCall, ...]
    deadline: float  # wall-clock epoch seconds


@dataclass(frozen=True, slots=True)
class PreviewReset:
    """Parts streamed so far belong to an abandoned episode; a new one starts."""

    episode: Episode


@dataclass(frozen=True, slots=True)
class HistoryReset:
    """Messages after ``after_seq`` are gone (an edit truncated the history)."""

    history_version: int
    after_seq: int


ChatEvent = (
    MessagePart
    | CommittedMessage
    | StatusChanged
    | ErrorRaised
    | RetryScheduled
    | QueueUpdated
    | ActionRequired
    | PreviewReset
    | HistoryReset
)
