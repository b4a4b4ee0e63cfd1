"""The chat state machine: ``decide(state, message) -> Decision``, a pure function.

The actor persists what a decision writes in one transaction and only then runs its effects.
Some consequences are not spelled out here because they follow from the state diff and the
actor derives them the same way every time: every new message is published as a
``CommittedMessage``, a changed status or archived flag as ``StatusChanged``, a changed queue
as ``QueueUpdated``.

Rules kept (DESIGN.md section 2): a user message is never added while tool calls are
unanswered; leaving ``requires_action`` any way but valid results writes synthetic cancelled
results; an edit truncates the history, clears the queue and regenerates without keeping
partial output; ``history_version`` grows on every history change and ``generation_attempt`` on
every provider attempt.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from typing import assert_never
from uuid import UUID

from chatd.domain.chat_state import ChatPolicy, ChatState, UserMessageRef, derived_message_id
from chatd.domain.chat_status import ChatStatus
from chatd.domain.conversation import (
    ContentPart,
    SummaryPart,
    TextPart,
    ToolCallPart,
    ToolResultPart,
)
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
    Reply,
    RunTools,
    StartGeneration,
    TransitionNotAllowed,
    UnknownTarget,
)
from chatd.domain.events import (
    ActionRequired,
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
from chatd.domain.retry_policy import GiveUp, RetryAfter

W = ChatStatus.WAITING
R = ChatStatus.RUNNING
I = ChatStatus.INTERRUPTING  # noqa: E741 - the status table reads best with one letter each
A = ChatStatus.REQUIRES_ACTION
E = ChatStatus.ERROR


def decide(  # noqa: PLR0911, PLR0912 - one exhaustive match over the mailbox union
    state: ChatState, message: MailboxMessage, *, now: float, policy: ChatPolicy
) -> Decision:
    """Raises a ``Refusal`` for a command that cannot be carried out (nothing changes)."""
    match message:
        case SendMessage():
            return _send(state, message, policy)
        case EditMessage():
            return _edit(state, message)
        case Interrupt():
            return _interrupt(state)
        case SubmitToolResults():
            return _submit(state, message)
        case PromoteQueued():
            return _promote(state, message)
        case DeleteQueued():
            return _delete_queued(state, message)
        case SetArchived():
            return Decision(replace(state, archived=message.archived), effects=(Reply(Done()),))
        case Compact():
            return _compact(state)
        case DeleteChat():
            return _delete(state)
        case StepCompleted():
            return _step_completed(state, message, now, policy)
        case ToolsCompleted():
            return _tools_completed(state, message, now, policy)
        case Summarized():
            return _summarized(state, message)
        case GenerationFailed():
            return _generation_failed(state, message, now, policy)
        case GenerationStopped():
            return _generation_stopped(state, message)
        case RetryTimerFired():
            return _retry_timer_fired(state, message)
        case ActionDeadlineFired():
            return _action_deadline_fired(state, message)
        case Resumed():
            return _resumed(state)
        case _:
            assert_never(message)


# -- commands ------------------------------------------------------------------------------


def _send(state: ChatState, m: SendMessage, policy: ChatPolicy) -> Decision:
    if state.archived:
        raise TransitionNotAllowed("archived", "sending a message")
    if not m.text.strip():
        raise InvalidCommand("text", "must not be empty")
    match state.status:
        case ChatStatus.WAITING | ChatStatus.ERROR:
            if state.queue:
                # Only after an error: messages queued before it go first, in their order.
                queued = _enqueue(state, m, policy, at_head=False)
                turn = _finish_turn(queued, notify=False)
                return replace(turn, effects=(*turn.effects, _accepted(m, queued=True)))
            return _begin_turn(state, m.message_id, m.text, queued=False)
        case ChatStatus.RUNNING | ChatStatus.INTERRUPTING:
            at_head = m.busy_behavior == "interrupt"
            queued = _enqueue(state, m, policy, at_head=at_head)
            if at_head and state.status is R:
                # Interrupt now; the message is the queue head, promoted once the run stopped
                # (at once when only a retry timer was armed: then it is no longer queued).
                stopped = _interrupt(queued, reply=False)
                still_queued = any(q.id == m.message_id for q in stopped.state.queue)
                return replace(
                    stopped, effects=(*stopped.effects, _accepted(m, queued=still_queued))
                )
            return Decision(queued, effects=(_accepted(m, queued=True),))
        case ChatStatus.REQUIRES_ACTION:
            if m.busy_behavior == "queue":
                queued = _enqueue(state, m, policy, at_head=False)
                return Decision(queued, effects=(_accepted(m, queued=True),))
            closed, results = _cancel_pending(state, "the user sent a new message")
            turn = _begin_turn(closed, m.message_id, m.text, queued=False)
            return replace(
                turn,
                messages=(results, *turn.messages),
                effects=(DisarmTimers(), *turn.effects),
            )
        case _:
            assert_never(state.status)


def _edit(state: ChatState, m: EditMessage) -> Decision:
    if state.archived:
        raise TransitionNotAllowed("archived", "editing a message")
    if not m.text.strip():
        raise InvalidCommand("text", "must not be empty")
    target = next((u for u in state.user_messages if u.id == m.message_id), None)
    if target is None:
        # Messages a summary covers are not kept in memory (nor editable: the prompt no longer
        # holds them), so the refusal says where editable messages are.
        what = "message after the chat's newest summary" if state.summary_seq else "message"
        raise UnknownTarget(what, m.message_id)
    stop: tuple[Effect, ...] = ()
    if state.generating or state.status is I:
        stop = (CancelGeneration(keep_partial=False),)
    truncated = replace(
        state,
        history_version=state.history_version + 1,
        user_messages=tuple(u for u in state.user_messages if u.seq < target.seq),
        queue=(),
        pending_calls=(),
        running_tools=(),
        tools_message_seq=0,
        compacting=False,
        action_deadline=None,
        retry_at=None,
        retry_count=0,
        last_error=None,
    )
    reset = HistoryReset(truncated.history_version, after_seq=target.seq - 1)
    turn = _begin_turn(truncated, m.new_message_id, m.text, queued=False)
    return replace(
        turn,
        truncate_after_seq=target.seq - 1,
        effects=(
            *stop,
            DisarmTimers(),
            Publish((reset, PreviewReset(turn.state.episode))),
            *turn.effects,
        ),
    )


def _interrupt(state: ChatState, *, reply: bool = True) -> Decision:
    done: tuple[Effect, ...] = (Reply(Done()),) if reply else ()
    match state.status:
        case ChatStatus.RUNNING if state.retry_at is not None:
            # Waiting for a retry: no stream to stop.
            cleared = replace(state, retry_at=None, retry_count=0, last_error=None)
            turn = _finish_turn(cleared, notify=False)
            return replace(turn, effects=(DisarmTimers(), *turn.effects, *done))
        case ChatStatus.RUNNING:
            # Whatever runs (a model step, built-in tools, a summary) stops; what it finished
            # is kept (GenerationStopped).
            stopping = replace(state, status=I, compacting=False)
            return Decision(stopping, effects=(CancelGeneration(keep_partial=True), *done))
        case ChatStatus.REQUIRES_ACTION:
            closed, results = _cancel_pending(state, "the user interrupted")
            turn = _finish_turn(closed, notify=False)
            return replace(
                turn,
                messages=(results, *turn.messages),
                effects=(DisarmTimers(), *turn.effects, *done),
            )
        case ChatStatus.WAITING | ChatStatus.INTERRUPTING | ChatStatus.ERROR:
            return Decision(state, effects=done)
        case _:
            assert_never(state.status)


def _submit(state: ChatState, m: SubmitToolResults) -> Decision:
    if state.status is not A:
        raise TransitionNotAllowed(state.status.value, "submitting tool results")
    _check_results(state.pending_calls, m.results)
    by_id = {r.call_id: r for r in m.results}
    answered, results = _results_message(
        state, [ToolResultPart(c.id, by_id[c.id].output) for c in state.pending_calls]
    )
    running = _running(replace(answered, pending_calls=(), action_deadline=None))
    return Decision(
        running,
        messages=(results,),
        effects=(DisarmTimers(), StartGeneration(running.episode), Reply(Done())),
    )


def _check_results(pending: tuple[PendingToolCall, ...], results: tuple[ToolResult, ...]) -> None:
    ids = [r.call_id for r in results]
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise InvalidCommand("results", f"duplicate call ids: {', '.join(duplicates)}")
    wanted = {c.id for c in pending}
    missing = [c.id for c in pending if c.id not in ids]
    if missing:
        raise InvalidCommand("results", f"missing results for call ids: {', '.join(missing)}")
    extra = [i for i in ids if i not in wanted]
    if extra:
        raise InvalidCommand("results", f"no pending calls with ids: {', '.join(extra)}")
    for index, result in enumerate(results):
        try:
            json.loads(result.output, parse_constant=_not_json)
        except ValueError:
            raise InvalidCommand(f"results[{index}].output", "must be valid JSON") from None


def _not_json(constant: str) -> None:
    """``json.loads`` takes NaN and Infinity, which JSON (RFC 8259) does not have."""
    raise ValueError(f"{constant} is not JSON")


def _promote(state: ChatState, m: PromoteQueued) -> Decision:
    entry = _queued(state, m.queued_id)
    rest = tuple(q for q in state.queue if q.id != entry.id)
    return Decision(replace(state, queue=(entry, *rest)), effects=(Reply(Done()),))


def _delete_queued(state: ChatState, m: DeleteQueued) -> Decision:
    entry = _queued(state, m.queued_id)
    rest = tuple(q for q in state.queue if q.id != entry.id)
    return Decision(replace(state, queue=rest), effects=(Reply(Done()),))


def _compact(state: ChatState) -> Decision:
    if state.archived:
        raise TransitionNotAllowed("archived", "compacting")
    if state.status not in (W, E):
        raise TransitionNotAllowed(state.status.value, "compacting")
    if state.last_message_seq <= state.summary_seq:
        raise TransitionNotAllowed("without messages since its last summary", "compacting")
    running = replace(_running(state), compacting=True)
    return Decision(running, effects=(StartGeneration(running.episode), Reply(Done())))


def _delete(state: ChatState) -> Decision:
    """Allowed in every status: what runs stops, nothing of it is kept."""
    stop: tuple[Effect, ...] = ()
    if state.status in (R, I) and state.retry_at is None:
        stop = (CancelGeneration(keep_partial=False),)
    return Decision(state, delete=True, effects=(*stop, DisarmTimers(), Reply(Done())))


# -- internal events -----------------------------------------------------------------------


def _step_completed(state: ChatState, m: StepCompleted, now: float, policy: ChatPolicy) -> Decision:
    if not (_model_step(state, m.episode) and not state.compacting):
        return Decision(state)  # a step of an abandoned episode
    seq = state.last_message_seq + 1
    assistant = NewMessage(
        derived_message_id(state.chat_id, seq),
        seq,
        "assistant",
        m.parts,
        state.history_version + 1,
        m.usage,
    )
    after = replace(
        state,
        last_message_seq=seq,
        history_version=state.history_version + 1,
        retry_count=0,
        last_error=None,
    )
    dynamic = tuple(PendingToolCall(c.id, c.name, c.arguments) for c in m.dynamic_calls)
    if m.builtin_calls:
        # The step is committed before any of its tools runs, so a tool with side effects
        # runs for a call that is durably recorded (the effect journal is keyed by it); the
        # client's calls wait until chatd's own are answered.
        calls = tuple(PendingToolCall(c.id, c.name, c.arguments) for c in m.builtin_calls)
        tooling = replace(after, running_tools=calls, tools_message_seq=seq, pending_calls=dynamic)
        return Decision(
            tooling, messages=(assistant,), effects=(RunTools(tooling.episode, seq, calls),)
        )
    if dynamic:
        return _await_action(replace(after, pending_calls=dynamic), (assistant,), now, policy)
    turn = _finish_turn(after, notify=True)
    return replace(turn, messages=(assistant, *turn.messages))


def _tools_completed(
    state: ChatState, m: ToolsCompleted, now: float, policy: ChatPolicy
) -> Decision:
    if not (state.status is R and state.running_tools and m.episode == state.episode):
        return Decision(state)  # tools of an abandoned episode
    by_id = {r.call_id: r.output for r in m.results}
    missing = json.dumps({"error": "the tool returned no result"})
    after, results = _results_message(
        replace(state, running_tools=(), tools_message_seq=0),
        [ToolResultPart(c.id, by_id.get(c.id, missing)) for c in state.running_tools],
    )
    if after.pending_calls:
        return _await_action(after, (results,), now, policy)
    running = _running(after)  # the model continues with the results of its tools
    return Decision(running, messages=(results,), effects=(StartGeneration(running.episode),))


def _await_action(
    state: ChatState, messages: tuple[NewMessage, ...], now: float, policy: ChatPolicy
) -> Decision:
    """Wait for the client's results to ``state.pending_calls``."""
    deadline = now + policy.action_timeout_s
    waiting = replace(state, status=A, action_deadline=deadline)
    return Decision(
        waiting,
        messages=messages,
        effects=(
            ArmActionDeadline(waiting.history_version, deadline),
            Publish((ActionRequired(waiting.pending_calls, deadline),)),
            Notify("action_required"),
        ),
    )


