"""The event hub: fan a chat's events out to its stream subscribers, exactly once and never
blocking.

One ``ChatHub`` per worker process. The chat's actor calls ``publish`` (synchronous, from the
trio thread) after each commit, with the commit's transaction id, and for every streamed part;
each WebSocket calls ``subscribe`` with the cursor of the last events it saw. The parts:

- ``chatd.actors.stream_cursor``: the cursor a client resumes from;
- ``chatd.actors.episode_buffer``: the parts of a chat's current episode (for late joiners);
- ``chatd.actors.stream_snapshot``: the events that tell a new subscriber the chat's state;
- ``chatd.actors.subscription``: one subscriber, and the cut between its snapshot and its
  live events that makes delivery exactly-once;
- this module: the per-process registry of chats and subscribers, and slow consumers.

Delivery to one subscriber, in this order: the snapshot of the chat's state at one consistent
read (``StatusChanged``, ``QueueUpdated``, ``ErrorRaised`` before an ``error`` status,
``RetryScheduled`` / ``ActionRequired`` when the status calls for one, ``HistoryReset`` when
messages the client holds are gone, ``PreviewReset`` when its preview belongs to another
episode); every live committed message after the cursor up to that read, in seq order, in
pages; the parts of the current episode the client lacks; then every event of every later
commit and every later part. Each event once: see ``chatd.actors.subscription`` (and
``publish_recovered`` for a commit whose acknowledgement, and so its transaction id, was lost).

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
``max_episode_parts`` parts (the oldest half goes beyond that). Chats quiet for
``idle_linger_s`` with nobody watching cost the hub nothing.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from uuid import UUID

import trio

from chatd.actors.chat_loader import StateKey
from chatd.actors.stream_cursor import CursorError, StreamCursor
from chatd.actors.subscription import (
    SLOW_CONSUMER_CLOSE_CODE,
    Channel,
    Committed,
    OwnerMoved,
    PageHook,
    Recovered,
    SlowConsumer,
    Subscription,
)
from chatd.domain.events import ChatEvent, MessagePart
from chatd.store.database import Database

__all__ = [
    "SLOW_CONSUMER_CLOSE_CODE",
    "ChatHub",
    "CursorError",
    "HubStats",
    "OwnerMoved",
    "PageHook",
    "SlowConsumer",
    "StreamCursor",
    "Subscription",
]


@dataclass(slots=True)
class HubStats:
    """Counters for metrics."""

    subscribers: int = 0  # open now
    subscriptions: int = 0  # opened since start
    events_published: int = 0
    slow_consumers_dropped: int = 0


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
        # Read by the subscriptions.
        self.db = db
        self.subscriber_queue_size = subscriber_queue_size
        self.slow_consumer_timeout_s = slow_consumer_timeout_s
        self.page_size = page_size
        self.max_batch = max_batch
        self.page_hook = page_hook
        self.slow_reason = f"slow consumer: fell behind for {slow_consumer_timeout_s:g} s"
        self._linger_s = idle_linger_s
        self._max_parts = max_episode_parts
        self._channels: dict[UUID, Channel] = {}
        self._idle: OrderedDict[UUID, float] = OrderedDict()  # chat -> since, oldest first
        self.stats = HubStats()

    @property
    def tracked_chats(self) -> int:
        """Chats the hub keeps state for (with subscribers or lingering)."""
        return len(self._channels)

    # -- publishing ----------------------------------------------------------------------

    def publish(
        self, chat_id: UUID, events: Sequence[ChatEvent], *, commit: int | None = None
    ) -> None:
        """Hand ``events`` to the chat's subscribers. Never waits; call from the trio thread.

        Committed things are published after their commit, in commit order, with ``commit``
        the commit's transaction id (``chatd.store.chats.Committed.xid``): a subscriber whose
        snapshot saw that commit skips them. Parts are published as they stream, without. A
        subscriber that fails to keep up is dropped here, not the publisher.
        """
        # 0 is no transaction id in PostgreSQL: such events are not from a commit.
        self._fan_out(chat_id, events, (lambda event: Committed(event, commit)) if commit else None)

    def _fan_out(
        self,
        chat_id: UUID,
        events: Sequence[ChatEvent],
        wrap: Callable[[ChatEvent], Committed | Recovered] | None,
    ) -> None:
        """Queue ``events`` for the chat's subscribers, each but parts through ``wrap``."""
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
            channel = self._channels[chat_id] = Channel(chat_id, self._max_parts)
        if not channel.subscribers:
            self._idle[chat_id] = now
            self._idle.move_to_end(chat_id)
        slow: list[Subscription] = []
        for event in events:
            if not channel.buffer.record(event):
                continue
            if not channel.subscribers:
                continue
            item = event if wrap is None or isinstance(event, MessagePart) else wrap(event)
            slow.extend(sub for sub in channel.subscribers if not sub._offer(item, now))
        for sub in slow:
            self._drop(sub)

    def publish_recovered(
        self, chat_id: UUID, events: Sequence[ChatEvent], *, state: StateKey
    ) -> None:
        """Hand over the events of a commit whose transaction id was lost with its
        acknowledgement (a database outage), published by the chat's restarted actor: they
        take a subscriber from the last state published to the stored one, whose key is
        ``state`` (``chatd.actors.chat_loader.state_key``).

        A subscriber whose snapshot read that stored state, and that was delivered no commit
        since, already holds them and skips them; every other one gets them. Exact, because
        the actor is the chat's one writer and was down from the lost commit to this call:
        the only stored states a subscriber may have read without being told of a later
        commit are the last published one (whose key differs, or there is nothing to tell)
        and the stored one. Never waits; call from the trio thread.
        """
        self._fan_out(chat_id, events, lambda event: Recovered(event, state))

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
            channel = self._channels[chat_id] = Channel(chat_id, self._max_parts)
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
            if scope.cancelled_caught and sub._moved:
                raise OwnerMoved(chat_id)
            if scope.cancelled_caught and sub._dropped is not None:
                raise SlowConsumer(chat_id, sub._dropped)
        finally:
            self._leave(sub)

    def disown(self, shards: frozenset[int], shard_of: Callable[[UUID], int]) -> None:
        """The chats of ``shards`` are no longer served here (their actors were stopped): end
        each of their subscriptions with ``OwnerMoved`` (its body is cancelled, as for a slow
        consumer), so that the stream goes on from the client's cursor at the new owner, and
        forget their buffers (the new owner streams its own). Never waits; call from the trio
        thread (the Supervisor's ``on_shards_lost``)."""
        if not shards:
            return
        for chat_id in [c for c in self._channels if shard_of(c) in shards]:
            channel = self._channels.pop(chat_id)
            self._idle.pop(chat_id, None)
            for sub in list(channel.subscribers):
                sub._moved = True
                channel.subscribers.discard(sub)
                self.stats.subscribers -= 1
                sub._release()

    def _leave(self, sub: Subscription) -> None:
        channel = sub._channel
        if sub not in channel.subscribers:
            return
        channel.subscribers.discard(sub)
        self.stats.subscribers -= 1
        if channel.subscribers or self._channels.get(channel.chat_id) is not channel:
            return
        if channel.buffer.episode is None or self._linger_s <= 0:
            del self._channels[channel.chat_id]
        else:
            self._idle[channel.chat_id] = trio.current_time()
            self._idle.move_to_end(channel.chat_id)

    def _drop(self, sub: Subscription) -> None:
        if sub._dropped is None:
            sub._dropped = self.slow_reason
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
