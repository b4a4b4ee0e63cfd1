"""Hostile bytes against a real ``chatd serve``: raw sockets, no client library to tidy them up.

Each test checks one way a single connection could hurt the server (kill it, hang, make it
answer 500) and that the server still answers ``/healthz`` afterwards.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx2
import pytest
import trio

from chatd.store import users
from chatd.store.database import Database
from tests.e2e.chatd_process import ServerProcess, chatd_server

DEADLINE_S = 10.0

WS_HANDSHAKE = (
    b"GET /api/v1/chats/watch HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
# A masked text frame "hi", sent in the same write as the handshake.
WS_FRAME = b"\x81\x82\x00\x00\x00\x00hi"


@pytest.fixture
async def server(database_url: str, db: Database) -> AsyncIterator[ServerProcess]:
    async with chatd_server(["--database-url", database_url, "--port", "0"]) as process:
        yield process


async def _token(db: Database, name: str, *, is_admin: bool = False) -> str:
    user = await users.create_user(db, name, is_admin=is_admin)
    _, secret = await users.create_api_token(db, user.id)
    return secret


def _address(server: ServerProcess) -> tuple[str, int]:
    parts = urlsplit(server.url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


async def _exchange(server: ServerProcess, data: bytes) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it."""
    host, port = _address(server)
    received = b""
    with trio.fail_after(DEADLINE_S):
        async with await trio.open_tcp_stream(host, port) as stream:
            await stream.send_all(data)
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


async def _healthz(server: ServerProcess) -> bytes:
    return await _exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize(
    "authorization",
    [
        # No token: the app refuses at once, its 401 collides with Hypercorn's 400 in h11.
        b"",
        # A token that must be looked up: the app answers after Hypercorn's 400 was sent, its
        # answer is dropped, and nothing closed the connection.
        b"Authorization: Bearer chatd_" + b"x" * 43 + b"\r\n",
    ],
    ids=["no-token", "token-to-look-up"],
)
async def test_websocket_handshake_with_frame_bytes_does_not_kill_the_server(
    server: ServerProcess, authorization: bytes
) -> None:
    # Frames before the handshake's answer: Hypercorn refuses them with a 400 while the app
    # answers the handshake itself.
    handshake = WS_HANDSHAKE.replace(b"\r\n\r\n", b"\r\n" + authorization + b"\r\n")
    answer = await _exchange(server, handshake + WS_FRAME)
    assert _statuses(answer)[0] in (400, 401), answer
    assert (await _healthz(server)).startswith(b"HTTP/1.1 200 ")
    assert server.process.returncode is None
    assert not any("Traceback" in line for line in server.output)


async def _exchange_concurrently(server: ServerProcess, data: bytes) -> bytes:
    """Like ``_exchange``, but sending while reading: the server may answer (and close)
    before it has read everything, and a send that fails because it closed is fine."""
    host, port = _address(server)
    received = b""
    with trio.fail_after(DEADLINE_S):
        async with await trio.open_tcp_stream(host, port) as stream:

            async def send() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                try:
                    while chunk := await stream.receive_some(65536):
                        received += chunk
                except trio.BrokenResourceError:
                    pass  # a reset after the answer: the server closed with our data unread
                nursery.cancel_scope.cancel()
    return received


def _post(path: str, body: bytes, *, token: str = "chatd_nope") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


