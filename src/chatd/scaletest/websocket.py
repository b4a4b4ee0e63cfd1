"""A lean WebSocket client on wsproto over one trio TCP stream.

Thousands of these run in the driver's single thread, so each is a plain object driven by its
reader: no per-connection tasks or channels (trio-websocket spends both, and leaks the socket
of a connection the server closes). The TCP stream is closed on exit whoever closed first.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

_RECEIVE_BYTES = 65_536
_CLOSE_TIMEOUT_S = 5.0


class HandshakeRefused(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"WebSocket handshake refused with HTTP {status}: {body[:200]}")
        self.status = status


@dataclass(frozen=True, slots=True)
class Closed:
    """The server closed the connection (code, reason); 1006 when the TCP stream just ended."""

    code: int
    reason: str


class WebSocket:
    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self._stream = stream
        self._ws = ws
        self.closed: Closed | None = None

    async def read(self, handle: Callable[[str], None]) -> Closed:
        """Hand each text message to ``handle`` until the server closes; says how it closed.

        Events already buffered are handled before reading more: the first frames can arrive
        in the same segment as the handshake's answer.
        """
        parts: list[str] = []
        ws, stream = self._ws, self._stream
        while True:
            for event in ws.events():
                if isinstance(event, TextMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        handle("".join(parts))
                        parts.clear()
                elif isinstance(event, Ping):
                    await stream.send_all(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self.closed = Closed(event.code, event.reason or "")
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await stream.send_all(ws.send(event.response()))
                    return self.closed
                elif isinstance(event, BytesMessage):
                    continue
            data = await stream.receive_some(_RECEIVE_BYTES)
            if not data:
                self.closed = Closed(1006, "connection lost")
                return self.closed
            ws.receive_data(data)

    async def _close(self) -> None:
        if self.closed is not None:
            return
        self.closed = Closed(1000, "client closed")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._stream.send_all(self._ws.send(CloseConnection(code=1000)))


@contextlib.asynccontextmanager
async def connect(
    url: str, headers: list[tuple[bytes, bytes]], *, timeout_s: float = 60.0
) -> AsyncIterator[WebSocket]:
    """Open ``url`` (``ws://host:port/path?query``); raises ``HandshakeRefused`` on an HTTP
    answer other than 101, or none within ``timeout_s``."""
    address = urlsplit(url)
    if address.hostname is None or address.port is None:
        raise ValueError(f"{url!r} needs a host and a port")
    target = address.path + (f"?{address.query}" if address.query else "")
    stream: trio.SocketStream | None = None
    with trio.move_on_after(timeout_s):
        stream = await trio.open_tcp_stream(address.hostname, address.port)
    if stream is None:
        raise HandshakeRefused(0, f"no connection in {timeout_s} s")
    async with stream:
        ws = WSConnection(ConnectionType.CLIENT)
        socket: WebSocket | None = None
        with trio.move_on_after(timeout_s):
            await stream.send_all(ws.send(Request(address.netloc, target, extra_headers=headers)))
            socket = await _handshake(stream, ws)
        if socket is None:
            raise HandshakeRefused(0, f"no answer in {timeout_s} s")
        try:
            yield socket
        finally:
            with trio.move_on_after(_CLOSE_TIMEOUT_S) as scope:
                scope.shield = True
                await socket._close()


async def _handshake(stream: trio.SocketStream, ws: WSConnection) -> WebSocket:
    status, body = 0, b""
    while True:
        data = await stream.receive_some(_RECEIVE_BYTES)
        if not data:
            raise HandshakeRefused(status, body.decode(errors="replace") or "connection closed")
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                return WebSocket(stream, ws)
            if isinstance(event, RejectConnection):
                status = event.status_code
                if not event.has_body:
                    raise HandshakeRefused(status, "")
            elif isinstance(event, RejectData):
                body += event.data
                if event.body_finished:
                    raise HandshakeRefused(status, body.decode(errors="replace"))
