"""``GET /api/v1/metrics`` over real sockets: admin-only, Prometheus text, and figures that
follow what the server did (turns, errors by kind, retries, database work, open streams).

Counters are bumped by the actor just after its commit, which a test may see a moment before
the counter: figures are awaited by scraping until they hold, under a deadline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import trio

from chatd.providers.fake import knobs_marker
from chatd.store.database import Database
from chatd.web.metrics import PROMETHEUS_TEXT
from tests.e2e.api_world import DEADLINE_S, ApiWorld, Client, serve_api

QUICK = knobs_marker(chunks=1)

EXPECTED = {
    "process_cpu_seconds_total": "counter",
    "process_resident_memory_bytes": "gauge",
    "chatd_process_peak_resident_memory_bytes": "gauge",
    "chatd_turns_total": "counter",
    "chatd_retries_total": "counter",
    "chatd_errors_total": "counter",
    "chatd_tokens_total": "counter",
    "chatd_actors_active": "gauge",
    "chatd_mailbox_depth": "gauge",
    "chatd_actor_activations_total": "counter",
    "chatd_actor_passivations_total": "counter",
    "chatd_actor_restarts_total": "counter",
    "chatd_stream_subscribers": "gauge",
    "chatd_watch_subscribers": "gauge",
    "chatd_inbox_subscribers": "gauge",
    "chatd_db_transactions_total": "counter",
    "chatd_db_statements_total": "counter",
    "chatd_db_notifications_received_total": "counter",
    "chatd_db_notifications_dropped_total": "counter",
    "chatd_time_to_first_token_seconds": "histogram",
    "chatd_turn_duration_seconds": "histogram",
    "chatd_http_request_duration_seconds": "histogram",
}


@dataclass
class Scrape:
    """One parsed exposition: samples by series as written (``name`` or ``name{labels}``)."""

    samples: dict[str, float] = field(default_factory=dict)
    help: dict[str, str] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, series: str) -> float:
        return self.samples[series]


def parse(text: str) -> Scrape:
    """A strict reader of the subset chatd writes; a line of another shape fails the test."""
    scrape = Scrape()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, words = line.removeprefix("# HELP ").partition(" ")
            scrape.help[name] = words
        elif line.startswith("# TYPE "):
            name, _, kind = line.removeprefix("# TYPE ").partition(" ")
            scrape.types[name] = kind
        else:
            series, _, value = line.rpartition(" ")
            name = series.partition("{")[0]
            for suffix in ("_bucket", "_sum", "_count"):
                base = name.removesuffix(suffix)
                if base != name and scrape.types.get(base) == "histogram":
                    name = base
            assert name in scrape.types, f"sample before its # TYPE: {line!r}"
            assert series not in scrape.samples, f"repeated series: {line!r}"
            scrape.samples[series] = float(value)
    return scrape


async def scrape(client: Client) -> Scrape:
    response = await client.http.get("/api/v1/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == PROMETHEUS_TEXT
    return parse(response.text)


async def scrape_until(client: Client, holds: Callable[[Scrape], bool]) -> Scrape:
    """Scrape until ``holds`` is true of the figures (each scrape is a request: no spinning)."""
    with trio.fail_after(DEADLINE_S):
        while True:
            figures = await scrape(client)
            if holds(figures):
                return figures


@pytest.fixture
async def api(db: Database) -> AsyncIterator[ApiWorld]:
    """Retries a few milliseconds apart, so that a retried turn ends at once."""
    async with serve_api(db, retry_base_delay_s=0.01, retry_max_delay_s=0.01) as world:
        yield world


async def test_metrics_are_for_admins_only(api: ApiWorld) -> None:
    alice = await api.client("alice")
    response = await alice.http.get("/api/v1/metrics")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    async with api.anonymous() as anonymous:
        assert (await anonymous.get("/api/v1/metrics")).status_code == 401


async def test_every_series_is_described_and_follows_a_turn(api: ApiWorld) -> None:
    admin = await api.client("root", admin=True)
    chat = await admin.create_chat(f"{QUICK} hello")
    await admin.wait_status(chat["id"], "waiting")
    figures = await scrape_until(admin, lambda f: f["chatd_turns_total"] >= 1)
    for name, kind in EXPECTED.items():
        assert figures.types.get(name) == kind, name
        assert figures.help.get(name), name
    assert figures["chatd_turns_total"] == 1
    assert figures["chatd_turn_duration_seconds_count"] == 1
    assert figures['chatd_turn_duration_seconds_bucket{le="+Inf"}'] == 1
    assert 0 < figures["chatd_turn_duration_seconds_sum"] < DEADLINE_S
    assert figures["chatd_time_to_first_token_seconds_count"] == 1
    created = 'chatd_http_request_duration_seconds_count{route="/api/v1/chats",status="2xx"}'
    assert figures[created] >= 1
    assert figures["chatd_actors_active"] >= 1
    assert figures["chatd_actor_activations_total"] >= 1
    assert figures["chatd_mailbox_depth"] >= 0
    transactions = figures["chatd_db_transactions_total"]
    assert transactions > 0
    # Each transaction sends at least BEGIN, one statement and COMMIT.
    assert figures["chatd_db_statements_total"] >= 3 * transactions
    assert figures["process_cpu_seconds_total"] > 0
    rss = figures["process_resident_memory_bytes"]
    assert 0 < rss <= figures["chatd_process_peak_resident_memory_bytes"]
    assert figures["chatd_retries_total"] == 0
    assert sum(v for k, v in figures.samples.items() if k.startswith("chatd_errors_total")) == 0
    assert 'chatd_errors_total{kind="auth"}' in figures.samples  # present before any error

    # Another turn is one more, and counts more database work.
    response = await admin.http.post(
        f"/api/v1/chats/{chat['id']}/messages", json={"text": f"{QUICK} again"}
    )
    assert response.status_code == 202, response.text
    later = await scrape_until(admin, lambda f: f["chatd_turns_total"] >= 2)
    assert later["chatd_turns_total"] == 2
    assert later["chatd_db_transactions_total"] > transactions


async def test_open_sockets_show_as_subscribers(api: ApiWorld) -> None:
    admin = await api.client("root", admin=True)
    chat = await admin.create_chat(f"{QUICK} hello")
    await admin.wait_status(chat["id"], "waiting")
    before = await scrape(admin)
    assert before["chatd_stream_subscribers"] == 0
    assert before["chatd_watch_subscribers"] == 0
    async with admin.ws(f"/api/v1/chats/{chat['id']}/stream") as conn:
        with trio.fail_after(DEADLINE_S):
            await conn.get_message()  # the snapshot: the subscription is open
        figures = await scrape(admin)
        assert figures["chatd_stream_subscribers"] == 1
        async with admin.ws("/api/v1/chats/watch"):
            await scrape_until(admin, lambda f: f["chatd_watch_subscribers"] == 1)
    after = await scrape_until(
        admin,
        lambda f: f["chatd_stream_subscribers"] == 0 and f["chatd_watch_subscribers"] == 0,
    )
    assert after["chatd_stream_subscribers"] == 0


async def test_a_failed_turn_counts_an_error_of_its_kind(api: ApiWorld) -> None:
    admin = await api.client("root", admin=True)
    chat = await admin.create_chat(f"{knobs_marker(fault='auth')} hello")
    await admin.wait_status(chat["id"], "error")
    figures = await scrape_until(admin, lambda f: f['chatd_errors_total{kind="auth"}'] >= 1)
    assert figures['chatd_errors_total{kind="auth"}'] == 1
    errors = sum(v for k, v in figures.samples.items() if k.startswith("chatd_errors_total{"))
    assert errors == 1
    assert figures["chatd_turns_total"] == 1  # a turn that failed for good ended
    assert figures["chatd_retries_total"] == 0  # auth is not retried


async def test_a_retried_turn_counts_one_retry_and_no_error(api: ApiWorld) -> None:
    admin = await api.client("root", admin=True)
    marker = knobs_marker(chunks=1, fault="server_error", fault_times=1)
    chat = await admin.create_chat(f"{marker} hello")
    await admin.wait_status(chat["id"], "waiting")
    figures = await scrape_until(admin, lambda f: f["chatd_turns_total"] >= 1)
    assert figures["chatd_retries_total"] == 1
    assert figures["chatd_turns_total"] == 1  # the retried attempt is not a turn of its own
    errors = sum(v for k, v in figures.samples.items() if k.startswith("chatd_errors_total{"))
    assert errors == 0
