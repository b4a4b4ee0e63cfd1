"""What a new stream subscriber is told first: the chat's state at one consistent read.

Pure: from a ``ChatSnapshot`` (one repeatable-read transaction) and the client's cursor to the
events that bring the client to that read. The details come before the status they explain,
as they do live: an ``error`` before the ``error`` status.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatd.actors.chat_loader import (
    StateKey,
    queued_entry,
    stored_key,
    unanswered_calls,
)
from chatd.actors.stream_cursor import StreamCursor
from chatd.domain.chat_status import ChatStatus
from chatd.domain.content_json import parts_from_json
from chatd.domain.conversation import Message
from chatd.domain.events import (
    ActionRequired,
    ChatEvent,
    Episode,
    ErrorRaised,
    HistoryReset,
    PreviewReset,
    QueueUpdated,
    RetryScheduled,
    StatusChanged,
)
from chatd.domain.provider_failure import ProviderFailure
from chatd.store.chat_snapshot import ChatSnapshot


@dataclass(frozen=True, slots=True)
class SnapshotView:
    """``events``: what to send first. ``episode``: the chat's episode at the read.
    ``kept_seq``: the last message the client holds that is still live (history catch-up
    starts after it). ``resume_part``: the first part of ``episode`` the client lacks."""

    events: list[ChatEvent]
    episode: Episode
    kept_seq: int
    resume_part: int


def snapshot_view(snapshot: ChatSnapshot, cursor: StreamCursor, *, now: float) -> SnapshotView:
    """The events that bring a client at ``cursor`` to ``snapshot`` (``now``: wall-clock epoch
    seconds, for the time left before a retry)."""
    chat = snapshot.chat
    failure = None if chat.last_error is None else ProviderFailure.from_json(chat.last_error)
    events: list[ChatEvent] = []
    if chat.status is ChatStatus.ERROR and failure is not None:
        events.append(ErrorRaised(failure))
    events.append(
        StatusChanged(chat.status, chat.archived, chat.history_version, chat.generation_attempt)
    )
    events.append(QueueUpdated(tuple(queued_entry(q) for q in snapshot.queue)))
    if chat.status is ChatStatus.RUNNING and chat.retry_at is not None and failure is not None:
        at = chat.retry_at.timestamp()
        events.append(RetryScheduled(chat.retry_count + 1, max(0.0, at - now), failure, at))
    if snapshot.last_step:
        history = [Message(m.role, parts_from_json(m.content)) for m in snapshot.last_step]
        dynamic = {str(tool.get("name")) for tool in chat.dynamic_tools}
        if calls := unanswered_calls(history, dynamic):
            deadline = 0.0 if chat.action_deadline is None else chat.action_deadline.timestamp()
            events.append(ActionRequired(calls, deadline))
    if snapshot.kept_seq < cursor.message_seq:
        events.append(HistoryReset(chat.history_version, snapshot.kept_seq))
    current = Episode(chat.history_version, chat.generation_attempt)
    resume_part = 1
    if cursor.episode == current:
        resume_part = cursor.part_seq + 1
    elif cursor.episode is not None:
        events.append(PreviewReset(current))
    return SnapshotView(events, current, min(snapshot.kept_seq, cursor.message_seq), resume_part)


def snapshot_key(snapshot: ChatSnapshot) -> StateKey:
    """The key of the chat as a subscriber's snapshot read it."""
    return stored_key(snapshot.chat, snapshot.queue)
