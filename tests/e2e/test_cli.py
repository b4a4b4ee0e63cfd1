"""The ``chatd`` command as a user runs it: real processes, real PostgreSQL, real sockets."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import trio

from chatd.providers.fake import DEMO_REPLY, knobs_header
from chatd.store import providers, users
from chatd.store.database import Database
from chatd.store.records import ModelConfig, Provider
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
    assert result.stderr.strip().splitlines()[1:] == [
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


# -- chatd serve --demo (make run) ------------------------------------------------------------


async def _demo_rows(database_url: str) -> tuple[list[Provider], list[ModelConfig]]:
    async with Database.connect(database_url, min_size=1, max_size=1) as db:
        return await providers.list_providers(db), await providers.list_model_configs(db)


async def _default_model(database_url: str) -> tuple[ModelConfig, Provider]:
    async with Database.connect(database_url, min_size=1, max_size=1) as db:
        config = await providers.get_default_model_config(db)
        assert config is not None
        provider = await providers.get_provider(db, config.provider_id)
        assert provider is not None
        return config, provider


async def _ask_fake(base_url: str) -> str:
    """A quick (no pauses) non-streaming completion from the OpenAI-style fake at base_url."""
    async with httpx2.AsyncClient(timeout=10) as client:
        response = await client.post(
            f"{base_url}/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "Hello!"}]},
            headers=knobs_header(first_chunk_delay_ms=0, chunk_interval_ms=0),
        )
    response.raise_for_status()
    text: str = response.json()["choices"][0]["message"]["content"]
    return text


def _demo_args(database_url: str, home: Path) -> list[str]:
    token_file = str(home / "admin-token")
    return [
        "--demo",
        "--database-url",
        database_url,
        "--port",
        "0",
        "--admin-token-file",
        token_file,
    ]


async def test_serve_demo_answers_with_the_fake_model_in_process_and_reuses_its_rows(
    database_url: str, chatd_home: Path
) -> None:
    args = _demo_args(database_url, chatd_home)
    async with chatd_server(args) as first:
        await first.wait_for_line(r"A first session")
        curl = (
            f'  curl -s -X POST {first.url}/api/v1/chats -H "Authorization: Bearer '
            f"{first.admin_token}\" -H 'Content-Type: application/json'"
            """ -d '{"text": "Hello!"}'"""
        )
        assert curl in first.output
        config, provider = await _default_model(database_url)
        assert (config.name, provider.name, provider.kind) == (
            "demo-fake",
            "demo-fake",
            "openai-compatible",
        )
        assert provider.base_url is not None
        assert provider.base_url.startswith("http://127.0.0.1:")
        model_line = (await first.wait_for_line(r"^model: .*")).group(0)
        assert "fake" in model_line
        assert provider.base_url in model_line
        # The default model config points at a fake that this very process serves.
        assert await _ask_fake(provider.base_url) == DEMO_REPLY
    assert first.process.returncode == 0

    async with chatd_server(args) as second:
        again, again_provider = await _default_model(database_url)
        assert (again.id, again_provider.id) == (config.id, provider.id)
        assert again_provider.base_url is not None
        assert await _ask_fake(again_provider.base_url) == DEMO_REPLY
    assert second.process.returncode == 0
    rows = await _demo_rows(database_url)
    assert ([p.name for p in rows[0]], [c.name for c in rows[1]]) == (["demo-fake"], ["demo-fake"])
    assert not any("Traceback" in line for line in first.output + second.output)


async def test_serve_demo_with_an_openai_key_configures_openai(
    database_url: str, chatd_home: Path
) -> None:
    env = {"OPENAI_API_KEY": "sk-test", "ANTHROPIC_API_KEY": "sk-ant-test"}
    async with chatd_server(_demo_args(database_url, chatd_home), env=env) as server:
        model_line = (await server.wait_for_line(r"^model: .*")).group(0)
        await server.wait_for_line(r"curl -s -X POST")
        config, provider = await _default_model(database_url)
    assert server.process.returncode == 0
    assert model_line.startswith("model: OpenAI gpt-4o-mini")
    assert "OpenAI wins" in model_line
    assert (config.name, config.model) == ("demo-openai", "gpt-4o-mini")
    assert (provider.kind, provider.base_url, provider.api_key) == ("openai", None, "sk-test")
    assert not any("sk-test" in line or "sk-ant" in line for line in server.output)


async def test_serve_without_demo_leaves_the_model_rows_alone(database_url: str) -> None:
    async with chatd_server(["--database-url", database_url, "--port", "0"]) as server:
        assert (await _healthz(server.url)).status_code == 200
    assert server.process.returncode == 0
    assert await _demo_rows(database_url) == ([], [])
    assert not any(line.startswith(("model:", "  curl")) for line in server.output)
