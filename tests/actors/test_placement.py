"""Several Supervisors on one real PostgreSQL (in one trio process, with toy actors): even
placement, graceful handover to a joining worker, takeover of a dead worker's shards after
expiry, and a clean leave.

Leases are short (``TTL_S``) so that expiry is part of the tests; every wait is on the
Supervisors' own change notifications (or a turn's end) under a deadline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any
from uuid import UUID, uuid4

import pytest
import trio

from chatd.actors.chat_actor import CreateChatRequest
from chatd.actors.engine import EngineOptions, open_engine
from chatd.actors.errors import NotOwner
from chatd.actors.subscription import OwnerMoved
from chatd.actors.supervisor import Supervisor
from chatd.domain.chat_status import ChatStatus
from chatd.domain.events import ChatEvent, MessagePart, PreviewReset, StatusChanged
from chatd.domain.mailbox import SetArchived
from chatd.domain.sharding import shard_of
from chatd.providers.fake import knobs_marker, open_fake_llm
from chatd.runtime import register_default_model
from chatd.store import chats, cluster, users
from chatd.store.chats import CreateChat, UpdateChat, commit
from chatd.store.database import Database
from chatd.store.errors import Fenced
from chatd.store.leases import Fence, acquire_shards, check_fence, list_leases
from tests.actors.toy import Get, Registry, Turn
from tests.faults.proxy import open_pg_proxy
from tests.store.helpers import make_user

SHARDS = 64
TTL_S = 1.5
DEADLINE_S = 10


@dataclass
class Member:
    supervisor: Supervisor
    scope: trio.CancelScope
    lost: list[frozenset[int]] = field(default_factory=list)

    @property
    def serving(self) -> set[int]:
        return set(self.supervisor.fences) - self.supervisor.handing_over


@dataclass
class Fleet:
    db: Database
    nursery: trio.Nursery
    registry: Registry
    members: dict[str, Member] = field(default_factory=dict)

    async def start(self, worker_id: str, *, db: Database | None = None, **options: Any) -> Member:
        options.setdefault("shard_count", SHARDS)
        options.setdefault("lease_ttl_s", TTL_S)
        lost: list[frozenset[int]] = []

        async def park(chat_id: UUID, fence: Fence, error: BaseException) -> None:
            await trio.lowlevel.checkpoint()

        supervisor = Supervisor(
            self.db if db is None else db,
            worker_id,
            self.registry.factory,
            park,
            on_shards_lost=lost.append,
            **options,
        )
        scope = trio.CancelScope()

        async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await supervisor.run(task_status=task_status)

        member = Member(supervisor, scope, lost)
        self.members[worker_id] = member
        await self.nursery.start(run)
        return member

    def owner(self, chat_id: UUID) -> Supervisor | None:
        for member in self.members.values():
            if member.supervisor.owns(chat_id):
                return member.supervisor
        return None

    def counts(self) -> list[int]:
        return sorted(len(m.serving) for m in self.members.values() if not m.supervisor.stopped)

    def settled(self, shard_count: int = SHARDS) -> bool:
        """Every shard served by exactly one live member, none being handed over, and the
        split even (counts differ by at most one)."""
        live = [m for m in self.members.values() if not m.supervisor.stopped]
        served = [s for m in live for s in m.serving]
        counts = self.counts()
        return (
            sorted(served) == list(range(shard_count))
            and not any(m.supervisor.handing_over for m in live)
            and max(counts) - min(counts) <= 1
        )

    async def until(self, predicate: Callable[[], bool], deadline_s: float = DEADLINE_S) -> None:
        """Wait until ``predicate()`` holds, re-checked whenever any member changes."""
        with trio.fail_after(deadline_s):
            async with trio.open_nursery() as nursery:

                async def watch(supervisor: Supervisor) -> None:
                    await supervisor.wait_until(predicate)
                    nursery.cancel_scope.cancel()

                for member in list(self.members.values()):
                    nursery.start_soon(watch, member.supervisor)


class Progress:
    """A count to wait on."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = trio.Event()

    def add(self) -> None:
        self.count += 1
        self._changed.set()
        self._changed = trio.Event()

    async def reach(self, count: int) -> None:
        while self.count < count:
            await self._changed.wait()


@asynccontextmanager
async def fleet(db: Database) -> AsyncIterator[Fleet]:
    async with trio.open_nursery() as nursery:
        f = Fleet(db, nursery, Registry())
        yield f
        for member in f.members.values():
            member.supervisor.shutdown()


