"""The event hub against real PostgreSQL: resumable, exactly-once streams and slow consumers.

A ``ScriptedChat`` commits and publishes the way the ChatActor does (the commit first, then its
events with the commit's transaction id; parts as they stream), or holds a commit's events back
so that a subscriber's snapshot read lands between the commit and its publish (the moment that
delivered a retry twice, issue 11), and a ``Client`` model applies what a subscriber receives
the way a WebSocket client would, failing on any repeated or out-of-order message and any
repeated or missing part. Waits are on the readers' own change notifications under a deadline.
Slow consumer tests run on trio's MockClock: their database work is done on a clock that
follows real time (an autojump clock would jump across every database wait to the nearest
deadline), and the timed part, which never touches the database, on the autojump clock.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID, uuid4

import pytest
import trio
import trio.testing

from chatd.actors.chat_loader import StateKey, load_chat, state_key
from chatd.actors.hub import (
    SLOW_CONSUMER_CLOSE_CODE,
    ChatHub,
    CursorError,
    OwnerMoved,
    SlowConsumer,
    StreamCursor,
    Subscription,
)
from chatd.actors.stream_snapshot import snapshot_key
from chatd.domain.chat_status import ChatStatus
from chatd.domain.content_json import parts_to_json
from chatd.domain.conversation import TextPart, ToolCallPart, ToolResultPart
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
from chatd.domain.provider_failure import ErrorKind, ProviderFailure
from chatd.domain.stream_parts import TextDelta
from chatd.store.chat_snapshot import read_chat_snapshot
from chatd.store.chats import (
    AppendMessage,
    ChatWrite,
    Dequeue,
    Enqueue,
    SoftDeleteMessagesAfter,
    UpdateChat,
    commit,
)
from chatd.store.database import Database
from chatd.store.errors import NotFound
from chatd.store.leases import Fence
from tests.store.helpers import lease, make_chat, make_user

DEADLINE_S = 10

# -- a chat driven like the ChatActor drives it --------------------------------------------


@dataclass
class ScriptedChat:
    """Commits a transition, then publishes its events, as the actor does."""

    db: Database
    hub: ChatHub
    fence: Fence
    id: UUID
    history_version: int = 0
    generation_attempt: int = 0
    last_seq: int = 0
    part_seq: int = 0
    retry_count: int = 0
    streamed: list[str] = field(default_factory=list)
    queue: list[QueuedEntry] = field(default_factory=list)
    xid: int = 0  # of the last commit
    published: list[ChatEvent] = field(default_factory=list)  # every event, in publish order

    @property
    def episode(self) -> Episode:
        return Episode(self.history_version, self.generation_attempt)

    def status(self, status: ChatStatus) -> StatusChanged:
        return StatusChanged(status, False, self.history_version, self.generation_attempt)

    async def _commit(self, writes: list[ChatWrite]) -> None:
        self.xid = (await commit(self.db, self.fence, self.id, writes)).xid

    def _new_episode(self) -> None:
        self.part_seq = 0
        self.streamed = []

    async def user_turn(self, text: str, *, publish: bool = True) -> Held:
        seq = self.last_seq + 1
        self.history_version += 1
        message = CommittedMessage(uuid4(), seq, "user", (TextPart(text),), self.history_version)
        self.generation_attempt += 1
        await self._commit(
            [
                _append(message),
                UpdateChat(
                    status=ChatStatus.RUNNING,
                    history_version=self.history_version,
                    generation_attempt=self.generation_attempt,
                ),
            ]
        )
        self.last_seq = seq
        self._new_episode()
        return self._publish([message, self.status(ChatStatus.RUNNING)], publish)

    def stream(self, *texts: str) -> None:
        for text in texts:
            self.part_seq += 1
            self.streamed.append(text)
            part = MessagePart(self.episode, self.part_seq, TextDelta(text))
            self.published.append(part)
            self.hub.publish(self.id, (part,))

    async def finish(self, *, publish: bool = True) -> Held:
        seq = self.last_seq + 1
        self.history_version += 1
        text = "".join(self.streamed)
        message = CommittedMessage(
            uuid4(), seq, "assistant", (TextPart(text),), self.history_version
        )
        await self._commit(
            [
                _append(message),
                UpdateChat(status=ChatStatus.WAITING, history_version=self.history_version),
            ]
        )
        self.last_seq = seq
        self._new_episode()
        return self._publish([message, self.status(ChatStatus.WAITING)], publish)

    async def retry(self) -> None:
        self.generation_attempt += 1
        await self._commit([UpdateChat(generation_attempt=self.generation_attempt)])
        self._new_episode()
        self._publish([self.status(ChatStatus.RUNNING), PreviewReset(self.episode)], True)

    async def edit(self, target_seq: int, text: str, *, publish: bool = True) -> Held:
        self.history_version += 1
        reset = HistoryReset(self.history_version, target_seq - 1)
        seq = self.last_seq + 1
        self.history_version += 1
        message = CommittedMessage(uuid4(), seq, "user", (TextPart(text),), self.history_version)
        self.generation_attempt += 1
        await self._commit(
            [
                SoftDeleteMessagesAfter(seq=target_seq - 1),
                _append(message),
                UpdateChat(
                    status=ChatStatus.RUNNING,
                    history_version=self.history_version,
                    generation_attempt=self.generation_attempt,
                ),
            ]
        )
        self.last_seq = seq
        self._new_episode()
        events: list[ChatEvent] = [
            reset,
            message,
            self.status(ChatStatus.RUNNING),
            PreviewReset(self.episode),
        ]
        return self._publish(events, publish)

    async def fail(self, failure: ProviderFailure, *, publish: bool = True) -> Held:
        """A retryable failure: the chat stays running and waits for its next attempt."""
        self.retry_count += 1
        at = datetime.now(UTC) + timedelta(seconds=30)
        await self._commit(
            [UpdateChat(retry_count=self.retry_count, retry_at=at, last_error=failure.to_json())]
        )
        retry = RetryScheduled(self.retry_count + 1, 30.0, failure, at.timestamp())
        return self._publish([retry], publish)

    async def give_up(self, failure: ProviderFailure, *, publish: bool = True) -> Held:
        """A failure for good: the details, then the status they explain."""
        await self._commit(
            [UpdateChat(status=ChatStatus.ERROR, retry_at=None, last_error=failure.to_json())]
        )
        return self._publish([ErrorRaised(failure), self.status(ChatStatus.ERROR)], publish)

    async def enqueue(self, text: str, *, publish: bool = True) -> Held:
        entry = QueuedEntry(uuid4(), text)
        self.queue.append(entry)
        await self._commit(
            [
                Enqueue(
                    id=entry.id, position=len(self.queue), content=[{"type": "text", "text": text}]
                )
            ]
        )
        return self._publish([QueueUpdated(tuple(self.queue))], publish)

    async def dequeue(self, *, publish: bool = True) -> Held:
        entry = self.queue.pop(0)
        await self._commit([Dequeue(id=entry.id)])
        return self._publish([QueueUpdated(tuple(self.queue))], publish)

    async def require_action(self, *, publish: bool = True) -> Held:
        """The model called a dynamic tool: its message, then the wait for the client."""
        seq = self.last_seq + 1
        self.history_version += 1
        call = ToolCallPart(f"call{seq}", "lookup", "{}")
        message = CommittedMessage(uuid4(), seq, "assistant", (call,), self.history_version)
        deadline = datetime.now(UTC) + timedelta(minutes=5)
        await self._commit(
            [
                _append(message),
                UpdateChat(
                    status=ChatStatus.REQUIRES_ACTION,
                    history_version=self.history_version,
                    action_deadline=deadline,
                ),
            ]
        )
        self.last_seq = seq
        self._new_episode()
        pending = PendingToolCall(call.id, call.name, call.arguments)
        events: list[ChatEvent] = [
            message,
            self.status(ChatStatus.REQUIRES_ACTION),
            ActionRequired((pending,), deadline.timestamp()),
        ]
        return self._publish(events, publish)

    async def answer(self, *, publish: bool = True) -> Held:
        """The client's tool result: the chat runs again, in a new episode."""
        seq = self.last_seq + 1
        self.history_version += 1
        self.generation_attempt += 1
        result = ToolResultPart(f"call{seq - 1}", '"ok"')
        message = CommittedMessage(uuid4(), seq, "tool", (result,), self.history_version)
        await self._commit(
            [
                _append(message),
                UpdateChat(
                    status=ChatStatus.RUNNING,
                    history_version=self.history_version,
                    generation_attempt=self.generation_attempt,
                    action_deadline=None,
                ),
            ]
        )
        self.last_seq = seq
        self._new_episode()
        return self._publish([message, self.status(ChatStatus.RUNNING)], publish)

    async def interrupt(self, *, publish: bool = True) -> Held:
        await self._commit([UpdateChat(status=ChatStatus.INTERRUPTING)])
        return self._publish([self.status(ChatStatus.INTERRUPTING)], publish)

    async def fire_retry(self, *, publish: bool = True) -> Held:
        """The retry timer fired: the next attempt starts, in a new episode."""
        self.generation_attempt += 1
        await self._commit([UpdateChat(generation_attempt=self.generation_attempt, retry_at=None)])
        self._new_episode()
        events: list[ChatEvent] = [self.status(ChatStatus.RUNNING), PreviewReset(self.episode)]
        return self._publish(events, publish)

    def _publish(self, events: list[ChatEvent], publish: bool) -> Held:
        held = Held(events, self.xid, self.published)
        if publish:
            held.publish(self.hub, self.id)
        return held


