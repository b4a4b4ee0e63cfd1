"""Watch, inbox and config invalidations across workers: two engines, each with its own
``Database`` (its own pool and LISTEN connection), on one real database, in one trio run.

A chat runs on the worker that owns its shard; its watch events and inbox notifications reach
subscribers on the other worker through NOTIFY, and when the other worker's listener lost
notifications (its LISTEN connection killed), the backstop re-reads what it missed.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pytest
import trio

from chatd.actors.chat_actor import CreateChatRequest
from chatd.actors.engine import Engine, EngineOptions, open_engine
from chatd.actors.feeds import FeedSubscription
from chatd.domain.chat_status import ChatStatus
from chatd.domain.effects import MessageAccepted
from chatd.domain.mailbox import SendMessage
from chatd.domain.watch_events import ChatCreated, ChatStatusChanged, WatchEvent
from chatd.providers.fake import FakeLLM, knobs_marker, open_fake_llm
from chatd.runtime import register_default_model
from chatd.store import providers, users
from chatd.store.database import Database

T = TypeVar("T")
DEADLINE_S = 20.0
QUICK = knobs_marker(chunks=1)


@dataclass
class Pair:
    a: Engine
    b: Engine
    db_a: Database
    db_b: Database
    llm: FakeLLM
    owner: uuid.UUID

    def owner_of(self, chat_id: uuid.UUID) -> tuple[Engine, Engine]:
        """(the engine whose supervisor owns the chat's shard, the other one)."""
        if self.a.supervisor.owns(chat_id):
            return self.a, self.b
        assert self.b.supervisor.owns(chat_id), "no engine owns the chat's shard"
        return self.b, self.a

    async def new_chat_id(self) -> uuid.UUID:
        """A chat id whose shard one of the engines holds now."""
        with trio.fail_after(DEADLINE_S):
            while True:
                chat_id = uuid.uuid4()
                if self.a.supervisor.owns(chat_id) or self.b.supervisor.owns(chat_id):
                    return chat_id
                await trio.sleep(0.05)


async def condition(predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` holds (what it watches has no event to wait on)."""
    with trio.fail_after(DEADLINE_S):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


# How long a killed LISTEN connection stays away: longer than a quick turn takes.
RECONNECT_DELAY_S = 1.5


async def kill_listeners(db: Database) -> None:
    """Terminate every LISTEN connection to the database; return once they are gone."""
    query = (
        "SELECT pid FROM pg_stat_activity"
        " WHERE query LIKE 'LISTEN %' AND datname = current_database()"
    )
    pids = [row["pid"] for row in await db.fetch(query)]
    assert pids
    await db.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", pids)
    with trio.fail_after(DEADLINE_S):
        while set(pids) & {row["pid"] for row in await db.fetch(query)}:  # noqa: ASYNC110
            await trio.sleep(0.01)


@pytest.fixture
async def pair(database_url: str, db: Database) -> AsyncIterator[Pair]:
    owner = (await users.create_user(db, "alice")).id
    async with open_fake_llm() as llm:
        await register_default_model(db, base_url=f"{llm.url}/v1")
        async with (
            Database.connect(database_url, listen_reconnect_delay_s=RECONNECT_DELAY_S) as db_a,
            Database.connect(database_url, listen_reconnect_delay_s=RECONNECT_DELAY_S) as db_b,
            open_engine(db_a, EngineOptions(worker_id="worker-a", shard_count=4)) as a,
            open_engine(db_b, EngineOptions(worker_id="worker-b", shard_count=4)) as b,
        ):
            yield Pair(a, b, db_a, db_b, llm, owner)


async def collect(sub: FeedSubscription[T], until: Callable[[Sequence[T]], bool]) -> list[T]:
    seen: list[T] = []
    with trio.fail_after(DEADLINE_S):
        async for batch in sub:
            seen += batch
            if until(seen):
                return seen
    raise AssertionError(f"the feed ended: {seen}")


def reached(chat_id: uuid.UUID, status: ChatStatus) -> Callable[[Sequence[WatchEvent]], bool]:
    def check(seen: Sequence[WatchEvent]) -> bool:
        return any(
            isinstance(e, ChatStatusChanged) and e.chat_id == chat_id and e.status is status
            for e in seen
        )

    return check


async def test_watch_and_inbox_on_one_worker_see_a_chat_running_on_the_other(
    pair: Pair,
) -> None:
    chat_id = await pair.new_chat_id()
    runs_on, watched_on = pair.owner_of(chat_id)
    async with (
        watched_on.watch.subscribe(pair.owner) as watch,
        watched_on.inbox.subscribe(pair.owner) as inbox,
    ):
        reply = await runs_on.router.ask(
            chat_id, CreateChatRequest(pair.owner, uuid.uuid4(), f"{QUICK} hi", title="t")
        )
        assert isinstance(reply, MessageAccepted)
        seen = await collect(watch, reached(chat_id, ChatStatus.WAITING))
        created = [e for e in seen if isinstance(e, ChatCreated)]
        assert [(e.chat_id, e.title) for e in created] == [(chat_id, "t")]
        statuses = [e.status for e in seen if isinstance(e, ChatStatusChanged)]
        assert statuses[-1] is ChatStatus.WAITING
        notes = await collect(inbox, lambda got: len(got) >= 1)
        assert [(n.chat_id, n.user_id) for n in notes] == [(chat_id, pair.owner)]
    assert watched_on.feeds is not None
    assert runs_on.feeds is not None
    assert watched_on.feeds.stats.payloads_received >= 1
    assert runs_on.feeds.stats.backstops == watched_on.feeds.stats.backstops == 0


async def test_a_turn_costs_one_notify_per_commit_that_watchers_see(pair: Pair) -> None:
    """Statements per turn with the bridge: the events of one commit go in one statement."""
    chat_id = await pair.new_chat_id()
    runs_on, watched_on = pair.owner_of(chat_id)
    await runs_on.router.ask(chat_id, CreateChatRequest(pair.owner, uuid.uuid4(), f"{QUICK} hi"))
    async with watched_on.watch.subscribe(pair.owner) as watch:
        await collect(watch, reached(chat_id, ChatStatus.WAITING))
    assert runs_on.feeds is not None
    await runs_on.feeds.drained()
    db = pair.db_a if runs_on is pair.a else pair.db_b
    before, sent = db.stats.statements, runs_on.feeds.stats.statements
    async with watched_on.watch.subscribe(pair.owner) as watch:
        await runs_on.router.ask(chat_id, SendMessage(uuid.uuid4(), f"{QUICK} more"))
        await collect(watch, reached(chat_id, ChatStatus.WAITING))
    await runs_on.feeds.drained()
    notifies = runs_on.feeds.stats.statements - sent
    # running (the send's commit), then waiting + the inbox notification (the answer's).
    assert notifies == 2
    print(f"statements per turn: {db.stats.statements - before} ({notifies} NOTIFY)")


async def test_lost_notifications_are_caught_up_by_the_backstop(pair: Pair) -> None:
    chat_id = await pair.new_chat_id()
    runs_on, watched_on = pair.owner_of(chat_id)
    assert watched_on.feeds is not None
    await runs_on.router.ask(chat_id, CreateChatRequest(pair.owner, uuid.uuid4(), f"{QUICK} hi"))
    async with watched_on.watch.subscribe(pair.owner) as watch:
        await collect(watch, reached(chat_id, ChatStatus.WAITING))
    async with (
        watched_on.watch.subscribe(pair.owner) as watch,
        watched_on.inbox.subscribe(pair.owner) as inbox,
        runs_on.watch.subscribe(pair.owner) as local,
    ):
        backstops = watched_on.feeds.stats.backstops
        await kill_listeners(pair.db_a)  # both workers' (and nobody hears this turn live)
        await runs_on.router.ask(chat_id, SendMessage(uuid.uuid4(), f"{QUICK} more"))
        await collect(local, reached(chat_id, ChatStatus.WAITING))
        assert watched_on.feeds.stats.backstops == backstops  # still away: nothing heard
        seen = await collect(watch, reached(chat_id, ChatStatus.WAITING))
        notes = await collect(inbox, lambda got: len(got) >= 1)
    assert watched_on.feeds.stats.backstops == backstops + 1
    assert [e for e in seen if isinstance(e, ChatStatusChanged)][-1].status is ChatStatus.WAITING
    assert {n.chat_id for n in notes} == {chat_id}


async def test_a_config_change_on_one_worker_is_seen_by_the_others_next_lookup(
    pair: Pair,
) -> None:
    default = await pair.a.config.model_config(None)
    assert default is not None
    assert await pair.a.config.model_config(default.id) == default  # cached on a
    renamed = await providers.update_model_config(pair.db_b, default.id, model="other-model")
    pair.b.config.invalidate_model_config(default.id)
    await pair.b.config.announce()
    await condition(lambda: pair.a.config.applied_remote != 0)
    assert await pair.a.config.model_config(default.id) == renamed
    assert (await pair.a.config.model_config(None)) == renamed
    assert pair.b.config.applied_remote == 0  # its own announcement is skipped


async def test_lost_config_notifications_clear_the_cache(pair: Pair) -> None:
    default = await pair.a.config.model_config(None)
    assert default is not None
    assert len(pair.a.config.model_configs) == 1
    await kill_listeners(pair.db_a)
    await condition(lambda: len(pair.a.config.model_configs) != 1)
    # Re-read, and announcements flow again on the new connection.
    assert await pair.a.config.model_config(None) == default
    await providers.update_model_config(pair.db_b, default.id, name="renamed")
    pair.b.config.invalidate_model_config(default.id)
    applied = pair.a.config.applied_remote
    await pair.b.config.announce()
    await condition(lambda: pair.a.config.applied_remote != applied)
    found = await pair.a.config.model_config(None)
    assert found is not None
    assert found.name == "renamed"
