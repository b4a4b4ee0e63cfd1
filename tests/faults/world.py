"""A chatd under fault injection: ``chatd serve`` as a real subprocess, its PostgreSQL behind the
fault proxy, the fake LLM in this process (so it outlives a killed chatd), one user and token.

``FaultWorld.kill()`` is kill -9; ``restart()`` starts chatd again on the same settings, port
and home (so a restarted process is the same deployment, as an operator's restart would be).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

from chatd.providers.fake import FakeLLM, open_fake_llm
from chatd.runtime import register_default_model
from chatd.store import users
from chatd.store.database import Database
from chatd.store.embedded import EmbeddedPostgres
from chatd.store.migrate import migrate
from tests.e2e.chatd_process import ServerProcess, chatd_server
from tests.faults.proxy import PgProxy, open_pg_proxy

# Short timeouts so that every fault is noticed, and recovered from, in seconds: a statement
# or a connection attempt stuck behind a paused proxy gives up after 2 s, retries back off
# from 0.2 s to 1 s. The lease TTL (10 s) is longer than the outages the tests inject (up to
# 2.5 s), as the default (15 s) is longer than a typical blip: the worker keeps its shards
# through the outage, so recovery cannot lean on re-gaining them; and it is well above
# chatd's start time (about 3 s), so a restarted chatd that waits out its own leases shows
# as a recovery seconds slower than one that takes them back.
LEASE_TTL_S = 10.0
FAST_SETTINGS: Mapping[str, str] = {
    "CHATD_SHARD_COUNT": "4",
    "CHATD_LEASE_TTL_S": str(LEASE_TTL_S),
    "CHATD_DB_POOL_MIN_SIZE": "1",
    "CHATD_DB_POOL_MAX_SIZE": "8",
    "CHATD_DB_CONNECT_TIMEOUT_S": "2",
    "CHATD_DB_COMMAND_TIMEOUT_S": "2",
    "CHATD_DB_LISTEN_RECONNECT_DELAY_S": "0.2",
    "CHATD_ASK_TIMEOUT_S": "3",
    # A request whose process died holds its idempotency key this long (it must exceed the
    # ask timeout); a client's retry with that key is refused with 409 until then.
    "CHATD_IDEMPOTENCY_PENDING_TIMEOUT_S": "4",
    "CHATD_RETRY_BASE_DELAY_S": "0.2",
    "CHATD_RETRY_MAX_DELAY_S": "1",
    "CHATD_STREAM_SILENCE_TIMEOUT_S": "10",
    "CHATD_AUTH_CACHE_TTL_S": "60",
    "CHATD_CONFIG_CACHE_TTL_S": "60",
    "CHATD_WS_PING_INTERVAL_S": "0",
    "CHATD_SHUTDOWN_GRACE_S": "1",
}
START_TIMEOUT_S = 30.0


def free_port() -> int:
    """A loopback port free now, to give every incarnation of one chatd the same address."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class FaultWorld:
    database_url: str  # direct, for the checker's own reads and the setup
    proxy: PgProxy
    llm: FakeLLM
    home: Path
    port: int
    token: str
    env: dict[str, str]
    _nursery: trio.Nursery
    server: ServerProcess | None = None
    incarnations: list[ServerProcess] = field(default_factory=list)
    _kill_requested: bool = False
    _end_requested: trio.Event = field(default_factory=trio.Event)
    _ended: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def chatd_database_url(self) -> str:
        return self.proxy.url_for(self.database_url)

    async def start(self) -> ServerProcess:
        """Start chatd and return once it serves (its task lives in the world's nursery)."""
        assert self.server is None, "chatd is already running"
        server: ServerProcess = await self._nursery.start(self._incarnation)
        return server

    async def _incarnation(self, *, task_status: trio.TaskStatus[ServerProcess]) -> None:
        args = ["--port", str(self.port), "--home", str(self.home)]
        ended = trio.Event()
        self._ended = ended
        try:
            async with chatd_server(args, env=self.env, timeout_s=START_TIMEOUT_S) as server:
                self.server = server
                self.incarnations.append(server)
                self._end_requested = trio.Event()
                task_status.started(server)
                await self._end_requested.wait()
                if self._kill_requested:
                    server.process.send_signal(signal.SIGKILL)
        finally:
            self.server = None
            self._kill_requested = False
            ended.set()

    async def kill(self) -> None:
        """kill -9: no shutdown code runs, connections are dropped by the kernel."""
        assert self.server is not None, "chatd is not running"
        self._kill_requested = True
        await self._end()

    async def stop(self) -> None:
        """A clean stop (SIGINT), if running."""
        if self.server is not None:
            await self._end()

    async def _end(self) -> None:
        self._end_requested.set()
        await self._ended.wait()

    async def restart(self) -> ServerProcess:
        await self.kill()
        return await self.start()

    def output(self) -> str:
        """Everything each incarnation printed, for a failure's message."""
        blocks = []
        for number, server in enumerate(self.incarnations, 1):
            blocks.append(f"--- chatd #{number} (exit {server.process.returncode}) ---")
            blocks.extend(server.output)
        return "\n".join(blocks)

    def tracebacks(self) -> list[str]:
        return [
            line
            for server in self.incarnations
            for line in server.output
            if line.startswith("Traceback")
        ]


