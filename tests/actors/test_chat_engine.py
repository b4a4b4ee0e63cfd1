"""The engine end to end, driven through the Router as the edge will drive it.

Real PostgreSQL, the fake provider over real HTTP through the OpenAI adapter, the real
Supervisor, ChatActors and hub. Waits are on hub events with deadlines; timers run on a
MockClock that the tests jump by hand (autojump would race the real sockets).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from chatd.actors.chat_actor import ChatActor, CreateChatRequest
from chatd.actors.engine import Engine, EngineOptions, open_engine
from chatd.actors.errors import ActorDead
from chatd.actors.hub import StreamCursor
from chatd.domain.chat_status import ChatStatus
from chatd.domain.conversation import TextPart, ToolSpec
from chatd.domain.effects import InvalidCommand, MessageAccepted, TransitionNotAllowed
from chatd.domain.events import (
    ActionRequired,
    ChatEvent,
    CommittedMessage,
    MessagePart,
    RetryScheduled,
    StatusChanged,
)
from chatd.domain.mailbox import (
    EditMessage,
    Interrupt,
    SendMessage,
    SetArchived,
    SubmitToolResults,
    ToolResult,
)
from chatd.domain.stream_parts import TextDelta
from chatd.providers.fake import FakeLLM, knobs_marker, open_fake_llm
from chatd.runtime import register_default_model
from chatd.store import chats, users
from chatd.store.database import Database

LOOKUP = ToolSpec(
    "lookup", "Look a word up", {"type": "object", "properties": {"word": {"type": "string"}}}
)


@dataclass
class World:
    db: Database
    engine: Engine
    llm: FakeLLM
    owner: uuid.UUID

    async def create(self, text: str, *, tools: tuple[ToolSpec, ...] = ()) -> uuid.UUID:
        chat_id = uuid.uuid4()
        reply = await self.engine.router.ask(
            chat_id,
            CreateChatRequest(self.owner, uuid.uuid4(), text, dynamic_tools=tools),
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
