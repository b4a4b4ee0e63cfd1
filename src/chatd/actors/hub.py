"""The event hub: fan a chat's events out to its stream subscribers, resumably and never blocking.

One ``ChatHub`` per worker process. The chat's actor calls ``publish`` (synchronous, from the
trio thread) after each commit and for every streamed part; each WebSocket calls ``subscribe``
with the cursor of the last events it saw.

Delivery to one subscriber, in this order:

1. a snapshot of the chat's state read from the database: ``StatusChanged``, ``QueueUpdated``,
   and ``ErrorRaised`` / ``RetryScheduled`` / ``ActionRequired`` when the status calls for one;
   ``HistoryReset(after_seq=G)`` when messages the client holds are gone (G is the last live
   seq at or below the cursor's), and ``PreviewReset`` when the client's preview belongs to
   another episode than the current one;
2. every live committed message after the cursor, once and in seq order, read in pages;
3. the parts of the current episode the client lacks, from the hub's buffer;
4. live events.

The subscriber is registered *before* the database is read, so nothing published meanwhile is
missed; what it queued then is filtered against what the read delivered: a committed message at
or below the last delivered seq, a part already delivered, a ``HistoryReset`` or ``StatusChanged``
older than the snapshot are dropped. Parts are delivered contiguously per episode (1, 2, ...):
a missing run is filled from the chat's buffer of the current episode, or, when the buffer no
longer has it, the rest of that episode is skipped (its committed message supersedes it).

Exactly-once covers committed messages and parts. State events (status, queue, error, retry,
action required) are at-least-once around the snapshot: the last one received is the state.

Slow consumers: each subscriber has a queue of ``subscriber_queue_size`` events. Once it is
full, parts are no longer queued (the chat's buffer keeps them; they are filled in, in their
place, when the consumer catches up) and other events, which are few, may take as much room
again. A subscriber whose queue has stayed full for ``slow_consumer_timeout_s``, or that
overflows the extra room, is dropped. No timer per subscriber: the check runs on every publish
to the chat and whenever the consumer asks for events. Dropping cancels the body of the
subscriber's ``async with`` (a consumer stuck in a socket send wakes up) and ``SlowConsumer``
leaves it: close the WebSocket with ``SlowConsumer.close_code`` (4008) and its ``reason``; the
client may reconnect with its cursor and lose nothing. ``publish`` and other subscribers never
wait.

Memory: the buffer of the current episode is kept for chats with subscribers, and for
``idle_linger_s`` after the last publish or the last subscriber left (a client that subscribes
shortly after its answer started, or reconnects, resumes mid-answer); it holds at most
``max_episode_parts`` parts (the oldest half goes beyond that). A subscriber that joins an
answer whose start is no longer buffered gets none of its parts (they could not follow without
a gap): the answer arrives as its committed message, and the next episode streams normally.
Chats quiet for ``idle_linger_s`` with nobody watching cost the hub nothing.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from uuid import UUID

import trio

from chatd.actors.chat_loader import current_queue, pending_calls
from chatd.domain.chat_status import ChatStatus
from chatd.domain.content_json import parts_from_json
from chatd.domain.events import (
    ActionRequired,
    ChatEvent,
    CommittedMessage,
    Episode,
    ErrorRaised,
    HistoryReset,
    MessagePart,
    PreviewReset,
    QueueUpdated,
    RetryScheduled,
    StatusChanged,
)
from chatd.domain.provider_failure import ProviderFailure
from chatd.store import chats
from chatd.store.database import Database
from chatd.store.errors import NotFound
from chatd.store.records import Chat, ChatMessage

SLOW_CONSUMER_CLOSE_CODE: Final = 4008
"""The WebSocket close code for a dropped slow consumer.

