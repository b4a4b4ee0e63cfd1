"""The actor runtime's typed refusals: what an ``ask`` or ``tell`` raises instead of a reply.

Each one means the message was not (or may not have been) carried out, and says whether a retry
makes sense; the edge maps them to HTTP (``MailboxFull`` 429/503, the others 503).
A behavior's own ``Refusal`` (``chatd.domain.effects``) is not one of these: it reaches the
asker unchanged.
"""

from __future__ import annotations

from uuid import UUID


class ActorError(Exception):
    """Base of the runtime's refusals; ``chat_id`` names the chat the message was for."""

    def __init__(self, chat_id: UUID, message: str) -> None:
        super().__init__(message)
        self.chat_id = chat_id


class ActorDead(ActorError):
    """The actor died (crash, stop, passivation race, parking) before or while handling the
    message. Nothing after its last commit happened; retrying reaches a fresh actor."""

    def __init__(self, chat_id: UUID, reason: str) -> None:
        super().__init__(chat_id, f"the actor of chat {chat_id} is gone: {reason}")
        self.reason = reason


class MailboxFull(ActorError):
    """The actor's bounded mailbox is full: refused at once, never waited for (back-pressure)."""

    def __init__(self, chat_id: UUID, capacity: int) -> None:
        super().__init__(chat_id, f"the mailbox of chat {chat_id} is full ({capacity} messages)")
        self.capacity = capacity


class NotOwner(ActorError):
    """This process does not hold the lease of the chat's shard right now (or is shutting down);
    the owner is elsewhere or about to be, so the caller may forward or retry."""

    def __init__(self, chat_id: UUID, shard: int) -> None:
        super().__init__(chat_id, f"this process does not own shard {shard} of chat {chat_id}")
        self.shard = shard


class AskTimeout(ActorError):
    """No reply within the ask's deadline. The message may still be carried out if the actor had
    already begun it; one still queued when the deadline passed is skipped."""

    def __init__(self, chat_id: UUID, timeout_s: float) -> None:
        super().__init__(chat_id, f"chat {chat_id} did not answer within {timeout_s:g} s")
        self.timeout_s = timeout_s
