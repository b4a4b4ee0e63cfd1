"""The engine end to end, driven through the Router as the edge will drive it.

Real PostgreSQL, the fake provider over real HTTP through the OpenAI adapter, the real
Supervisor, ChatActors and hub. Waits are on hub events with deadlines; timers run on a
MockClock that the tests jump by hand (autojump would race the real sockets).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import pytest
import trio
import trio.testing

from chatd.actors.chat_actor import ChatActor, CreateChatRequest, awaits, system_text
from chatd.actors.engine import Engine, EngineOptions, open_engine
from chatd.actors.errors import ActorDead
from chatd.actors.feeds import UserFeed
from chatd.actors.hub import StreamCursor
from chatd.config import Settings
from chatd.domain.chat_state import ChatState
from chatd.domain.chat_status import ChatStatus
from chatd.domain.conversation import TextPart, ToolSpec
from chatd.domain.effects import InvalidCommand, MessageAccepted, TransitionNotAllowed
from chatd.domain.events import (
    ActionRequired,
    ChatEvent,
    CommittedMessage,
    ErrorRaised,
    MessagePart,
    RetryScheduled,
    StatusChanged,
)
from chatd.domain.mailbox import (
    EditMessage,
    GenerationStopped,
    Interrupt,
    SendMessage,
    SetArchived,
    StepCompleted,
    SubmitToolResults,
    ToolResult,
)
from chatd.domain.stream_parts import TextDelta
from chatd.domain.watch_events import (
    ChatActionRequired,
    ChatCreated,
    ChatStatusChanged,
    ChatTitleChanged,
)
from chatd.providers.fake import FakeLLM, knobs_marker, open_fake_llm
from chatd.runtime import register_default_model
from chatd.store import chats, inbox, prompts, providers, users
from chatd.store.database import Database
from chatd.store.records import InboxNotification, inbox_notification_from_row
from chatd.tools.dynamic import ToolLimits

T = TypeVar("T")

LOOKUP = ToolSpec(
    "lookup", "Look a word up", {"type": "object", "properties": {"word": {"type": "string"}}}
)


@dataclass
class World:
    db: Database
    engine: Engine
    llm: FakeLLM
    owner: uuid.UUID

    async def create(
        self,
        text: str,
        *,
        tools: tuple[ToolSpec, ...] = (),
        title: str = "",
        system_prompt: str = "",
    ) -> uuid.UUID:
        chat_id = uuid.uuid4()
        reply = await self.engine.router.ask(
            chat_id,
            CreateChatRequest(
                self.owner,
                uuid.uuid4(),
                text,
                title=title,
                system_prompt=system_prompt,
                dynamic_tools=tools,
            ),
        )
        assert isinstance(reply, MessageAccepted)
        assert not reply.queued
        return chat_id

    async def until(
        self,
        chat_id: uuid.UUID,
        predicate: Callable[[ChatEvent], bool],
        *,
        cursor: StreamCursor | None = None,
    ) -> list[ChatEvent]:
        """Events of the chat's stream, from ``cursor``, up to the first that matches."""
        seen: list[ChatEvent] = []
        with trio.fail_after(30):
            async with self.engine.hub.subscribe(chat_id, cursor) as events:
                async for batch in events:
                    for event in batch:
                        seen.append(event)
                        if predicate(event):
                            return seen
        raise AssertionError(f"the stream ended without the expected event: {seen}")

    async def until_status(self, chat_id: uuid.UUID, status: ChatStatus) -> list[ChatEvent]:
        return await self.until(
            chat_id, lambda e: isinstance(e, StatusChanged) and e.status is status
        )

    async def texts(self, chat_id: uuid.UUID) -> list[tuple[str, str]]:
        """(role, text) of the chat's live messages, tool results as their JSON."""
        out: list[tuple[str, str]] = []
        for m in await chats.list_messages(self.db, chat_id, after_seq=0, limit=1000):
            text = "".join(
                str(p.get("text") or p.get("output") or p.get("name") or "") for p in m.content
            )
            out.append((m.role, text))
        return out


