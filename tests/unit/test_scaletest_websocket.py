"""The load driver's WebSocket client against a wsproto server on a real socket."""

from __future__ import annotations

from functools import partial

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from chatd.scaletest.websocket import connect

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
    seen: list[str] = []
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, _serve_one, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(DEADLINE_S):
            async with connect(f"ws://127.0.0.1:{port}/x", []) as socket, trio.open_nursery() as n:

                def handle(text: str) -> None:
                    seen.append(text)
                    if len(seen) == len(FRAMES):
                        n.cancel_scope.cancel()

                n.start_soon(socket.read, handle)
        nursery.cancel_scope.cancel()
    assert seen == FRAMES
