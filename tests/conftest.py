"""Shared fixtures: one real PostgreSQL server per test session, one fresh database per test.

The server is chatd's own embedded launcher (fsync off: it is thrown away). Migrations are
applied once to a template database; each test gets a clone of it, which takes milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import trio

from chatd.store.database import Database
from chatd.store.embedded import EmbeddedPostgres
from chatd.store.migrate import migrate

TEMPLATE_DB = "chatd_test_template"


@dataclass
class PgServer:
    """The session's PostgreSQL server.

    A test's database (about 11 MB) is dropped after the test by a thread of its own, while
    the next tests run: kept, a thousand of them made a 40-second removal at the session's end.
    """

    pg: EmbeddedPostgres
    _to_drop: queue.SimpleQueue[str | None] = field(default_factory=queue.SimpleQueue)
    _dropper: threading.Thread | None = None

    def url_for(self, database: str) -> str:
        return self.pg.url_for(database)

    def create_database(self, *, template: str = TEMPLATE_DB) -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        asyncio.run(
            _admin(self.url_for("postgres"), f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        )
        return self.url_for(name)

    def drop_later(self, url: str) -> None:
        if self._dropper is None:
            self._dropper = threading.Thread(target=self._drop_all, name="drop-test-databases")
            self._dropper.start()
        self._to_drop.put(urlsplit(url).path.lstrip("/"))

    def close(self) -> None:
        """Drop what is queued, then stop the dropping thread."""
        if self._dropper is not None:
            self._to_drop.put(None)
            self._dropper.join()

    def _drop_all(self) -> None:
        admin = self.url_for("postgres")
        while (name := self._to_drop.get()) is not None:
            # WITH (FORCE): a process the test left connected does not keep it. A failure
            # leaves the database to the server's removal at the end, as before.
            with contextlib.suppress(Exception):
                asyncio.run(_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _migrate_url(url: str) -> None:
    async with Database.connect(url, min_size=1, max_size=1) as db:
        await migrate(db)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    # A short path under /tmp: the unix socket path must fit in 108 bytes, and when the tests
    # run as root the `postgres` user must be able to reach it.
    home = Path(tempfile.mkdtemp(prefix="chatd-test-"))
    home.chmod(0o711)
    pg = EmbeddedPostgres(home, durable=False, bindir=os.environ.get("CHATD_PG_BIN"))
    pg.start()
    try:
        asyncio.run(
            _admin(
                pg.url_for("postgres"),
                f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"',
                f'CREATE DATABASE "{TEMPLATE_DB}"',
            )
        )
        trio.run(_migrate_url, pg.url_for(TEMPLATE_DB))
        server = PgServer(pg)
        try:
            yield server
        finally:
            server.close()
    finally:
        pg.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def database_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh, fully migrated database of its own for this test."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_later(url)


@pytest.fixture
def empty_database_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh database with no chatd schema at all (for migration tests)."""
    url = pg_server.create_database(template="template0")
    yield url
    pg_server.drop_later(url)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    async with Database.connect(database_url, min_size=1, max_size=4) as database:
        yield database