Application-defined (4000-4999) rather than 1008, which clients commonly treat as final (bad
credentials): a slow consumer should reconnect with its cursor and will lose nothing.
"""

PageHook = Callable[[UUID, int], Awaitable[None]]


class SlowConsumer(Exception):
    """The subscriber did not keep up and was dropped; reconnecting with its cursor is safe."""

    close_code: Final = SLOW_CONSUMER_CLOSE_CODE

    def __init__(self, chat_id: UUID, reason: str) -> None:
        super().__init__(f"stream of chat {chat_id} dropped: {reason}")
        self.chat_id = chat_id
        self.reason = reason  # short enough for a WebSocket close frame (at most 123 bytes)


class CursorError(ValueError):
    """A stream cursor parameter is malformed; ``field`` names it (for a 400 naming the field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class StreamCursor:
    """Where a client's view of a chat stream ends.

    ``message_seq``: the highest seq of the committed messages the client holds (0: none).
    ``episode`` and ``part_seq``: the episode of the client's preview and the seq of the last
    part of it the client holds (0: none yet); ``None`` when the client has no preview.
    """

    message_seq: int = 0
    episode: Episode | None = None
    part_seq: int = 0

    def __post_init__(self) -> None:
        if self.message_seq < 0:
            raise CursorError("message_seq", "must not be negative")
        if self.part_seq < 0:
            raise CursorError("part_seq", "must not be negative")
        if self.part_seq and self.episode is None:
            raise CursorError("part_seq", "needs history_version and generation_attempt")

    @classmethod
    def from_query(cls, params: Mapping[str, str]) -> StreamCursor:
        """The cursor from query parameters ``message_seq``, ``history_version``,
        ``generation_attempt`` and ``part_seq`` (all optional; the episode needs both of its
        numbers). Raises ``CursorError`` naming the first bad parameter."""
        numbers: dict[str, int | None] = {}
        for name in ("message_seq", "history_version", "generation_attempt", "part_seq"):
            text = params.get(name)
            if text is None or text == "":
                numbers[name] = None
                continue
            if not text.isascii() or not text.isdigit() or len(text) > 18:
                raise CursorError(name, "must be a non-negative integer")
            numbers[name] = int(text)
        version, attempt = numbers["history_version"], numbers["generation_attempt"]
        if (version is None) != (attempt is None):
            missing = "generation_attempt" if attempt is None else "history_version"
            raise CursorError(missing, "history_version and generation_attempt go together")
        episode = None if version is None or attempt is None else Episode(version, attempt)
        return cls(numbers["message_seq"] or 0, episode, numbers["part_seq"] or 0)


@dataclass(slots=True)
class HubStats:
    """Counters for metrics."""

    subscribers: int = 0  # open now
    subscriptions: int = 0  # opened since start
    events_published: int = 0
    slow_consumers_dropped: int = 0


def _order(episode: Episode) -> tuple[int, int]:
    # Both numbers only grow, so episodes are ordered (history first, then attempt).
    return episode.history_version, episode.generation_attempt


def _episode_of(status: StatusChanged) -> Episode:
    return Episode(status.history_version, status.generation_attempt)


@dataclass(frozen=True, slots=True)
class _Fill:
    """Queue marker: deliver the buffered parts of ``episode`` up to ``upto`` here.

    Queued in place of parts that did not fit (or that predate the subscriber), so that they are
    delivered in their place relative to the events that follow.
    """

    episode: Episode
    upto: int


_Item = ChatEvent | _Fill


class _Channel:
    """What the hub keeps for one chat: its subscribers and the parts of its current episode."""

    __slots__ = ("chat_id", "closed", "episode", "first_seq", "parts", "subscribers")

    def __init__(self, chat_id: UUID) -> None:
        self.chat_id = chat_id
        self.subscribers: set[Subscription] = set()
        self.episode: Episode | None = None
        self.parts: list[MessagePart] = []  # seqs first_seq, first_seq + 1, ...
        self.first_seq = 1
        self.closed = False  # the episode's message was committed: its parts are superseded

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.parts) - 1

    def record(self, event: ChatEvent, max_parts: int) -> bool:
        """Update the buffer with ``event``; ``False`` when subscribers need not see it."""
        match event:
            case MessagePart(episode=episode, seq=seq):
                current = self.episode
                if current is None or _order(episode) > _order(current):
                    self._start(episode, first_seq=seq)
                elif episode != current or self.closed or seq <= self.last_seq:
                    return False  # stale or repeated
                elif seq > self.last_seq + 1:
                    self._start(episode, first_seq=seq)  # a gap: what came before is lost
                self.parts.append(event)
                if len(self.parts) > max_parts:
                    drop = len(self.parts) // 2
                    del self.parts[:drop]
                    self.first_seq += drop
            case PreviewReset(episode=episode):
                self._enter(episode)
            case StatusChanged():
                self._enter(_episode_of(event))
            case CommittedMessage(history_version=version):
                if self.episode is not None and version > self.episode.history_version:
                    self.first_seq = self.last_seq + 1
                    self.parts = []
                    self.closed = True
            case _:
                pass
        return True

    def _enter(self, episode: Episode) -> None:
        if self.episode is None or _order(episode) > _order(self.episode):
            self._start(episode, first_seq=1)

    def _start(self, episode: Episode, *, first_seq: int) -> None:
        self.episode = episode
        self.parts = []
        self.first_seq = first_seq
        self.closed = False


