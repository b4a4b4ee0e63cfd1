"""``decide`` for the agent loop: built-in tools run between two model steps, interrupting
them, resuming them, compaction (summaries) and deleting a chat.

The states come from ``chat_states`` (last seq L = 10, history version HV = 20, attempt
GA = 30), so in an expected decision 11 is the next seq, HV + 1 the next history version and
GA + 1 the next attempt. Every test states the whole decision it expects.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from chatd.domain.chat_state import ChatState, UserMessageRef, derived_message_id
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
    MessageAccepted,
    NewMessage,
    Notify,
    Publish,
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
    EditMessage,
    GenerationFailed,
    GenerationStopped,
    Interrupt,
    Resumed,
    SendMessage,
    StepCompleted,
    SubmitToolResults,
    Summarized,
    ToolResult,
    ToolsCompleted,
)
from chatd.domain.stream_parts import Usage
from tests.unit.chat_states import (
    CALL_PARTS,
    CALLS,
    CHAT,
    CURRENT,
    EDITED,
    FATAL,
    GA,
    HV,
    MAX_ATTEMPTS,
    NEW,
    NOW,
    Q1,
    Q2,
    RETRY_COUNT,
    RETRYABLE,
    STATUS_CASES,
    TOOL_PARTS,
    TOOL_RESULTS,
    TOOLS,
    U1,
    U2,
    VALID_RESULTS,
    L,
    StatusCase,
    run,
    state_in,
)

W = ChatStatus.WAITING
R = ChatStatus.RUNNING
I = ChatStatus.INTERRUPTING  # noqa: E741
A = ChatStatus.REQUIRES_ACTION
E = ChatStatus.ERROR

USAGE = Usage(input_tokens=300, output_tokens=40)
INTERRUPTED = json.dumps({"error": "cancelled", "reason": "the user interrupted"})
NO_RESULT = json.dumps({"error": "the tool returned no result"})
NEXT_STEP = Episode(HV + 1, GA + 1)  # the model step after one new message


def assistant(seq: int, version: int, parts: tuple[ContentPart, ...]) -> NewMessage:
    return NewMessage(derived_message_id(CHAT, seq), seq, "assistant", parts, version, USAGE)


def tool(seq: int, version: int, *parts: ToolResultPart) -> NewMessage:
    return NewMessage(derived_message_id(CHAT, seq), seq, "tool", parts, version)


def summary(seq: int, version: int, text: str, through_seq: int) -> NewMessage:
    return NewMessage(
        derived_message_id(CHAT, seq),
        seq,
        "summary",
        (SummaryPart(text, through_seq),),
        version,
        USAGE,
    )


def interrupted(call_id: str) -> ToolResultPart:
    return ToolResultPart(call_id, INTERRUPTED, is_error=True)


def moved(state: ChatState, *, seq: int = 11, **changes: Any) -> ChatState:
    """``state`` after writing messages up to ``seq`` (one history version each)."""
    written = seq - state.last_message_seq
    return replace(
        state,
        last_message_seq=seq,
        history_version=state.history_version + written,
        **changes,
    )


# -- a step with built-in calls ------------------------------------------------------------


def test_a_step_with_built_in_calls_is_committed_before_they_run() -> None:
    before = replace(state_in("running", queue=1), retry_count=RETRY_COUNT, last_error=RETRYABLE)
    parts: tuple[ContentPart, ...] = (TextPart("let me look"), *TOOL_PARTS)
    decision = run(before, StepCompleted(CURRENT, parts, USAGE, builtin_calls=TOOL_PARTS))
    after = moved(
        before,
        running_tools=TOOLS,
        tools_message_seq=11,
        retry_count=0,
        last_error=None,
    )
    # Same attempt: the tools are not a provider attempt; the queue waits for the turn's end.
    assert decision == Decision(
        after,
        messages=(assistant(11, HV + 1, parts),),
        effects=(RunTools(Episode(HV + 1, GA), 11, TOOLS),),
    )
    assert after.status is R
    assert after.generating


def test_the_client_s_calls_are_held_until_chatd_s_own_are_answered() -> None:
    before = state_in("running")
    # The model interleaves the two kinds of calls.
    parts = (CALL_PARTS[0], TOOL_PARTS[0], CALL_PARTS[1])
    step = StepCompleted(
        CURRENT, parts, USAGE, builtin_calls=TOOL_PARTS[:1], dynamic_calls=CALL_PARTS
    )
    decision = run(before, step)
    # No deadline, no action_required yet: the client is not asked before chatd is done.
    assert decision == Decision(
        moved(before, running_tools=TOOLS[:1], tools_message_seq=11, pending_calls=CALLS),
        messages=(assistant(11, HV + 1, parts),),
        effects=(RunTools(Episode(HV + 1, GA), 11, TOOLS[:1]),),
    )
    assert decision.state.action_deadline is None


def test_a_step_with_dynamic_calls_only_asks_the_client_at_once() -> None:
    before = state_in("running")
    decision = run(before, StepCompleted(CURRENT, CALL_PARTS, USAGE, dynamic_calls=CALL_PARTS))
    deadline = NOW + 300
    assert decision == Decision(
        moved(before, status=A, pending_calls=CALLS, action_deadline=deadline),
        messages=(assistant(11, HV + 1, CALL_PARTS),),
        effects=(
            ArmActionDeadline(HV + 1, deadline),
            Publish((ActionRequired(CALLS, deadline),)),
            Notify("action_required"),
        ),
    )


# -- the tools' results --------------------------------------------------------------------


def test_tool_results_are_committed_in_the_calls_order_and_the_model_continues() -> None:
    before = state_in("running_tools", queue=1)
    decision = run(before, ToolsCompleted(CURRENT, tuple(reversed(TOOL_RESULTS))))
    assert decision == Decision(
        moved(
            before,
            running_tools=(),
            tools_message_seq=0,
            generation_attempt=GA + 1,
        ),
        messages=(
            tool(
                11,
                HV + 1,
                ToolResultPart("builtin_1", '"12:00"'),
                ToolResultPart("builtin_2", "4"),
            ),
        ),
        effects=(StartGeneration(NEXT_STEP),),
    )


def test_once_chatd_s_calls_are_answered_the_client_s_are_asked_for() -> None:
    before = replace(state_in("running_tools"), pending_calls=CALLS)
    decision = run(before, ToolsCompleted(CURRENT, TOOL_RESULTS))
    deadline = NOW + 300
    assert decision == Decision(
        moved(
            before,
            status=A,
            running_tools=(),
            tools_message_seq=0,
            action_deadline=deadline,
        ),
        messages=(
            tool(
                11,
                HV + 1,
                ToolResultPart("builtin_1", '"12:00"'),
                ToolResultPart("builtin_2", "4"),
            ),
        ),
        effects=(
            ArmActionDeadline(HV + 1, deadline),
            Publish((ActionRequired(CALLS, deadline),)),
            Notify("action_required"),
        ),
    )
    # And their results continue the turn as ever: a second tool message.
    submitted = run(decision.state, SubmitToolResults(VALID_RESULTS))
    assert [(m.role, m.seq) for m in submitted.messages] == [("tool", 12)]
    assert submitted.effects == (
        DisarmTimers(),
        StartGeneration(Episode(HV + 2, GA + 1)),
        Reply(Done()),
    )


def test_a_call_the_tools_left_unanswered_gets_an_error_result() -> None:
    before = state_in("running_tools")
    # A result for a call that is not running is dropped.
    results = (TOOL_RESULTS[1], ToolResult("call_zz", "{}"))
    decision = run(before, ToolsCompleted(CURRENT, results))
    (message,) = decision.messages
    assert message == tool(
        11, HV + 1, ToolResultPart("builtin_1", NO_RESULT), ToolResultPart("builtin_2", "4")
    )
    assert json.loads(NO_RESULT) == {"error": "the tool returned no result"}
    assert decision.effects == (StartGeneration(NEXT_STEP),)


@pytest.mark.parametrize(
    ("case", "episode"),
    [
        pytest.param("running_tools", Episode(HV, GA - 1), id="older-attempt"),
        pytest.param("running_tools", Episode(HV - 1, GA), id="older-history"),
        pytest.param("running", CURRENT, id="no-tools-running"),
        pytest.param("interrupting_tools", CURRENT, id="being-stopped"),
        pytest.param("requires_action", CURRENT, id="requires-action"),
        pytest.param("waiting", CURRENT, id="waiting"),
    ],
)
def test_tool_results_nobody_waits_for_change_nothing(case: StatusCase, episode: Episode) -> None:
    before = state_in(case)
    assert run(before, ToolsCompleted(episode, TOOL_RESULTS)) == Decision(before)


# -- interrupting tools --------------------------------------------------------------------


def test_an_interrupt_while_tools_run_stops_them_keeping_what_finished() -> None:
    before = replace(state_in("running_tools"), pending_calls=CALLS)
    decision = run(before, Interrupt())
    assert decision == Decision(
        replace(before, status=I),
        effects=(CancelGeneration(keep_partial=True), Reply(Done())),
    )


def test_stopped_tools_close_every_call_of_the_step_and_the_chat_waits() -> None:
    before = replace(state_in("interrupting_tools"), pending_calls=CALLS)
    # The first call had finished (an error of its own is kept as it is).
    finished = ToolResultPart("builtin_1", '{"error": "no such file"}', is_error=True)
    decision = run(before, GenerationStopped(CURRENT, (finished,)))
    assert decision == Decision(
        moved(
            before,
            status=W,
            running_tools=(),
            tools_message_seq=0,
            pending_calls=(),
        ),
        messages=(
            tool(
                11,
                HV + 1,
                finished,
                interrupted("builtin_2"),
                interrupted("call_a"),
                interrupted("call_b"),
            ),
        ),
    )


def test_after_stopped_tools_the_next_queued_message_starts() -> None:
    before = state_in("interrupting_tools", queue=2)
    done = ToolResultPart("builtin_2", "4")
    decision = run(before, GenerationStopped(CURRENT, (TextPart("ignored"), done)))
    assert decision == Decision(
        moved(
            before,
            seq=12,
            status=R,
            running_tools=(),
            tools_message_seq=0,
            generation_attempt=GA + 1,
            queue=(Q2,),
            user_messages=(UserMessageRef(U1, 2), UserMessageRef(U2, 7), UserMessageRef(Q1.id, 12)),
        ),
        messages=(
            tool(11, HV + 1, interrupted("builtin_1"), done),
            NewMessage(Q1.id, 12, "user", (TextPart(Q1.text),), HV + 2),
        ),
        effects=(StartGeneration(Episode(HV + 2, GA + 1)),),
    )


def test_a_message_sent_with_interrupt_while_tools_run_goes_after_their_results() -> None:
    before = state_in("running_tools")
    sent = run(before, SendMessage(NEW, "stop that", "interrupt"))
    assert sent == Decision(
        replace(before, status=I, queue=(QueuedEntry(NEW, "stop that"),)),
        effects=(CancelGeneration(keep_partial=True), Reply(MessageAccepted(NEW, queued=True))),
    )
    stopped = run(sent.state, GenerationStopped(CURRENT, ()))
    assert [(m.role, m.seq, m.id) for m in stopped.messages] == [
        ("tool", 11, derived_message_id(CHAT, 11)),
        ("user", 12, NEW),
    ]
    assert stopped.messages[0].parts == (interrupted("builtin_1"), interrupted("builtin_2"))


# -- resuming ------------------------------------------------------------------------------


def test_resumed_while_tools_run_runs_them_again_for_the_same_episode() -> None:
    before = replace(state_in("running_tools"), pending_calls=CALLS)
    # No new attempt: the effect journal keeps a call with side effects from running twice.
    assert run(before, Resumed()) == Decision(before, effects=(RunTools(CURRENT, L, TOOLS),))


def test_resumed_while_tools_were_being_stopped_cancels_them_all() -> None:
    before = replace(state_in("interrupting_tools"), pending_calls=CALLS)
    assert run(before, Resumed()) == Decision(
        moved(
            before,
            status=W,
            running_tools=(),
            tools_message_seq=0,
            pending_calls=(),
        ),
        messages=(
            tool(
                11,
                HV + 1,
                *(interrupted(c) for c in ("builtin_1", "builtin_2", "call_a", "call_b")),
            ),
        ),
    )


# -- compaction ----------------------------------------------------------------------------


def test_compact_starts_a_summary_call_on_the_same_history() -> None:
    before = state_in("waiting")
    assert run(before, Compact()) == Decision(
        replace(before, status=R, compacting=True, generation_attempt=GA + 1),
        effects=(StartGeneration(Episode(HV, GA + 1)), Reply(Done())),
    )


def test_compact_after_an_error_clears_it_and_keeps_the_queue() -> None:
    before = state_in("error", queue=1)
    assert run(before, Compact()) == Decision(
        replace(
            before,
            status=R,
            compacting=True,
            generation_attempt=GA + 1,
            retry_count=0,
            last_error=None,
        ),
        effects=(StartGeneration(Episode(HV, GA + 1)), Reply(Done())),
    )


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("running", "running"),
        ("running_retry", "running"),
        ("running_tools", "running"),
        ("compacting", "running"),
        ("interrupting", "interrupting"),
        ("interrupting_tools", "interrupting"),
        ("requires_action", "requires_action"),
    ],
)
def test_compact_is_refused_while_the_chat_is_busy(case: StatusCase, status: str) -> None:
    with pytest.raises(
        TransitionNotAllowed, match=f"^compacting is not allowed while the chat is {status}$"
    ):
        run(state_in(case), Compact())


def test_compact_is_refused_in_an_archived_chat() -> None:
    with pytest.raises(TransitionNotAllowed, match=r"while the chat is archived$"):
        run(state_in("waiting", archived=True), Compact())


def test_compact_is_refused_with_nothing_written_since_the_last_summary() -> None:
    before = replace(state_in("waiting"), summary_seq=L, user_messages=())
    with pytest.raises(TransitionNotAllowed, match="without messages since its last summary"):
        run(before, Compact())
    # One message more, and there is something to compact.
    assert run(replace(before, summary_seq=L - 1), Compact()).state.compacting


def test_a_summary_asked_for_by_hand_ends_the_turn_quietly() -> None:
    before = state_in("compacting")
    decision = run(before, Summarized(CURRENT, "the story so far", L, USAGE))
    assert decision == Decision(
        moved(before, status=W, summary_seq=11, user_messages=(), compacting=False),
        messages=(summary(11, HV + 1, "the story so far", L),),
    )


def test_after_a_summary_asked_for_by_hand_the_next_queued_message_starts() -> None:
    before = state_in("compacting", queue=1)
    decision = run(before, Summarized(CURRENT, "the story so far", L, USAGE))
    assert decision == Decision(
        moved(
            before,
            seq=12,
            status=R,
            summary_seq=11,
            compacting=False,
            queue=(),
            generation_attempt=GA + 1,
            # Only the messages after the newest summary can be edited.
            user_messages=(UserMessageRef(Q1.id, 12),),
        ),
        messages=(
            summary(11, HV + 1, "the story so far", L),
            NewMessage(Q1.id, 12, "user", (TextPart(Q1.text),), HV + 2),
        ),
        effects=(StartGeneration(Episode(HV + 2, GA + 1)),),
    )


def test_a_summary_the_prompt_needed_goes_on_with_the_step() -> None:
    before = replace(state_in("running"), retry_count=RETRY_COUNT, last_error=RETRYABLE)
    decision = run(before, Summarized(CURRENT, "older turns", 6, USAGE))
    assert decision == Decision(
        moved(
            before,
            summary_seq=11,
            user_messages=(),
            generation_attempt=GA + 1,
            retry_count=0,
            last_error=None,
        ),
        messages=(summary(11, HV + 1, "older turns", 6),),
        effects=(StartGeneration(NEXT_STEP),),
    )


@pytest.mark.parametrize(
    ("case", "episode"),
    [
        pytest.param("compacting", Episode(HV, GA - 1), id="older-attempt"),
        pytest.param("compacting", Episode(HV - 1, GA), id="older-history"),
        pytest.param("running_retry", CURRENT, id="waiting-for-a-retry"),
        pytest.param("interrupting", CURRENT, id="being-stopped"),
        pytest.param("waiting", CURRENT, id="waiting"),
        pytest.param("error", CURRENT, id="error"),
    ],
)
def test_a_summary_nobody_waits_for_changes_nothing(case: StatusCase, episode: Episode) -> None:
    before = replace(state_in(case), compacting=case == "compacting")
    assert run(before, Summarized(episode, "late", L, None)) == Decision(before)


def test_messages_a_summary_covers_cannot_be_edited() -> None:
    summarized = replace(state_in("waiting"), summary_seq=8, user_messages=())
    with pytest.raises(
        UnknownTarget, match=f"^no such message after the chat's newest summary: {U2}$"
    ):
        run(summarized, EditMessage(U2, EDITED, "edited"))
    # Without a summary the refusal is the plain one.
    with pytest.raises(UnknownTarget, match=f"^no such message: {EDITED}$"):
        run(state_in("waiting"), EditMessage(EDITED, NEW, "edited"))


def test_a_message_after_the_summary_can_still_be_edited() -> None:
    before = replace(state_in("waiting"), summary_seq=5, user_messages=(UserMessageRef(U2, 7),))
    decision = run(before, EditMessage(U2, EDITED, "edited"))
    assert decision.truncate_after_seq == 6
    assert decision.state.summary_seq == 5
    assert decision.state.user_messages == (UserMessageRef(EDITED, 11),)
    assert decision.effects[1] == Publish(
        (HistoryReset(HV + 1, after_seq=6), PreviewReset(Episode(HV + 2, GA + 1)))
    )


# -- compacting is cleared whenever the run ends ---------------------------------------------


def test_giving_up_on_a_summary_call_clears_compacting() -> None:
    before = state_in("compacting")
    assert run(before, GenerationFailed(CURRENT, FATAL)) == Decision(
        replace(before, status=E, last_error=FATAL, compacting=False),
        effects=(Publish((ErrorRaised(FATAL),)), Notify("failed")),
    )
    exhausted = replace(before, retry_count=MAX_ATTEMPTS - 1)
    assert run(exhausted, GenerationFailed(CURRENT, RETRYABLE)) == Decision(
        replace(exhausted, status=E, last_error=RETRYABLE, compacting=False),
        effects=(Publish((ErrorRaised(RETRYABLE),)), Notify("failed")),
    )


def test_a_summary_call_is_retried_still_compacting() -> None:
    before = state_in("compacting")
    decision = run(before, GenerationFailed(CURRENT, RETRYABLE))
    assert decision == Decision(
        replace(before, retry_count=1, retry_at=NOW + 1, last_error=RETRYABLE),
        effects=(
            Publish((RetryScheduled(2, 1.0, RETRYABLE, NOW + 1),)),
            ArmRetryTimer(CURRENT, NOW + 1),
        ),
    )
    assert decision.state.compacting


def test_an_interrupt_clears_compacting() -> None:
    before = state_in("compacting")
    interrupting = run(before, Interrupt())
    assert interrupting == Decision(
        replace(before, status=I, compacting=False),
        effects=(CancelGeneration(keep_partial=True), Reply(Done())),
    )
    # A summary call streams nothing: the stop writes nothing and the chat waits.
    assert run(interrupting.state, GenerationStopped(CURRENT, ())) == Decision(
        replace(interrupting.state, status=W)
    )
    # Interrupted while it waits for a retry: the turn is over at once.
    waiting_retry = replace(before, retry_at=NOW + 1, retry_count=1, last_error=RETRYABLE)
    assert run(waiting_retry, Interrupt()) == Decision(
        replace(before, status=W, compacting=False),
        effects=(DisarmTimers(), Reply(Done())),
    )


def test_a_message_sent_with_interrupt_clears_compacting() -> None:
    before = state_in("compacting")
    decision = run(before, SendMessage(NEW, "hello", "interrupt"))
    assert decision == Decision(
        replace(before, status=I, compacting=False, queue=(QueuedEntry(NEW, "hello"),)),
        effects=(CancelGeneration(keep_partial=True), Reply(MessageAccepted(NEW, queued=True))),
    )


def test_an_edit_clears_compacting() -> None:
    before = state_in("compacting")
    decision = run(before, EditMessage(U2, EDITED, "edited"))
    assert decision.state.compacting is False
    assert decision.state.status is R
    assert decision.effects[0] == CancelGeneration(keep_partial=False)
    assert decision.truncate_after_seq == 6


def test_a_compaction_flow_end_to_end() -> None:
    """Compact, then nothing new to compact, then a turn, then compact again."""
    state = state_in("waiting")
    state = run(state, Compact()).state
    state = run(state, Summarized(state.episode, "first summary", L, None)).state
    assert (state.status, state.summary_seq, state.compacting) == (W, 11, False)
    with pytest.raises(TransitionNotAllowed):
        run(state, Compact())
    state = run(state, SendMessage(NEW, "and now?")).state
    assert state.user_messages == (UserMessageRef(NEW, 12),)
    state = run(state, StepCompleted(state.episode, (TextPart("this"),), None)).state
    compacting = run(state, Compact())
    assert compacting.state.compacting
    final = run(compacting.state, Summarized(compacting.state.episode, "second", 13, None))
    assert [(m.role, m.seq, m.parts) for m in final.messages] == [
        ("summary", 14, (SummaryPart("second", 13),))
    ]
    assert (final.state.summary_seq, final.state.user_messages) == (14, ())


# -- deleting a chat -----------------------------------------------------------------------

# Where something runs (a stream, tools, a summary call, or the stopping of one).
RUNS_SOMETHING = {"running", "running_tools", "compacting", "interrupting", "interrupting_tools"}


@pytest.mark.parametrize("archived", [False, True], ids=["live", "archived"])
@pytest.mark.parametrize("case", STATUS_CASES)
def test_a_chat_can_be_deleted_in_every_status(case: StatusCase, *, archived: bool) -> None:
    before = state_in(case, archived=archived)
    stop: tuple[Effect, ...] = ()
    if case in RUNS_SOMETHING:
        stop = (CancelGeneration(keep_partial=False),)
    assert run(before, DeleteChat()) == Decision(
        before, delete=True, effects=(*stop, DisarmTimers(), Reply(Done()))
    )


def test_deleting_writes_nothing_even_with_calls_unanswered() -> None:
    """The chat is gone with its history: no synthetic results are written for its calls."""
    for before in (
        state_in("requires_action", queue=2),
        replace(state_in("running_tools"), pending_calls=CALLS),
    ):
        decision = run(before, DeleteChat())
        assert decision.messages == ()
        assert decision.truncate_after_seq is None
        assert decision.state == before


# -- a whole agent turn --------------------------------------------------------------------


def test_an_agent_turn_with_both_kinds_of_tools() -> None:
    """user -> assistant (built-in + client calls) -> tool (built-in results) -> [client
    answers] -> tool -> assistant: every call answered once, in the order of the turn."""
    state = ChatState(CHAT)
    history: list[NewMessage] = []

    def do(message: Any) -> Decision:
        nonlocal state
        decision = run(state, message)
        history.extend(decision.messages)
        state = decision.state
        return decision

    do(SendMessage(NEW, "look around and deploy"))
    builtin = ToolCallPart("t1", "list_files", "{}")
    client = ToolCallPart("c1", "deploy", "{}")
    committed = do(StepCompleted(state.episode, (builtin, client), USAGE, (builtin,), (client,)))
    assert committed.effects == (
        RunTools(state.episode, 2, (PendingToolCall("t1", "list_files", "{}"),)),
    )
    asked = do(ToolsCompleted(state.episode, (ToolResult("t1", '["a.txt"]'),)))
    assert state.status is A
    assert asked.effects[1] == Publish(
        (ActionRequired((PendingToolCall("c1", "deploy", "{}"),), NOW + 300),)
    )
    do(SubmitToolResults((ToolResult("c1", '{"ok": true}'),)))
    do(StepCompleted(state.episode, (TextPart("deployed a.txt"),), USAGE))
    assert state.status is W
    assert [(m.role, m.seq) for m in history] == [
        ("user", 1),
        ("assistant", 2),
        ("tool", 3),
        ("tool", 4),
        ("assistant", 5),
    ]
    assert [p for m in history for p in m.parts if isinstance(p, ToolResultPart)] == [
        ToolResultPart("t1", '["a.txt"]'),
        ToolResultPart("c1", '{"ok": true}'),
    ]
    # Two provider attempts: the first step, then the one after the client's results.
    assert state.generation_attempt == 2
    # The deadline of the answered calls is stale.
    assert run(state, ActionDeadlineFired(3)) == Decision(state)