async def _setup_database(database_url: str, llm_url: str) -> str:
    """The default model on the fake LLM and one user's token; returns the token."""
    async with Database.connect(database_url, min_size=1, max_size=2) as db:
        await register_default_model(db, base_url=f"{llm_url}/v1")
        user = await users.create_user(db, f"chaos-{uuid.uuid4().hex[:8]}")
        _token, secret = await users.create_api_token(db, user.id)
    return secret


@contextlib.asynccontextmanager
async def open_fault_world(
    database_url: str, *, settings: Mapping[str, str] | None = None, start: bool = True
) -> AsyncIterator[FaultWorld]:
    """chatd (started unless ``start=False``) on a fresh, migrated database behind a proxy."""
    home = _private_home("chatd-fault-")
    try:
        async with open_fake_llm(record=False) as llm, open_pg_proxy(database_url) as proxy:
            token = await _setup_database(database_url, llm.url)
            env = {
                **FAST_SETTINGS,
                **(settings or {}),
                "CHATD_DATABASE_URL": proxy.url_for(database_url),
            }
            async with trio.open_nursery() as nursery:
                world = FaultWorld(database_url, proxy, llm, home, free_port(), token, env, nursery)
                try:
                    if start:
                        await world.start()
                    yield world
                finally:
                    # Whatever the test left broken, let chatd reach its database to stop.
                    proxy.restore()
                    proxy.resume()
                    proxy.delay_s = 0.0
                    with trio.CancelScope(shield=True):
                        await world.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _private_home(prefix: str) -> Path:
    """A short temporary path (unix socket paths are limited) the `postgres` user can reach
    when the tests run as root."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    home.chmod(0o711)
    return home


# -- a PostgreSQL of its own, for the long chaos run outside pytest ---------------------------


@contextlib.contextmanager
def scratch_postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server with one migrated database; yields its URL."""
    home = _private_home("chatd-chaos-pg-")
    pg = EmbeddedPostgres(home, durable=False)
    pg.start()
    try:
        url = pg.url_for("chaos")
        trio.run(_create_and_migrate, pg.url_for("postgres"), url)
        yield url
    finally:
        pg.stop()
        shutil.rmtree(home, ignore_errors=True)


async def _create_and_migrate(admin_url: str, url: str) -> None:
    async with Database.connect(admin_url, min_size=1, max_size=1) as admin:
        await admin.execute('DROP DATABASE IF EXISTS "chaos"')
        await admin.execute('CREATE DATABASE "chaos"')
    async with Database.connect(url, min_size=1, max_size=1) as db:
        await migrate(db)
