"""The sweep's naming, planning and rendering (benchmarks/report.py), without running anything."""

from __future__ import annotations

from typing import Any

import pytest
from benchmarks.report import (
    RunSpec,
    grid,
    headline_spec,
    markdown,
    max_closed_loop_rate,
    open_loop_spec,
    progress_line,
    series,
    table_row,
    workers_series,
)


def _phase(p50: float, p99: float) -> dict[str, float]:
    return {"count": 10, "p50_ms": p50, "p90_ms": p99, "p99_ms": p99, "max_ms": p99, "mean_ms": p50}


def _result(
    spec: RunSpec,
    *,
    turns_per_s: float = 100.0,
    first_p99: float = 80.0,
    errors: dict[str, int] | None = None,
    server: dict[str, Any] | None = None,
) -> dict[str, Any]:
    planned = spec.chats * spec.turns
    return {
        "run_id": spec.name,
        "config": {
            "chats": spec.chats,
            "turns": spec.turns,
            "rate": spec.rate,
            "chunks": 20,
            "first_chunk_delay_ms": 50.0,
            "chunk_interval_ms": 0.0,
        },
        "turns_per_s": turns_per_s,
        "turns": {"planned": planned, "completed": planned, "failed": 0},
        "phases": {
            "create": _phase(5.0, 12.5),
            "accept": _phase(3.0, 9.0),
            "first_output": _phase(55.0, first_p99),
            "overhead_first_output": _phase(5.0, first_p99 - 50),
            "turn": _phase(70.0, 140.0),
        },
        "errors": errors or {},
        "server": server,
        "sweep": _sweep(spec),
    }


def _sweep(spec: RunSpec, failure: str | None = None) -> dict[str, Any]:
    return {
        "name": spec.name,
        "kind": spec.kind,
        "shards": spec.shards,
        "workers": spec.workers,
        "chats": spec.chats,
        "turns": spec.turns,
        "rate": spec.rate,
        "failure": failure,
    }


def test_names_say_kind_shards_chats_turns_and_rate() -> None:
    assert RunSpec("sweep", 64, 1000, 3).name == "sweep-s64-c1000-t3"
    assert headline_spec().name == "headline-c5000-t10"
    assert RunSpec("headline", 4, 5000, 10).name == "headline-s4-c5000-t10"
    assert RunSpec("openloop", 64, 5000, 1, 93.5).name == "openloop-c5000-t1-r93.5"


def test_grid_runs_smallest_load_first_over_every_shard_count() -> None:
    names = [s.name for s in grid([64, 1, 64], [1000, 100], 3)]
    assert names == [
        "sweep-s1-c100-t3",
        "sweep-s64-c100-t3",
        "sweep-s1-c1000-t3",
        "sweep-s64-c1000-t3",
    ]


def test_open_loop_runs_at_half_rate_for_about_a_minute() -> None:
    spec = open_loop_spec(500.0)
    assert (spec.kind, spec.shards, spec.chats, spec.rate) == ("openloop", 64, 5000, 250.0)
    assert spec.turns == 3  # 250/s x 60 s = 15,000 turns over 5,000 chats
    assert open_loop_spec(40.0).turns == 1  # every chat gets a turn, even if that takes longer
    with pytest.raises(ValueError, match="greater than 0"):
        open_loop_spec(0.0)


def test_max_rate_comes_from_the_largest_closed_loop_run_at_64_shards() -> None:
    results = [
        _result(RunSpec("sweep", 64, 1000, 3), turns_per_s=300.0),
        _result(RunSpec("sweep", 64, 5000, 3), turns_per_s=250.0),
        _result(RunSpec("headline", 64, 5000, 10), turns_per_s=240.0),
        _result(RunSpec("sweep", 256, 5000, 3), turns_per_s=999.0),
        _result(RunSpec("openloop", 64, 9000, 9, 10.0), turns_per_s=10.0),
        {"sweep": _sweep(RunSpec("sweep", 64, 9000, 3), failure="driver crashed")},
    ]
    assert max_closed_loop_rate(results) == 240.0
    assert max_closed_loop_rate(results[:2]) == 250.0
    assert max_closed_loop_rate(results[3:]) is None


