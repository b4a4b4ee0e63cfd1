"""Throughput and latency of a whole chatd server across shard counts and concurrent chats.

    .venv/bin/python -m benchmarks.sweep                       # the grid (make bench)
    .venv/bin/python -m benchmarks.sweep --shards 1 64 --chats 100 1000
    .venv/bin/python -m benchmarks.sweep --headline --open-loop
    .venv/bin/python -m benchmarks.sweep --render-only         # table and charts again

Results go to a scratch folder, ``.chatd/bench``, unless ``--out-dir`` names another one
(``--out-dir benchmarks/results`` updates the committed results the README quotes).

Starts chatd's embedded PostgreSQL (fsync off) in a temporary directory. Each configuration
gets a fresh database (the shard count is fixed per deployment), a fresh ``chatd serve`` with
``CHATD_SHARD_COUNT``, a fresh ``chatd fake-llm``, and ``chatd scaletest chat`` as the client,
each in its own process on this machine, so the client's CPU competes with the server's (the
figures are a floor for the server). Each run's JSON summary goes to the output directory,
then ``sweep.md`` and two PNG charts are rendered from every JSON there.

Exit status: 0 when every run produced a summary (errors inside runs are results, shown in the
table), 1 when a run failed outright (server did not start, driver crashed or overran).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks import charts
from benchmarks.report import (
    DEFAULT_SHARDS,
    HEADLINE_CHATS,
    HEADLINE_TURNS,
    OPEN_LOOP_CHATS,
    OPEN_LOOP_TARGET_S,
    Result,
    RunSpec,
    completed,
    grid,
    headline_spec,
    machine_line,
    markdown,
    max_closed_loop_rate,
    open_loop_duration_s,
    open_loop_spec,
    progress_line,
)
from chatd.scaletest.report import machine
from chatd.store.embedded import EmbeddedPostgres

RESULTS_DIR = Path(__file__).parent / "results"
# Where a run goes unless --out-dir names another folder: a scratch one (git ignores .chatd/),
# so that trying the sweep never rewrites the committed results in RESULTS_DIR.
SCRATCH_DIR = Path(__file__).parent.parent / ".chatd" / "bench"
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0  # SIGTERM, then SIGKILL: the server closes every WebSocket first
DRIVER_GRACE_S = 120.0  # past the driver's own --timeout-s before it is killed


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    out_dir: Path
    timeout_s: float
    ramp_s: float
    chunks: int
    first_chunk_delay_ms: float
    chunk_interval_ms: float
    server_env: dict[str, str]
    keep_logs: bool = False


class RunFailed(Exception):
    """A configuration failed outright; the message says which step and why. ``summary`` is the
    driver's, when it wrote one all the same (the server died under load)."""

    def __init__(self, message: str, summary: Result | None = None) -> None:
        super().__init__(message)
        self.summary = summary


# -- processes -----------------------------------------------------------------------------


def chatd_command() -> list[str]:
    """The ``chatd`` of this interpreter's environment (the venv's console script)."""
    script = Path(sys.executable).parent / "chatd"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "chatd"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 1) -> str:
    """The end of a child's log, to say why it failed: ``": <last line>"``, or nothing."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    tail = " | ".join(line.strip() for line in text[-lines:])[-300:]
    return f": {tail}" if tail else ""


def stop(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM (a graceful stop), then SIGKILL after ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def started(
    argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process logging to ``log_path``, stopped on exit.

    Its own session: a Ctrl-C at the terminal reaches only the sweep, which then stops its
    children in order instead of them dying mid-write.
    """
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            yield proc
        finally:
            stop(proc)


