"""The pure parts of ``/metrics``: the exposition text, the reading of ``/proc/self/status``,
and which outcomes count as an ended turn (``chatd_turns_total``)."""

from __future__ import annotations

import dataclasses

import pytest

from chatd.actors.chat_actor import ends_turn
from chatd.actors.supervisor import SupervisorStats
from chatd.domain.chat_status import ChatStatus
from chatd.domain.conversation import ToolCallPart
from chatd.domain.events import Episode
from chatd.domain.mailbox import (
    GenerationFailed,
    GenerationStopped,
    Interrupt,
    MailboxMessage,
    RetryTimerFired,
    SendMessage,
    StepCompleted,
)
from chatd.histogram import Histogram
from chatd.web.metrics import (
    SUPERVISOR_COUNTERS,
    HttpMetrics,
    Memory,
    Metric,
    Sample,
    counter,
    gauge,
    histogram,
    parse_proc_status,
    render,
)
from tests.unit.chat_states import (
    CURRENT,
    FATAL,
    NEW,
    RETRYABLE,
    StatusCase,
    run,
    state_in,
    text,
)

# -- the exposition text -----------------------------------------------------------------------


def test_a_histogram_renders_cumulative_buckets_sum_and_count() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        h.observe(value)
    out = render([histogram("chatd_x_seconds", "X.", (((("route", "/a"),), h),))])
    assert out == (
        "# HELP chatd_x_seconds X.\n"
        "# TYPE chatd_x_seconds histogram\n"
        'chatd_x_seconds_bucket{route="/a",le="0.1"} 2\n'
        'chatd_x_seconds_bucket{route="/a",le="1.0"} 3\n'
        'chatd_x_seconds_bucket{route="/a",le="+Inf"} 4\n'
        'chatd_x_seconds_sum{route="/a"} 3.65\n'
        'chatd_x_seconds_count{route="/a"} 4\n'
    )


def test_request_durations_are_by_route_and_status_class_and_404s_are_one_series() -> None:
    http = HttpMetrics()
    http.observe("/api/v1/chats/<chat_id>", 200, 0.01)
    http.observe("/api/v1/chats/<chat_id>", 204, 0.02)
    http.observe("/api/v1/nothing/1", 404, 0.01)
    http.observe("/api/v1/nothing/2", 404, 0.01)
    assert sorted(http.durations) == [
        ("/api/v1/chats/<chat_id>", "2xx"),
        ("unmatched", "4xx"),
    ]
    assert http.durations[("unmatched", "4xx")].count == 2


def test_each_metric_has_help_type_and_its_samples() -> None:
    text_out = render(
        [
            counter("chatd_turns_total", "Turns that ended.", 3),
            gauge("process_resident_memory_bytes", "RSS.", 1024),
            Metric(
                "chatd_errors_total",
                "counter",
                "Errors by kind.",
                (Sample(2, (("kind", "auth"),)), Sample(0, (("kind", "timeout"),))),
            ),
        ]
    )
    assert text_out == (
        "# HELP chatd_turns_total Turns that ended.\n"
        "# TYPE chatd_turns_total counter\n"
        "chatd_turns_total 3\n"
        "# HELP process_resident_memory_bytes RSS.\n"
        "# TYPE process_resident_memory_bytes gauge\n"
        "process_resident_memory_bytes 1024\n"
        "# HELP chatd_errors_total Errors by kind.\n"
        "# TYPE chatd_errors_total counter\n"
        'chatd_errors_total{kind="auth"} 2\n'
        'chatd_errors_total{kind="timeout"} 0\n'
    )


def test_nothing_renders_as_nothing() -> None:
    assert render([]) == ""


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (0, "0"),
        (12345678901234, "12345678901234"),
        (1.25, "1.25"),
        (1e-05, "1e-05"),
        (float("inf"), "+Inf"),
        (float("-inf"), "-Inf"),
        (float("nan"), "NaN"),
    ],
)
def test_values_are_written_as_prometheus_reads_them(value: float, written: str) -> None:
    assert render([gauge("g", "h", value)]).splitlines()[-1] == f"g {written}"


def test_help_and_label_values_are_escaped() -> None:
    metric = Metric("m", "gauge", "back\\slash\nnewline", (Sample(1, (("l", 'a"b\\c\nd'),)),))
    lines = render([metric]).splitlines()
    assert lines[0] == "# HELP m back\\\\slash\\nnewline"
    assert lines[2] == 'm{l="a\\"b\\\\c\\nd"} 1'


def test_every_supervisor_counter_is_exposed_under_one_name() -> None:
    exposed = [field for field, _name, _help in SUPERVISOR_COUNTERS]
    assert sorted(exposed) == sorted(f.name for f in dataclasses.fields(SupervisorStats))
    names = [name for _field, name, _help in SUPERVISOR_COUNTERS]
    assert len(set(names)) == len(names)
    assert all(name.startswith("chatd_") and name.endswith("_total") for name in names)


# -- /proc/self/status ---------------------------------------------------------------------------

STATUS = """Name:\tpython
VmPeak:\t  900000 kB
VmHWM:\t  150000 kB
VmRSS:\t  120000 kB
Threads:\t3
"""


def test_rss_and_its_peak_are_read_in_bytes() -> None:
    assert parse_proc_status(STATUS) == Memory(rss=120000 * 1024, peak_rss=150000 * 1024)


def test_missing_or_odd_memory_lines_are_left_out() -> None:
    assert parse_proc_status("Name:\tpython\nVmRSS:\t12 MB\n") == Memory(None, None)


# -- which outcomes end a turn ------------------------------------------------------------------


def ended(case: StatusCase, message: MailboxMessage, *, queue: int = 0) -> bool:
    before = state_in(case, queue=queue)
    return ends_turn(message, before, run(before, message).state)


CALL = ToolCallPart("call_1", "lookup", "{}")


def test_an_answer_ends_the_turn_whether_the_chat_waits_or_the_queue_goes_on() -> None:
    answer = StepCompleted(CURRENT, text("hi"), None)
    assert ended("running", answer)
    assert ended("running", answer, queue=2)


def test_dynamic_calls_end_the_turn_but_built_in_results_continue_it() -> None:
    assert ended("running", StepCompleted(CURRENT, (CALL,), None, dynamic_calls=(CALL,)))
    builtin = StepCompleted(CURRENT, (CALL,), None, builtin_calls=(CALL,))
    assert not ended("running", builtin)


def test_a_failure_ends_the_turn_only_when_it_is_not_retried() -> None:
    assert ended("running", GenerationFailed(CURRENT, FATAL))
    assert run(state_in("running"), GenerationFailed(CURRENT, FATAL)).state.status is (
        ChatStatus.ERROR
    )
    assert not ended("running", GenerationFailed(CURRENT, RETRYABLE))


def test_stale_outcomes_and_the_user_s_own_stops_are_not_turns() -> None:
    stale = Episode(CURRENT.history_version, CURRENT.generation_attempt - 1)
    assert not ended("running", StepCompleted(stale, text("old"), None))
    assert not ended("interrupting", StepCompleted(CURRENT, text("late"), None))
    assert not ended("running", Interrupt())
    assert not ended("running_retry", Interrupt())
    assert not ended("interrupting", GenerationStopped(CURRENT, text("partial")))
    assert not ended("running_retry", RetryTimerFired(CURRENT))
    assert not ended("running", SendMessage(NEW, "next", busy_behavior="interrupt"))
