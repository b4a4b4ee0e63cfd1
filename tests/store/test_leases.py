"""Shard leases and fencing: a deposed worker can never write.

Expiry is simulated by moving ``expires_at`` with SQL, never by waiting. Where ordering between
transactions matters, the asyncio-side code pauses on a ``Gate`` opened by the trio test, and the
test waits for PostgreSQL to report who blocks whom (``pg_blocking_pids``) under a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from datetime import datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest
import trio

from chatd.store import cluster
from chatd.store.chats import (
    Committed,
    CreateChat,
    UpdateChat,
    apply_writes,
    commit,
    get_chat,
)
from chatd.store.database import Connection, Database
from chatd.store.errors import Fenced
from chatd.store.leases import (
    Fence,
    acquire_shards,
    check_fence,
    list_leases,
    reclaim_leases,
    release_leases,
    renew_leases,
)
from tests.store.helpers import LEASE_TTL_S, lease, make_chat, make_user

DEADLINE_S = 10


class Gate:
    """Opened from trio, awaited on the asyncio thread."""

    def __init__(self) -> None:
        self._future: concurrent.futures.Future[None] = concurrent.futures.Future()

    def open(self) -> None:
        self._future.set_result(None)

    async def wait(self) -> None:
        await asyncio.wrap_future(self._future)


class Signal:
    """Set from the asyncio thread (with a value), awaited in trio."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self.value: Any = None

    def set(self, value: Any = None) -> None:
        def deliver() -> None:
            self.value = value
            self._event.set()

        self._token.run_sync_soon(deliver)

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> Any:
        with trio.fail_after(DEADLINE_S):
            await self._event.wait()
        return self.value


async def wait_until_blocked_by(db: Database, pid: int) -> None:
    """Until some backend waits for a lock held by backend ``pid``."""
    with trio.fail_after(DEADLINE_S):
        while not await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid)))",
            pid,
        ):
            pass


async def expire(db: Database, shard: int) -> None:
    await db.execute(
        "UPDATE shard_leases SET expires_at = now() - interval '1 second' WHERE shard = $1", shard
    )


async def db_now(db: Database) -> datetime:
    now: datetime = await db.fetchval("SELECT now()")
    return now


# -- acquiring, renewing, releasing --------------------------------------------------------


async def test_acquire_free_shards_round_trip(db: Database) -> None:
    before = await db_now(db)
    fences = await acquire_shards(db, "worker-a", [3, 1, 2, 1], LEASE_TTL_S)
    assert fences == [Fence(1, 1, "worker-a"), Fence(2, 1, "worker-a"), Fence(3, 1, "worker-a")]
    leases = await list_leases(db)
    assert [(row.shard, row.worker_id, row.epoch) for row in leases] == [
        (1, "worker-a", 1),
        (2, "worker-a", 1),
        (3, "worker-a", 1),
    ]
    for row in leases:
        assert before + timedelta(seconds=LEASE_TTL_S) <= row.expires_at
        assert row.expires_at <= await db_now(db) + timedelta(seconds=LEASE_TTL_S)


async def test_acquire_nothing(db: Database) -> None:
    assert await acquire_shards(db, "worker-a", [], LEASE_TTL_S) == []


async def test_reacquiring_a_live_lease_of_ours_keeps_its_epoch(db: Database) -> None:
    [first] = await acquire_shards(db, "worker-a", [0], 5)
    [before] = await list_leases(db)
    [again] = await acquire_shards(db, "worker-a", [0], LEASE_TTL_S)
    [after] = await list_leases(db)
    assert again == first
    assert after.expires_at > before.expires_at


async def test_a_live_lease_of_another_worker_is_not_taken(db: Database) -> None:
    assert len(await acquire_shards(db, "worker-a", [0, 1], LEASE_TTL_S)) == 2
    assert await acquire_shards(db, "worker-b", [0, 1, 2], LEASE_TTL_S) == [Fence(2, 1, "worker-b")]
    assert [(row.shard, row.worker_id) for row in await list_leases(db)] == [
        (0, "worker-a"),
        (1, "worker-a"),
        (2, "worker-b"),
    ]