@dataclass
class Held:
    """The events of one commit, published with the commit's id (now, or later)."""

    events: list[ChatEvent]
    xid: int
    log: list[ChatEvent] = field(default_factory=list)

    def publish(self, hub: ChatHub, chat_id: UUID) -> None:
        self.log.extend(self.events)
        hub.publish(chat_id, self.events, commit=self.xid)


def _append(message: CommittedMessage) -> AppendMessage:
    return AppendMessage(
        id=message.id,
        seq=message.seq,
        role="user" if message.role == "user" else "assistant",
        content=parts_to_json(message.content),
        history_version=message.history_version,
    )


async def scripted_chat(db: Database, hub: ChatHub, **fields: Any) -> ScriptedChat:
    user = await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, user.id, **fields)
    return ScriptedChat(db, hub, fence, chat.id)


# -- a client, and a task that feeds it --------------------------------------------------


@dataclass
class Client:
    """What a WebSocket client holds; ``apply`` fails on a repeat, a gap or a disorder."""

    messages: dict[int, str] = field(default_factory=dict)
    status: ChatStatus | None = None
    preview_episode: Episode | None = None
    preview: list[str] = field(default_factory=list)
    part_seq: int = 0
    queue: tuple[QueuedEntry, ...] = ()

    def apply(self, event: ChatEvent) -> None:
        match event:
            case QueueUpdated(queue=queue):
                self.queue = queue
            case CommittedMessage(seq=seq, history_version=version):
                held = max(self.messages, default=0)
                assert seq > held, f"message {seq} after {held}: repeated or out of order"
                self.messages[seq] = "".join(
                    p.text for p in event.content if isinstance(p, TextPart)
                )
                if self.preview_episode and version > self.preview_episode.history_version:
                    self._reset_preview(None)  # the committed message replaces the preview
            case HistoryReset(after_seq=after):
                self.messages = {s: t for s, t in self.messages.items() if s <= after}
            case StatusChanged(status=status, history_version=v, generation_attempt=a):
                self.status = status
                if Episode(v, a) != self.preview_episode:
                    self._reset_preview(Episode(v, a))
            case PreviewReset(episode=episode):
                self._reset_preview(episode)
            case MessagePart(episode=episode, seq=seq, part=TextDelta(text=text)):
                assert episode == self.preview_episode, f"part of unannounced {episode}"
                assert seq == self.part_seq + 1, f"part {seq} after {self.part_seq}"
                self.preview.append(text)
                self.part_seq = seq
            case _:
                pass

    def _reset_preview(self, episode: Episode | None) -> None:
        self.preview_episode = episode
        self.preview = []
        self.part_seq = 0

    @property
    def preview_text(self) -> str:
        return "".join(self.preview)

    def cursor(self) -> StreamCursor:
        return StreamCursor(max(self.messages, default=0), self.preview_episode, self.part_seq)

    def view(self) -> tuple[Any, ...]:
        return self.messages, self.status, self.preview_episode, self.preview_text, self.queue


