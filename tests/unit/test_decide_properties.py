"""Property tests of ``decide``: random sequences of commands and internal events.

A chat starts empty and receives a random sequence of messages. Internal events carry the
current episode most of the time and a stale one sometimes. After every step the invariants of
DESIGN.md section 2 are checked on the decision, on the new state, and on the live history the
decisions wrote so far (kept here the way the store keeps it: truncation soft-deletes).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd.domain.chat_state import ChatState, derived_message_id
from chatd.domain.chat_status import ChatStatus
from chatd.domain.conversation import ContentPart, TextPart, ToolCallPart, ToolResultPart
from chatd.domain.decide import decide
from chatd.domain.effects import (
    ArmActionDeadline,
    ArmRetryTimer,
    CancelGeneration,
    Decision,
    DisarmTimers,
    Effect,
    InvalidCommand,
    MessageAccepted,
    NewMessage,
    Notify,
    Publish,
    QueueFull,
    Refusal,
    Reply,
    StartGeneration,
    TransitionNotAllowed,
    UnknownTarget,
)
from chatd.domain.events import (
    ActionRequired,
    ChatEvent,
    Episode,
    ErrorRaised,
    HistoryReset,
    PreviewReset,
    QueuedEntry,
    RetryScheduled,
)
from chatd.domain.mailbox import (
    ActionDeadlineFired,
    DeleteQueued,
    EditMessage,
    GenerationFailed,
    GenerationStopped,
    Interrupt,
    MailboxMessage,
    PromoteQueued,
    Resumed,
    RetryTimerFired,
    SendMessage,
    SetArchived,
    StepCompleted,
    SubmitToolResults,
    ToolResult,
)
from chatd.domain.provider_failure import ErrorKind
from tests.unit.chat_states import CHAT, POLICY, failure

W = ChatStatus.WAITING
R = ChatStatus.RUNNING
I = ChatStatus.INTERRUPTING  # noqa: E741
A = ChatStatus.REQUIRES_ACTION
E = ChatStatus.ERROR

COMMANDS = (
    SendMessage,
    EditMessage,
    Interrupt,
    SubmitToolResults,
    PromoteQueued,
    DeleteQueued,
    SetArchived,
)

# -- the chat as the store would hold it --------------------------------------------------


@dataclass
class Chat:
    state: ChatState = field(default_factory=lambda: ChatState(CHAT))
    history: list[NewMessage] = field(default_factory=list)  # live (not truncated) messages
    written_ids: set[UUID] = field(default_factory=set)
    now: float = 1_000.0
    counter: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    seen: Counter[str] = field(default_factory=Counter)

    def fresh(self) -> int:
        self.counter += 1
        return self.counter

    def apply(self, decision: Decision) -> None:
        if decision.truncate_after_seq is not None:
            cut = decision.truncate_after_seq
            self.history = [m for m in self.history if m.seq <= cut]
        for m in decision.messages:
            assert m.id not in self.written_ids, "message ids are unique"
            self.written_ids.add(m.id)
            self.history.append(m)
        self.state = decision.state


# -- drawing the next message --------------------------------------------------------------


@dataclass(frozen=True)
class Drawn:
    message: MailboxMessage
    stale: bool = False  # an internal event of an abandoned episode or history version


def _episode(data: st.DataObject, state: ChatState) -> tuple[Episode, bool]:
    current = state.episode
    if data.draw(st.integers(0, 4)) > 0:
        return current, False
    stale = data.draw(
        st.sampled_from(
            [
                Episode(current.history_version, current.generation_attempt - 1),
                Episode(current.history_version - 1, current.generation_attempt),
                Episode(current.history_version - 2, current.generation_attempt - 3),
            ]
        )
    )
    return stale, True


def _draw_results(data: st.DataObject, chat: Chat) -> tuple[ToolResult, ...]:
    pending = [c.id for c in chat.state.pending_calls] or [f"call_{chat.fresh()}"]
    outputs = st.sampled_from(['{"ok": true}', "[1, 2]", '"text"', "null", "3.5"])
    results = [ToolResult(i, data.draw(outputs)) for i in data.draw(st.permutations(pending))]
    match data.draw(st.sampled_from(["valid"] * 4 + ["missing", "extra", "dup", "bad"])):
        case "missing":
            results.pop(data.draw(st.integers(0, len(results) - 1)))
        case "extra":
            results.append(ToolResult(f"call_{chat.fresh()}", "{}"))
        case "dup":
            results.append(data.draw(st.sampled_from(results)))
        case "bad":
            index = data.draw(st.integers(0, len(results) - 1))
            bad = data.draw(st.sampled_from(["not json", "{", "", "NaN", "Infinity"]))
            results[index] = ToolResult(results[index].call_id, bad)
    return tuple(results)


def _draw_step(data: st.DataObject, chat: Chat) -> Drawn:
    episode, stale = _episode(data, chat.state)
    builtin = [
        ToolCallPart(f"call_{chat.fresh()}", "current_time", "{}")
        for _ in range(data.draw(st.integers(0, 2)))
    ]
    dynamic = [
        ToolCallPart(f"call_{chat.fresh()}", "deploy", '{"env": "prod"}')
        for _ in range(data.draw(st.integers(0, 2)))
    ]
    text: list[ContentPart] = [TextPart("an answer")] if data.draw(st.booleans()) else []
    return Drawn(
        StepCompleted(
            episode,
            (*text, *builtin, *dynamic),
            None,
            builtin_results=tuple(ToolResult(c.id, '"12:00"') for c in builtin),
            dynamic_calls=tuple(dynamic),
        ),
        stale,
    )


def _draw_failure(data: st.DataObject, chat: Chat) -> Drawn:
    episode, stale = _episode(data, chat.state)
    match data.draw(st.sampled_from(["retryable", "retryable", "retry_after", "fatal"])):
        case "retryable":
            failed = failure(ErrorKind.RATE_LIMIT)
        case "retry_after":
            failed = failure(retry_after_s=data.draw(st.sampled_from([0.5, 3.0, 90.0])))
        case _:
            failed = failure(ErrorKind.AUTH, retryable=False)
    return Drawn(GenerationFailed(episode, failed), stale)


def _draw_stopped(data: st.DataObject, chat: Chat) -> Drawn:
    episode, stale = _episode(data, chat.state)
    parts: list[ContentPart] = []
    if data.draw(st.booleans()):
        parts.append(TextPart(data.draw(st.sampled_from(["", "partial"]))))
    if data.draw(st.booleans()):
        parts.append(ToolCallPart(f"call_{chat.fresh()}", "deploy", "{}"))
    return Drawn(GenerationStopped(episode, tuple(parts)), stale)


def _draw_target(data: st.DataObject, ids: list[UUID]) -> UUID:
    if ids and data.draw(st.integers(0, 4)) > 0:
        return data.draw(st.sampled_from(ids))
    return UUID(int=0xDEAD)


def _draw_text(data: st.DataObject) -> str:
    return data.draw(st.sampled_from(["hello", "more please", "why?", " ", ""]))


def draw_message(data: st.DataObject, chat: Chat) -> Drawn:
    state = chat.state
    kinds = ["send"] * 3 + ["edit", "interrupt", "promote", "delete", "archive", "resumed"]
    if state.status is R and state.retry_at is None:
        kinds += ["step"] * 6 + ["failed"] * 3 + ["interrupt"] * 2
    if state.status is R and state.retry_at is not None:
        kinds += ["timer"] * 4
    if state.status is I:
        kinds += ["stopped"] * 5
    if state.status is A:
        kinds += ["submit"] * 5 + ["deadline"] * 2 + ["edit", "send"]
    # Now and then anything at all, in any state (they must be ignored or refused).
    kinds += ["step", "failed", "stopped", "timer", "deadline", "submit"]
    match data.draw(st.sampled_from(kinds)):
        case "send":
            behavior = data.draw(st.sampled_from(["queue", "interrupt"]))
            message_id = UUID(int=chat.fresh())
            return Drawn(
                SendMessage(
                    message_id,
                    _draw_text(data),
                    "interrupt" if behavior == "interrupt" else "queue",
                )
            )
        case "edit":
            target = _draw_target(data, [u.id for u in state.user_messages])
            return Drawn(EditMessage(target, UUID(int=chat.fresh()), _draw_text(data)))
        case "interrupt":
            return Drawn(Interrupt())
        case "promote":
            return Drawn(PromoteQueued(_draw_target(data, [q.id for q in state.queue])))
        case "delete":
            return Drawn(DeleteQueued(_draw_target(data, [q.id for q in state.queue])))
        case "archive":
            return Drawn(SetArchived(data.draw(st.sampled_from([False, False, True]))))
        case "resumed":
            return Drawn(Resumed())
        case "step":
            return _draw_step(data, chat)
        case "failed":
            return _draw_failure(data, chat)
        case "stopped":
            return _draw_stopped(data, chat)
        case "timer":
            episode, stale = _episode(data, state)
            return Drawn(RetryTimerFired(episode), stale)
        case "deadline":
            stale = data.draw(st.integers(0, 4)) == 0
            version = state.history_version - (1 if stale else 0)
            return Drawn(ActionDeadlineFired(version), stale)
        case _:
            return Drawn(SubmitToolResults(_draw_results(data, chat)))


# -- what a refusal must be ----------------------------------------------------------------


def _is_json(text: str) -> bool:
    def reject(constant: str) -> Any:
        raise ValueError(constant)

    try:
        json.loads(text, parse_constant=reject)
    except ValueError:
        return False
    return True


def expected_refusal(state: ChatState, message: MailboxMessage) -> type[Refusal] | None:
    """The refusal the rules of DESIGN.md / issue 4 call for, or None if the command is fine."""
    busy = state.status in (R, I) or (state.status is A and isinstance(message, SendMessage))
    match message:
        case SendMessage(text=text, busy_behavior=behavior):
            if state.archived:
                return TransitionNotAllowed
            if not text.strip():
                return InvalidCommand
            queues = busy and not (state.status is A and behavior == "interrupt")
            # After an error, a new message waits behind the ones queued before it.
            queues = queues or (state.status is E and bool(state.queue))
            if queues and len(state.queue) >= POLICY.max_queue_length:
                return QueueFull
        case EditMessage(message_id=target, text=text):
            if state.archived:
                return TransitionNotAllowed
            if not text.strip():
                return InvalidCommand
            if target not in {u.id for u in state.user_messages}:
                return UnknownTarget
        case SubmitToolResults(results=results):
            if state.status is not A:
                return TransitionNotAllowed
            ids = [r.call_id for r in results]
            if sorted(ids) != sorted(c.id for c in state.pending_calls):
                return InvalidCommand
            if not all(_is_json(r.output) for r in results):
                return InvalidCommand
        case PromoteQueued(queued_id=target) | DeleteQueued(queued_id=target):
            if target not in {q.id for q in state.queue}:
                return UnknownTarget
        case _:
            pass
    return None


# -- the invariants ------------------------------------------------------------------------

T = TypeVar("T")


def published(decision: Decision) -> list[ChatEvent]:
    return [e for effect in decision.effects if isinstance(effect, Publish) for e in effect.events]


def of_type(effects: tuple[Effect, ...], kind: type[T]) -> list[T]:
    return [e for e in effects if isinstance(e, kind)]


def check_state(state: ChatState) -> None:
    """What must hold of every state, whatever led there."""
    assert (state.status is A) == bool(state.pending_calls) == (state.action_deadline is not None)
    if state.retry_at is not None:
        assert state.status is R
    if state.status is E:
        assert state.last_error is not None
    if state.status is W:
        assert state.queue == ()
        assert state.retry_count == 0
        assert state.last_error is None
    assert len(state.queue) <= POLICY.max_queue_length
    assert len({q.id for q in state.queue}) == len(state.queue)
    assert len({c.id for c in state.pending_calls}) == len(state.pending_calls)


def check_history(chat: Chat) -> None:
    """The live history: ordered, every call answered before the next user or assistant
    message, the unanswered calls are exactly the pending ones, and the user messages the
    state knows are exactly those of the history."""
    seqs = [m.seq for m in chat.history]
    assert seqs == sorted(set(seqs))
    versions = [m.history_version for m in chat.history]
    assert versions == sorted(versions)
    outstanding: list[str] = []
    for m in chat.history:
        ids = [p.call_id for p in m.parts if isinstance(p, ToolResultPart)]
        match m.role:
            case "user":
                assert not outstanding, "a user message while tool calls are unanswered"
                assert not ids
            case "assistant":
                assert not outstanding, "an assistant message while tool calls are unanswered"
                assert not ids
                outstanding = [p.id for p in m.parts if isinstance(p, ToolCallPart)]
            case "tool":
                assert ids
                assert len(m.parts) == len(ids)
                for call_id in ids:
                    assert call_id in outstanding, f"a result for no open call: {call_id}"
                    outstanding.remove(call_id)
    state = chat.state
    assert outstanding == [c.id for c in state.pending_calls]
    users = [(m.id, m.seq) for m in chat.history if m.role == "user"]
    assert users == [(u.id, u.seq) for u in state.user_messages]
    if chat.history:
        assert chat.history[-1].history_version <= state.history_version


def check_decision(
    chat: Chat, before: ChatState, message: MailboxMessage, decision: Decision
) -> None:
    after = decision.state
    effects = decision.effects
    events = published(decision)
    is_command = isinstance(message, COMMANDS)

    # Counters never go back.
    assert after.history_version >= before.history_version
    assert after.generation_attempt >= before.generation_attempt
    assert after.last_message_seq >= before.last_message_seq

    # Writes: consecutive seqs after the last one, increasing versions, stable ids.
    written = decision.messages
    first = before.last_message_seq + 1
    assert [m.seq for m in written] == list(range(first, first + len(written)))
    assert after.last_message_seq == before.last_message_seq + len(written)
    versions = [m.history_version for m in written]
    assert versions == sorted(set(versions))
    assert all(v > before.history_version for v in versions)
    if written:
        assert versions[-1] == after.history_version
    history_changed = bool(written) or decision.truncate_after_seq is not None
    assert (after.history_version > before.history_version) == history_changed
    for m in written:
        if m.role != "user":
            assert m.id == derived_message_id(CHAT, m.seq)

    # At most one user message, and it is the command's own or the queue's head.
    users = [m for m in written if m.role == "user"]
    assert len(users) <= 1
    own: UUID | None = None
    if isinstance(message, SendMessage):
        own = message.message_id
    elif isinstance(message, EditMessage):
        own = message.new_message_id
    for m in users:
        if m.id != own:
            assert before.queue, "a user message out of nowhere"
            head = before.queue[0]
            assert (m.id, m.parts) == (head.id, (TextPart(head.text),))
            if before.status is E and isinstance(message, SendMessage):
                new = QueuedEntry(message.message_id, message.text)
                assert after.queue == (*before.queue[1:], new)
            else:
                assert after.queue == before.queue[1:]

    # A user message never comes before the results closing the pending calls.
    tools = [m for m in written if m.role == "tool"]
    assert len(tools) <= 1
    if before.pending_calls and users:
        if decision.truncate_after_seq is not None:
            callers = [
                m.seq
                for m in chat.history
                if any(isinstance(p, ToolCallPart) for p in m.parts) and m.role == "assistant"
            ]
            assert callers
            assert decision.truncate_after_seq < callers[-1]
        else:
            assert tools
            assert written.index(tools[0]) < written.index(users[0])

    # Every tool message answers exactly the step's built-in calls or the pending calls.
    for m in tools:
        results = [p for p in m.parts if isinstance(p, ToolResultPart)]
        assert len(results) == len(m.parts)
        if isinstance(message, StepCompleted):
            assert [(r.call_id, r.output, r.is_error) for r in results] == [
                (r.call_id, r.output, False) for r in message.builtin_results
            ]
        else:
            assert [r.call_id for r in results] == [c.id for c in before.pending_calls]
            if isinstance(message, SubmitToolResults):
                submitted = {r.call_id: r.output for r in message.results}
                assert all(r.output == submitted[r.call_id] for r in results)
                assert not any(r.is_error for r in results)
            else:
                assert all(r.is_error for r in results)
                assert all(json.loads(r.output)["error"] == "cancelled" for r in results)

    # A new provider attempt: one StartGeneration for the new episode, and only then.
    starts = of_type(effects, StartGeneration)
    assert len(starts) <= 1
    assert (after.generation_attempt > before.generation_attempt) == bool(starts)
    if starts:
        assert after.generation_attempt == before.generation_attempt + 1
        assert starts[0].episode == after.episode
        assert after.status is R
        assert after.retry_at is None
        if after.history_version == before.history_version:
            # Same history, new attempt: what streamed for the old one is stale.
            assert PreviewReset(after.episode) in events

    # Exactly one reply to a command, none to an internal event.
    replies = of_type(effects, Reply)
    assert len(replies) == (1 if is_command else 0)
    if isinstance(message, SendMessage):
        reply = replies[0].value
        assert isinstance(reply, MessageAccepted)
        assert reply.message_id == message.message_id
        in_queue = any(q.id == message.message_id for q in after.queue)
        started = any(m.id == message.message_id for m in users)
        assert in_queue != started
        assert reply.queued == in_queue

    # Stopping the stream.
    cancels = of_type(effects, CancelGeneration)
    assert len(cancels) <= 1
    if after.status is I and before.status is not I:
        assert cancels == [CancelGeneration(keep_partial=True)]
        assert before.generating
    if cancels:
        if cancels[0].keep_partial:
            assert after.status is I
        else:
            assert isinstance(message, EditMessage)
            assert before.generating or before.status is I
    elif isinstance(message, EditMessage):
        assert not before.generating
        assert before.status is not I

    # Truncation: only by an edit, announced with a history reset.
    if decision.truncate_after_seq is not None:
        assert isinstance(message, EditMessage)
        resets = [e for e in events if isinstance(e, HistoryReset)]
        assert resets == [HistoryReset(before.history_version + 1, decision.truncate_after_seq)]
        assert after.queue == ()

    # Retry timer and the retry event.
    arms = of_type(effects, ArmRetryTimer)
    retries = [e for e in events if isinstance(e, RetryScheduled)]
    if arms:
        assert after.retry_at is not None
        assert arms == [ArmRetryTimer(after.episode, after.retry_at)]
    if after.retry_at is not None and before.retry_at is None:
        assert arms
        assert len(retries) == 1
        assert retries[0].retrying_at == after.retry_at
        assert retries[0].failure == after.last_error
        assert retries[0].attempt == after.retry_count + 1
        assert after.retry_count == before.retry_count + 1
        assert retries[0].delay_s >= POLICY.retry.backoff_s(after.retry_count)
    else:
        assert not retries
    if isinstance(message, Resumed) and after.retry_at is not None:
        assert arms

    # Action deadline and the action_required event.
    deadlines = of_type(effects, ArmActionDeadline)
    required = [e for e in events if isinstance(e, ActionRequired)]
    entered_action = after.status is A and (
        before.status is not A or before.history_version != after.history_version
    )
    if deadlines:
        assert after.action_deadline is not None
        assert deadlines == [ArmActionDeadline(after.history_version, after.action_deadline)]
    if entered_action:
        assert isinstance(message, StepCompleted)
        assert after.action_deadline == chat.now + POLICY.action_timeout_s
        assert deadlines
        assert required == [ActionRequired(after.pending_calls, after.action_deadline)]
        assert Notify("action_required") in effects
    else:
        assert not required
    if isinstance(message, Resumed) and after.status is A:
        assert deadlines

    # A timer that is no longer wanted is disarmed, unless it is the one that just fired.
    retry_gone = before.retry_at is not None and after.retry_at is None
    action_gone = before.status is A and (
        after.status is not A or after.history_version != before.history_version
    )
    if retry_gone and not isinstance(message, RetryTimerFired):
        assert DisarmTimers() in effects
    if action_gone and not isinstance(message, ActionDeadlineFired):
        assert DisarmTimers() in effects

    # Entering error is announced once, with the failure.
    errors = [e for e in events if isinstance(e, ErrorRaised)]
    if after.status is E and before.status is not E:
        assert after.last_error is not None
        assert errors == [ErrorRaised(after.last_error)]
        assert Notify("failed") in effects
    else:
        assert not errors

    # The queue changes only in the ways the rules allow.
    if after.queue != before.queue:
        check_queue_change(before, message, decision)


def check_queue_change(before: ChatState, message: MailboxMessage, decision: Decision) -> None:
    after = decision.state
    match message:
        case SendMessage(message_id=message_id, text=text, busy_behavior=behavior):
            entry = QueuedEntry(message_id, text)
            if before.status is E:
                # The oldest queued message starts; the new one waits at the end.
                assert after.queue == (*before.queue[1:], entry)
            elif behavior == "queue":
                assert after.queue == (*before.queue, entry)
            elif entry in after.queue:
                assert after.queue == (entry, *before.queue)
            else:  # started at once (no stream to stop): the queue is as it was
                raise AssertionError("the queue changed though the message started")
        case EditMessage():
            assert after.queue == ()
        case PromoteQueued(queued_id=target):
            assert after.queue[0].id == target
            assert sorted(after.queue, key=str) == sorted(before.queue, key=str)
            assert [q for q in after.queue if q.id != target] == [
                q for q in before.queue if q.id != target
            ]
        case DeleteQueued(queued_id=target):
            assert after.queue == tuple(q for q in before.queue if q.id != target)
        case _:
            # A run ended and the head became the next turn.
            assert after.queue == before.queue[1:]
            assert any(m.id == before.queue[0].id for m in decision.messages)


# -- the tests -----------------------------------------------------------------------------


def _decide_or_refuse(state: ChatState, message: MailboxMessage, now: float) -> Decision | Refusal:
    try:
        return decide(state, message, now=now, policy=POLICY)
    except Refusal as refusal:
        return refusal


def step(chat: Chat, drawn: Drawn) -> Decision | Refusal:
    before = chat.state
    message = drawn.message
    chat.seen[type(message).__name__] += 1
    decision = _decide_or_refuse(before, message, chat.now)
    if isinstance(decision, Refusal):
        assert isinstance(message, COMMANDS), "internal events are never refused"
        assert type(decision) is expected_refusal(before, message)
        chat.refusals[type(decision).__name__] += 1
        return decision
    assert expected_refusal(before, message) is None
    if drawn.stale:
        assert decision == Decision(before), "a stale event changes nothing"
    check_state(decision.state)
    check_decision(chat, before, message, decision)
    chat.apply(decision)
    check_history(chat)
    return decision


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_sequences_keep_every_invariant(data: st.DataObject) -> None:
    chat = Chat()
    steps = data.draw(st.integers(1, 50), label="steps")
    for _ in range(steps):
        chat.now += data.draw(st.sampled_from([0.0, 0.5, 7.0, 400.0]))
        drawn = draw_message(data, chat)
        step(chat, drawn)
    check_state(chat.state)


@dataclass
class Reach:
    """What the sequences of the sampling test reached (to know the test is not vacuous)."""

    statuses: set[tuple[str, bool]] = field(default_factory=set)
    transitions: set[tuple[str, str, str]] = field(default_factory=set)


def test_the_random_sequences_reach_every_status_and_message() -> None:
    """The generator is not vacuous: it reaches every status (and a retry wait), sends every
    kind of message, and has every kind of command refused."""
    reach = Reach()
    refusals: Counter[str] = Counter()
    seen: Counter[str] = Counter()

    @settings(max_examples=60, deadline=None, database=None, derandomize=True)
    @given(st.data())
    def explore(data: st.DataObject) -> None:
        chat = Chat()
        for _ in range(40):
            chat.now += data.draw(st.sampled_from([0.0, 7.0, 400.0]))
            before = chat.state
            drawn = draw_message(data, chat)
            outcome = step(chat, drawn)
            if isinstance(outcome, Decision):
                reach.statuses.add((outcome.state.status.value, outcome.state.retry_at is not None))
                reach.transitions.add(
                    (before.status.value, type(drawn.message).__name__, chat.state.status.value)
                )
        refusals.update(chat.refusals)
        seen.update(chat.seen)

    explore()
    assert {s for s, _ in reach.statuses} == {s.value for s in ChatStatus}
    assert ("running", True) in reach.statuses
    assert set(seen) == {t.__name__ for t in MESSAGE_TYPES}
    assert set(refusals) == {"TransitionNotAllowed", "InvalidCommand", "QueueFull", "UnknownTarget"}
    # A few transitions that matter and need several steps to set up.
    for transition in [
        ("requires_action", "SubmitToolResults", "running"),
        ("requires_action", "ActionDeadlineFired", "waiting"),
        ("interrupting", "GenerationStopped", "running"),
        ("running", "RetryTimerFired", "running"),
        ("running", "GenerationFailed", "error"),
        ("requires_action", "SendMessage", "running"),
        ("requires_action", "EditMessage", "running"),
    ]:
        assert transition in reach.transitions, transition


MESSAGE_TYPES: tuple[type[Any], ...] = (
    *COMMANDS,
    StepCompleted,
    GenerationFailed,
    GenerationStopped,
    RetryTimerFired,
    ActionDeadlineFired,
    Resumed,
)


# -- the queue -----------------------------------------------------------------------------


def _finish_all_turns(chat: Chat) -> list[UUID]:
    """Let every run end (a stop completes, a step answers) and list the user messages that
    started turns, in order."""
    started: list[UUID] = []
    for _ in range(50):
        state = chat.state
        if state.status is W:
            return started
        message: MailboxMessage
        if state.status is I:
            message = GenerationStopped(state.episode, (TextPart("partial"),))
        elif state.status is R and state.retry_at is not None:
            message = RetryTimerFired(state.episode)
        elif state.status is R:
            message = StepCompleted(state.episode, (TextPart("done"),), None)
        else:
            raise AssertionError(f"unexpected status {state.status}")
        decision = step(chat, Drawn(message))
        assert isinstance(decision, Decision)
        started += [m.id for m in decision.messages if m.role == "user"]
    raise AssertionError("the runs never ended")


@settings(max_examples=200, deadline=None)
@given(
    behaviors=st.lists(st.sampled_from(["queue", "interrupt"]), max_size=POLICY.max_queue_length),
    interrupting=st.booleans(),
)
def test_busy_sends_queue_or_go_next_and_run_in_order(
    behaviors: list[str], *, interrupting: bool
) -> None:
    """While busy, ``queue`` appends to the queue and ``interrupt`` puts the message at the
    head and stops the run; once the run ends, the head starts as the next turn, and so on."""
    chat = Chat()
    first = step(chat, Drawn(SendMessage(UUID(int=chat.fresh()), "first")))
    assert isinstance(first, Decision)
    if interrupting:
        step(chat, Drawn(Interrupt()))
        assert chat.state.status is I
    expected: list[UUID] = []
    for behavior in behaviors:
        message_id = UUID(int=chat.fresh())
        was_generating = chat.state.generating
        decision = step(
            chat,
            Drawn(
                SendMessage(message_id, "next", "interrupt" if behavior == "interrupt" else "queue")
            ),
        )
        assert isinstance(decision, Decision)
        assert decision.effects[-1] == Reply(MessageAccepted(message_id, queued=True))
        assert decision.messages == ()
        if behavior == "interrupt":
            expected.insert(0, message_id)
            assert chat.state.status is I
            assert (CancelGeneration(keep_partial=True) in decision.effects) == was_generating
        else:
            expected.append(message_id)
            assert CancelGeneration(keep_partial=True) not in decision.effects
        assert [q.id for q in chat.state.queue] == expected
    # One more than the queue holds is refused, whatever the behavior.
    if len(behaviors) == POLICY.max_queue_length:
        refused = step(chat, Drawn(SendMessage(UUID(int=chat.fresh()), "one too many")))
        assert isinstance(refused, QueueFull)
    assert _finish_all_turns(chat) == expected
    assert chat.state.queue == ()
