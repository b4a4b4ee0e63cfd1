"""Property tests of ``decide``: random sequences of commands and internal events.

A chat starts empty and receives a random sequence of messages. Internal events carry the
current episode most of the time and a stale one sometimes. After every step the invariants of
DESIGN.md section 2 are checked on the decision, on the new state, and on the live history the
decisions wrote so far (kept here the way the store keeps it: truncation soft-deletes). At the
end the chat is let come to rest, and every tool call in the history has exactly one result.
A deleted chat is replaced by a new one and the sequence goes on.
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
from chatd.domain.conversation import (
    ContentPart,
    SummaryPart,
    TextPart,
    ToolCallPart,
    ToolResultPart,
)
from chatd.domain.decide import decide
from chatd.domain.effects import (
    ArmActionDeadline,
    ArmRetryTimer,
    CancelGeneration,
    Decision,
    DisarmTimers,
    Done,
    Effect,
    InvalidCommand,
    MessageAccepted,
    NewMessage,
    Notify,
    Publish,
    QueueFull,
    Refusal,
    Reply,
    RunTools,
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
    PendingToolCall,
    PreviewReset,
    QueuedEntry,
    RetryScheduled,
)
from chatd.domain.mailbox import (
    ActionDeadlineFired,
    Compact,
    DeleteChat,
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
    Summarized,
    ToolResult,
    ToolsCompleted,
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
    Compact,
    DeleteChat,
)

# The output decide writes for a built-in call the tools left unanswered.
NO_RESULT = json.dumps({"error": "the tool returned no result"})

# -- the chat as the store would hold it --------------------------------------------------


@dataclass
class Chat:
    chat_id: UUID = CHAT
    state: ChatState = field(default_factory=lambda: ChatState(CHAT))
    history: list[NewMessage] = field(default_factory=list)  # live (not truncated) messages
    written_ids: set[UUID] = field(default_factory=set)
    now: float = 1_000.0
    counter: int = 0
    deleted: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    seen: Counter[str] = field(default_factory=Counter)

    def fresh(self) -> int:
        self.counter += 1
        return self.counter

    def apply(self, decision: Decision) -> None:
        if decision.delete:
            # The chat is gone; the sequence goes on with a new one (its own message ids).
            self.deleted += 1
            self.chat_id = UUID(int=CHAT.int + self.deleted)
            self.state = ChatState(self.chat_id)
            self.history = []
            return
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


def _episode(data: st.DataObject, state: ChatState, *, live: bool = True) -> tuple[Episode, bool]:
    """``live``: whether the event can be of the current episode at all. An outcome of a model
    call cannot while built-in tools run (no model call runs), nor a model step while a summary
    is made; ``decide`` ignores those (test_decide_table's rows say so), so they are drawn
    stale only here."""
    current = state.episode
    if live and data.draw(st.integers(0, 4)) > 0:
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
    idle = bool(chat.state.running_tools) or chat.state.compacting
    episode, stale = _episode(data, chat.state, live=not idle)
    builtin = [
        ToolCallPart(f"call_{chat.fresh()}", "current_time", "{}")
        for _ in range(data.draw(st.integers(0, 2)))
    ]
    dynamic = [
        ToolCallPart(f"call_{chat.fresh()}", "deploy", '{"env": "prod"}')
        for _ in range(data.draw(st.integers(0, 2)))
    ]
    text: list[ContentPart] = [TextPart("an answer")] if data.draw(st.booleans()) else []
    # The model may interleave the two kinds of calls.
    calls: list[ContentPart] = data.draw(st.permutations([*builtin, *dynamic]))
    return Drawn(
        StepCompleted(
            episode,
            (*text, *calls),
            None,
            builtin_calls=tuple(builtin),
            dynamic_calls=tuple(dynamic),
        ),
        stale,
    )


def _draw_tools_completed(data: st.DataObject, chat: Chat) -> Drawn:
    episode, stale = _episode(data, chat.state)
    calls = [c.id for c in chat.state.running_tools] or [f"call_{chat.fresh()}"]
    outputs = st.sampled_from(['"12:00"', '{"error": "no such file"}', "4"])
    results = [ToolResult(i, data.draw(outputs)) for i in data.draw(st.permutations(calls))]
    match data.draw(st.sampled_from(["all"] * 3 + ["missing", "extra"])):
        case "missing":
            results.pop(data.draw(st.integers(0, len(results) - 1)))
        case "extra":
            results.append(ToolResult(f"call_{chat.fresh()}", "{}"))
    return Drawn(ToolsCompleted(episode, tuple(results)), stale)


def _draw_summarized(data: st.DataObject, chat: Chat) -> Drawn:
    episode, stale = _episode(data, chat.state, live=not chat.state.running_tools)
    text = data.draw(st.sampled_from(["the story so far", ""]))
    return Drawn(Summarized(episode, text, chat.state.last_message_seq, None), stale)


def _draw_failure(data: st.DataObject, chat: Chat) -> Drawn:
    episode, stale = _episode(data, chat.state, live=not chat.state.running_tools)
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
    # Stopped while tools ran: the results of the calls that had finished.
    parts: list[ContentPart] = [
        ToolResultPart(call.id, '"12:00"')
        for call in chat.state.running_tools
        if data.draw(st.booleans())
    ]
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
    kinds += ["compact"]
    if data.draw(st.integers(0, 3)) == 0:
        kinds += ["delete_chat"]  # rarely: the sequence goes on with a new, empty chat
    if state.generating and state.running_tools:
        kinds += ["tools"] * 6 + ["interrupt"] * 3 + ["resumed"]
    elif state.generating and state.compacting:
        kinds += ["summarized"] * 5 + ["failed"] * 2 + ["interrupt"]
    elif state.generating:
        kinds += ["step"] * 6 + ["failed"] * 3 + ["interrupt"] * 2 + ["summarized"]
    if state.status is R and state.retry_at is not None:
        kinds += ["timer"] * 4
    if state.status is I:
        kinds += ["stopped"] * 5
    if state.status is A:
        kinds += ["submit"] * 5 + ["deadline"] * 2 + ["edit"] * 2 + ["send"]
    if state.status in (W, E):
        kinds += ["compact"]
    # Now and then anything at all, in any state (they must be ignored or refused).
    kinds += ["step", "failed", "stopped", "timer", "deadline", "submit", "tools", "summarized"]
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
            # Any user message of the history: the ones a summary covers are refused.
            target = _draw_target(data, [m.id for m in chat.history if m.role == "user"])
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
        case "compact":
            return Drawn(Compact())
        case "delete_chat":
            return Drawn(DeleteChat())
        case "step":
            return _draw_step(data, chat)
        case "tools":
            return _draw_tools_completed(data, chat)
        case "summarized":
            return _draw_summarized(data, chat)
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
        case Compact():
            if state.archived or state.status not in (W, E):
                return TransitionNotAllowed
            if state.last_message_seq <= state.summary_seq:
                return TransitionNotAllowed
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
    assert (state.status is A) == (state.action_deadline is not None)
    if state.status is A:
        assert state.pending_calls
        assert not state.running_tools
    if state.pending_calls:
        # The client's calls are asked for, or held while chatd's own calls run.
        assert state.status is A or state.running_tools
    if state.running_tools:
        assert state.status in (R, I)
        assert state.retry_at is None
        assert 0 < state.tools_message_seq <= state.last_message_seq
        assert not state.compacting
    else:
        assert state.tools_message_seq == 0
    if state.compacting:
        # The database requires it: compacting only while running.
        assert state.status is R
        assert not state.pending_calls
    if state.retry_at is not None:
        assert state.status is R
    if state.status is E:
        assert state.last_error is not None
    if state.status is W:
        assert state.queue == ()
        assert state.retry_count == 0
        assert state.last_error is None
    assert 0 <= state.summary_seq <= state.last_message_seq
    assert len(state.queue) <= POLICY.max_queue_length
    assert len({q.id for q in state.queue}) == len(state.queue)
    calls = [c.id for c in (*state.running_tools, *state.pending_calls)]
    assert len(set(calls)) == len(calls)


def check_history(chat: Chat) -> None:
    """The live history: ordered, every call answered (once) before the next user, assistant
    or summary message, the unanswered calls are exactly the running and pending ones, and the
    user messages the state knows are exactly those after the newest summary."""
    seqs = [m.seq for m in chat.history]
    assert seqs == sorted(set(seqs))
    versions = [m.history_version for m in chat.history]
    assert versions == sorted(versions)
    outstanding: list[str] = []
    summary_seq = 0
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
            case "summary":
                assert not outstanding, "a summary while tool calls are unanswered"
                (part,) = m.parts
                assert isinstance(part, SummaryPart)
                assert part.through_seq < m.seq
                summary_seq = m.seq
    state = chat.state
    assert sorted(outstanding) == sorted(c.id for c in (*state.running_tools, *state.pending_calls))
    if state.running_tools:
        # The calls running are those of the newest message, the step that made them.
        newest = chat.history[-1]
        assert (newest.role, newest.seq) == ("assistant", state.tools_message_seq)
    assert state.summary_seq == summary_seq
    users = [(m.id, m.seq) for m in chat.history if m.role == "user" and m.seq > summary_seq]
    assert users == [(u.id, u.seq) for u in state.user_messages]
    if chat.history:
        assert chat.history[-1].history_version <= state.history_version


def check_every_call_answered_once(chat: Chat) -> None:
    """At rest, every tool call of the history has exactly one result."""
    calls = Counter(
        p.id
        for m in chat.history
        if m.role == "assistant"
        for p in m.parts
        if isinstance(p, ToolCallPart)
    )
    results = Counter(
        p.call_id for m in chat.history for p in m.parts if isinstance(p, ToolResultPart)
    )
    assert results == calls
    assert set(calls.values()) <= {1}


def check_deleted(before: ChatState, decision: Decision) -> None:
    """Deleting is allowed in every state: nothing is written, what runs stops without keeping
    anything, the timers go."""
    assert decision.state == before
    assert decision.messages == ()
    assert decision.truncate_after_seq is None
    runs = before.generating or before.status is I
    stop = (CancelGeneration(keep_partial=False),) if runs else ()
    assert decision.effects == (*stop, DisarmTimers(), Reply(Done()))


def check_tool_messages(before: ChatState, message: MailboxMessage, decision: Decision) -> None:
    """Every tool message answers the calls decide was waiting for, once each, in order."""
    tools = [m for m in decision.messages if m.role == "tool"]
    assert len(tools) <= 1
    if isinstance(message, StepCompleted):
        assert not tools, "a step's tools run after its commit"
    for m in tools:
        results = [p for p in m.parts if isinstance(p, ToolResultPart)]
        assert len(results) == len(m.parts)
        ids = [r.call_id for r in results]
        if isinstance(message, ToolsCompleted):
            # chatd's own calls answered; the client's stay held.
            given = {r.call_id: r.output for r in message.results}
            assert ids == [c.id for c in before.running_tools]
            assert all(not r.is_error for r in results)
            assert all(r.output == given.get(r.call_id, NO_RESULT) for r in results)
            assert decision.state.pending_calls == before.pending_calls
        elif before.running_tools:
            # Stopped while tools ran: one result for every call of the step.
            assert isinstance(message, GenerationStopped | Resumed)
            assert ids == [c.id for c in (*before.running_tools, *before.pending_calls)]
            finished: dict[str, ToolResultPart] = {}
            if isinstance(message, GenerationStopped):
                finished = {p.call_id: p for p in message.parts if isinstance(p, ToolResultPart)}
            for r in results:
                if r.call_id in finished:
                    assert r == finished[r.call_id]
                else:
                    assert r.is_error
                    assert json.loads(r.output)["error"] == "cancelled"
        else:
            assert ids == [c.id for c in before.pending_calls]
            if isinstance(message, SubmitToolResults):
                submitted = {r.call_id: r.output for r in message.results}
                assert all(r.output == submitted[r.call_id] for r in results)
                assert not any(r.is_error for r in results)
            else:
                assert all(r.is_error for r in results)
                assert all(json.loads(r.output)["error"] == "cancelled" for r in results)


def check_tools_and_summaries(
    before: ChatState, message: MailboxMessage, decision: Decision
) -> None:
    after = decision.state
    written = decision.messages
    starts = of_type(decision.effects, StartGeneration)

    # Built-in calls run only once their step is committed, and again on a resume.
    runs = of_type(decision.effects, RunTools)
    assert len(runs) <= 1
    if runs:
        assert isinstance(message, StepCompleted | Resumed)
        assert after.status is R
        assert runs == [RunTools(after.episode, after.tools_message_seq, after.running_tools)]
        assert not starts
    if after.running_tools and not before.running_tools:
        assert isinstance(message, StepCompleted)
        assert runs
        assert [m.role for m in written] == ["assistant"]
        assert after.tools_message_seq == written[0].seq
        assert after.running_tools == tuple(
            PendingToolCall(c.id, c.name, c.arguments) for c in message.builtin_calls
        )
        assert after.pending_calls == tuple(
            PendingToolCall(c.id, c.name, c.arguments) for c in message.dynamic_calls
        )
        assert after.generation_attempt == before.generation_attempt
    if isinstance(message, Resumed) and after.running_tools and after.status is R:
        assert runs
    if after.running_tools and before.running_tools:
        assert after.running_tools == before.running_tools
        assert after.tools_message_seq == before.tools_message_seq
        assert written == ()

    # Compacting: asked for in a chat at rest, only while running.
    if after.compacting and not before.compacting:
        assert isinstance(message, Compact)
        assert before.status in (W, E)
        assert starts
        assert after.history_version == before.history_version
    summaries = [m for m in written if m.role == "summary"]
    assert len(summaries) <= 1
    if summaries:
        assert isinstance(message, Summarized)
        (summary,) = summaries
        assert written[0] is summary
        assert summary.parts == (SummaryPart(message.text, message.through_seq),)
        assert summary.usage == message.usage
        assert after.summary_seq == summary.seq
        assert not after.compacting
        if before.compacting:
            # Asked for by hand: the turn ends (or the next queued message starts).
            assert after.status is W or [m.role for m in written] == ["summary", "user"]
        else:
            # Made room for the step that starts now.
            assert after.status is R
            assert starts
    else:
        assert after.summary_seq == before.summary_seq


def check_decision(
    chat: Chat, before: ChatState, message: MailboxMessage, decision: Decision
) -> None:
    after = decision.state
    effects = decision.effects
    events = published(decision)
    is_command = isinstance(message, COMMANDS)

    assert decision.delete == isinstance(message, DeleteChat)
    if decision.delete:
        check_deleted(before, decision)
        return

    # Counters never go back.
    assert after.history_version >= before.history_version
    assert after.generation_attempt >= before.generation_attempt
    assert after.last_message_seq >= before.last_message_seq
    assert after.summary_seq >= before.summary_seq

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
            assert m.id == derived_message_id(chat.chat_id, m.seq)

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

    # A user message never comes before the results closing the unanswered calls (the ones
    # chatd runs and the client's), unless the edit removes the message that made them.
    tools = [m for m in written if m.role == "tool"]
    if (before.running_tools or before.pending_calls) and users:
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
    check_tool_messages(before, message, decision)
    check_tools_and_summaries(before, message, decision)

    # A new provider attempt: one StartGeneration for the new episode, and only then.
    starts = of_type(effects, StartGeneration)
    assert len(starts) <= 1
    assert (after.generation_attempt > before.generation_attempt) == bool(starts)
    if starts:
        assert after.generation_attempt == before.generation_attempt + 1
        assert starts[0].episode == after.episode
        assert after.status is R
        assert after.retry_at is None
        assert not after.running_tools
        if after.history_version == before.history_version and before.status is R:
            # Same history, new attempt of a running step (a retry or a resume): what
            # streamed for the old one is stale.
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

    # Stopping the stream (or the tools, or the summary call).
    cancels = of_type(effects, CancelGeneration)
    assert len(cancels) <= 1
    if after.status is I and before.status is not I:
        assert cancels == [CancelGeneration(keep_partial=True)]
        assert before.generating
        assert not after.compacting
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
        assert decision.truncate_after_seq >= before.summary_seq
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
        # Right after the step, or once chatd's own calls of the step are answered.
        assert isinstance(message, StepCompleted | ToolsCompleted)
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
        if isinstance(decision, UnknownTarget) and isinstance(message, EditMessage):
            # The refusal says which messages can be edited.
            summarized = "message after the chat's newest summary"
            assert decision.what == (summarized if before.summary_seq else "message")
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
    _finish_all_turns(chat)
    assert chat.state.status in (W, E)
    check_every_call_answered_once(chat)


def label(state: ChatState) -> str:
    """The status, and what runs in it: ``running+tools+held``, ``running+retry``, ..."""
    flags = [
        ("retry", state.retry_at is not None),
        ("tools", bool(state.running_tools)),
        ("held", bool(state.running_tools and state.pending_calls)),
        ("compacting", state.compacting),
        ("summarized", state.status is W and state.summary_seq > 0),
    ]
    return "+".join([state.status.value, *(name for name, on in flags if on)])


def brief(state: ChatState) -> str:
    """The label without the held calls (what a transition needs set up is rare enough)."""
    return label(state).replace("+held", "")


@dataclass
class Reach:
    """What the sequences of the sampling test reached (to know the test is not vacuous)."""

    labels: set[str] = field(default_factory=set)
    transitions: set[tuple[str, str, str]] = field(default_factory=set)


def test_the_random_sequences_reach_every_status_and_message() -> None:
    """The generator is not vacuous: it reaches every status (and a retry wait), sends every
    kind of message, and has every kind of command refused."""
    reach = Reach()
    refusals: Counter[str] = Counter()
    seen: Counter[str] = Counter()

    @settings(max_examples=150, deadline=None, database=None, derandomize=True)
    @given(st.data())
    def explore(data: st.DataObject) -> None:
        chat = Chat()
        for _ in range(40):
            chat.now += data.draw(st.sampled_from([0.0, 7.0, 400.0]))
            before = chat.state
            drawn = draw_message(data, chat)
            outcome = step(chat, drawn)
            if isinstance(outcome, Decision) and not outcome.delete:
                reach.labels.add(label(outcome.state))
                kind = type(drawn.message).__name__
                reach.transitions.add((brief(before), kind, brief(chat.state)))
        refusals.update(chat.refusals)
        seen.update(chat.seen)

    explore()
    statuses = {name.split("+")[0] for name in reach.labels}
    assert statuses == {s.value for s in ChatStatus}
    for name in ["running+retry", "running+tools", "running+tools+held", "interrupting+tools"]:
        assert name in reach.labels, name
    assert set(seen) == {t.__name__ for t in MESSAGE_TYPES}
    assert set(refusals) == {"TransitionNotAllowed", "InvalidCommand", "QueueFull", "UnknownTarget"}
    # A few transitions that matter and need several steps to set up.
    for transition in [
        ("requires_action", "SubmitToolResults", "running"),
        ("requires_action", "ActionDeadlineFired", "waiting"),
        ("interrupting", "GenerationStopped", "running"),
        ("running+retry", "RetryTimerFired", "running"),
        ("running", "GenerationFailed", "error"),
        ("requires_action", "SendMessage", "running"),
        ("requires_action", "EditMessage", "running"),
        ("running", "StepCompleted", "running+tools"),
        ("running", "StepCompleted", "requires_action"),
        ("running+tools", "ToolsCompleted", "running"),
        ("running+tools", "ToolsCompleted", "requires_action"),
        ("running+tools", "Resumed", "running+tools"),
        ("running+tools", "Interrupt", "interrupting+tools"),
        ("interrupting+tools", "GenerationStopped", "waiting"),
        ("waiting", "Compact", "running+compacting"),
        ("running+compacting", "Summarized", "waiting+summarized"),
        ("running", "Summarized", "running"),
    ]:
        assert transition in reach.transitions, transition


MESSAGE_TYPES: tuple[type[Any], ...] = (
    *COMMANDS,
    StepCompleted,
    ToolsCompleted,
    Summarized,
    GenerationFailed,
    GenerationStopped,
    RetryTimerFired,
    ActionDeadlineFired,
    Resumed,
)


# -- the queue -----------------------------------------------------------------------------


def _finish_all_turns(chat: Chat) -> list[UUID]:
    """Let every run end (a stop completes, a retry fires, tools and summaries answer, a step
    answers, the client never does) until the chat rests, and list the user messages that
    started turns, in order."""
    started: list[UUID] = []
    for _ in range(50):
        state = chat.state
        if state.status in (W, E):
            return started
        message: MailboxMessage
        if state.status is I:
            message = GenerationStopped(state.episode, (TextPart("partial"),))
        elif state.status is A:
            message = ActionDeadlineFired(state.history_version)
        elif state.retry_at is not None:
            message = RetryTimerFired(state.episode)
        elif state.running_tools:
            results = tuple(ToolResult(c.id, '"done"') for c in state.running_tools)
            message = ToolsCompleted(state.episode, results)
        elif state.compacting:
            message = Summarized(state.episode, "summary", state.last_message_seq, None)
        else:
            message = StepCompleted(state.episode, (TextPart("done"),), None)
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
