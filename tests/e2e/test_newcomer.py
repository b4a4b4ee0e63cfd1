"""The newcomer's path on the command line: each stumble seen once, fixed, and kept fixed.

Real processes, real sockets, real PostgreSQL (the embedded one where the stumble is about it).
"""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import trio

from chatd.runtime import NO_MODEL_CONFIG
from tests.e2e.chatd_process import chatd_server, run_chatd

pytestmark = pytest.mark.slow


@pytest.fixture
def home() -> Iterator[Path]:
    """A short path that the `postgres` user can reach when the tests run as root."""
    path = Path(tempfile.mkdtemp(prefix="chatd-new-"))
    path.chmod(0o711)
    yield path / ".chatd"
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_a_taken_port_is_one_line_before_postgres_starts(home: Path, workers: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_chatd(["serve", "--home", str(home), "--port", str(port), *workers])
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        (
            f"chatd: error: port {port} on 127.0.0.1 is in use by another program; pick another "
            "with --port or CHATD_PORT (0: any free port)"
        )
    ]
    assert result.stdout == ""
    assert not home.exists(), "the embedded PostgreSQL was set up for nothing"


async def test_a_port_taken_by_another_chatd_says_so(database_url: str, home: Path) -> None:
    async with chatd_server(["--database-url", database_url, "--port", "0"]) as first:
        port = first.url.rsplit(":", 1)[1]
        result = run_chatd(["serve", "--home", str(home), "--port", port])
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        (
            f"chatd: error: port {port} on 127.0.0.1 is in use by another chatd; pick another "
            "with --port or CHATD_PORT (0: any free port)"
        )
    ]


def test_a_host_not_of_this_machine_is_one_line(home: Path) -> None:
    result = run_chatd(["serve", "--home", str(home), "--host", "192.0.2.1", "--port", "0"])
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        (
            "chatd: error: 192.0.2.1 is not an address of this machine; pick another with --host "
            "or CHATD_HOST (127.0.0.1: this machine only, 0.0.0.0: every interface)"
        )
    ]
    assert not home.exists()


async def test_serve_without_a_model_config_warns_at_start(database_url: str) -> None:
    async with chatd_server(["--database-url", database_url, "--port", "0"]) as server:
        await server.wait_for_line("^warning: no model config")
        # The same line in the log (stderr, merged into the output here).
        await server.wait_for_line(f"WARNING chatd.runtime: {re.escape(NO_MODEL_CONFIG)}")
    assert f"warning: {NO_MODEL_CONFIG}" in server.output


async def test_serve_demo_has_a_model_and_no_warning(database_url: str, home: Path) -> None:
    args = ["--demo", "--database-url", database_url, "--port", "0"]
    async with chatd_server(args) as server:
        await server.wait_for_line("worker .* owns .* shards")
    assert not any("no model config" in line for line in server.output)


async def test_workers_warn_once_without_a_model_config(database_url: str, home: Path) -> None:
    args = ["--workers", "2", "--home", str(home), "--database-url", database_url, "--port", "0"]
    async with chatd_server(args) as server:
        await server.wait_for_line("^warning: no model config")
    assert sum("no model config" in line for line in server.output) == 2  # log + console


# -- chatd token create / list / revoke --------------------------------------------------------


def test_token_create_elsewhere_refuses_to_make_a_database(home: Path) -> None:
    result = run_chatd(["token", "create", "--user", "alice", "--home", str(home)])
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        (
            f"chatd: error: no chatd database in {home} (the home, --home or CHATD_HOME, default "
            "./.chatd): run this where chatd serves (`make run` keeps its home in the clone's "
            ".chatd), or name that home with --home DIR, or pass --init to make a new one here"
        )
    ]
    assert not home.exists()
    listed = run_chatd(["token", "list", "--home", str(home)])
    assert listed.returncode == 2
    assert "--init" not in listed.stderr
    assert not home.exists()


def test_a_token_label_over_the_limit_is_one_line_before_any_database(home: Path) -> None:
    result = run_chatd(
        ["token", "create", "--user", "a", "--label", "x" * 201, "--home", str(home)]
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "chatd: error: --label is 201 characters long: at most 200"
    ]
    assert not home.exists()


def test_token_create_init_list_and_revoke_in_a_home(home: Path) -> None:
    made = run_chatd(
        ["token", "create", "--user", "alice", "--label", "laptop", "--home", str(home), "--init"]
    )
    assert made.returncode == 0, made.stderr
    assert made.stderr.splitlines() == [f"chatd: using the embedded database of home {home}"]
    assert made.stdout.startswith("chatd_")
    again = run_chatd(["token", "create", "--user", "bob", "--home", str(home)])
    assert again.returncode == 0, again.stderr

    listed = run_chatd(["token", "list", "--home", str(home), "--user", "alice"])
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "USER", "LABEL", "CREATED", "LAST", "USED", "REVOKED"]
    assert len(rows) == 1
    token_id, user, label, *_times, revoked = rows[0].split()
    assert (user, label, revoked) == ("alice", "laptop", "-")
    assert len(run_chatd(["token", "list", "--home", str(home)]).stdout.splitlines()) == 3

    revoked_now = run_chatd(["token", "revoke", token_id, "--home", str(home)])
    assert revoked_now.returncode == 0, revoked_now.stderr
    assert revoked_now.stdout.startswith(f"revoked {token_id} (revoked at ")
    after = run_chatd(["token", "list", "--home", str(home), "--user", "alice"])
    assert after.stdout.splitlines()[1].split()[-1] != "-"

    unknown = run_chatd(["token", "list", "--home", str(home), "--user", "carol"])
    assert unknown.returncode == 2
    assert unknown.stderr.splitlines()[-1] == "chatd: error: --user 'carol': no such user"
    missing = run_chatd(
        ["token", "revoke", "00000000-0000-0000-0000-000000000000", "--home", str(home)]
    )
    assert missing.returncode == 2
    assert missing.stderr.splitlines()[-1] == (
        "chatd: error: no token 00000000-0000-0000-0000-000000000000: see `chatd token list`"
    )


async def test_a_token_revoked_on_the_command_line_is_refused_at_once(database_url: str) -> None:
    made = run_chatd(["token", "create", "--user", "alice", "--database-url", database_url])
    secret = made.stdout.strip()
    auth = {"authorization": f"Bearer {secret}"}
    async with (
        chatd_server(["--database-url", database_url, "--port", "0"]) as server,
        httpx2.AsyncClient(headers=auth, timeout=10) as client,
    ):
        me = f"{server.url}/api/v1/users/me"
        assert (await client.get(me)).status_code == 200  # now in the server's token cache
        listed = run_chatd(["token", "list", "--database-url", database_url])
        token_id = listed.stdout.splitlines()[1].split()[0]
        revoked = await trio.to_thread.run_sync(
            lambda: run_chatd(["token", "revoke", token_id, "--database-url", database_url])
        )
        assert revoked.returncode == 0, revoked.stderr
        assert revoked.stderr.splitlines()[0].startswith("chatd: using database ")
        assert (await client.get(me)).status_code == 401


def test_token_create_on_a_database_without_chatd_tables_needs_init(
    empty_database_url: str,
) -> None:
    args = ["token", "create", "--user", "alice", "--database-url", empty_database_url]
    refused = run_chatd(args)
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1].startswith(
        "chatd: error: this database has no chatd tables"
    )
    assert run_chatd([*args, "--init"]).returncode == 0