class ChatHub:
    """Per-process fan-out of chat events to stream subscribers (see the module docstring).

    ``page_size`` messages are read per query during catch-up; batches handed to a consumer
    hold at most ``max_batch`` events. ``page_hook`` is for tests: awaited with (chat id, last
    delivered seq) before each page of history is read, so that a test can publish at a chosen
    point of a subscriber's catch-up.
    """

    def __init__(
        self,
        db: Database,
        *,
        subscriber_queue_size: int = 1024,
        slow_consumer_timeout_s: float = 10.0,
        idle_linger_s: float = 30.0,
        max_episode_parts: int = 20_000,
        page_size: int = 200,
        max_batch: int = 500,
        page_hook: PageHook | None = None,
    ) -> None:
        if subscriber_queue_size < 1 or page_size < 1 or max_batch < 1 or max_episode_parts < 1:
            raise ValueError("queue, page, batch and buffer sizes must be at least 1")
        if not slow_consumer_timeout_s > 0:
            raise ValueError("slow_consumer_timeout_s must be positive")
        self._db = db
        self._queue_size = subscriber_queue_size
        self._slow_timeout_s = slow_consumer_timeout_s
        self._linger_s = idle_linger_s
        self._max_parts = max_episode_parts
        self._page_size = page_size
        self._max_batch = max_batch
        self._page_hook = page_hook
        self._slow_reason = f"slow consumer: fell behind for {slow_consumer_timeout_s:g} s"
        self._channels: dict[UUID, _Channel] = {}
        self._idle: OrderedDict[UUID, float] = OrderedDict()  # chat -> since, oldest first
        self.stats = HubStats()

    @property
    def tracked_chats(self) -> int:
        """Chats the hub keeps state for (with subscribers or lingering)."""
        return len(self._channels)

    # -- publishing ----------------------------------------------------------------------

    def publish(self, chat_id: UUID, events: Sequence[ChatEvent]) -> None:
        """Hand ``events`` to the chat's subscribers. Never waits; call from the trio thread.

        Committed things are published after their commit, in commit order; parts as they
        stream. A subscriber that fails to keep up is dropped here, not the publisher.
        """
        self.stats.events_published += len(events)
        if self._idle:
            self._evict_idle(trio.current_time())
        if not events:
            return
        now = trio.current_time()
        channel = self._channels.get(chat_id)
        if channel is None:
            # Buffer the episode even unwatched: a client that subscribes a little after its
            # answer started streaming still gets it token by token.
            channel = self._channels[chat_id] = _Channel(chat_id)
        if not channel.subscribers:
            self._idle[chat_id] = now
            self._idle.move_to_end(chat_id)
        slow: list[Subscription] = []
        for event in events:
            if channel.record(event, self._max_parts):
                slow.extend(sub for sub in channel.subscribers if not sub._offer(event, now))
        for sub in slow:
            self._drop(sub)

    # -- subscribing ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def subscribe(
        self, chat_id: UUID, cursor: StreamCursor | None = None
    ) -> AsyncIterator[Subscription]:
        """Stream the chat from ``cursor`` (from the start when ``None``).

        ``async with hub.subscribe(chat_id, cursor) as events: async for batch in events: ...``
        Entering reads the chat's state (``NotFound`` when the chat does not exist; callers
        check ownership first). ``SlowConsumer`` leaves the block when the subscriber is
        dropped; leaving the block any way unsubscribes.
        """
        now = trio.current_time()
        self._evict_idle(now)
        channel = self._channels.get(chat_id)
        if channel is None:
            channel = self._channels[chat_id] = _Channel(chat_id)
        self._idle.pop(chat_id, None)
        sub = Subscription(self, channel, cursor or StreamCursor())
        channel.subscribers.add(sub)
        self.stats.subscribers += 1
        self.stats.subscriptions += 1
        try:
            await sub._open()
            with trio.CancelScope() as scope:
                sub._scope = scope
                yield sub
            if scope.cancelled_caught and sub._dropped is not None:
                raise SlowConsumer(chat_id, sub._dropped)
        finally:
            self._leave(sub)

    def _leave(self, sub: Subscription) -> None:
        channel = sub._channel
        if sub not in channel.subscribers:
            return
        channel.subscribers.discard(sub)
        self.stats.subscribers -= 1
        if channel.subscribers or self._channels.get(channel.chat_id) is not channel:
            return
        if channel.episode is None or self._linger_s <= 0:
            del self._channels[channel.chat_id]
        else:
            self._idle[channel.chat_id] = trio.current_time()
            self._idle.move_to_end(channel.chat_id)

    def _drop(self, sub: Subscription) -> None:
        if sub._dropped is None:
            sub._dropped = self._slow_reason
        if sub not in sub._channel.subscribers:
            return
        self.stats.slow_consumers_dropped += 1
        self._leave(sub)
        sub._release()

    def _evict_idle(self, now: float) -> None:
        while self._idle:
            chat_id, since = next(iter(self._idle.items()))
            if now - since < self._linger_s:
                return
            del self._idle[chat_id]
            channel = self._channels.get(chat_id)
            if channel is not None and not channel.subscribers:
                del self._channels[chat_id]


