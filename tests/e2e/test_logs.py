"""The logs of a real ``chatd serve`` process, read from its output: an access line per request
and WebSocket handshake (never a token), JSON lines, warnings for provider failures, shard
moves; and the unauthenticated metrics port."""

from __future__ import annotations

import json
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio
import trio_websocket

from chatd.providers.fake import knobs_marker
from tests.e2e.chatd_process import ServerProcess, chatd_server, run_chatd

pytestmark = pytest.mark.slow

MISSING_CHAT = "00000000-0000-4000-8000-000000000000"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def server(database_url: str) -> AsyncIterator[tuple[ServerProcess, int]]:
    """A demo server (the fake model in process) logging JSON, with a metrics port."""
    home = Path(tempfile.mkdtemp(prefix="chatd-logs-"))
    metrics_port = _free_port()
    env = {
        "CHATD_LOG_FORMAT": "json",
        "CHATD_METRICS_PORT": str(metrics_port),
        "CHATD_RETRY_BASE_DELAY_S": "0.01",
        "CHATD_RETRY_MAX_DELAY_S": "0.01",
    }
    args = [
        "--demo",
        "--database-url",
        database_url,
        "--port",
        "0",
        "--admin-token-file",
        str(home / "admin-token"),
    ]
    async with chatd_server(args, env=env) as process:
        yield process, metrics_port


def _records(server: ServerProcess) -> list[dict[str, Any]]:
    """Every log line so far, parsed (a line that is not JSON fails the test)."""
    out = []
    for line in server.output:
        if line.startswith("{"):
            record = json.loads(line)
            assert {"ts", "level", "logger", "msg"} <= record.keys(), line
            out.append(record)
    return out


async def _access(server: ServerProcess, route: str, status: int) -> dict[str, Any]:
    pattern = f'"logger": "chatd.access".*"route": "{route}", "status": {status}'
    match = await server.wait_for_line(pattern)
    record: dict[str, Any] = json.loads(match.string)
    return record


async def test_access_lines_warnings_and_metrics_port(
    server: tuple[ServerProcess, int],
) -> None:
    process, metrics_port = server
    token = process.admin_token
    assert token is not None
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(base_url=process.url, timeout=30) as http:
        assert (await http.get("/api/v1/chats", headers=auth)).status_code == 200
        missing = await http.get(f"/api/v1/chats/{MISSING_CHAT}", headers=auth)
        assert missing.status_code == 404
        refused = await http.get("/api/v1/chats", headers={"Authorization": "Bearer nope"})
        assert refused.status_code == 401

        listed = await _access(process, "/api/v1/chats", 200)
        assert listed["method"] == "GET"
        assert listed["user_id"]
        assert listed["duration_ms"] >= 0
        assert listed["msg"].startswith("GET /api/v1/chats 200 ")
        # The route's template, not the path with the id.
        template = await _access(process, "/api/v1/chats/<chat_id>", 404)
        assert template["user_id"] == listed["user_id"]
        anonymous = await _access(process, "/api/v1/chats", 401)
        assert anonymous["user_id"] is None

        # WebSocket handshakes: accepted (101), with the token in the query; refused (401).
        ws_url = process.url.replace("http://", "ws://") + "/api/v1/chats/watch"
        async with trio_websocket.open_websocket_url(f"{ws_url}?access_token={token}"):
            accepted = await _access(process, "/api/v1/chats/watch", 101)
            assert accepted["user_id"] == listed["user_id"]
        handshake = {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        rejected = await http.get(
            "/api/v1/chats/watch?access_token=chatd_not_a_real_token_x1", headers=handshake
        )
        assert rejected.status_code == 401
        await _access(process, "/api/v1/chats/watch", 401)

        # A provider failure retried, and one given up: a warning each.
        retried = knobs_marker(chunks=1, fault="server_error", fault_times=1)
        created = await http.post("/api/v1/chats", headers=auth, json={"text": f"{retried} hi"})
        assert created.status_code == 201, created.text
        chat_id = created.json()["id"]
        line = await process.wait_for_line(f'"chat_id": "{chat_id}".*"retry_in_s": [0-9]')
        warning = json.loads(line.string)
        assert warning["level"] == "WARNING"
        assert warning["chat_id"] == chat_id
        assert warning["kind"] == "server_error"
        assert warning["status"] == 500
        assert "retry in" in warning["msg"]
        failed = knobs_marker(fault="auth")
        created = await http.post("/api/v1/chats", headers=auth, json={"text": f"{failed} hi"})
        chat_id = created.json()["id"]
        line = await process.wait_for_line(f'gave up.*"chat_id": "{chat_id}"')
        given_up = json.loads(line.string)
        assert given_up["kind"] == "auth"
        assert given_up["retry_in_s"] is None

        # The metrics port: no token needed; request durations by route and the first token.
        async with httpx2.AsyncClient(timeout=30) as scraper:
            with trio.fail_after(30):
                while True:
                    scraped = await scraper.get(f"http://127.0.0.1:{metrics_port}/metrics")
                    assert scraped.status_code == 200
                    if "chatd_time_to_first_token_seconds_count 1" in scraped.text:
                        break
            other = await scraper.get(f"http://127.0.0.1:{metrics_port}/other")
            assert other.status_code == 404
        text = scraped.text
        assert (
            'chatd_http_request_duration_seconds_count{route="/api/v1/chats",status="2xx"}' in text
        )
        assert "chatd_turn_duration_seconds_bucket" in text

    records = _records(process)
    moves = [r for r in records if r.get("shard_move") == "acquired"]
    assert moves
    assert moves[0]["shards"]
    # The token is never logged (the WebSocket carried it in its query string). (The demo's
    # welcome text on stdout shows it to the user, not as a log record.)
    assert not [r for r in records if token in json.dumps(r)]
    assert not [r for r in records if "chatd_not_a_real_token_x1" in json.dumps(r)]


def test_a_bad_log_format_is_one_line(database_url: str) -> None:
    done = run_chatd(
        ["serve", "--database-url", database_url, "--port", "0"],
        env={"CHATD_LOG_FORMAT": "xml"},
    )
    assert done.returncode == 2
    assert "log_format (CHATD_LOG_FORMAT) must be text or json" in done.stderr
    assert "Traceback" not in done.stderr