def wait_until_ready(proc: subprocess.Popen[bytes], probe: str, log: Path, what: str) -> None:
    """Poll until ``probe`` (an ``http://`` URL answering 200, or ``tcp://host:port``) succeeds;
    fail early when the process exits, and after STARTUP_TIMEOUT_S."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RunFailed(f"{what} exited with status {proc.returncode}{log_tail(log)}")
        if _probe(probe):
            return
        if time.monotonic() > deadline:
            raise RunFailed(f"{what} not ready after {STARTUP_TIMEOUT_S:g} s{log_tail(log)}")
        time.sleep(0.2)


def _probe(target: str) -> bool:
    if target.startswith("tcp://"):
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return True
        except OSError:
            return False
    try:
        with urllib.request.urlopen(target, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


# -- the database --------------------------------------------------------------------------


async def _admin(url: str, *statements: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        for sql in statements:
            await conn.execute(sql)
        version: str = await conn.fetchval("SHOW server_version")
        return version
    finally:
        await conn.close()


def database_name(spec: RunSpec) -> str:
    return "".join(c if c.isalnum() else "_" for c in spec.name)


def postgres_version(pg: EmbeddedPostgres) -> str:
    return asyncio.run(_admin(pg.url_for("postgres"))).split()[0]


@contextlib.contextmanager
def fresh_database(pg: EmbeddedPostgres, name: str) -> Iterator[str]:
    """A new database for one configuration, dropped afterwards to keep the disk small."""
    admin = pg.url_for("postgres")
    asyncio.run(_admin(admin, f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"'))
    try:
        yield pg.url_for(name)
    finally:
        asyncio.run(_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- one configuration ---------------------------------------------------------------------


def admin_token(chatd: list[str], env: dict[str, str], log: Path) -> str:
    """``chatd token create --init`` migrates the fresh database and prints the secret."""
    argv = [*chatd, "token", "create", "--init", "--user", "bench", "--admin", "--label", "sweep"]
    try:
        done = subprocess.run(argv, env=env, capture_output=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        raise RunFailed("chatd token create did not finish in 120 s") from None
    log.write_bytes(done.stdout + done.stderr)
    lines = done.stdout.decode().split()
    if done.returncode != 0 or not lines:
        raise RunFailed(f"chatd token create failed{log_tail(log)}")
    return lines[-1]


def run_driver(argv: list[str], env: dict[str, str], log: Path, bound_s: float) -> int:
    """The load driver in the foreground; killed if it outlives ``bound_s``."""
    with started(argv, log, env) as proc:
        try:
            return proc.wait(bound_s)
        except subprocess.TimeoutExpired:
            stop(proc, timeout_s=10)
            raise RunFailed(f"driver killed after {bound_s:g} s{log_tail(log)}") from None


def run_one(
    spec: RunSpec, pg: EmbeddedPostgres, chatd: list[str], options: Options, logs: Path
) -> tuple[Result | None, int | None]:
    """Server, fake LLM and driver for one configuration; the driver's summary and status."""
    name = spec.name
    with fresh_database(pg, database_name(spec)) as url:
        env = {**os.environ, "CHATD_DATABASE_URL": url, "CHATD_HOME": str(logs / "home")}
        token = admin_token(chatd, env, logs / f"{name}.token.log")
        server_env = {
            **env,
            # One admin drives thousands of chats, each with its stream: the per-user limits
            # (admins included) would refuse most of them, so they are off; --server-env can
            # still set them to measure their cost.
            "CHATD_MAX_RUNNING_CHATS_PER_USER": "0",
            "CHATD_MAX_WEBSOCKETS_PER_USER": "0",
            **options.server_env,
            "CHATD_SHARD_COUNT": str(spec.shards),
        }
        llm_port, port = free_port(), free_port()
        # The fake LLM's defaults and the driver's markers say the same reply shape.
        reply_shape = [
            *("--chunks", str(options.chunks)),
            *("--first-chunk-delay-ms", f"{options.first_chunk_delay_ms:g}"),
            *("--chunk-interval-ms", f"{options.chunk_interval_ms:g}"),
        ]
        llm_argv = [
            *chatd,
            "fake-llm",
            "--host",
            HOST,
            "--port",
            str(llm_port),
            *reply_shape,
        ]
        serve_argv = [*chatd, "serve", "--host", HOST, "--port", str(port)]
        if spec.workers > 1:
            serve_argv += ["--workers", str(spec.workers)]
        llm_log, server_log = logs / f"{name}.llm.log", logs / f"{name}.server.log"
        with (
            started(llm_argv, llm_log) as llm,
            started(serve_argv, server_log, server_env) as server,
        ):
            wait_until_ready(llm, f"tcp://{HOST}:{llm_port}", llm_log, "chatd fake-llm")
            wait_until_ready(server, f"http://{HOST}:{port}/healthz", server_log, "chatd serve")
            output = logs / f"{name}.summary.json"
            output.unlink(missing_ok=True)
            driver_argv = [
                *chatd,
                "scaletest",
                "chat",
                "--url",
                f"http://{HOST}:{port}",
                "--chats",
                str(spec.chats),
                "--turns",
                str(spec.turns),
                "--llm-url",
                f"http://{HOST}:{llm_port}",
                *reply_shape,
                "--run-id",
                name,
                "--output",
                str(output),
                "--timeout-s",
                f"{options.timeout_s:g}",
                "--no-progress",
            ]
            if spec.rate is not None:
                driver_argv += ["--rate", f"{spec.rate:g}"]
            if options.ramp_s:
                driver_argv += ["--ramp-s", f"{options.ramp_s:g}"]
            driver_log = logs / f"{name}.driver.log"
            cpu_before, machine_before = tree_cpu_s(server.pid), machine_cpu_s()
            code = run_driver(
                driver_argv,
                {**env, "CHATD_TOKEN": token},
                driver_log,
                options.timeout_s + DRIVER_GRACE_S,
            )
            server_cpu_s = tree_cpu_s(server.pid) - cpu_before
            machine_after = machine_cpu_s()
            died = server.poll()  # before stopping it: a server that died under load is news
        summary: Result | None = json.loads(output.read_text()) if output.is_file() else None
        if died is not None:
            raise RunFailed(
                f"chatd serve exited with status {died} during the run{log_tail(server_log)}",
                summary,
            )
        if summary is None:
            raise RunFailed(
                f"driver exited with status {code} and no summary{log_tail(driver_log)}"
            )
        turns = summary.get("turns", {}).get("completed")
        if turns:
            summary["server_tree"] = {
                "cpu_s": round(server_cpu_s, 3),
                "cpu_ms_per_turn": round(server_cpu_s * 1000 / turns, 2),
            }
            busy_s, all_s = (
                after - before for after, before in zip(machine_after, machine_before, strict=True)
            )
            summary["machine_load"] = {
                # Every process of the machine: server, driver, fake LLM and PostgreSQL.
                "busy_pct": round(100 * busy_s / all_s, 1) if all_s else None,
                "cpu_ms_per_turn": round(busy_s * 1000 / turns, 2),
            }
        return summary, code


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its live descendants (a
    ``--workers`` parent and its workers), from /proc; a process gone meanwhile counts 0."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores, from /proc/stat: the
    busy share of a run says whether the machine, not the server, was the limit."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    idle = fields[3] + fields[4]
    return (total - idle) / tick, total / tick


