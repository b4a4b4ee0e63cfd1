"""What ``decide`` asks the actor to do, and the refusals it can answer instead.

A decision is the new state, the rows to write with it (one transaction, the commit point),
then effects run in order once the commit succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from uuid import UUID

from chatd.domain.chat_state import ChatState
from chatd.domain.conversation import ContentPart, Role
from chatd.domain.events import ChatEvent, Episode, PendingToolCall
from chatd.domain.stream_parts import Usage

# -- writes --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewMessage:
    id: UUID
    seq: int
    role: Role
    parts: tuple[ContentPart, ...]
    history_version: int
    usage: Usage | None = None


# -- effects -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to the command being decided (sent after the commit)."""

    value: CommandResult


@dataclass(frozen=True, slots=True)
class Publish:
    events: tuple[ChatEvent, ...]


@dataclass(frozen=True, slots=True)
class StartGeneration:
    episode: Episode


@dataclass(frozen=True, slots=True)
class RunTools:
    """Run the built-in calls of the committed assistant message at ``message_seq`` (the
    side-effecting ones through the effect journal); the actor answers ``ToolsCompleted``."""

    episode: Episode
    message_seq: int
    calls: tuple[PendingToolCall, ...]


@dataclass(frozen=True, slots=True)
class CancelGeneration:
    """Stop the running generation; the actor answers with ``GenerationStopped``."""

    keep_partial: bool


@dataclass(frozen=True, slots=True)
class ArmRetryTimer:
    episode: Episode
    at: float  # wall-clock epoch seconds


@dataclass(frozen=True, slots=True)
class ArmActionDeadline:
    history_version: int
    at: float


@dataclass(frozen=True, slots=True)
class DisarmTimers:
    pass


NotificationKind = Literal["turn_finished", "failed", "action_required"]


@dataclass(frozen=True, slots=True)
class Notify:
    """An inbox notification for the chat's owner."""

    kind: NotificationKind


Effect = (
    Reply
    | Publish
    | StartGeneration
    | RunTools
    | CancelGeneration
    | ArmRetryTimer
    | ArmActionDeadline
    | DisarmTimers
    | Notify
)


@dataclass(frozen=True, slots=True)
class Decision:
    state: ChatState
    messages: tuple[NewMessage, ...] = ()
    # Soft-delete every message above this seq (an edit truncates the history).
    truncate_after_seq: int | None = None
    effects: tuple[Effect, ...] = ()
    # Delete the chat (its history, queue, journal; its workspace after the commit).
    delete: bool = False


# -- replies -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageAccepted:
    """``queued``: the chat was busy and the message waits in the queue under ``message_id``."""

    message_id: UUID
    queued: bool


@dataclass(frozen=True, slots=True)
class Done:
    pass


CommandResult = MessageAccepted | Done


# -- refusals ------------------------------------------------------------------------------


class Refusal(Exception):
    """The command is not carried out; nothing was written. The edge maps each kind to HTTP."""


@dataclass
class TransitionNotAllowed(Refusal):
    """409: the command makes no sense in the chat's current status."""

    status: str
    command: str

    def __str__(self) -> str:
        return f"{self.command} is not allowed while the chat is {self.status}"


@dataclass
class InvalidCommand(Refusal):
    """400: the command's content breaks a rule; ``field`` names what is wrong."""

    field: str
    rule: str

    def __str__(self) -> str:
        return f"{self.field}: {self.rule}"


@dataclass
class QueueFull(Refusal):
    """429: the chat's queue of pending messages is at its limit."""

    limit: int

    def __str__(self) -> str:
        return f"the chat already has {self.limit} queued messages"


@dataclass
class RunningChatsLimit(Refusal):
    """429: the owner already has ``limit`` chats running, and this command would start one
    more run (``max_running_chats_per_user``); a message queued behind a run is not one."""

    limit: int

    def __str__(self) -> str:
        return (
            f"you already have {self.limit} chats running (max_running_chats_per_user):"
            " wait for one to finish or interrupt one, then retry"
        )


@dataclass
class UnknownTarget(Refusal):
    """404: the message or queued message named does not exist (any more)."""

    what: str
    id: UUID = field(default_factory=lambda: UUID(int=0))

    def __str__(self) -> str:
        return f"no such {self.what}: {self.id}"
