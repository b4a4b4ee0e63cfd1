"""``chatd scaletest chat`` as a user runs it: a real process loading a real server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import trio

from chatd.client import AsyncClient
from chatd.scaletest.report import PHASES
from chatd.store import chats, inbox, providers, users
from chatd.store.database import Database
from tests.e2e.api_world import ApiWorld, serve_api
from tests.e2e.chatd_process import chatd_env, run_chatd

pytestmark = pytest.mark.slow

RUN_BOUND_S = 120


@pytest.fixture
async def api(db: Database) -> AsyncIterator[ApiWorld]:
    """A server being load-tested as one user: its per-user limits are off (0), as
    ``benchmarks.sweep`` sets them, or the driver's chats would be refused past them."""
    async with serve_api(db, max_running_chats_per_user=0, max_websockets_per_user=0) as world:
        yield world


async def _admin_token(api: ApiWorld) -> str:
    user = await users.create_user(api.db, "load-admin", is_admin=True)
    _token, secret = await users.create_api_token(api.db, user.id)
    return secret


async def _run_user(api: ApiWorld, report: dict[str, Any], admin_token: str) -> UUID:
    """The user the run made, checked: named ``scaletest-<8 hex>``, not an admin, one token;
    every chat of the run is its own, and none is the admin's (list or inbox)."""
    name = report["user"]["name"]
    assert re.fullmatch(r"scaletest-[0-9a-f]{8}", name), name
    user = await users.get_user_by_name(api.db, name)
    assert user is not None
    assert str(user.id) == report["user"]["id"]
    assert not user.is_admin
    owned = await chats.list_chats(api.db, user.id, limit=1000)
    assert len(owned.chats) == report["chats"]["planned"]
    assert all(c.title.startswith(f"{report['run_id']} #") for c in owned.chats)
    async with AsyncClient(api.url, admin_token) as admin:
        assert (await admin.list_chats()).chats == []
        assert (await admin.inbox())["notifications"] == []
    return user.id


async def _token_revoked(api: ApiWorld, user_id: UUID) -> bool:
    [token] = await users.list_api_tokens(api.db, user_id)
    return token.revoked_at is not None


async def _scaletest(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(RUN_BOUND_S):
        return await trio.run_process(
            [sys.executable, "-m", "chatd", "scaletest", "chat", "--no-progress", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=chatd_env(),
        )


async def test_fifty_chats_three_turns_complete_with_a_full_summary(
    api: ApiWorld, tmp_path: Path
) -> None:
    output = tmp_path / "summary.json"
    token = await _admin_token(api)
    done = await _scaletest(
        *("--url", api.url, "--token", token, "--chats", "50", "--turns", "3"),
        *("--run-id", "smoke", "--output", str(output)),
    )

    assert done.returncode == 0, done.stderr.decode()
    report: dict[str, Any] = json.loads(output.read_text())
    assert report["errors"] == {}
    assert report["turns"] == {"planned": 150, "completed": 150, "failed": 0, "arrivals_missed": 0}
    assert report["chats"] == {"planned": 50, "ready": 50}
    counts = {name: report["phases"][name]["count"] for name in PHASES}
    assert counts == {
        "create": 50,
        "accept": 150,
        "first_output": 150,
        "overhead_first_output": 150,
        "turn": 150,
    }
    for name in PHASES:
        d = report["phases"][name]
        assert d["p50_ms"] <= d["p90_ms"] <= d["p99_ms"] <= d["max_ms"], name
    first, turn = report["phases"]["first_output"], report["phases"]["turn"]
    assert first["p50_ms"] >= report["config"]["first_chunk_delay_ms"]
    assert turn["max_ms"] >= first["max_ms"]
    # 20 text chunks per measured turn (and one in each setup turn) reached the clients.
    assert report["events"]["message_part"] >= 150 * 20 + 50
    assert report["turns_per_s"] > 0
    assert "token" not in report["config"]
    user_id = await _run_user(api, report, token)
    assert await _token_revoked(api, user_id)

    server = report["server"]
    assert server is not None, "the server's /metrics should have been read"
    assert server["turns"] == 150
    assert server["cpu_ms_per_turn"] > 0
    assert server["db_transactions_per_turn"] > 0
    assert server["db_statements_per_turn"] >= server["db_transactions_per_turn"]
    assert server["peak_rss_bytes"] > 0

    table = done.stdout.decode()
    assert "run smoke: 50 chats x 3 turns" in table
    assert "turns: 150 of 150 completed, 0 failed" in table
    assert "errors: none" in table
    assert f"chats run by user {report['user']['name']} (id {user_id})" in table


async def test_a_failing_turn_is_counted_by_stage_and_the_exit_status_says_so(
    api: ApiWorld, tmp_path: Path
) -> None:
    output = tmp_path / "summary.json"
    token = await _admin_token(api)
    # Every answer fails with a non-retryable error: the setup turns end in `error`.
    done = await _scaletest(
        *("--url", api.url, "--token", token, "--chats", "3", "--turns", "2"),
        *("--prompt", '[[fake-llm {"fault": "auth"}]]', "--output", str(output)),
    )

    assert done.returncode == 1, done.stderr.decode()
    report = json.loads(output.read_text())
    assert report["errors"] == {"setup": 3}
    assert report["turns"]["completed"] == 0
    assert report["turns"]["failed"] == 6
    assert "ended the turn in error" in report["error_samples"][0]
    # Each failed turn put a notification in an inbox: the run's user's, not the admin's.
    user_id = await _run_user(api, report, token)
    failed = await inbox.list_notifications(api.db, user_id)
    assert [n.kind for n in failed.notifications] == ["failed"] * 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--chats", "0"], "--chats must be at least 1"),
        (["--rate", "-1"], "--rate must be greater than 0"),
        (["--url", "127.0.0.1:8080"], "must start with http:// or https://"),
        (["--output", "/no/such/dir/out.json"], "directory /no/such/dir does not exist"),
    ],
)
def test_usage_mistakes_end_in_one_line_and_status_2(args: list[str], message: str) -> None:
    done = run_chatd(["scaletest", "chat", "--token", "t", *args])
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("chatd: error: ")
    assert message in line
    assert "Traceback" not in done.stderr