# The next request on a connection, the last one: the server closes after answering it.
_LAST_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def _statuses(answer: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


@pytest.mark.parametrize(
    ("path", "as_user", "status"),
    [("/api/v1/chats", False, 401), ("/api/v1/providers", True, 403)],
)
async def test_a_rejected_request_with_an_unread_body_does_not_hang_the_next_one(
    server: ServerProcess, db: Database, path: str, as_user: bool, status: int
) -> None:
    token = await _token(db, "alice") if as_user else "chatd_nope"
    body = b'{"text": "' + b"x" * 500_000 + b'"}'
    answer = await _exchange_concurrently(server, _post(path, body, token=token) + _LAST_HEALTHZ)
    statuses = _statuses(answer)
    assert statuses[0] == status
    # Either the next request is answered, or the connection was closed cleanly after the refusal.
    assert statuses[1:] in ([200], []), answer
    if not statuses[1:]:
        assert b"connection: close" in answer.lower()


async def test_a_body_past_the_limit_gets_413_and_the_connection_does_not_hang(
    server: ServerProcess, db: Database
) -> None:
    token = await _token(db, "alice")
    body = b'{"text": "' + b"x" * 2_000_000 + b'"}'
    answer = await _exchange_concurrently(
        server,
        _post("/api/v1/chats", body, token=token) + _LAST_HEALTHZ,
    )
    statuses = _statuses(answer)
    assert statuses[0] == 413
    assert statuses[1:] in ([200], []), answer
    if not statuses[1:]:
        assert b"connection: close" in answer.lower()


async def test_connection_close_from_the_client_is_honoured_after_an_early_rejection(
    server: ServerProcess,
) -> None:
    body = b'{"text": "' + b"x" * 500_000 + b'"}'
    request = _post("/api/v1/chats", body).replace(
        b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"
    )
    answer = await _exchange_concurrently(server, request)
    assert _statuses(answer) == [401]


async def _open_websocket(server: ServerProcess, token: str) -> trio.SocketStream:
    """A watch WebSocket over a raw socket, once its handshake was answered 101."""
    host, port = _address(server)
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(
        WS_HANDSHAKE.replace(b"\r\n\r\n", f"\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(65536)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    return stream


async def _pong(stream: trio.SocketStream) -> None:
    """Ping (masked, as a client must) and read frames until the pong."""
    await stream.send_all(b"\x89\x80\x01\x02\x03\x04")
    buffer = b""
    while True:
        while len(buffer) >= 2:
            length = buffer[1] & 0x7F
            header = 2 + (2 if length == 126 else 8 if length == 127 else 0)
            if len(buffer) < header:
                break
            if length >= 126:
                length = int.from_bytes(buffer[2:header])
            if len(buffer) < header + length:
                break
            if buffer[0] & 0x0F == 0xA:
                return
            buffer = buffer[header + length :]
        chunk = await stream.receive_some(65536)
        assert chunk, "the WebSocket was closed"
        buffer += chunk


async def test_connections_past_the_limit_get_503_and_the_open_ones_are_untouched(
    database_url: str, db: Database
) -> None:
    tokens = [await _token(db, f"user{i}") for i in range(3)]
    env = {"CHATD_MAX_CONNECTIONS": "3"}
    async with chatd_server(["--database-url", database_url, "--port", "0"], env=env) as server:
        with trio.fail_after(DEADLINE_S):
            sockets = [await _open_websocket(server, token) for token in tokens]
        refused = await _healthz(server)
        assert _statuses(refused) == [503], refused
        assert b"retry-after: 1\r\n" in refused.lower()
        assert b"connection limit" in refused
        with trio.fail_after(DEADLINE_S):
            for stream in sockets:
                await _pong(stream)
            await sockets.pop().aclose()
        # A freed place is taken again (the server notices the close as soon as it reads EOF).
        with trio.fail_after(DEADLINE_S):
            while _statuses(answer := await _healthz(server)) == [503]:
                await trio.lowlevel.checkpoint()
        assert _statuses(answer) == [200]
        for stream in sockets:
            await stream.aclose()


class PgProxy:
    """A TCP proxy in front of PostgreSQL that the test can cut: every link is closed and new
    connections are closed as soon as they are accepted (PostgreSQL itself keeps running)."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        query = parse_qs(parts.query)
        self._unix: str | None = None
        if "host" in query and query["host"][0].startswith("/"):
            self._unix = f"{query['host'][0]}/.s.PGSQL.{query.get('port', ['5432'])[0]}"
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._template = parts._replace(query="")
        self._links: set[trio.CancelScope] = set()
        self.down = False
        self.url = ""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        auth = self._template.netloc.rsplit("@", 1)[0]
        self.url = urlunsplit(self._template._replace(netloc=f"{auth}@127.0.0.1:{port}"))
        task_status.started()
        await trio.serve_listeners(self._link, listeners)

    def cut(self) -> None:
        self.down = True
        for scope in self._links:
            scope.cancel()

    async def _link(self, client: trio.SocketStream) -> None:
        async with client:
            if self.down:
                return
            if self._unix is not None:
                upstream: trio.abc.Stream = await trio.open_unix_socket(self._unix)
            else:
                upstream = await trio.open_tcp_stream(*self._target)
            async with upstream:
                with trio.CancelScope() as scope:
                    self._links.add(scope)
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._pump, client, upstream)
                            nursery.start_soon(self._pump, upstream, client)
                    finally:
                        self._links.discard(scope)

    @staticmethod
    async def _pump(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while chunk := await source.receive_some(65536):
                await sink.send_all(chunk)
            await sink.send_eof()  # type: ignore[attr-defined]


def _read_routes(document: dict[str, Any]) -> list[tuple[str, bool]]:
    """Every GET route of the OpenAPI document as (a concrete path, needs an admin)."""
    routes = []
    for path, methods in document["paths"].items():
        operation = methods.get("get")
        if operation is None or operation.get("x-websocket"):
            continue
        concrete = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path)
        routes.append((concrete, "403" in operation["responses"]))
    return routes


async def test_every_read_route_answers_503_while_postgresql_is_unreachable(
    database_url: str, db: Database
) -> None:
    user_token = await _token(db, "alice")
    admin_token = await _token(db, "root", is_admin=True)
    proxy = PgProxy(database_url)
    # The auth cache keeps the tokens known, so that each route's own reads meet the outage.
    env = {"CHATD_AUTH_CACHE_TTL_S": "600", "CHATD_DB_CONNECT_TIMEOUT_S": "2"}
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        args = ["--database-url", proxy.url, "--port", "0"]
        async with (
            chatd_server(args, env=env) as server,
            httpx2.AsyncClient(base_url=server.url, timeout=DEADLINE_S) as http,
        ):
            user = {"Authorization": f"Bearer {user_token}"}
            admin = {"Authorization": f"Bearer {admin_token}"}
            document = (await http.get("/api/v1/openapi.json", headers=user)).json()
            routes = _read_routes(document)
            assert len(routes) >= 5, routes
            for path, needs_admin in routes:  # warm the token cache while the database is up
                before = await http.get(path, headers=admin if needs_admin else user)
                assert before.status_code < 500, (path, before.text)

            proxy.cut()
            answers = {
                path: await http.get(path, headers=admin if needs_admin else user)
                for path, needs_admin in routes
            }
            health = await http.get("/healthz")

        unavailable = [path for path, answer in answers.items() if answer.status_code == 503]
        for path, answer in answers.items():
            assert answer.status_code in (200, 503), (path, answer.status_code, answer.text)
            if answer.status_code == 503:
                assert answer.headers["retry-after"] == "1"
                assert answer.json()["error"]["code"] == "unavailable"
        answered = {path for path, answer in answers.items() if answer.status_code == 200}
        # These three are served from memory: the document, the process's metrics, and the
        # caller (who the cached token says it is).
        assert answered <= {"/api/v1/openapi.json", "/api/v1/metrics", "/api/v1/users/me"}
        assert health.status_code == 503
        assert health.json() == {"status": "degraded", "database": "unavailable"}
        web_lines = [line for line in server.output if "chatd.web" in line]
        assert not any("request" in line and "failed" in line for line in web_lines), web_lines
        outage_lines = [line for line in web_lines if "chatd.web.errors" in line]
        assert len(outage_lines) == len(unavailable), web_lines
        assert all("database unavailable" in line for line in outage_lines), outage_lines
        nursery.cancel_scope.cancel()


_UPGRADE = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
)
_CHAT = b"00000000-0000-0000-0000-000000000000"
_DEEP = b'{"text": ' + b"[" * 1997 + b"]" * 1997 + b"}"
_JSON = b"Content-Type: application/json\r\n"
_AUTH = b"Authorization: Bearer TOKEN\r\n"
_POST = b"POST /api/v1/chats HTTP/1.1\r\n" + _AUTH
# Hostile requests in every place a client controls, as (request line and headers, body);
# TOKEN is replaced with a valid token.
HOSTILE_REQUESTS: list[tuple[bytes, bytes]] = [
    (b"GET /api/v1/chats HTTP/1.1\r\nAuthorization: Bearer " + b"a" * 15_000 + b"\r\n", b""),
    (b"GET /api/v1/chats HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\xc3\r\n", b""),
    (b"GET /api/v1/chats HTTP/1.1\r\nAuthorization: Bearer chatd_\xff\xfe\r\n", b""),
    (b"GET /api/v1/chats HTTP/1.1\r\nAuthorization: Basic abc\r\n", b""),
    (b"GET /api/v1/chats HTTP/1.1\r\nAuthorization: Bearer\r\n", b""),
    (b"GET /api/v1/chats/%ff HTTP/1.1\r\nAuthorization: Bearer TOKEN\r\n", b""),
    (b"GET /api/v1/chats/%ff%fe/messages HTTP/1.1\r\nAuthorization: Bearer TOKEN\r\n", b""),
    (b"GET /api/v1/chats?limit=%ff HTTP/1.1\r\nAuthorization: Bearer TOKEN\r\n", b""),
    (
        b"GET /api/v1/chats?limit=9999999999999999999999 HTTP/1.1\r\n" + _AUTH,
        b"",
    ),
    (b"GET /api/v1/chats?cursor=%ff%00 HTTP/1.1\r\nAuthorization: Bearer TOKEN\r\n", b""),
    (b"GET /api/v1/chats?cursor=\xff HTTP/1.1\r\nAuthorization: Bearer TOKEN\r\n", b""),
    (b"GET /api/v1/chats?%ff=1 HTTP/1.1\r\nAuthorization: Bearer TOKEN\r\n", b""),
    (b"GET /api/v1/%ff HTTP/1.1\r\n", b""),
    (b"GET /\xff\xfe HTTP/1.1\r\n", b""),
    (b"BREW /api/v1/chats HTTP/1.1\r\nAuthorization: Bearer TOKEN\r\n", b""),
    (b"OPTIONS /api/v1/chats HTTP/1.1\r\n", b""),
    (b"TRACE / HTTP/1.1\r\n", b""),
    (b"GET /api/v1/chats HTTP/1.1\r\nX-Big: " + b"b" * 70_000 + b"\r\n", b""),
    (
        b"POST /api/v1/chats HTTP/1.1\r\nAuthorization: Bearer TOKEN\r\n"
        + _JSON
        + b"Content-Length: 7\r\n",
        b'{"a":\xff}',
    ),
    (
        b"POST /api/v1/chats HTTP/1.1\r\nAuthorization: Bearer TOKEN\r\n"
        + _JSON
        + b"Content-Length: %d\r\n" % len(_DEEP),
        _DEEP,
    ),
    (
        _POST + b"Content-Type: text/plain; charset=\xff\r\nContent-Length: 2\r\n",
        b"{}",
    ),
    (
        _POST + b"Transfer-Encoding: chunked\r\n",
        b"zz\r\n",
    ),
    (b"POST /api/v1/chats HTTP/1.1\r\nAuthorization: Bearer TOKEN\r\nContent-Length: -1\r\n", b""),
    (
        _POST + b"Content-Length: 99999999999999999999\r\n",
        b"",
    ),
    (b"GET /api/v1/chats/watch?access_token=%ff HTTP/1.1\r\n" + _UPGRADE, b""),
    (b"GET /api/v1/chats/watch?access_token=TOKEN&x=%ff HTTP/1.1\r\n" + _UPGRADE, b""),
    (
        b"GET /api/v1/chats/watch HTTP/1.1\r\nOrigin: \xff\r\nAuthorization: Bearer TOKEN\r\n"
        + _UPGRADE,
        b"",
    ),
    (b"GET /api/v1/chats/%ff/stream?access_token=TOKEN HTTP/1.1\r\n" + _UPGRADE, b""),
    (
        b"GET /api/v1/chats/"
        + _CHAT
        + b"/stream?access_token=TOKEN&cursor=%ff HTTP/1.1\r\n"
        + _UPGRADE,
        b"",
    ),
]


async def test_hostile_requests_get_a_4xx_and_a_clean_close(
    server: ServerProcess, db: Database
) -> None:
    token = (await _token(db, "alice")).encode()
    answers = {}
    for head, body in HOSTILE_REQUESTS:
        raw = head.replace(b"TOKEN", token) + b"Host: x\r\nConnection: close\r\n\r\n" + body
        answers[head[:60]] = _statuses(await _exchange(server, raw))[:1]
    failures = {
        head: status for head, status in answers.items() if not status or not 400 <= status[0] < 500
    }
    assert failures == {}, answers
    assert (await _healthz(server)).startswith(b"HTTP/1.1 200 ")
    assert not any("Traceback" in line for line in server.output), "\n".join(server.output)
