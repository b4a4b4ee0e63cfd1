"""Typed events of a chat's stream (tagged by ``type``) and of the watch feeds (by ``kind``),
and the resume cursor a client keeps (README, "The API": stream events)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

# -- parts of an answer in progress ---------------------------------------------------------


class _Part(msgspec.Struct, tag_field="type"):
    pass


class TextPart(_Part, tag="text"):
    text: str


class ReasoningPart(_Part, tag="reasoning"):
    text: str
    signature: str | None = None


class ToolCallStartPart(_Part, tag="tool_call_start"):
    index: int
    id: str
    name: str


class ToolCallDeltaPart(_Part, tag="tool_call_delta"):
    index: int
    arguments: str


class ToolCallEndPart(_Part, tag="tool_call_end"):
    index: int


class UsagePart(_Part, tag="usage"):
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


class FinishPart(_Part, tag="finish"):
    reason: str


Part = (
    TextPart
    | ReasoningPart
    | ToolCallStartPart
    | ToolCallDeltaPart
    | ToolCallEndPart
    | UsagePart
    | FinishPart
)


class QueuedMessage(msgspec.Struct, frozen=True):
    id: str
    text: str


class ToolCall(msgspec.Struct, frozen=True):
    """A dynamic tool call to answer; ``arguments`` is the JSON text the model wrote."""

    id: str
    name: str
    arguments: str

    @property
    def args(self) -> Any:
        """The arguments parsed (``{}`` when the model wrote none)."""
        return msgspec.json.decode(self.arguments) if self.arguments else {}


# -- chat stream events ---------------------------------------------------------------------


class _Event(msgspec.Struct, tag_field="type"):
    pass


class MessagePartEvent(_Event, tag="message_part"):
    history_version: int
    generation_attempt: int
    seq: int
    part: Part


class MessageEvent(_Event, tag="message"):
    """A committed message; ``text`` joins its text parts."""

    id: str
    seq: int
    role: str
    content: list[dict[str, Any]]
    history_version: int

    @property
    def text(self) -> str:
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")


class StatusEvent(_Event, tag="status"):
    status: str
    archived: bool
    history_version: int
    generation_attempt: int


class ErrorEvent(_Event, tag="error"):
    error: dict[str, Any]


class RetryEvent(_Event, tag="retry"):
    attempt: int
    delay_s: float
    retrying_at: datetime
    error: dict[str, Any]


class QueueUpdateEvent(_Event, tag="queue_update"):
    queue: list[QueuedMessage]


class ActionRequiredEvent(_Event, tag="action_required"):
    calls: list[ToolCall]
    deadline: datetime


class PreviewResetEvent(_Event, tag="preview_reset"):
    """The parts streamed so far are void: a new attempt starts."""

    history_version: int
    generation_attempt: int


class HistoryResetEvent(_Event, tag="history_reset"):
    """The messages after ``after_seq`` are gone (an edit)."""

    history_version: int
    after_seq: int


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """An event this client does not know (a newer server): its raw JSON."""

    type: str
    data: dict[str, Any]


KnownEvent = (
    MessagePartEvent
    | MessageEvent
    | StatusEvent
    | ErrorEvent
    | RetryEvent
    | QueueUpdateEvent
    | ActionRequiredEvent
    | PreviewResetEvent
    | HistoryResetEvent
)
StreamEvent = KnownEvent | UnknownEvent

# Events that describe the chat's state (a reconnection's snapshot sends them again).
STATE_EVENTS = (StatusEvent, ErrorEvent, RetryEvent, QueueUpdateEvent, ActionRequiredEvent)


# -- watch events ---------------------------------------------------------------------------


class _Watch(msgspec.Struct, tag_field="kind"):
    chat_id: str


class ChatCreated(_Watch, tag="created"):
    title: str
    status: str
    archived: bool


class ChatStatusChanged(_Watch, tag="status_change"):
    status: str
    archived: bool


class ChatTitleChanged(_Watch, tag="title_change"):
    title: str


class ChatActionRequired(_Watch, tag="action_required"):
    calls: list[ToolCall]
    deadline: datetime


class ChatDiffStatusChanged(_Watch, tag="diff_status_change"):
    branch: str | None = None
    remote: str | None = None
    pull_request_url: str | None = None
    pull_request_state: str | None = None
    additions: int = 0
    deletions: int = 0
    changed_files: int = 0


class ChatDeleted(_Watch, tag="deleted"):
    pass


class Notification(msgspec.Struct, frozen=True, tag_field="type", tag="notification"):
    """An inbox notification (as listed, and as the inbox watch sends it)."""

    id: str
    chat_id: str | None
    kind: str
    title: str
    body: str
    read: bool
    read_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Reconnected:
    """A watch feed reconnected: events of the gap may be missed (list again to catch up)."""


@dataclass(frozen=True, slots=True)
class UnknownWatchEvent:
    kind: str
    data: dict[str, Any]


KnownWatchEvent = (
    ChatCreated
    | ChatStatusChanged
    | ChatTitleChanged
    | ChatActionRequired
    | ChatDiffStatusChanged
    | ChatDeleted
)
WatchEvent = KnownWatchEvent | UnknownWatchEvent | Reconnected


# -- the resume cursor ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cursor:
    """What a client holds: the last committed message's seq, and the episode and last part
    seq of the answer in progress (None: no preview). Reconnecting with it resumes the
    stream with no gap and no repeat."""

    message_seq: int = 0
    history_version: int | None = None
    generation_attempt: int | None = None
    part_seq: int = 0

    def after(self, event: StreamEvent) -> Cursor:
        """The cursor once ``event`` was received (as the server's own relays keep it)."""
        match event:
            case MessagePartEvent():
                return Cursor(
                    self.message_seq, event.history_version, event.generation_attempt, event.seq
                )
            case MessageEvent(seq=seq):
                return Cursor(
                    max(self.message_seq, seq),
                    self.history_version,
                    self.generation_attempt,
                    self.part_seq,
                )
            case HistoryResetEvent(after_seq=after):
                return Cursor(
                    min(self.message_seq, after),
                    self.history_version,
                    self.generation_attempt,
                    self.part_seq,
                )
            case PreviewResetEvent():
                return Cursor(self.message_seq, event.history_version, event.generation_attempt, 0)
        return self

    def query(self) -> dict[str, int]:
        params = {"message_seq": self.message_seq}
        if self.history_version is not None and self.generation_attempt is not None:
            params["history_version"] = self.history_version
            params["generation_attempt"] = self.generation_attempt
            params["part_seq"] = self.part_seq
        return params


def decode_stream_frame(text: str) -> list[StreamEvent]:
    return [_typed(raw, KnownEvent, "type", UnknownEvent) for raw in _raw_events(text)]


def decode_watch_frame(text: str) -> list[WatchEvent]:
    return [_typed(raw, KnownWatchEvent, "kind", UnknownWatchEvent) for raw in _raw_events(text)]


def decode_notification_frame(text: str) -> list[Notification]:
    return [msgspec.convert(raw, Notification) for raw in _raw_events(text)]


def _raw_events(text: str) -> list[dict[str, Any]]:
    value = msgspec.json.decode(text)
    return value if isinstance(value, list) else [value]


def _typed(raw: dict[str, Any], union: Any, tag: str, unknown: Any) -> Any:
    try:
        return msgspec.convert(raw, union)
    except msgspec.ValidationError:
        return unknown(str(raw.get(tag, "")), raw)