async def test_an_expired_lease_is_taken_over_with_a_new_epoch(db: Database) -> None:
    fence_a = await lease(db, 0, "worker-a")
    await expire(db, 0)
    [fence_b] = await acquire_shards(db, "worker-b", [0], LEASE_TTL_S)
    assert fence_b == Fence(0, fence_a.epoch + 1, "worker-b")
    # The old owner coming back finds it taken.
    assert await acquire_shards(db, "worker-a", [0], LEASE_TTL_S) == []


async def test_our_own_expired_lease_is_retaken_with_a_new_epoch(db: Database) -> None:
    fence = await lease(db, 0, "worker-a")
    await expire(db, 0)
    assert await acquire_shards(db, "worker-a", [0], LEASE_TTL_S) == [
        Fence(0, fence.epoch + 1, "worker-a")
    ]


async def test_renew_extends_only_live_leases_still_held(db: Database) -> None:
    fences = await acquire_shards(db, "worker-a", [0, 1, 2], 5)
    await expire(db, 1)  # lapsed, nobody took it
    await expire(db, 2)
    await acquire_shards(db, "worker-b", [2], LEASE_TTL_S)  # lapsed and taken
    before = {row.shard: row.expires_at for row in await list_leases(db)}

    held = await renew_leases(db, "worker-a", fences, LEASE_TTL_S)

    assert held == [fences[0]]
    after = {row.shard: row.expires_at for row in await list_leases(db)}
    assert after[0] > before[0]
    assert after[1] == before[1]
    assert after[2] == before[2]


async def test_renew_refuses_another_workers_fence(db: Database) -> None:
    fence = await lease(db, 0, "worker-a")
    with pytest.raises(ValueError, match="worker-a"):
        await renew_leases(db, "worker-b", [fence], LEASE_TTL_S)


