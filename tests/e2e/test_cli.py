"""The ``chatd`` command as a user runs it: real processes, real PostgreSQL, real sockets."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import trio

from chatd.store import users
from chatd.store.database import Database
from tests.e2e.chatd_process import chatd_server, run_chatd

pytestmark = pytest.mark.slow


@pytest.fixture
def chatd_home() -> Iterator[Path]:
    """A short path that the `postgres` user can reach when the tests run as root."""
    home = Path(tempfile.mkdtemp(prefix="chatd-home-"))
    home.chmod(0o711)
    yield home
    shutil.rmtree(home, ignore_errors=True)


async def _healthz(url: str) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=10) as client:
        return await client.get(f"{url}/healthz")


async def test_serve_runs_its_own_postgres_reuses_it_and_stops_it(chatd_home: Path) -> None:
    token_file = chatd_home / "admin-token"
    args = ["--home", str(chatd_home), "--port", "0", "--admin-token-file", str(token_file)]

    async with chatd_server(args) as first:
        response = await _healthz(first.url)
        assert response.status_code == 200
        assert response.json() == {"status": "ok", "database": "ok"}
        assert first.admin_token is not None
    assert first.process.returncode == 0
    assert not (chatd_home / "pgdata" / "postmaster.pid").exists(), "PostgreSQL left running"
    assert token_file.read_text().strip() == first.admin_token
    assert token_file.stat().st_mode & 0o077 == 0

    async with chatd_server(args) as second:
        assert (await _healthz(second.url)).json() == {"status": "ok", "database": "ok"}
        assert second.admin_token == first.admin_token, "the admin token should survive restarts"
    assert second.process.returncode == 0
    assert not any("Traceback" in line for line in first.output + second.output)


async def test_serve_against_an_external_database(database_url: str) -> None:
    async with chatd_server(["--database-url", database_url, "--port", "0"]) as server:
        response = await _healthz(server.url)
        assert response.json() == {"status": "ok", "database": "ok"}


def test_migrate_applies_once(empty_database_url: str) -> None:
    first = run_chatd(["migrate", "--database-url", empty_database_url])
    assert first.returncode == 0, first.stderr
    assert "applied 0001_initial" in first.stdout
    second = run_chatd(["migrate", "--database-url", empty_database_url])
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "the database is up to date"


async def test_token_create_makes_a_working_token(database_url: str) -> None:
    result = run_chatd(["token", "create", "--user", "alice", "--database-url", database_url])
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip()
    assert secret.startswith("chatd_")
    async with Database.connect(database_url, min_size=1, max_size=1) as db:
        user = await users.authenticate(db, secret)
    assert user is not None
    assert user.name == "alice"
    assert not user.is_admin


def test_token_create_refuses_admin_for_an_existing_plain_user(database_url: str) -> None:
    assert (
        run_chatd(["token", "create", "--user", "bob", "--database-url", database_url]).returncode
        == 0
    )
    result = run_chatd(
        ["token", "create", "--user", "bob", "--admin", "--database-url", database_url]
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "chatd: error: user 'bob' exists without admin rights: drop --admin, or pick a new name"
    ]


@pytest.mark.parametrize(
    ("args", "env", "must_mention"),
    [
        (
            ["migrate", "--database-url", "postgresql://chatd:s3cret-pw@127.0.0.1:1/chatd"],
            {},
            "127.0.0.1:1",
        ),
        (
            ["migrate", "--database-url", "postgresql://chatd:s3cret-pw@/chatd?host=/nonexistent"],
            {},
            "/nonexistent",
        ),
        (
            ["migrate", "--database-url", "x"],
            {"CHATD_DB_CONNECT_TIMEOUT_S": "soon"},
            "CHATD_DB_CONNECT_TIMEOUT_S",
        ),
        (["serve", "--port", "70000", "--database-url", "x"], {}, "CHATD_PORT"),
        (["token", "create", "--user", "no spaces", "--database-url", "x"], {}, "--user"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_2(
    args: list[str], env: dict[str, str], must_mention: str
) -> None:
    result = run_chatd(args, env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("chatd: error: ")
    assert must_mention in lines[0]
    assert "s3cret-pw" not in result.stderr


async def test_serve_on_a_database_with_an_edited_migration_says_so_in_one_line(
    database_url: str,
) -> None:
    async with Database.connect(database_url, min_size=1, max_size=1) as db:
        await db.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
    result = await trio.to_thread.run_sync(
        lambda: run_chatd(["serve", "--port", "0", "--database-url", database_url])
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("chatd: error: migration 0001_initial was already applied")
    assert "Traceback" not in result.stderr