def chat_on(shard: int, shard_count: int = SHARDS) -> UUID:
    while True:
        chat_id = uuid4()
        if shard_of(chat_id, shard_count) == shard:
            return chat_id


async def live_owners(db: Database) -> dict[int, str]:
    owners = await cluster.shard_owners(db)
    return {shard: owner.worker_id for shard, owner in owners.items()}


# -- even placement ----------------------------------------------------------------------------


async def test_two_then_three_workers_split_the_shards_evenly_within_a_lease_period(
    db: Database,
) -> None:
    async with fleet(db) as f:
        a = await f.start("worker-a", link_url="http://127.0.0.1:7001")
        assert sorted(a.serving) == list(range(SHARDS))

        joined = trio.current_time()
        await f.start("worker-b")
        await f.until(f.settled)
        assert trio.current_time() - joined < TTL_S
        assert f.counts() == [32, 32]
        # A handed over its highest shards; the lowest never moved.
        assert a.serving == set(range(32))
        assert sorted(s for lost in a.lost for s in lost) == list(range(32, 64))

        joined = trio.current_time()
        await f.start("worker-c")
        await f.until(f.settled)
        assert trio.current_time() - joined < TTL_S
        assert f.counts() == [21, 21, 22]

        # The database agrees: each shard's live lease is its server's, with its link.
        owners = await live_owners(db)
        assert owners == {s: w for w, m in f.members.items() for s in m.serving}
        assert (await cluster.shard_owners(db))[0].link_url == "http://127.0.0.1:7001"
        assert [w.worker_id for w in await cluster.live_workers(db)] == [
            "worker-a",
            "worker-b",
            "worker-c",
        ]
        handed = sum(m.supervisor.stats.shards_handed_over for m in f.members.values())
        assert handed == 32 + 21  # each move once, no ping-pong
        assert all(m.supervisor.stats.handover_timeouts == 0 for m in f.members.values())


async def test_three_workers_starting_together_split_the_shards_evenly(db: Database) -> None:
    async with fleet(db) as f:
        started = trio.current_time()
        async with trio.open_nursery() as starting:
            for worker_id in ("worker-a", "worker-b", "worker-c"):
                starting.start_soon(f.start, worker_id)
        await f.until(f.settled)
        assert trio.current_time() - started < TTL_S
        assert f.counts() == [21, 21, 22]


# -- graceful handover -------------------------------------------------------------------------


async def test_a_shard_handed_over_lets_its_turn_in_progress_finish_then_moves(
    db: Database,
) -> None:
    owner = (await make_user(db)).id
    # A chat left running on shard 2 (resumed by whoever holds the shard).
    [fence] = await acquire_shards(db, "worker-a", [2], 60)
    resumable = chat_on(2, 4)
    await commit(
        db,
        fence,
        None,
        [
            CreateChat(id=resumable, owner_id=owner, shard=2),
            UpdateChat(status=ChatStatus.RUNNING),
        ],
    )
    async with fleet(db) as f:
        a = await f.start("worker-a", shard_count=4)
        sup_a = a.supervisor
        assert sorted(sup_a.fences) == [0, 1, 2, 3]
        assert sup_a.stats.resumed == 1
        assert await sup_a.ask(resumable, Get()) == 0
        assert f.registry.latest(resumable).ctx.fence.worker_id == "worker-a"
        chat = chat_on(3, 4)
        turn = Turn()
        token = await sup_a.ask(chat, turn)

        b = await f.start("worker-b", shard_count=4)
        await f.until(lambda: sup_a.handing_over == {2, 3})
        # Not served while handed over: refused at once, here and (not yet held) there.
        assert not sup_a.owns(chat)
        assert not b.supervisor.owns(chat)
        with pytest.raises(NotOwner):
            await sup_a.ask(chat, Get())
        with pytest.raises(NotOwner):
            sup_a.tell(chat, Get())
        assert a.lost == []  # the turn goes on
        assert sup_a.behavior(chat) is not None

        turn.release.set()
        await f.until(lambda: f.settled(4))
        assert f.registry.turns_finished == [token]
        assert f.registry.turns_cut == []
        assert sorted(b.serving) == [2, 3]
        assert a.lost == [frozenset({2, 3})]  # after their actors were stopped
        assert sup_a.behavior(chat) is None
        assert sup_a.stats.shards_handed_over == 2
        assert sup_a.stats.handover_timeouts == 0
        # The taker resumed the shard's running chat, under its own lease.
        await f.until(lambda: b.supervisor.stats.resumed == 1)
        assert await b.supervisor.ask(resumable, Get()) == 0
        assert f.registry.latest(resumable).ctx.fence.worker_id == "worker-b"
        assert await b.supervisor.ask(chat, Get()) == 0