def _summarized(state: ChatState, m: Summarized) -> Decision:
    if not _model_step(state, m.episode):
        return Decision(state)
    seq = state.last_message_seq + 1
    summary = NewMessage(
        derived_message_id(state.chat_id, seq),
        seq,
        "summary",
        (SummaryPart(m.text, m.through_seq),),
        state.history_version + 1,
        m.usage,
    )
    after = replace(
        state,
        last_message_seq=seq,
        history_version=state.history_version + 1,
        summary_seq=seq,
        user_messages=(),  # every one is before the boundary now
        retry_count=0,
        last_error=None,
    )
    if state.compacting:  # asked for by hand: nothing to answer
        turn = _finish_turn(after, notify=False)
        return replace(turn, messages=(summary, *turn.messages))
    running = _running(after)  # the step the summary made room for
    return Decision(running, messages=(summary,), effects=(StartGeneration(running.episode),))


def _generation_failed(
    state: ChatState, m: GenerationFailed, now: float, policy: ChatPolicy
) -> Decision:
    if not _model_step(state, m.episode):
        return Decision(state)
    outcome = policy.retry.decide(m.failure, state.retry_count + 1)
    match outcome:
        case RetryAfter(delay_s=delay, attempt=attempt):
            at = now + delay
            waiting = replace(
                state, retry_count=state.retry_count + 1, retry_at=at, last_error=m.failure
            )
            return Decision(
                waiting,
                effects=(
                    Publish((RetryScheduled(attempt, delay, m.failure, at),)),
                    ArmRetryTimer(waiting.episode, at),
                ),
            )
        case GiveUp():
            failed = replace(state, status=E, retry_at=None, last_error=m.failure, compacting=False)
            return Decision(failed, effects=(Publish((ErrorRaised(m.failure),)), Notify("failed")))
        case _:
            assert_never(outcome)


