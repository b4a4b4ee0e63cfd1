"""The embedded PostgreSQL launcher's life cycle: reuse, sharing, crashes, foreign owners."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from chatd.store.embedded import EmbeddedPostgres, EmbeddedPostgresError
from tests.e2e.chatd_process import chatd_server

pytestmark = pytest.mark.slow


@pytest.fixture
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chatd-pg-"))
    path.chmod(0o711)
    yield path
    pg = EmbeddedPostgres(path)
    if (path / "pgdata" / "postmaster.pid").exists():
        pg.start()
        pg.stop()
    shutil.rmtree(path, ignore_errors=True)


def _running(home: Path) -> bool:
    return (home / "pgdata" / "postmaster.pid").exists()


def test_the_last_process_to_leave_stops_the_server(home: Path) -> None:
    first = EmbeddedPostgres(home, durable=False)
    second = EmbeddedPostgres(home, durable=False)
    first.start()
    assert second.start() == first.url
    first.stop()
    assert _running(home), "stopped while another process still used it"
    second.stop()
    assert not _running(home)


def test_a_data_directory_of_another_user_is_taken_back_or_explained(home: Path) -> None:
    pg = EmbeddedPostgres(home, durable=False)
    pg.start()
    pg.stop()
    nobody = pwd.getpwnam("nobody")
    for dirpath, dirnames, filenames in os.walk(home / "pgdata"):
        for name in [".", *dirnames, *filenames]:
            os.chown(Path(dirpath) / name, nobody.pw_uid, nobody.pw_gid, follow_symlinks=False)
    again = EmbeddedPostgres(home, durable=False)
    if os.geteuid() == 0:
        again.start()  # root gives the directory back to the server's user
        again.stop()
    else:
        with pytest.raises(EmbeddedPostgresError, match="belongs to uid"):
            again.start()


def test_missing_binaries_are_explained(home: Path, tmp_path: Path) -> None:
    with pytest.raises(EmbeddedPostgresError, match=r"apt-get install postgresql"):
        EmbeddedPostgres(home, bindir=str(tmp_path)).start()


async def test_a_server_left_by_a_killed_chatd_is_adopted_and_stopped(home: Path) -> None:
    args = ["--home", str(home), "--port", "0"]
    async with chatd_server(args) as crashed:
        await crashed.stop(signal.SIGKILL)
    assert _running(home), "the server should outlive a chatd killed with SIGKILL"

    async with chatd_server(args) as server:
        async with httpx2.AsyncClient(timeout=10) as client:
            response = await client.get(f"{server.url}/healthz")
        assert response.json() == {"status": "ok", "database": "ok"}
    assert server.process.returncode == 0
    assert not _running(home)