async def test_a_turn_that_outlasts_the_handover_timeout_is_cut(db: Database) -> None:
    async with fleet(db) as f:
        a = await f.start("worker-a", shard_count=4, handover_timeout_s=0.3)
        chat = chat_on(3, 4)
        token = await a.supervisor.ask(chat, Turn())
        await f.start("worker-b", shard_count=4)
        await f.until(lambda: f.settled(4))
        assert f.registry.turns_cut == [token]
        assert a.supervisor.stats.handover_timeouts == 1
        assert a.lost == [frozenset({2, 3})]


async def test_a_worker_joining_under_load_takes_its_share_without_cutting_a_turn(
    db: Database,
) -> None:
    async with fleet(db) as f:
        await f.start("worker-a", handover_timeout_s=5)
        await f.start("worker-b", handover_timeout_s=5)
        await f.until(f.settled)
        handed_before = sum(m.supervisor.stats.shards_handed_over for m in f.members.values())
        chats = [chat_on(shard) for shard in range(SHARDS)]
        stop = trio.Event()
        completed: list[int] = []
        progress = Progress()
        refused: list[Exception] = []

        async def client(chat_id: UUID) -> None:
            while not stop.is_set():
                supervisor = f.owner(chat_id)
                try:
                    if supervisor is None:
                        raise NotOwner(chat_id, shard_of(chat_id, SHARDS))
                    token = await supervisor.ask(chat_id, Turn(0.02))
                    assert isinstance(token, int)
                except NotOwner as exc:
                    refused.append(exc)
                    await trio.sleep(0.01)  # the client's retry delay (Retry-After)
                    continue
                with trio.fail_after(DEADLINE_S):
                    await f.registry.turn_ended[token].wait()
                completed.append(token)
                progress.add()

        async with trio.open_nursery() as load:
            for chat_id in chats:
                load.start_soon(client, chat_id)
            with trio.fail_after(DEADLINE_S):
                await progress.reach(2 * SHARDS)  # under way on every chat
            c = await f.start("worker-c", handover_timeout_s=5)
            await f.until(f.settled)
            before = len(completed)
            with trio.fail_after(DEADLINE_S):
                await progress.reach(before + 2 * SHARDS)  # and on after the move
            stop.set()

        assert f.counts() == [21, 21, 22]
        assert len(c.serving) == 21
        assert f.registry.turns_cut == []
        assert sorted(f.registry.turns_finished) == sorted(completed)
        assert len(completed) == len(f.registry.turns_begun)  # every turn begun finished
        assert all(isinstance(exc, NotOwner) for exc in refused)
        stats = [m.supervisor.stats for m in f.members.values()]
        # Every shard of the newcomer came by handover, and nothing else moved.
        assert sum(s.shards_handed_over for s in stats) - handed_before == 21
        assert all(s.handover_timeouts == 0 for s in stats)
        # Turns ran on the newcomer's shards after the move.
        assert any(
            f.registry.incarnations[chat_id][-1].ctx.fence.worker_id == "worker-c"
            for chat_id in chats
        )


# -- death and leaving -------------------------------------------------------------------------


async def test_a_dead_workers_shards_are_taken_after_expiry_and_its_writes_fenced(
    db: Database, database_url: str
) -> None:
    async with (
        open_pg_proxy(database_url) as proxy,
        Database.connect(
            proxy.url_for(database_url), min_size=1, max_size=2, connect_timeout_s=5
        ) as proxied,
        fleet(db) as f,
    ):
        a = await f.start("worker-a")
        b = await f.start(
            "worker-b", db=proxied, db_retry_base_delay_s=0.05, db_retry_max_delay_s=0.2
        )
        await f.until(f.settled)
        old = b.supervisor.fences

        proxy.cut()  # worker-b can no longer renew: as good as dead to the others
        cut_at = trio.current_time()
        await f.until(lambda: len(a.serving) == SHARDS, deadline_s=TTL_S + 3)
        # Taken once the leases (and worker-b's row) expired, not before, and soon after.
        taken_after = trio.current_time() - cut_at
        assert TTL_S - 0.5 < taken_after < TTL_S + 1.0, taken_after
        owners = await live_owners(db)
        assert set(owners.values()) == {"worker-a"}
        assert [w.worker_id for w in await cluster.live_workers(db)] == ["worker-a"]
        # Whatever worker-b still tries to write under its old leases is fenced.
        stale = next(iter(old.values()))
        with pytest.raises(Fenced):
            await db.run(lambda conn: check_fence(conn, stale))
        # worker-b let go of its shards too, once its leases could not be renewed in time.
        await f.until(lambda: not b.supervisor.fences)
        assert sorted(s for lost in b.lost for s in lost) == sorted(old)

        # Back from the partition: it gets its share again, by handover.
        proxy.restore()
        await f.until(f.settled, deadline_s=TTL_S + 5)
        assert f.counts() == [32, 32]
        assert all(f.epoch > old[f.shard].epoch for f in b.supervisor.fences.values())