def _generation_stopped(state: ChatState, m: GenerationStopped) -> Decision:
    if not (state.status is I and m.episode == state.episode):
        return Decision(state)
    if state.running_tools:
        # Stopped while built-in tools ran: the step is committed, so every call gets a result
        # (the ones that finished their own, the rest and the client's cancelled).
        finished = {p.call_id: p for p in m.parts if isinstance(p, ToolResultPart)}
        return _close_tools(state, finished, "the user interrupted")
    # A call without its result must never stay in the history: keep only the prose.
    kept = tuple(p for p in m.parts if not isinstance(p, ToolCallPart))
    messages: tuple[NewMessage, ...] = ()
    after = state
    if any(isinstance(p, TextPart) and p.text for p in kept):
        seq = state.last_message_seq + 1
        after = replace(state, last_message_seq=seq, history_version=state.history_version + 1)
        messages = (
            NewMessage(
                derived_message_id(state.chat_id, seq),
                seq,
                "assistant",
                kept,
                after.history_version,
            ),
        )
    turn = _finish_turn(after, notify=False)
    return replace(turn, messages=(*messages, *turn.messages))


def _retry_timer_fired(state: ChatState, m: RetryTimerFired) -> Decision:
    if not (state.status is R and state.retry_at is not None and m.episode == state.episode):
        return Decision(state)
    retrying = replace(state, retry_at=None, generation_attempt=state.generation_attempt + 1)
    return Decision(
        retrying,
        effects=(
            Publish((PreviewReset(retrying.episode),)),
            StartGeneration(retrying.episode),
        ),
    )


