"""The load driver's arithmetic and summary, without a server."""

from __future__ import annotations

from collections import Counter

import pytest

from chatd.client import User
from chatd.scaletest.driver import RunResult, ServerSample
from chatd.scaletest.prometheus import parse_metrics, total
from chatd.scaletest.report import progress_line, summary, table
from chatd.scaletest.run import ChatLoad, Recorder
from chatd.scaletest.stats import Distribution

USER = User("7d6c0f4e-0d7e-4c4e-9a55-1f0e6c2b9a10", "scaletest-0a1b2c3d", is_admin=False)


def test_percentiles_are_nearest_rank() -> None:
    d = Distribution.of([float(n) for n in range(100, 0, -1)])
    assert (d.count, d.p50_ms, d.p90_ms, d.p99_ms, d.max_ms) == (100, 50.0, 90.0, 99.0, 100.0)
    assert d.mean_ms == 50.5
    one = Distribution.of([7.0])
    assert (one.p50_ms, one.p99_ms, one.max_ms) == (7.0, 7.0, 7.0)
    assert Distribution.of([]).count == 0


def test_prometheus_text_is_read_by_series_and_summed_over_labels() -> None:
    text = """# HELP chatd_errors_total Errors.
# TYPE chatd_errors_total counter
chatd_errors_total{kind="auth"} 2
chatd_errors_total{kind="rate_limit",provider="x y"} 3.5
process_cpu_seconds_total 12.25
broken line here
chatd_turns_total NaN
"""
    samples = parse_metrics(text)
    assert samples['chatd_errors_total{kind="auth"}'] == 2
    assert samples["process_cpu_seconds_total"] == 12.25
    assert "chatd_turns_total" not in samples
    assert total(samples, "chatd_errors_total") == 5.5
    assert total(samples, "chatd_turns_total") is None


def _load(**changes: object) -> ChatLoad:
    fields: dict[str, object] = {"url": "http://h:1", "token": "secret", "chats": 2, "turns": 2}
    return ChatLoad(run_id="r1", **{**fields, **changes})  # type: ignore[arg-type]


def _sample(cpu: float, rss: float, tx: float, turns: float) -> ServerSample:
    return ServerSample(
        0.0,
        {
            "process_cpu_seconds_total": cpu,
            "process_resident_memory_bytes": rss,
            "chatd_db_transactions_total": tx,
            "chatd_db_statements_total": tx * 3,
            "chatd_turns_total": turns,
        },
    )


def test_summary_reports_phases_counts_and_server_figures_per_turn() -> None:
    recorder = Recorder(
        create_ms=[10.0, 20.0],
        accept_ms=[1.0, 2.0, 3.0, 4.0],
        first_output_ms=[60.0, 70.0, 80.0, 90.0],
        turn_ms=[100.0, 110.0, 120.0, 130.0],
        turns_completed=4,
        chats_ready=2,
        events=Counter({"message_part": 80, "status": 8}),
    )
    result = RunResult(
        load=_load(first_chunk_delay_ms=50.0),
        recorder=recorder,
        started_at=0.0,
        setup_s=1.0,
        turns_s=2.0,
        timed_out=False,
        before=_sample(cpu=1.0, rss=100_000, tx=10, turns=0),
        after_setup=_sample(cpu=2.0, rss=120_000, tx=14, turns=2),
        after=_sample(cpu=2.04, rss=130_000, tx=22, turns=6),
        peak_rss_bytes=150_000,
        http_retries=1,
        user=USER,
    )
    report = summary(result)

    assert report["turns_per_s"] == 2.0
    assert report["phases"]["overhead_first_output"]["p50_ms"] == 20.0
    assert report["phases"]["overhead_first_output"]["max_ms"] == 40.0
    assert report["retries"] == {"http": 1, "provider": 0}
    assert "token" not in report["config"]
    assert report["user"] == {"id": USER.id, "name": "scaletest-0a1b2c3d"}
    server = report["server"]
    assert server["cpu_ms_per_turn"] == 10.0
    assert server["db_transactions_per_turn"] == 2.0
    assert server["db_statements_per_turn"] == 6.0
    assert server["turns"] == 4
    assert server["rss_per_chat_bytes"] == 10_000
    assert server["peak_rss_bytes"] == 150_000

    text = table(report)
    assert "turns: 4 of 4 completed, 0 failed; 2 turns/s" in text
    assert "10 ms per turn" in text
    assert "errors: none" in text
    assert f"chats run by user scaletest-0a1b2c3d (id {USER.id})" in text


def test_without_metrics_the_summary_says_so() -> None:
    result = RunResult(
        load=_load(),
        recorder=Recorder(),
        started_at=0.0,
        setup_s=0.5,
        turns_s=0.0,
        timed_out=True,
        before=None,
        after_setup=None,
        after=None,
        peak_rss_bytes=None,
        http_retries=0,
        user=USER,
    )
    report = summary(result)
    assert report["server"] is None
    assert report["turns_per_s"] == 0.0
    assert "no /metrics figures" in table(report)


def test_progress_line_shows_setup_then_a_bar() -> None:
    assert progress_line(
        phase="setup", ready=3, chats=10, done=0, planned=20, errors=1, rate=0.0
    ) == ("setup  3/10 chats ready  errors 1")
    line = progress_line(phase="turns", ready=10, chats=10, done=10, planned=20, errors=0, rate=5)
    assert line == f"turns [{'#' * 15}{'.' * 15}] 10/20  errors 0  5 turns/s"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"chats": 0}, "--chats must be at least 1"),
        ({"turns": 0}, "--turns must be at least 1"),
        ({"ramp_s": -1.0}, "--ramp-s must be a number >= 0"),
        ({"rate": 0.0}, "--rate must be greater than 0"),
        ({"chunks": 0}, "--chunks must be at least 1"),
        ({"timeout_s": 0.0}, "--timeout-s must be greater than 0"),
        ({"url": "ftp://x"}, "must start with http:// or https://"),
    ],
)
def test_options_refuse_values_that_cannot_run(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _load(**changes)
