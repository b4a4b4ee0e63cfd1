"""``chatd scaletest chat``: the command line of the load driver."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import trio

from chatd.scaletest.driver import ChatLoadRun, SetupFailed, run_chat_load
from chatd.scaletest.report import progress_line, summary, table
from chatd.scaletest.run import DEFAULT_PROMPT, ChatLoad
from chatd.tuning import tune_for_many_connections

TOKEN_ENV = "CHATD_TOKEN"  # noqa: S105 - the name of a variable, not a secret
EXIT_RUN_ERRORS = 1
_QUIET_PROGRESS_EVERY_S = 5.0


class ScaletestError(Exception):
    """A mistake in the command line or the target; the message says what to fix."""


def add_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    scaletest = commands.add_parser("scaletest", help="load-test a running chatd over its API")
    kinds = scaletest.add_subparsers(title="load tests", metavar="TEST")
    chat = kinds.add_parser(
        "chat",
        parents=parents,
        help="chats that each stream their answers for a number of turns",
        description="Create --chats chats, follow each one's stream WebSocket, run --turns "
        "turns each (all at once, ramped, or open-loop at --rate), then print a table and "
        "write a JSON summary. Exit status: 0 no errors, 1 errors in the run, 2 bad usage.",
    )
    chat.add_argument("--url", default="http://127.0.0.1:8080", help="chatd's base URL")
    chat.add_argument(
        "--token",
        help=f"an admin API token (env {TOKEN_ENV}): it sets the run up; the chats are run by "
        "a user the run makes, scaletest-<8 hex>",
    )
    chat.add_argument("--chats", type=int, default=100, help="concurrent chats")
    chat.add_argument("--turns", type=int, default=3, help="turns per chat")
    chat.add_argument(
        "--ramp-s", type=float, default=0.0, help="spread chat starts over this many seconds"
    )
    chat.add_argument(
        "--rate",
        type=float,
        help="open loop: start this many turns per second on idle chats (chats x turns in all)",
    )
    chat.add_argument(
        "--llm-url",
        help="a fake LLM (`chatd fake-llm`) to answer; without it, one is served in-process",
    )
    chat.add_argument(
        "--llm-kind",
        choices=("openai", "anthropic"),
        default="openai",
        help="the wire format chatd uses to talk to it",
    )
    chat.add_argument("--chunks", type=int, default=20, help="text chunks per reply")
    chat.add_argument(
        "--first-chunk-delay-ms",
        type=float,
        default=50.0,
        help="the fake LLM's time to first chunk",
    )
    chat.add_argument(
        "--chunk-interval-ms", type=float, default=0.0, help="the fake LLM's delay between chunks"
    )
    chat.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text of every user message")
    chat.add_argument("--run-id", help="names the run's chats and model config (default: time)")
    chat.add_argument("--output", type=Path, help="write the JSON summary here")
    chat.add_argument(
        "--timeout-s", type=float, default=1800.0, help="bound on the whole run, in seconds"
    )
    chat.add_argument(
        "--turn-timeout-s", type=float, default=120.0, help="bound on one turn, in seconds"
    )
    chat.add_argument(
        "--http-connections", type=int, default=256, help="HTTP connections to the server"
    )
    chat.add_argument("--no-progress", action="store_true", help="no live progress on stderr")
    chat.add_argument(
        "--keep",
        action="store_true",
        help="keep the provider and model config the run adds and its user's token "
        "(removed and revoked at the end otherwise)",
    )
    chat.set_defaults(run=run_chat_command)


def load_from_args(args: argparse.Namespace) -> ChatLoad:
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise ScaletestError(
            f"no API token: pass --token or set {TOKEN_ENV} "
            "(make one with `chatd token create --user NAME --admin`)"
        )
    try:
        return ChatLoad(
            url=args.url.rstrip("/"),
            token=token,
            chats=args.chats,
            turns=args.turns,
            run_id=args.run_id or time.strftime("%Y%m%d-%H%M%S"),
            ramp_s=args.ramp_s,
            rate=args.rate,
            llm_url=args.llm_url,
            llm_kind=args.llm_kind,
            chunks=args.chunks,
            first_chunk_delay_ms=args.first_chunk_delay_ms,
            chunk_interval_ms=args.chunk_interval_ms,
            prompt=args.prompt,
            timeout_s=args.timeout_s,
            turn_timeout_s=args.turn_timeout_s,
            http_connections=args.http_connections,
            keep=args.keep,
        )
    except ValueError as exc:
        raise ScaletestError(str(exc)) from None


def run_chat_command(_settings: object, args: argparse.Namespace) -> int:
    load = load_from_args(args)
    output: Path | None = args.output
    if output is not None and not output.parent.is_dir():
        raise ScaletestError(f"--output {output}: directory {output.parent} does not exist")
    show = None if args.no_progress else _Progress()
    tune_for_many_connections()
    try:
        result = trio.run(run_chat_load, load, show)
    except* SetupFailed as failed:  # nothing was measured
        first = failed.exceptions[0]
        raise ScaletestError(f"{first} (is chatd serving at {load.url}?)") from None
    if show is not None:
        show.finish()
    report = summary(result)
    if output is not None:
        output.write_bytes(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
    print(table(report), flush=True)
    clean = (
        not report["errors"]
        and report["turns"]["completed"]
        == load.planned_turns - (report["turns"]["arrivals_missed"])
    )
    return 0 if clean else EXIT_RUN_ERRORS


class _Progress:
    """A live line on a terminal; a line every few seconds otherwise (logs, CI)."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._last_print = 0.0
        self._last_done = 0
        self._last_at = time.perf_counter()
        self._rate = 0.0

    def __call__(self, run: ChatLoadRun) -> None:
        now = time.perf_counter()
        rec = run.recorder
        done = rec.turns_completed
        if now > self._last_at:
            self._rate = (done - self._last_done) / (now - self._last_at)
        self._last_done, self._last_at = done, now
        line = progress_line(
            phase=run.phase,
            ready=rec.chats_ready,
            chats=run.load.chats,
            done=done,
            planned=run.load.planned_turns,
            errors=rec.error_count,
            rate=self._rate,
        )
        if self._tty:
            print(f"\r\x1b[2K{line}", end="", file=sys.stderr, flush=True)
        elif now - self._last_print >= _QUIET_PROGRESS_EVERY_S:
            self._last_print = now
            print(line, file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self._tty:
            print(file=sys.stderr, flush=True)
