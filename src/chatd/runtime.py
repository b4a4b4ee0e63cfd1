"""Assemble a running chatd process: database (embedded or external), migrations, web server."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio
from hypercorn.utils import repr_socket_addr

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
from chatd.web.server import hypercorn_config, listening_sockets, serve

log = logging.getLogger(__name__)

DEV_ADMIN_USER = "admin"
# A taken port is asked whether chatd holds it (GET /healthz) for this long at most.
_PORT_PROBE_TIMEOUT_S = 1.0


class StartupError(RuntimeError):
    """The process cannot start as configured; the message says what to change."""


@dataclass(frozen=True, slots=True)
class Ready:
    """What a started server tells whoever started it."""

    urls: list[str]
    admin_token: str | None
    demo_model: DemoModel | None = None  # with ``demo``: the model that answers
    worker_id: str = ""  # the identity this process serves under (a parent reports it)
    # What a newcomer must know at once (no model config: every chat would fail), one line
    # each; logged too, and printed after the start message.
    warnings: tuple[str, ...] = ()


@contextlib.contextmanager
def listening_socket(settings: Settings) -> Iterator[socket.socket]:
    """The server's socket on host:port, bound and listening, as the server would bind it
    (same options, same TCP_USER_TIMEOUT): bound before anything else starts (the embedded
    PostgreSQL, the migrations), so a taken port is one line at once (``StartupError``)."""
    config = hypercorn_config(settings, host=settings.host, port=settings.port)
    try:
        sockets = listening_sockets(config, settings)
    except OSError as exc:
        raise StartupError(cannot_listen(settings.host, settings.port, exc)) from None
    [sock] = sockets.insecure_sockets
    try:
        yield sock
    finally:
        sock.close()


def socket_url(sock: socket.socket) -> str:
    return "http://" + repr_socket_addr(sock.family, sock.getsockname())


def cannot_listen(host: str, port: int, exc: OSError) -> str:
    """Why ``host:port`` cannot be listened on, and which setting picks another, in one line."""
    if exc.errno == errno.EADDRINUSE:
        holder = "another chatd" if _answers_healthz(host, port) else "another program"
        return (
            f"port {port} on {host} is in use by {holder}; pick another with --port or "
            "CHATD_PORT (0: any free port)"
        )
    if exc.errno == errno.EACCES:
        return (
            f"port {port} on {host} needs more rights than this user has (ports below 1024 "
            "need root); pick another with --port or CHATD_PORT"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"{host} is not an address of this machine; pick another with --host or "
            "CHATD_HOST (127.0.0.1: this machine only, 0.0.0.0: every interface)"
        )
    reason = (exc.strerror or str(exc)).lower()
    if isinstance(exc, socket.gaierror):
        return f"cannot listen on {host!r}: {reason}; fix --host or CHATD_HOST"
    return f"cannot listen on {host}:{port}: {reason}; check --host/--port (CHATD_HOST/CHATD_PORT)"


def _answers_healthz(host: str, port: int) -> bool:
    """Whether what holds the port is a chatd: it answers ``GET /healthz`` with a status."""
    wildcard = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - read only
    target = wildcard.get(host, host)
    if ":" in target:
        target = f"[{target}]"
    try:
        with urllib.request.urlopen(
            f"http://{target}:{port}/healthz", timeout=_PORT_PROBE_TIMEOUT_S
        ) as response:
            body: bytes = response.read(4096)
    except urllib.error.HTTPError as exc:  # a chatd whose database is away answers 503
        body = exc.read(4096)
    except (OSError, ValueError):
        return False
    return b'"database"' in body


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
            # A worker of `serve --workers` leaves the warnings to its parent (said once).
            warnings = await model_warnings(db) if settings.parent_fd < 0 else ()
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
            for warning in warnings:
                log.warning("%s", warning)
            on_ready(
                Ready(
                    urls=urls,
                    admin_token=token,
                    demo_model=model,
                    worker_id=worker_id,
                    warnings=warnings,
                )
            )
            log.info("worker %s owns %d shards", worker_id, len(engine.supervisor.fences))


NO_MODEL_CONFIG = (
    "no model config: every chat will fail until an admin adds a provider and a model config "
    "(POST /api/v1/providers, then POST /api/v1/model-configs; see README.md), or serve with "
    "--demo for a model that answers out of the box"
)


async def model_warnings(db: Database) -> tuple[str, ...]:
    """What would make chats fail at once: no model config at all, or none is the default (a
    chat created without ``model_config_id`` uses the default)."""
    if await providers.get_default_model_config(db) is not None:
        return ()
    configs = await providers.list_model_configs(db)
    if not configs:
        return (NO_MODEL_CONFIG,)
    warning = (
        "no default model config: a chat created without model_config_id will fail; make one "
        f"of the {len(configs)} model configs the default (PATCH /api/v1/model-configs/ID "
        'with {"is_default": true})'
    )
    return (warning,)


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