@pytest.mark.parametrize("ttl_s", [0, -1.0])
async def test_ttl_must_be_positive(db: Database, ttl_s: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        await acquire_shards(db, "worker-a", [0], ttl_s)
    assert await list_leases(db) == []


async def test_release_lets_another_worker_take_over_at_once(db: Database) -> None:
    fence_a = await lease(db, 0, "worker-a")
    other = await lease(db, 1, "worker-a")
    await release_leases(db, "worker-a", [fence_a])
    assert await acquire_shards(db, "worker-b", [0, 1], LEASE_TTL_S) == [
        Fence(0, fence_a.epoch + 1, "worker-b")
    ]
    assert await renew_leases(db, "worker-a", [fence_a, other], LEASE_TTL_S) == [other]


async def test_reclaim_takes_our_live_leases_back_under_a_new_epoch(db: Database) -> None:
    """A restarted worker (same identity) takes its leases back at once, and the writes of its
    dead incarnation stay fenced."""
    user = await make_user(db)
    old = await lease(db, 0, "worker-a")
    also_old = await lease(db, 1, "worker-a")
    theirs = await lease(db, 2, "worker-b")
    lapsed = await lease(db, 3, "worker-a")
    chat = await make_chat(db, old, user.id, title="before")
    await expire(db, 3)

    reclaimed = await reclaim_leases(db, "worker-a", LEASE_TTL_S)

    assert reclaimed == [
        Fence(0, old.epoch + 1, "worker-a"),
        Fence(1, also_old.epoch + 1, "worker-a"),
    ]
    with pytest.raises(Fenced):
        await commit(db, old, chat.id, [UpdateChat(title="by the dead incarnation")])
    committed = await commit(db, reclaimed[0], chat.id, [UpdateChat(title="by the new one")])
    assert committed.chat.title == "by the new one"
    # Held live: renewing keeps the new epoch; another worker's lease and a lapsed one are
    # untouched (the lapsed one is taken again the usual way, by acquire_shards).
    assert await renew_leases(db, "worker-a", reclaimed, LEASE_TTL_S) == reclaimed
    assert await renew_leases(db, "worker-b", [theirs], LEASE_TTL_S) == [theirs]
    assert await acquire_shards(db, "worker-a", [3], LEASE_TTL_S) == [
        Fence(3, lapsed.epoch + 1, "worker-a")
    ]
    assert await reclaim_leases(db, "worker-c", LEASE_TTL_S) == []


async def test_reclaim_waits_for_a_write_of_the_old_incarnation_in_flight(db: Database) -> None:
    """The epoch bump waits for a transaction that passed the old fence: that write lands
    before the new epoch, and none of the old epoch can land after it."""
    user = await make_user(db)
    fence = await lease(db, 0, "worker-a")
    chat = await make_chat(db, fence, user.id, title="before")
    checked, reclaimed = Signal(), Signal()
    may_commit = Gate()

    async def dead_incarnation(conn: Connection) -> Committed:
        done = await apply_writes(
            conn, fence=fence, chat_id=chat.id, writes=[UpdateChat(title="in flight")]
        )
        checked.set(await conn.fetchval("SELECT pg_backend_pid()"))
        await may_commit.wait()
        return done

    async def restarted() -> None:
        reclaimed.set(await reclaim_leases(db, "worker-a", LEASE_TTL_S))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(db.transaction, dead_incarnation)
        pid: int = await checked.wait()
        nursery.start_soon(restarted)
        await wait_until_blocked_by(db, pid)
        assert not reclaimed.is_set()
        may_commit.open()
        fences: list[Fence] = await reclaimed.wait()

    assert fences == [Fence(0, fence.epoch + 1, "worker-a")]
    stored = await get_chat(db, chat.id)
    assert stored is not None
    assert stored.title == "in flight"
    with pytest.raises(Fenced):
        await commit(db, fence, chat.id, [UpdateChat(title="too late")])


async def test_concurrent_acquirers_split_the_shards(db: Database) -> None:
    results: dict[str, list[Fence]] = {}

    async def take(worker_id: str) -> None:
        results[worker_id] = await acquire_shards(db, worker_id, range(16), LEASE_TTL_S)

    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            for worker_id in ("worker-a", "worker-b", "worker-c"):
                nursery.start_soon(take, worker_id)

    taken = [fence.shard for fences in results.values() for fence in fences]
    assert sorted(taken) == list(range(16))
    assert all(fence.epoch == 1 for fences in results.values() for fence in fences)


# -- fencing -------------------------------------------------------------------------------


async def test_a_stale_epoch_is_fenced_and_writes_nothing(db: Database) -> None:
    user = await make_user(db)
    fence = await lease(db, 0, "worker-a")
    chat = await make_chat(db, fence, user.id, title="before")
    for stale in (
        Fence(0, fence.epoch + 1, "worker-a"),
        Fence(0, fence.epoch, "worker-b"),
        Fence(7, fence.epoch, "worker-a"),
    ):
        with pytest.raises(Fenced) as caught:
            await commit(db, stale, chat.id, [UpdateChat(title="after")])
        assert (caught.value.shard, caught.value.epoch) == (stale.shard, stale.epoch)
    assert await get_chat(db, chat.id) == chat


async def test_an_expired_lease_is_fenced_even_before_a_takeover(db: Database) -> None:
    user = await make_user(db)
    fence = await lease(db, 0, "worker-a")
    chat = await make_chat(db, fence, user.id)
    await expire(db, 0)
    with pytest.raises(Fenced):
        await commit(db, fence, chat.id, [UpdateChat(title="late")])
    with pytest.raises(Fenced):
        await commit(db, fence, None, [CreateChat(id=uuid4(), owner_id=user.id, shard=0)])
    assert await get_chat(db, chat.id) == chat
    assert await db.fetchval("SELECT count(*) FROM chats") == 1


async def test_after_a_takeover_the_old_fence_fails_and_the_new_one_writes(db: Database) -> None:
    user = await make_user(db)
    fence_a = await lease(db, 0, "worker-a")
    chat = await make_chat(db, fence_a, user.id)
    await expire(db, 0)
    [fence_b] = await acquire_shards(db, "worker-b", [0], LEASE_TTL_S)

    with pytest.raises(Fenced):
        await commit(db, fence_a, chat.id, [UpdateChat(title="by a")])
    committed = await commit(db, fence_b, chat.id, [UpdateChat(title="by b")])
    assert committed.chat.title == "by b"
    # The deposed worker cannot take its epoch back by "renewing".
    assert await renew_leases(db, "worker-a", [fence_a], LEASE_TTL_S) == []


async def test_a_takeover_waits_for_a_fenced_transaction_in_flight(db: Database) -> None:
    """FOR SHARE on the lease row: a write that passed its fence check lands before the takeover."""
    user = await make_user(db)
    fence_a = await lease(db, 0, "worker-a")
    chat = await make_chat(db, fence_a, user.id, title="before")

    began, checked, took_over = Signal(), Signal(), Signal()
    lease_moved, may_commit = Gate(), Gate()

    async def worker_a(conn: Connection) -> Committed:
        began.set(await conn.fetchval("SELECT now()"))  # this transaction's database time
        await lease_moved.wait()
        done = await apply_writes(
            conn, fence=fence_a, chat_id=chat.id, writes=[UpdateChat(title="by a")]
        )
        checked.set(await conn.fetchval("SELECT pg_backend_pid()"))
        await may_commit.wait()
        return done

    async def worker_b() -> None:
        took_over.set(await acquire_shards(db, "worker-b", [0], LEASE_TTL_S))

    results: list[Committed] = []

    async def run_a() -> None:
        results.append(await db.transaction(worker_a))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_a)
        began_at: datetime = await began.wait()
        # The lease runs out just after A's transaction began: A's check (at A's now()) still
        # passes, while any later transaction finds the lease expired.
        await db.execute(
            "UPDATE shard_leases SET expires_at = $1::timestamptz + interval '1 microsecond'"
            " WHERE shard = 0",
            began_at,
        )
        lease_moved.open()
        pid_a: int = await checked.wait()

        nursery.start_soon(worker_b)
        await wait_until_blocked_by(db, pid_a)
        assert not took_over.is_set()
        assert (await get_chat(db, chat.id)) == chat  # A's write is not visible yet

        may_commit.open()
        fences_b: list[Fence] = await took_over.wait()

    assert fences_b == [Fence(0, fence_a.epoch + 1, "worker-b")]
    [committed] = results
    assert committed.chat.title == "by a"
    assert (await get_chat(db, chat.id)) == committed.chat
    with pytest.raises(Fenced):
        await commit(db, fence_a, chat.id, [UpdateChat(title="by a again")])


