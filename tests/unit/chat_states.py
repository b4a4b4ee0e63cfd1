"""Consistent chat states for the state-machine tests, with easy-to-tell-apart numbers.

Every state built by ``state_in`` shares one history: user messages at seqs 2 and 7, the last
message at seq ``L`` = 10, history version ``HV`` = 20 and generation attempt ``GA`` = 30. So
in an expected outcome, 11 is "the next seq", 21 "the next history version", 31 "the next
attempt", and a wrong one stands out. In the states with built-in tools running, the message
at seq 10 is the assistant message that made ``TOOLS``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, get_args
from uuid import UUID

from chatd.domain.chat_state import ChatPolicy, ChatState, UserMessageRef
from chatd.domain.chat_status import ChatStatus
from chatd.domain.conversation import TextPart, ToolCallPart
from chatd.domain.decide import decide
from chatd.domain.effects import Decision
from chatd.domain.events import Episode, PendingToolCall, QueuedEntry
from chatd.domain.mailbox import MailboxMessage, ToolResult
from chatd.domain.provider_failure import ErrorKind, ProviderFailure
from chatd.domain.retry_policy import RetryPolicy

CHAT = UUID(int=0xC0FFEE)
L = 10  # last_message_seq
HV = 20  # history_version
GA = 30  # generation_attempt
CURRENT = Episode(HV, GA)

U1 = UUID(int=0x101)  # user message at seq 2
U2 = UUID(int=0x102)  # user message at seq 7
NEW = UUID(int=0x201)  # the id the edge made for a new message
EDITED = UUID(int=0x202)  # the id the edge made for an edited message's replacement
UNKNOWN = UUID(int=0xDEAD)

QUEUE = (
    QueuedEntry(UUID(int=0x301), "queued one"),
    QueuedEntry(UUID(int=0x302), "queued two"),
    QueuedEntry(UUID(int=0x303), "queued three"),
)
Q1, Q2, Q3 = QUEUE

NOW = 1000.0
ACTION_TIMEOUT = 300.0
DEADLINE = 1300.0  # the armed action deadline of a requires_action state
RETRY_AT = 1004.0  # the armed retry of a running-with-retry state
RETRY_COUNT = 2  # failed attempts so far in the running-with-retry state
MAX_ATTEMPTS = 5
MAX_QUEUE = 3

POLICY = ChatPolicy(
    max_queue_length=MAX_QUEUE,
    action_timeout_s=ACTION_TIMEOUT,
    retry=RetryPolicy(base_delay_s=1.0, max_delay_s=60.0, max_attempts=MAX_ATTEMPTS),
)

CALLS = (
    PendingToolCall("call_a", "lookup", '{"q": 1}'),
    PendingToolCall("call_b", "deploy", "{}"),
)
CALL_PARTS = tuple(ToolCallPart(c.id, c.name, c.arguments) for c in CALLS)
VALID_RESULTS = (ToolResult("call_b", '{"ok": true}'), ToolResult("call_a", "[1, 2]"))

# The built-in calls running in the ``running_tools`` and ``interrupting_tools`` states.
TOOLS = (
    PendingToolCall("builtin_1", "current_time", "{}"),
    PendingToolCall("builtin_2", "random_number", "{}"),
)
TOOL_PARTS = tuple(ToolCallPart(c.id, c.name, c.arguments) for c in TOOLS)
TOOL_RESULTS = (ToolResult("builtin_1", '"12:00"'), ToolResult("builtin_2", "4"))


def failure(
    kind: ErrorKind = ErrorKind.OVERLOADED,
    *,
    retryable: bool = True,
    retry_after_s: float | None = None,
) -> ProviderFailure:
    return ProviderFailure(
        kind=kind,
        provider="openai",
        status_code=529 if retryable else 401,
        retryable=retryable,
        retry_after_s=retry_after_s,
        message=kind.value,
        detail="",
    )


RETRYABLE = failure()
FATAL = failure(ErrorKind.AUTH, retryable=False)

StatusCase = Literal[
    "waiting",
    "running",
    "running_retry",
    "running_tools",
    "compacting",
    "interrupting",
    "interrupting_tools",
    "requires_action",
    "error",
]
STATUS_CASES: tuple[StatusCase, ...] = get_args(StatusCase)


def state_in(
    case: StatusCase,
    *,
    archived: bool = False,
    queue: int = 0,
    retry_count: int | None = None,
) -> ChatState:
    """A consistent state of the chat in ``case``, with the first ``queue`` entries of QUEUE."""
    if case == "waiting" and queue:
        raise ValueError("a waiting chat has no queue")
    base = ChatState(
        CHAT,
        archived=archived,
        history_version=HV,
        generation_attempt=GA,
        last_message_seq=L,
        user_messages=(UserMessageRef(U1, 2), UserMessageRef(U2, 7)),
        queue=QUEUE[:queue],
    )
    match case:
        case "waiting":
            state = replace(base, status=ChatStatus.WAITING)
        case "running":
            state = replace(base, status=ChatStatus.RUNNING)
        case "running_retry":
            state = replace(
                base,
                status=ChatStatus.RUNNING,
                retry_at=RETRY_AT,
                retry_count=RETRY_COUNT,
                last_error=RETRYABLE,
            )
        case "running_tools":
            state = replace(
                base, status=ChatStatus.RUNNING, running_tools=TOOLS, tools_message_seq=L
            )
        case "compacting":
            state = replace(base, status=ChatStatus.RUNNING, compacting=True)
        case "interrupting":
            state = replace(base, status=ChatStatus.INTERRUPTING)
        case "interrupting_tools":
            state = replace(
                base, status=ChatStatus.INTERRUPTING, running_tools=TOOLS, tools_message_seq=L
            )
        case "requires_action":
            state = replace(
                base,
                status=ChatStatus.REQUIRES_ACTION,
                pending_calls=CALLS,
                action_deadline=DEADLINE,
            )
        case "error":
            state = replace(
                base, status=ChatStatus.ERROR, last_error=FATAL, retry_count=MAX_ATTEMPTS - 1
            )
    if retry_count is not None:
        state = replace(state, retry_count=retry_count)
    return state


def run(state: ChatState, message: MailboxMessage, *, now: float = NOW) -> Decision:
    return decide(state, message, now=now, policy=POLICY)


def text(value: str) -> tuple[TextPart]:
    return (TextPart(value),)
