"""One stream subscriber: the snapshot, then the history after the cursor, then live events,
each delivered once.

The hub (``chatd.actors.hub``) registers a subscriber *before* it reads the chat, so nothing
published meanwhile is missed, then reads the snapshot (``chatd.store.chat_snapshot``): one
repeatable-read transaction that also says which commits it saw. That read is the cut:

- what the read saw is delivered from it: the state events, then the live messages after the
  cursor up to the chat's last seq at the read (in pages), then the buffered parts of the
  current episode the client lacks;
- what was committed after it is delivered live: the hub stamps the events of each commit with
  the commit's transaction id, and queued events whose commit the read saw are dropped, so an
  event published after its commit but read by the snapshot (a retry, a status, a queue) is not
  repeated. Events published without a commit are not in the database and are always delivered.
- a commit whose acknowledgement an outage lost has no known transaction id: its restarted
  actor publishes what it did with the key of the stored state it reached
  (``ChatHub.publish_recovered``), and a subscriber whose snapshot read that very state, with
  no commit delivered since, skips those events.

Parts are not committed: they carry ``(episode, seq)`` and are delivered contiguously per
episode (1, 2, ...): a missing run is filled from the chat's episode buffer, or, when the
buffer no longer has it, the rest of that episode is skipped (its committed message
supersedes it).

Slow consumers: see ``ChatHub``. Dropping cancels the body of the subscriber's ``async with``
and ``SlowConsumer`` leaves it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from uuid import UUID

import trio

from chatd.actors.chat_loader import StateKey
from chatd.actors.episode_buffer import EpisodeBuffer, episode_of, order
from chatd.actors.stream_cursor import StreamCursor
from chatd.actors.stream_snapshot import snapshot_key, snapshot_view
from chatd.domain.content_json import parts_from_json
from chatd.domain.events import (
    ChatEvent,
    CommittedMessage,
    Episode,
    HistoryReset,
    MessagePart,
    PreviewReset,
    StatusChanged,
)
from chatd.store import chats
from chatd.store.chat_snapshot import read_chat_snapshot
from chatd.store.errors import NotFound
from chatd.store.records import ChatMessage
from chatd.store.visibility import ReadSnapshot

if TYPE_CHECKING:
    from chatd.actors.hub import ChatHub

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


class OwnerMoved(Exception):
    """The chat's shard left this worker (handed over, taken over, dropped, or the worker is
    stopping): its events are no longer published here. The stream goes on from the client's
    cursor at the new owner (``ChatHub.disown``; the web layer relays it)."""

    def __init__(self, chat_id: UUID) -> None:
        super().__init__(f"chat {chat_id} is no longer served by this worker")
        self.chat_id = chat_id


@dataclass(frozen=True, slots=True)
class Committed:
    """Queue item: ``event`` was published for the commit of transaction ``xid``."""

    event: ChatEvent
    xid: int


@dataclass(frozen=True, slots=True)
class Fill:
    """Queue item: deliver the buffered parts of ``episode`` up to ``upto`` here.

    Queued in place of parts that did not fit (or that predate the subscriber), so that they are
    delivered in their place relative to the events that follow.
    """

    episode: Episode
    upto: int


@dataclass(frozen=True, slots=True)
class Recovered:
    """Queue item: ``event`` was published for a commit whose transaction id was lost (see
    ``ChatHub.publish_recovered``); it brings a subscriber to the stored state ``state``."""

    event: ChatEvent
    state: StateKey


Item = ChatEvent | Committed | Recovered | Fill


class Channel:
    """What the hub keeps for one chat: its subscribers and its episode buffer."""

    __slots__ = ("buffer", "chat_id", "subscribers")

    def __init__(self, chat_id: UUID, max_parts: int) -> None:
        self.chat_id = chat_id
        self.subscribers: set[Subscription] = set()
        self.buffer = EpisodeBuffer(max_parts)


class Subscription:
    """One subscriber's stream: an async iterator of event batches (``list[ChatEvent]``).

    Slotted, with a list for its queue (drained whole, never popped from the front): one exists
    per open stream WebSocket.
    """

    __slots__ = (
        "_channel",
        "_cursor",
        "_cut_seq",
        "_dropped",
        "_episode",
        "_episode_closed",
        "_full_since",
        "_hub",
        "_last_seq",
        "_moved",
        "_next_part",
        "_out",
        "_paging",
        "_queue",
        "_read_state",
        "_scope",
        "_seen",
        "_skipped",
        "_status_floor",
        "_version_floor",
        "_wakeup",
        "chat_id",
    )

    def __init__(self, hub: ChatHub, channel: Channel, cursor: StreamCursor) -> None:
        self._hub = hub
        self._channel = channel
        self._cursor = cursor
        self.chat_id = channel.chat_id
        # Publisher side: events queued since the subscriber was registered.
        self._queue: list[Item] = []
        self._wakeup = trio.Event()
        self._full_since: float | None = None
        self._skipped = False  # parts were left out of a full queue since the last marker
        self._dropped: str | None = None
        self._moved = False  # the shard left this worker: see ``OwnerMoved``
        self._scope: trio.CancelScope | None = None
        # Consumer side: the cut (set by the snapshot), and what the client holds.
        self._seen = ReadSnapshot(0, 0, frozenset())
        self._cut_seq = 0  # the chat's last message seq at the snapshot's read
        # The stored state the snapshot read, while it is the last one the client was told of
        # (None once a later commit was delivered): see ``Recovered``.
        self._read_state: StateKey | None = None
        self._out: list[ChatEvent] = []
        self._paging = True
        self._last_seq = cursor.message_seq
        self._version_floor = 0  # resets at or below this are in the snapshot
        self._status_floor = Episode(0, 0)  # older statuses than the snapshot's are stale
        self._episode: Episode | None = None
        self._next_part = 1
        self._episode_closed = False
        buffer = channel.buffer
        if buffer.parts and buffer.episode is not None:
            # Parts streamed before we registered come first, once we know where we are.
            self._queue.append(Fill(buffer.episode, buffer.last_seq))

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> list[ChatEvent]:
        while True:
            if self._moved:
                raise OwnerMoved(self.chat_id)
            if self._dropped is not None:
                raise SlowConsumer(self.chat_id, self._dropped)
            if self._out:
                return self._take()
            full_since = self._full_since
            if (
                full_since is not None
                and trio.current_time() - full_since >= self._hub.slow_consumer_timeout_s
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

    def _offer(self, item: ChatEvent | Committed | Recovered, now: float) -> bool:
        """Queue ``item``; ``False`` when this subscriber must be dropped."""
        if self._dropped is not None:
            return True
        queue = self._queue
        hub = self._hub
        size = hub.subscriber_queue_size
        is_part = isinstance(item, MessagePart)
        if len(queue) >= size:
            if self._full_since is None:
                self._full_since = now
            elif now - self._full_since >= hub.slow_consumer_timeout_s:
                self._dropped = hub.slow_reason
                return False
            if is_part:
                self._skipped = True  # the chat's buffer keeps it
                return True
            if len(queue) >= 2 * size:
                self._dropped = f"slow consumer: more than {2 * size} events behind"
                return False
        if self._skipped and not is_part:
            buffer = self._channel.buffer
            if buffer.episode is not None:
                queue.append(Fill(buffer.episode, buffer.last_seq))
            self._skipped = False
        queue.append(item)
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
        limit = self._hub.max_batch
        if len(self._out) <= limit:
            batch, self._out = self._out, []
        else:
            batch, self._out = self._out[:limit], self._out[limit:]
        return batch

    async def _open(self) -> None:
        """Read the snapshot: the cut (the subscriber is already registered)."""
        cursor = self._cursor
        snapshot = await read_chat_snapshot(
            self._hub.db, self.chat_id, message_seq=cursor.message_seq
        )
        if snapshot is None:
            raise NotFound("chat", self.chat_id)
        view = snapshot_view(snapshot, cursor, now=time.time())
        chat = snapshot.chat
        self._seen = snapshot.seen
        self._read_state = snapshot_key(snapshot)
        self._cut_seq = chat.last_message_seq
        self._last_seq = view.kept_seq
        self._version_floor = chat.history_version
        self._status_floor = view.episode
        self._episode = view.episode
        self._next_part = view.resume_part
        self._out = view.events

    async def _read_page(self) -> None:
        """The next page of the history the snapshot's read covers (later messages come live)."""
        if self._last_seq >= self._cut_seq:
            self._end_paging()
            return
        hub = self._hub
        if hub.page_hook is not None:
            await hub.page_hook(self.chat_id, self._last_seq)
        page = await chats.list_messages(
            hub.db, self.chat_id, after_seq=self._last_seq, limit=hub.page_size
        )
        if self._dropped is not None:
            return
        for row in page:
            if row.seq > self._cut_seq:
                self._end_paging()
                return
            self._accept(_committed(row))
        if len(page) < hub.page_size:
            self._end_paging()

    def _end_paging(self) -> None:
        self._paging = False
        self._drain()

    def _drain(self) -> None:
        queue, self._queue = self._queue, []
        seen = self._seen
        for item in queue:
            if isinstance(item, Committed):
                if not seen.sees(item.xid):
                    self._read_state = None
                    self._accept(item.event)
            elif isinstance(item, Recovered):
                if item.state != self._read_state:
                    self._accept(item.event)
            else:
                self._accept(item)
        if self._episode is not None:
            self._fill(self._episode, sys.maxsize)
        self._skipped = False
        self._full_since = None

    def _accept(self, item: ChatEvent | Fill) -> None:
        """Deliver ``item`` unless the client already holds it (or it is stale)."""
        out = self._out
        match item:
            case MessagePart():
                self._accept_part(item)
            case Fill(episode=episode, upto=upto):
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
                episode = episode_of(item)
                if order(episode) < order(self._status_floor):
                    return
                self._enter(episode)
                out.append(item)
            case PreviewReset(episode=episode):
                current = self._episode
                if current is not None and (
                    order(episode) < order(current) or (episode == current and self._next_part > 1)
                ):
                    return  # resetting would wipe parts the client holds
                self._enter(episode)
                out.append(item)
            case _:
                out.append(item)

    def _accept_part(self, part: MessagePart) -> None:
        episode = part.episode
        if self._episode is None or order(episode) > order(self._episode):
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
        if self._episode_closed or episode != self._episode:
            return
        parts = self._channel.buffer.parts_between(episode, self._next_part, upto)
        if parts:
            self._out.extend(parts)
            self._next_part = parts[-1].seq + 1

    def _enter(self, episode: Episode) -> None:
        if self._episode is None or order(episode) > order(self._episode):
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