async def test_a_write_waiting_on_a_takeover_is_fenced_once_it_commits(db: Database) -> None:
    """The other order: the takeover holds the lease row; A's check waits, then sees the new
    epoch. A's transaction began while its lease was live, so only the epoch can fence it."""
    user = await make_user(db)
    fence_a = await lease(db, 0, "worker-a")
    chat = await make_chat(db, fence_a, user.id, title="before")

    a_began, b_updated, a_failed = Signal(), Signal(), Signal()
    a_may_check, b_may_commit = Gate(), Gate()

    async def worker_a(conn: Connection) -> None:
        a_began.set(await conn.fetchval("SELECT now()"))
        await a_may_check.wait()
        await apply_writes(conn, fence=fence_a, chat_id=chat.id, writes=[UpdateChat(title="a")])

    async def worker_b(conn: Connection) -> None:
        epoch = await conn.fetchval(
            "UPDATE shard_leases SET worker_id = 'worker-b', epoch = epoch + 1,"
            " expires_at = now() + interval '1 minute'"
            " WHERE shard = 0 AND expires_at <= now() RETURNING epoch"
        )
        b_updated.set((epoch, await conn.fetchval("SELECT pg_backend_pid()")))
        await b_may_commit.wait()

    async def run_a() -> None:
        try:
            await db.transaction(worker_a)
        except Fenced as exc:
            a_failed.set(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_a)
        began_at: datetime = await a_began.wait()
        await db.execute(
            "UPDATE shard_leases SET expires_at = $1::timestamptz + interval '1 microsecond'"
            " WHERE shard = 0",
            began_at,
        )
        nursery.start_soon(db.transaction, worker_b)
        epoch_b, pid_b = await b_updated.wait()
        assert epoch_b == fence_a.epoch + 1

        a_may_check.open()
        await wait_until_blocked_by(db, pid_b)
        b_may_commit.open()
        fenced: Fenced = await a_failed.wait()

    assert (fenced.shard, fenced.epoch) == (0, fence_a.epoch)
    assert await get_chat(db, chat.id) == chat