async def test_a_clean_stop_releases_and_leaves_so_the_others_take_over_at_once(
    db: Database,
) -> None:
    async with fleet(db) as f:
        a = await f.start("worker-a", lease_ttl_s=30)
        b = await f.start("worker-b", lease_ttl_s=30)
        await f.until(f.settled)
        held = sorted(b.supervisor.fences)
        assert held == list(range(32, 64))  # the ones worker-a handed over
        stopped_at = trio.current_time()
        b.supervisor.shutdown()
        # A NOTIFY, not an expiry (30 s away), wakes worker-a.
        await f.until(lambda: len(a.serving) == SHARDS and b.supervisor.stopped, deadline_s=5)
        assert trio.current_time() - stopped_at < 2
        assert sorted(s for lost in b.lost for s in lost) == held
        assert [w.worker_id for w in await cluster.live_workers(db)] == ["worker-a"]
        leases = await list_leases(db)
        assert {lease.worker_id for lease in leases} == {"worker-a"}


# -- with real engines ---------------------------------------------------------------------------


async def test_a_model_answer_streaming_on_a_shard_handed_over_finishes_before_it_moves(
    db: Database,
) -> None:
    owner = await users.create_user(db, "hana")
    options = EngineOptions(worker_id="worker-a", shard_count=4, lease_ttl_s=TTL_S)
    async with open_fake_llm() as llm, trio.open_nursery() as nursery:
        await register_default_model(db, base_url=f"{llm.url}/v1")
        async with open_engine(db, options) as a:
            chat_id = chat_on(3, 4)  # among the shards worker-a gives away first
            text = f"{knobs_marker(chunks=30, chunk_interval_ms=30)} tell me"
            await a.router.ask(chat_id, CreateChatRequest(owner.id, uuid4(), text))
            sup_a = a.supervisor
            seen: list[ChatEvent] = []
            moved: OwnerMoved | None = None
            # The subscription outlives the answer, then ends with OwnerMoved once the shard
            # left (at the edge, the client's stream goes on relayed from worker-b).
            try:
                async with a.hub.subscribe(chat_id, None) as events:
                    with trio.fail_after(DEADLINE_S):
                        async for batch in events:  # the answer streams
                            seen.extend(batch)
                            if any(isinstance(e, MessagePart) for e in batch):
                                break
                    joined = trio.Event()
                    b_done = trio.Event()

                    async def worker_b() -> None:
                        async with open_engine(db, replace(options, worker_id="worker-b")) as b:
                            joined.set()
                            with trio.fail_after(DEADLINE_S):
                                await b.supervisor.wait_until(lambda: b.supervisor.owns(chat_id))
                            await b_done.wait()

                    nursery.start_soon(worker_b)
                    with trio.fail_after(DEADLINE_S):
                        await joined.wait()
                        await sup_a.wait_until(lambda: 3 in sup_a.handing_over)
                    # The chat takes no new command here meanwhile (503 at the edge)...
                    with pytest.raises(NotOwner):
                        await a.router.ask(chat_id, SetArchived(archived=True))
                    # ...while its answer streams on to the end and is committed here.
                    with trio.fail_after(DEADLINE_S):
                        async for batch in events:
                            seen.extend(batch)
                            if any(
                                isinstance(e, StatusChanged) and e.status is ChatStatus.WAITING
                                for e in batch
                            ):
                                break
                        await trio.sleep_forever()  # until the shard leaves
            except OwnerMoved as exc:
                moved = exc
            assert moved is not None
            assert 3 not in sup_a.fences
            assert any(
                isinstance(e, StatusChanged) and e.status is ChatStatus.WAITING for e in seen
            )
            b_done.set()
        assert sup_a.stats.handover_timeouts == 0
        assert sup_a.stats.shards_handed_over == 2
    chat = await chats.get_chat(db, chat_id)
    assert chat is not None
    assert chat.status is ChatStatus.WAITING
    assert llm.request_count == 1  # answered once, not again by the taker
    messages = await chats.list_messages(db, chat_id, after_seq=0, limit=10)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert not [e for e in seen if isinstance(e, PreviewReset)]
