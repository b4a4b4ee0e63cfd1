"""``GET /healthz`` over a real socket, served by Hypercorn's trio worker in this process."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx2
import trio

from chatd.config import Settings
from chatd.runtime import Ready, run_server
from tests.conftest import PgServer


async def _drop_database(admin_url: str, url: str) -> None:
    name = url.rsplit("/", maxsplit=1)[-1].split("?", maxsplit=1)[0]
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def test_healthz_follows_the_database(pg_server: PgServer, database_url: str) -> None:
    settings = Settings(database_url=database_url, port=0)
    shutdown = trio.Event()
    started = trio.Event()
    ready: list[Ready] = []

    def on_ready(r: Ready) -> None:
        ready.append(r)
        started.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_server(settings, database_url, shutdown=shutdown, on_ready=on_ready)
        )
        with trio.fail_after(30):
            await started.wait()
        url = ready[0].urls[0]
        async with httpx2.AsyncClient(timeout=10) as client:
            ok = await client.get(f"{url}/healthz")
            assert (ok.status_code, ok.json()) == (200, {"status": "ok", "database": "ok"})

            # A real fault: the database disappears under the running server.
            await trio.to_thread.run_sync(
                lambda: asyncio.run(_drop_database(pg_server.url_for("postgres"), database_url))
            )
            down = await client.get(f"{url}/healthz")
            assert down.status_code == 503
            assert down.json() == {"status": "degraded", "database": "unavailable"}
        shutdown.set()