def record(
    spec: RunSpec,
    summary: Result | None,
    *,
    exit_code: int | None,
    failure: str | None,
    elapsed_s: float,
    machine: dict[str, Any],
) -> Result:
    """The driver's summary with a ``sweep`` section: what was run, where, and how it ended."""
    result: Result = dict(summary or {})
    result["sweep"] = {
        "name": spec.name,
        "kind": spec.kind,
        "shards": spec.shards,
        "workers": spec.workers,
        "chats": spec.chats,
        "turns": spec.turns,
        "rate": spec.rate,
        "driver_exit_code": exit_code,
        "failure": failure,
        "elapsed_s": round(elapsed_s, 1),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_ms_per_turn": (result.get("server_tree") or {}).get("cpu_ms_per_turn"),
        "machine_busy_pct": (result.get("machine_load") or {}).get("busy_pct"),
        "machine_cpu_ms_per_turn": (result.get("machine_load") or {}).get("cpu_ms_per_turn"),
        "machine": machine,
    }
    return result


def save(result: Result, out_dir: Path) -> Path:
    path = out_dir / f"{result['sweep']['name']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


# -- the sweep -----------------------------------------------------------------------------


def load_results(out_dir: Path) -> list[Result]:
    """Every run summary in ``out_dir`` the sweep wrote (files with a ``sweep`` section)."""
    results = []
    for path in sorted(out_dir.glob("*.json")):
        with contextlib.suppress(ValueError):
            data = json.loads(path.read_text())
            if isinstance(data, dict) and isinstance(data.get("sweep"), dict):
                results.append(data)
    return results


