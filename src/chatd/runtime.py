"""Assemble a running chatd process: database (embedded or external), migrations, web server."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from chatd.actors.engine import EngineOptions, open_engine
from chatd.config import Settings
from chatd.demo import DemoModel, open_demo_model
from chatd.identity import claim_identity
from chatd.providers.base import ProviderKind
from chatd.store import providers, users
from chatd.store.database import Database
from chatd.store.embedded import EmbeddedPostgres
from chatd.store.leases import reclaim_leases
from chatd.store.migrate import migrate
from chatd.web.app import create_app
from chatd.web.link import open_link
from chatd.web.server import serve

log = logging.getLogger(__name__)

DEV_ADMIN_USER = "admin"


class StartupError(RuntimeError):
    """The process cannot start as configured; the message says what to change."""


@dataclass(frozen=True, slots=True)
class Ready:
    """What a started server tells whoever started it."""

    urls: list[str]
    admin_token: str | None
    demo_model: DemoModel | None = None  # with ``demo``: the model that answers
    worker_id: str = ""  # the identity this process serves under (a parent reports it)


@contextlib.contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """The configured database URL, or that of the embedded server, started and stopped here."""
    if not settings.uses_embedded_database:
        yield settings.database_url
        return
    with EmbeddedPostgres(
        settings.home,
        bindir=settings.pg_bin or None,
        start_timeout_s=settings.embedded_pg_start_timeout_s,
        stop_timeout_s=settings.embedded_pg_stop_timeout_s,
    ) as pg:
        yield pg.url


@contextlib.asynccontextmanager
async def open_database(settings: Settings, url: str) -> AsyncIterator[Database]:
    async with Database.connect(
        url,
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        connect_timeout_s=settings.db_connect_timeout_s,
        command_timeout_s=settings.db_command_timeout_s,
        listen_reconnect_delay_s=settings.db_listen_reconnect_delay_s,
    ) as db:
        yield db


async def run_server(
    settings: Settings,
    url: str,
    *,
    shutdown: trio.Event,
    on_ready: Callable[[Ready], None],
    admin_token_file: Path | None = None,
    demo: bool = False,
) -> None:
    """Migrate, start the engine (shard leases, resumed chats), then serve HTTP until
    ``shutdown`` is set; the engine stops after the last request, releasing its leases.

    The worker id is this process's identity in ``settings.home`` (``chatd.identity``), held
    until it returns: after a crash, the next process on the home is the same worker and takes
    its leases back at once (under a new epoch) instead of waiting ``lease_ttl_s`` for them.

    With ``demo``, a model answers out of the box (``chatd.demo``): the fake provider, served
    in this process until the engine has stopped, or a real one when its API key is set.
    """
    with claim_identity(settings.home, explicit_id=settings.worker_id) as identity:
        await _serve_as(
            settings,
            url,
            identity.worker_id,
            shutdown=shutdown,
            on_ready=on_ready,
            admin_token_file=admin_token_file,
            demo=demo,
        )


async def _serve_as(
    settings: Settings,
    url: str,
    worker_id: str,
    *,
    shutdown: trio.Event,
    on_ready: Callable[[Ready], None],
    admin_token_file: Path | None,
    demo: bool,
) -> None:
    async with open_database(settings, url) as db:
        applied = await migrate(db)
        if applied:
            log.info("applied migrations: %s", ", ".join(f"{m.version:04d}" for m in applied))
        token = None
        if admin_token_file is not None:
            token = await ensure_admin_token(db, admin_token_file)
        # Leases still live under our id were left by our previous run, which died (its lock
        # on the identity is gone): ours again now, under a new epoch that fences its writes.
        reclaimed = await reclaim_leases(db, worker_id, settings.lease_ttl_s)
        if reclaimed:
            log.info(
                "worker %s took back %d shard leases left by its previous run",
                worker_id,
                len(reclaimed),
            )
        options = EngineOptions.from_settings(settings, worker_id=worker_id)
        demo_model: contextlib.AbstractAsyncContextManager[DemoModel | None] = (
            open_demo_model(db, os.environ) if demo else contextlib.nullcontext()
        )
        # The internal link listens before the engine starts (its URL goes with the worker's
        # row) and stops after it (peers asking meanwhile are told NotOwner).
        async with (
            demo_model as model,
            open_link(settings, db, worker_id) as link,
            open_engine(db, link.engine_options(options), peers=link.client) as engine,
            trio.open_nursery() as nursery,
        ):
            link.attach(engine)
            app = create_app(settings, db, engine)
            urls: list[str] = await nursery.start(
                lambda task_status: serve(
                    app,
                    settings,
                    host=settings.host,
                    port=settings.port,
                    shutdown_trigger=shutdown.wait,
                    listen_fd=settings.listen_fd,  # a parent's socket (chatd.fleet), or none
                    task_status=task_status,
                )
            )
            on_ready(Ready(urls=urls, admin_token=token, demo_model=model, worker_id=worker_id))
            log.info("worker %s owns %d shards", worker_id, len(engine.supervisor.fences))


async def ensure_admin_token(db: Database, path: Path) -> str:
    """A stable admin token for local use: reuse the one in ``path`` while it still works.

    Only the token's hash is in the database, so the secret is kept in a file only its owner
    can read; a stale or missing file gets a fresh token.
    """
    file = trio.Path(path)
    if await file.is_file():
        secret = (await file.read_text()).strip()
        user = await users.authenticate(db, secret)
        if user is not None and user.is_admin:
            return secret
    user = await users.get_user_by_name(db, DEV_ADMIN_USER)
    if user is None:
        user = await users.create_user(db, DEV_ADMIN_USER, is_admin=True)
    elif not user.is_admin:
        raise StartupError(
            f"user {DEV_ADMIN_USER!r} exists without admin rights, so no admin token can be "
            "made for it: create one with `chatd token create --user NAME --admin`"
        )
    _token, secret = await users.create_api_token(db, user.id, label="make run")
    await file.parent.mkdir(parents=True, exist_ok=True)
    await file.touch(mode=0o600)
    await file.chmod(0o600)
    await file.write_text(secret + "\n")
    return secret


async def register_default_model(
    db: Database,
    *,
    base_url: str,
    kind: ProviderKind = "openai-compatible",
    api_key: str = "unused",
    model: str = "fake-model",
    context_limit: int = 128_000,
) -> None:
    """Add a provider and make a model config on it the default: the demo's and the tests'
    way of pointing chatd at a (fake) model server."""
    provider = await providers.create_provider(
        db, name=f"{kind}-{base_url}"[:100], kind=kind, base_url=base_url, api_key=api_key
    )
    await providers.create_model_config(
        db,
        provider_id=provider.id,
        name=f"{model}-{provider.id}"[:100],
        model=model,
        context_limit=context_limit,
        is_default=True,
    )
