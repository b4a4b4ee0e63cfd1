"""The Router: the edge's only way to reach a chat's actor.

Today every chat is served by this process's Supervisor (which answers ``NotOwner`` for shards it
does not hold). The ``PeerLink`` seam is where forwarding to the owning peer process plugs in
later, without the edge changing.
"""

from __future__ import annotations

from typing import Protocol
from uuid import UUID

from chatd.actors.supervisor import Supervisor


class PeerLink(Protocol):
    """Delivers to the process that owns a chat's shard (a later issue implements it)."""

    async def ask(self, chat_id: UUID, message: object, *, timeout_s: float | None) -> object: ...

    def tell(self, chat_id: UUID, message: object) -> None: ...


class Router:
    def __init__(self, supervisor: Supervisor, *, peers: PeerLink | None = None) -> None:
        self._local = supervisor
        self._peers = peers

    async def ask(
        self, chat_id: UUID, message: object, *, timeout_s: float | None = None
    ) -> object:
        """The reply of the chat's actor to ``message``.

        Raises the behavior's ``Refusal`` unchanged, or one of ``chatd.actors.errors``:
        ``NotOwner`` (no owner reachable from here), ``MailboxFull``, ``ActorDead`` (retryable),
        ``AskTimeout`` (after ``timeout_s``, default the Supervisor's ask timeout).
        """
        if self._peers is not None and not self._local.owns(chat_id):
            return await self._peers.ask(chat_id, message, timeout_s=timeout_s)
        return await self._local.ask(chat_id, message, timeout_s=timeout_s)

    def tell(self, chat_id: UUID, message: object) -> None:
        """Deliver without a reply; raises at once when the message cannot be queued."""
        if self._peers is not None and not self._local.owns(chat_id):
            self._peers.tell(chat_id, message)
            return
        self._local.tell(chat_id, message)