def render(out_dir: Path) -> None:
    """``sweep.md`` and the charts from every summary in ``out_dir``."""
    results = load_results(out_dir)
    latest = max(results, key=lambda r: r["sweep"].get("finished_at", ""), default=None)
    machine = None if latest is None else latest["sweep"].get("machine")
    table = out_dir / "sweep.md"
    table.write_text(markdown(results, machine))
    print(f"\n{len(results)} runs in {table}")
    delays = {r["config"]["first_chunk_delay_ms"] for r in results if completed(r)}
    try:
        drawn = charts.draw(results, out_dir, delays.pop() if len(delays) == 1 else None)
    except charts.ChartsUnavailable as exc:
        print(f"no charts: {exc}")
    else:
        print("charts: " + ", ".join(str(p) for p in drawn))


class Sweep:
    """One PostgreSQL server for the whole sweep; a fresh database and processes per run."""

    def __init__(self, pg: EmbeddedPostgres, options: Options, logs: Path) -> None:
        self.pg, self.options, self.logs = pg, options, logs
        self.chatd = chatd_command()
        self.machine = {**machine(), "postgresql": postgres_version(pg)}
        self.runs = 0
        self.failures = 0

    def run(self, spec: RunSpec) -> None:
        self.runs += 1
        print(f"[{self.runs}] {spec.name} ... ", end="", flush=True)
        t0 = time.monotonic()
        summary, code, failure = None, None, None
        try:
            summary, code = run_one(spec, self.pg, self.chatd, self.options, self.logs)
        except RunFailed as exc:
            failure, summary = str(exc), exc.summary
            self.failures += 1
        elapsed = time.monotonic() - t0
        result = record(
            spec, summary, exit_code=code, failure=failure, elapsed_s=elapsed, machine=self.machine
        )
        save(result, self.options.out_dir)
        print(progress_line(result, elapsed), flush=True)

    def run_open_loop(self, max_rate: float | None, workers: int = 1) -> None:
        """Sized from ``max_rate``, or from the results so far (the grid and headline runs of
        this sweep included) with as many workers."""
        found = max_closed_loop_rate(load_results(self.options.out_dir), workers=workers)
        rate = max_rate or found
        if rate is None:
            print(f"open loop skipped: no closed-loop run at {DEFAULT_SHARDS} shards to size it")
            self.failures += 1
            return
        spec = open_loop_spec(rate, workers=workers)
        print(
            f"open loop at half of {rate:,.1f} turns/s: {spec.rate:g} turns/s, "
            f"{spec.chats:,} chats x {spec.turns} turns, "
            f"about {open_loop_duration_s(spec) or 0:.0f} s after setup"
        )
        self.run(spec)


def run_all(
    specs: list[RunSpec],
    options: Options,
    *,
    open_loop: bool,
    max_rate: float | None,
    open_loop_workers: int = 1,
) -> bool:
    """Every configuration in order, then the open-loop run; True when none failed."""
    work = Path(tempfile.mkdtemp(prefix="chatd-sweep-"))
    work.chmod(0o711)  # PostgreSQL runs as the postgres user when this runs as root
    logs = work / "logs"
    logs.mkdir()
    sweep: Sweep | None = None
    try:
        with EmbeddedPostgres(work / "pg", durable=False, max_connections=100) as pg:
            sweep = Sweep(pg, options, logs)
            print(f"machine: {machine_line(sweep.machine)}")
            print(
                f"runs: {len(specs) + open_loop}, each bounded by {options.timeout_s:g} s "
                f"(the driver is killed {DRIVER_GRACE_S:g} s later); logs in {logs}"
            )
            for spec in specs:
                sweep.run(spec)
            if open_loop:
                sweep.run_open_loop(max_rate, open_loop_workers)
    finally:
        shutil.rmtree(work / "pg", ignore_errors=True)
        ok = sweep is not None and sweep.failures == 0
        if ok and not options.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {logs}")
    return ok


