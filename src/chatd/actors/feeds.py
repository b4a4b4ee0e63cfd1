"""Per-user fan-out of items (watch events, inbox notifications) to in-process subscribers.

The same promises as the chat hub (``chatd.actors.hub``) without its history: a subscriber gets
what is published for its user while it is subscribed, in publish order, and nothing from
before. Clients re-read the current state (the chat list, the inbox) when they (re)connect.

``publish`` never waits and other subscribers never wait for a slow one. Slow consumers: a
subscriber is dropped when a publish finds ``queue_size`` items already waiting for it, or
finds that its oldest waiting item has waited ``slow_consumer_timeout_s`` (it has not read for
that long while it had something to read). The check runs on publish only: no timer per
subscriber, and a consumer that comes back late to an idle feed loses nothing, so it is kept.
Dropping cancels the body of the subscriber's ``async with`` (a consumer stuck in a socket
send wakes up) and ``SlowConsumer`` leaves it, as with the hub: close the WebSocket with
``SlowConsumer.close_code`` (4008) and its ``reason``. Its ``chat_id`` holds the user's id.

Several workers: ``publish`` also hands the item to ``relay`` when one is set (the NOTIFY
bridge, ``chatd.actors.feed_bridge``), which sends it to the other workers; there, what other
workers published comes in through ``deliver``, to local subscribers only (never relayed again).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar
from uuid import UUID

import trio

from chatd.actors.hub import SlowConsumer

T = TypeVar("T")


@dataclass(slots=True)
class FeedStats:
    """Counters for metrics."""

    subscribers: int = 0  # open now
    subscriptions: int = 0  # opened since start
    published: int = 0  # items published here, watched or not
    received: int = 0  # items other workers published, delivered here
    slow_consumers_dropped: int = 0


class UserFeed(Generic[T]):
    """Items published for a user go to that user's subscribers (see the module docstring).

    ``async with feed.subscribe(user_id) as sub: async for batch in sub: ...`` where each
    ``batch`` is every item queued since the previous one, in publish order.
    """

    def __init__(self, *, queue_size: int, slow_consumer_timeout_s: float) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if not slow_consumer_timeout_s > 0:
            raise ValueError("slow_consumer_timeout_s must be positive")
        self._queue_size = queue_size
        self._timeout_s = slow_consumer_timeout_s
        self._subscribers: dict[UUID, set[FeedSubscription[T]]] = {}
        self.stats = FeedStats()
        # Called with every item published here, after local delivery (see the module docstring).
        self.relay: Callable[[UUID, T], None] | None = None

    @property
    def watched_users(self) -> int:
        """Users with at least one subscriber."""
        return len(self._subscribers)

    def is_watched(self, user_id: UUID) -> bool:
        """Whether the user has a subscriber here."""
        return user_id in self._subscribers

    def watched(self) -> list[UUID]:
        """The users with at least one subscriber here."""
        return list(self._subscribers)

    def publish(self, user_id: UUID, item: T) -> None:
        """Hand ``item`` to the user's subscribers, on every worker. Never waits; call from the
        trio thread."""
        self.stats.published += 1
        self._fan_out(user_id, item)
        if self.relay is not None:
            self.relay(user_id, item)

    def deliver(self, user_id: UUID, item: T) -> None:
        """Hand ``item``, published by another worker, to this worker's subscribers only."""
        self.stats.received += 1
        self._fan_out(user_id, item)

    def _fan_out(self, user_id: UUID, item: T) -> None:
        subscribers = self._subscribers.get(user_id)
        if not subscribers:
            return
        now = trio.current_time()
        slow = [sub for sub in subscribers if not sub._offer(item, now)]
        for sub in slow:
            self._drop(sub)

    @contextlib.asynccontextmanager
    async def subscribe(self, user_id: UUID) -> AsyncIterator[FeedSubscription[T]]:
        """Receive what is published for ``user_id`` from now on, until the block is left.

        ``SlowConsumer`` leaves the block when the subscriber was dropped; leaving the block
        any way unsubscribes.
        """
        sub: FeedSubscription[T] = FeedSubscription(self, user_id)
        self._subscribers.setdefault(user_id, set()).add(sub)
        self.stats.subscribers += 1
        self.stats.subscriptions += 1
        try:
            with trio.CancelScope() as scope:
                sub._scope = scope
                yield sub
            if scope.cancelled_caught and sub._dropped is not None:
                raise SlowConsumer(user_id, sub._dropped)
        finally:
            self._leave(sub)

    def _leave(self, sub: FeedSubscription[T]) -> None:
        subscribers = self._subscribers.get(sub.user_id)
        if subscribers is None or sub not in subscribers:
            return
        subscribers.discard(sub)
        if not subscribers:
            del self._subscribers[sub.user_id]
        self.stats.subscribers -= 1

    def _drop(self, sub: FeedSubscription[T]) -> None:
        self.stats.slow_consumers_dropped += 1
        self._leave(sub)
        sub._release()


class FeedSubscription(Generic[T]):
    """One subscriber: an async iterator of item batches (``list[T]``)."""

    __slots__ = ("_dropped", "_feed", "_queue", "_scope", "_waiting_since", "_wakeup", "user_id")

    def __init__(self, feed: UserFeed[T], user_id: UUID) -> None:
        self._feed = feed
        self.user_id = user_id
        self._queue: list[T] = []
        self._waiting_since = 0.0  # when the oldest item of the queue was queued
        self._wakeup = trio.Event()
        self._dropped: str | None = None
        self._scope: trio.CancelScope | None = None

    def __aiter__(self) -> FeedSubscription[T]:
        return self

    async def __anext__(self) -> list[T]:
        while True:
            if self._dropped is not None:
                raise SlowConsumer(self.user_id, self._dropped)
            if self._queue:
                batch, self._queue = self._queue, []
                return batch
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    def _offer(self, item: T, now: float) -> bool:
        """Queue ``item``; ``False`` when this subscriber must be dropped instead."""
        feed = self._feed
        if self._queue:
            if len(self._queue) >= feed._queue_size:
                self._dropped = f"slow consumer: more than {feed._queue_size} items behind"
                return False
            if now - self._waiting_since >= feed._timeout_s:
                self._dropped = f"slow consumer: fell behind for {feed._timeout_s:g} s"
                return False
        else:
            self._waiting_since = now
        self._queue.append(item)
        self._wakeup.set()
        return True

    def _release(self) -> None:
        """Dropped: free the queue and wake or cancel the consumer."""
        self._queue = []
        self._wakeup.set()
        if self._scope is not None:
            self._scope.cancel()
