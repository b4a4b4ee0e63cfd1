"""The engine through a PostgreSQL outage: real PostgreSQL behind a TCP proxy the test cuts.

The outage strikes mid-turn: the answer streams on (the provider is up) but its commit fails;
the actor must wait the outage out without spending its restart budget or parking the chat,
and the turn must complete once the database answers again, with no user action, committing
the answer already generated rather than asking the model again. Real time
(the fake provider streams over real sockets) with small retry delays; every wait has a deadline.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest
import trio

from chatd.actors.chat_actor import CommandNotCommitted, CreateChatRequest, hidden_state_events
from chatd.actors.engine import Engine, EngineOptions, open_engine
from chatd.actors.errors import ActorDead
from chatd.config import Settings, SettingsError
from chatd.domain.chat_state import ChatState
from chatd.domain.chat_status import ChatStatus
from chatd.domain.conversation import TextPart
from chatd.domain.effects import MessageAccepted
from chatd.domain.events import (
    ActionRequired,
    ChatEvent,
    CommittedMessage,
    Episode,
    ErrorRaised,
    HistoryReset,
    MessagePart,
    PendingToolCall,
    PreviewReset,
    QueuedEntry,
    QueueUpdated,
    RetryScheduled,
    StatusChanged,
)
from chatd.domain.mailbox import EditMessage, SendMessage, SetArchived
from chatd.domain.provider_failure import ErrorKind, ProviderFailure
from chatd.domain.stream_parts import TextDelta
from chatd.domain.watch_events import ChatStatusChanged
from chatd.providers.fake import FakeLLM, knobs_marker, open_fake_llm
from chatd.runtime import register_default_model
from chatd.store import chats, users
from chatd.store.chats import AppendMessage, Enqueue, UpdateChat
from chatd.store.database import Database, DatabaseUnavailable
from chatd.web.errors import api_error_for
from tests.faults.proxy import PgProxy, open_pg_proxy

DEADLINE_S = 20
QUEUED_ID = uuid.UUID(int=7)
ANSWER = "".join(f"w{i} " for i in range(1, 41))


@dataclass
class Outage:
    db: Database  # direct: what the test reads and writes, never cut
    proxied: Database  # through the proxy: what the engine uses
    proxy: PgProxy
    engine: Engine
    llm: FakeLLM
    owner: uuid.UUID


@pytest.fixture
async def outage(db: Database, database_url: str) -> AsyncIterator[Outage]:
    owner = await users.create_user(db, "olga")
    async with (
        open_fake_llm() as llm,
        open_pg_proxy(database_url) as proxy,
        Database.connect(
            proxy.url_for(database_url), min_size=1, max_size=4, connect_timeout_s=5
        ) as proxied,
    ):
        await register_default_model(db, base_url=f"{llm.url}/v1")
        options = EngineOptions(
            worker_id="worker-o",
            shard_count=4,
            lease_ttl_s=30.0,
            restart_limit=1,  # two crashes would park the chat
            db_retry_base_delay_s=0.05,
            db_retry_max_delay_s=0.4,
        )
        async with open_engine(proxied, options) as engine:
            yield Outage(db, proxied, proxy, engine, llm, owner.id)


async def test_a_database_outage_mid_turn_is_waited_out_and_the_turn_completes(
    outage: Outage,
) -> None:
    sup = outage.engine.supervisor
    chat_id = uuid.uuid4()
    text = f"{knobs_marker(chunks=40, chunk_interval_ms=25)} tell me"
    seen: list[ChatEvent] = []
    await outage.engine.router.ask(chat_id, CreateChatRequest(outage.owner, uuid.uuid4(), text))
    async with outage.engine.hub.subscribe(chat_id, None) as events:
        with trio.fail_after(DEADLINE_S):
            async for batch in events:
                seen.extend(batch)
                if any(isinstance(e, MessagePart) for e in batch):
                    break
        outage.proxy.cut()  # mid-stream: the answer goes on, its commit will fail

        # The step's commit fails, and so does every reload while the database is away.
        with trio.fail_after(DEADLINE_S):
            await sup.wait_until(lambda: sup.stats.outages >= 3)
        # A message meanwhile is refused at once (the edge answers 503), not left hanging.
        with trio.fail_after(2), pytest.raises(ActorDead, match="database"):
            await outage.engine.router.ask(chat_id, SetArchived(archived=True))
        assert (sup.stats.crashes, sup.stats.restarts, sup.stats.parked) == (0, 0, 0)

        outage.proxy.restore()
        back = trio.current_time()
        with trio.fail_after(DEADLINE_S):
            async for batch in events:
                seen.extend(batch)
                if any(
                    isinstance(e, StatusChanged) and e.status is ChatStatus.WAITING for e in batch
                ):
                    break
        recovery_s = trio.current_time() - back

    # Waited out, never counted as a crash nor parked; the answer is committed once.
    assert (sup.stats.crashes, sup.stats.restarts, sup.stats.parked) == (0, 0, 0)
    assert sup.stats.outage_restarts >= 1
    chat = await chats.get_chat(outage.db, chat_id)
    assert chat is not None
    assert chat.status is ChatStatus.WAITING
    # The step the outage cut short is committed by the restart, not generated again.
    assert chat.generation_attempt == 1
    assert outage.llm.request_count == 1
    messages = await chats.list_messages(outage.db, chat_id, after_seq=0, limit=10)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert "".join(str(p.get("text")) for p in messages[1].content) == ANSWER

    # From the outside: the answer streamed once, then arrived once as a committed message.
    assert not [e for e in seen if isinstance(e, PreviewReset)]
    parts = [
        e.part.text for e in seen if isinstance(e, MessagePart) and isinstance(e.part, TextDelta)
    ]
    assert "".join(parts) == ANSWER
    answers = [e for e in seen if isinstance(e, CommittedMessage) and e.role == "assistant"]
    assert len(answers) == 1
    assert "".join(p.text for p in answers[0].content if isinstance(p, TextPart)) == ANSWER
    # Nothing to generate again: the turn completes within the retry delay of the outage's end.
    assert recovery_s < 2, f"the turn completed {recovery_s:.1f} s after the database came back"


async def test_a_commit_that_went_through_although_the_outage_cut_it_is_published_after(
    outage: Outage,
) -> None:
    sup = outage.engine.supervisor
    chat_id = uuid.uuid4()
    text = f"{knobs_marker(chunks=20, chunk_interval_ms=25)} tell me"
    await outage.engine.router.ask(chat_id, CreateChatRequest(outage.owner, uuid.uuid4(), text))
    seen: list[ChatEvent] = []
    async with (
        outage.engine.hub.subscribe(chat_id, None) as events,
        outage.engine.watch.subscribe(outage.owner) as watch,
    ):
        with trio.fail_after(DEADLINE_S):
            async for batch in events:
                seen.extend(batch)
                if any(isinstance(e, MessagePart) for e in batch):
                    break
        outage.proxy.cut()
        with trio.fail_after(DEADLINE_S):
            await sup.wait_until(lambda: sup.stats.outages >= 1)  # the answer's commit failed
        # ... as the actor saw it: the connection died after the COMMIT had reached the server.
        stored = await chats.get_chat(outage.db, chat_id)
        assert stored is not None
        assert stored.status is ChatStatus.RUNNING
        written = AppendMessage(
            id=uuid.uuid4(),
            seq=2,
            role="assistant",
            content=[{"type": "text", "text": "as committed"}],
            history_version=stored.history_version,
        )
        fence = sup.fences[sup.shard_of(chat_id)]
        await chats.commit(
            outage.db, fence, chat_id, [written, UpdateChat(status=ChatStatus.WAITING)]
        )

        outage.proxy.restore()
        with trio.fail_after(DEADLINE_S):
            async for batch in events:
                seen.extend(batch)
                if any(
                    isinstance(e, StatusChanged) and e.status is ChatStatus.WAITING for e in batch
                ):
                    break
            async for watch_batch in watch:
                if any(
                    isinstance(e, ChatStatusChanged) and e.status is ChatStatus.WAITING
                    for e in watch_batch
                ):
                    break

    # The restart found the answer committed: it told the subscribers, and asked no model.
    answers = [e for e in seen if isinstance(e, CommittedMessage) and e.role == "assistant"]
    assert [(e.id, e.seq) for e in answers] == [(written.id, 2)]
    assert outage.llm.request_count == 1
    chat = await chats.get_chat(outage.db, chat_id)
    assert chat is not None
    assert (chat.status, chat.generation_attempt) == (ChatStatus.WAITING, 1)
    assert (sup.stats.crashes, sup.stats.parked) == (0, 0)


async def test_a_message_refused_by_an_outage_leaves_the_streaming_answer_alone(
    outage: Outage,
) -> None:
    sup = outage.engine.supervisor
    router = outage.engine.router
    chat_id = uuid.uuid4()
    text = f"{knobs_marker(chunks=60, chunk_interval_ms=25)} a long one"
    await router.ask(chat_id, CreateChatRequest(outage.owner, uuid.uuid4(), text))
    seen: list[ChatEvent] = []
    async with outage.engine.hub.subscribe(chat_id, None) as events:
        with trio.fail_after(DEADLINE_S):
            async for batch in events:
                seen.extend(batch)
                if any(isinstance(e, MessagePart) for e in batch):
                    break
        outage.proxy.cut()
        # Its commit fails: refused (a 503 at the edge), and the answer streams on.
        with trio.fail_after(5), pytest.raises(CommandNotCommitted, match="PostgreSQL"):
            await router.ask(chat_id, SendMessage(uuid.uuid4(), "lost in the outage"))
        with trio.fail_after(5), pytest.raises(CommandNotCommitted):
            await router.ask(chat_id, SendMessage(uuid.uuid4(), "still down"))
        outage.proxy.restore()
        # The chat is the stored one (nothing went through): the next message is taken.
        with trio.fail_after(DEADLINE_S):
            reply = await router.ask(
                chat_id, SendMessage(uuid.uuid4(), f"{knobs_marker(chunks=2)} next")
            )
        assert isinstance(reply, MessageAccepted)
        assert reply.queued
        with trio.fail_after(DEADLINE_S):
            async for batch in events:
                seen.extend(batch)
                if any(
                    isinstance(e, CommittedMessage) and e.role == "assistant" and e.seq == 4
                    for e in batch
                ):
                    break

    assert sup.stats.outages == 0, "the actor lived through it"
    assert outage.llm.request_count == 2, "the first answer was not generated again"
    messages = await chats.list_messages(outage.db, chat_id, after_seq=0, limit=10)
    texts = [(m.role, "".join(str(p.get("text")) for p in m.content)) for m in messages]
    assert texts[1] == ("assistant", "".join(f"w{i} " for i in range(1, 61)))
    assert [role for role, _ in texts] == ["user", "assistant", "user", "assistant"]
    assert not any("outage" in text or "still down" in text for _, text in texts)
    assert not [e for e in seen if isinstance(e, PreviewReset)]


async def test_a_refused_command_that_went_through_after_all_is_found_by_a_reload(
    outage: Outage,
) -> None:
    sup = outage.engine.supervisor
    router = outage.engine.router
    chat_id = uuid.uuid4()
    text = f"{knobs_marker(chunks=60, chunk_interval_ms=50)} a long one"
    await router.ask(chat_id, CreateChatRequest(outage.owner, uuid.uuid4(), text))
    seen: list[ChatEvent] = []
    async with outage.engine.hub.subscribe(chat_id, None) as events:
        with trio.fail_after(DEADLINE_S):
            async for batch in events:
                seen.extend(batch)
                if any(isinstance(e, MessagePart) for e in batch):
                    break
        outage.proxy.cut()
        with trio.fail_after(5), pytest.raises(CommandNotCommitted):
            await router.ask(chat_id, SendMessage(uuid.uuid4(), "queue me"))
        # ... but its commit had reached the server: the stored chat has it queued.
        queued = uuid.uuid4()
        went_through = f"{knobs_marker(chunks=2)} queue me"
        content = [{"type": "text", "text": went_through}]
        fence = sup.fences[sup.shard_of(chat_id)]
        await chats.commit(
            outage.db, fence, chat_id, [Enqueue(id=queued, position=1, content=content)]
        )
        outage.proxy.restore()
        # The stored chat is not the actor's: it refuses commands until it has reloaded it.
        with trio.fail_after(5), pytest.raises((CommandNotCommitted, ActorDead)):
            await router.ask(chat_id, SendMessage(uuid.uuid4(), "too early"))
        with trio.fail_after(DEADLINE_S):
            async for batch in events:
                seen.extend(batch)
                if any(
                    isinstance(e, StatusChanged) and e.status is ChatStatus.WAITING for e in batch
                ):
                    break

    assert sup.stats.outages == 1  # the reload
    assert (sup.stats.crashes, sup.stats.parked) == (0, 0)
    assert outage.llm.request_count == 2, "the long answer was committed, not generated again"
    messages = await chats.list_messages(outage.db, chat_id, after_seq=0, limit=10)
    texts = [(m.role, "".join(str(p.get("text")) for p in m.content)) for m in messages]
    assert texts == [
        ("user", text),
        ("assistant", "".join(f"w{i} " for i in range(1, 61))),
        ("user", went_through),
        ("assistant", "w1 w2 "),
    ]
    assert any(isinstance(e, QueueUpdated) and [q.id for q in e.queue] == [queued] for e in seen), (
        "the subscribers were told of the message queued behind the actor's back"
    )


async def _until(
    events: AsyncIterator[list[ChatEvent]],
    seen: list[ChatEvent],
    done: type[object],
    **want: object,
) -> None:
    """Read ``events`` into ``seen`` until an event of type ``done`` with the fields ``want``."""
    with trio.fail_after(DEADLINE_S):
        async for batch in events:
            seen.extend(batch)
            if any(
                isinstance(e, done) and all(getattr(e, k) == v for k, v in want.items())
                for e in batch
            ):
                return


async def test_an_edit_committed_with_its_acknowledgement_lost_resets_a_connected_stream(
    db: Database, database_url: str
) -> None:
    """The edit's COMMIT went through, the connection died before its answer: the restarted
    actor must tell a subscriber that stayed connected what the commit did, the history reset
    first (its cursor only moves forward: reconnecting could not repair it), exactly once."""
    owner = await users.create_user(db, "erin")
    async with (
        open_fake_llm() as llm,
        open_pg_proxy(database_url) as proxy,
        Database.connect(
            proxy.url_for(database_url), min_size=1, max_size=4, connect_timeout_s=5
        ) as proxied,
    ):
        await register_default_model(db, base_url=f"{llm.url}/v1")
        options = EngineOptions(
            worker_id="worker-e",
            shard_count=4,
            lease_ttl_s=30.0,
            restart_limit=1,
            db_retry_base_delay_s=0.05,
            db_retry_max_delay_s=0.4,
        )
        async with open_engine(proxied, options) as engine:
            sup = engine.supervisor
            chat_id = uuid.uuid4()
            first = uuid.uuid4()
            text = f"{knobs_marker(chunks=2)} first"
            await engine.router.ask(chat_id, CreateChatRequest(owner.id, first, text))
            seen: list[ChatEvent] = []
            async with engine.hub.subscribe(chat_id, None) as events:
                await _until(events, seen, StatusChanged, status=ChatStatus.WAITING)
                assert [e.seq for e in seen if isinstance(e, CommittedMessage)] == [1, 2]
                seen.clear()
                marker = f"edited-{uuid.uuid4().hex}"
                edited = f"{knobs_marker(chunks=3)} {marker}"
                trigger = proxy.arm(marker.encode(), action="cut", at="reply")
                with trio.fail_after(DEADLINE_S), pytest.raises((ActorDead, DatabaseUnavailable)):
                    await engine.router.ask(chat_id, EditMessage(first, uuid.uuid4(), edited))
                assert trigger.fired.is_set()
                proxy.restore()
                await _until(events, seen, StatusChanged, status=ChatStatus.WAITING)

            assert sup.stats.outages >= 1
            messages = await chats.list_messages(db, chat_id, after_seq=0, limit=10)
            assert [(m.seq, m.role) for m in messages] == [(3, "user"), (4, "assistant")]
            resets = [e for e in seen if isinstance(e, HistoryReset)]
            # Nothing left before the edited message (seq 1); a version newer than the old turn's.
            assert [r.after_seq for r in resets] == [0], seen
            assert resets[0].history_version >= messages[0].history_version - 1
            committed = [(e.seq, e.role) for e in seen if isinstance(e, CommittedMessage)]
            assert committed == [(3, "user"), (4, "assistant")]
            # The reset comes before the edited turn's messages, as it did live.
            first_message = next(i for i, e in enumerate(seen) if isinstance(e, CommittedMessage))
            assert seen.index(resets[0]) < first_message


FAILURE = ProviderFailure(ErrorKind.RATE_LIMIT, "openai", 429, True, 30.0, "Slow down", "")
CALL = PendingToolCall("c1", "lookup", "{}")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # A retry armed: the chat stays running in the same episode.
        (
            {"retry_count": 1, "retry_at": 1030.0, "last_error": FAILURE},
            [RetryScheduled(2, 30.0, FAILURE, 1030.0)],
        ),
        # The retry timer fired: a new attempt, a new episode to stream.
        (
            {"generation_attempt": 2},
            [StatusChanged(ChatStatus.RUNNING, False, 3, 2), PreviewReset(Episode(3, 2))],
        ),
        # A step with a dynamic tool call: the calls wait on the owner.
        (
            {
                "status": ChatStatus.REQUIRES_ACTION,
                "history_version": 4,
                "last_message_seq": 4,
                "pending_calls": (CALL,),
                "action_deadline": 1300.0,
            },
            [
                StatusChanged(ChatStatus.REQUIRES_ACTION, False, 4, 1),
                ActionRequired((CALL,), 1300.0),
            ],
        ),
        # Given up: the details before the status they explain.
        (
            {"status": ChatStatus.ERROR, "last_error": FAILURE},
            [ErrorRaised(FAILURE), StatusChanged(ChatStatus.ERROR, False, 3, 1)],
        ),
        # A message queued behind the run.
        (
            {"queue": (QueuedEntry(QUEUED_ID, "next"),)},
            [QueueUpdated((QueuedEntry(QUEUED_ID, "next"),))],
        ),
        (
            {},
            [],
        ),
    ],
)
def test_a_lost_commits_state_events_are_derived_from_the_two_states(
    changes: dict[str, object], expected: list[ChatEvent]
) -> None:
    published = ChatState(
        uuid.uuid4(),
        status=ChatStatus.RUNNING,
        history_version=3,
        generation_attempt=1,
        last_message_seq=3,
    )
    stored = replace(published, **changes)  # type: ignore[arg-type]
    assert hidden_state_events(published, stored, now=1000.0) == expected


def test_the_outage_settings_are_validated_and_reach_the_engine() -> None:
    with pytest.raises(SettingsError, match=r"db_retry_base_delay_s .* must not exceed"):
        Settings(db_retry_base_delay_s=5.0, db_retry_max_delay_s=1.0)
    with pytest.raises(SettingsError, match=r"resume_sweep_interval_s .* greater than 0"):
        Settings(resume_sweep_interval_s=0)
    settings = Settings.load(
        {"CHATD_DB_RETRY_MAX_DELAY_S": "3", "CHATD_RESUME_SWEEP_INTERVAL_S": "9"}
    )
    options = EngineOptions.from_settings(settings, worker_id="w")
    assert (
        options.db_retry_base_delay_s,
        options.db_retry_max_delay_s,
        options.resume_sweep_interval_s,
    ) == (0.25, 3.0, 9.0)


def test_a_command_refused_by_an_outage_is_a_503_with_retry_after_at_the_edge() -> None:
    error = api_error_for(CommandNotCommitted("cannot reach PostgreSQL"))
    assert error is not None
    assert error.status == 503
    assert error.headers["Retry-After"].isdigit()