class Reader:
    """Consumes one subscription in its own task and applies every event to ``client``."""

    def __init__(
        self, client: Client | None = None, on_event: Callable[[], None] | None = None
    ) -> None:
        self.client = client or Client()
        self.events: list[ChatEvent] = []
        self.batches: list[list[ChatEvent]] = []
        self.error: SlowConsumer | None = None
        self.done = trio.Event()
        self._on_event = on_event
        self._changed = trio.Event()

    async def run(
        self,
        hub: ChatHub,
        chat_id: UUID,
        cursor: StreamCursor | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with hub.subscribe(chat_id, cursor) as events:
                task_status.started()
                async for batch in events:
                    self.batches.append(batch)
                    for event in batch:
                        self.events.append(event)
                        self.client.apply(event)
                        if self._on_event is not None:
                            self._on_event()
                    self._notify()
        except SlowConsumer as exc:
            self.error = exc
        finally:
            self.done.set()
            self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        with trio.fail_after(DEADLINE_S):
            while not predicate():
                assert not self.done.is_set(), "the subscription ended"
                await self._changed.wait()

    def committed_seqs(self) -> list[int]:
        return [e.seq for e in self.events if isinstance(e, CommittedMessage)]


async def next_batch(events: Subscription) -> list[ChatEvent]:
    with trio.fail_after(DEADLINE_S):
        return await anext(events)


@contextmanager
def real_time(clock: trio.testing.MockClock) -> Iterator[None]:
    """Let the mock clock follow real time, for database work (see the module docstring)."""
    clock.autojump_threshold = math.inf
    clock.rate = 1.0
    try:
        yield
    finally:
        clock.rate = 0.0
        clock.autojump_threshold = 0.0


def same_view(reader: Reader, reference: Client) -> Callable[[], bool]:
    return lambda: reader.client.view() == reference.view()


def part(episode: Episode, seq: int, text: str) -> MessagePart:
    return MessagePart(episode, seq, TextDelta(text))


# -- catch-up and resume ---------------------------------------------------------------------


async def test_from_the_start_status_then_every_message_then_live_parts(db: Database) -> None:
    hub = ChatHub(db, page_size=2)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q1")
    await chat.finish()
    await chat.user_turn("q2")

    async with hub.subscribe(chat.id, StreamCursor()) as events:
        first = await next_batch(events)
        assert first == [chat.status(ChatStatus.RUNNING), QueueUpdated(())]
        received: list[ChatEvent] = []
        while len(received) < 3:
            received += await next_batch(events)
        assert [(e.seq, e.role) for e in received if isinstance(e, CommittedMessage)] == [
            (1, "user"),
            (2, "assistant"),
            (3, "user"),
        ]
        chat.stream("a", "b")
        assert await next_batch(events) == [part(chat.episode, 1, "a"), part(chat.episode, 2, "b")]
        await chat.finish()
        last = await next_batch(events)
        assert [type(e) for e in last] == [CommittedMessage, StatusChanged]
    assert hub.stats.subscribers == 0


async def test_resume_mid_episode_gets_exactly_the_parts_after_the_cursor(db: Database) -> None:
    hub = ChatHub(db)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q")
    async with trio.open_nursery() as nursery:
        watcher = Reader()  # keeps the chat's buffer while parts stream
        await nursery.start(watcher.run, hub, chat.id)
        chat.stream("a", "b", "c", "d")
        await watcher.wait_for(lambda: watcher.client.preview_text == "abcd")

        cursor = StreamCursor(1, chat.episode, 2)
        async with hub.subscribe(chat.id, cursor) as events:
            snapshot = await next_batch(events)
            assert snapshot == [chat.status(ChatStatus.RUNNING), QueueUpdated(())]
            # Published while the history is read: after the buffered parts, in order.
            hub.publish(chat.id, [QueueUpdated(())])
            chat.stream("e")
            assert await next_batch(events) == [
                part(chat.episode, 3, "c"),
                part(chat.episode, 4, "d"),
                QueueUpdated(()),
                part(chat.episode, 5, "e"),
            ]
            chat.stream("f")
            assert await next_batch(events) == [part(chat.episode, 6, "f")]
        nursery.cancel_scope.cancel()


async def test_resume_from_an_old_episode_resets_the_preview_and_sends_every_part(
    db: Database,
) -> None:
    hub = ChatHub(db)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q")
    old = chat.episode
    async with trio.open_nursery() as nursery:
        watcher = Reader()
        await nursery.start(watcher.run, hub, chat.id)
        chat.stream("x", "y")
        await chat.retry()
        chat.stream("a", "b", "c")
        await watcher.wait_for(lambda: watcher.client.preview_text == "abc")

        async with hub.subscribe(chat.id, StreamCursor(1, old, 2)) as events:
            batch = await next_batch(events)
            assert batch == [
                chat.status(ChatStatus.RUNNING),
                QueueUpdated(()),
                PreviewReset(chat.episode),
            ]
            assert await next_batch(events) == [
                part(chat.episode, 1, "a"),
                part(chat.episode, 2, "b"),
                part(chat.episode, 3, "c"),
            ]
        nursery.cancel_scope.cancel()


async def test_resume_at_the_end_delivers_only_what_comes_next(db: Database) -> None:
    hub = ChatHub(db)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q")
    await chat.finish()
    async with hub.subscribe(chat.id, StreamCursor(2, chat.episode, 0)) as events:
        assert await next_batch(events) == [chat.status(ChatStatus.WAITING), QueueUpdated(())]
        await chat.user_turn("again")
        batch = await next_batch(events)
        assert [type(e) for e in batch] == [CommittedMessage, StatusChanged]
        assert isinstance(batch[0], CommittedMessage)
        assert batch[0].seq == 3


async def test_resume_from_every_point_of_a_stream_loses_and_repeats_nothing(
    db: Database,
) -> None:
    """Record the state of a client that saw everything after each event; reconnect from each."""
    hub = ChatHub(db, page_size=2)
    chat = await scripted_chat(db, hub)
    states: list[Client] = []
    reference = Client()
    reader = Reader(reference, on_event=lambda: states.append(copy.deepcopy(reference)))
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run, hub, chat.id, StreamCursor())
        await chat.user_turn("q1")
        chat.stream("a", "b", "c")
        await chat.finish()
        await chat.user_turn("q2")
        chat.stream("d", "e")
        await chat.retry()
        chat.stream("f", "g", "h")
        await chat.finish()
        await chat.user_turn("q3")
        chat.stream("i", "j")
        await chat.edit(5, "q3b")
        chat.stream("k", "l", "m")
        await reader.wait_for(lambda: reference.preview_text == "klm")
        assert reference.messages == {1: "q1", 2: "abc", 3: "q2", 4: "fgh", 6: "q3b"}
        assert len(states) > 30

        resumed: list[Reader] = []
        for state in [Client(), *states]:
            again = Reader(copy.deepcopy(state))
            await nursery.start(again.run, hub, chat.id, state.cursor())
            resumed.append(again)
        for again in resumed:
            await again.wait_for(same_view(again, reference))

        chat.stream("n", "o")
        await chat.finish()
        await reader.wait_for(lambda: 7 in reference.messages)
        assert reference.messages[7] == "klmno"
        for again in resumed:
            await again.wait_for(same_view(again, reference))
        nursery.cancel_scope.cancel()


