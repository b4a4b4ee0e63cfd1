"""The execution status of a chat (DESIGN.md section 2); the schema CHECKs the same values."""

from __future__ import annotations

from enum import StrEnum


class ChatStatus(StrEnum):
    WAITING = "waiting"
    """Idle; ready for a user message."""
    RUNNING = "running"
    """A generation is in progress, about to start, or waiting on a retry timer."""
    INTERRUPTING = "interrupting"
    """The user asked to stop; partial output is being committed."""
    REQUIRES_ACTION = "requires_action"
    """The model called dynamic tools; waiting for the client's tool results."""
    ERROR = "error"
    """Stopped on a non-retryable error or after the last retry; ``last_error`` says which."""


# Statuses with work left to do: a new owner of a shard resumes the chats in these.
RESUMABLE_STATUSES = frozenset(
    {ChatStatus.RUNNING, ChatStatus.INTERRUPTING, ChatStatus.REQUIRES_ACTION}
)