def test_table_has_one_row_per_run_in_order_with_the_machine() -> None:
    server = {
        "cpu_ms_per_turn": 21.34,
        "db_transactions_per_turn": 2.0,
        "peak_rss_bytes": 300 * 2**20,
    }
    results = [
        _result(RunSpec("openloop", 64, 5000, 1, 120.0)),
        _result(RunSpec("sweep", 64, 100, 3), server=server, errors={"stream": 2, "create": 5}),
        _result(RunSpec("sweep", 1, 100, 3)),
        {"sweep": _sweep(RunSpec("sweep", 1, 5000, 3), failure="chatd serve exited | boom")},
    ]
    results[1]["sweep"] |= {"machine_cpu_ms_per_turn": 30.0, "machine_busy_pct": 97.4}
    machine = {
        "cpus": 2,
        "cpu_model": "AMD EPYC",
        "memory_gib": 23.5,
        "python": "3.11.7",
        "postgresql": "15.8",
    }
    text = markdown(results, machine)
    assert "Machine: 2 cores (AMD EPYC), 23.5 GiB RAM, Python 3.11.7, PostgreSQL 15.8" in text
    assert "20 chunks" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| run | workers | shards | chats | turns | turns/s | create p99 |")
    assert [row.split(" | ")[2:4] for row in rows[1:]] == [
        ["1", "100"],
        ["1", "5,000"],
        ["64", "100"],
        ["64", "5,000"],
    ]
    assert rows[3] == (
        "| sweep | 1 | 64 | 100 | 3 | 100.0 | 12.5 | 9.0 | 55.0 / 80.0 | 30.0 | 140 "
        "| 7 (create 5, stream 2) | 21.3 | 30.0 (97%) | 2.00 | 300 |"
    )
    assert "**failed**: chatd serve exited \\| boom" in rows[2]
    assert rows[4].startswith("| open loop, 120/s | 1 | 64 | 5,000 | 1 |")
    assert rows[1].endswith("| 0 | n/a | n/a | n/a | n/a |")  # no /metrics, no machine load


def test_empty_results_still_render() -> None:
    assert "no runs yet" in markdown([], None)
    assert table_row(_result(RunSpec("sweep", 1, 1, 1)))[11] == "0"


def test_chart_series_are_grid_runs_per_shard_count_over_chats() -> None:
    results = [
        _result(RunSpec("sweep", 4, 1000, 3), turns_per_s=400.0, first_p99=90.0),
        _result(RunSpec("sweep", 4, 100, 3), turns_per_s=200.0, first_p99=60.0),
        _result(RunSpec("sweep", 1, 100, 3), turns_per_s=150.0),
        _result(RunSpec("headline", 64, 5000, 10)),
        {"sweep": _sweep(RunSpec("sweep", 1, 1000, 3), failure="x")},
    ]
    assert series(results, "turns_per_s") == {
        "1 shard": [(100, 150.0)],
        "4 shards": [(100, 200.0), (1000, 400.0)],
    }
    assert series(results, "first_output.p99_ms")["4 shards"] == [(100, 60.0), (1000, 90.0)]
    mixed = [*results, _result(RunSpec("sweep", 1, 100, 5), turns_per_s=170.0)]
    assert set(series(mixed, "turns_per_s")) == {
        "1 shard, 3 turns",
        "1 shard, 5 turns",
        "4 shards, 3 turns",
    }


def test_progress_line_gives_the_headline_numbers_or_the_failure() -> None:
    spec = RunSpec("sweep", 64, 100, 3)
    line = progress_line(_result(spec, errors={"turn": 1}), 12.3)
    assert line.startswith("100.0 turns/s, first output p50/p99 55.0/80.0 ms")
    assert "errors 1" in line
    assert line.endswith("(12 s)")
    failed = {"sweep": _sweep(spec, failure="driver killed after 1920 s")}
    assert progress_line(failed, 1920.0) == "FAILED: driver killed after 1920 s (1920 s)"


def test_the_workers_axis_names_runs_labels_lines_and_uses_the_whole_servers_cpu() -> None:
    one, two = RunSpec("sweep", 64, 1000, 3), RunSpec("sweep", 64, 1000, 3, workers=2)
    assert (one.name, two.name) == ("sweep-s64-c1000-t3", "sweep-s64-c1000-t3-w2")
    assert [s.workers for s in grid([64], [1000], 3, [2, 1])] == [1, 2]
    results = [_result(one, turns_per_s=100.0), _result(two, turns_per_s=170.0)]
    results[1]["sweep"]["cpu_ms_per_turn"] = 11.5
    assert set(series(results, "turns_per_s")) == {"1 worker, 64 shards", "2 workers, 64 shards"}
    assert table_row(results[1])[1] == "2"
    assert table_row(results[1])[12] == "11.5"
    assert max_closed_loop_rate(results, workers=2) == 170.0


def test_the_workers_chart_takes_the_largest_configuration_run_with_several_worker_counts() -> None:
    results = [
        _result(RunSpec("sweep", 64, 100, 3), turns_per_s=50.0),
        _result(RunSpec("sweep", 64, 100, 3, workers=2), turns_per_s=60.0),
        _result(RunSpec("sweep", 64, 1000, 3, workers=2), turns_per_s=95.0),
        _result(RunSpec("sweep", 64, 1000, 3), turns_per_s=85.0),
        _result(RunSpec("sweep", 64, 5000, 3), turns_per_s=70.0),  # one worker count only
        _result(RunSpec("headline", 64, 5000, 10, workers=2)),
    ]
    results[2]["sweep"] |= {"machine_cpu_ms_per_turn": 29.0, "machine_busy_pct": 93.0}
    found = workers_series(results)
    assert found is not None
    title, points = found
    assert title == "1,000 chats x 3 turns, 64 shards, closed loop"
    assert [(p.workers, p.turns_per_s) for p in points] == [(1, 85.0), (2, 95.0)]
    assert (points[1].machine_cpu_ms_per_turn, points[1].machine_busy_pct) == (29.0, 93.0)
    assert points[0].machine_cpu_ms_per_turn is None
    assert workers_series(results[4:]) is None