async def test_a_client_holding_truncated_messages_gets_a_history_reset(db: Database) -> None:
    hub = ChatHub(db)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q1")
    await chat.finish()
    await chat.user_turn("q2")
    await chat.finish()
    await chat.edit(3, "q2b")  # messages 3 and 4 are gone; the new one is 5

    client = Client(messages={1: "q1", 2: "", 3: "q2", 4: ""})
    async with hub.subscribe(chat.id, client.cursor()) as events:
        batch = await next_batch(events)
        batch += await next_batch(events)
        assert batch[2:] == [HistoryReset(chat.history_version, 2), batch[3]]
        for event in batch:
            client.apply(event)
    assert client.messages == {1: "q1", 2: "", 5: "q2b"}


async def test_a_message_committed_during_the_history_read_is_delivered_once(
    db: Database,
) -> None:
    paused, proceed = trio.Event(), trio.Event()

    async def pause_before_second_page(chat_id: UUID, after_seq: int) -> None:
        if after_seq == 2:
            paused.set()
            await proceed.wait()

    hub = ChatHub(db, page_size=2, page_hook=pause_before_second_page)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q1")
    await chat.finish()
    await chat.user_turn("q2")
    await chat.finish()
    reader = Reader()
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run, hub, chat.id, StreamCursor())
        with trio.fail_after(DEADLINE_S):
            await paused.wait()
        # Between two pages of the read: a new turn commits and publishes, parts stream.
        await chat.user_turn("q3")
        chat.stream("x", "y")
        proceed.set()
        await reader.wait_for(lambda: reader.client.preview_text == "xy")
        chat.stream("z")
        await chat.finish()
        await reader.wait_for(lambda: 6 in reader.client.messages)
        nursery.cancel_scope.cancel()
    assert reader.committed_seqs() == [1, 2, 3, 4, 5, 6]
    assert reader.client.messages[6] == "xyz"


async def test_a_commit_during_the_catch_up_published_later_is_delivered_once(
    db: Database,
) -> None:
    paused, proceed = trio.Event(), trio.Event()

    async def pause_on_first_page(chat_id: UUID, after_seq: int) -> None:
        if not paused.is_set():
            paused.set()
            await proceed.wait()

    hub = ChatHub(db, page_hook=pause_on_first_page)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q1")
    await chat.finish()
    reader = Reader()
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run, hub, chat.id, StreamCursor())
        with trio.fail_after(DEADLINE_S):
            await paused.wait()
        held = await chat.user_turn("q2", publish=False)  # committed; the actor publishes later
        proceed.set()
        # The catch-up stops at the snapshot's read: the later commit comes with its events.
        await reader.wait_for(lambda: 2 in reader.client.messages)
        held.publish(hub, chat.id)
        await reader.wait_for(lambda: 3 in reader.client.messages)
        chat.stream("a")
        await reader.wait_for(lambda: reader.client.preview_text == "a")
        nursery.cancel_scope.cancel()
    assert reader.committed_seqs() == [1, 2, 3]
    assert reader.client.status is ChatStatus.RUNNING


async def test_an_answer_streamed_and_committed_during_the_history_read_comes_once(
    db: Database,
) -> None:
    paused, proceed = trio.Event(), trio.Event()

    async def pause_on_first_page(chat_id: UUID, after_seq: int) -> None:
        if not paused.is_set():
            paused.set()
            await proceed.wait()

    hub = ChatHub(db, page_hook=pause_on_first_page)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q")
    reader = Reader()
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run, hub, chat.id)
        with trio.fail_after(DEADLINE_S):
            await paused.wait()
        chat.stream("x", "y")
        await chat.finish()  # after the snapshot's read: its parts, then its message, live
        proceed.set()
        await reader.wait_for(lambda: 2 in reader.client.messages)
        await chat.user_turn("next")
        chat.stream("z")
        await reader.wait_for(lambda: reader.client.preview_text == "z")
        nursery.cancel_scope.cancel()
    assert reader.committed_seqs() == [1, 2, 3]
    assert reader.client.messages[2] == "xy"
    parts = [(e.episode, e.seq) for e in reader.events if isinstance(e, MessagePart)]
    assert parts == [(Episode(1, 1), 1), (Episode(1, 1), 2), (chat.episode, 1)]


async def test_events_the_snapshot_already_reflects_are_not_repeated(db: Database) -> None:
    """The actor publishes after its commit: a subscriber may read the commit first."""
    hub = ChatHub(db)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q1")
    await chat.finish()
    turn = await chat.user_turn("q2", publish=False)
    edit = await chat.edit(3, "q2b", publish=False)
    async with hub.subscribe(chat.id) as events:
        snapshot = await next_batch(events)
        assert snapshot == [chat.status(ChatStatus.RUNNING), QueueUpdated(())]
        turn.publish(hub, chat.id)
        edit.publish(hub, chat.id)
        chat.stream("a")
        batch = await next_batch(events)
    # The snapshot read both commits: nothing of theirs is repeated, the part follows.
    assert [type(e) for e in batch] == [CommittedMessage] * 3 + [MessagePart]
    assert [e.seq for e in batch if isinstance(e, CommittedMessage)] == [1, 2, 4]
    assert batch[-1] == part(chat.episode, 1, "a")


