"""The Router: the edge's only way to reach a chat's actor.

A chat whose shard this worker serves goes to the local Supervisor; any other goes to the
``PeerLink``, which forwards it to the shard's owner over the internal link
(``chatd.web.link_client``) and returns its reply or raises its refusal unchanged. Without
peers (a single process, tests), the Supervisor's ``NotOwner`` answers for the shards it does
not hold.
"""

from __future__ import annotations

from typing import Protocol
from uuid import UUID

from chatd.actors.supervisor import Supervisor


class PeerLink(Protocol):
    """Delivers to the worker that owns a chat's shard (``chatd.web.link_client.LinkClient``)."""

    async def ask(self, chat_id: UUID, message: object, *, timeout_s: float | None) -> object: ...

    def tell(self, chat_id: UUID, message: object) -> None: ...


class Router:
    def __init__(self, supervisor: Supervisor, *, peers: PeerLink | None = None) -> None:
        self._local = supervisor
        self.peers = peers

    async def ask(
        self, chat_id: UUID, message: object, *, timeout_s: float | None = None
    ) -> object:
        """The reply of the chat's actor to ``message``.

        Raises the behavior's ``Refusal`` unchanged, or one of ``chatd.actors.errors``:
        ``NotOwner`` (no owner reachable from here), ``MailboxFull``, ``ActorDead`` (retryable),
        ``AskTimeout`` (after ``timeout_s``, default the Supervisor's ask timeout).
        """
        if self.peers is not None and not self._local.owns(chat_id):
            return await self.peers.ask(chat_id, message, timeout_s=timeout_s)
        return await self._local.ask(chat_id, message, timeout_s=timeout_s)

    def tell(self, chat_id: UUID, message: object) -> None:
        """Deliver without a reply; raises at once when the message cannot be queued."""
        if self.peers is not None and not self._local.owns(chat_id):
            self.peers.tell(chat_id, message)
            return
        self._local.tell(chat_id, message)
