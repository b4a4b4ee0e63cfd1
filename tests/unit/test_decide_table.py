"""The transition table of ``decide``: every status x every mailbox message, one row each.

A row names the state (one of the status cases of ``state_in``, archived or not, with how
many queued messages), the message, and the expected outcome:

- ``Refused(error)``: the command is refused with that refusal type;
- ``Ignored()``: a stale or inapplicable internal event; the decision is the same state with
  no writes and no effects;
- ``Goes(status, effects, writes, truncate, changes, delete)``: the exact effects in order, the
  exact messages written, the truncation, every state field that changes (all others must stay
  as they were), and whether the chat is deleted.

Row ids are generated from the row, and ``test_every_status_meets_every_message`` runs over the
full cartesian product, so a missing combination shows up as a failing test with its name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from itertools import product
from typing import Any, get_args

import pytest

from chatd.domain.chat_state import UserMessageRef, derived_message_id
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
    Refusal,
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
from chatd.domain.stream_parts import Usage
from tests.unit.chat_states import (
    CALL_PARTS,
    CALLS,
    CHAT,
    CURRENT,
    DEADLINE,
    EDITED,
    FATAL,
    GA,
    HV,
    MAX_ATTEMPTS,
    NEW,
    NOW,
    Q1,
    Q2,
    QUEUE,
    RETRY_AT,
    RETRY_COUNT,
    RETRYABLE,
    STATUS_CASES,
    TOOL_PARTS,
    TOOL_RESULTS,
    TOOLS,
    U1,
    U2,
    UNKNOWN,
    VALID_RESULTS,
    L,
    StatusCase,
    failure,
    run,
    state_in,
)

W = ChatStatus.WAITING
R = ChatStatus.RUNNING
I = ChatStatus.INTERRUPTING  # noqa: E741
A = ChatStatus.REQUIRES_ACTION
E = ChatStatus.ERROR

MESSAGE_KINDS: tuple[str, ...] = tuple(t.__name__ for t in get_args(MailboxMessage))

# -- expected outcomes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    error: type[Refusal]


@dataclass(frozen=True)
class Ignored:
    pass


@dataclass(frozen=True)
class Goes:
    status: ChatStatus | None  # None: unchanged
    effects: tuple[Effect, ...]
    writes: tuple[NewMessage, ...] = ()
    truncate: int | None = None
    changes: Mapping[str, Any] = field(default_factory=dict)
    delete: bool = False


Expected = Refused | Ignored | Goes


@dataclass(frozen=True)
class Row:
    case: StatusCase
    message: MailboxMessage
    expected: Expected
    variant: str = ""
    archived: bool = False
    queue: int = 0
    retry_count: int | None = None
    tweak: Mapping[str, Any] = field(default_factory=dict)  # more fields of the state

    @property
    def kind(self) -> str:
        return type(self.message).__name__

    @property
    def id(self) -> str:
        state = self.case + ("+archived" if self.archived else "")
        state += f"+queue{self.queue}" if self.queue else ""
        state += f"+retries{self.retry_count}" if self.retry_count is not None else ""
        state += "".join(f"+{name}" for name in self.tweak)
        kind = self.kind
        if isinstance(self.message, SendMessage):
            kind += f"({self.message.busy_behavior})"
        return f"{state}-{kind}" + (f"-{self.variant}" if self.variant else "")


# -- messages ------------------------------------------------------------------------------

USAGE = Usage(input_tokens=100, output_tokens=20)
BUILTIN_CALL, BUILTIN_CALL_2 = TOOL_PARTS
BUILTIN_RESULT, BUILTIN_RESULT_2 = TOOL_RESULTS
STALE_ATTEMPT = Episode(HV, GA - 1)
STALE_HISTORY = Episode(HV - 1, GA)


def send(behavior: str = "queue", text: str = "hello") -> SendMessage:
    assert behavior in ("queue", "interrupt")
    return SendMessage(NEW, text, "interrupt" if behavior == "interrupt" else "queue")


EDIT = EditMessage(U2, EDITED, "edited")
FINAL = StepCompleted(CURRENT, (TextPart("the answer"),), USAGE)
BUILTIN = StepCompleted(
    CURRENT,
    (TextPart("let me look"), BUILTIN_CALL, BUILTIN_CALL_2),
    USAGE,
    builtin_calls=(BUILTIN_CALL, BUILTIN_CALL_2),
)
DYNAMIC = StepCompleted(CURRENT, CALL_PARTS, USAGE, dynamic_calls=CALL_PARTS)
MIXED = StepCompleted(
    CURRENT,
    (BUILTIN_CALL, *CALL_PARTS),
    USAGE,
    builtin_calls=(BUILTIN_CALL,),
    dynamic_calls=CALL_PARTS,
)
# In another order than the calls: the results are written in the calls' order.
TOOLS_DONE = ToolsCompleted(CURRENT, (BUILTIN_RESULT_2, BUILTIN_RESULT))
TOOLS_HALF_DONE = ToolsCompleted(CURRENT, (BUILTIN_RESULT_2,))
SUMMARIZED = Summarized(CURRENT, "the story so far", L, USAGE)
FIRST_TOOL_DONE = GenerationStopped(CURRENT, (ToolResultPart("builtin_1", '"12:00"'),))
NO_TOOL_DONE = GenerationStopped(CURRENT, ())
COMPACT = Compact()
PARTIAL = (TextPart("partial"), ToolCallPart("call_x", "lookup", '{"q"'))
STOPPED = GenerationStopped(CURRENT, PARTIAL)
STOPPED_NO_TEXT = GenerationStopped(CURRENT, (TextPart(""), ToolCallPart("call_x", "f", "{}")))
FAILED = GenerationFailed(CURRENT, RETRYABLE)
FAILED_FATAL = GenerationFailed(CURRENT, FATAL)
FAILED_RETRY_AFTER = GenerationFailed(CURRENT, failure(retry_after_s=30.0))
SUBMIT = SubmitToolResults(VALID_RESULTS)
SUBMIT_MISSING = SubmitToolResults(VALID_RESULTS[:1])
DEADLINE_FIRED = ActionDeadlineFired(HV)
TIMER_FIRED = RetryTimerFired(CURRENT)
NEW_QUEUED = QueuedEntry(NEW, "hello")
USERS = (UserMessageRef(U1, 2), UserMessageRef(U2, 7))

# -- expected writes -----------------------------------------------------------------------

CANCELLED = "<synthetic cancelled result>"


def user(message_id: Any, seq: int, version: int, text: str) -> NewMessage:
    return NewMessage(message_id, seq, "user", (TextPart(text),), version)


def assistant(
    seq: int, version: int, parts: tuple[ContentPart, ...], usage: Usage | None = USAGE
) -> NewMessage:
    return NewMessage(derived_message_id(CHAT, seq), seq, "assistant", parts, version, usage)


def tool(seq: int, version: int, parts: tuple[ContentPart, ...]) -> NewMessage:
    return NewMessage(derived_message_id(CHAT, seq), seq, "tool", parts, version)


def cancelled(seq: int, version: int) -> NewMessage:
    """The synthetic results closing CALLS (their output is normalised, see ``normalised``)."""
    return tool(seq, version, tuple(ToolResultPart(c.id, CANCELLED, is_error=True) for c in CALLS))


def cancelled_part(call_id: str) -> ToolResultPart:
    return ToolResultPart(call_id, CANCELLED, is_error=True)


def summary(seq: int, version: int) -> NewMessage:
    return NewMessage(
        derived_message_id(CHAT, seq),
        seq,
        "summary",
        (SummaryPart("the story so far", L),),
        version,
        USAGE,
    )


NO_RESULT = json.dumps({"error": "the tool returned no result"})
TOOLS_ANSWERED = (ToolResultPart("builtin_1", '"12:00"'), ToolResultPart("builtin_2", "4"))
# The stopped tools: the first had finished, the second is cancelled.
TOOLS_STOPPED = (ToolResultPart("builtin_1", '"12:00"'), cancelled_part("builtin_2"))
TOOLS_CLOSED: dict[str, Any] = {"running_tools": (), "tools_message_seq": 0}


def normalised(messages: tuple[NewMessage, ...]) -> tuple[NewMessage, ...]:
    """Replace the free-text reason of synthetic cancelled results by ``CANCELLED``."""

    def part(p: ContentPart) -> ContentPart:
        if isinstance(p, ToolResultPart) and p.is_error:
            output = json.loads(p.output)
            assert output["error"] == "cancelled"
            assert isinstance(output["reason"], str)
            assert output["reason"]
            return replace(p, output=CANCELLED)
        return p

    return tuple(replace(m, parts=tuple(part(p) for p in m.parts)) for m in messages)


# -- expected outcomes shared by several statuses ------------------------------------------

DONE = (Reply(Done()),)
UNCHANGED_DONE = Goes(None, DONE)


def turn_started(
    message_id: Any,
    text: str,
    *,
    reply: Effect | None,
    queue: tuple[QueuedEntry, ...] = (),
    first: tuple[NewMessage, ...] = (),
    before: tuple[Effect, ...] = (),
    seq: int = 11,
    **changes: Any,
) -> Goes:
    """A user message written at ``seq`` (after ``first``) and a new generation started."""
    version = HV + len(first) + 1
    episode = Episode(version, GA + 1)
    return Goes(
        R,
        (*before, StartGeneration(episode), *((reply,) if reply else ())),
        writes=(*first, user(message_id, seq, version, text)),
        changes={
            "history_version": version,
            "generation_attempt": GA + 1,
            "last_message_seq": seq,
            "user_messages": (*USERS, UserMessageRef(message_id, seq)),
            "queue": queue,
            "retry_at": None,
            "retry_count": 0,
            "last_error": None,
            "pending_calls": (),
            "action_deadline": None,
            **changes,
        },
    )


def accepted(*, queued: bool) -> Reply:
    return Reply(MessageAccepted(NEW, queued=queued))


def sent_while_idle() -> Goes:
    return turn_started(NEW, "hello", reply=accepted(queued=False))


def queued(queue: int, *, at_head: bool = False) -> Goes:
    entries = (NEW_QUEUED, *QUEUE[:queue]) if at_head else (*QUEUE[:queue], NEW_QUEUED)
    return Goes(None, (accepted(queued=True),), changes={"queue": entries})


def edited(*, cancel: bool) -> Goes:
    """EDIT replaces U2 (seq 7): history after seq 6 is gone, a new turn starts at once."""
    stop: tuple[Effect, ...] = (CancelGeneration(keep_partial=False),) if cancel else ()
    episode = Episode(HV + 2, GA + 1)
    return Goes(
        R,
        (
            *stop,
            DisarmTimers(),
            Publish((HistoryReset(HV + 1, after_seq=6), PreviewReset(episode))),
            StartGeneration(episode),
            Reply(MessageAccepted(EDITED, queued=False)),
        ),
        writes=(user(EDITED, 11, HV + 2, "edited"),),
        truncate=6,
        changes={
            "history_version": HV + 2,
            "generation_attempt": GA + 1,
            "last_message_seq": 11,
            "user_messages": (UserMessageRef(U1, 2), UserMessageRef(EDITED, 11)),
            "queue": (),
            "pending_calls": (),
            "action_deadline": None,
            "retry_at": None,
            "retry_count": 0,
            "last_error": None,
            "running_tools": (),
            "tools_message_seq": 0,
            "compacting": False,
        },
    )


def promoted() -> Goes:
    return Goes(None, DONE, changes={"queue": (Q2, Q1)})


def deleted() -> Goes:
    return Goes(None, DONE, changes={"queue": (Q2,)})


def archived(value: bool) -> Goes:
    return Goes(None, DONE, changes={"archived": value})


def went_idle(
    effects: tuple[Effect, ...] = (), *, writes: tuple[NewMessage, ...] = (), **changes: Any
) -> Goes:
    return Goes(
        W,
        effects,
        writes=writes,
        changes={"retry_at": None, "retry_count": 0, "last_error": None, **changes},
    )


# The statuses in which something runs (a model step, tools, a summary, or its stopping).
RUNS = ("running", "running_tools", "compacting", "interrupting", "interrupting_tools")


def chat_deleted(*, cancel: bool) -> Goes:
    stop: tuple[Effect, ...] = (CancelGeneration(keep_partial=False),) if cancel else ()
    return Goes(None, (*stop, DisarmTimers(), *DONE), delete=True)


def common_commands(case: StatusCase) -> list[Row]:
    """Rows every status shares: refused sends, edits and compactions of an archived chat,
    archiving, deleting (in every status, archived or not)."""
    deleted_chat = chat_deleted(cancel=case in RUNS)
    return [
        Row(case, send(), Refused(TransitionNotAllowed), archived=True),
        Row(case, send("interrupt"), Refused(TransitionNotAllowed), archived=True),
        Row(case, EDIT, Refused(TransitionNotAllowed), archived=True),
        Row(case, COMPACT, Refused(TransitionNotAllowed), archived=True),
        Row(case, DeleteChat(), deleted_chat),
        Row(case, DeleteChat(), deleted_chat, archived=True),
        Row(case, EditMessage(UNKNOWN, EDITED, "x"), Refused(UnknownTarget), "unknown"),
        Row(case, send(text=" \n"), Refused(InvalidCommand), "blank"),
        Row(case, EditMessage(U1, EDITED, "  "), Refused(InvalidCommand), "blank"),
        Row(case, SetArchived(archived=True), archived(True), "archive"),
        Row(case, SetArchived(archived=False), archived(False), "unarchive", archived=True),
        Row(case, PromoteQueued(UNKNOWN), Refused(UnknownTarget), "unknown"),
        Row(case, DeleteQueued(UNKNOWN), Refused(UnknownTarget), "unknown"),
    ]


def ignored_events(case: StatusCase, *handled: str) -> list[Row]:
    """Internal events for the current episode that mean nothing in ``case`` (all but
    ``handled``), plus stale versions of every episode-carrying event."""
    current: list[MailboxMessage] = [
        FINAL,
        TOOLS_DONE,
        SUMMARIZED,
        FAILED,
        STOPPED,
        TIMER_FIRED,
        DEADLINE_FIRED,
    ]
    rows = [Row(case, m, Ignored(), "current") for m in current if type(m).__name__ not in handled]
    stale: list[tuple[str, MailboxMessage]] = [
        ("stale-attempt", StepCompleted(STALE_ATTEMPT, (TextPart("old"),), None)),
        ("stale-history", StepCompleted(STALE_HISTORY, (TextPart("old"),), None)),
        ("stale-attempt", ToolsCompleted(STALE_ATTEMPT, TOOL_RESULTS)),
        ("stale-history", ToolsCompleted(STALE_HISTORY, TOOL_RESULTS)),
        ("stale-attempt", Summarized(STALE_ATTEMPT, "old", L, None)),
        ("stale-history", Summarized(STALE_HISTORY, "old", L, None)),
        ("stale-attempt", GenerationFailed(STALE_ATTEMPT, RETRYABLE)),
        ("stale-history", GenerationFailed(STALE_HISTORY, FATAL)),
        ("stale-attempt", GenerationStopped(STALE_ATTEMPT, PARTIAL)),
        ("stale-history", GenerationStopped(STALE_HISTORY, PARTIAL)),
        ("stale-attempt", RetryTimerFired(STALE_ATTEMPT)),
        ("stale-history", RetryTimerFired(STALE_HISTORY)),
        ("stale", ActionDeadlineFired(HV - 1)),
    ]
    rows += [Row(case, m, Ignored(), variant) for variant, m in stale]
    return rows


# -- the table -----------------------------------------------------------------------------


def compaction_started(**changes: Any) -> Goes:
    """A summary call starts: a new attempt on the same history."""
    return Goes(
        R,
        (StartGeneration(Episode(HV, GA + 1)), *DONE),
        changes={"generation_attempt": GA + 1, "compacting": True, **changes},
    )


# Nothing was written since the newest summary (at seq L), so there is nothing to compact.
SUMMARIZED_LAST = {"summary_seq": L, "user_messages": ()}

WAITING: list[Row] = [
    Row("waiting", send(), sent_while_idle()),
    Row("waiting", send("interrupt"), sent_while_idle()),
    Row("waiting", EDIT, edited(cancel=False)),
    Row("waiting", Interrupt(), UNCHANGED_DONE),
    Row("waiting", SUBMIT, Refused(TransitionNotAllowed)),
    Row("waiting", Resumed(), Ignored()),
    Row("waiting", COMPACT, compaction_started()),
    Row("waiting", COMPACT, Refused(TransitionNotAllowed), "nothing-new", tweak=SUMMARIZED_LAST),
    # A summary before the newest message: the messages after it can be compacted.
    Row(
        "waiting",
        COMPACT,
        compaction_started(),
        "since-summary",
        tweak={"summary_seq": L - 1, "user_messages": ()},
    ),
    # Messages the newest summary covers cannot be edited.
    Row(
        "waiting",
        EDIT,
        Refused(UnknownTarget),
        "before-summary",
        tweak={"summary_seq": 8, "user_messages": ()},
    ),
    *common_commands("waiting"),
    *ignored_events("waiting"),
]

RUNNING: list[Row] = [
    Row("running", send(), queued(0)),
    Row("running", send(), queued(2), queue=2),
    Row("running", send(), Refused(QueueFull), queue=3),
    Row(
        "running",
        send("interrupt"),
        Goes(
            I,
            (CancelGeneration(keep_partial=True), accepted(queued=True)),
            changes={"queue": (NEW_QUEUED, Q1)},
        ),
        queue=1,
    ),
    Row("running", send("interrupt"), Refused(QueueFull), queue=3),
    Row("running", EDIT, edited(cancel=True), queue=2),
    Row("running", Interrupt(), Goes(I, (CancelGeneration(keep_partial=True), *DONE))),
    Row(
        "running",
        Interrupt(),
        Goes(I, (CancelGeneration(keep_partial=True), *DONE)),
        archived=True,
    ),
    Row("running", SUBMIT, Refused(TransitionNotAllowed)),
    Row("running", PromoteQueued(Q2.id), promoted(), queue=2),
    Row("running", DeleteQueued(Q1.id), deleted(), queue=2),
    Row(
        "running",
        FINAL,
        Goes(
            W,
            (Notify("turn_finished"),),
            writes=(assistant(11, HV + 1, (TextPart("the answer"),)),),
            changes={"history_version": HV + 1, "last_message_seq": 11},
        ),
        "final",
    ),
    Row(
        "running",
        FINAL,
        Goes(
            W,
            (Notify("turn_finished"),),
            writes=(assistant(11, HV + 1, (TextPart("the answer"),)),),
            changes={"history_version": HV + 1, "last_message_seq": 11},
        ),
        "final",
        archived=True,
    ),
    Row(
        "running",
        FINAL,
        turn_started(
            Q1.id,
            Q1.text,
            reply=None,
            first=(assistant(11, HV + 1, (TextPart("the answer"),)),),
            seq=12,
            queue=(Q2,),
        ),
        "final-next-queued",
        queue=2,
    ),
    # The step is committed first; its built-in calls run next, on the same attempt.
    Row(
        "running",
        BUILTIN,
        Goes(
            R,
            (RunTools(Episode(HV + 1, GA), 11, TOOLS),),
            writes=(
                assistant(11, HV + 1, (TextPart("let me look"), BUILTIN_CALL, BUILTIN_CALL_2)),
            ),
            changes={
                "history_version": HV + 1,
                "last_message_seq": 11,
                "running_tools": TOOLS,
                "tools_message_seq": 11,
            },
        ),
        "builtin",
        queue=1,
    ),
    Row(
        "running",
        DYNAMIC,
        Goes(
            A,
            (
                ArmActionDeadline(HV + 1, NOW + 300),
                Publish((ActionRequired(CALLS, NOW + 300),)),
                Notify("action_required"),
            ),
            writes=(assistant(11, HV + 1, CALL_PARTS),),
            changes={
                "history_version": HV + 1,
                "last_message_seq": 11,
                "pending_calls": CALLS,
                "action_deadline": NOW + 300,
            },
        ),
        "dynamic",
    ),
    # The client's calls are held until chatd's own are answered: no deadline yet.
    Row(
        "running",
        MIXED,
        Goes(
            R,
            (RunTools(Episode(HV + 1, GA), 11, TOOLS[:1]),),
            writes=(assistant(11, HV + 1, (BUILTIN_CALL, *CALL_PARTS)),),
            changes={
                "history_version": HV + 1,
                "last_message_seq": 11,
                "running_tools": TOOLS[:1],
                "tools_message_seq": 11,
                "pending_calls": CALLS,
            },
        ),
        "builtin-and-dynamic",
    ),
    # A summary the prompt needed: the step it made room for starts.
    Row(
        "running",
        SUMMARIZED,
        Goes(
            R,
            (StartGeneration(Episode(HV + 1, GA + 1)),),
            writes=(summary(11, HV + 1),),
            changes={
                "history_version": HV + 1,
                "generation_attempt": GA + 1,
                "last_message_seq": 11,
                "summary_seq": 11,
                "user_messages": (),
            },
        ),
        "auto",
        queue=1,
    ),
    Row(
        "running",
        SUMMARIZED,
        Goes(
            R,
            (StartGeneration(Episode(HV + 1, GA + 1)),),
            writes=(summary(11, HV + 1),),
            changes={
                "history_version": HV + 1,
                "generation_attempt": GA + 1,
                "last_message_seq": 11,
                "summary_seq": 11,
                "user_messages": (),
                "retry_count": 0,
                "last_error": None,
            },
        ),
        "auto-after-a-retry",
        tweak={"retry_count": RETRY_COUNT, "last_error": RETRYABLE},
    ),
    Row("running", COMPACT, Refused(TransitionNotAllowed)),
    Row(
        "running",
        FAILED,
        Goes(
            None,
            (
                Publish((RetryScheduled(2, 1.0, RETRYABLE, NOW + 1),)),
                ArmRetryTimer(CURRENT, NOW + 1),
            ),
            changes={"retry_count": 1, "retry_at": NOW + 1, "last_error": RETRYABLE},
        ),
        "retryable-first",
    ),
    Row(
        "running",
        FAILED,
        Goes(
            None,
            (
                Publish((RetryScheduled(4, 4.0, RETRYABLE, NOW + 4),)),
                ArmRetryTimer(CURRENT, NOW + 4),
            ),
            changes={"retry_count": 3, "retry_at": NOW + 4, "last_error": RETRYABLE},
        ),
        "retryable-third",
        retry_count=2,
    ),
    Row(
        "running",
        FAILED_RETRY_AFTER,
        Goes(
            None,
            (
                Publish((RetryScheduled(2, 30.0, FAILED_RETRY_AFTER.failure, NOW + 30),)),
                ArmRetryTimer(CURRENT, NOW + 30),
            ),
            changes={
                "retry_count": 1,
                "retry_at": NOW + 30,
                "last_error": FAILED_RETRY_AFTER.failure,
            },
        ),
        "retry-after",
    ),
    Row(
        "running",
        FAILED_FATAL,
        Goes(
            E,
            (Publish((ErrorRaised(FATAL),)), Notify("failed")),
            changes={"last_error": FATAL},
        ),
        "not-retryable",
        queue=1,
    ),
    Row(
        "running",
        FAILED,
        Goes(
            E,
            (Publish((ErrorRaised(RETRYABLE),)), Notify("failed")),
            changes={"last_error": RETRYABLE},
        ),
        "attempts-exhausted",
        retry_count=MAX_ATTEMPTS - 1,
    ),
    Row(
        "running",
        Resumed(),
        Goes(
            None,
            (Publish((PreviewReset(Episode(HV, GA + 1)),)), StartGeneration(Episode(HV, GA + 1))),
            changes={"generation_attempt": GA + 1},
        ),
    ),
    *common_commands("running"),
    *ignored_events("running", "StepCompleted", "Summarized", "GenerationFailed"),
]

RUNNING_RETRY: list[Row] = [
    Row("running_retry", send(), queued(1), queue=1),
    Row("running_retry", send(), Refused(QueueFull), queue=3),
    Row(
        "running_retry",
        send("interrupt"),
        # No stream to stop: the message starts a turn at once, ahead of the queue.
        turn_started(NEW, "hello", reply=accepted(queued=False), before=(DisarmTimers(),)),
    ),
    Row(
        "running_retry",
        send("interrupt"),
        turn_started(
            NEW, "hello", reply=accepted(queued=False), before=(DisarmTimers(),), queue=(Q1,)
        ),
        queue=1,
    ),
    Row("running_retry", EDIT, edited(cancel=False), queue=1),
    Row("running_retry", Interrupt(), went_idle((DisarmTimers(), *DONE))),
    Row(
        "running_retry",
        Interrupt(),
        turn_started(Q1.id, Q1.text, reply=Reply(Done()), before=(DisarmTimers(),)),
        "next-queued",
        queue=1,
    ),
    Row("running_retry", SUBMIT, Refused(TransitionNotAllowed)),
    Row("running_retry", PromoteQueued(Q2.id), promoted(), queue=2),
    Row("running_retry", DeleteQueued(Q1.id), deleted(), queue=2),
    Row(
        "running_retry",
        TIMER_FIRED,
        Goes(
            None,
            (Publish((PreviewReset(Episode(HV, GA + 1)),)), StartGeneration(Episode(HV, GA + 1))),
            # retry_count and last_error stay: the next failure counts on from here.
            changes={"retry_at": None, "generation_attempt": GA + 1},
        ),
        "current",
    ),
    Row("running_retry", Resumed(), Goes(None, (ArmRetryTimer(CURRENT, RETRY_AT),))),
    # A summary call waiting for its retry: the interrupt ends it.
    Row(
        "running_retry",
        Interrupt(),
        went_idle((DisarmTimers(), *DONE), compacting=False),
        "compacting",
        tweak={"compacting": True},
    ),
    Row(
        "running_retry",
        TIMER_FIRED,
        Goes(
            None,
            (Publish((PreviewReset(Episode(HV, GA + 1)),)), StartGeneration(Episode(HV, GA + 1))),
            changes={"retry_at": None, "generation_attempt": GA + 1},
        ),
        "compacting",
        tweak={"compacting": True},
    ),
    Row("running_retry", COMPACT, Refused(TransitionNotAllowed)),
    *common_commands("running_retry"),
    *ignored_events("running_retry", "RetryTimerFired"),
]

INTERRUPTING: list[Row] = [
    Row("interrupting", send(), queued(1), queue=1),
    Row("interrupting", send(), Refused(QueueFull), queue=3),
    # Already stopping: the message goes to the head, no second cancel.
    Row("interrupting", send("interrupt"), queued(1, at_head=True), queue=1),
    Row("interrupting", send("interrupt"), Refused(QueueFull), queue=3),
    Row("interrupting", EDIT, edited(cancel=True), queue=1),
    Row("interrupting", Interrupt(), UNCHANGED_DONE),
    Row("interrupting", SUBMIT, Refused(TransitionNotAllowed)),
    Row("interrupting", PromoteQueued(Q2.id), promoted(), queue=2),
    Row("interrupting", DeleteQueued(Q1.id), deleted(), queue=2),
    Row(
        "interrupting",
        STOPPED,
        Goes(
            W,
            (),
            # The text is kept; the unfinished tool call is dropped (it has no result).
            writes=(assistant(11, HV + 1, (TextPart("partial"),), usage=None),),
            changes={"history_version": HV + 1, "last_message_seq": 11},
        ),
        "text",
    ),
    Row("interrupting", STOPPED_NO_TEXT, Goes(W, ()), "no-text"),
    # Interrupted while a retry ran: the turn is over, so is the retry bookkeeping.
    Row(
        "interrupting",
        STOPPED_NO_TEXT,
        went_idle(),
        "no-text",
        tweak={"retry_count": RETRY_COUNT, "last_error": RETRYABLE},
    ),
    Row(
        "interrupting",
        STOPPED,
        turn_started(
            Q1.id,
            Q1.text,
            reply=None,
            first=(assistant(11, HV + 1, (TextPart("partial"),), usage=None),),
            seq=12,
        ),
        "next-queued",
        queue=1,
    ),
    # The process that was stopping the stream died: nothing partial survives.
    Row("interrupting", Resumed(), Goes(W, ())),
    Row(
        "interrupting",
        Resumed(),
        went_idle(),
        tweak={"retry_count": RETRY_COUNT, "last_error": RETRYABLE},
    ),
    Row("interrupting", Resumed(), turn_started(Q1.id, Q1.text, reply=None), queue=1),
    Row("interrupting", COMPACT, Refused(TransitionNotAllowed)),
    *common_commands("interrupting"),
    *ignored_events("interrupting", "GenerationStopped"),
]

REQUIRES_ACTION: list[Row] = [
    Row("requires_action", send(), queued(1), queue=1),
    Row("requires_action", send(), Refused(QueueFull), queue=3),
    Row(
        "requires_action",
        send("interrupt"),
        # The pending calls are closed first, then the message starts a turn.
        turn_started(
            NEW,
            "hello",
            reply=accepted(queued=False),
            before=(DisarmTimers(),),
            first=(cancelled(11, HV + 1),),
            seq=12,
            queue=(Q1,),
        ),
        queue=1,
    ),
    # The truncation removes the calls with the assistant message that made them.
    Row("requires_action", EDIT, edited(cancel=False), queue=1),
    Row(
        "requires_action",
        Interrupt(),
        Goes(
            W,
            (DisarmTimers(), *DONE),
            writes=(cancelled(11, HV + 1),),
            changes={
                "history_version": HV + 1,
                "last_message_seq": 11,
                "pending_calls": (),
                "action_deadline": None,
            },
        ),
    ),
    Row(
        "requires_action",
        Interrupt(),
        turn_started(
            Q1.id,
            Q1.text,
            reply=Reply(Done()),
            before=(DisarmTimers(),),
            first=(cancelled(11, HV + 1),),
            seq=12,
        ),
        "next-queued",
        queue=1,
    ),
    Row(
        "requires_action",
        SUBMIT,
        Goes(
            R,
            (DisarmTimers(), StartGeneration(Episode(HV + 1, GA + 1)), *DONE),
            # In the order of the calls, whatever the order of the submission.
            writes=(
                tool(
                    11,
                    HV + 1,
                    (ToolResultPart("call_a", "[1, 2]"), ToolResultPart("call_b", '{"ok": true}')),
                ),
            ),
            changes={
                "history_version": HV + 1,
                "generation_attempt": GA + 1,
                "last_message_seq": 11,
                "pending_calls": (),
                "action_deadline": None,
            },
        ),
        "valid",
        queue=1,
    ),
    Row("requires_action", SUBMIT_MISSING, Refused(InvalidCommand), "missing"),
    Row(
        "requires_action",
        SubmitToolResults((*VALID_RESULTS, ToolResult("call_z", "1"))),
        Refused(InvalidCommand),
        "extra",
    ),
    Row(
        "requires_action",
        SubmitToolResults((*VALID_RESULTS, VALID_RESULTS[0])),
        Refused(InvalidCommand),
        "duplicate",
    ),
    Row(
        "requires_action",
        SubmitToolResults((VALID_RESULTS[0], ToolResult("call_a", "{oops"))),
        Refused(InvalidCommand),
        "not-json",
    ),
    Row(
        "requires_action",
        SubmitToolResults((VALID_RESULTS[0], ToolResult("call_a", "NaN"))),
        Refused(InvalidCommand),
        "nan-is-not-json",
    ),
    Row("requires_action", PromoteQueued(Q2.id), promoted(), queue=2),
    Row("requires_action", DeleteQueued(Q1.id), deleted(), queue=2),
    Row(
        "requires_action",
        DEADLINE_FIRED,
        Goes(
            W,
            (),
            writes=(cancelled(11, HV + 1),),
            changes={
                "history_version": HV + 1,
                "last_message_seq": 11,
                "pending_calls": (),
                "action_deadline": None,
            },
        ),
        "current",
    ),
    Row(
        "requires_action",
        DEADLINE_FIRED,
        turn_started(Q1.id, Q1.text, reply=None, first=(cancelled(11, HV + 1),), seq=12),
        "current-next-queued",
        queue=1,
    ),
    Row("requires_action", Resumed(), Goes(None, (ArmActionDeadline(HV, DEADLINE),))),
    Row("requires_action", COMPACT, Refused(TransitionNotAllowed)),
    *common_commands("requires_action"),
    *ignored_events("requires_action", "ActionDeadlineFired"),
]

ERROR: list[Row] = [
    Row("error", send(), sent_while_idle()),
    Row("error", send("interrupt"), sent_while_idle()),
    Row("error", EDIT, edited(cancel=False)),
    Row("error", Interrupt(), UNCHANGED_DONE),
    Row("error", SUBMIT, Refused(TransitionNotAllowed)),
    # A queue left behind by the failed run can still be managed.
    Row("error", PromoteQueued(Q2.id), promoted(), queue=2),
    Row("error", DeleteQueued(Q1.id), deleted(), queue=2),
    Row("error", Resumed(), Ignored()),
    # The failed step's bookkeeping is gone with the new attempt; the queue waits.
    Row(
        "error",
        COMPACT,
        compaction_started(retry_count=0, last_error=None),
        queue=1,
    ),
    Row("error", COMPACT, Refused(TransitionNotAllowed), "nothing-new", tweak=SUMMARIZED_LAST),
    *common_commands("error"),
    *ignored_events("error"),
]

HELD = {"pending_calls": CALLS}  # the step's dynamic calls, held while chatd's own run

RUNNING_TOOLS: list[Row] = [
    Row("running_tools", send(), queued(1), queue=1),
    Row("running_tools", send(), Refused(QueueFull), queue=3),
    Row(
        "running_tools",
        send("interrupt"),
        Goes(
            I,
            (CancelGeneration(keep_partial=True), accepted(queued=True)),
            changes={"queue": (NEW_QUEUED, Q1)},
        ),
        queue=1,
    ),
    # The truncation removes the calls with the assistant message that made them.
    Row("running_tools", EDIT, edited(cancel=True), queue=1),
    Row("running_tools", EDIT, edited(cancel=True), "held", tweak=HELD),
    Row("running_tools", Interrupt(), Goes(I, (CancelGeneration(keep_partial=True), *DONE))),
    Row(
        "running_tools",
        Interrupt(),
        Goes(I, (CancelGeneration(keep_partial=True), *DONE)),
        "held",
        tweak=HELD,
    ),
    Row("running_tools", SUBMIT, Refused(TransitionNotAllowed)),
    # The client's calls are not asked for yet.
    Row("running_tools", SUBMIT, Refused(TransitionNotAllowed), "held", tweak=HELD),
    Row("running_tools", PromoteQueued(Q2.id), promoted(), queue=2),
    Row("running_tools", DeleteQueued(Q1.id), deleted(), queue=2),
    # The model continues with its tools' results (in the calls' order), on a new attempt.
    Row(
        "running_tools",
        TOOLS_DONE,
        Goes(
            R,
            (StartGeneration(Episode(HV + 1, GA + 1)),),
            writes=(tool(11, HV + 1, TOOLS_ANSWERED),),
            changes={
                "history_version": HV + 1,
                "generation_attempt": GA + 1,
                "last_message_seq": 11,
                **TOOLS_CLOSED,
            },
        ),
        "all",
        queue=1,
    ),
    Row(
        "running_tools",
        TOOLS_HALF_DONE,
        Goes(
            R,
            (StartGeneration(Episode(HV + 1, GA + 1)),),
            writes=(tool(11, HV + 1, (ToolResultPart("builtin_1", NO_RESULT), TOOLS_ANSWERED[1])),),
            changes={
                "history_version": HV + 1,
                "generation_attempt": GA + 1,
                "last_message_seq": 11,
                **TOOLS_CLOSED,
            },
        ),
        "missing",
    ),
    # Then the client's calls are asked for.
    Row(
        "running_tools",
        TOOLS_DONE,
        Goes(
            A,
            (
                ArmActionDeadline(HV + 1, NOW + 300),
                Publish((ActionRequired(CALLS, NOW + 300),)),
                Notify("action_required"),
            ),
            writes=(tool(11, HV + 1, TOOLS_ANSWERED),),
            changes={
                "history_version": HV + 1,
                "last_message_seq": 11,
                "action_deadline": NOW + 300,
                **TOOLS_CLOSED,
            },
        ),
        "held",
        tweak=HELD,
    ),
    # The same calls run again, for the same episode (the journal keeps side effects once).
    Row("running_tools", Resumed(), Goes(None, (RunTools(CURRENT, L, TOOLS),))),
    Row("running_tools", Resumed(), Goes(None, (RunTools(CURRENT, L, TOOLS),)), tweak=HELD),
    Row("running_tools", DEADLINE_FIRED, Ignored(), "held", tweak=HELD),
    Row("running_tools", COMPACT, Refused(TransitionNotAllowed)),
    *common_commands("running_tools"),
    *ignored_events(
        "running_tools",
        "ToolsCompleted",
    ),
]

INTERRUPTING_TOOLS: list[Row] = [
    Row("interrupting_tools", send(), queued(1), queue=1),
    Row("interrupting_tools", send(), Refused(QueueFull), queue=3),
    Row("interrupting_tools", send("interrupt"), queued(1, at_head=True), queue=1),
    Row("interrupting_tools", EDIT, edited(cancel=True), queue=1),
    Row("interrupting_tools", Interrupt(), UNCHANGED_DONE),
    Row("interrupting_tools", SUBMIT, Refused(TransitionNotAllowed)),
    Row("interrupting_tools", PromoteQueued(Q2.id), promoted(), queue=2),
    Row("interrupting_tools", DeleteQueued(Q1.id), deleted(), queue=2),
    # Every call of the step gets one result: the finished ones theirs, the others cancelled.
    Row(
        "interrupting_tools",
        FIRST_TOOL_DONE,
        went_idle(
            writes=(tool(11, HV + 1, TOOLS_STOPPED),),
            history_version=HV + 1,
            last_message_seq=11,
            **TOOLS_CLOSED,
        ),
        "one-finished",
    ),
    Row(
        "interrupting_tools",
        FIRST_TOOL_DONE,
        went_idle(
            writes=(tool(11, HV + 1, (*TOOLS_STOPPED, *(cancelled_part(c.id) for c in CALLS))),),
            history_version=HV + 1,
            last_message_seq=11,
            pending_calls=(),
            **TOOLS_CLOSED,
        ),
        "one-finished-held",
        tweak=HELD,
    ),
    Row(
        "interrupting_tools",
        NO_TOOL_DONE,
        went_idle(
            writes=(tool(11, HV + 1, tuple(cancelled_part(c.id) for c in TOOLS)),),
            history_version=HV + 1,
            last_message_seq=11,
            **TOOLS_CLOSED,
        ),
        "none-finished",
    ),
    # Streamed text has no place here: only tool results are kept.
    Row(
        "interrupting_tools",
        STOPPED,
        went_idle(
            writes=(tool(11, HV + 1, tuple(cancelled_part(c.id) for c in TOOLS)),),
            history_version=HV + 1,
            last_message_seq=11,
            **TOOLS_CLOSED,
        ),
        "text",
    ),
    Row(
        "interrupting_tools",
        FIRST_TOOL_DONE,
        turn_started(
            Q1.id,
            Q1.text,
            reply=None,
            first=(tool(11, HV + 1, TOOLS_STOPPED),),
            seq=12,
            queue=(Q2,),
            **TOOLS_CLOSED,
        ),
        "next-queued",
        queue=2,
    ),
    # The process that ran the tools died: what they did is unknown, all are cancelled.
    Row(
        "interrupting_tools",
        Resumed(),
        went_idle(
            writes=(
                tool(
                    11,
                    HV + 1,
                    tuple(cancelled_part(c.id) for c in (*TOOLS, *CALLS)),
                ),
            ),
            history_version=HV + 1,
            last_message_seq=11,
            pending_calls=(),
            **TOOLS_CLOSED,
        ),
        tweak=HELD,
    ),
    Row(
        "interrupting_tools",
        Resumed(),
        turn_started(
            Q1.id,
            Q1.text,
            reply=None,
            first=(tool(11, HV + 1, tuple(cancelled_part(c.id) for c in TOOLS)),),
            seq=12,
            **TOOLS_CLOSED,
        ),
        queue=1,
    ),
    Row("interrupting_tools", COMPACT, Refused(TransitionNotAllowed)),
    *common_commands("interrupting_tools"),
    *ignored_events("interrupting_tools", "GenerationStopped"),
]


COMPACTING: list[Row] = [
    Row("compacting", send(), queued(1), queue=1),
    Row("compacting", send(), Refused(QueueFull), queue=3),
    Row(
        "compacting",
        send("interrupt"),
        Goes(
            I,
            (CancelGeneration(keep_partial=True), accepted(queued=True)),
            changes={"queue": (NEW_QUEUED, Q1), "compacting": False},
        ),
        queue=1,
    ),
    Row("compacting", EDIT, edited(cancel=True), queue=1),
    Row(
        "compacting",
        Interrupt(),
        Goes(I, (CancelGeneration(keep_partial=True), *DONE), changes={"compacting": False}),
    ),
    Row("compacting", SUBMIT, Refused(TransitionNotAllowed)),
    Row("compacting", PromoteQueued(Q2.id), promoted(), queue=2),
    Row("compacting", DeleteQueued(Q1.id), deleted(), queue=2),
    # Asked for by hand: the summary is all there is to do, nobody is notified.
    Row(
        "compacting",
        SUMMARIZED,
        went_idle(
            writes=(summary(11, HV + 1),),
            history_version=HV + 1,
            last_message_seq=11,
            summary_seq=11,
            user_messages=(),
            compacting=False,
        ),
    ),
    Row(
        "compacting",
        SUMMARIZED,
        turn_started(
            Q1.id,
            Q1.text,
            reply=None,
            first=(summary(11, HV + 1),),
            seq=12,
            queue=(Q2,),
            summary_seq=11,
            user_messages=(UserMessageRef(Q1.id, 12),),
            compacting=False,
        ),
        "next-queued",
        queue=2,
    ),
    # A summary call never answers with a model step (the actor sends none while compacting;
    # the plain answer's row is with the ignored events below).
    Row(
        "compacting",
        DYNAMIC,
        Ignored(),
        "dynamic",
    ),
    Row(
        "compacting",
        BUILTIN,
        Ignored(),
        "builtin",
    ),
    # A failed summary call is retried like a step, still compacting.
    Row(
        "compacting",
        FAILED,
        Goes(
            None,
            (
                Publish((RetryScheduled(2, 1.0, RETRYABLE, NOW + 1),)),
                ArmRetryTimer(CURRENT, NOW + 1),
            ),
            changes={"retry_count": 1, "retry_at": NOW + 1, "last_error": RETRYABLE},
        ),
        "retryable",
    ),
    Row(
        "compacting",
        FAILED_FATAL,
        Goes(
            E,
            (Publish((ErrorRaised(FATAL),)), Notify("failed")),
            changes={"last_error": FATAL, "compacting": False},
        ),
        "not-retryable",
    ),
    Row(
        "compacting",
        Resumed(),
        Goes(
            None,
            (Publish((PreviewReset(Episode(HV, GA + 1)),)), StartGeneration(Episode(HV, GA + 1))),
            changes={"generation_attempt": GA + 1},
        ),
    ),
    Row("compacting", COMPACT, Refused(TransitionNotAllowed)),
    *common_commands("compacting"),
    *ignored_events(
        "compacting",
        "Summarized",
        "GenerationFailed",
    ),
]

ROWS: list[Row] = [
    *WAITING,
    *RUNNING,
    *RUNNING_RETRY,
    *RUNNING_TOOLS,
    *COMPACTING,
    *INTERRUPTING,
    *INTERRUPTING_TOOLS,
    *REQUIRES_ACTION,
    *ERROR,
]

# -- the tests -----------------------------------------------------------------------------


def _param(row: Row) -> Any:
    return pytest.param(row, id=row.id)


@pytest.mark.parametrize("row", [_param(row) for row in ROWS])
def test_transition(row: Row) -> None:
    before = state_in(row.case, archived=row.archived, queue=row.queue, retry_count=row.retry_count)
    before = replace(before, **row.tweak)
    match row.expected:
        case Refused(error=error):
            with pytest.raises(error):
                run(before, row.message)
        case Ignored():
            assert run(before, row.message) == Decision(before)
        case Goes() as goes:
            decision = run(before, row.message)
            status = before.status if goes.status is None else goes.status
            assert decision.state == replace(before, status=status, **goes.changes)
            assert normalised(decision.messages) == goes.writes
            assert decision.truncate_after_seq == goes.truncate
            assert decision.effects == goes.effects
            assert decision.delete == goes.delete


@pytest.mark.parametrize(
    ("case", "kind"),
    list(product(STATUS_CASES, MESSAGE_KINDS)),
    ids=[f"{case}-{kind}" for case, kind in product(STATUS_CASES, MESSAGE_KINDS)],
)
def test_every_status_meets_every_message(case: StatusCase, kind: str) -> None:
    assert any(row.case == case and row.kind == kind for row in ROWS)


def test_the_table_is_the_full_cartesian_product() -> None:
    covered = {(row.case, row.kind) for row in ROWS}
    assert covered == set(product(STATUS_CASES, MESSAGE_KINDS))
    assert len(MESSAGE_KINDS) == 17
    assert set(STATUS_CASES) >= {s.value for s in ChatStatus}


@pytest.mark.parametrize("case", STATUS_CASES)
def test_every_status_has_its_archived_and_stale_rows(case: StatusCase) -> None:
    variants = {(row.kind, row.variant, row.archived) for row in ROWS if row.case == case}
    for kind in ("SendMessage", "EditMessage", "Compact", "DeleteChat"):
        assert any(k == kind and archived for k, _, archived in variants), kind
    for kind in (
        "StepCompleted",
        "ToolsCompleted",
        "Summarized",
        "GenerationFailed",
        "GenerationStopped",
        "RetryTimerFired",
    ):
        assert (kind, "stale-attempt", False) in variants
        assert (kind, "stale-history", False) in variants
    assert ("ActionDeadlineFired", "stale", False) in variants


def test_row_ids_are_unique() -> None:
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids))


def test_the_states_are_consistent() -> None:
    """The fixtures themselves: the numbers the rows rely on."""
    assert state_in("running_retry").retry_at == RETRY_AT
    assert state_in("running_retry").retry_count == RETRY_COUNT
    assert state_in("requires_action").action_deadline == DEADLINE
    assert state_in("error").last_error == FATAL
    assert state_in("running", queue=2).queue == QUEUE[:2]
    assert NOW + 300 == DEADLINE
    for case in ("running_tools", "interrupting_tools"):
        tooling = state_in(case)
        assert (tooling.running_tools, tooling.tools_message_seq) == (TOOLS, L)
        assert tuple(BUILTIN.builtin_calls) == TOOL_PARTS
    assert state_in("running_tools").generating
    assert state_in("compacting").compacting
    assert state_in("compacting").generating