FAILURE = ProviderFailure(ErrorKind.RATE_LIMIT, "openai", 429, True, 30.0, "Slow down", "")


async def test_a_retry_committed_before_the_snapshot_and_published_after_comes_once(
    db: Database,
) -> None:
    """Issue 11: a stream opened while the chat waits on a retry got the retry event twice."""
    hub = ChatHub(db)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q")
    held = await chat.fail(FAILURE, publish=False)  # committed; the actor publishes next
    async with hub.subscribe(chat.id, StreamCursor(1)) as events:
        snapshot = await next_batch(events)
        held.publish(hub, chat.id)
        chat.stream("a")  # something later, so that the read below returns
        later = await next_batch(events)
    retries = [e for e in snapshot + later if isinstance(e, RetryScheduled)]
    assert len(retries) == 1, snapshot + later
    assert retries[0].attempt == 2
    assert [type(e) for e in later] == [MessagePart]


async def test_state_events_read_by_the_snapshot_are_not_repeated_live(db: Database) -> None:
    hub = ChatHub(db)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q")
    queued = await chat.enqueue("next", publish=False)
    failed = await chat.give_up(FAILURE, publish=False)
    async with hub.subscribe(chat.id, StreamCursor(1)) as events:
        snapshot = await next_batch(events)
        queued.publish(hub, chat.id)
        failed.publish(hub, chat.id)
        await chat.user_turn("again")  # the next commit is delivered, once
        later = await next_batch(events)
    assert [type(e) for e in snapshot] == [ErrorRaised, StatusChanged, QueueUpdated]
    assert [type(e) for e in later] == [CommittedMessage, StatusChanged]


async def test_the_error_comes_before_the_status_it_explains(db: Database) -> None:
    hub = ChatHub(db)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q")
    async with hub.subscribe(chat.id, StreamCursor(1)) as events:
        await next_batch(events)
        await chat.give_up(FAILURE)
        live = await next_batch(events)
    assert live == [ErrorRaised(FAILURE), chat.status(ChatStatus.ERROR)]
    async with hub.subscribe(chat.id, StreamCursor(1)) as events:
        snapshot = await next_batch(events)
    assert snapshot == [ErrorRaised(FAILURE), chat.status(ChatStatus.ERROR), QueueUpdated(())]


async def test_an_edit_during_the_history_read_leaves_the_right_history(db: Database) -> None:
    paused, proceed = trio.Event(), trio.Event()

    async def pause_before_second_page(chat_id: UUID, after_seq: int) -> None:
        if after_seq == 2 and not paused.is_set():
            paused.set()
            await proceed.wait()

    hub = ChatHub(db, page_size=2, page_hook=pause_before_second_page)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q1")
    await chat.finish()
    await chat.user_turn("q2")
    await chat.finish()
    reader = Reader()
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run, hub, chat.id, StreamCursor())
        with trio.fail_after(DEADLINE_S):
            await paused.wait()
        await chat.edit(3, "q2b")
        chat.stream("k")
        proceed.set()
        await reader.wait_for(lambda: reader.client.preview_text == "k")
        await chat.finish()
        await reader.wait_for(lambda: 6 in reader.client.messages)
        nursery.cancel_scope.cancel()
    assert reader.client.messages == {1: "q1", 2: "", 5: "q2b", 6: "k"}


async def test_the_snapshot_carries_queue_error_retry_and_pending_calls(db: Database) -> None:
    hub = ChatHub(db)
    failure = ProviderFailure(ErrorKind.RATE_LIMIT, "openai", 429, True, 2.0, "Slow down", "")
    tools = [{"name": "lookup", "description": "", "input_schema": {}}]
    chat = await scripted_chat(db, hub, dynamic_tools=tools)
    await chat.user_turn("q")
    queued_id = uuid4()
    retry_at = datetime.now(UTC) + timedelta(seconds=30)
    await chat._commit(
        [
            Enqueue(id=queued_id, position=1, content=[{"type": "text", "text": "next"}]),
            UpdateChat(retry_count=1, retry_at=retry_at, last_error=failure.to_json()),
        ]
    )
    async with hub.subscribe(chat.id) as events:
        status, queue, retry = await next_batch(events)
    assert status == chat.status(ChatStatus.RUNNING)
    assert queue == QueueUpdated((QueuedEntry(queued_id, "next"),))
    assert isinstance(retry, RetryScheduled)
    assert (retry.attempt, retry.failure, retry.retrying_at) == (2, failure, retry_at.timestamp())
    assert 0 < retry.delay_s <= 30

    call = ToolCallPart("c2", "lookup", '{"q": 1}')
    deadline = datetime.now(UTC) + timedelta(minutes=5)
    await chat._commit(
        [
            AppendMessage(
                id=uuid4(),
                seq=2,
                role="assistant",
                content=parts_to_json([ToolCallPart("c1", "clock", "{}"), call]),
                history_version=chat.history_version + 1,
            ),
            AppendMessage(
                id=uuid4(),
                seq=3,
                role="tool",
                content=parts_to_json([ToolResultPart("c1", '"noon"')]),
                history_version=chat.history_version + 2,
            ),
            UpdateChat(
                status=ChatStatus.REQUIRES_ACTION,
                action_deadline=deadline,
                retry_at=None,
                retry_count=0,
                last_error=None,
            ),
        ]
    )
    async with hub.subscribe(chat.id) as events:
        batch = await next_batch(events)
    assert batch[2:] == [
        ActionRequired((PendingToolCall("c2", "lookup", '{"q": 1}'),), deadline.timestamp())
    ]

    await chat._commit(
        [UpdateChat(status=ChatStatus.ERROR, action_deadline=None, last_error=failure.to_json())]
    )
    async with hub.subscribe(chat.id) as events:
        batch = await next_batch(events)
    # The error before the status it explains; the queue stays for when the chat goes on.
    assert batch == [
        ErrorRaised(failure),
        chat.status(ChatStatus.ERROR),
        QueueUpdated((QueuedEntry(queued_id, "next"),)),
    ]


async def test_a_missing_chat_is_not_found(db: Database) -> None:
    hub = ChatHub(db)
    with pytest.raises(NotFound):
        async with hub.subscribe(uuid4()):
            pass
    assert (hub.stats.subscribers, hub.tracked_chats) == (0, 0)


