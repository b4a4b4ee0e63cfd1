"""The WebSockets: one chat's live events (resumable from a cursor) and the caller's chat list.

Each view checks access and subscribes before it accepts, so a refusal (a bad cursor, someone
else's chat) is the HTTP answer to the handshake. Once accepted, each batch the hub or the feed
hands over becomes one frame (``chatd.web.frames``); a dropped slow consumer is closed with
4008 and may reconnect with its cursor. Clients are not expected to send anything: what they
send is read and ignored, so that their close is seen at once and the view is cancelled, which
unsubscribes.

A chat's stream is the hub's of the worker that serves the chat's shard. On any other worker
it is relayed from the owner over the internal link (``chatd.web.link_client``): the owner's
frames are passed on as they are, with the cursor the client holds after each. The view keeps
that cursor for local streams too, so that when the shard moves (the owner dies, leaves or
hands it over; a local subscription ends with ``OwnerMoved``) the stream goes on from it at the
new owner, looked up for up to ``relay_reconnect_timeout_s``: the client gets what it would
get had it reconnected there with its cursor (each committed message once; a ``preview_reset``
and the regenerated answer when the owner died mid-answer). A relay whose owner drops it as a
slow consumer (the relay stopped reading because its own client is slow) closes its client
with 4008, as a local stream does.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TypeVar
from uuid import UUID

import trio
from quart import websocket

from chatd.actors.errors import NotOwner
from chatd.actors.hub import OwnerMoved, SlowConsumer, StreamCursor
from chatd.store.database import DatabaseUnavailable
from chatd.web.chats import owned_chat_id
from chatd.web.context import Services
from chatd.web.frames import encode_stream_batch, encode_watch_batch
from chatd.web.link_client import LinkClient, LinkUnavailable, RelaySource
from chatd.web.link_codec import LinkEnd, LinkFrame
from chatd.web.routing import ApiRoutes, Call, QueryParam

log = logging.getLogger(__name__)

# A relay waiting for the owner of a chat backs off from this to the max between lookups.
_RELAY_RETRY_BASE_S = 0.05
_RELAY_RETRY_MAX_S = 1.0
# The close code of a relayed stream whose chat no worker took up within
# relay_reconnect_timeout_s: "try again later" (RFC 6455 registry), with the cursor.
_TRY_AGAIN_LATER = 1013

routes = ApiRoutes("streams", tag="streams")

T = TypeVar("T")

_CURSOR = (
    QueryParam("message_seq", "integer", "seq of the last committed message the client holds"),
    QueryParam("history_version", "integer", "episode of the client's preview (with the next)"),
    QueryParam("generation_attempt", "integer", "episode of the client's preview"),
    QueryParam("part_seq", "integer", "seq of the last part of that episode the client holds"),
)


# A static segment wins over a variable one whatever the order of declaration, so "watch" is
# never taken for the chat id of a stream (tests/e2e/test_streams.py checks it).
@routes.websocket(
    "/chats/watch",
    summary="Lifecycle events of the caller's chats: created, status, title, tool calls, diffs",
    errors=(403,),
)
async def watch_chats(call: Call[None]) -> None:
    await send_batches(call.services.engine.watch.subscribe(call.user.id), encode_watch_batch)


@routes.websocket(
    "/chats/<chat_id>/stream",
    summary="Live events of one chat, resumed after the cursor of the last events seen",
    query=_CURSOR,
    errors=(403, 404),
)
async def stream_chat(call: Call[None], chat_id: str) -> None:
    params = {q.name: value for q in _CURSOR if (value := call.query.get(q.name)) is not None}
    cursor = StreamCursor.from_query(params)
    ident = await owned_chat_id(call, chat_id)
    await ChatStream(call.services, ident, cursor).run()


class ChatStream:
    """One client's stream of one chat: local while this worker serves the chat, relayed
    otherwise, going from one to the other from the client's cursor as the shard moves."""

    def __init__(self, services: Services, chat_id: UUID, cursor: StreamCursor) -> None:
        self._services = services
        self._chat_id = chat_id
        self.cursor = cursor  # what the client holds after what it was sent
        self._nursery: trio.Nursery | None = None
        self._accepted = False
        peers = services.engine.router.peers
        self._link = peers if isinstance(peers, LinkClient) else None

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                while not await self._serve_once():
                    pass
                nursery.cancel_scope.cancel()
        except* SlowConsumer as dropped:
            exc = dropped.exceptions[0]
            assert isinstance(exc, SlowConsumer)
            await websocket.close(exc.close_code, exc.reason)

    async def _serve_once(self) -> bool:
        """Stream from where the chat is served now; False when it must be looked up again."""
        supervisor = self._services.engine.supervisor
        if self._link is None or supervisor.owns(self._chat_id):
            return await self._local()
        return await self._relay()

    async def _accept(self) -> None:
        if self._accepted:
            return
        assert self._nursery is not None
        await websocket.accept()
        self._accepted = True
        self._nursery.start_soon(_ignore_client_messages)

    async def _local(self) -> bool:
        engine = self._services.engine
        try:
            async with engine.hub.subscribe(self._chat_id, self.cursor) as batches:
                if self._link is not None and not engine.supervisor.owns(self._chat_id):
                    raise OwnerMoved(self._chat_id)  # moved between the check and the read
                await self._accept()
                async for batch in batches:
                    await websocket.send(encode_stream_batch(batch))
                    self.cursor = self.cursor.after(batch)
        except OwnerMoved:
            return False
        return True

    async def _relay(self) -> bool:
        """Relay from the owner until its stream ends; False to look up the owner again."""
        assert self._link is not None
        link, settings = self._link, self._services.settings
        supervisor = self._services.engine.supervisor
        deadline = trio.current_time() + settings.relay_reconnect_timeout_s
        delay = _RELAY_RETRY_BASE_S
        fresh = False
        while True:
            try:
                async with link.open_stream(self._chat_id, self.cursor, fresh=fresh) as source:
                    await self._accept()
                    if await self._pass_on(source):
                        return True
                    deadline = trio.current_time() + settings.relay_reconnect_timeout_s
                    delay = _RELAY_RETRY_BASE_S
            except LinkUnavailable as exc:
                if not self._accepted:
                    # Nothing accepted yet: the handshake gets its 503 with Retry-After.
                    raise NotOwner(self._chat_id, link.shard_of(self._chat_id)) from exc
                if trio.current_time() >= deadline:
                    log.warning("stream of chat %s found no owner: %s", self._chat_id, exc)
                    await websocket.close(_TRY_AGAIN_LATER, "no worker serves this chat now")
                    return True
                await trio.sleep(delay)
                delay = min(delay * 2, _RELAY_RETRY_MAX_S)
            fresh = True
            if supervisor.owns(self._chat_id):
                return False  # ours now: local from the cursor

    async def _pass_on(self, source: RelaySource) -> bool:
        """The owner's frames to the client; True when the stream is over for good, False
        when the owner went away (look it up again)."""
        assert self._link is not None
        link, settings = self._link, self._services.settings
        while True:
            # An owner that froze (SIGSTOP, a lost host) sends nothing and closes nothing: when
            # the stream is quiet, check that the owner it comes from still holds the shard.
            with trio.move_on_after(settings.link_timeout_s) as quiet:
                item = await source.receive()
            if quiet.cancelled_caught:
                try:
                    owner = link.cached_owner(self._chat_id) or await link.owner(self._chat_id)
                except DatabaseUnavailable:
                    continue
                if owner is None or owner.epoch != source.owner.epoch:
                    return False
                continue
            match item:
                case LinkFrame(cursor=cursor, frame=frame):
                    await websocket.send(bytes(frame).decode())
                    self.cursor = cursor.cursor()
                case LinkEnd(reason="slow_consumer", detail=detail):
                    raise SlowConsumer(self._chat_id, detail)
                case LinkEnd() | None:
                    return False


async def send_batches(
    subscription: AbstractAsyncContextManager[AsyncIterator[Sequence[T]]],
    encode: Callable[[Sequence[T]], str],
) -> None:
    """Subscribe, accept, then send each batch as one frame until the subscription ends or the
    client leaves; a dropped slow consumer is closed with 4008 (its cursor resumes it)."""
    try:
        async with subscription as batches:
            await websocket.accept()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_ignore_client_messages)
                async for batch in batches:
                    await websocket.send(encode(batch))
                nursery.cancel_scope.cancel()
    except* SlowConsumer as dropped:
        exc = dropped.exceptions[0]
        assert isinstance(exc, SlowConsumer)
        await websocket.close(exc.close_code, exc.reason)


async def _ignore_client_messages() -> None:
    """Quart-Trio queues what a client sends (10 messages) and notices its close only after
    them: reading keeps that queue empty, so a close cancels the view at once."""
    while True:
        await websocket.receive()
