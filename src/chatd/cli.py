"""``chatd``: serve, migrate, and manage API tokens.

Settings come from ``CHATD_*`` environment variables, overridden by flags. A user mistake ends
in one line on stderr saying what to fix, and exit code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import trio

from chatd import __version__, fleet
from chatd.config import Settings, SettingsError
from chatd.demo import DemoError, start_message
from chatd.domain.user_name import MAX_TOKEN_LABEL_CHARS, USER_NAME_RULE, valid_user_name
from chatd.identity import IdentityError
from chatd.logs import configure_logging
from chatd.providers.fake import Scenario, serve_fake_llm
from chatd.runtime import (
    Ready,
    StartupError,
    database_url,
    listening_socket,
    open_database,
    run_server,
)
from chatd.scaletest import cli as scaletest
from chatd.store import users
from chatd.store.config_cache import ConfigCache
from chatd.store.database import Database, DatabaseUnavailable, server_location
from chatd.store.embedded import EmbeddedPostgresError
from chatd.store.errors import NotFound
from chatd.store.migrate import MigrationError, applied_versions, migrate
from chatd.store.records import ApiToken
from chatd.tuning import freeze_startup_objects, tune_for_many_connections

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A mistake the user can fix; the message says how."""


# Errors whose message tells the user what to fix: one line, exit 2, no traceback.
_USER_ERRORS = (
    CliError,
    SettingsError,
    DemoError,
    DatabaseUnavailable,
    EmbeddedPostgresError,
    IdentityError,
    MigrationError,
    StartupError,
    scaletest.ScaletestError,
    fleet.FleetError,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_USAGE
    # CHATD_LOG_LEVEL and CHATD_LOG_FORMAT (Settings checks them again below).
    configure_logging()
    try:
        settings = Settings.load(overrides=_overrides(args))
        run: Callable[[Settings, argparse.Namespace], int] = args.run
        return run(settings, args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except _USER_ERRORS as exc:
        print(f"chatd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except fleet.WorkersFailed as exc:
        print(f"chatd: error: {exc}", file=sys.stderr)
        return fleet.EXIT_WORKERS_FAILED
    except BaseExceptionGroup as group:
        # Raised inside a trio nursery, a user's mistake arrives wrapped in a group.
        mistake = _first_user_error(group)
        if mistake is None:
            raise
        print(f"chatd: error: {mistake}", file=sys.stderr)
        return EXIT_USAGE


def _first_user_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_user_error(exc)
            if found is not None:
                return found
        elif isinstance(exc, _USER_ERRORS):
            return exc
    return None


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        help="PostgreSQL URL (env CHATD_DATABASE_URL); without one, chatd runs its own server",
    )
    common.add_argument(
        "--home", type=Path, help="chatd's own files, embedded database included (CHATD_HOME)"
    )

    parser = argparse.ArgumentParser(prog="chatd", description="A chat engine for LLM agents.")
    parser.add_argument("--version", action="version", version=f"chatd {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = commands.add_parser(
        "serve", parents=[common], help="migrate the database and serve the HTTP API"
    )
    serve.add_argument("--host", help="address to listen on (CHATD_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (CHATD_PORT, default 8080)")
    serve.add_argument(
        "--admin-token-file",
        type=Path,
        help="keep a local admin token in this file (made if missing) and print it on start",
    )
    serve.add_argument(
        "--demo",
        action="store_true",
        help="make a model answer out of the box (what `make run` does): chatd's fake LLM in "
        "this process, or OpenAI / Anthropic when OPENAI_API_KEY / ANTHROPIC_API_KEY is set",
    )
    serve.add_argument(
        "--workers",
        help="worker processes serving the one port (CHATD_WORKERS, default 1; auto: one per "
        "core); above 1, a parent process starts them, restarts one that crashes (within "
        "CHATD_WORKER_RESTART_LIMIT restarts per CHATD_WORKER_RESTART_WINDOW_S) and stops them "
        "on SIGINT/SIGTERM",
    )
    serve.set_defaults(run=_cmd_serve)

    migrate_cmd = commands.add_parser(
        "migrate", parents=[common], help="apply pending database migrations"
    )
    migrate_cmd.set_defaults(run=_cmd_migrate)

    token = commands.add_parser("token", help="manage API tokens")
    token_commands = token.add_subparsers(title="token commands", metavar="COMMAND")
    create = token_commands.add_parser(
        "create", parents=[common], help="create an API token (and its user if new)"
    )
    create.add_argument("--user", required=True, help="user name (created if it does not exist)")
    create.add_argument("--admin", action="store_true", help="the user may use admin routes")
    create.add_argument("--label", default="", help="a note to recognise the token by")
    create.add_argument(
        "--init",
        action="store_true",
        help="make a new database (embedded in --home, or the schema in --database-url) when "
        "there is none yet; without it, a missing one is an error",
    )
    create.set_defaults(run=_cmd_token_create)
    listing = token_commands.add_parser(
        "list", parents=[common], help="list API tokens (never their secrets)"
    )
    listing.add_argument("--user", help="only this user's tokens")
    listing.set_defaults(run=_cmd_token_list)
    revoke = token_commands.add_parser(
        "revoke", parents=[common], help="revoke an API token (running servers refuse it at once)"
    )
    revoke.add_argument("id", help="the token's id (chatd token list)")
    revoke.set_defaults(run=_cmd_token_revoke)

    fake = commands.add_parser(
        "fake-llm", help="serve a fake OpenAI + Anthropic API (tests, demo, load tests)"
    )
    fake.add_argument("--host", default="127.0.0.1", help="address to listen on")
    fake.add_argument("--port", type=int, default=8090, help="port to listen on (0: any free)")
    fake.add_argument(
        "--chunks", type=_non_negative(int, "an integer"), default=8, help="text chunks per reply"
    )
    fake.add_argument(
        "--first-chunk-delay-ms",
        type=_non_negative(float, "a number"),
        default=0.0,
        help="time to first chunk",
    )
    fake.add_argument(
        "--chunk-interval-ms",
        type=_non_negative(float, "a number"),
        default=0.0,
        help="delay between chunks",
    )
    fake.add_argument("--api-key", help="answer 401 unless requests carry this API key")
    fake.set_defaults(run=_cmd_fake_llm)

    scaletest.add_parser(commands, parents=[])
    return parser


def _non_negative(kind: Callable[[str], float], noun: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = -1
        if not 0 <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun} >= 0")
        return value

    return parse


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = {
        "database_url": "database_url",
        "home": "home",
        "host": "host",
        "port": "port",
        "workers": "workers",
    }
    return {field: getattr(args, arg, None) for arg, field in names.items()}


# -- commands --------------------------------------------------------------------------------


def _cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    token_file: Path | None = args.admin_token_file
    if settings.worker_count() > 1:
        return _cmd_serve_workers(settings, args)
    # Started by `chatd serve --workers` (chatd.fleet): readiness goes to the parent, which
    # prints the one start message, and the parent's end ends this process too.
    control = fleet.parent_control(settings)
    with contextlib.ExitStack() as stack:
        listener: socket.socket | None = None
        if settings.listen_fd < 0:
            # Bound before anything starts (the embedded PostgreSQL, the migrations): a taken
            # port is one line at once. The server takes a duplicate over (and closes it when
            # it stops); this one is closed as soon as it serves, so that a stopping server
            # refuses new connections instead of leaving them queued.
            listener = stack.enter_context(listening_socket(settings))
            settings = settings.replace(listen_fd=os.dup(listener.fileno()))

        def on_ready(ready: Ready) -> None:
            freeze_startup_objects()
            if listener is not None:
                listener.close()
            if control is not None:
                fleet.report_ready(control, ready.worker_id)
                return
            _print_start(ready, token_file)

        async def serve_until_signal(url: str) -> None:
            shutdown = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_shutdown_on_signal, shutdown, nursery.cancel_scope)
                if control is not None:
                    nursery.start_soon(
                        fleet.stop_with_parent,
                        control,
                        shutdown,
                        nursery.cancel_scope,
                        settings.worker_stop_timeout_s,
                    )
                await run_server(
                    settings,
                    url,
                    shutdown=shutdown,
                    on_ready=on_ready,
                    admin_token_file=token_file,
                    demo=args.demo,
                )
                nursery.cancel_scope.cancel()

        tune_for_many_connections()
        with database_url(settings) as url:
            trio.run(serve_until_signal, url)
    return 0


def _print_start(ready: Ready, token_file: Path | None) -> None:
    """The start message on stdout, then each warning (no model config, ...) as its own line."""
    print(start_message(ready.urls, ready.admin_token, token_file, ready.demo_model), flush=True)
    for warning in ready.warnings:
        print(f"warning: {warning}", flush=True)


def _cmd_serve_workers(settings: Settings, args: argparse.Namespace) -> int:
    """The parent of ``--workers N`` (chatd.fleet): the socket is bound before the embedded
    PostgreSQL starts, so a taken port fails at once."""
    token_file: Path | None = args.admin_token_file
    fleet.check_settings(settings)

    def on_ready(ready: Ready) -> None:
        _print_start(ready, token_file)

    with listening_socket(settings) as listener, database_url(settings) as url:
        trio.run(
            functools.partial(
                fleet.serve_workers,
                settings,
                url,
                listener,
                on_ready=on_ready,
                admin_token_file=token_file,
                demo=args.demo,
            )
        )
    return 0


async def _shutdown_on_signal(shutdown: trio.Event, everything: trio.CancelScope) -> None:
    """First SIGINT/SIGTERM: stop gracefully. A second one: cancel everything now."""
    log = logging.getLogger("chatd")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if shutdown.is_set():
                log.warning("%s received again: stopping now", name)
                everything.cancel()
                return
            log.info("%s received: shutting down (again to force)", name)
            shutdown.set()


def _cmd_fake_llm(_settings: Settings, args: argparse.Namespace) -> int:
    defaults = Scenario(
        chunks=args.chunks,
        first_chunk_delay_ms=args.first_chunk_delay_ms,
        chunk_interval_ms=args.chunk_interval_ms,
    )

    def on_ready(url: str) -> None:
        print(f"fake LLM serving on {url}", flush=True)

    serve = functools.partial(
        serve_fake_llm,
        args.host,
        args.port,
        defaults=defaults,
        expected_api_key=args.api_key,
        on_ready=on_ready,
    )
    try:
        trio.run(serve)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CliError(f"cannot listen on {args.host}:{args.port}: {reason.lower()}") from None
    return 0


def _cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    async def run(url: str) -> None:
        async with open_database(settings, url) as db:
            applied = await migrate(db)
        if applied:
            for m in applied:
                print(f"applied {m.version:04d}_{m.name}")
        else:
            print("the database is up to date")

    with database_url(settings) as url:
        trio.run(run, url)
    return 0


@contextlib.contextmanager
def _existing_database(settings: Settings, *, init: bool = False) -> Iterator[str]:
    """The database a token command works on, said in one line on stderr; a missing one (no
    embedded database in the home: run from another folder) is refused unless ``init``."""
    if settings.uses_embedded_database:
        home = settings.home.absolute()
        if not (home / "pgdata" / "PG_VERSION").is_file() and not init:
            raise CliError(
                f"no chatd database in {home} (the home, --home or CHATD_HOME, default ./.chatd):"
                " run this where chatd serves (`make run` keeps its home in the clone's .chatd),"
                " or name that home with --home DIR"
                + (", or pass --init to make a new one here" if _can_init() else "")
            )
        print(f"chatd: using the embedded database of home {home}", file=sys.stderr)
    else:
        where = server_location(settings.database_url)
        name = urlsplit(settings.database_url).path.lstrip("/") or "(the user's default)"
        print(f"chatd: using database {name} at {where} (CHATD_DATABASE_URL)", file=sys.stderr)
    with database_url(settings) as url:
        yield url


def _can_init() -> bool:
    return sys.argv[1:3] == ["token", "create"]


async def _check_schema(db: Database, *, init: bool) -> None:
    if init:
        await migrate(db)
    elif not await applied_versions(db):
        raise CliError(
            "this database has no chatd tables: name chatd's database with --database-url or "
            "CHATD_DATABASE_URL, or pass --init (token create) or run `chatd migrate` to set it up"
        )
    else:
        await migrate(db)  # pending migrations of an existing chatd database, as serve does


def _cmd_token_create(settings: Settings, args: argparse.Namespace) -> int:
    name: str = args.user
    if not valid_user_name(name):
        raise CliError(f"--user {name!r} is not a valid user name: use {USER_NAME_RULE}")
    if len(args.label) > MAX_TOKEN_LABEL_CHARS:
        raise CliError(
            f"--label is {len(args.label)} characters long: at most {MAX_TOKEN_LABEL_CHARS}"
        )

    async def run(url: str) -> str:
        async with open_database(settings, url) as db:
            await _check_schema(db, init=args.init)
            user = await users.get_user_by_name(db, name)
            if user is None:
                user = await users.create_user(db, name, is_admin=args.admin)
            elif args.admin and not user.is_admin:
                raise CliError(
                    f"user {name!r} exists without admin rights: drop --admin, or pick a new name"
                )
            _token, secret = await users.create_api_token(db, user.id, label=args.label)
            return secret

    with _existing_database(settings, init=args.init) as url:
        secret = trio.run(run, url)
    print(secret)
    return 0


def _cmd_token_list(settings: Settings, args: argparse.Namespace) -> int:
    async def run(url: str) -> list[tuple[ApiToken, str]]:
        async with open_database(settings, url) as db:
            await _check_schema(db, init=False)
            if args.user is not None and await users.get_user_by_name(db, args.user) is None:
                raise CliError(f"--user {args.user!r}: no such user")
            return await users.list_api_tokens_with_users(db, user_name=args.user)

    with _existing_database(settings) as url:
        tokens = trio.run(run, url)
    print(_token_table(tokens))
    return 0


def _token_table(tokens: list[tuple[ApiToken, str]]) -> str:
    def when(at: datetime | None) -> str:
        return "-" if at is None else at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")

    rows = [("ID", "USER", "LABEL", "CREATED", "LAST USED", "REVOKED")]
    rows += [
        (
            str(t.id),
            user,
            t.label or "-",
            when(t.created_at),
            when(t.last_used_at),
            when(t.revoked_at),
        )
        for t, user in tokens
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _cmd_token_revoke(settings: Settings, args: argparse.Namespace) -> int:
    try:
        token_id = UUID(args.id)
    except ValueError:
        raise CliError(f"{args.id!r} is not a token id: see `chatd token list`") from None

    async def run(url: str) -> ApiToken:
        async with open_database(settings, url) as db:
            await _check_schema(db, init=False)
            try:
                token = await users.revoke_api_token(db, token_id)
            except NotFound:
                raise CliError(f"no token {token_id}: see `chatd token list`") from None
            # Running servers forget the tokens they cached at once (NOTIFY), as when a token
            # is revoked through the API.
            cache = ConfigCache(db, worker_id=f"chatd-token-revoke-{os.getpid()}")
            cache.tokens_revoked()
            await cache.announce()
            return token

    with _existing_database(settings) as url:
        token = trio.run(run, url)
    print(f"revoked {token.id} (revoked at {token.revoked_at:%Y-%m-%d %H:%M:%S %Z})")
    return 0