def test_cursor_from_query_parameters() -> None:
    assert StreamCursor.from_query({}) == StreamCursor()
    assert StreamCursor.from_query(
        {"message_seq": "12", "history_version": "7", "generation_attempt": "3", "part_seq": "41"}
    ) == StreamCursor(12, Episode(7, 3), 41)
    for params, field_name in [
        ({"message_seq": "-1"}, "message_seq"),
        ({"message_seq": "x"}, "message_seq"),
        ({"history_version": "1"}, "generation_attempt"),
        ({"generation_attempt": "1"}, "history_version"),
        ({"part_seq": "3"}, "part_seq"),
        ({"message_seq": "1" * 40}, "message_seq"),
    ]:
        with pytest.raises(CursorError) as caught:
            StreamCursor.from_query(params)
        assert caught.value.field == field_name


# -- a commit whose acknowledgement was lost ---------------------------------------------------


async def stored_key(db: Database, chat_id: UUID) -> StateKey:
    snapshot = await read_chat_snapshot(db, chat_id)
    assert snapshot is not None
    return snapshot_key(snapshot)


async def test_a_lost_commits_events_reach_only_who_had_not_read_it(db: Database) -> None:
    """An outage hid a commit's acknowledgement: its actor, restarted, publishes what it did
    without its transaction id. Who subscribed before it gets them; who read it does not."""
    hub = ChatHub(db)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q")
    async with hub.subscribe(chat.id, StreamCursor(1)) as before:
        await next_batch(before)
        lost = await chat.fail(FAILURE, publish=False)  # committed, never acknowledged
        async with hub.subscribe(chat.id, StreamCursor(1)) as after:
            snapshot = await next_batch(after)
            assert [type(e) for e in snapshot] == [StatusChanged, QueueUpdated, RetryScheduled]
            hub.publish_recovered(chat.id, lost.events, state=await stored_key(db, chat.id))
            chat.stream("a")
            assert await next_batch(after) == [part(chat.episode, 1, "a")]
        assert await next_batch(before) == [*lost.events, part(chat.episode, 1, "a")]


async def test_a_lost_commit_back_to_a_state_read_before_still_reaches_the_subscriber(
    db: Database,
) -> None:
    """Archived, then unarchived by the lost commit: the stored chat is again the one the
    subscriber's snapshot read, but it was told of the archiving since, so it must hear."""
    hub = ChatHub(db)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q")
    await chat.finish()
    waiting = chat.status(ChatStatus.WAITING)
    archived = StatusChanged(ChatStatus.WAITING, True, chat.history_version, 1)
    async with hub.subscribe(chat.id, StreamCursor(2)) as events:
        assert await next_batch(events) == [waiting, QueueUpdated(())]
        await chat._commit([UpdateChat(archived=True)])
        hub.publish(chat.id, [archived], commit=chat.xid)
        assert await next_batch(events) == [archived]
        await chat._commit([UpdateChat(archived=False)])  # its acknowledgement lost
        hub.publish_recovered(chat.id, [waiting], state=await stored_key(db, chat.id))
        assert await next_batch(events) == [waiting]


async def test_the_actors_state_and_a_snapshot_of_the_same_chat_have_the_same_key(
    db: Database,
) -> None:
    hub = ChatHub(db)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q")
    await chat.enqueue("next")
    loaded = await load_chat(db, chat.id)
    assert loaded is not None
    assert state_key(loaded.state) == await stored_key(db, chat.id)
    await chat.dequeue()
    await chat.finish()
    loaded = await load_chat(db, chat.id)
    assert loaded is not None
    assert state_key(loaded.state) == await stored_key(db, chat.id)


# -- slow consumers ----------------------------------------------------------------------------