def _action_deadline_fired(state: ChatState, m: ActionDeadlineFired) -> Decision:
    if not (state.status is A and m.history_version == state.history_version):
        return Decision(state)
    closed, results = _cancel_pending(state, "no results arrived before the deadline")
    turn = _finish_turn(closed, notify=False)
    return replace(turn, messages=(results, *turn.messages))


def _resumed(state: ChatState) -> Decision:  # noqa: PLR0911 - one case per status
    match state.status:
        case ChatStatus.RUNNING if state.retry_at is not None:
            return Decision(state, effects=(ArmRetryTimer(state.episode, state.retry_at),))
        case ChatStatus.RUNNING if state.running_tools:
            # The committed step's tools run again; the effect journal keeps a side-effecting
            # call that had started from running twice.
            run = RunTools(state.episode, state.tools_message_seq, state.running_tools)
            return Decision(state, effects=(run,))
        case ChatStatus.RUNNING:
            # The stream of the previous attempt died with the process that ran it.
            again = replace(state, generation_attempt=state.generation_attempt + 1)
            return Decision(
                again,
                effects=(Publish((PreviewReset(again.episode),)), StartGeneration(again.episode)),
            )
        case ChatStatus.INTERRUPTING if state.running_tools:
            return _close_tools(state, {}, "the user interrupted")
        case ChatStatus.INTERRUPTING:
            return _finish_turn(state, notify=False)
        case ChatStatus.REQUIRES_ACTION:
            assert state.action_deadline is not None
            return Decision(
                state, effects=(ArmActionDeadline(state.history_version, state.action_deadline),)
            )
        case ChatStatus.WAITING | ChatStatus.ERROR:
            return Decision(state)
        case _:
            assert_never(state.status)


