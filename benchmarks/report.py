"""The sweep's arithmetic and rendering: run names, the grid, the open-loop plan, the markdown
table and the chart series.

Pure functions of the run summaries (the JSON that ``chatd scaletest chat`` writes, plus the
``sweep`` section the sweep adds), so they are unit-tested and can re-render old results.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["sweep", "headline", "openloop"]
KINDS: tuple[Kind, ...] = ("sweep", "headline", "openloop")
DEFAULT_SHARDS = 64  # chatd's default shard count: the headline runs use it
HEADLINE_CHATS = 5000
HEADLINE_TURNS = 10
OPEN_LOOP_CHATS = 5000
OPEN_LOOP_TARGET_S = 60.0
OPEN_LOOP_LOAD = 0.5  # open loop runs at half the measured maximum

Result = dict[str, Any]
NA = "n/a"  # a figure the run does not have


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One configuration to run; its name is its file name and its database's name."""

    kind: Kind
    shards: int
    chats: int
    turns: int
    rate: float | None = None  # open loop: turns started per second
    workers: int = 1  # `chatd serve --workers`

    @property
    def name(self) -> str:
        # One worker keeps the names runs had before the workers axis existed.
        workers = "" if self.workers == 1 else f"-w{self.workers}"
        if self.kind == "sweep":
            return f"sweep-s{self.shards}-c{self.chats}-t{self.turns}{workers}"
        shards = "" if self.shards == DEFAULT_SHARDS else f"-s{self.shards}"
        if self.kind == "headline":
            return f"headline{shards}-c{self.chats}-t{self.turns}{workers}"
        return f"openloop{shards}-c{self.chats}-t{self.turns}-r{self.rate:g}{workers}"


def grid(
    shards: Iterable[int], chats: Iterable[int], turns: int, workers: Iterable[int] = (1,)
) -> list[RunSpec]:
    """Smallest load first, every shard count and worker count at each size: an interrupted
    sweep still has complete rows for the sizes it reached."""
    return [
        RunSpec("sweep", s, c, turns, workers=w)
        for c in sorted(set(chats))
        for w in sorted(set(workers))
        for s in sorted(set(shards))
    ]


def headline_spec(workers: int = 1) -> RunSpec:
    return RunSpec("headline", DEFAULT_SHARDS, HEADLINE_CHATS, HEADLINE_TURNS, workers=workers)


def open_loop_spec(
    max_rate: float,
    *,
    chats: int = OPEN_LOOP_CHATS,
    target_s: float = OPEN_LOOP_TARGET_S,
    workers: int = 1,
) -> RunSpec:
    """Half the maximum rate, with enough turns per chat for about ``target_s`` seconds (at
    least one each: every chat is created whatever the rate)."""
    if not max_rate > 0:
        raise ValueError(f"the maximum rate must be greater than 0, not {max_rate}")
    rate = round(max_rate * OPEN_LOOP_LOAD, 1) or 0.1
    turns = max(1, round(rate * target_s / chats))
    return RunSpec("openloop", DEFAULT_SHARDS, chats, turns, rate, workers)


def completed(result: Result) -> bool:
    """The driver produced a summary (with or without errors), so it has numbers to show."""
    return "phases" in result


def max_closed_loop_rate(
    results: Iterable[Result], shards: int = DEFAULT_SHARDS, workers: int = 1
) -> float | None:
    """Turns/s of the largest closed-loop run at ``shards`` and ``workers``: most chats, then
    most turns."""
    best: tuple[int, int, float] | None = None
    for r in results:
        run = r.get("sweep", {})
        if run.get("shards") != shards or not completed(r) or r["config"].get("rate"):
            continue
        if run.get("workers", 1) != workers:
            continue
        key = (r["config"]["chats"], r["turns"]["planned"], float(r["turns_per_s"]))
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


def sort_key(result: Result) -> tuple[int, int, int, int, int, float]:
    run = result["sweep"]
    return (
        KINDS.index(run["kind"]),
        run.get("workers", 1),
        run["shards"],
        run["chats"],
        run["turns"],
        run.get("rate") or 0.0,
    )


def _phase(result: Result, phase: str, stat: str) -> float | None:
    d = result.get("phases", {}).get(phase)
    if not d or not d.get("count"):
        return None
    value = d.get(stat)
    return None if value is None else float(value)


def _server(result: Result, key: str) -> float | None:
    if key == "cpu_ms_per_turn" and (tree := result.get("sweep", {}).get("cpu_ms_per_turn")):
        # Measured by the sweep over every process of the server (all its workers), where
        # the server's own /metrics would count the one worker that answered the scrape.
        return float(tree)
    server = result.get("server")
    value = None if server is None else server.get(key)
    return None if value is None else float(value)


def _ms(value: float | None) -> str:
    if value is None:
        return NA
    return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"


def _num(value: float | None, digits: int) -> str:
    return NA if value is None else f"{value:,.{digits}f}"