@dataclass
class Stalled:
    """A consumer stuck (as in a socket send) once caught up, until ``resume`` is set."""

    resume: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    after: list[ChatEvent] | None = None  # what one read after resuming got
    error: SlowConsumer | None = None
    error_at: float | None = None

    async def run(
        self,
        hub: ChatHub,
        chat_id: UUID,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with hub.subscribe(chat_id) as events:
                await anext(events)  # the snapshot
                await anext(events)  # the history (the chat has a message)
                task_status.started()
                await self.resume.wait()
                self.after = await anext(events)
        except SlowConsumer as exc:
            self.error = exc
            self.error_at = trio.current_time()
        finally:
            self.done.set()

    async def wait_done(self) -> None:
        with trio.fail_after(DEADLINE_S):
            await self.done.wait()


async def test_a_slow_subscriber_is_dropped_and_the_others_get_everything(
    db: Database, autojump_clock: trio.testing.MockClock
) -> None:
    hub = ChatHub(db, subscriber_queue_size=8, slow_consumer_timeout_s=10.0)
    texts = [f"t{i} " for i in range(300)]
    slow = Stalled()
    fast = Reader()
    async with trio.open_nursery() as nursery:
        with real_time(autojump_clock):
            chat = await scripted_chat(db, hub)
            await chat.user_turn("q")
            await nursery.start(fast.run, hub, chat.id)
            await fast.wait_for(lambda: 1 in fast.client.messages)
            await nursery.start(slow.run, hub, chat.id)
        assert hub.stats.subscribers == 2

        start = trio.current_time()
        for text in texts:  # a part every 100 ms for 30 s
            chat.stream(text)
            await trio.sleep(0.1)
        assert trio.current_time() - start == pytest.approx(30.0)  # never held back

        await fast.wait_for(lambda: fast.client.preview_text == "".join(texts))
        assert not fast.done.is_set()
        await slow.wait_done()
        assert slow.error is not None
        assert slow.error_at is not None
        # Full after 8 parts (0.7 s), dropped on the first publish 10 s later.
        assert 10.7 <= slow.error_at - start <= 10.9
        assert slow.error.close_code == SLOW_CONSUMER_CLOSE_CODE == 4008
        assert slow.error.reason == "slow consumer: fell behind for 10 s"
        assert (hub.stats.subscribers, hub.stats.slow_consumers_dropped) == (1, 1)
        nursery.cancel_scope.cancel()


async def test_a_consumer_that_catches_up_in_time_loses_nothing(
    db: Database, autojump_clock: trio.testing.MockClock
) -> None:
    hub = ChatHub(db, subscriber_queue_size=4, slow_consumer_timeout_s=10.0)
    slow = Stalled()
    async with trio.open_nursery() as nursery:
        with real_time(autojump_clock):
            chat = await scripted_chat(db, hub)
            await chat.user_turn("q")
            await nursery.start(slow.run, hub, chat.id)
        for i in range(1, 21):  # the queue is full after 4; the rest wait in the chat's buffer
            chat.stream(f"{i},")
            await trio.sleep(0.4)
        hub.publish(chat.id, [QueueUpdated(())])
        chat.stream("21")
        slow.resume.set()
        await slow.wait_done()
    assert slow.after is not None
    parts = [e for e in slow.after if isinstance(e, MessagePart)]
    assert [p.seq for p in parts] == list(range(1, 22))
    assert [p.part for p in parts] == [TextDelta(f"{i},") for i in range(1, 21)] + [TextDelta("21")]
    # The queue update comes after the parts published before it, and before the last one.
    assert isinstance(slow.after[20], QueueUpdated)
    assert hub.stats.slow_consumers_dropped == 0


async def test_a_stuck_consumer_is_dropped_when_it_asks_again_too_late(
    db: Database, autojump_clock: trio.testing.MockClock
) -> None:
    hub = ChatHub(db, subscriber_queue_size=4, slow_consumer_timeout_s=10.0)
    slow = Stalled()
    async with trio.open_nursery() as nursery:
        with real_time(autojump_clock):
            chat = await scripted_chat(db, hub)
            await chat.user_turn("q")
            await nursery.start(slow.run, hub, chat.id)
        chat.stream("a", "b", "c", "d", "e")  # full, then nothing more is published
        await trio.sleep(11)
        assert hub.stats.slow_consumers_dropped == 0  # no publish came to notice it
        slow.resume.set()
        await slow.wait_done()
    assert isinstance(slow.error, SlowConsumer)
    assert (hub.stats.subscribers, hub.stats.slow_consumers_dropped) == (0, 1)


async def test_a_consumer_far_behind_on_other_events_is_dropped_at_once(db: Database) -> None:
    hub = ChatHub(db, subscriber_queue_size=4)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q")
    slow = Stalled()
    async with trio.open_nursery() as nursery:
        await nursery.start(slow.run, hub, chat.id)
        for _ in range(8):
            hub.publish(chat.id, [QueueUpdated(())])
        assert hub.stats.slow_consumers_dropped == 0
        hub.publish(chat.id, [QueueUpdated(())])  # the ninth: twice the queue size
        assert hub.stats.slow_consumers_dropped == 1
        await slow.wait_done()
    assert slow.error is not None
    assert slow.error.reason == "slow consumer: more than 8 events behind"
    assert hub.stats.subscribers == 0


# -- lifecycle -------------------------------------------------------------------------------


async def test_subscribing_and_leaving_many_times_leaves_nothing_behind(
    db: Database, autojump_clock: trio.testing.MockClock
) -> None:
    hub = ChatHub(db, idle_linger_s=30.0)
    with real_time(autojump_clock):
        chat = await scripted_chat(db, hub)
        await chat.user_turn("q")
        for i in range(100):
            async with hub.subscribe(chat.id, StreamCursor(1)) as events:
                await next_batch(events)
                chat.stream(str(i))
                batch = await next_batch(events)
                # Every subscriber gets the whole answer so far, from the lingering buffer.
                assert [e.seq for e in batch if isinstance(e, MessagePart)] == list(range(1, i + 2))
    assert hub.stats.subscribers == 0
    assert hub.stats.subscriptions == 100
    assert hub.tracked_chats == 1  # lingering, so that a reconnect can resume mid-answer
    await trio.sleep(31)
    other = uuid4()
    hub.publish(other, [QueueUpdated(())])  # evicts the quiet chat; the new one lingers
    assert hub.tracked_chats == 1
    await trio.sleep(31)
    hub.publish(other, [])  # chats quiet for the linger time cost nothing
    assert hub.tracked_chats == 0


async def test_a_first_subscriber_mid_answer_gets_the_parts_so_far(db: Database) -> None:
    hub = ChatHub(db)
    chat = await scripted_chat(db, hub)
    await chat.user_turn("q")
    chat.stream("a", "b")  # nobody watches yet: the hub buffers the episode anyway
    reader = Reader()
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run, hub, chat.id)
        await reader.wait_for(lambda: 1 in reader.client.messages)
        chat.stream("c")
        await chat.finish()
        await reader.wait_for(lambda: 2 in reader.client.messages)
        nursery.cancel_scope.cancel()
    assert reader.client.messages[2] == "abc"
    parts = [e for e in reader.events if isinstance(e, MessagePart)]
    assert [p.seq for p in parts] == [1, 2, 3]


# -- exactly once, whenever the subscriber comes ------------------------------------------------

# One scripted life of a chat through every phase a subscriber can land in: running, streaming,
# a queue change, a retry wait, the next attempt, waiting on tool results, interrupting, a
# queued message taken out, a new turn, a failure for good.
LIFE = (
    "turn",
    "stream",
    "enqueue",
    "fail",
    "fire_retry",
    "stream",
    "require_action",
    "answer",
    "stream",
    "interrupt",
    "finish",
    "dequeue",
    "turn",
    "stream",
    "give_up",
)


async def live_step(chat: ScriptedChat, name: str, *, publish: bool) -> Held | None:
    """Run one step of ``LIFE``: commit, then publish unless held (parts are always sent)."""
    match name:
        case "turn":
            return await chat.user_turn(f"q{chat.last_seq + 1}", publish=publish)
        case "stream":
            chat.stream("x", "y", "z")
            return None
        case "enqueue":
            return await chat.enqueue("later", publish=publish)
        case "dequeue":
            return await chat.dequeue(publish=publish)
        case "fail":
            return await chat.fail(FAILURE, publish=publish)
        case "give_up":
            return await chat.give_up(FAILURE, publish=publish)
        case "fire_retry":
            return await chat.fire_retry(publish=publish)
        case "require_action":
            return await chat.require_action(publish=publish)
        case "answer":
            return await chat.answer(publish=publish)
        case "interrupt":
            return await chat.interrupt(publish=publish)
        case "finish":
            return await chat.finish(publish=publish)
    raise AssertionError(name)