@pytest.fixture
async def world(db: Database) -> AsyncIterator[World]:
    owner = await users.create_user(db, "alice")
    async with open_fake_llm() as llm:
        await register_default_model(db, base_url=f"{llm.url}/v1")
        options = EngineOptions(worker_id="worker-1", shard_count=4, lease_ttl_s=30.0)
        async with open_engine(db, options) as engine:
            yield World(db, engine, llm, owner.id)


def marker(**knobs: Any) -> str:
    return knobs_marker(**knobs)


async def test_a_multi_turn_chat(world: World) -> None:
    chat_id = await world.create(f"{marker(chunks=3)} hello")
    await world.until_status(chat_id, ChatStatus.WAITING)
    await world.engine.router.ask(chat_id, SendMessage(uuid.uuid4(), f"{marker(chunks=2)} more"))
    await world.until_status(chat_id, ChatStatus.WAITING)

    texts = await world.texts(chat_id)
    assert [role for role, _ in texts] == ["user", "assistant", "user", "assistant"]
    assert texts[1][1] == "w1 w2 w3 "
    assert texts[3][1] == "w1 w2 "
    second = world.llm.requests[1].body["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == "w1 w2 w3 "


async def test_a_message_sent_while_running_is_queued_then_answered(world: World) -> None:
    chat_id = await world.create(f"{marker(chunks=20, chunk_interval_ms=20)} first")
    await world.until(chat_id, lambda e: isinstance(e, MessagePart))
    reply = await world.engine.router.ask(
        chat_id, SendMessage(uuid.uuid4(), f"{marker(chunks=1)} second")
    )
    assert isinstance(reply, MessageAccepted)
    assert reply.queued
    await world.until(
        chat_id,
        lambda e: isinstance(e, CommittedMessage) and e.seq == 4,
    )
    await world.until_status(chat_id, ChatStatus.WAITING)
    roles = [role for role, _ in await world.texts(chat_id)]
    assert roles == ["user", "assistant", "user", "assistant"]


async def test_interrupt_mid_stream_commits_the_partial_answer_once(world: World) -> None:
    chat_id = await world.create(f"{marker(chunks=500, chunk_interval_ms=10)} long")
    await world.until(chat_id, lambda e: isinstance(e, MessagePart) and e.seq >= 3)
    await world.engine.router.ask(chat_id, Interrupt())
    await world.until_status(chat_id, ChatStatus.WAITING)
    texts = await world.texts(chat_id)
    assert [role for role, _ in texts] == ["user", "assistant"]
    partial = texts[1][1]
    assert partial.startswith("w1 w2 ")
    assert len(partial.split()) < 500
    with trio.fail_after(10):
        await world.llm.wait_for_disconnect(0)


async def test_edit_truncates_and_regenerates(world: World) -> None:
    chat_id = await world.create(f"{marker(chunks=1)} one")
    await world.until_status(chat_id, ChatStatus.WAITING)
    await world.engine.router.ask(chat_id, SendMessage(uuid.uuid4(), f"{marker(chunks=1)} two"))
    await world.until_status(chat_id, ChatStatus.WAITING)
    first_user = (await chats.list_messages(world.db, chat_id, after_seq=0, limit=10))[0]

    await world.engine.router.ask(
        chat_id, EditMessage(first_user.id, uuid.uuid4(), f"{marker(chunks=2)} one again")
    )
    await world.until_status(chat_id, ChatStatus.WAITING)
    texts = await world.texts(chat_id)
    assert [role for role, _ in texts] == ["user", "assistant"]
    assert texts[0][1].endswith("one again")
    assert texts[1][1] == "w1 w2 "


async def test_a_401_ends_in_error_without_retry(world: World) -> None:
    chat_id = await world.create(f"{marker(fault='auth')} hi")
    events = await world.until_status(chat_id, ChatStatus.ERROR)
    assert not any(isinstance(e, RetryScheduled) for e in events)
    assert world.llm.request_count == 1
    chat = await chats.get_chat(world.db, chat_id)
    assert chat is not None
    assert chat.last_error is not None
    assert chat.last_error["kind"] == "auth"


async def test_dynamic_tools_end_to_end(world: World) -> None:
    calls = [{"name": "lookup", "arguments": {"word": "trio"}}]
    chat_id = await world.create(f"{marker(tool_calls=calls)} define trio", tools=(LOOKUP,))
    events = await world.until(chat_id, lambda e: isinstance(e, ActionRequired))
    [required] = [e for e in events if isinstance(e, ActionRequired)]
    [call] = required.calls
    assert call.name == "lookup"
    assert json.loads(call.arguments) == {"word": "trio"}

    router = world.engine.router
    bad = [
        ((), "results"),
        ((ToolResult(call.id, "1"), ToolResult(call.id, "2")), "results"),
        ((ToolResult(call.id, "1"), ToolResult("other", "2")), "results"),
        ((ToolResult(call.id, "not json"),), "results[0].output"),
    ]
    for results, field in bad:
        with pytest.raises(InvalidCommand) as refused:
            await router.ask(chat_id, SubmitToolResults(results))
        assert refused.value.field == field

    await router.ask(chat_id, SubmitToolResults((ToolResult(call.id, '{"meaning": "x"}'),)))
    with pytest.raises(TransitionNotAllowed):
        await router.ask(chat_id, SubmitToolResults((ToolResult(call.id, "{}"),)))
    await world.until_status(chat_id, ChatStatus.WAITING)
    roles = [role for role, _ in await world.texts(chat_id)]
    assert roles == ["user", "assistant", "tool", "assistant"]


async def test_builtin_and_dynamic_calls_in_one_step(world: World) -> None:
    calls = [
        {"name": "calculate", "arguments": {"expression": "6*7"}},
        {"name": "lookup", "arguments": {"word": "x"}},
    ]
    chat_id = await world.create(f"{marker(tool_calls=calls)} both", tools=(LOOKUP,))
    events = await world.until(chat_id, lambda e: isinstance(e, ActionRequired))
    [required] = [e for e in events if isinstance(e, ActionRequired)]
    assert [c.name for c in required.calls] == ["lookup"]
    messages = await chats.list_messages(world.db, chat_id, after_seq=0, limit=10)
    assert [m.role for m in messages] == ["user", "assistant", "tool"]
    assert json.loads(messages[2].content[0]["output"]) == {"result": 42}


async def test_running_chats_resume_after_a_restart(db: Database) -> None:
    owner = await users.create_user(db, "bob")
    async with open_fake_llm() as llm:
        await register_default_model(db, base_url=f"{llm.url}/v1")
        chat_id = uuid.uuid4()
        # The first attempt hangs (the first engine goes away during it); later ones answer.
        text = f"{marker(chunks=2, fault='silent', fault_after_chunks=1, fault_times=1)} hi"
        async with open_engine(db, EngineOptions(worker_id="worker-a", shard_count=2)) as first:
            await first.router.ask(chat_id, CreateChatRequest(owner.id, uuid.uuid4(), text))
            await World(db, first, llm, owner.id).until(
                chat_id, lambda e: isinstance(e, MessagePart)
            )
        stopped = await chats.get_chat(db, chat_id)
        assert stopped is not None
        assert stopped.status is ChatStatus.RUNNING

        async with open_engine(db, EngineOptions(worker_id="worker-b", shard_count=2)) as second:
            events = await World(db, second, llm, owner.id).until_status(
                chat_id, ChatStatus.WAITING
            )
        assert any(isinstance(e, CommittedMessage) and e.role == "assistant" for e in events)
        done = await chats.get_chat(db, chat_id)
        assert done is not None
        assert done.generation_attempt == stopped.generation_attempt + 1
        assert llm.request_count == 2


async def test_a_429_is_retried_after_its_retry_after(
    world: World, mock_clock: trio.testing.MockClock
) -> None:
    text = f"{marker(chunks=2, fault='rate_limit', retry_after_s=3, fault_times=1)} hi"
    chat_id = await world.create(text)
    events = await world.until(chat_id, lambda e: isinstance(e, RetryScheduled))
    [retry] = [e for e in events if isinstance(e, RetryScheduled)]
    assert (retry.attempt, retry.delay_s, retry.failure.kind.value) == (2, 3.0, "rate_limit")
    chat = await chats.get_chat(world.db, chat_id)
    assert chat is not None
    assert chat.retry_count == 1, "the attempt count must be durable"
    assert chat.retry_at is not None

    mock_clock.jump(2.9)
    assert world.llm.request_count == 1
    mock_clock.jump(0.2)
    await world.until_status(chat_id, ChatStatus.WAITING)
    assert world.llm.request_count == 2
    assert (await world.texts(chat_id))[1] == ("assistant", "w1 w2 ")


async def test_the_action_deadline_cancels_the_pending_calls(
    world: World, mock_clock: trio.testing.MockClock
) -> None:
    calls = [{"name": "lookup", "arguments": {"word": "late"}}]
    chat_id = await world.create(f"{marker(tool_calls=calls)} go", tools=(LOOKUP,))
    await world.until(chat_id, lambda e: isinstance(e, ActionRequired))
    mock_clock.jump(301)
    await world.until_status(chat_id, ChatStatus.WAITING)
    messages = await chats.list_messages(world.db, chat_id, after_seq=0, limit=10)
    assert [m.role for m in messages] == ["user", "assistant", "tool"]
    result = messages[2].content[0]
    assert result["is_error"] is True
    assert json.loads(result["output"])["error"] == "cancelled"


async def test_passivation_and_reactivation_keep_the_state(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    owner = await users.create_user(db, "carol")
    async with open_fake_llm() as llm:
        await register_default_model(db, base_url=f"{llm.url}/v1")
        options = EngineOptions(worker_id="w", shard_count=2, idle_timeout_s=60)
        async with open_engine(db, options) as engine:
            world = World(db, engine, llm, owner.id)
            chat_id = await world.create(f"{marker(chunks=2)} remember me")
            await world.until_status(chat_id, ChatStatus.WAITING)
            behavior = engine.supervisor.behavior(chat_id)
            assert isinstance(behavior, ChatActor)
            before = behavior.state

            mock_clock.jump(61)
            with trio.fail_after(10):
                await engine.supervisor.wait_until(
                    lambda: engine.supervisor.behavior(chat_id) is None
                )
            assert engine.supervisor.stats.passivations == 1

            await engine.router.ask(chat_id, SetArchived(archived=False))  # reactivates it
            again = engine.supervisor.behavior(chat_id)
            assert isinstance(again, ChatActor)
            assert again is not behavior
            assert again.state == before


async def test_a_chat_whose_actor_keeps_crashing_is_parked_in_error(world: World) -> None:
    chat_id = await world.create(f"{marker(chunks=1)} fine so far")
    await world.until_status(chat_id, ChatStatus.WAITING)
    # Corrupt the stored history behind the engine's back: loading the chat now fails.
    await world.db.execute(
        'UPDATE chat_messages SET content = \'[{"type": "hologram"}]\' WHERE chat_id = $1',
        chat_id,
    )
    # Another worker takes the shards over once this one has let go of them.
    world.engine.supervisor.shutdown()
    with trio.fail_after(10):
        await world.engine.supervisor.wait_until(lambda: world.engine.supervisor.stopped)
    async with open_engine(world.db, EngineOptions(worker_id="w3", shard_count=4)) as fresh:
        with pytest.raises(ActorDead):
            await fresh.router.ask(chat_id, SetArchived(archived=True))
        with trio.fail_after(10):
            await fresh.supervisor.wait_until(lambda: fresh.supervisor.stats.parked == 1)
        assert fresh.supervisor.stats.restarts >= 1
    chat = await chats.get_chat(world.db, chat_id)
    assert chat is not None
    assert chat.status is ChatStatus.ERROR
    assert chat.last_error is not None
    assert chat.last_error["provider"] == "chatd"


async def test_a_nul_character_from_the_model_does_not_break_the_commit(world: World) -> None:
    knobs = marker(chunks=1, reply="a\u0000b")
    chat_id = await world.create(f"{knobs} hi")
    await world.until_status(chat_id, ChatStatus.WAITING)
    assert (await world.texts(chat_id))[1] == ("assistant", "a\ufffdb")


async def test_a_reconnect_mid_answer_resumes_without_gap_or_repeat(world: World) -> None:
    chat_id = await world.create(f"{marker(chunks=60, chunk_interval_ms=10)} long")
    first: list[str] = []
    cursor = StreamCursor()
    with trio.fail_after(30):
        async with world.engine.hub.subscribe(chat_id, None) as events:
            async for batch in events:
                for e in batch:
                    if isinstance(e, CommittedMessage):
                        cursor = StreamCursor(message_seq=e.seq)
                    if isinstance(e, MessagePart) and isinstance(e.part, TextDelta):
                        first.append(e.part.text)
                        cursor = StreamCursor(cursor.message_seq, e.episode, e.seq)
                if len(first) >= 10:
                    break
    assert cursor.episode is not None

    events_after = await world.until(
        chat_id,
        lambda e: isinstance(e, StatusChanged) and e.status is ChatStatus.WAITING,
        cursor=cursor,
    )
    rest = [
        e.part.text
        for e in events_after
        if isinstance(e, MessagePart) and isinstance(e.part, TextDelta)
    ]
    [answer] = [
        e for e in events_after if isinstance(e, CommittedMessage) and e.role == "assistant"
    ]
    committed = "".join(p.text for p in answer.content if isinstance(p, TextPart))
    assert "".join(first + rest) == committed
    assert committed == "".join(f"w{i} " for i in range(1, 61))


async def test_a_builtin_tool_step_continues_until_the_model_stops(world: World) -> None:
    calls = [{"name": "calculate", "arguments": {"expression": "2**10"}}]
    chat_id = await world.create(f"{marker(tool_calls=calls, chunks=1)} compute")
    await world.until_status(chat_id, ChatStatus.WAITING)
    messages = await chats.list_messages(world.db, chat_id, after_seq=0, limit=10)
    assert [m.role for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert json.loads(messages[2].content[0]["output"]) == {"result": 1024}
    second = world.llm.requests[1].body["messages"]
    assert second[-1]["role"] == "tool"


async def test_invalid_dynamic_tools_are_refused_and_nothing_is_written(world: World) -> None:
    chat_id = uuid.uuid4()
    clash = ToolSpec("calculate", "mine", {"type": "object"})
    with pytest.raises(InvalidCommand) as refused:
        await world.engine.router.ask(
            chat_id, CreateChatRequest(world.owner, uuid.uuid4(), "hi", dynamic_tools=(clash,))
        )
    assert refused.value.field == "dynamic_tools[0].name"
    assert await chats.get_chat(world.db, chat_id) is None


# -- user feeds: inbox notifications and watch events ---------------------------------------


class FeedLog(Generic[T]):
    """Everything a user feed delivers to one subscriber, for a test to wait on."""

    def __init__(self, feed: UserFeed[T], user_id: uuid.UUID) -> None:
        self.feed = feed
        self.user_id = user_id
        self.items: list[T] = []
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.feed.subscribe(self.user_id) as sub:
            task_status.started()
            async for batch in sub:
                self.items.extend(batch)
                self._changed.set()
                self._changed = trio.Event()

    async def until(self, predicate: Callable[[list[T]], bool]) -> list[T]:
        with trio.fail_after(30):
            while not predicate(self.items):
                await self._changed.wait()
        return self.items


async def notifications_of(db: Database, chat_id: uuid.UUID) -> list[InboxNotification]:
    rows = await db.fetch(
        "SELECT * FROM inbox_notifications WHERE chat_id = $1 ORDER BY created_at, id", chat_id
    )
    return [inbox_notification_from_row(row) for row in rows]


async def test_inbox_notifications_are_written_with_their_turn_and_published(
    world: World,
) -> None:
    feed = FeedLog(world.engine.inbox, world.owner)
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)

        done = await world.create(f"{marker(chunks=100)} a long answer please")
        await world.until_status(done, ChatStatus.WAITING)
        failed = await world.create(f"{marker(fault='auth')} hi")
        await world.until_status(failed, ChatStatus.ERROR)
        calls = [{"name": "lookup", "arguments": {"word": "trio"}}]
        tooled = await world.create(f"{marker(tool_calls=calls)} define", tools=(LOOKUP,))
        events = await world.until(tooled, lambda e: isinstance(e, ActionRequired))
        [required] = [e for e in events if isinstance(e, ActionRequired)]
        await world.engine.router.ask(
            tooled, SubmitToolResults((ToolResult(required.calls[0].id, "{}"),))
        )
        await world.until_status(tooled, ChatStatus.WAITING)
        await feed.until(lambda items: len(items) >= 4)
        nursery.cancel_scope.cancel()

    [reply] = await notifications_of(world.db, done)
    assert (reply.user_id, reply.kind, reply.title) == (world.owner, "turn_finished", "Reply ready")
    assert reply.body.startswith("w1 w2 w3 ")
    assert len(reply.body) <= 200
    assert reply.body.endswith("\u2026")
    answer = (await chats.list_messages(world.db, done, after_seq=1, limit=1))[0]
    # Both rows carry the time of their transaction: the notification came with the answer.
    assert reply.created_at == answer.created_at

    [failure] = await notifications_of(world.db, failed)
    chat = await chats.get_chat(world.db, failed)
    assert chat is not None
    assert chat.last_error is not None
    assert (failure.kind, failure.title, failure.body) == (
        "failed",
        "Chat failed",
        chat.last_error["message"],
    )
    assert failure.created_at == chat.updated_at  # the commit that stopped it in error

    action, finished = await notifications_of(world.db, tooled)
    assert (action.kind, action.title, action.body) == (
        "action_required",
        "Tool results needed",
        "lookup",
    )
    assert (finished.kind, finished.title) == ("turn_finished", "Reply ready")
    first_answer = (await chats.list_messages(world.db, tooled, after_seq=1, limit=1))[0]
    assert action.created_at == first_answer.created_at

    # One row per turn, each published once, in commit order, once committed.
    assert feed.items == [reply, failure, action, finished]
    page = await inbox.list_notifications(world.db, world.owner)
    assert page.unread_count == 4


async def test_watch_events_go_to_the_owner_only(world: World) -> None:
    bob = await users.create_user(world.db, "bob")
    mine = FeedLog(world.engine.watch, world.owner)
    theirs = FeedLog(world.engine.watch, bob.id)
    async with trio.open_nursery() as nursery:
        await nursery.start(mine.run)
        await nursery.start(theirs.run)

        quick = await world.create(f"{marker(chunks=1)} hi", title="Quick one")
        await world.until_status(quick, ChatStatus.WAITING)
        await world.engine.router.ask(quick, SetArchived(archived=True))
        calls = [{"name": "lookup", "arguments": {"word": "trio"}}]
        tooled = await world.create(f"{marker(tool_calls=calls)} define", tools=(LOOKUP,))
        events = await world.until(tooled, lambda e: isinstance(e, ActionRequired))
        [required] = [e for e in events if isinstance(e, ActionRequired)]
        await mine.until(
            lambda items: (
                any(isinstance(e, ChatActionRequired) for e in items)
                and any(isinstance(e, ChatStatusChanged) and e.archived for e in items)
            )
        )

        # Bob's subscriber got nothing of Alice's: the first thing it sees is this.
        hello = ChatTitleChanged(uuid.uuid4(), "for bob")
        world.engine.watch.publish(bob.id, hello)
        await theirs.until(bool)
        assert theirs.items == [hello]
        nursery.cancel_scope.cancel()

    assert [e for e in mine.items if e.chat_id == quick] == [
        ChatCreated(quick, "Quick one", ChatStatus.RUNNING, False),  # created running
        ChatStatusChanged(quick, ChatStatus.WAITING, False),
        ChatStatusChanged(quick, ChatStatus.WAITING, True),
    ]
    assert [e for e in mine.items if e.chat_id == tooled] == [
        ChatCreated(tooled, "", ChatStatus.RUNNING, False),
        ChatStatusChanged(tooled, ChatStatus.REQUIRES_ACTION, False),
        ChatActionRequired(tooled, required.calls, required.deadline),
    ]


async def test_the_users_prompt_follows_the_chats_system_prompt(world: World) -> None:
    def system_of(index: int) -> object:
        first = world.llm.requests[index].body["messages"][0]
        assert first["role"] == "system"
        return first["content"]

    await prompts.put_user_prompt(world.db, world.owner, "Answer in French.")
    chat_id = await world.create(f"{marker(chunks=1)} hi", system_prompt="You are chatd.")
    await world.until_status(chat_id, ChatStatus.WAITING)
    assert system_of(0) == "You are chatd.\n\nAnswer in French."

    # Changed behind the cache's back: the next turn still uses the cached prompt ...
    await prompts.put_user_prompt(world.db, world.owner, "Answer in German.")
    await world.engine.router.ask(chat_id, SendMessage(uuid.uuid4(), f"{marker(chunks=1)} and?"))
    await world.until_status(chat_id, ChatStatus.WAITING)
    assert system_of(1) == "You are chatd.\n\nAnswer in French."

    # ... and the writer's invalidation makes the very next turn see the new one.
    world.engine.config.invalidate_user_prompt(world.owner)
    await world.engine.router.ask(chat_id, SendMessage(uuid.uuid4(), f"{marker(chunks=1)} so?"))
    await world.until_status(chat_id, ChatStatus.WAITING)
    assert system_of(2) == "You are chatd.\n\nAnswer in German."
    assert world.engine.config.user_prompts.stats.loads == 2  # once warm, no query per turn


def test_system_text_joins_what_is_there() -> None:
    assert system_text("You are chatd.", "Be brief.") == "You are chatd.\n\nBe brief."
    assert system_text("", "Be brief.") == "Be brief."
    assert system_text("You are chatd.", None) == "You are chatd."
    assert system_text("You are chatd.", "") == "You are chatd."
    assert system_text("", None) == ""


def test_engine_options_take_the_tool_limits_from_settings() -> None:
    settings = Settings(
        max_tools_per_chat=3,
        max_tool_description_chars=10,
        max_tool_schema_bytes=100,
        max_tool_schema_depth=4,
    )
    options = EngineOptions.from_settings(settings, worker_id="w")
    assert options.tool_limits == ToolLimits(
        max_tools=3, max_description_chars=10, max_schema_bytes=100, max_schema_depth=4
    )


async def test_chats_are_created_within_the_engines_tool_limits(db: Database) -> None:
    owner = await users.create_user(db, "dave")
    options = EngineOptions(worker_id="w", shard_count=2, tool_limits=ToolLimits(max_tools=1))
    async with open_engine(db, options) as engine:
        two = (LOOKUP, ToolSpec("other", "", {"type": "object"}))
        with pytest.raises(InvalidCommand) as refused:
            await engine.router.ask(
                uuid.uuid4(), CreateChatRequest(owner.id, uuid.uuid4(), "hi", dynamic_tools=two)
            )
        assert refused.value.field == "dynamic_tools"


async def test_a_chat_whose_model_config_is_deleted_follows_the_default(world: World) -> None:
    default = await providers.get_default_model_config(world.db)
    assert default is not None
    other = await providers.create_model_config(
        world.db,
        provider_id=default.provider_id,
        name="other",
        model="other-model",
        context_limit=1000,
    )
    chat_id = uuid.uuid4()
    request = CreateChatRequest(
        world.owner, uuid.uuid4(), f"{marker(chunks=1)} hi", model_config_id=other.id
    )
    await world.engine.router.ask(chat_id, request)
    await world.until_status(chat_id, ChatStatus.WAITING)
    assert world.llm.requests[-1].body["model"] == "other-model"

    await providers.delete_model_config(world.db, other.id)
    world.engine.config.invalidate_model_config(other.id)
    await world.engine.router.ask(chat_id, SendMessage(uuid.uuid4(), f"{marker(chunks=1)} again"))
    events = await world.until_status(chat_id, ChatStatus.WAITING)
    assert not any(isinstance(e, ErrorRaised) for e in events)
    assert world.llm.requests[-1].body["model"] == default.model


def test_an_outcome_an_outage_cut_short_is_committed_only_while_the_chat_awaits_it() -> None:
    running = ChatState(uuid.uuid4(), ChatStatus.RUNNING, history_version=1, generation_attempt=2)
    step = StepCompleted(running.episode, (TextPart("done"),), None)
    assert awaits(running, step)
    assert not awaits(replace(running, generation_attempt=3), step)  # another attempt runs
    assert not awaits(replace(running, status=ChatStatus.WAITING), step)  # it went through
    assert not awaits(replace(running, retry_at=1.0), step)  # a retry is armed instead
    kept = GenerationStopped(running.episode, (TextPart("part"),))
    assert awaits(replace(running, status=ChatStatus.INTERRUPTING), kept)
    assert not awaits(running, kept)
