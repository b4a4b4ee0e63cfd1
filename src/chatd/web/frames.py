"""The wire form of stream and watch events: one WebSocket text frame per batch of events.

A frame is one JSON object when its batch holds one event, an array of objects when it holds
several (a client handles both with ``Array.isArray``). Stream events are tagged by ``type``,
watch events by ``kind``. Times are RFC 3339 in UTC, as in the HTTP API; message content has
the shape ``GET /chats/{id}/messages`` returns (``parts_to_json``), so a streamed message and a
read one compare equal.

Frames are msgspec Structs encoded in one pass: the load test pushes thousands of frames per
second, and building a dict per event would cost more than the encoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, assert_never
from uuid import UUID

import msgspec

from chatd.domain.chat_status import ChatStatus
from chatd.domain.content_json import parts_to_json
from chatd.domain.events import (
    ActionRequired,
    ChatEvent,
    CommittedMessage,
    ErrorRaised,
    HistoryReset,
    MessagePart,
    PreviewReset,
    QueueUpdated,
    RetryScheduled,
    StatusChanged,
)
from chatd.domain.stream_parts import (
    Finish,
    FinishReason,
    ReasoningDelta,
    StreamPart,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from chatd.domain.watch_events import (
    ChatActionRequired,
    ChatCreated,
    ChatDeleted,
    ChatDiffStatusChanged,
    ChatStatusChanged,
    ChatTitleChanged,
    WatchEvent,
)
from chatd.web.views import PendingCallView, QueuedView, pending_call_view

# -- streamed parts (the ``part`` of a message_part frame) ----------------------------------


class _Part(msgspec.Struct, tag_field="type", gc=False):
    pass


class TextPartFrame(_Part, tag="text"):
    text: str


class ReasoningPartFrame(_Part, tag="reasoning"):
    text: str
    signature: str | None


class ToolCallStartFrame(_Part, tag="tool_call_start"):
    index: int
    id: str
    name: str


class ToolCallDeltaFrame(_Part, tag="tool_call_delta"):
    index: int
    arguments: str  # the next piece of the call's JSON arguments


class ToolCallEndFrame(_Part, tag="tool_call_end"):
    index: int


class UsageFrame(_Part, tag="usage"):
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int


class FinishFrame(_Part, tag="finish"):
    reason: FinishReason


PartFrame = (
    TextPartFrame
    | ReasoningPartFrame
    | ToolCallStartFrame
    | ToolCallDeltaFrame
    | ToolCallEndFrame
    | UsageFrame
    | FinishFrame
)


def part_frame(part: StreamPart) -> PartFrame:  # noqa: PLR0911 - one case per kind
    match part:
        case TextDelta(text=text):
            return TextPartFrame(text)
        case ReasoningDelta(text=text, signature=signature):
            return ReasoningPartFrame(text, signature)
        case ToolCallStart(index=index, id=call_id, name=name):
            return ToolCallStartFrame(index, call_id, name)
        case ToolCallDelta(index=index, arguments=arguments):
            return ToolCallDeltaFrame(index, arguments)
        case ToolCallEnd(index=index):
            return ToolCallEndFrame(index)
        case Usage():
            return UsageFrame(
                part.input_tokens,
                part.output_tokens,
                part.cache_read_tokens,
                part.cache_write_tokens,
            )
        case Finish(reason=reason):
            return FinishFrame(reason)
        case _:
            assert_never(part)


# -- stream frames (GET /chats/{id}/stream) -------------------------------------------------


class _StreamFrame(msgspec.Struct, tag_field="type", gc=False):
    pass


class MessagePartFrame(_StreamFrame, tag="message_part"):
    """One streamed piece of the answer in progress; ``seq`` counts from 1 per episode."""

    history_version: int
    generation_attempt: int
    seq: int
    part: PartFrame


class MessageFrame(_StreamFrame, tag="message"):
    """A committed message; its ``seq`` is the ``message_seq`` of the resume cursor."""

    id: UUID
    seq: int
    role: str
    content: list[dict[str, Any]]
    history_version: int


class StatusFrame(_StreamFrame, tag="status"):
    status: ChatStatus
    archived: bool
    history_version: int
    generation_attempt: int


class ErrorFrame(_StreamFrame, tag="error"):
    """The run stopped; ``error`` is the classified failure (as ``last_error`` of the chat)."""

    error: dict[str, Any]


class RetryFrame(_StreamFrame, tag="retry"):
    attempt: int  # the attempt that runs next (the first try is 1)
    delay_s: float
    retrying_at: datetime
    error: dict[str, Any]


class QueueUpdateFrame(_StreamFrame, tag="queue_update"):
    queue: list[QueuedView]


class ActionRequiredFrame(_StreamFrame, tag="action_required"):
    calls: list[PendingCallView]
    deadline: datetime


class PreviewResetFrame(_StreamFrame, tag="preview_reset"):
    """Drop the parts shown so far: a new episode starts."""

    history_version: int
    generation_attempt: int


class HistoryResetFrame(_StreamFrame, tag="history_reset"):
    """Drop the messages after ``after_seq``: an edit truncated the history."""

    history_version: int
    after_seq: int


StreamFrame = (
    MessagePartFrame
    | MessageFrame
    | StatusFrame
    | ErrorFrame
    | RetryFrame
    | QueueUpdateFrame
    | ActionRequiredFrame
    | PreviewResetFrame
    | HistoryResetFrame
)


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def stream_frame(event: ChatEvent) -> StreamFrame:  # noqa: PLR0911 - one case per kind
    match event:
        case MessagePart(episode=episode, seq=seq, part=part):
            return MessagePartFrame(
                episode.history_version, episode.generation_attempt, seq, part_frame(part)
            )
        case CommittedMessage():
            return MessageFrame(
                event.id, event.seq, event.role, parts_to_json(event.content), event.history_version
            )
        case StatusChanged():
            return StatusFrame(
                event.status, event.archived, event.history_version, event.generation_attempt
            )
        case ErrorRaised(failure=failure):
            return ErrorFrame(failure.to_json())
        case RetryScheduled():
            return RetryFrame(
                event.attempt, event.delay_s, _utc(event.retrying_at), event.failure.to_json()
            )
        case QueueUpdated(queue=queue):
            return QueueUpdateFrame([QueuedView(entry.id, entry.text) for entry in queue])
        case ActionRequired(calls=calls, deadline=deadline):
            return ActionRequiredFrame([pending_call_view(c) for c in calls], _utc(deadline))
        case PreviewReset(episode=episode):
            return PreviewResetFrame(episode.history_version, episode.generation_attempt)
        case HistoryReset(history_version=version, after_seq=after_seq):
            return HistoryResetFrame(version, after_seq)
        case _:
            assert_never(event)


# -- watch frames (GET /chats/watch) --------------------------------------------------------


class _WatchFrame(msgspec.Struct, tag_field="kind", gc=False):
    chat_id: UUID


class CreatedFrame(_WatchFrame, tag="created"):
    title: str
    status: ChatStatus
    archived: bool


class StatusChangeFrame(_WatchFrame, tag="status_change"):
    status: ChatStatus
    archived: bool


class TitleChangeFrame(_WatchFrame, tag="title_change"):
    title: str


class WatchActionRequiredFrame(_WatchFrame, tag="action_required"):
    calls: list[PendingCallView]
    deadline: datetime


class DiffStatusChangeFrame(_WatchFrame, tag="diff_status_change"):
    branch: str | None
    remote: str | None
    pull_request_url: str | None
    pull_request_state: str | None
    additions: int
    deletions: int
    changed_files: int


class DeletedFrame(_WatchFrame, tag="deleted"):
    """The chat is gone: drop it from the list."""


WatchFrame = (
    CreatedFrame
    | StatusChangeFrame
    | TitleChangeFrame
    | WatchActionRequiredFrame
    | DiffStatusChangeFrame
    | DeletedFrame
)


def watch_frame(event: WatchEvent) -> WatchFrame:
    match event:
        case ChatCreated():
            return CreatedFrame(event.chat_id, event.title, event.status, event.archived)
        case ChatStatusChanged():
            return StatusChangeFrame(event.chat_id, event.status, event.archived)
        case ChatTitleChanged():
            return TitleChangeFrame(event.chat_id, event.title)
        case ChatActionRequired():
            calls = [pending_call_view(c) for c in event.calls]
            return WatchActionRequiredFrame(event.chat_id, calls, _utc(event.deadline))
        case ChatDiffStatusChanged():
            return DiffStatusChangeFrame(
                event.chat_id,
                event.branch,
                event.remote,
                event.pull_request_url,
                event.pull_request_state,
                event.additions,
                event.deletions,
                event.changed_files,
            )
        case ChatDeleted(chat_id=chat_id):
            return DeletedFrame(chat_id)
        case _:
            assert_never(event)


# -- encoding -------------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()


def encode_stream_batch(batch: Sequence[ChatEvent]) -> str:
    """One frame for a hub batch: an object for one event, an array for several."""
    if len(batch) == 1:
        return _encoder.encode(stream_frame(batch[0])).decode()
    return _encoder.encode([stream_frame(event) for event in batch]).decode()


def encode_watch_batch(batch: Sequence[WatchEvent]) -> str:
    """One frame for a watch batch: an object for one event, an array for several."""
    if len(batch) == 1:
        return _encoder.encode(watch_frame(batch[0])).decode()
    return _encoder.encode([watch_frame(event) for event in batch]).decode()
