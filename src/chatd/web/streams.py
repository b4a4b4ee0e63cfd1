"""The WebSockets: one chat's live events (resumable from a cursor) and the caller's chat list.

Each view checks access and subscribes before it accepts, so a refusal (a bad cursor, someone
else's chat) is the HTTP answer to the handshake. Once accepted, each batch the hub or the feed
hands over becomes one frame (``chatd.web.frames``); a dropped slow consumer is closed with
4008 and may reconnect with its cursor. Clients are not expected to send anything: what they
send is read and ignored, so that their close is seen at once and the view is cancelled, which
unsubscribes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

import trio
from quart import websocket

from chatd.actors.hub import SlowConsumer, StreamCursor
from chatd.web.chats import owned_chat_id
from chatd.web.frames import encode_stream_batch, encode_watch_batch
from chatd.web.routing import ApiRoutes, Call, QueryParam

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
    await send_batches(call.services.engine.hub.subscribe(ident, cursor), encode_stream_batch)


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
