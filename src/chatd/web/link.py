"""The internal link of one worker, both ends: its server (``chatd.web.link_server``), started
before the engine so that its URL can be published with the worker's row, and its client
(``chatd.web.link_client``), the Router's peers."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from chatd.actors.engine import Engine, EngineOptions
from chatd.config import Settings
from chatd.store import cluster
from chatd.store.database import Database
from chatd.web.link_client import LinkClient, LinkOptions, open_link_client
from chatd.web.link_server import LinkServer


@dataclass(frozen=True, slots=True)
class Link:
    url: str  # where peers reach this worker
    client: LinkClient
    server: LinkServer

    def attach(self, engine: Engine) -> None:
        """Serve peers from ``engine`` (until then, their asks get ``NotOwner``)."""
        self.server.attach(engine)

    def engine_options(self, options: EngineOptions) -> EngineOptions:
        """``options`` with this link's URL, which the Supervisor publishes in ``workers``."""
        return dataclasses.replace(options, link_url=self.url)


@contextlib.asynccontextmanager
async def open_link(settings: Settings, db: Database, worker_id: str) -> AsyncIterator[Link]:
    """Listen on ``link_host:link_port`` and open the client; leaving stops both (leave it
    after the engine: peers asking meanwhile get ``NotOwner``, not connection errors)."""
    secret = await cluster.link_secret(db)
    server = LinkServer(settings, secret)
    options = LinkOptions(
        worker_id=worker_id,
        shard_count=settings.shard_count,
        secret=secret,
        ask_timeout_s=settings.ask_timeout_s,
        link_timeout_s=settings.link_timeout_s,
        # A lease changes hands at most this often unannounced (a NOTIFY may be lost): the
        # cached owners are read again past a third of it, as the leases are checked.
        owners_max_age_s=settings.lease_ttl_s / 3,
        max_connections=settings.max_connections,
    )
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(server.run)
        try:
            async with open_link_client(db, options) as client:
                yield Link(url, client, server)
        finally:
            server.stop()