def error_count(result: Result) -> int:
    return sum(int(n) for n in result.get("errors", {}).values())


def _run_label(run: dict[str, Any]) -> str:
    if run["kind"] == "openloop":
        return f"open loop, {run['rate']:g}/s"
    return str(run["kind"])


def _errors_cell(result: Result) -> str:
    failure: str | None = result["sweep"].get("failure")
    if failure:
        short = failure if len(failure) <= 120 else failure[:119] + "…"
        return "**failed**: " + short.replace("|", "\\|").replace("\n", " ")
    n = error_count(result)
    late = " (timed out)" if result.get("timed_out") else ""
    if not n:
        return "0" + late
    top = sorted(result["errors"].items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    return f"{n:,} ({', '.join(f'{k} {v:,}' for k, v in top)}){late}"


COLUMNS = (
    "run",
    "workers",
    "shards",
    "chats",
    "turns",
    "turns/s",
    "create p99",
    "accept p99",
    "first output p50 / p99",
    "overhead p99",
    "turn p99",
    "errors",
    "server CPU ms/turn",
    "machine CPU ms/turn (busy %)",
    "DB tx/turn",
    "peak RSS MiB",
)


def table_row(result: Result) -> list[str]:
    run = result["sweep"]
    peak = _server(result, "peak_rss_bytes")
    return [
        _run_label(run),
        str(run.get("workers", 1)),
        str(run["shards"]),
        f"{run['chats']:,}",
        str(run["turns"]),
        _num(result.get("turns_per_s"), 1) if completed(result) else NA,
        _ms(_phase(result, "create", "p99_ms")),
        _ms(_phase(result, "accept", "p99_ms")),
        _ms(_phase(result, "first_output", "p50_ms"))
        + " / "
        + _ms(_phase(result, "first_output", "p99_ms")),
        _ms(_phase(result, "overhead_first_output", "p99_ms")),
        _ms(_phase(result, "turn", "p99_ms")),
        _errors_cell(result),
        _num(_server(result, "cpu_ms_per_turn"), 1),
        _machine_cell(run),
        _num(_server(result, "db_transactions_per_turn"), 2),
        _num(None if peak is None else peak / 2**20, 0),
    ]


def _machine_cell(run: dict[str, Any]) -> str:
    per_turn, busy = run.get("machine_cpu_ms_per_turn"), run.get("machine_busy_pct")
    if per_turn is None:
        return NA
    return _num(per_turn, 1) + ("" if busy is None else f" ({busy:.0f}%)")


def machine_line(machine: dict[str, Any]) -> str:
    cores = machine.get("cpus") or "?"
    model = machine.get("cpu_model") or "unknown CPU"
    ram = machine.get("memory_gib")
    pg = machine.get("postgresql") or "?"
    return (
        f"{cores} cores ({model}), {'?' if ram is None else f'{ram:g}'} GiB RAM, "
        f"Python {machine.get('python') or '?'}, PostgreSQL {pg} (embedded, fsync off)"
    )


def load_line(results: Sequence[Result]) -> str:
    """The fake LLM's settings, said once when every run used the same ones."""
    seen = {
        (c.get("chunks"), c.get("first_chunk_delay_ms"), c.get("chunk_interval_ms"))
        for c in (r.get("config") for r in results if completed(r))
        if c is not None
    }
    if len(seen) != 1:
        return "The fake LLM's settings differ between runs: see each run's JSON."
    chunks, delay, interval = next(iter(seen))
    return (
        f"Each turn: a reply of {chunks} chunks from `chatd fake-llm` (its own process), "
        f"{delay:g} ms to the first chunk, {interval:g} ms between chunks."
    )


def markdown(results: Sequence[Result], machine: dict[str, Any] | None) -> str:
    """``sweep.md``: how it was measured, then one row per run (grid, headline, open loop)."""
    rows = [table_row(r) for r in sorted(results, key=sort_key)]
    lines = [
        "# chatd scaletest sweep",
        "",
        (
            "Made by `python -m benchmarks.sweep` (re-render with `--render-only`). Each run: "
            "a fresh database, a fresh `chatd serve` with `CHATD_SHARD_COUNT` set to its shard "
            "count, and `chatd scaletest chat` as the client, all on this machine."
        ),
        "",
        f"Machine: {machine_line(machine) if machine else 'unknown'}.",
        "",
        load_line(results),
        "",
        (
            "Latencies are in ms, measured by the client; *overhead* is first output minus the "
            "fake LLM's delay to its first chunk. Closed-loop runs start each chat's next turn "
            "when the last ended; the open-loop run starts turns at a fixed rate. *workers*: "
            "`chatd serve --workers N`, the clients spread over them by the kernel. Server CPU "
            "per turn is that of every server process (all workers, the whole run, setup "
            "included) over the turns; machine CPU per turn is that of every process on the "
            "machine (server, driver, fake LLM, PostgreSQL) over the driver's run, and *busy* "
            "its share of all cores; the other server figures come from one worker's "
            "`/metrics` (n/a when it was not served)."
        ),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if not rows:
        lines.append("| " + " | ".join(["no runs yet"] + [""] * (len(COLUMNS) - 1)) + " |")
    return "\n".join(lines) + "\n"


Series = dict[str, list[tuple[int, float]]]


def series(results: Iterable[Result], value: str) -> Series:
    """Chart lines over concurrent chats, one per shard count, from the grid runs only (the
    headline and open-loop runs have other turn counts). ``value`` is ``turns_per_s`` or
    ``<phase>.<stat>``. Turn counts are named in the label only when they differ."""
    points: dict[tuple[int, int, int], dict[int, float]] = {}
    for r in results:
        run = r.get("sweep", {})
        if run.get("kind") != "sweep" or not completed(r):
            continue
        if value == "turns_per_s":
            y: float | None = float(r["turns_per_s"])
        else:
            phase, stat = value.split(".")
            y = _phase(r, phase, stat)
        if y is None:
            continue
        key = (run.get("workers", 1), run["shards"], run["turns"])
        points.setdefault(key, {})[run["chats"]] = y
    several_turns = len({turns for _, _, turns in points}) > 1
    several_workers = len({workers for workers, _, _ in points}) > 1
    out: Series = {}
    for (workers, shards, turns), by_chats in sorted(points.items()):
        label = f"{shards} shard" + ("" if shards == 1 else "s")
        if several_workers:
            label = f"{workers} worker{'' if workers == 1 else 's'}, {label}"
        if several_turns:
            label += f", {turns} turns"
        out[label] = sorted(by_chats.items())
    return out


@dataclass(frozen=True, slots=True)
class WorkersPoint:
    workers: int
    turns_per_s: float
    server_cpu_ms_per_turn: float | None
    machine_cpu_ms_per_turn: float | None
    machine_busy_pct: float | None


def workers_series(results: Iterable[Result]) -> tuple[str, list[WorkersPoint]] | None:
    """The grid runs that differ only in workers (the largest such group: most chats), with
    a title saying what they share; None when no configuration ran with several worker
    counts."""
    groups: dict[tuple[int, int, int], dict[int, Result]] = {}
    for r in results:
        run = r.get("sweep", {})
        if run.get("kind") != "sweep" or not completed(r):
            continue
        key = (run["chats"], run["turns"], run["shards"])
        groups.setdefault(key, {})[run.get("workers", 1)] = r
    several = {key: runs for key, runs in groups.items() if len(runs) > 1}
    if not several:
        return None
    (chats, turns, shards), runs = max(several.items())
    points = [
        WorkersPoint(
            workers,
            float(r["turns_per_s"]),
            _server(r, "cpu_ms_per_turn"),
            r["sweep"].get("machine_cpu_ms_per_turn"),
            r["sweep"].get("machine_busy_pct"),
        )
        for workers, r in sorted(runs.items())
    ]
    return f"{chats:,} chats x {turns} turns, {shards} shards, closed loop", points


def progress_line(result: Result, elapsed_s: float) -> str:
    """The line printed as each configuration finishes."""
    failure = result.get("sweep", {}).get("failure")
    if failure:
        return f"FAILED: {failure} ({elapsed_s:.0f} s)"
    cpu = _server(result, "cpu_ms_per_turn")
    parts = [
        f"{result['turns_per_s']:,.1f} turns/s",
        "first output p50/p99 "
        + _ms(_phase(result, "first_output", "p50_ms"))
        + "/"
        + _ms(_phase(result, "first_output", "p99_ms"))
        + " ms",
        f"overhead p99 {_ms(_phase(result, 'overhead_first_output', 'p99_ms'))} ms",
        f"turn p99 {_ms(_phase(result, 'turn', 'p99_ms'))} ms",
        f"errors {error_count(result):,}",
    ]
    if cpu is not None:
        parts.append(f"server CPU {cpu:.1f} ms/turn")
    busy = result.get("sweep", {}).get("machine_busy_pct")
    if busy is not None:
        parts.append(f"machine {busy:.0f}% busy")
    turns = result["turns"]
    if turns["completed"] < turns["planned"]:
        parts.append(f"{turns['completed']:,}/{turns['planned']:,} turns done")
    if turns.get("arrivals_missed"):
        parts.append(f"{turns['arrivals_missed']:,} arrivals found no idle chat")
    if result.get("timed_out"):
        parts.append("TIMED OUT")
    return ", ".join(parts) + f" ({elapsed_s:.0f} s)"


def open_loop_duration_s(spec: RunSpec) -> float | None:
    """How long an open-loop run lasts at its rate (without setup), said before it starts."""
    return None if spec.rate is None else spec.chats * spec.turns / spec.rate
