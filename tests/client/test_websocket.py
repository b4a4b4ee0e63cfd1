"""The SDK's WebSocket against a wsproto server on a real socket."""

from __future__ import annotations

from functools import partial

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from chatd.client._websocket import connect

DEADLINE_S = 10
FRAMES = ['{"type":"status","status":"waiting"}', '[{"type":"message"}]']


async def _serve_one(stream: trio.SocketStream) -> None:
    """Accept the handshake with the frames in the very same segment as the 101, then send
    nothing more until the client leaves."""
    ws = WSConnection(ConnectionType.SERVER)
    while True:
        ws.receive_data(await stream.receive_some(65_536))
        if any(isinstance(e, Request) for e in ws.events()):
            break
    out = ws.send(AcceptConnection())
    for text in FRAMES:
        out += ws.send(TextMessage(data=text))
    await stream.send_all(out)
    while await stream.receive_some(65_536):
        for event in ws.events():
            if isinstance(event, CloseConnection):
                await stream.send_all(ws.send(event.response()))
    await stream.aclose()


async def test_frames_that_arrive_with_the_handshake_are_not_held_back() -> None:
    # A stream's snapshot can come in the 101's segment; if the chat is idle, nothing follows.
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, _serve_one, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(DEADLINE_S):
            socket = await connect(f"ws://127.0.0.1:{port}/x", [], DEADLINE_S)
            try:
                seen = [await socket.receive() for _ in FRAMES]
            finally:
                await socket.aclose()
        nursery.cancel_scope.cancel()
    assert seen == FRAMES
