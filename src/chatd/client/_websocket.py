"""A small WebSocket client: wsproto over an anyio TCP (or TLS) stream, so it runs under trio
and asyncio alike. It only receives text (answering pings); a refused handshake is the typed
API error of its HTTP answer."""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Iterator
from urllib.parse import urlsplit

import anyio
import anyio.abc
import msgspec
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from chatd.client.errors import api_error

_RECEIVE_BYTES = 65_536
_CLOSE_TIMEOUT_S = 2.0


class Closed(Exception):
    """The connection ended: the close code (1006 when the TCP stream just broke)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"WebSocket closed with {code} {reason}")
        self.code = code


class WebSocket:
    def __init__(self, stream: anyio.abc.ByteStream, ws: WSConnection) -> None:
        self._stream = stream
        self._ws = ws
        self._messages: deque[str] = deque()
        self._parts: list[str] = []
        self._closed: Closed | None = None

    async def receive(self) -> str:
        """The next text message; raises ``Closed`` once the connection ended."""
        while not self._messages:
            if self._closed is not None:
                raise self._closed
            await self._pump()
        return self._messages.popleft()

    async def _pump(self) -> None:
        try:
            data = await self._stream.receive(_RECEIVE_BYTES)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self._closed = Closed(1006, "connection lost")
            return
        self._ws.receive_data(data)
        await self._handle(self._ws.events())

    async def _handle(self, events: Iterator[Event]) -> None:
        for event in events:
            if isinstance(event, TextMessage):
                self._parts.append(event.data)
                if event.message_finished:
                    self._messages.append("".join(self._parts))
                    self._parts.clear()
            elif isinstance(event, Ping):
                await self._send(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self._closed = Closed(event.code, event.reason or "")
                await self._send(self._ws.send(event.response()))

    async def _send(self, data: bytes) -> None:
        try:
            await self._stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self._closed = self._closed or Closed(1006, "connection lost")

    async def aclose(self) -> None:
        with anyio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
            if self._closed is None:
                self._closed = Closed(1000, "client closed")
                await self._send(self._ws.send(CloseConnection(code=1000)))
            await self._stream.aclose()


async def connect(url: str, headers: list[tuple[bytes, bytes]], timeout_s: float) -> WebSocket:
    """Open ``url`` (ws:// or wss://); a refused handshake raises its typed ``ApiError``,
    an unreachable server ``OSError`` (or ``TimeoutError`` after ``timeout_s``)."""
    address = urlsplit(url)
    secure = address.scheme == "wss"
    host = address.hostname or "localhost"
    port = address.port or (443 if secure else 80)
    target = address.path + (f"?{address.query}" if address.query else "")
    with anyio.fail_after(timeout_s):
        if secure:
            stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                host, port, ssl_context=ssl.create_default_context(), tls_standard_compatible=False
            )
        else:
            stream = await anyio.connect_tcp(host, port)
        try:
            ws = WSConnection(ConnectionType.CLIENT)
            await stream.send(ws.send(Request(address.netloc, target, extra_headers=headers)))
            return await _handshake(stream, ws)
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise


async def _handshake(stream: anyio.abc.ByteStream, ws: WSConnection) -> WebSocket:
    status, body, retry_after = 0, b"", None
    while True:
        try:
            data = await stream.receive(_RECEIVE_BYTES)
        except anyio.EndOfStream:
            raise ConnectionError("the server closed the connection in the handshake") from None
        ws.receive_data(data)
        events = ws.events()
        for event in events:
            if isinstance(event, AcceptConnection):
                socket = WebSocket(stream, ws)
                # Frames that came in the same segment as the 101 are taken now: left in
                # wsproto's buffer, they would wait for the next bytes, maybe forever.
                await socket._handle(events)
                return socket
            if isinstance(event, RejectConnection):
                status = event.status_code
                found = dict(event.headers).get(b"retry-after")
                retry_after = found.decode() if found else None
                if not event.has_body:
                    raise api_error(status, None, retry_after)
            elif isinstance(event, RejectData):
                body += event.data
                if event.body_finished:
                    try:
                        decoded = msgspec.json.decode(body)
                    except msgspec.DecodeError:
                        decoded = None
                    raise api_error(status, decoded, retry_after)
