"""Watch, inbox and config invalidations across workers: two engines, each with its own
``Database`` (its own pool and LISTEN connection), on one real database, in one trio run.

A chat runs on the worker that owns its shard; its watch events and inbox notifications reach
subscribers on the other worker through NOTIFY, and when the other worker's listener lost
notifications (its LISTEN connection killed), the backstop re-reads what it missed.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import pytest
import trio

from chatd.actors.chat_actor import CreateChatRequest
from chatd.actors.engine import Engine, EngineOptions, open_engine
from chatd.actors.errors import NotOwner
from chatd.actors.feeds import FeedSubscription
from chatd.domain.chat_status import ChatStatus
from chatd.domain.effects import MessageAccepted
from chatd.domain.events import PendingToolCall
from chatd.domain.mailbox import SendMessage
from chatd.domain.watch_events import (
    ChatActionRequired,
    ChatCreated,
    ChatStatusChanged,
    ChatTitleChanged,
    WatchEvent,
)
from chatd.providers.fake import FakeLLM, knobs_marker, open_fake_llm
from chatd.runtime import register_default_model
from chatd.store import providers, users
from chatd.store.database import Database
from tests.faults.proxy import PgProxy, open_pg_proxy

T = TypeVar("T")
DEADLINE_S = 20.0
QUICK = knobs_marker(chunks=1)


@dataclass
class Pair:
    a: Engine
    b: Engine
    db_a: Database
    db_b: Database  # through proxy_b: worker b's database can be cut
    proxy_b: PgProxy
    llm: FakeLLM
    owner: uuid.UUID

    def owner_of(self, chat_id: uuid.UUID) -> tuple[Engine, Engine]:
        """(the engine whose supervisor owns the chat's shard, the other one)."""
        if self.a.supervisor.owns(chat_id):
            return self.a, self.b
        assert self.b.supervisor.owns(chat_id), "no engine owns the chat's shard"
        return self.b, self.a

    async def ask(self, chat_id: uuid.UUID, message: object) -> object:
        """Ask the engine owning the chat's shard; the two engines' placement may move it
        meanwhile (``NotOwner``: the message was not delivered, so asking again is safe)."""
        with trio.fail_after(DEADLINE_S):
            while True:
                for engine in (self.a, self.b):
                    if engine.supervisor.owns(chat_id):
                        with contextlib.suppress(NotOwner):
                            return await engine.router.ask(chat_id, message)
                await trio.sleep(0.05)

    async def new_chat_id(self, on: Engine | None = None) -> uuid.UUID:
        """A chat id whose shard ``on`` (or either engine) holds now."""
        engines = (self.a, self.b) if on is None else (on,)
        with trio.fail_after(DEADLINE_S):
            while True:
                chat_id = uuid.uuid4()
                if any(engine.supervisor.owns(chat_id) for engine in engines):
                    return chat_id
                await trio.sleep(0.05)


async def condition(predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` holds (what it watches has no event to wait on)."""
    with trio.fail_after(DEADLINE_S):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


# How long a killed LISTEN connection waits before it connects again.
RECONNECT_DELAY_S = 0.2


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
            open_pg_proxy(database_url) as proxy_b,
            Database.connect(database_url, listen_reconnect_delay_s=RECONNECT_DELAY_S) as db_a,
            Database.connect(
                proxy_b.url_for(database_url),
                listen_reconnect_delay_s=RECONNECT_DELAY_S,
                connect_timeout_s=5,
            ) as db_b,
            open_engine(db_a, EngineOptions(worker_id="worker-a", shard_count=4)) as a,
            open_engine(db_b, EngineOptions(worker_id="worker-b", shard_count=4)) as b,
        ):
            yield Pair(a, b, db_a, db_b, proxy_b, llm, owner)


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
        reply = await pair.ask(
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
    """Statements per turn with the bridge: the events of one commit go in one statement (on
    whichever engine runs the chat: the sums over both do not depend on it)."""
    engines, dbs = (pair.a, pair.b), (pair.db_a, pair.db_b)

    async def quiet() -> tuple[int, int]:
        for engine in engines:
            assert engine.feeds is not None
            await engine.feeds.drained()
        return (
            sum(db.stats.statements for db in dbs),
            sum(e.feeds.stats.statements for e in engines if e.feeds is not None),
        )

    chat_id = await pair.new_chat_id()
    async with pair.b.watch.subscribe(pair.owner) as watch:
        await pair.ask(chat_id, CreateChatRequest(pair.owner, uuid.uuid4(), f"{QUICK} hi"))
        await collect(watch, reached(chat_id, ChatStatus.WAITING))
    statements, notifies = await quiet()
    async with pair.b.watch.subscribe(pair.owner) as watch:
        await pair.ask(chat_id, SendMessage(uuid.uuid4(), f"{QUICK} more"))
        await collect(watch, reached(chat_id, ChatStatus.WAITING))
    after, notified = await quiet()
    # running (the send's commit), then waiting + the inbox notification (the answer's).
    assert notified - notifies == 2
    print(f"statements per turn: {after - statements} ({notified - notifies} NOTIFY)")


async def test_lost_notifications_are_caught_up_by_the_backstop(pair: Pair) -> None:
    """Worker b's database is cut (its listener too) while a chat on worker a takes a turn:
    when b listens again, its backstop re-reads what its watchers missed."""
    chat_id = await pair.new_chat_id(on=pair.a)
    assert pair.b.feeds is not None
    async with pair.b.watch.subscribe(pair.owner) as watch:
        await pair.ask(chat_id, CreateChatRequest(pair.owner, uuid.uuid4(), f"{QUICK} hi"))
        await collect(watch, reached(chat_id, ChatStatus.WAITING))
    async with (
        pair.b.watch.subscribe(pair.owner) as watch,
        pair.b.inbox.subscribe(pair.owner) as inbox,
        pair.a.watch.subscribe(pair.owner) as local,
    ):
        backstops = pair.b.feeds.stats.backstops
        pair.proxy_b.cut()
        await pair.ask(chat_id, SendMessage(uuid.uuid4(), f"{QUICK} more"))
        await collect(local, reached(chat_id, ChatStatus.WAITING))
        assert pair.a.feeds is not None
        await pair.a.feeds.drained()  # sent, and not heard by b
        assert pair.b.feeds.stats.backstops == backstops
        pair.proxy_b.restore()
        seen = await collect(watch, reached(chat_id, ChatStatus.WAITING))
        notes = await collect(inbox, lambda got: len(got) >= 1)
    assert pair.b.feeds.stats.backstops == backstops + 1
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


async def test_a_burst_goes_in_one_statement_of_payloads_under_the_notify_limit(
    pair: Pair,
) -> None:
    """300 events published at once: one NOTIFY statement, several payloads (each under 8000
    bytes, or PostgreSQL would refuse it), all delivered on the other worker in order."""
    assert pair.a.feeds is not None
    await pair.a.feeds.drained()
    chat_ids = [uuid.uuid4() for _ in range(300)]
    statements, payloads = pair.a.feeds.stats.statements, pair.a.feeds.stats.payloads
    async with pair.b.watch.subscribe(pair.owner) as watch:
        for chat_id in chat_ids:
            pair.a.watch.publish(pair.owner, ChatStatusChanged(chat_id, ChatStatus.RUNNING, False))
        seen = await collect(watch, lambda got: len(got) >= len(chat_ids))
    await pair.a.feeds.drained()
    assert [e.chat_id for e in seen] == chat_ids
    assert pair.a.feeds.stats.statements == statements + 1
    assert pair.a.feeds.stats.payloads - payloads > 1


async def test_an_event_too_large_for_a_notify_is_read_back_from_the_chat(pair: Pair) -> None:
    chat_id = await pair.new_chat_id()
    async with pair.b.watch.subscribe(pair.owner) as watch:
        await pair.ask(chat_id, CreateChatRequest(pair.owner, uuid.uuid4(), f"{QUICK} hi"))
        await collect(watch, reached(chat_id, ChatStatus.WAITING))
    huge = ChatActionRequired(chat_id, (PendingToolCall("c1", "lookup", "x" * 20_000),), 1.0)
    async with pair.b.watch.subscribe(pair.owner) as watch:
        pair.a.watch.publish(pair.owner, huge)
        seen = await collect(watch, reached(chat_id, ChatStatus.WAITING))
    # The status as stored stands for it: the watcher reads the calls from the chat.
    assert seen == [ChatStatusChanged(chat_id, ChatStatus.WAITING, False)]


async def test_a_send_lost_in_an_outage_makes_the_others_catch_up(
    db: Database, database_url: str
) -> None:
    """Worker A's database is cut while it relays an event: once it is back, A tells the
    others that it dropped a send, and their backstop re-reads from before it."""
    owner = (await users.create_user(db, "olga")).id
    chat = await db.fetchval(
        "INSERT INTO chats (id, owner_id, shard, title) VALUES ($1, $2, 0, 'kept') RETURNING id",
        uuid.uuid4(),
        owner,
    )
    quick = EngineOptions(
        worker_id="worker-a", shard_count=4, db_retry_base_delay_s=0.05, db_retry_max_delay_s=0.2
    )
    async with (
        open_pg_proxy(database_url) as proxy,
        Database.connect(proxy.url_for(database_url), min_size=1, connect_timeout_s=5) as db_a,
        Database.connect(database_url) as db_b,
        open_engine(db_a, quick) as a,
        open_engine(db_b, replace(quick, worker_id="worker-b")) as b,
        b.watch.subscribe(owner) as watch,
    ):
        assert a.feeds is not None
        assert b.feeds is not None
        proxy.cut()
        a.watch.publish(owner, ChatTitleChanged(chat, "renamed while cut"))
        await condition(lambda: a.feeds is not None and a.feeds.stats.send_failures > 0)
        assert b.feeds.stats.backstops == 0
        proxy.restore()
        seen = await collect(watch, lambda got: any(isinstance(e, ChatStatusChanged) for e in got))
        assert b.feeds.stats.backstops == 1
    assert ChatTitleChanged(chat, "kept") in seen
    assert ChatStatusChanged(chat, ChatStatus.WAITING, False) in seen


async def test_a_malformed_config_notification_is_ignored(pair: Pair) -> None:
    default = await pair.a.config.model_config(None)
    assert default is not None
    for junk in ("not json", '{"w": "x"}', '{"w": "x", "i": ["chat:1", "provider:nope"]}'):
        await pair.db_b.notify("chatd_config", junk)
    await providers.update_model_config(pair.db_b, default.id, name="still heard")
    pair.b.config.invalidate_model_config(default.id)
    await pair.b.config.announce()
    await condition(lambda: pair.a.config.applied_remote > 0)
    assert pair.a.config.applied_remote == 1  # the junk applied nothing
    found = await pair.a.config.model_config(None)
    assert found is not None
    assert found.name == "still heard"
