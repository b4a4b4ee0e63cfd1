"""The Supervisor and Router with toy actors, against real PostgreSQL for the shard leases.

Lease expiry and takeover are simulated with SQL and ``request_lease_check()``, never by waiting
out a ttl; other waits are on the Supervisor's own change notifications under a deadline, and
idle and restart windows run on trio's MockClock (``autojump_clock``). In MockClock tests the
lease ttl is far longer than the mock time the test spans, so no lease check (a database wait
the clock could jump across) falls inside them.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID, uuid4

import pytest
import trio
import trio.testing

from chatd.actors.behavior import ActorContext
from chatd.actors.errors import ActorDead, MailboxFull, NotOwner
from chatd.actors.router import Router
from chatd.actors.supervisor import Supervisor
from chatd.domain.chat_status import ChatStatus
from chatd.domain.sharding import shard_of
from chatd.store.chats import CreateChat, UpdateChat, commit
from chatd.store.database import Database, DatabaseUnavailable
from chatd.store.leases import Fence, acquire_shards, list_leases
from tests.actors.toy import (
    Add,
    Block,
    Boom,
    Crash,
    Get,
    RaiseFenced,
    Registry,
    SetBusy,
    SpawnChild,
    Toy,
    start_ask,
)
from tests.faults.proxy import open_pg_proxy
from tests.store.helpers import make_user

SHARDS = 4
DEADLINE_S = 10
# Under an autojump clock any pending deadline is reached as soon as trio waits on the database:
# no lease check falls within a MockClock test, and releasing the leases has no deadline.
MOCK_CLOCK_OPTIONS: dict[str, Any] = {"lease_ttl_s": 3000, "release_timeout_s": math.inf}


def chat_on(shard: int) -> UUID:
    while True:
        chat_id = uuid4()
        if shard_of(chat_id, SHARDS) == shard:
            return chat_id


@dataclass
class Harness:
    supervisor: Supervisor
    router: Router
    nursery: trio.Nursery
    registry: Registry
    parked: list[tuple[UUID, Fence, BaseException]] = field(default_factory=list)
    park_gate: trio.Event | None = None

    async def until(self, predicate: Callable[[], bool], deadline_s: float = DEADLINE_S) -> None:
        with trio.fail_after(deadline_s):
            await self.supervisor.wait_until(predicate)


@asynccontextmanager
async def supervising(
    db: Database,
    *,
    worker_id: str = "worker-a",
    park_gate: trio.Event | None = None,
    registry: Registry | None = None,
    park_outages: int = 0,
    **options: Any,
) -> AsyncIterator[Harness]:
    registry = Registry() if registry is None else registry
    parked: list[tuple[UUID, Fence, BaseException]] = []

    async def park(chat_id: UUID, fence: Fence, error: BaseException) -> None:
        parked.append((chat_id, fence, error))
        if park_gate is not None:
            await park_gate.wait()
        if len(parked) <= park_outages:  # the park hook's write meets a database outage
            raise DatabaseUnavailable("cannot reach PostgreSQL (test)")

    options.setdefault("lease_ttl_s", 30.0)
    supervisor = Supervisor(db, worker_id, registry.factory, park, shard_count=SHARDS, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        yield Harness(supervisor, Router(supervisor), nursery, registry, parked, park_gate)
        supervisor.shutdown()


async def live_leases(db: Database) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM shard_leases WHERE expires_at > now()")
    return count


# -- activation and routing ------------------------------------------------------------------


async def test_first_message_activates_one_actor_and_later_ones_reuse_it(db: Database) -> None:
    async with supervising(db) as h:
        chat = chat_on(1)
        assert not h.registry.incarnations
        asks = [await start_ask(h.nursery, partial(h.router.ask, chat, Add(1))) for _ in range(10)]
        with trio.fail_after(DEADLINE_S):
            for outcome in asks:
                await outcome.done.wait()
        assert [o.value for o in asks] == list(range(1, 11))
        h.router.tell(chat, Add(5))
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(chat, Get()) == 15
        assert len(h.registry.incarnations[chat]) == 1
        assert h.supervisor.stats.activations == 1
        assert h.supervisor.active_actors == 1
        assert h.registry.latest(chat).ctx.fence == h.supervisor.fences[1]
        metrics = h.supervisor.metrics()
        assert metrics["active_actors"] == 1
        assert metrics["owned_shards"] == SHARDS
        assert metrics["activations"] == 1


async def test_a_single_worker_takes_every_shard(db: Database) -> None:
    async with supervising(db) as h:
        assert sorted(h.supervisor.fences) == list(range(SHARDS))
        leases = await list_leases(db)
        assert [(lease.shard, lease.worker_id, lease.epoch) for lease in leases] == [
            (s, "worker-a", 1) for s in range(SHARDS)
        ]


class FakePeers:
    def __init__(self) -> None:
        self.asked: list[tuple[UUID, object]] = []
        self.told: list[tuple[UUID, object]] = []

    async def ask(self, chat_id: UUID, message: object, *, timeout_s: float | None) -> object:
        await trio.lowlevel.checkpoint()
        self.asked.append((chat_id, message))
        return "from a peer"

    def tell(self, chat_id: UUID, message: object) -> None:
        self.told.append((chat_id, message))


async def test_the_router_refuses_or_forwards_chats_of_shards_held_elsewhere(
    db: Database,
) -> None:
    async with supervising(db, shards=[0, 1]) as h:
        local, remote = chat_on(0), chat_on(2)
        with pytest.raises(NotOwner) as caught:
            await h.router.ask(remote, Get())
        assert caught.value.shard == 2
        with pytest.raises(NotOwner):
            h.router.tell(remote, Get())

        peers = FakePeers()
        router = Router(h.supervisor, peers=peers)
        with trio.fail_after(DEADLINE_S):
            assert await router.ask(remote, Get()) == "from a peer"
            router.tell(remote, Add(1))
            assert await router.ask(local, Add(2)) == 2
        assert peers.asked == [(remote, Get())]
        assert peers.told == [(remote, Add(1))]
        assert remote not in h.registry.incarnations


async def test_a_full_mailbox_refuses_at_once(db: Database) -> None:
    async with supervising(db, mailbox_capacity=1) as h:
        chat = chat_on(0)
        block = Block()
        in_flight = await start_ask(h.nursery, partial(h.router.ask, chat, block))
        with trio.fail_after(DEADLINE_S):
            await block.entered.wait()
        h.router.tell(chat, Add(1))
        assert h.supervisor.mailbox_depth == 1
        with pytest.raises(MailboxFull):
            h.router.tell(chat, Add(1))
        with pytest.raises(MailboxFull):
            await h.router.ask(chat, Get())
        block.release.set()
        with trio.fail_after(DEADLINE_S):
            await in_flight.done.wait()
            assert await h.router.ask(chat, Get()) == 1


# -- crashes, restarts and parking ------------------------------------------------------------


async def test_a_crashed_actor_restarts_with_fresh_state(db: Database) -> None:
    async with supervising(db) as h:
        chat = chat_on(2)
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(chat, Add(5)) == 5
            with pytest.raises(ActorDead):
                await h.router.ask(chat, Crash())
        await h.until(lambda: h.supervisor.stats.restarts == 1)
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(chat, Get()) == 0
        assert len(h.registry.incarnations[chat]) == 2
        assert h.supervisor.stats.crashes == 1
        assert h.supervisor.stats.activations == 1  # a restart is not an activation
        assert not h.parked


async def test_a_crashing_child_task_restarts_the_actor(db: Database) -> None:
    async with supervising(db) as h:
        chat = chat_on(3)
        spawn = SpawnChild(crash=True)
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(chat, Add(2)) == 2
            assert await h.router.ask(chat, spawn) == "spawned"
        spawn.release.set()
        await h.until(lambda: h.supervisor.stats.restarts == 1)
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(chat, Get()) == 0
        assert len(h.registry.incarnations[chat]) == 2


async def test_past_the_restart_budget_the_chat_is_parked_once_and_others_live_on(
    db: Database,
) -> None:
    gate = trio.Event()
    async with supervising(db, restart_limit=2, park_gate=gate) as h:
        sup = h.supervisor
        chat, other = chat_on(0), chat_on(0)
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(other, Add(7)) == 7
        for crash in range(1, 4):
            with trio.fail_after(DEADLINE_S), pytest.raises(ActorDead):
                await h.router.ask(chat, Crash())
            await h.until(lambda n=crash: sup.stats.crashes == n)  # type: ignore[misc]
        assert sup.stats.restarts == 2
        await h.until(lambda: len(h.parked) == 1)
        assert sup.stats.parked == 0  # counted once the hook is done

        # While the park hook runs, the chat refuses messages at once.
        with pytest.raises(ActorDead, match="parked"):
            await h.router.ask(chat, Get())
        gate.set()
        await h.until(lambda: sup.stats.parked == 1)
        assert sup.active_actors == 1

        [(parked_chat, fence, error)] = h.parked
        assert parked_chat == chat
        assert fence == sup.fences[0]
        assert isinstance(error, Boom)
        assert len(h.registry.incarnations[chat]) == 3
        # The other chat of the same shard kept its actor and its state.
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(other, Get()) == 7
        assert len(h.registry.incarnations[other]) == 1

        # The next message starts the parked chat afresh, with a fresh budget.
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(chat, Add(1)) == 1
            with pytest.raises(ActorDead):
                await h.router.ask(chat, Crash())
        await h.until(lambda: sup.stats.restarts == 3)
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(chat, Get()) == 0
        assert len(h.parked) == 1
        assert sup.stats.activations == 3  # other, chat, chat again


async def test_crashes_outside_the_restart_window_do_not_add_up(
    db: Database, autojump_clock: trio.testing.MockClock
) -> None:
    async with supervising(db, restart_limit=1, restart_window_s=10, **MOCK_CLOCK_OPTIONS) as h:
        sup = h.supervisor
        chat = chat_on(1)
        for crash in range(1, 4):
            await trio.sleep(11)
            with pytest.raises(ActorDead):
                await h.router.ask(chat, Crash())
            await h.until(lambda n=crash: sup.stats.restarts == n)  # type: ignore[misc]
        assert not h.parked
        # Two crashes within 10 s exceed a budget of one restart.
        await trio.sleep(9)
        with pytest.raises(ActorDead):
            await h.router.ask(chat, Crash())
        await h.until(lambda: sup.stats.parked == 1)
        assert len(h.parked) == 1
        assert sup.stats.restarts == 3


async def test_a_failing_start_counts_as_a_crash(db: Database) -> None:
    async with supervising(db, restart_limit=1) as h:
        chat = chat_on(2)
        h.registry.fail_start.add(chat)
        with trio.fail_after(DEADLINE_S), pytest.raises(ActorDead):
            await h.router.ask(chat, Get())
        await h.until(lambda: h.supervisor.stats.parked == 1)
        assert len(h.parked) == 1
        assert len(h.registry.incarnations[chat]) == 2
        h.registry.fail_start.clear()
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(chat, Get()) == 0


async def test_a_fenced_actor_is_not_restarted_and_the_leases_are_rechecked(
    db: Database,
) -> None:
    async with supervising(db) as h:
        sup = h.supervisor
        chat = chat_on(3)
        renewals = sup.stats.lease_renewals
        with trio.fail_after(DEADLINE_S), pytest.raises(ActorDead):
            await h.router.ask(chat, RaiseFenced())
        await h.until(lambda: sup.stats.lease_renewals > renewals and sup.active_actors == 0)
        assert sup.stats.crashes == 1
        assert sup.stats.restarts == 0
        assert not h.parked
        # The lease was in fact fine: the chat is served again.
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(chat, Add(1)) == 1
        assert sup.stats.activations == 2


# -- passivation -------------------------------------------------------------------------------


async def test_idle_actors_passivate_and_reactivate_on_the_next_message(
    db: Database, autojump_clock: trio.testing.MockClock
) -> None:
    async with supervising(db, idle_timeout_s=10, **MOCK_CLOCK_OPTIONS) as h:
        sup = h.supervisor
        idle, busy = chat_on(0), chat_on(1)
        assert await h.router.ask(idle, Add(3)) == 3
        assert await h.router.ask(busy, SetBusy(True)) is True
        await trio.sleep(11)
        await h.until(lambda: sup.stats.passivations == 1)
        assert sup.active_actors == 1
        assert sup.behavior(idle) is None
        assert sup.behavior(busy) is h.registry.latest(busy)

        # Not passivatable: it stays, however long it idles.
        await trio.sleep(100)
        assert sup.stats.passivations == 1
        assert len(h.registry.incarnations[busy]) == 1

        # The next message reactivates the passivated chat (state reloaded: the toy starts at 0).
        assert await h.router.ask(idle, Get()) == 0
        assert len(h.registry.incarnations[idle]) == 2
        assert sup.stats.activations == 3
        assert sup.active_actors == 2


# -- leases ----------------------------------------------------------------------------------


async def test_renewal_keeps_the_epoch_and_extends_the_lease(db: Database) -> None:
    async with supervising(db, lease_ttl_s=0.3) as h:
        sup = h.supervisor
        chat = chat_on(0)
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(chat, Add(1)) == 1
        before = {lease.shard: lease for lease in await list_leases(db)}
        fences = sup.fences
        await h.until(lambda: sup.stats.lease_renewals >= 4)
        after = {lease.shard: lease for lease in await list_leases(db)}
        assert sup.fences == fences
        for shard in range(SHARDS):
            assert after[shard].epoch == before[shard].epoch == 1
            assert after[shard].worker_id == "worker-a"
            assert after[shard].expires_at > before[shard].expires_at
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(chat, Get()) == 1
        assert len(h.registry.incarnations[chat]) == 1
        assert sup.stats.shards_lost == 0


async def test_a_lost_lease_stops_the_actors_of_that_shard_only(db: Database) -> None:
    async with supervising(db) as h:
        sup = h.supervisor
        lost, kept = chat_on(1), chat_on(2)
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(kept, Add(4)) == 4
        block = Block()
        in_flight = await start_ask(h.nursery, partial(h.router.ask, lost, block))
        with trio.fail_after(DEADLINE_S):
            await block.entered.wait()
        queued = await start_ask(h.nursery, partial(h.router.ask, lost, Get()))

        # Another worker takes shard 1 over, as if our lease had expired unnoticed.
        await db.execute(
            "UPDATE shard_leases SET worker_id = 'worker-b', epoch = epoch + 1,"
            " expires_at = now() + interval '60 seconds' WHERE shard = 1"
        )
        sup.request_lease_check()
        await h.until(lambda: 1 not in sup.fences)
        with trio.fail_after(DEADLINE_S):
            await in_flight.done.wait()
            await queued.done.wait()
        assert isinstance(in_flight.error, ActorDead)
        assert isinstance(queued.error, ActorDead)
        with pytest.raises(NotOwner):
            await h.router.ask(lost, Get())
        assert sorted(sup.fences) == [0, 2, 3]
        assert sup.stats.shards_lost == 1
        assert sup.stats.stopped == 1
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(kept, Get()) == 4
        assert len(h.registry.incarnations[kept]) == 1


async def test_an_expired_lease_retaken_under_a_new_epoch_restarts_its_actors(
    db: Database,
) -> None:
    async with supervising(db) as h:
        sup = h.supervisor
        chat = chat_on(3)
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(chat, Add(4)) == 4
        await db.execute("UPDATE shard_leases SET expires_at = now() WHERE shard = 3")
        sup.request_lease_check()
        await h.until(lambda: sup.fences[3].epoch == 2)
        # The old incarnation ran under epoch 1; the next message gets one under epoch 2.
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(chat, Get()) == 0
        assert h.registry.latest(chat).ctx.fence.epoch == 2
        assert [lease.epoch for lease in await list_leases(db)] == [1, 1, 1, 2]


async def _make_chat(db: Database, fence: Fence, owner: UUID, status: ChatStatus) -> UUID:
    chat_id = chat_on(fence.shard)
    update = UpdateChat(status=status)
    if status is ChatStatus.REQUIRES_ACTION:
        update = UpdateChat(status=status, action_deadline=datetime.now(UTC) + timedelta(hours=1))
    elif status is ChatStatus.ERROR:
        update = UpdateChat(status=status, last_error={"kind": "generic"})
    create = CreateChat(id=chat_id, owner_id=owner, shard=fence.shard)
    await commit(db, fence, None, [create, update])
    return chat_id


async def test_on_start_every_unfinished_chat_of_its_shards_is_resumed(db: Database) -> None:
    owner = (await make_user(db)).id
    fences = await acquire_shards(db, "worker-a", range(SHARDS), 60)
    resumable = {
        await _make_chat(db, fences[0], owner, ChatStatus.RUNNING),
        await _make_chat(db, fences[1], owner, ChatStatus.INTERRUPTING),
        await _make_chat(db, fences[3], owner, ChatStatus.REQUIRES_ACTION),
    }
    for status in (ChatStatus.WAITING, ChatStatus.ERROR):
        await _make_chat(db, fences[2], owner, status)

    async with supervising(db) as h:
        sup = h.supervisor
        assert sup.fences == {f.shard: f for f in fences}  # same worker: same epochs
        assert sup.stats.resumed == 3
        assert sup.active_actors == 3
        with trio.fail_after(DEADLINE_S):
            for chat in resumable:
                assert await h.router.ask(chat, Get()) == 0
        assert set(h.registry.incarnations) == resumable
        assert all(h.registry.latest(chat).started for chat in resumable)


async def test_shards_of_a_dead_worker_are_taken_over_and_their_chats_resumed(
    db: Database,
) -> None:
    owner = (await make_user(db)).id
    theirs = await acquire_shards(db, "worker-b", range(SHARDS), 60)
    running = await _make_chat(db, theirs[2], owner, ChatStatus.RUNNING)

    async with supervising(db) as h:
        sup = h.supervisor
        assert sup.fences == {}
        with pytest.raises(NotOwner):
            await h.router.ask(running, Get())
        # worker-b dies: its leases run out.
        await db.execute("UPDATE shard_leases SET expires_at = now()")
        sup.request_lease_check()
        await h.until(lambda: len(sup.fences) == SHARDS and sup.stats.resumed == 1)
        assert all(f.epoch == 2 and f.worker_id == "worker-a" for f in sup.fences.values())
        assert sup.active_actors == 1
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(running, Get()) == 0
        assert len(h.registry.incarnations[running]) == 1


async def test_shutdown_stops_every_actor_and_releases_the_leases(db: Database) -> None:
    registry_chats = [chat_on(s) for s in range(SHARDS)]
    async with supervising(db) as h:
        sup = h.supervisor
        spawn = SpawnChild(crash=False)
        with trio.fail_after(DEADLINE_S):
            for chat in registry_chats:
                await h.router.ask(chat, Add(1))
            await h.router.ask(registry_chats[0], spawn)
        block = Block()
        in_flight = await start_ask(h.nursery, partial(h.router.ask, registry_chats[1], block))
        with trio.fail_after(DEADLINE_S):
            await block.entered.wait()
        assert await live_leases(db) == SHARDS
        sup.shutdown()
        with pytest.raises(NotOwner):
            await h.router.ask(registry_chats[2], Get())
        with trio.fail_after(DEADLINE_S):
            await in_flight.done.wait()
    assert isinstance(in_flight.error, ActorDead)
    assert spawn.cancelled.is_set()
    assert sup.stopped
    assert sup.active_actors == 0
    assert sup.stats.stopped == SHARDS
    assert await live_leases(db) == 0
    # The next owner need not wait for expiry, and its epochs are higher.
    fences = await acquire_shards(db, "worker-b", range(SHARDS), 60)
    assert [f.epoch for f in fences] == [2] * SHARDS


async def test_a_supervisor_runs_once_and_validates_its_settings(db: Database) -> None:
    registry = Registry()

    async def park(chat_id: UUID, fence: Fence, error: BaseException) -> None:
        await trio.lowlevel.checkpoint()

    with pytest.raises(ValueError, match="shards"):
        Supervisor(db, "w", registry.factory, park, shard_count=4, shards=[4])
    with pytest.raises(ValueError, match="lease ttl"):
        Supervisor(db, "w", registry.factory, park, lease_ttl_s=0)
    with pytest.raises(ValueError, match="capacity"):
        Supervisor(db, "w", registry.factory, park, mailbox_capacity=0)
    sup = Supervisor(db, "w", registry.factory, park, shard_count=SHARDS)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with pytest.raises(RuntimeError, match="once"):
            await sup.run()
        sup.shutdown()


async def test_an_idle_actor_hibernates_wakes_with_its_state_and_then_passivates(
    db: Database, autojump_clock: trio.testing.MockClock
) -> None:
    async with supervising(db, idle_timeout_s=10, **MOCK_CLOCK_OPTIONS) as h:
        sup = h.supervisor
        chat = chat_on(0)
        assert await h.router.ask(chat, Add(3)) == 3
        await h.until(lambda: sup.hibernating_actors == 1)
        toy = h.registry.latest(chat)
        assert sup.behavior(chat) is toy  # no task, the state kept

        await trio.sleep(6)
        assert await h.router.ask(chat, Add(1)) == 4  # woken: same incarnation, no reload
        assert h.registry.incarnations[chat] == [toy]
        assert sup.stats.activations == 1
        await h.until(lambda: sup.hibernating_actors == 1)

        # The idle time counts from the last message, not from the first hibernation.
        await trio.sleep(6)
        assert sup.stats.passivations == 0
        await trio.sleep(5)
        await h.until(lambda: sup.stats.passivations == 1)
        # A passivated chat leaves nothing behind in the Supervisor.
        assert sup.active_actors == 0
        assert sup.hibernating_actors == 0
        assert sup.behavior(chat) is None
        assert await h.router.ask(chat, Get()) == 0  # reactivated from scratch
        assert sup.stats.activations == 2


async def test_a_hibernating_actor_is_stopped_at_shutdown(
    db: Database, autojump_clock: trio.testing.MockClock
) -> None:
    async with supervising(db, idle_timeout_s=10, **MOCK_CLOCK_OPTIONS) as h:
        sup = h.supervisor
        chat = chat_on(2)
        assert await h.router.ask(chat, Add(1)) == 1
        await h.until(lambda: sup.hibernating_actors == 1)
        toy = h.registry.latest(chat)
        sup.shutdown()  # stops every actor at once, hibernating ones included
        assert toy.handled == [Add(1)]
        assert sup.active_actors == 0
        assert sup.hibernating_actors == 0
        with pytest.raises(NotOwner):
            await h.router.ask(chat, Get())


# -- database outages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoseDatabase:
    """Handling it fails as a statement does when PostgreSQL goes away."""


class OutageToy(Toy):
    """A toy whose start fails on the database while its registry says the database is down."""

    registry: OutageRegistry

    async def start(self) -> None:
        if self.registry.down_for_starts > 0:
            self.registry.down_for_starts -= 1
            raise DatabaseUnavailable("cannot reach PostgreSQL (test)")
        await super().start()

    async def _handle(self, message: object) -> object:
        if isinstance(message, LoseDatabase):
            raise DatabaseUnavailable("connection lost mid-statement (test)")
        return await super()._handle(message)


class OutageRegistry(Registry):
    def __init__(self) -> None:
        super().__init__()
        self.down_for_starts = 0  # how many starts still fail on the database

    def factory(self, ctx: ActorContext) -> Toy:
        toy = OutageToy(ctx, self)
        self.incarnations[ctx.chat_id].append(toy)
        return toy


async def test_a_database_outage_is_waited_out_with_backoff_and_never_spends_the_budget(
    db: Database, autojump_clock: trio.testing.MockClock
) -> None:
    registry = OutageRegistry()
    delays: dict[str, Any] = {"db_retry_base_delay_s": 1.0, "db_retry_max_delay_s": 8.0}
    async with supervising(
        db, registry=registry, restart_limit=1, **delays, **MOCK_CLOCK_OPTIONS
    ) as h:
        sup = h.supervisor
        chat, other = chat_on(1), chat_on(1)
        assert await h.router.ask(other, Add(3)) == 3
        assert await h.router.ask(chat, Add(2)) == 2

        # The database goes away mid-message, and stays away for the next five reloads.
        registry.down_for_starts = 5
        lost_at = trio.current_time()
        with pytest.raises(ActorDead):
            await h.router.ask(chat, LoseDatabase())
        await h.until(lambda: sup.stats.outages >= 1)
        # Meanwhile its messages are refused at once, not left waiting for the reload.
        with pytest.raises(ActorDead, match="waiting for the database"):
            await h.router.ask(chat, Get())

        await h.until(
            lambda: registry.down_for_starts == 0 and registry.latest(chat).started,
            deadline_s=60,
        )
        assert await h.router.ask(chat, Get()) == 0  # reloaded: its state is the stored one
        back_after = trio.current_time() - lost_at
        # Waits of min(1 * 2^n, 8) s, each drawn from its upper half: 1, 2, 4, 8, 8, 8.
        assert 31 / 2 <= back_after <= 31 + 1, back_after
        assert sup.stats.outages == 6
        assert sup.stats.outage_restarts == 6
        assert (sup.stats.crashes, sup.stats.restarts, sup.stats.parked) == (0, 0, 0)
        assert not h.parked
        assert len(registry.incarnations[chat]) == 7
        # The other chat of the shard never noticed.
        assert await h.router.ask(other, Get()) == 3
        assert len(registry.incarnations[other]) == 1

        # The budget is whole: one real crash restarts it, the second parks it.
        for crash in (1, 2):
            with pytest.raises(ActorDead):
                await h.router.ask(chat, Crash())
            await h.until(lambda n=crash: sup.stats.crashes == n)  # type: ignore[misc]
        await h.until(lambda: sup.stats.parked == 1)
        assert sup.stats.restarts == 1


async def test_an_outage_after_a_long_healthy_run_starts_its_backoff_afresh(
    db: Database, autojump_clock: trio.testing.MockClock
) -> None:
    registry = OutageRegistry()
    delays: dict[str, Any] = {"db_retry_base_delay_s": 1.0, "db_retry_max_delay_s": 8.0}
    async with supervising(db, registry=registry, **delays, **MOCK_CLOCK_OPTIONS) as h:
        sup = h.supervisor
        chat = chat_on(2)
        registry.down_for_starts = 3
        with pytest.raises(ActorDead):
            await h.router.ask(chat, Get())
        await h.until(
            lambda: registry.down_for_starts == 0 and registry.latest(chat).started,
            deadline_s=60,
        )
        await trio.sleep(60)  # healthy for a good while
        lost_at = trio.current_time()
        with pytest.raises(ActorDead):
            await h.router.ask(chat, LoseDatabase())
        await h.until(lambda: sup.stats.outage_restarts == 4)
        assert trio.current_time() - lost_at <= 1.0  # the base delay, not the grown one


async def test_a_park_that_meets_a_database_outage_is_retried_not_forgotten(
    db: Database, autojump_clock: trio.testing.MockClock
) -> None:
    delays: dict[str, Any] = {"db_retry_base_delay_s": 1.0, "db_retry_max_delay_s": 4.0}
    async with supervising(
        db, restart_limit=0, park_outages=3, **delays, **MOCK_CLOCK_OPTIONS
    ) as h:
        sup = h.supervisor
        chat = chat_on(0)
        with pytest.raises(ActorDead):
            await h.router.ask(chat, Crash())
        await h.until(lambda: len(h.parked) == 2)
        # Still being parked: refused at once, and not activated afresh by a message.
        with pytest.raises(ActorDead, match="parked"):
            await h.router.ask(chat, Get())
        await h.until(lambda: sup.stats.parked == 1, deadline_s=60)
        assert len(h.parked) == 4
        assert sup.stats.park_retries == 3
        assert sup.active_actors == 0
        assert all(isinstance(error, Boom) for _, _, error in h.parked)
        assert await h.router.ask(chat, Get()) == 0  # the next message starts it afresh


async def test_every_runnable_chat_of_a_held_shard_is_resumed_once_the_database_is_back(
    db: Database, database_url: str
) -> None:
    owner = (await make_user(db)).id
    registry = OutageRegistry()
    delays: dict[str, Any] = {"db_retry_base_delay_s": 0.05, "db_retry_max_delay_s": 0.3}
    async with (
        open_pg_proxy(database_url) as proxy,
        Database.connect(
            proxy.url_for(database_url), min_size=1, max_size=2, connect_timeout_s=5
        ) as proxied,
        supervising(proxied, registry=registry, lease_ttl_s=30, **delays) as h,
    ):
        sup = h.supervisor
        kept = chat_on(2)
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(kept, Add(4)) == 4
        epochs = sup.fences
        # A chat left running with no actor here (its actor was lost to an earlier outage, or
        # its parking failed): nothing but a sweep would ever activate it.
        stranded = await _make_chat(db, sup.fences[1], owner, ChatStatus.RUNNING)
        assert stranded not in registry.incarnations

        proxy.cut()
        sup.request_lease_check()
        await h.until(lambda: sup.stats.lease_failures >= 2)
        # Leases still valid by the last renewal are kept: their actors live on.
        assert sup.fences == epochs
        assert sup.active_actors == 1

        proxy.restore()
        await h.until(lambda: stranded in registry.incarnations, deadline_s=5)
        assert sup.fences == epochs
        assert sup.stats.sweeps >= 1
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(stranded, Get()) == 0
            assert await h.router.ask(kept, Get()) == 4  # never stopped
        assert len(registry.incarnations[kept]) == 1


async def test_a_periodic_sweep_resumes_runnable_chats_without_an_actor(db: Database) -> None:
    owner = (await make_user(db)).id
    async with supervising(db, lease_ttl_s=3.0, resume_sweep_interval_s=0.1) as h:
        sup = h.supervisor
        sweeps = sup.stats.sweeps
        stranded = await _make_chat(db, sup.fences[3], owner, ChatStatus.RUNNING)
        waiting = await _make_chat(db, sup.fences[3], owner, ChatStatus.WAITING)
        await h.until(lambda: stranded in h.registry.incarnations)
        assert sup.stats.sweeps > sweeps
        assert waiting not in h.registry.incarnations  # only chats with work left to do
        assert sup.active_actors == 1


async def test_leases_that_lapse_in_an_outage_are_taken_back_and_their_chats_resumed(
    db: Database, database_url: str
) -> None:
    owner = (await make_user(db)).id
    fences = await acquire_shards(db, "worker-a", range(SHARDS), 60)
    running = await _make_chat(db, fences[0], owner, ChatStatus.RUNNING)
    await db.execute("UPDATE shard_leases SET expires_at = now()")
    registry = OutageRegistry()
    delays: dict[str, Any] = {"db_retry_base_delay_s": 0.05, "db_retry_max_delay_s": 0.3}
    async with (
        open_pg_proxy(database_url) as proxy,
        Database.connect(
            proxy.url_for(database_url), min_size=1, max_size=2, connect_timeout_s=5
        ) as proxied,
        supervising(proxied, registry=registry, lease_ttl_s=2.0, **delays) as h,
    ):
        sup = h.supervisor
        epoch = sup.fences[0].epoch
        await h.until(lambda: running in registry.incarnations)
        proxy.cut()
        # Past the ttl without a renewal the shards may be someone else's: let go of them.
        await h.until(lambda: not sup.fences)
        assert sup.active_actors == 0
        proxy.restore()
        await h.until(lambda: len(registry.incarnations[running]) == 2)
        assert sup.fences[0].epoch == epoch + 1
        assert registry.latest(running).ctx.fence == sup.fences[0]
        with trio.fail_after(DEADLINE_S):
            assert await h.router.ask(running, Get()) == 0