class Subscription:
    """One subscriber's stream: an async iterator of event batches (``list[ChatEvent]``).

    Slotted, with a list for its queue (drained whole, never popped from the front): one exists
    per open stream WebSocket.
    """

    __slots__ = (
        "_channel",
        "_cursor",
        "_dropped",
        "_episode",
        "_episode_closed",
        "_full_since",
        "_hub",
        "_last_seq",
        "_next_part",
        "_out",
        "_paging",
        "_queue",
        "_scope",
        "_skipped",
        "_status_floor",
        "_version_floor",
        "_wakeup",
        "chat_id",
    )

    def __init__(self, hub: ChatHub, channel: _Channel, cursor: StreamCursor) -> None:
        self._hub = hub
        self._channel = channel
        self._cursor = cursor
        self.chat_id = channel.chat_id
        # Publisher side: events queued since the subscriber was registered.
        self._queue: list[_Item] = []
        self._wakeup = trio.Event()
        self._full_since: float | None = None
        self._skipped = False  # parts were left out of a full queue since the last marker
        self._dropped: str | None = None
        self._scope: trio.CancelScope | None = None
        # Consumer side: what the client holds.
        self._out: list[ChatEvent] = []
        self._paging = True
        self._last_seq = cursor.message_seq
        self._version_floor = 0  # resets at or below this are in the snapshot
        self._status_floor = Episode(0, 0)  # older statuses than the snapshot's are stale
        self._episode: Episode | None = None
        self._next_part = 1
        self._episode_closed = False
        if channel.parts and channel.episode is not None:
            # Parts streamed before we registered come first, once we know where we are.
            self._queue.append(_Fill(channel.episode, channel.last_seq))

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> list[ChatEvent]:
        while True:
            if self._dropped is not None:
                raise SlowConsumer(self.chat_id, self._dropped)
            if self._out:
                return self._take()
            full_since = self._full_since
            if (
                full_since is not None
                and trio.current_time() - full_since >= self._hub._slow_timeout_s
            ):
                self._hub._drop(self)
                continue
            if self._paging:
                await self._read_page()
                continue
            self._drain()
            if not self._out:
                self._wakeup = trio.Event()
                await self._wakeup.wait()

    # -- publisher side --------------------------------------------------------------------

    def _offer(self, event: ChatEvent, now: float) -> bool:
        """Queue ``event``; ``False`` when this subscriber must be dropped."""
        if self._dropped is not None:
            return True
        queue = self._queue
        size = self._hub._queue_size
        if len(queue) >= size:
            if self._full_since is None:
                self._full_since = now
            elif now - self._full_since >= self._hub._slow_timeout_s:
                self._dropped = self._hub._slow_reason
                return False
            if isinstance(event, MessagePart):
                self._skipped = True  # the chat's buffer keeps it
                return True
            if len(queue) >= 2 * size:
                self._dropped = f"slow consumer: more than {2 * size} events behind"
                return False
        if self._skipped and not isinstance(event, MessagePart):
            channel = self._channel
            if channel.episode is not None:
                queue.append(_Fill(channel.episode, channel.last_seq))
            self._skipped = False
        queue.append(event)
        if self._full_since is None and len(queue) >= size:
            self._full_since = now
        self._wakeup.set()
        return True

    def _release(self) -> None:
        """Dropped: free the queue and wake or cancel the consumer."""
        self._queue = []
        self._out = []
        self._wakeup.set()
        if self._scope is not None:
            self._scope.cancel()

    # -- consumer side -----------------------------------------------------------------------

    def _take(self) -> list[ChatEvent]:
        limit = self._hub._max_batch
        if len(self._out) <= limit:
            batch, self._out = self._out, []
        else:
            batch, self._out = self._out[:limit], self._out[limit:]
        return batch

    async def _open(self) -> None:
        """Read the snapshot of the chat's state (the subscriber is already registered)."""
        db = self._hub._db
        chat = await chats.get_chat(db, self.chat_id)
        if chat is None:
            raise NotFound("chat", self.chat_id)
        events = await _state_events(db, chat)
        cursor = self._cursor
        current = Episode(chat.history_version, chat.generation_attempt)
        if cursor.message_seq > 0:
            kept = await db.fetchval(
                "SELECT coalesce(max(seq), 0) FROM chat_messages"
                " WHERE chat_id = $1 AND deleted_at IS NULL AND seq <= $2",
                self.chat_id,
                cursor.message_seq,
            )
            if kept < cursor.message_seq:
                events.append(HistoryReset(chat.history_version, kept))
                self._last_seq = kept
        self._version_floor = chat.history_version
        self._status_floor = current
        self._episode = current
        if cursor.episode == current:
            self._next_part = cursor.part_seq + 1
        elif cursor.episode is not None:
            events.append(PreviewReset(current))
        self._out = events

    async def _read_page(self) -> None:
        hub = self._hub
        if hub._page_hook is not None:
            await hub._page_hook(self.chat_id, self._last_seq)
        page = await chats.list_messages(
            hub._db, self.chat_id, after_seq=self._last_seq, limit=hub._page_size
        )
        if self._dropped is not None:
            return
        for row in page:
            self._accept(_committed(row))
        if len(page) < hub._page_size:
            self._paging = False
            self._drain()

    def _drain(self) -> None:
        queue, self._queue = self._queue, []
        for item in queue:
            self._accept(item)
        if self._episode is not None:
            self._fill(self._episode, sys.maxsize)
        self._skipped = False
        self._full_since = None

    def _accept(self, item: _Item) -> None:
        """Deliver ``item`` unless the client already holds it (or it is stale)."""
        out = self._out
        match item:
            case MessagePart():
                self._accept_part(item)
            case _Fill(episode=episode, upto=upto):
                self._fill(episode, upto)
            case CommittedMessage(seq=seq, history_version=version):
                if seq <= self._last_seq:
                    return
                self._last_seq = seq
                if self._episode is not None and version > self._episode.history_version:
                    self._episode_closed = True
                out.append(item)
            case HistoryReset(history_version=version, after_seq=after):
                if version <= self._version_floor:
                    return
                self._version_floor = version
                self._last_seq = min(self._last_seq, after)
                out.append(item)
            case StatusChanged():
                episode = _episode_of(item)
                if _order(episode) < _order(self._status_floor):
                    return
                self._enter(episode)
                out.append(item)
            case PreviewReset(episode=episode):
                current = self._episode
                if current is not None and (
                    _order(episode) < _order(current)
                    or (episode == current and self._next_part > 1)
                ):
                    return  # resetting would wipe parts the client holds
                self._enter(episode)
                out.append(item)
            case _:
                out.append(item)

    def _accept_part(self, part: MessagePart) -> None:
        episode = part.episode
        if self._episode is None or _order(episode) > _order(self._episode):
            self._enter(episode)
            self._out.append(PreviewReset(episode))  # never announced to this subscriber
        elif episode != self._episode:
            return
        if self._episode_closed or part.seq < self._next_part:
            return
        if part.seq > self._next_part:
            self._fill(episode, part.seq - 1)
            if part.seq != self._next_part:
                return  # the run before it is gone: skip the rest of this episode
        self._out.append(part)
        self._next_part += 1

    def _fill(self, episode: Episode, upto: int) -> None:
        """Deliver buffered parts of ``episode`` from the next one the client lacks to ``upto``."""
        channel = self._channel
        if (
            self._episode_closed
            or episode != self._episode
            or channel.episode != episode
            or channel.closed
            or self._next_part < channel.first_seq
        ):
            return
        end = min(upto, channel.last_seq)
        if end < self._next_part:
            return
        start = self._next_part - channel.first_seq
        self._out.extend(channel.parts[start : end - channel.first_seq + 1])
        self._next_part = end + 1

    def _enter(self, episode: Episode) -> None:
        if self._episode is None or _order(episode) > _order(self._episode):
            self._episode = episode
            self._next_part = 1
            self._episode_closed = False


def _committed(message: ChatMessage) -> CommittedMessage:
    return CommittedMessage(
        message.id,
        message.seq,
        message.role,
        parts_from_json(message.content),
        message.history_version,
    )


async def _state_events(db: Database, chat: Chat) -> list[ChatEvent]:
    """The events that tell a new subscriber the chat's current state."""
    events: list[ChatEvent] = [
        StatusChanged(chat.status, chat.archived, chat.history_version, chat.generation_attempt)
    ]
    events.append(QueueUpdated(await current_queue(db, chat)))
    failure = None if chat.last_error is None else ProviderFailure.from_json(chat.last_error)
    if chat.status is ChatStatus.ERROR and failure is not None:
        events.append(ErrorRaised(failure))
    if chat.status is ChatStatus.RUNNING and chat.retry_at is not None and failure is not None:
        at = chat.retry_at.timestamp()
        delay = max(0.0, at - time.time())
        events.append(RetryScheduled(chat.retry_count + 1, delay, failure, at))
    if calls := await pending_calls(db, chat):
        deadline = 0.0 if chat.action_deadline is None else chat.action_deadline.timestamp()
        events.append(ActionRequired(calls, deadline))
    return events
