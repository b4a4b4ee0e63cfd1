"""A real chatd server in the test's nursery: Hypercorn on a free port, the engine, a real
PostgreSQL database, the fake provider as the default model; clients over real sockets."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import httpx2
import trio
from quart_trio import QuartTrio
from trio_websocket import WebSocketConnection, wrap_client_stream

from chatd.actors.engine import Engine, EngineOptions, open_engine
from chatd.config import Settings
from chatd.domain.events import StatusChanged
from chatd.providers.fake import FakeLLM, open_fake_llm
from chatd.runtime import register_default_model
from chatd.store import users
from chatd.store.database import Database
from chatd.store.records import User
from chatd.web.app import create_app
from chatd.web.context import Services, services
from chatd.web.server import serve

DEADLINE_S = 30.0


async def until(condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds, within DEADLINE_S: for what a test cannot wait on but only
    look at (a file a command writes, a process ending)."""
    with trio.fail_after(DEADLINE_S):
        while True:
            if condition():
                return
            await trio.sleep(0.02)


def file_text(path: Path) -> str:
    """The file's text, stripped; empty while it does not exist."""
    return path.read_text().strip() if path.exists() else ""


@dataclass
class Client:
    """One user's HTTP client and WebSocket opener."""

    world: ApiWorld
    user: User
    token: str
    http: httpx2.AsyncClient

    @contextlib.asynccontextmanager
    async def ws(
        self, path: str, *, headers: list[tuple[bytes, bytes]] | None = None
    ) -> AsyncIterator[WebSocketConnection]:
        """A WebSocket as this user, on a TCP stream closed on exit whoever closed first.

        trio-websocket 0.12 never closes the socket of a connection the server closed (its
        ``aclose`` returns early once a close frame arrived): a ResourceWarning later.
        """
        address = urlsplit(self.world.url)
        assert address.hostname is not None
        assert address.port is not None
        auth = [(b"authorization", f"Bearer {self.token}".encode())]
        async with (
            await trio.open_tcp_stream(address.hostname, address.port) as tcp,
            trio.open_nursery() as nursery,
        ):
            conn = await wrap_client_stream(
                nursery, tcp, address.netloc, path, extra_headers=auth + (headers or [])
            )
            try:
                yield conn
            finally:
                with trio.move_on_after(DEADLINE_S) as scope:
                    scope.shield = True
                    await conn.aclose()

    async def create_chat(self, text: str, **fields: Any) -> dict[str, Any]:
        response = await self.http.post("/api/v1/chats", json={"text": text, **fields})
        assert response.status_code == 201, response.text
        chat: dict[str, Any] = response.json()
        return chat

    async def wait_status(self, chat_id: str, *statuses: str) -> None:
        """Until the chat's status is one of ``statuses`` (read from the engine's hub, so HTTP
        tests do not depend on the WebSocket routes)."""
        with trio.fail_after(DEADLINE_S):
            async with self.world.engine.hub.subscribe(UUID(chat_id)) as events:
                async for batch in events:
                    for event in batch:
                        if isinstance(event, StatusChanged) and event.status in statuses:
                            return


def frames(message: str | bytes) -> list[dict[str, Any]]:
    """The events of one WebSocket frame (one object, or a batch array)."""
    value = json.loads(message)
    return value if isinstance(value, list) else [value]


@dataclass
class ApiWorld:
    url: str
    db: Database
    engine: Engine
    llm: FakeLLM
    settings: Settings
    nursery: trio.Nursery
    app: QuartTrio
    clients: list[Client] = field(default_factory=list)

    @property
    def services(self) -> Services:
        return services(self.app)

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http")

    async def client(self, name: str, *, admin: bool = False) -> Client:
        user = await users.create_user(self.db, name, is_admin=admin)
        _token, secret = await users.create_api_token(self.db, user.id)
        http = httpx2.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {secret}"}, timeout=DEADLINE_S
        )
        client = Client(self, user, secret, http)
        self.clients.append(client)
        return client

    def rejoin(self, client: Client) -> Client:
        """``client``'s user and token on this server (another server on the same database)."""
        http = httpx2.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {client.token}"},
            timeout=DEADLINE_S,
        )
        rejoined = Client(self, client.user, client.token, http)
        self.clients.append(rejoined)
        return rejoined

    def anonymous(self) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(base_url=self.url, timeout=DEADLINE_S)

    async def refused(self, path: str, headers: dict[str, str] | None = None) -> httpx2.Response:
        """The HTTP answer to a WebSocket handshake the server must refuse before upgrading.

        Sent with a plain HTTP client: trio-websocket leaves the socket of a refused handshake
        open, and a plain client shows exactly what came back.
        """
        handshake = {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        }
        async with self.anonymous() as http:
            response = await http.get(path, headers={**handshake, **(headers or {})})
        assert response.status_code != 101, "upgraded instead of refused"
        return response


@contextlib.asynccontextmanager
async def serve_api(db: Database, **overrides: Any) -> AsyncIterator[ApiWorld]:
    """Serve chatd on 127.0.0.1 and a free port with ``Settings(**overrides)``.

    Server pings are off unless asked for: Hypercorn pings a socket the moment it accepts it,
    which trio-websocket 0.12 mishandles when it already sent its close (its reader task
    crashes, python-trio/trio-websocket#184); and the ping task outlives its closed socket
    until the next ping, holding each test's shutdown for the grace period.
    """
    defaults: dict[str, Any] = {
        "shard_count": 4,
        "port": 0,
        "ws_ping_interval_s": 0.0,
        # Title calls would add a request to the fake provider after every first answer;
        # the tests of titles turn them on.
        "titles": False,
    }
    with tempfile.TemporaryDirectory(prefix="chatd-workspaces-") as scratch:
        defaults["workspace_root"] = scratch
        settings = Settings(**{**defaults, **overrides})
        async with serve_settings(db, settings) as world:
            yield world


@contextlib.asynccontextmanager
async def serve_settings(db: Database, settings: Settings) -> AsyncIterator[ApiWorld]:
    async with open_fake_llm() as llm:
        await register_default_model(db, base_url=f"{llm.url}/v1")
        options = EngineOptions.from_settings(settings, worker_id="e2e-worker")
        async with open_engine(db, options) as engine, trio.open_nursery() as nursery:
            app = create_app(settings, db, engine)
            shutdown = trio.Event()
            urls: list[str] = await nursery.start(
                partial(
                    serve,
                    app,
                    settings,
                    host="127.0.0.1",
                    port=0,
                    shutdown_trigger=shutdown.wait,
                )
            )
            world = ApiWorld(urls[0], db, engine, llm, settings, nursery, app)
            try:
                yield world
            finally:
                for client in world.clients:
                    await client.http.aclose()
                shutdown.set()
