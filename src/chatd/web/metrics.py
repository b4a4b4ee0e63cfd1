"""``GET /api/v1/metrics``: this process's figures in Prometheus text exposition format.

Admin-only: the figures say how busy the deployment is. Each worker process answers for itself
(a scraper reads every worker, or sums them). Everything is read from counters the engine,
the hub, the feeds and the database already keep, at the time of the scrape: nothing here
runs per event. ``render`` is a pure function of the collected ``Metric`` values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from quart import Quart, current_app

from chatd.actors.engine import Engine
from chatd.histogram import Histogram
from chatd.store.database import DatabaseStats
from chatd.web.context import Services
from chatd.web.routing import ApiRoutes, Call

routes = ApiRoutes("metrics", tag="meta")

PROMETHEUS_TEXT: Final = "text/plain; version=0.0.4; charset=utf-8"

MetricType = Literal["counter", "gauge", "histogram"]
Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Sample:
    value: float
    labels: Labels = ()
    suffix: str = ""  # a histogram's _bucket, _sum or _count


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric family: its name, type, help text and samples (one per label set)."""

    name: str
    type: MetricType
    help: str
    samples: tuple[Sample, ...]


def counter(name: str, help_text: str, value: float) -> Metric:
    return Metric(name, "counter", help_text, (Sample(value),))


def gauge(name: str, help_text: str, value: float) -> Metric:
    return Metric(name, "gauge", help_text, (Sample(value),))


def histogram(name: str, help_text: str, series: Iterable[tuple[Labels, Histogram]]) -> Metric:
    """A histogram family: per label set, its cumulative buckets (``le``), sum and count."""
    samples: list[Sample] = []
    for labels, h in series:
        samples.extend(
            Sample(n, (*labels, ("le", _bound(bound))), "_bucket") for bound, n in h.cumulative()
        )
        samples.append(Sample(h.sum, labels, "_sum"))
        samples.append(Sample(h.count, labels, "_count"))
    return Metric(name, "histogram", help_text, tuple(samples))


