"""UserFeed: per-user fan-out with batches, isolation, and slow consumers dropped."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest
import trio
import trio.testing

from chatd.actors.feeds import UserFeed
from chatd.actors.hub import SLOW_CONSUMER_CLOSE_CODE, SlowConsumer

DEADLINE_S = 10


def feed(queue_size: int = 16, timeout_s: float = 10.0) -> UserFeed[str]:
    return UserFeed(queue_size=queue_size, slow_consumer_timeout_s=timeout_s)


class Stalled:
    """A subscriber that stops reading after it subscribed, until ``resume`` is set."""

    def __init__(self) -> None:
        self.resume = trio.Event()
        self.done = trio.Event()
        self.batch: list[str] | None = None
        self.error: SlowConsumer | None = None
        self.error_at: float | None = None

    async def run(
        self, feed: UserFeed[str], user_id: UUID, *, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            async with feed.subscribe(user_id) as sub:
                task_status.started()
                await self.resume.wait()
                self.batch = await anext(sub)
        except SlowConsumer as exc:
            self.error = exc
            self.error_at = trio.current_time()
        finally:
            self.done.set()

    async def wait_done(self) -> None:
        with trio.fail_after(DEADLINE_S):
            await self.done.wait()


async def test_each_user_gets_their_own_items_in_order_as_one_batch() -> None:
    items = feed()
    alice, bob = uuid4(), uuid4()
    items.publish(alice, "before")  # nobody watches: gone
    async with (
        items.subscribe(alice) as first,
        items.subscribe(alice) as second,
        items.subscribe(bob) as other,
    ):
        assert (items.stats.subscribers, items.watched_users) == (3, 2)
        items.publish(alice, "a1")
        items.publish(bob, "b1")
        items.publish(alice, "a2")
        items.publish(alice, "a3")
        assert await anext(first) == ["a1", "a2", "a3"]
        assert await anext(second) == ["a1", "a2", "a3"]
        assert await anext(other) == ["b1"]

        items.publish(alice, "a4")
        items.publish(bob, "b2")
        assert await anext(first) == ["a4"]
        assert await anext(second) == ["a4"]
        assert await anext(other) == ["b2"]  # nothing of alice's in between
    assert items.stats.published == 7  # "before" counts too


async def test_a_reader_waiting_wakes_up_on_publish() -> None:
    items = feed()
    alice = uuid4()
    got: list[list[str]] = []
    async with items.subscribe(alice) as sub, trio.open_nursery() as nursery:

        async def read(task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            got.append(await anext(sub))

        await nursery.start(read)
        await trio.testing.wait_all_tasks_blocked()
        items.publish(alice, "x")
    assert got == [["x"]]


async def test_leaving_the_block_unsubscribes_whatever_the_way() -> None:
    items = feed()
    alice = uuid4()
    async with items.subscribe(alice):
        pass
    with pytest.raises(RuntimeError):
        async with items.subscribe(alice):
            raise RuntimeError("the socket went away")
    with trio.CancelScope() as scope:
        async with items.subscribe(alice) as sub:
            scope.cancel()
            await anext(sub)
    assert (items.stats.subscribers, items.stats.subscriptions, items.watched_users) == (0, 3, 0)
    items.publish(alice, "nobody")  # nothing is queued anywhere
    assert items.stats.slow_consumers_dropped == 0


async def test_an_overflowing_subscriber_is_dropped_and_the_others_get_everything() -> None:
    items = feed(queue_size=3)
    alice = uuid4()
    slow = Stalled()
    async with trio.open_nursery() as nursery, items.subscribe(alice) as fast:
        await nursery.start(slow.run, items, alice)
        for i in range(3):
            items.publish(alice, f"i{i}")
        assert items.stats.slow_consumers_dropped == 0
        assert await anext(fast) == ["i0", "i1", "i2"]
        items.publish(alice, "i3")  # the fourth item for a subscriber holding three
        assert items.stats.slow_consumers_dropped == 1
        await slow.wait_done()  # its body was cancelled: it waited on something else
        assert await anext(fast) == ["i3"]
    assert slow.batch is None
    assert slow.error is not None
    assert slow.error.close_code == SLOW_CONSUMER_CLOSE_CODE == 4008
    assert slow.error.reason == "slow consumer: more than 3 items behind"
    assert slow.error.chat_id == alice
    assert (items.stats.subscribers, items.watched_users) == (0, 0)


async def test_a_subscriber_that_does_not_read_for_the_timeout_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    items = feed(queue_size=100, timeout_s=10.0)
    alice = uuid4()
    slow = Stalled()
    async with trio.open_nursery() as nursery, items.subscribe(alice) as reader:
        await nursery.start(slow.run, items, alice)
        start = trio.current_time()
        for i in range(12):  # one a second; the reader keeps up, the stalled one does not
            items.publish(alice, f"i{i}")
            assert await anext(reader) == [f"i{i}"]
            await trio.sleep(1)
        await slow.wait_done()
    assert slow.error is not None
    assert slow.error.reason == "slow consumer: fell behind for 10 s"
    assert slow.error_at is not None
    # Its first item waited from 0 s; the publish at 10 s found it still unread.
    assert slow.error_at - start == pytest.approx(10.0)
    assert items.stats.slow_consumers_dropped == 1


async def test_a_reader_back_late_to_a_quiet_feed_loses_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    items = feed(queue_size=4, timeout_s=10.0)
    alice = uuid4()
    late = Stalled()
    async with trio.open_nursery() as nursery:
        await nursery.start(late.run, items, alice)
        items.publish(alice, "one")
        items.publish(alice, "two")
        await trio.sleep(60)
        late.resume.set()
        await late.wait_done()
    assert late.error is None
    assert late.batch == ["one", "two"]
    assert items.stats.slow_consumers_dropped == 0


async def test_a_dropped_subscriber_asking_for_more_gets_slow_consumer() -> None:
    items = feed(queue_size=1)
    alice = uuid4()

    async def read_after_the_drop() -> None:
        async with items.subscribe(alice) as sub:
            items.publish(alice, "a")
            items.publish(alice, "b")  # dropped here
            await anext(sub)

    with pytest.raises(SlowConsumer):
        await read_after_the_drop()
    assert items.stats.subscribers == 0


def test_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="queue_size"):
        UserFeed[str](queue_size=0, slow_consumer_timeout_s=1.0)
    with pytest.raises(ValueError, match="slow_consumer_timeout_s"):
        UserFeed[str](queue_size=1, slow_consumer_timeout_s=0.0)


async def test_published_items_go_to_the_relay_after_local_delivery_and_delivered_ones_do_not() -> (
    None
):
    items = feed()
    alice, bob = uuid4(), uuid4()
    relayed: list[tuple[UUID, str, list[str]]] = []
    async with items.subscribe(alice) as sub:
        # The relay sees the item already queued for local subscribers.
        items.relay = lambda user, item: relayed.append((user, item, list(sub._queue)))
        assert (items.is_watched(alice), items.is_watched(bob)) == (True, False)
        assert items.watched() == [alice]
        items.publish(alice, "here")
        items.publish(bob, "unwatched here")
        items.deliver(alice, "from another worker")
        with trio.fail_after(DEADLINE_S):
            assert await anext(sub) == ["here", "from another worker"]
    assert relayed == [(alice, "here", ["here"]), (bob, "unwatched here", ["here"])]
    assert (items.stats.published, items.stats.received) == (2, 1)
    assert not items.is_watched(alice)
