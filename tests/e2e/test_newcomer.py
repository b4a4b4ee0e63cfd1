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

import pytest

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
