"""The end of a run: the JSON summary, the table printed for a person, the progress line.

Pure functions of what the run recorded, so they are tested without a server.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from datetime import UTC, datetime
from typing import Any

from chatd.scaletest.driver import RunResult, ServerSample
from chatd.scaletest.prometheus import total
from chatd.scaletest.stats import Distribution

PHASES = ("create", "accept", "first_output", "overhead_first_output", "turn")
_PHASE_LABELS = {
    "create": "chat creation (POST /chats)",
    "accept": "message accepted (POST /messages)",
    "first_output": "first output (first message_part)",
    "overhead_first_output": "engine overhead on first output",
    "turn": "end of turn (back to waiting)",
}


def summary(result: RunResult) -> dict[str, Any]:
    """The JSON summary (``--output``): options, latencies per phase, counts, server figures."""
    load, rec = result.load, result.recorder
    delay = load.first_chunk_delay_ms
    phases = {
        "create": Distribution.of(rec.create_ms),
        "accept": Distribution.of(rec.accept_ms),
        "first_output": Distribution.of(rec.first_output_ms),
        "overhead_first_output": Distribution.of([ms - delay for ms in rec.first_output_ms]),
        "turn": Distribution.of(rec.turn_ms),
    }
    config = dataclasses.asdict(load)
    config.pop("token")
    return {
        "run_id": load.run_id,
        "started_at": datetime.fromtimestamp(result.started_at, UTC).isoformat(),
        "config": config,
        "user": {"id": result.user.id, "name": result.user.name},
        "machine": machine(),
        "wall_s": round(result.setup_s + result.turns_s, 3),
        "setup_s": round(result.setup_s, 3),
        "turns_s": round(result.turns_s, 3),
        "timed_out": result.timed_out,
        "turns_per_s": round(rec.turns_completed / result.turns_s, 2) if result.turns_s else 0.0,
        "chats": {"planned": load.chats, "ready": rec.chats_ready},
        "turns": {
            "planned": load.planned_turns,
            "completed": rec.turns_completed,
            "failed": rec.turns_failed,
            "arrivals_missed": rec.arrivals_missed,
        },
        "phases": {name: dataclasses.asdict(d) for name, d in phases.items()},
        "errors": dict(sorted(rec.errors.items())),
        "error_samples": rec.error_samples,
        "retries": {"http": result.http_retries, "provider": rec.provider_retries},
        "events": dict(sorted(rec.events.items())),
        "server": server_figures(result),
    }


def server_figures(result: RunResult) -> dict[str, Any] | None:
    """CPU, memory and database work of the server, from its ``/metrics`` samples.

    The turn phase runs from the end of setup to the end; per-turn figures divide its deltas
    by the turns this run completed. Memory per chat is the growth of the server's RSS over
    setup (each chat created, its actor active and its stream open) divided by the chats.
    """
    before, after_setup, after = result.before, result.after_setup, result.after
    if before is None or after_setup is None or after is None:
        return None
    turns = max(result.recorder.turns_completed, 1)
    chats = max(result.recorder.chats_ready, 1)

    def delta(name: str, start: ServerSample = after_setup) -> float | None:
        end_value, start_value = total(after.metrics, name), total(start.metrics, name)
        if end_value is None or start_value is None:
            return None
        return end_value - start_value

    def per_turn(name: str, scale: float = 1.0) -> float | None:
        value = delta(name)
        return None if value is None else round(value * scale / turns, 3)

    rss_before = before.metrics.get("process_resident_memory_bytes")
    rss_ready = after_setup.metrics.get("process_resident_memory_bytes")
    cpu = delta("process_cpu_seconds_total")
    setup_cpu = delta("process_cpu_seconds_total", before)
    return {
        "cpu_s": None if cpu is None else round(cpu, 3),
        "cpu_s_with_setup": None if setup_cpu is None else round(setup_cpu, 3),
        "cpu_ms_per_turn": per_turn("process_cpu_seconds_total", 1000.0),
        "cpu_share_of_one_core": None
        if cpu is None or not result.turns_s
        else round(cpu / result.turns_s, 3),
        "peak_rss_bytes": result.peak_rss_bytes,
        "rss_before_bytes": rss_before,
        "rss_per_chat_bytes": None
        if rss_before is None or rss_ready is None
        else round((rss_ready - rss_before) / chats),
        "turns": delta("chatd_turns_total"),
        "db_transactions_per_turn": per_turn("chatd_db_transactions_total"),
        "db_statements_per_turn": per_turn("chatd_db_statements_total"),
        "retries": delta("chatd_retries_total", before),
        "errors": delta("chatd_errors_total", before),
    }


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:  # noqa: PTH123
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _memory_gib() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None
    return round(pages * size / 2**30, 1)


def table(report: dict[str, Any]) -> str:
    """The summary for a person: latencies per phase, then counts and server figures."""
    turns, config = report["turns"], report["config"]
    lines = [
        f"chatd scaletest chat · run {report['run_id']}: {config['chats']} chats x "
        f"{config['turns']} turns, {config['chunks']} chunks, "
        f"{config['first_chunk_delay_ms']:g} ms to first chunk"
        + (f", open loop at {config['rate']:g} turns/s" if config["rate"] else ""),
        "",
        f"{'phase':<36} {'count':>7} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'max ms':>9}",
    ]
    for name in PHASES:
        d = report["phases"][name]
        lines.append(
            f"{_PHASE_LABELS[name]:<36} {d['count']:>7} {d['p50_ms']:>9.1f} "
            f"{d['p90_ms']:>9.1f} {d['p99_ms']:>9.1f} {d['max_ms']:>9.1f}"
        )
    errors = ", ".join(f"{k} {v}" for k, v in report["errors"].items()) or "none"
    lines += [
        "",
        f"chats run by user {report['user']['name']} (id {report['user']['id']})",
        f"turns: {turns['completed']} of {turns['planned']} completed, {turns['failed']} failed"
        + (f", {turns['arrivals_missed']} arrivals missed" if turns["arrivals_missed"] else "")
        + f"; {report['turns_per_s']:g} turns/s over {report['turns_s']:.1f} s "
        f"(setup {report['setup_s']:.1f} s)",
        f"errors: {errors}",
        f"retries: {report['retries']['http']} HTTP, {report['retries']['provider']} provider",
        "events: " + ", ".join(f"{k} {v}" for k, v in report["events"].items()),
    ]
    server = report["server"]
    if server is None:
        lines.append("server: no /metrics figures (not served, or the token may not read them)")
    else:
        lines.append(
            f"server: {_num(server['cpu_s'])} CPU s over the turns "
            f"({_num(server['cpu_ms_per_turn'])} ms per turn), "
            f"peak RSS {_mib(server['peak_rss_bytes'])}, "
            f"{_kib(server['rss_per_chat_bytes'])} per chat with an open stream; "
            f"per turn {_num(server['db_transactions_per_turn'])} DB transactions, "
            f"{_num(server['db_statements_per_turn'])} statements"
        )
    for sample in report["error_samples"]:
        lines.append(f"  e.g. {sample}")
    return "\n".join(lines)


def progress_line(
    *, phase: str, ready: int, chats: int, done: int, planned: int, errors: int, rate: float
) -> str:
    if phase == "setup":
        return f"setup  {ready}/{chats} chats ready  errors {errors}"
    width = 30
    filled = width * done // planned if planned else width
    bar = "#" * filled + "." * (width - filled)
    return f"turns [{bar}] {done}/{planned}  errors {errors}  {rate:,.0f} turns/s"


def _num(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def _mib(value: float | None) -> str:
    return "?" if value is None else f"{value / 2**20:.0f} MiB"


def _kib(value: float | None) -> str:
    return "?" if value is None else f"{value / 2**10:.1f} KiB"
