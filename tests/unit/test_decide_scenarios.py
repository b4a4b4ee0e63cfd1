"""Whole flows through ``decide``, message after message, as a chat actor would drive it.

``Flow`` keeps the state and the live history the way the store would (a truncation
soft-deletes). Each decision is one transaction when it writes anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TypeVar
from uuid import UUID

import pytest

from chatd.domain.chat_state import ChatPolicy, ChatState
from chatd.domain.chat_status import ChatStatus
from chatd.domain.conversation import (
    ContentPart,
    ReasoningPart,
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
    InvalidCommand,
    MessageAccepted,
    NewMessage,
    Notify,
    Publish,
    Refusal,
    Reply,
    RunTools,
    StartGeneration,
    TransitionNotAllowed,
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
    BusyBehavior,
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
    StepCompleted,
    SubmitToolResults,
    ToolResult,
    ToolsCompleted,
)
from chatd.domain.provider_failure import ErrorKind, ProviderFailure
from chatd.domain.retry_policy import RetryPolicy
from chatd.domain.stream_parts import Usage
from tests.unit.chat_states import CHAT, POLICY, failure

W = ChatStatus.WAITING
R = ChatStatus.RUNNING
I = ChatStatus.INTERRUPTING  # noqa: E741
A = ChatStatus.REQUIRES_ACTION
E = ChatStatus.ERROR

RefusalT = TypeVar("RefusalT", bound=Refusal)
USAGE = Usage(input_tokens=12, output_tokens=3)


@dataclass
class Flow:
    state: ChatState = field(default_factory=lambda: ChatState(CHAT))
    history: list[NewMessage] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    now: float = 1_000.0
    policy: ChatPolicy = POLICY
    ids: int = 0

    def do(self, message: MailboxMessage) -> Decision:
        decision = decide(self.state, message, now=self.now, policy=self.policy)
        if decision.truncate_after_seq is not None:
            self.history = [m for m in self.history if m.seq <= decision.truncate_after_seq]
        self.history += decision.messages
        self.state = decision.state
        self.decisions.append(decision)
        return decision

    def refused(self, message: MailboxMessage, kind: type[RefusalT]) -> RefusalT:
        before = self.state
        with pytest.raises(kind) as refusal:
            decide(before, message, now=self.now, policy=self.policy)
        assert self.state is before
        return refusal.value

    def new_id(self) -> UUID:
        self.ids += 1
        return UUID(int=self.ids)

    def send(
        self, text: str = "hello", *, behavior: BusyBehavior = "queue"
    ) -> tuple[UUID, Decision]:
        message_id = self.new_id()
        return message_id, self.do(SendMessage(message_id, text, behavior))

    def answer(self, text: str = "an answer") -> Decision:
        return self.do(StepCompleted(self.state.episode, (TextPart(text),), USAGE))

    def tools_done(self, *results: ToolResult) -> Decision:
        return self.do(ToolsCompleted(self.state.episode, results))

    @property
    def roles(self) -> list[str]:
        return [m.role for m in self.history]


def published(decision: Decision) -> list[ChatEvent]:
    return [e for effect in decision.effects if isinstance(effect, Publish) for e in effect.events]


def step(
    episode: Episode,
    *parts: ContentPart,
    builtin: tuple[ToolCallPart, ...] = (),
    dynamic: tuple[ToolCallPart, ...] = (),
) -> StepCompleted:
    return StepCompleted(episode, parts, USAGE, builtin_calls=builtin, dynamic_calls=dynamic)


# -- a plain turn --------------------------------------------------------------------------


def test_a_plain_turn_is_two_decisions_that_write() -> None:
    flow = Flow()
    message_id, sent = flow.send("What is 2 + 2?")
    assert sent.state.status is R
    assert [(m.role, m.seq, m.id) for m in sent.messages] == [("user", 1, message_id)]
    assert sent.effects == (
        StartGeneration(Episode(1, 1)),
        Reply(MessageAccepted(message_id, queued=False)),
    )

    answered = flow.answer("4")
    assert answered.state.status is W
    assert [(m.role, m.seq, m.parts, m.usage) for m in answered.messages] == [
        ("assistant", 2, (TextPart("4"),), USAGE)
    ]
    assert answered.effects == (Notify("turn_finished"),)

    # Two transactions per plain turn: the user message, then the answer.
    assert len(flow.decisions) == 2
    assert all(d.messages for d in flow.decisions)
    assert flow.roles == ["user", "assistant"]

    # And the next turn is the same again.
    flow.send("And 3 + 3?")
    flow.answer("6")
    assert len(flow.decisions) == 4
    assert flow.roles == ["user", "assistant", "user", "assistant"]
    assert [m.seq for m in flow.history] == [1, 2, 3, 4]
    assert flow.state.history_version == 4
    assert flow.state.generation_attempt == 2


# -- built-in tools ------------------------------------------------------------------------


def test_built_in_results_continue_the_turn_with_a_new_episode() -> None:
    flow = Flow()
    flow.send("What time is it, twice?")
    first = flow.state.episode
    for n in (1, 2):
        call = ToolCallPart(f"time_{n}", "current_time", "{}")
        before = flow.state
        committed = flow.do(step(flow.state.episode, TextPart("checking"), call, builtin=(call,)))
        # The step is committed before its tool runs, on the same attempt.
        assert committed.state.status is R
        assert [(m.role, m.seq) for m in committed.messages] == [
            ("assistant", before.last_message_seq + 1)
        ]
        pending = (PendingToolCall(call.id, call.name, call.arguments),)
        assert committed.state.running_tools == pending
        assert committed.state.episode == Episode(
            before.history_version + 1, before.generation_attempt
        )
        assert committed.effects == (
            RunTools(committed.state.episode, before.last_message_seq + 1, pending),
        )
        continued = flow.tools_done(ToolResult(call.id, '"12:00"'))
        assert continued.state.status is R
        assert continued.state.running_tools == ()
        assert [m.role for m in continued.messages] == ["tool"]
        assert continued.messages[0].parts == (ToolResultPart(call.id, '"12:00"'),)
        assert continued.state.episode == Episode(
            before.history_version + 2, before.generation_attempt + 1
        )
        assert continued.effects == (StartGeneration(continued.state.episode),)
    flow.answer("12:00 both times")
    assert flow.state.status is W
    assert flow.roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    # A late step of the first episode changes nothing.
    assert flow.do(step(first, TextPart("late"))) == Decision(flow.state)


# -- dynamic tools -------------------------------------------------------------------------

CALLS = (
    ToolCallPart("call_1", "lookup", '{"q": "weather"}'),
    ToolCallPart("call_2", "deploy", '{"env": "prod"}'),
)
PENDING = tuple(PendingToolCall(c.id, c.name, c.arguments) for c in CALLS)


def flow_requiring_action(*, with_builtin: bool = False) -> Flow:
    flow = Flow()
    flow.send("Look it up and deploy")
    builtin_call = ToolCallPart("call_0", "current_time", "{}")
    parts = (builtin_call, *CALLS) if with_builtin else CALLS
    builtin = (builtin_call,) if with_builtin else ()
    decision = flow.do(step(flow.state.episode, *parts, builtin=builtin, dynamic=CALLS))
    if with_builtin:
        assert decision.state.status is R
        decision = flow.tools_done(ToolResult("call_0", '"noon"'))
    assert decision.state.status is A
    return flow


def test_dynamic_calls_wait_for_the_client_and_valid_results_continue() -> None:
    flow = flow_requiring_action(with_builtin=True)
    decision = flow.decisions[-1]
    # The built-in result is committed after the assistant message; the dynamic calls wait.
    assert [m.role for m in flow.decisions[-2].messages] == ["assistant"]
    assert [m.role for m in decision.messages] == ["tool"]
    assert flow.state.pending_calls == PENDING
    deadline = flow.now + POLICY.action_timeout_s
    assert flow.state.action_deadline == deadline
    assert decision.effects == (
        ArmActionDeadline(flow.state.history_version, deadline),
        Publish((ActionRequired(PENDING, deadline),)),
        Notify("action_required"),
    )

    version = flow.state.history_version
    submitted = flow.do(
        SubmitToolResults((ToolResult("call_2", '{"deployed": true}'), ToolResult("call_1", "1")))
    )
    assert submitted.state.status is R
    assert submitted.state.pending_calls == ()
    assert submitted.state.action_deadline is None
    assert [m.role for m in submitted.messages] == ["tool"]
    assert submitted.messages[0].parts == (
        ToolResultPart("call_1", "1"),
        ToolResultPart("call_2", '{"deployed": true}'),
    )
    assert submitted.effects == (
        DisarmTimers(),
        StartGeneration(submitted.state.episode),
        Reply(Done()),
    )
    # The first valid submission wins; a second one is a 409.
    flow.refused(
        SubmitToolResults((ToolResult("call_1", "1"), ToolResult("call_2", "2"))),
        TransitionNotAllowed,
    )
    # The deadline of the answered calls is stale now.
    assert flow.do(ActionDeadlineFired(version)) == Decision(flow.state)
    flow.answer("Done: sunny, deployed.")
    assert flow.roles == ["user", "assistant", "tool", "tool", "assistant"]


def test_a_deadline_of_an_earlier_round_of_calls_is_stale() -> None:
    flow = flow_requiring_action()
    first_round = flow.state.history_version
    flow.do(SubmitToolResults((ToolResult("call_1", "1"), ToolResult("call_2", "2"))))
    again = (ToolCallPart("call_3", "deploy", "{}"),)
    flow.do(step(flow.state.episode, *again, dynamic=again))
    assert flow.state.status is A
    # The timer of the first round was disarmed, but one that already fired is in the mailbox.
    assert flow.do(ActionDeadlineFired(first_round)) == Decision(flow.state)
    assert flow.state.pending_calls == (PendingToolCall("call_3", "deploy", "{}"),)


@pytest.mark.parametrize(
    ("results", "field_name", "words"),
    [
        pytest.param((ToolResult("call_1", "1"),), "results", "missing", id="missing"),
        pytest.param(
            (ToolResult("call_1", "1"), ToolResult("call_2", "2"), ToolResult("call_9", "3")),
            "results",
            "call_9",
            id="extra",
        ),
        pytest.param(
            (ToolResult("call_1", "1"), ToolResult("call_1", "1"), ToolResult("call_2", "2")),
            "results",
            "duplicate",
            id="duplicate",
        ),
        pytest.param((), "results", "missing", id="empty"),
        pytest.param(
            (ToolResult("call_1", "1"), ToolResult("call_2", "{not json")),
            "results[1].output",
            "JSON",
            id="not-json",
        ),
        pytest.param(
            (ToolResult("call_1", ""), ToolResult("call_2", "2")),
            "results[0].output",
            "JSON",
            id="empty-output",
        ),
        pytest.param(
            (ToolResult("call_1", "NaN"), ToolResult("call_2", "2")),
            "results[0].output",
            "JSON",
            id="nan-is-not-json",
        ),
    ],
)
def test_invalid_tool_results_are_a_400_and_change_nothing(
    results: tuple[ToolResult, ...], field_name: str, words: str
) -> None:
    flow = flow_requiring_action()
    refusal = flow.refused(SubmitToolResults(results), InvalidCommand)
    assert refusal.field == field_name
    assert words in refusal.rule
    # Still waiting; a valid submission is still accepted.
    assert flow.state.status is A
    flow.do(SubmitToolResults((ToolResult("call_1", "1"), ToolResult("call_2", "2"))))
    assert flow.state.status is R


def test_tool_results_in_any_other_status_are_a_409() -> None:
    flow = Flow()
    results = SubmitToolResults((ToolResult("call_1", "1"),))
    assert flow.refused(results, TransitionNotAllowed).status == "waiting"
    flow.send()
    assert flow.refused(results, TransitionNotAllowed).status == "running"
    flow.do(Interrupt())
    assert flow.refused(results, TransitionNotAllowed).status == "interrupting"


def test_the_action_deadline_cancels_the_calls_and_the_chat_waits() -> None:
    flow = flow_requiring_action()
    flow.now += POLICY.action_timeout_s
    fired = flow.do(ActionDeadlineFired(flow.state.history_version))
    assert fired.state.status is W
    assert fired.state.pending_calls == ()
    assert fired.state.action_deadline is None
    (results,) = fired.messages
    assert results.role == "tool"
    assert [p.call_id for p in results.parts if isinstance(p, ToolResultPart)] == [
        "call_1",
        "call_2",
    ]
    for part in results.parts:
        assert isinstance(part, ToolResultPart)
        assert part.is_error
        assert json.loads(part.output)["error"] == "cancelled"
    assert fired.effects == ()
    # Late results are a 409; the chat takes a new message at once.
    flow.refused(SubmitToolResults((ToolResult("call_1", "1"),)), TransitionNotAllowed)
    flow.send("never mind")
    assert flow.roles == ["user", "assistant", "tool", "user"]


def test_a_message_sent_with_interrupt_closes_the_calls_before_it() -> None:
    flow = flow_requiring_action()
    message_id, sent = flow.send("stop, do something else", behavior="interrupt")
    assert [m.role for m in sent.messages] == ["tool", "user"]
    assert sent.messages[1].id == message_id
    assert sent.state.status is R
    assert sent.effects[0] == DisarmTimers()
    assert sent.effects[-1] == Reply(MessageAccepted(message_id, queued=False))
    # A message sent with ``queue`` instead waits for the calls to be answered.
    other = flow_requiring_action()
    queued_id, queued = other.send("after that", behavior="queue")
    assert queued.messages == ()
    assert queued.state.queue == (QueuedEntry(queued_id, "after that"),)
    other.do(SubmitToolResults((ToolResult("call_1", "1"), ToolResult("call_2", "2"))))
    other.answer()
    assert other.roles == ["user", "assistant", "tool", "assistant", "user"]
    assert other.history[-1].id == queued_id


# -- interrupt -----------------------------------------------------------------------------


def test_interrupt_mid_stream_keeps_the_text_and_drops_the_calls() -> None:
    flow = Flow()
    flow.send("Write a long story")
    episode = flow.state.episode
    interrupted = flow.do(Interrupt())
    assert interrupted.state.status is I
    assert interrupted.messages == ()
    assert interrupted.effects == (CancelGeneration(keep_partial=True), Reply(Done()))
    # A second interrupt while stopping changes nothing.
    assert flow.do(Interrupt()) == Decision(flow.state, effects=(Reply(Done()),))
    # The step that raced the interrupt is ignored; the stop is what counts.
    assert flow.do(step(episode, TextPart("Once upon a time, the end."))) == Decision(flow.state)

    stopped = flow.do(
        GenerationStopped(
            episode,
            (
                ReasoningPart("a story", signature="sig"),
                TextPart("Once upon a"),
                ToolCallPart("call_1", "lookup", '{"q": "dra'),
            ),
        )
    )
    assert stopped.state.status is W
    (partial,) = stopped.messages
    assert partial.role == "assistant"
    assert partial.parts == (ReasoningPart("a story", signature="sig"), TextPart("Once upon a"))
    assert stopped.effects == ()
    # Committed once: a repeated stop of the same episode is stale.
    assert flow.do(GenerationStopped(episode, (TextPart("Once upon a"),))) == Decision(flow.state)
    assert flow.roles == ["user", "assistant"]


def test_interrupt_with_nothing_streamed_writes_nothing() -> None:
    flow = Flow()
    flow.send()
    flow.do(Interrupt())
    stopped = flow.do(GenerationStopped(flow.state.episode, ()))
    assert stopped.state.status is W
    assert stopped.messages == ()
    assert flow.roles == ["user"]


# -- edit ----------------------------------------------------------------------------------


def test_edit_truncates_clears_the_queue_and_regenerates_without_the_partial() -> None:
    flow = Flow()
    first_id, _ = flow.send("first question")
    flow.answer("first answer")
    flow.send("second question")
    flow.answer("second answer")
    flow.send("third question")
    running = flow.state.episode
    flow.send("queued", behavior="queue")
    assert len(flow.state.queue) == 1
    version = flow.state.history_version

    edited_id = flow.new_id()
    edited = flow.do(EditMessage(first_id, edited_id, "first question, better"))
    new = edited.state.episode
    assert edited.truncate_after_seq == 0
    assert edited.state.queue == ()
    assert edited.state.status is R
    assert [(m.role, m.id, m.seq) for m in edited.messages] == [("user", edited_id, 6)]
    assert edited.effects == (
        CancelGeneration(keep_partial=False),
        DisarmTimers(),
        Publish((HistoryReset(version + 1, after_seq=0), PreviewReset(new))),
        StartGeneration(new),
        Reply(MessageAccepted(edited_id, queued=False)),
    )
    assert new.history_version == version + 2
    assert [u.id for u in edited.state.user_messages] == [edited_id]
    # Whatever the cancelled run still reports is stale.
    assert flow.do(GenerationStopped(running, (TextPart("partial"),))) == Decision(flow.state)
    assert flow.do(step(running, TextPart("third answer"))) == Decision(flow.state)
    flow.answer("a better first answer")
    assert [(m.role, m.seq) for m in flow.history] == [("user", 6), ("assistant", 7)]


def test_editing_a_middle_message_keeps_what_came_before() -> None:
    flow = Flow()
    flow.send("one")
    flow.answer()
    second_id, _ = flow.send("two")
    flow.answer()
    edited = flow.do(EditMessage(second_id, flow.new_id(), "two, again"))
    assert edited.truncate_after_seq == 2
    assert edited.effects[0] == DisarmTimers()  # nothing was running: nothing to cancel
    assert flow.roles == ["user", "assistant", "user"]
    assert [u.seq for u in flow.state.user_messages] == [1, 5]


# -- retries -------------------------------------------------------------------------------


def test_retryable_failures_back_off_1_2_4_and_each_timer_starts_a_new_attempt() -> None:
    flow = Flow()
    flow.send()
    for n, delay in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        episode = flow.state.episode
        failed = flow.do(GenerationFailed(episode, failure(ErrorKind.RATE_LIMIT)))
        at = flow.now + delay
        assert failed.state.status is R
        assert failed.state.retry_count == n
        assert failed.state.retry_at == at
        assert failed.effects == (
            Publish((RetryScheduled(n + 1, delay, failure(ErrorKind.RATE_LIMIT), at),)),
            ArmRetryTimer(episode, at),
        )
        assert failed.messages == ()
        flow.now = at
        fired = flow.do(RetryTimerFired(episode))
        assert fired.state.generation_attempt == episode.generation_attempt + 1
        assert fired.state.retry_at is None
        assert fired.effects == (
            Publish((PreviewReset(fired.state.episode),)),
            StartGeneration(fired.state.episode),
        )
        # The timer of that wait fires only once.
        assert flow.do(RetryTimerFired(episode)) == Decision(flow.state)
    answered = flow.answer()
    assert answered.state.status is W
    assert answered.state.retry_count == 0
    assert answered.state.last_error is None


def test_a_longer_retry_after_wins() -> None:
    flow = Flow()
    flow.send()
    slow_down = failure(ErrorKind.RATE_LIMIT, retry_after_s=20.0)
    failed = flow.do(GenerationFailed(flow.state.episode, slow_down))
    assert failed.effects[0] == Publish((RetryScheduled(2, 20.0, slow_down, flow.now + 20),))


def test_a_non_retryable_failure_ends_in_error_and_a_new_message_recovers() -> None:
    flow = Flow()
    flow.send()
    auth = failure(ErrorKind.AUTH, retryable=False)
    failed = flow.do(GenerationFailed(flow.state.episode, auth))
    assert failed.state.status is E
    assert failed.state.last_error == auth
    assert failed.state.retry_at is None
    assert failed.effects == (Publish((ErrorRaised(auth),)), Notify("failed"))
    # The user tries again.
    flow.send("again")
    assert flow.state.status is R
    assert flow.state.last_error is None
    flow.answer()
    assert flow.state.status is W


def test_the_last_attempt_failing_ends_in_error() -> None:
    flow = Flow(policy=ChatPolicy(retry=RetryPolicy(max_attempts=3)))
    flow.send()
    overloaded = failure(ErrorKind.OVERLOADED)
    for _ in range(2):
        flow.do(GenerationFailed(flow.state.episode, overloaded))
        assert flow.state.retry_at is not None
        flow.do(RetryTimerFired(flow.state.episode))
    last = flow.do(GenerationFailed(flow.state.episode, overloaded))
    assert last.state.status is E
    assert last.state.last_error == overloaded
    assert last.effects == (Publish((ErrorRaised(overloaded),)), Notify("failed"))
    assert flow.state.generation_attempt == 3


def test_a_send_with_interrupt_during_a_retry_wait_starts_at_once() -> None:
    """No stream to stop: the message is written and started right away, so it is not
    reported as queued (it never waits in the queue)."""
    flow = Flow()
    flow.send()
    flow.do(GenerationFailed(flow.state.episode, failure()))
    message_id, sent = flow.send("forget it", behavior="interrupt")
    assert sent.state.status is R
    assert sent.state.retry_at is None
    assert sent.state.queue == ()
    assert [(m.role, m.id) for m in sent.messages] == [("user", message_id)]
    assert sent.effects == (
        DisarmTimers(),
        StartGeneration(sent.state.episode),
        Reply(MessageAccepted(message_id, queued=False)),
    )


def test_an_interrupt_after_a_retry_leaves_no_error_behind() -> None:
    flow = Flow()
    flow.send()
    flow.do(GenerationFailed(flow.state.episode, failure()))
    retrying = flow.do(RetryTimerFired(flow.state.episode))
    assert retrying.state.last_error is not None  # shown while the retry runs
    flow.do(Interrupt())
    stopped = flow.do(GenerationStopped(flow.state.episode, (TextPart("half"),)))
    assert stopped.state.status is W
    assert stopped.state.last_error is None
    assert flow.state.retry_count == 0


# -- the queue -----------------------------------------------------------------------------


def test_queued_messages_are_managed_and_run_in_order() -> None:
    flow = Flow()
    flow.send("first")
    a, queued = flow.send("a")
    assert queued.effects == (Reply(MessageAccepted(a, queued=True)),)
    b, _ = flow.send("b")
    c, _ = flow.send("c")
    flow.do(PromoteQueued(c))
    flow.do(DeleteQueued(b))
    assert [q.id for q in flow.state.queue] == [c, a]
    flow.answer()
    assert flow.history[-1].id == c
    flow.answer()
    assert flow.history[-1].id == a
    flow.answer()
    assert flow.state.status is W
    assert flow.roles == ["user", "assistant"] * 3


# -- resuming ------------------------------------------------------------------------------


def test_resumed_while_running_starts_a_new_attempt() -> None:
    flow = Flow()
    flow.send()
    old = flow.state.episode
    resumed = flow.do(Resumed())
    new = resumed.state.episode
    assert new == Episode(old.history_version, old.generation_attempt + 1)
    assert resumed.effects == (Publish((PreviewReset(new),)), StartGeneration(new))
    assert flow.do(step(old, TextPart("from the dead process"))) == Decision(flow.state)
    flow.answer()
    assert flow.roles == ["user", "assistant"]


def test_resumed_during_a_retry_wait_rearms_the_same_timer() -> None:
    flow = Flow()
    flow.send()
    flow.do(GenerationFailed(flow.state.episode, failure()))
    retry_at = flow.state.retry_at
    assert retry_at is not None
    flow.now += 100  # the restart took longer than the wait: the timer fires at once
    resumed = flow.do(Resumed())
    assert resumed.state == flow.decisions[-2].state
    assert resumed.effects == (ArmRetryTimer(flow.state.episode, retry_at),)
    flow.do(RetryTimerFired(flow.state.episode))
    assert flow.state.generating


def test_resumed_while_interrupting_finishes_the_turn() -> None:
    flow = Flow()
    flow.send()
    queued_id, _ = flow.send("next")
    flow.do(Interrupt())
    resumed = flow.do(Resumed())
    # The partial output died with the process; the queued message is the next turn.
    assert [(m.role, m.id) for m in resumed.messages] == [("user", queued_id)]
    assert resumed.effects == (StartGeneration(flow.state.episode),)
    flow.answer()
    flow.do(Interrupt())
    assert flow.do(Resumed()).state.status is W


def test_resumed_while_requiring_action_rearms_the_deadline() -> None:
    flow = flow_requiring_action()
    resumed = flow.do(Resumed())
    deadline = flow.state.action_deadline
    assert deadline is not None
    assert resumed.effects == (ArmActionDeadline(flow.state.history_version, deadline),)
    assert resumed.state == flow.decisions[-2].state
    flow.do(ActionDeadlineFired(flow.state.history_version))
    assert flow.state.status is W


@pytest.mark.parametrize("status", [W, E])
def test_resumed_while_idle_does_nothing(status: ChatStatus) -> None:
    flow = Flow()
    flow.send()
    if status is E:
        flow.do(GenerationFailed(flow.state.episode, failure(ErrorKind.AUTH, retryable=False)))
    else:
        flow.answer()
    assert flow.state.status is status
    assert flow.do(Resumed()) == Decision(flow.state)


def test_a_send_after_an_error_runs_the_older_queued_messages_first() -> None:
    chat = UUID(int=7)
    policy = ChatPolicy()
    fatal = ProviderFailure(ErrorKind.AUTH, "p", 401, False, None, "no", "")
    first, queued, later = UUID(int=1), UUID(int=2), UUID(int=3)
    state = decide(ChatState(chat), SendMessage(first, "one"), now=0.0, policy=policy).state
    state = decide(state, SendMessage(queued, "two"), now=0.0, policy=policy).state
    state = decide(state, GenerationFailed(state.episode, fatal), now=0.0, policy=policy).state
    assert state.status is ChatStatus.ERROR
    assert [q.id for q in state.queue] == [queued]

    decision = decide(state, SendMessage(later, "three"), now=0.0, policy=policy)
    assert decision.state.status is ChatStatus.RUNNING
    assert [m.id for m in decision.messages] == [queued], "the older message goes first"
    assert [q.id for q in decision.state.queue] == [later]
    assert Reply(MessageAccepted(later, queued=True)) in decision.effects
    assert StartGeneration(decision.state.episode) in decision.effects