async def test_check_fence_alone(db: Database) -> None:
    fence = await lease(db, 0, "worker-a")

    async def check(conn: Connection, f: Fence) -> bool:
        await check_fence(conn, f)
        return True

    assert await db.transaction(lambda conn: check(conn, fence))
    with pytest.raises(Fenced):
        await db.transaction(lambda conn: check(conn, Fence(0, fence.epoch, "worker-z")))


# -- one worker's lease check among several (chatd.store.cluster) -------------------------------


async def test_a_check_in_renews_the_worker_row_with_its_leases_and_takes_what_it_chooses(
    db: Database,
) -> None:
    await cluster.heartbeat(db, "worker-b", "", 60)
    await acquire_shards(db, "worker-b", [0], 60)
    [old] = await acquire_shards(db, "worker-c", [1], 60)  # worker-c died: no row, lease lapsed
    await db.execute("UPDATE shard_leases SET expires_at = now() WHERE shard = 1")
    [mine] = await acquire_shards(db, "worker-a", [2], 60)
    seen: list[cluster.LeaseView] = []

    def choose(view: cluster.LeaseView) -> set[int]:
        seen.append(view)
        return {1, 2, 3}

    result = await cluster.check_in(
        db, "worker-a", link_url="http://127.0.0.1:7001", ttl_s=30, choose=choose
    )
    [view] = seen
    assert view.live_workers == ("worker-a", "worker-b")
    assert view.mine == {2}
    assert view.others == {0: "worker-b"}
    assert view.free(4) == {1, 3}
    assert view.next_expiry_s is not None
    assert 50 < view.next_expiry_s <= 60  # worker-b's row and lease
    assert result.view == view
    assert result.fences == [
        Fence(1, old.epoch + 1, "worker-a"),
        Fence(2, mine.epoch, "worker-a"),  # renewed: same epoch
        Fence(3, 1, "worker-a"),
    ]
    # The row and the leases expire together (same statement time, same ttl).
    rows = await db.fetch(
        "SELECT DISTINCT expires_at FROM shard_leases WHERE worker_id = 'worker-a'"
        " UNION SELECT expires_at FROM workers WHERE worker_id = 'worker-a'"
    )
    assert len(rows) == 1
    assert cluster.Worker("worker-a", "http://127.0.0.1:7001") in await cluster.live_workers(db)


async def test_a_check_in_lets_the_leases_it_does_not_choose_lapse(db: Database) -> None:
    await acquire_shards(db, "worker-a", [0, 1], 60)
    result = await cluster.check_in(db, "worker-a", link_url="", ttl_s=1, choose=lambda view: {0})
    assert [f.shard for f in result.fences] == [0]
    leases = {lease.shard: lease.expires_at for lease in await list_leases(db)}
    assert leases[1] > leases[0]  # shard 1 kept its old (60 s) expiry: not renewed


async def test_joining_handing_back_and_leaving_are_announced_once_committed(
    db: Database,
) -> None:
    async with db.listen(cluster.SHARDS_CHANNEL) as events:
        result = await cluster.check_in(
            db, "worker-a", link_url="", ttl_s=60, choose=lambda view: {0, 1, 2}, announce=True
        )
        with trio.fail_after(DEADLINE_S):
            assert (await events.receive()).payload == "worker-a"  # type: ignore[union-attr]
        [f0, f1, f2] = result.fences
        await cluster.hand_back(db, "worker-a", [f2])
        with trio.fail_after(DEADLINE_S):
            assert (await events.receive()).payload == "worker-a"  # type: ignore[union-attr]
        assert [f.shard for f in await acquire_shards(db, "worker-b", [2], 60)] == [2]

        await cluster.leave(db, "worker-a", [f0, f1])
        with trio.fail_after(DEADLINE_S):
            assert (await events.receive()).payload == "worker-a"  # type: ignore[union-attr]
    assert await cluster.live_workers(db) == []
    taken = await acquire_shards(db, "worker-b", [0, 1], 60)
    assert [(f.shard, f.epoch) for f in taken] == [(0, 2), (1, 2)]
    with pytest.raises(ValueError, match="belongs to"):
        await cluster.hand_back(db, "worker-a", taken)