def _bound(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class HttpMetrics:
    """Request durations of this process by route template, method and status class, observed
    by the server's access-log middleware (``chatd.web.server.access_logged``)."""

    __slots__ = ("durations",)

    def __init__(self) -> None:
        self.durations: dict[tuple[str, str], Histogram] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        # Unmatched paths (404s) are one series, whatever the path: no unbounded labels.
        key = (route if status != 404 else "unmatched", _STATUS_CLASSES.get(status // 100, "other"))
        h = self.durations.get(key)
        if h is None:
            h = self.durations[key] = Histogram()
        h.observe(seconds)

    def metrics(self) -> list[Metric]:
        return [
            histogram(
                "chatd_http_request_duration_seconds",
                "Time from a request's arrival to the end of its answer (a WebSocket's: to the"
                " handshake's answer), by route template and status class, in seconds.",
                (
                    ((("route", route), ("status", status)), h)
                    for (route, status), h in sorted(self.durations.items())
                ),
            )
        ]


_STATUS_CLASSES: Final = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_HTTP_METRICS_KEY: Final = "chatd.http_metrics"


def http_metrics(app: Quart) -> HttpMetrics:
    """The app's request metrics (made on first use)."""
    found = app.extensions.get(_HTTP_METRICS_KEY)
    if not isinstance(found, HttpMetrics):
        found = app.extensions[_HTTP_METRICS_KEY] = HttpMetrics()
    return found


# -- rendering ---------------------------------------------------------------------------------


def render(metrics: Iterable[Metric]) -> str:
    """The text exposition format 0.0.4: ``# HELP``, ``# TYPE``, then each sample."""
    lines: list[str] = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
        lines.append(f"# TYPE {metric.name} {metric.type}")
        lines.extend(
            f"{metric.name}{s.suffix}{_labels(s.labels)} {_value(s.value)}" for s in metric.samples
        )
    return "\n".join(lines) + "\n" if lines else ""


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{_escape_label(value)}"' for name, value in labels) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


# -- collecting --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Memory:
    """Resident memory of the process, in bytes (None where the system does not say)."""

    rss: int | None
    peak_rss: int | None


def parse_proc_status(text: str) -> Memory:
    """``VmRSS`` and ``VmHWM`` (the peak) from the text of ``/proc/self/status`` (in kB)."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            number, _, unit = rest.strip().partition(" ")
            if number.isdigit() and unit.strip() == "kB":
                found[key] = int(number) * 1024
    return Memory(found.get("VmRSS"), found.get("VmHWM"))


def _memory() -> Memory:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:  # noqa: PTH123
            return parse_proc_status(status.read())
    except OSError:
        return Memory(None, None)  # not Linux: these series are left out


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))  # noqa: PTH208
    except OSError:
        return None


def process_metrics() -> list[Metric]:
    times = os.times()
    out = [
        counter(
            "process_cpu_seconds_total",
            "User and system CPU time of this process, all its threads, in seconds.",
            times.user + times.system,
        )
    ]
    memory = _memory()
    if memory.rss is not None:
        out.append(
            gauge(
                "process_resident_memory_bytes",
                "Resident memory of this process now (VmRSS), in bytes.",
                memory.rss,
            )
        )
    if memory.peak_rss is not None:
        out.append(
            gauge(
                "chatd_process_peak_resident_memory_bytes",
                "Highest resident memory of this process since it started (VmHWM), in bytes.",
                memory.peak_rss,
            )
        )
    fds = _open_fds()
    if fds is not None:
        out.append(gauge("process_open_fds", "Open file descriptors of this process.", fds))
    return out


# The supervisor's counters (SupervisorStats), by field: metric name and help.
SUPERVISOR_COUNTERS: Final = (
    (
        "activations",
        "chatd_actor_activations_total",
        "Chat actors started for a message or a resume (restarts not included).",
    ),
    (
        "resumed",
        "chatd_actor_resumes_total",
        "Chat actors started to resume the running chats of a shard this process gained.",
    ),
    ("passivations", "chatd_actor_passivations_total", "Idle chat actors stopped."),
    ("crashes", "chatd_actor_crashes_total", "Chat actors that crashed."),
    ("restarts", "chatd_actor_restarts_total", "Crashed chat actors restarted."),
    (
        "parked",
        "chatd_chats_parked_total",
        "Chats parked in error after crashing their actor too often.",
    ),
    (
        "stopped",
        "chatd_actor_stops_total",
        "Chat actors stopped because their shard was lost, or at shutdown.",
    ),
    (
        "outages",
        "chatd_actor_outages_total",
        "Chat actors stopped by a database outage (waited out, not counted as crashes).",
    ),
    (
        "outage_restarts",
        "chatd_actor_outage_restarts_total",
        "Chat actors restarted after waiting out a database outage.",
    ),
    (
        "park_retries",
        "chatd_park_retries_total",
        "Parkings of a chat in error retried because the database was unavailable.",
    ),
    (
        "sweeps",
        "chatd_resume_sweeps_total",
        "Sweeps of the held shards for runnable chats with no actor (periodic, and after outages).",
    ),
    ("lease_renewals", "chatd_lease_renewals_total", "Successful checks of the shard leases."),
    ("lease_failures", "chatd_lease_failures_total", "Failed checks of the shard leases."),
    ("shards_gained", "chatd_shards_gained_total", "Shards whose lease this process took."),
    ("shards_lost", "chatd_shards_lost_total", "Shards whose lease this process lost."),
    (
        "shards_handed_over",
        "chatd_shards_handed_over_total",
        "Shards this process handed over to another worker to even out the placement.",
    ),
    (
        "handover_timeouts",
        "chatd_handover_timeouts_total",
        "Handovers whose turns in progress did not end within handover_timeout_s.",
    ),
)


def engine_metrics(engine: Engine) -> list[Metric]:
    counters = engine.counters
    supervisor = engine.supervisor
    stats = supervisor.stats
    hub = engine.hub.stats
    watch = engine.watch.stats
    inbox = engine.inbox.stats
    out = [
        counter(
            "chatd_turns_total",
            "Model turns ended by the model's outcome: answered (the chat waits, or its next"
            " queued message starts), stopped for dynamic tool calls (requires_action), or"
            " failed for good (error). Retried attempts, rounds of built-in tools and runs the"
            " user interrupted or edited are not counted.",
            counters.turns,
        ),
        counter(
            "chatd_retries_total",
            "Provider retries scheduled after a retryable failure.",
            counters.retries,
        ),
        Metric(
            "chatd_tokens_total",
            "counter",
            "Tokens the providers reported for the model calls of the chats this process ran"
            " (answers, summaries, titles), by direction: input (the prompt) or output.",
            (
                Sample(counters.input_tokens, (("direction", "input"),)),
                Sample(counters.output_tokens, (("direction", "output"),)),
            ),
        ),
        Metric(
            "chatd_errors_total",
            "counter",
            "Chats stopped in error, by the classified kind of their failure (a chat parked"
            " after repeated crashes of its actor counts as generic).",
            tuple(
                Sample(n, (("kind", str(kind)),))
                for kind, n in sorted(counters.errors.items(), key=lambda item: str(item[0]))
            ),
        ),
        gauge(
            "chatd_actors_active", "Chat actors running in this process.", supervisor.active_actors
        ),
        gauge(
            "chatd_mailbox_depth",
            "Messages waiting in the mailboxes of all chat actors.",
            supervisor.mailbox_depth,
        ),
        gauge(
            "chatd_owned_shards", "Shards whose lease this process holds.", len(supervisor.fences)
        ),
        histogram(
            "chatd_time_to_first_token_seconds",
            "Time from the start of a model step (the model config resolved, the prompt"
            " built, the provider called) to its first streamed part, in seconds.",
            (((), counters.first_token),),
        ),
        histogram(
            "chatd_turn_duration_seconds",
            "Time from the start of a turn's first model step to the model's outcome that"
            " ended it (retries and built-in tool rounds included; see chatd_turns_total),"
            " in seconds.",
            (((), counters.turn_duration),),
        ),
    ]
    out += [
        counter(name, help_text, getattr(stats, field))
        for field, name, help_text in SUPERVISOR_COUNTERS
    ]
    out += [
        gauge("chatd_stream_subscribers", "Open chat stream subscriptions.", hub.subscribers),
        gauge(
            "chatd_watch_subscribers", "Open watch (chat list) subscriptions.", watch.subscribers
        ),
        gauge("chatd_inbox_subscribers", "Open inbox watch subscriptions.", inbox.subscribers),
        counter(
            "chatd_stream_events_published_total",
            "Chat events handed to the stream hub (streamed parts included).",
            hub.events_published,
        ),
        Metric(
            "chatd_slow_consumers_dropped_total",
            "counter",
            "Subscribers dropped for falling behind, by feed.",
            (
                Sample(hub.slow_consumers_dropped, (("feed", "stream"),)),
                Sample(watch.slow_consumers_dropped, (("feed", "watch"),)),
                Sample(inbox.slow_consumers_dropped, (("feed", "inbox"),)),
            ),
        ),
    ]
    return out


def database_metrics(stats: DatabaseStats, *, pool_size: int, pool_idle: int) -> list[Metric]:
    return [
        counter(
            "chatd_db_transactions_total",
            "Transactions sent to PostgreSQL.",
            stats.transactions,
        ),
        counter(
            "chatd_db_statements_total",
            "Statements sent to PostgreSQL on pooled connections, a transaction's BEGIN and"
            " COMMIT included.",
            stats.statements,
        ),
        counter(
            "chatd_db_notifications_received_total",
            "NOTIFY payloads handed to a listener in this process.",
            stats.notifications_received,
        ),
        counter(
            "chatd_db_notifications_dropped_total",
            "NOTIFY payloads dropped because their listener fell behind (NOTIFY is a hint).",
            stats.notifications_dropped,
        ),
        gauge("chatd_db_pool_connections", "Connections in the database pool.", pool_size),
        gauge(
            "chatd_db_pool_idle_connections", "Idle connections in the database pool.", pool_idle
        ),
    ]


@routes.http(
    "GET",
    "/metrics",
    summary="This process's metrics, in Prometheus text exposition format",
    response=str,
    admin=True,
    media_type=PROMETHEUS_TEXT,
)
async def metrics(call: Call[None]) -> str:
    return exposition(call.services, http_metrics(current_app))


def exposition(svc: Services, http: HttpMetrics) -> str:
    """Every figure of this process, as ``/api/v1/metrics`` and the metrics port serve it."""
    db = svc.db
    return render(
        [
            *process_metrics(),
            *engine_metrics(svc.engine),
            *database_metrics(db.stats, pool_size=db.pool_size, pool_idle=db.pool_idle),
            *http.metrics(),
        ]
    )