def _positive_ints(values: Sequence[int], flag: str, parser: argparse.ArgumentParser) -> None:
    if not values or min(values) < 1:
        parser.error(f"{flag} needs numbers of at least 1")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sweep",
        description="Run chatd's load driver against fresh servers over a grid of shard "
        "counts and concurrent chats, then write a markdown table and charts.",
    )
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--chats", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1],
        help="worker processes per server (chatd serve --workers); the grid runs each, and "
        "--headline / --open-loop run with the largest",
    )
    parser.add_argument("--turns", type=int, default=3, help="turns per chat in the grid")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=SCRATCH_DIR,
        help=f"where the summaries, sweep.md and the charts go (default: the scratch folder "
        f".chatd/bench; --out-dir {RESULTS_DIR.relative_to(Path(__file__).parent.parent)} "
        "updates the committed results)",
    )
    parser.add_argument(
        "--grid", action="store_true", help="run the grid (the default without other runs)"
    )
    parser.add_argument(
        "--headline",
        action="store_true",
        help=f"{HEADLINE_CHATS:,} chats x {HEADLINE_TURNS} turns at {DEFAULT_SHARDS} shards",
    )
    parser.add_argument(
        "--open-loop",
        action="store_true",
        help=f"open loop at half the maximum throughput ({OPEN_LOOP_CHATS:,} chats, "
        f"about {OPEN_LOOP_TARGET_S:g} s of turns)",
    )
    parser.add_argument(
        "--max-rate",
        type=float,
        help="the maximum throughput (turns/s) for --open-loop; default: that of the largest "
        f"closed-loop run at {DEFAULT_SHARDS} shards in --out-dir",
    )
    parser.add_argument(
        "--render-only", action="store_true", help="re-render table and charts from --out-dir"
    )
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="bound on each run")
    parser.add_argument("--ramp-s", type=float, default=0.0, help="the driver's --ramp-s")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--first-chunk-delay-ms", type=float, default=50.0)
    parser.add_argument("--chunk-interval-ms", type=float, default=0.0)
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep every process's log (kept anyway when a run fails)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="CHATD_NAME=VALUE",
        help="an extra setting for every chatd serve (repeatable)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"results go to {out_dir} (--out-dir)", flush=True)
    if args.render_only:
        render(out_dir)
        return 0
    _positive_ints(args.shards, "--shards", parser)
    _positive_ints(args.chats, "--chats", parser)
    _positive_ints(args.workers, "--workers", parser)
    _positive_ints([args.turns], "--turns", parser)
    if not args.timeout_s > 0:
        parser.error("--timeout-s must be greater than 0")
    if args.max_rate is not None and not args.max_rate > 0:
        parser.error("--max-rate must be greater than 0")
    server_env = dict(item.partition("=")[::2] for item in args.server_env)
    if any(not k.startswith("CHATD_") for k in server_env):
        parser.error("--server-env takes CHATD_NAME=VALUE")
    specs = []
    if args.grid or not (args.headline or args.open_loop):
        specs += grid(args.shards, args.chats, args.turns, args.workers)
    if args.headline:
        specs.append(headline_spec(max(args.workers)))
    options = Options(
        out_dir=out_dir,
        timeout_s=args.timeout_s,
        ramp_s=args.ramp_s,
        chunks=args.chunks,
        first_chunk_delay_ms=args.first_chunk_delay_ms,
        chunk_interval_ms=args.chunk_interval_ms,
        server_env=server_env,
        keep_logs=args.keep_logs,
    )
    if (
        args.open_loop
        and args.max_rate is None
        and not any(s.shards == DEFAULT_SHARDS for s in specs)
        and max_closed_loop_rate(load_results(out_dir)) is None
    ):
        parser.error(
            f"--open-loop needs a closed-loop run at {DEFAULT_SHARDS} shards in {out_dir} "
            "(run the grid or --headline first, or with it) or --max-rate"
        )
    ok = run_all(
        specs,
        options,
        open_loop=args.open_loop,
        max_rate=args.max_rate,
        open_loop_workers=max(args.workers),
    )
    render(out_dir)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
