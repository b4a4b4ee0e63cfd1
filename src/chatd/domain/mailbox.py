"""What a ChatActor's mailbox carries: commands from the edge and the actor's own events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from uuid import UUID

from chatd.domain.conversation import ContentPart, ToolCallPart
from chatd.domain.effects import Refusal
from chatd.domain.events import Episode
from chatd.domain.provider_failure import ProviderFailure
from chatd.domain.stream_parts import Usage

BusyBehavior = Literal["queue", "interrupt"]

# -- commands (the edge asks, the actor replies) -------------------------------------------


@dataclass(frozen=True, slots=True)
class SendMessage:
    message_id: UUID  # made by the edge; also the queued entry's id if the chat is busy
    text: str
    busy_behavior: BusyBehavior = "queue"


@dataclass(frozen=True, slots=True)
class EditMessage:
    message_id: UUID  # the user message to replace
    new_message_id: UUID
    text: str


@dataclass(frozen=True, slots=True)
class Interrupt:
    pass


@dataclass(frozen=True, slots=True)
class ToolResult:
    call_id: str
    output: str  # must be JSON text


@dataclass(frozen=True, slots=True)
class SubmitToolResults:
    results: tuple[ToolResult, ...]


@dataclass(frozen=True, slots=True)
class PromoteQueued:
    queued_id: UUID


@dataclass(frozen=True, slots=True)
class DeleteQueued:
    queued_id: UUID


@dataclass(frozen=True, slots=True)
class SetArchived:
    archived: bool


@dataclass(frozen=True, slots=True)
class Compact:
    """Summarize the history now (``POST /chats/{id}/compact``): the chat runs a summary call
    and commits a summary boundary; its next prompts start there."""


@dataclass(frozen=True, slots=True)
class DeleteChat:
    """Delete the chat, its history and its workspace (``DELETE /chats/{id}``); a run in
    progress is stopped first. Replied with ``Done`` once the deletion committed."""


Command = (
    SendMessage
    | EditMessage
    | Interrupt
    | SubmitToolResults
    | PromoteQueued
    | DeleteQueued
    | SetArchived
    | Compact
    | DeleteChat
)

# -- idempotency ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdempotencyMark:
    """The ``Idempotency-Key`` attempt a command runs for (``chatd.store.idempotency``): the
    commit that handles the command also marks the key committed, in the same transaction,
    and only while ``attempt`` still holds the key."""

    user_id: UUID
    key: str
    attempt: UUID


@dataclass(frozen=True, slots=True)
class Keyed:
    """A command sent under an ``Idempotency-Key``: the actor handles ``command`` as it would
    without the key, and adds the mark's write to the commit that records it (a command that
    changes nothing still commits the mark). ``command`` is a ``Command`` or the actor's
    request to create its chat."""

    command: object
    mark: IdempotencyMark


class AttemptSuperseded(Refusal):
    """The command's attempt no longer holds its key (another request took the key over): the
    commit is refused, nothing is written, and the request that holds the key does it."""


# -- internal events (the actor tells itself) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class StepCompleted:
    """A model step ended normally. ``builtin_calls`` are the calls chatd runs itself (after
    the step is committed); ``dynamic_calls`` are the calls the client must answer."""

    episode: Episode
    parts: tuple[ContentPart, ...]
    usage: Usage | None
    builtin_calls: tuple[ToolCallPart, ...] = ()
    dynamic_calls: tuple[ToolCallPart, ...] = ()


@dataclass(frozen=True, slots=True)
class ToolsCompleted:
    """The built-in calls of the committed step at ``episode`` have their results (in the
    order of ``ChatState.running_tools``)."""

    episode: Episode
    results: tuple[ToolResult, ...]


@dataclass(frozen=True, slots=True)
class Summarized:
    """The summary call of ``episode`` answered: ``text`` stands for every message up to
    ``through_seq``."""

    episode: Episode
    text: str
    through_seq: int
    usage: Usage | None


@dataclass(frozen=True, slots=True)
class GenerationFailed:
    episode: Episode
    failure: ProviderFailure


@dataclass(frozen=True, slots=True)
class GenerationStopped:
    """The generation was cancelled on request; ``parts`` is what had streamed by then (when
    built-in tools were running: the results of the calls that had finished)."""

    episode: Episode
    parts: tuple[ContentPart, ...]


@dataclass(frozen=True, slots=True)
class RetryTimerFired:
    episode: Episode


@dataclass(frozen=True, slots=True)
class ActionDeadlineFired:
    history_version: int


@dataclass(frozen=True, slots=True)
class Resumed:
    """The actor was (re)activated from the database: pick up whatever was in flight."""


InternalEvent = (
    StepCompleted
    | ToolsCompleted
    | Summarized
    | GenerationFailed
    | GenerationStopped
    | RetryTimerFired
    | ActionDeadlineFired
    | Resumed
)

MailboxMessage = Command | InternalEvent