def test_a_missing_token_or_an_unreachable_server_is_a_usage_error() -> None:
    no_token = run_chatd(["scaletest", "chat"])
    assert no_token.returncode == 2
    assert "pass --token or set CHATD_TOKEN" in no_token.stderr

    nobody = run_chatd(["scaletest", "chat", "--token", "t", "--url", "http://127.0.0.1:9"])
    assert nobody.returncode == 2
    assert "is chatd serving at http://127.0.0.1:9?" in nobody.stderr
    assert "Traceback" not in nobody.stderr


@pytest.mark.parametrize("keep", [False, True])
async def test_the_run_revokes_its_token_and_removes_its_model_config_unless_kept(
    api: ApiWorld, keep: bool, tmp_path: Path
) -> None:
    output = tmp_path / "summary.json"
    token = await _admin_token(api)
    before = await providers.list_model_configs(api.db)
    done = await _scaletest(
        *("--url", api.url, "--token", token, "--chats", "2", "--turns", "1"),
        *("--run-id", "tidy", "--output", str(output), *(["--keep"] if keep else [])),
    )
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(output.read_text())
    user_id = await _run_user(api, report, token)
    configs = [c.name for c in await providers.list_model_configs(api.db)]
    made = [p.name for p in await providers.list_providers(api.db)]
    stderr = done.stderr.decode()
    user = report["user"]["name"]
    if keep:
        assert "scaletest-tidy" in configs
        assert "scaletest-tidy" in made
        assert not await _token_revoked(api, user_id)
        assert "the provider and model config scaletest-tidy stay (--keep)" in stderr
        assert f"the token of user {user} stays (--keep)" in stderr
    else:
        assert configs == [c.name for c in before]
        assert "scaletest-tidy" not in made
        assert await _token_revoked(api, user_id)
        assert "removed the provider and model config scaletest-tidy" in stderr
        assert f"revoked the token of user {user}" in stderr


async def test_a_token_that_is_not_an_admins_is_refused_before_anything_is_made(
    api: ApiWorld,
) -> None:
    user = await users.create_user(api.db, "not-an-admin")
    _token, secret = await users.create_api_token(api.db, user.id)
    before = await providers.list_providers(api.db)
    done = await _scaletest("--url", api.url, "--token", secret)
    assert done.returncode == 2
    assert "the load driver needs an admin token" in done.stderr.decode()
    assert [u.name for u in await users.list_users(api.db)] == ["not-an-admin"]
    assert await providers.list_providers(api.db) == before