def moment(cut: int, held: bool) -> str:
    if held:
        return f"during-{cut}-{LIFE[cut]}"
    return f"after-{cut}-{LIFE[cut - 1]}" if cut else "before-all"


def ends_with(reader: Reader, event: ChatEvent) -> bool:
    return bool(reader.events) and reader.events[-1] is event


MOMENTS = [
    pytest.param(cut, held, id=moment(cut, held))
    for cut in range(len(LIFE) + 1)
    for held in (False, True)
    if not held or (cut < len(LIFE) and LIFE[cut] != "stream")
]


def spread(states: list[Client], count: int) -> list[Client]:
    """``count`` states evenly spread from the first to the last."""
    if len(states) <= count:
        return states
    step = (len(states) - 1) / (count - 1)
    return [states[round(i * step)] for i in range(count)]


@pytest.mark.parametrize(("cut", "held"), MOMENTS)
async def test_a_subscriber_joining_at_any_moment_gets_each_event_once(
    db: Database, cut: int, held: bool
) -> None:
    """Join after ``cut`` steps of ``LIFE`` (after step ``cut - 1``, or ``during`` step ``cut``:
    its commit made and its events not yet published), from the start or from where a client
    that saw everything up to some earlier event stood: each subscriber gets its snapshot, then
    exactly the events published after its read, none repeated, and ends where a subscriber
    from the start is."""
    hub = ChatHub(db, page_size=2)
    chat = await scripted_chat(db, hub, dynamic_tools=[{"name": "lookup"}])
    reference = Client()
    states = [Client()]
    ref = Reader(reference, on_event=lambda: states.append(copy.deepcopy(reference)))
    async with trio.open_nursery() as nursery:
        await nursery.start(ref.run, hub, chat.id, StreamCursor())
        for name in LIFE[:cut]:
            await live_step(chat, name, publish=True)
        pending = await live_step(chat, LIFE[cut], publish=False) if held else None
        # The reference from the start: its snapshot (status, queue), then every event once.
        await ref.wait_for(lambda: len(ref.events) == 2 + len(chat.published))
        assert ref.events[2:] == chat.published

        mark = len(chat.published)
        late: list[Reader] = []
        for state in spread(states, 8):
            reader = Reader(copy.deepcopy(state))
            await nursery.start(reader.run, hub, chat.id, state.cursor())  # its read is done
            late.append(reader)
        if pending is not None:
            pending.publish(hub, chat.id)
        for name in LIFE[cut + held :]:
            await live_step(chat, name, publish=True)
        sentinel = QueueUpdated(())
        hub.publish(chat.id, [sentinel])  # the last event: once it arrives, all have
        chat.published.append(sentinel)
        for reader in [ref, *late]:
            await reader.wait_for(partial(ends_with, reader, sentinel))
        nursery.cancel_scope.cancel()

    after = chat.published[mark:]
    if pending is not None:  # every snapshot read that commit: its events are not sent again
        assert after[: len(pending.events)] == pending.events
        after = after[len(pending.events) :]
    for reader in late:
        snapshot = reader.events[: len(reader.events) - len(after)]
        assert reader.events[len(snapshot) :] == after
        kinds = [type(e) for e in snapshot]
        assert (kinds.count(StatusChanged), kinds.count(QueueUpdated)) == (1, 1), snapshot
        for kind in (RetryScheduled, ErrorRaised, ActionRequired):
            assert kinds.count(kind) <= 1, snapshot
        assert reader.client.view() == reference.view()


# -- the shard leaves the worker --------------------------------------------------------------


class Moved:
    """Consumes a subscription until it ends with ``OwnerMoved`` (kept), counting events."""

    def __init__(self) -> None:
        self.events: list[ChatEvent] = []
        self.moved: OwnerMoved | None = None
        self.done = trio.Event()
        self.got_event = trio.Event()

    async def run(
        self,
        hub: ChatHub,
        chat_id: UUID,
        cursor: StreamCursor,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with hub.subscribe(chat_id, cursor) as events:
                task_status.started()
                async for batch in events:
                    self.events.extend(batch)
                    self.got_event.set()
        except OwnerMoved as exc:
            self.moved = exc
        finally:
            self.done.set()


async def test_disown_ends_the_streams_of_the_lost_shards_only(db: Database) -> None:
    hub = ChatHub(db)
    lost, kept = await scripted_chat(db, hub), await scripted_chat(db, hub)
    await lost.user_turn("q")
    await kept.user_turn("q")
    shards = {lost.id: 3, kept.id: 4}
    first, second, other = Moved(), Moved(), Moved()
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run, hub, lost.id, StreamCursor(1))
        await nursery.start(second.run, hub, lost.id, StreamCursor(1))
        await nursery.start(other.run, hub, kept.id, StreamCursor(1))
        lost.stream("a")
        with trio.fail_after(DEADLINE_S):
            await first.got_event.wait()
        assert hub.stats.subscribers == 3

        hub.disown(frozenset({3, 9}), shards.__getitem__)
        with trio.fail_after(DEADLINE_S):
            await first.done.wait()
            await second.done.wait()
        for reader in (first, second):
            assert reader.moved is not None
            assert reader.moved.chat_id == lost.id
        assert hub.stats.subscribers == 1
        assert hub.tracked_chats == 1  # the lost chat's buffer is gone with it

        kept.stream("b")  # the chat still served here streams on
        with trio.fail_after(DEADLINE_S):
            while not any(isinstance(e, MessagePart) for e in other.events):
                other.got_event = trio.Event()
                await other.got_event.wait()
        assert not other.done.is_set()
        nursery.cancel_scope.cancel()


async def test_disown_during_the_history_read_ends_the_stream_before_anything_live(
    db: Database,
) -> None:
    hub: ChatHub

    async def disown_now(chat_id: UUID, after_seq: int) -> None:
        hub.disown(frozenset({0}), lambda _chat: 0)
        await trio.lowlevel.checkpoint()

    hub = ChatHub(db, page_hook=disown_now)
    lost = await scripted_chat(db, hub)
    await lost.user_turn("q")
    reader = Moved()
    with trio.fail_after(DEADLINE_S):
        await reader.run(hub, lost.id, StreamCursor())
    assert reader.moved is not None
    assert not any(isinstance(e, CommittedMessage) for e in reader.events)
    assert hub.stats.subscribers == 0