# -- building blocks -----------------------------------------------------------------------


def _model_step(state: ChatState, episode: Episode) -> bool:
    """A model call (a step, or a summary) of ``episode`` is what the chat waits for: not a
    stale one, and not while built-in tools run (the step they answer is committed)."""
    return state.generating and not state.running_tools and episode == state.episode


def _running(state: ChatState) -> ChatState:
    """A new provider attempt starts now."""
    return replace(
        state,
        status=R,
        generation_attempt=state.generation_attempt + 1,
        retry_count=0,
        retry_at=None,
        last_error=None,
    )


def _begin_turn(state: ChatState, message_id: UUID, text: str, *, queued: bool) -> Decision:
    """Add the user message and start generating (the chat has no unanswered calls)."""
    assert not state.pending_calls
    assert not state.running_tools
    seq = state.last_message_seq + 1
    with_message = replace(
        state,
        last_message_seq=seq,
        history_version=state.history_version + 1,
        user_messages=(*state.user_messages, UserMessageRef(message_id, seq)),
    )
    running = _running(with_message)
    user = NewMessage(message_id, seq, "user", (TextPart(text),), with_message.history_version)
    effects: tuple[Effect, ...] = (StartGeneration(running.episode),)
    if not queued:
        effects = (*effects, Reply(MessageAccepted(message_id, queued=False)))
    return Decision(running, messages=(user,), effects=effects)


def _finish_turn(state: ChatState, *, notify: bool) -> Decision:
    """The run is over: the next queued message starts, or the chat waits."""
    if state.queue:
        head, *rest = state.queue
        nxt = replace(state, queue=tuple(rest), compacting=False)
        return _begin_turn(nxt, head.id, head.text, queued=True)
    idle = replace(state, status=W, retry_at=None, retry_count=0, last_error=None, compacting=False)
    return Decision(idle, effects=(Notify("turn_finished"),) if notify else ())


def _enqueue(state: ChatState, m: SendMessage, policy: ChatPolicy, *, at_head: bool) -> ChatState:
    if len(state.queue) >= policy.max_queue_length:
        raise QueueFull(policy.max_queue_length)
    entry = QueuedEntry(m.message_id, m.text)
    queue = (entry, *state.queue) if at_head else (*state.queue, entry)
    return replace(state, queue=queue)


def _queued(state: ChatState, queued_id: UUID) -> QueuedEntry:
    entry = next((q for q in state.queue if q.id == queued_id), None)
    if entry is None:
        raise UnknownTarget("queued message", queued_id)
    return entry


def _results_message(
    state: ChatState, results: list[ToolResultPart]
) -> tuple[ChatState, NewMessage]:
    seq = state.last_message_seq + 1
    after = replace(state, last_message_seq=seq, history_version=state.history_version + 1)
    parts: tuple[ContentPart, ...] = tuple(results)
    message = NewMessage(
        derived_message_id(state.chat_id, seq), seq, "tool", parts, after.history_version
    )
    return after, message


def _cancel_pending(state: ChatState, reason: str) -> tuple[ChatState, NewMessage]:
    """Synthetic cancelled results for every pending call, so none stays unanswered."""
    output = json.dumps({"error": "cancelled", "reason": reason})
    closed, message = _results_message(
        state, [ToolResultPart(c.id, output, is_error=True) for c in state.pending_calls]
    )
    return replace(closed, pending_calls=(), action_deadline=None, status=R), message


def _close_tools(state: ChatState, finished: dict[str, ToolResultPart], reason: str) -> Decision:
    """End the turn of a step whose tools were stopped: the finished calls keep their results,
    the other built-in calls and the client's get cancelled ones."""
    output = json.dumps({"error": "cancelled", "reason": reason})
    calls = (*state.running_tools, *state.pending_calls)
    closed, message = _results_message(
        replace(state, running_tools=(), tools_message_seq=0, pending_calls=()),
        [finished.get(c.id, ToolResultPart(c.id, output, is_error=True)) for c in calls],
    )
    turn = _finish_turn(closed, notify=False)
    return replace(turn, messages=(message, *turn.messages))


def _accepted(m: SendMessage, *, queued: bool) -> Reply:
    return Reply(MessageAccepted(m.message_id, queued=queued))
