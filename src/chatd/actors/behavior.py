"""The contract between the actor runtime and what runs inside an actor (the ChatActor).

The runtime owns the task, the mailbox, the nursery, restarts and passivation; a behavior only
loads its state, handles one message at a time and says when it may be stopped. Keeping that
seam narrow lets the runtime be tested with toy behaviors and the ChatActor without a runtime.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol
from uuid import UUID

import trio

from chatd.store.leases import Fence


class ActorContext(Protocol):
    """What the runtime gives a behavior for the life of one incarnation."""

    @property
    def chat_id(self) -> UUID: ...

    @property
    def fence(self) -> Fence:
        """The shard lease the incarnation runs under; every chat write carries it."""
        ...

    @property
    def nursery(self) -> trio.Nursery:
        """The incarnation's own nursery. Children (generation, timers) live here and die with
        the actor; a child that raises crashes the actor, which is then restarted."""
        ...

    @property
    def carried(self) -> dict[str, object]:
        """What the previous incarnation left for this one (and what this one leaves for the
        next): kept only across a restart after a database outage, never across a crash, a
        passivation or a move to another worker; empty otherwise. The ChatActor leaves here
        the model's outcome whose commit the outage cut, so that it is not generated again."""
        ...

    def tell_self(self, message: object) -> None:
        """Queue an internal event (from a child, a timer, or ``handle`` itself).

        Never blocks and is never dropped while the actor lives (unbounded); internal events are
        handled before queued commands. After the actor died it is silently ignored.
        """
        ...


class ActorBehavior(Protocol):
    async def start(self) -> None:
        """Load state from the database and resume in-flight work; messages wait meanwhile.

        An exception here is a crash (counted against the restart budget)."""
        ...

    async def handle(self, message: object) -> object:
        """Handle one message (never two at once) and return the asker's reply.

        A ``chatd.domain.effects.Refusal`` goes back to the asker as-is and the actor lives on;
        any other exception crashes the actor: the asker gets ``ActorDead`` and the actor is
        restarted from the database. For a ``tell`` or ``tell_self`` the reply is discarded.
        """
        ...

    def passivatable(self) -> bool:
        """True when the actor may be stopped now: idle, nothing in flight, no timers armed.

        Asked after the idle timeout with an empty mailbox; must not block."""
        ...

    def turn_in_progress(self) -> bool:
        """True while stopping the actor now would cut work it started that is not in the
        database yet (the ChatActor: a model answer streaming). A shard handover waits for it
        to end (for a bounded time) before stopping the actor; must not block."""
        ...


ActorFactory = Callable[[ActorContext], ActorBehavior]
"""Builds a fresh behavior for each incarnation (activation or restart); must not block."""

ParkHook = Callable[[UUID, Fence, BaseException], Awaitable[None]]
"""Called once when a chat crashed more often than its restart budget allows; the ChatActor's
hook records the chat as ``error`` with a classified error. Runs under the chat's fence."""
