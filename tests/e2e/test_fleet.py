"""``chatd serve --workers N``: a parent process running N worker processes on one port.

Real processes (the parent and its workers, killed with real signals), a real PostgreSQL (the
session's, or the embedded one the parent starts), clients over real sockets.

Which worker answers a connection is the kernel's choice (they all accept on one socket), so a
test that needs a given worker to answer pauses the others (SIGSTOP): a stopped process cannot
accept, and the connection goes to the one left.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
import trio

from chatd.providers.fake import DEMO_REPLY, knobs_header
from chatd.store.database import Database
from chatd.store.embedded import EmbeddedPostgres
from tests.e2e.chatd_process import ServerProcess, chatd_server, run_chatd

pytestmark = pytest.mark.slow

DEADLINE_S = 60.0
SHARDS = 4
# The bound on a worker's own stop once its parent is gone (CHATD_WORKER_STOP_TIMEOUT_S).
STOP_TIMEOUT_S = 10.0
_READY = r"worker (\d+) ready: pid (\d+), worker id (\S+)"


@pytest.fixture
def home() -> Iterator[Path]:
    """A short path that the `postgres` user can reach when the tests run as root."""
    path = Path(tempfile.mkdtemp(prefix="chatd-fleet-"))
    path.chmod(0o711)
    yield path
    if (path / "pgdata" / "postmaster.pid").exists():  # left running by a failed test
        pg = EmbeddedPostgres(path)
        pg.start()
        pg.stop()
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Worker:
    number: int
    pid: int
    worker_id: str


def _args(home: Path, database_url: str | None = None, workers: int = 2) -> list[str]:
    args = ["--workers", str(workers), "--port", "0", "--admin-token-file", str(home / "token")]
    if database_url is not None:
        args += ["--database-url", database_url]
    return args


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {
        "CHATD_HOME": str(home),
        "CHATD_SHARD_COUNT": str(SHARDS),
        "CHATD_WORKER_STOP_TIMEOUT_S": str(STOP_TIMEOUT_S),
        **extra,
    }


def _workers(server: ServerProcess) -> dict[int, Worker]:
    """The workers the parent said were ready, the latest of each number."""
    found: dict[int, Worker] = {}
    for line in server.output:
        if m := re.search(_READY, line):
            found[int(m.group(1))] = Worker(int(m.group(1)), int(m.group(2)), m.group(3))
    return found


async def _ready_again(server: ServerProcess, number: int, old_pid: int) -> Worker:
    """Worker ``number`` ready in a process other than ``old_pid``."""
    pattern = rf"worker ({number}) ready: pid (?!{old_pid}\b)(\d+), worker id (\S+)"
    m = await server.wait_for_line(pattern, timeout_s=DEADLINE_S)
    return Worker(int(m.group(1)), int(m.group(2)), m.group(3))


def _parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def _exit_watch(pids: list[int]) -> Iterator[list[int]]:
    """A pidfd per process (any process, not only our children): readable once it exited."""
    fds = [os.pidfd_open(pid) for pid in pids]
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


async def _all_exited(pidfds: list[int], timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        for fd in pidfds:
            await trio.lowlevel.wait_readable(fd)


@contextlib.asynccontextmanager
async def _paused(pids: list[int]) -> AsyncIterator[None]:
    """SIGSTOP these processes for the block (waiting until the kernel says they stopped)."""
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        with trio.fail_after(DEADLINE_S):
            for pid in pids:
                # No event tells another process's stop: the condition is polled, under the
                # deadline.
                while _state(pid) != "T":  # noqa: ASYNC110
                    await trio.sleep(0.005)
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


async def _serves(server: ServerProcess) -> None:
    """/healthz and an API read answer 200 on a fresh connection."""
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    async with httpx2.AsyncClient(base_url=server.url, timeout=DEADLINE_S) as http:
        health = await http.get("/healthz")
        chats = await http.get("/api/v1/chats", headers=headers)
    assert health.status_code == 200, health.text
    assert chats.status_code == 200, chats.text


async def _each_worker_serves(server: ServerProcess, workers: dict[int, Worker]) -> None:
    for worker in workers.values():
        others = [w.pid for w in workers.values() if w.pid != worker.pid]
        async with _paused(others):
            await _serves(server)


async def _live_leases(database_url: str, worker_id: str | None = None) -> int:
    """Shard leases held live (by ``worker_id``, or by anyone)."""
    async with Database.connect(database_url, min_size=1, max_size=1) as db:
        live = await db.fetchval(
            "SELECT count(*) FROM shard_leases"
            " WHERE expires_at > now() AND ($1::text IS NULL OR worker_id = $1)",
            worker_id,
        )
    return int(live)


def _no_traceback(server: ServerProcess) -> None:
    assert not any("Traceback" in line for line in server.output), "\n".join(server.output)


async def test_two_workers_serve_one_port_and_stop_cleanly_on_sigterm(
    database_url: str, home: Path
) -> None:
    async with chatd_server(_args(home, database_url), env=_env(home)) as server:
        workers = _workers(server)
        assert sorted(workers) == [1, 2]
        assert len({w.pid for w in workers.values()}) == 2
        assert len({w.worker_id for w in workers.values()}) == 2, "each claims its own identity"
        for worker in workers.values():
            assert _parent_of(worker.pid) == server.process.pid
        # The parent printed one ready message, after both were ready.
        assert sum("chatd is serving on" in line for line in server.output) == 1
        await _each_worker_serves(server, workers)
        assert await _live_leases(database_url) > 0
        with _exit_watch([w.pid for w in workers.values()]) as pidfds:
            assert await server.stop(signal.SIGTERM) == 0
            await _all_exited(pidfds, timeout_s=1)  # the parent waited for them
    assert await _live_leases(database_url) == 0, "a worker did not release its leases"
    _no_traceback(server)


async def test_a_killed_worker_is_restarted_in_its_identity_slot(
    database_url: str, home: Path
) -> None:
    async with chatd_server(_args(home, database_url), env=_env(home)) as server:
        before = _workers(server)
        killed_at = trio.current_time()
        os.kill(before[1].pid, signal.SIGKILL)
        again = await _ready_again(server, 1, before[1].pid)
        restart_s = trio.current_time() - killed_at
        assert again.worker_id == before[1].worker_id, "the restarted worker took another slot"
        assert _parent_of(again.pid) == server.process.pid
        await server.wait_for_line(
            rf"worker 1 \(pid {before[1].pid}, worker id \S+\) exited unexpectedly "
            r"\(killed by SIGKILL\): restarting it"
        )
        # The new process serves (the other one paused), and the other one was left alone.
        async with _paused([before[2].pid]):
            await _serves(server)
        assert _workers(server)[2] == before[2]
        assert await server.stop(signal.SIGTERM) == 0
    _no_traceback(server)
    print(f"\nkilled worker serving again after {restart_s:.2f} s")  # the figure (pytest -s)


async def test_a_worker_that_keeps_dying_spends_the_restart_budget_and_the_parent_stops(
    database_url: str, home: Path
) -> None:
    env = _env(home, CHATD_WORKER_RESTART_LIMIT="1", CHATD_WORKER_RESTART_WINDOW_S="600")
    async with chatd_server(_args(home, database_url), env=env) as server:
        first = _workers(server)
        os.kill(first[2].pid, signal.SIGKILL)
        second = await _ready_again(server, 2, first[2].pid)
        with _exit_watch([first[1].pid]) as survivor:
            os.kill(second.pid, signal.SIGKILL)  # the second crash within the window: too many
            with trio.fail_after(DEADLINE_S):
                code = await server.process.wait()
            await _all_exited(survivor, timeout_s=1)
    assert code == 1
    errors = [line for line in server.output if line.startswith("chatd: error:")]
    assert len(errors) == 1, server.output
    assert re.fullmatch(
        rf"chatd: error: worker 2 \(pid {second.pid}, worker id {re.escape(second.worker_id)}\) "
        r"exited unexpectedly \(killed by SIGKILL\) after 1 restart within 600 s "
        r"\(CHATD_WORKER_RESTART_LIMIT=1\): all workers stopped",
        errors[0],
    ), errors[0]
    # The survivor was stopped cleanly (the twice-killed one could not release its own).
    assert await _live_leases(database_url, first[1].worker_id) == 0
    _no_traceback(server)


def test_a_worker_not_ready_in_time_counts_as_crashed(database_url: str, home: Path) -> None:
    env = _env(home, CHATD_WORKER_READY_TIMEOUT_S="0.05", CHATD_WORKER_RESTART_LIMIT="0")
    result = run_chatd(["serve", *_args(home, database_url)], env=env)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"chatd: error: worker \d \(pid \d+\) was not ready within 0\.05 s "
        r"\(CHATD_WORKER_READY_TIMEOUT_S\) after 0 restarts within 60 s "
        r"\(CHATD_WORKER_RESTART_LIMIT=0\): all workers stopped",
        last,
    ), result.stderr
    assert "chatd is serving" not in result.stdout
    assert "Traceback" not in result.stderr


async def test_workers_stop_by_themselves_when_the_parent_is_killed(
    database_url: str, home: Path
) -> None:
    async with chatd_server(_args(home, database_url), env=_env(home)) as server:
        workers = _workers(server)
        with _exit_watch([w.pid for w in workers.values()]) as pidfds:
            killed_at = trio.current_time()
            server.process.kill()  # SIGKILL: the parent cannot stop anyone
            # Each worker sees its parent go (its control socket ends) and stops on its own,
            # cleanly: within its stop timeout, with its leases released.
            await _all_exited(pidfds, timeout_s=STOP_TIMEOUT_S + 5)
            gone_s = trio.current_time() - killed_at
    assert await _live_leases(database_url) == 0
    print(f"\nworkers gone {gone_s:.2f} s after their parent was killed")


async def test_a_worker_that_does_not_stop_is_killed_after_the_stop_timeout(
    database_url: str, home: Path
) -> None:
    env = _env(home, CHATD_WORKER_STOP_TIMEOUT_S="2")
    async with chatd_server(_args(home, database_url), env=env) as server:
        stuck = _workers(server)[1]
        os.kill(stuck.pid, signal.SIGSTOP)  # it cannot act on SIGTERM
        asked_at = trio.current_time()
        assert await server.stop(signal.SIGTERM) == 0
        took_s = trio.current_time() - asked_at
        await server.wait_for_line(
            rf"worker 1 \(pid {stuck.pid}, worker id \S+\) did not stop within 2 s "
            r"\(CHATD_WORKER_STOP_TIMEOUT_S\): killing it"
        )
        await server.wait_for_line(rf"worker 1 \(pid {stuck.pid}, .*stopped \(killed by SIGKILL\)")
    assert took_s >= 2
    _no_traceback(server)


async def test_a_second_signal_kills_the_workers_at_once(database_url: str, home: Path) -> None:
    env = _env(home, CHATD_WORKER_STOP_TIMEOUT_S="600")
    async with chatd_server(_args(home, database_url), env=env) as server:
        stuck = _workers(server)[1]
        os.kill(stuck.pid, signal.SIGSTOP)
        server.process.send_signal(signal.SIGTERM)
        await server.wait_for_line(r"SIGTERM received: stopping the workers")
        server.process.send_signal(signal.SIGTERM)  # again: no waiting out the 600 s
        with trio.fail_after(DEADLINE_S):
            code = await server.process.wait()
    assert code == 0
    assert any("SIGTERM received again: killing the workers now" in line for line in server.output)
    _no_traceback(server)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--workers", "0"],
            {},
            "workers (CHATD_WORKERS) must be a number from 1 to 256, or auto (one per core)",
        ),
        (
            ["--workers", "2"],
            {"CHATD_WORKER_ID": "w1"},
            (
                "worker_id (CHATD_WORKER_ID) names one process, and --workers 2 starts several: "
                "unset it (each worker keeps its own identity in CHATD_HOME)"
            ),
        ),
    ],
)
def test_workers_mistakes_are_one_line_and_exit_2(
    args: list[str], env: dict[str, str], message: str, home: Path
) -> None:
    result = run_chatd(["serve", *args, "--port", "0"], env=_env(home, **env))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"chatd: error: {message}"]


async def test_workers_on_the_embedded_postgresql_with_the_demo_model(home: Path) -> None:
    args = [*_args(home), "--demo"]
    async with chatd_server(args, env=_env(home), timeout_s=120) as server:
        workers = _workers(server)
        assert sorted(workers) == [1, 2]
        await _each_worker_serves(server, workers)
        # The demo's fake model is served by the parent, for every worker.
        model_line = (await server.wait_for_line(r"^model: .*")).group(0)
        fake_url = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", model_line)
        assert fake_url is not None, model_line
        await server.wait_for_line(r"curl -s -X POST")
        async with httpx2.AsyncClient(timeout=10) as client:
            response = await client.post(
                f"{fake_url.group(1)}/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "Hello!"}]},
                headers=knobs_header(first_chunk_delay_ms=0, chunk_interval_ms=0),
            )
        assert response.json()["choices"][0]["message"]["content"] == DEMO_REPLY
        with _exit_watch([w.pid for w in workers.values()]) as pidfds:
            assert await server.stop(signal.SIGTERM) == 0
            await _all_exited(pidfds, timeout_s=1)
    assert not (home / "pgdata" / "postmaster.pid").exists(), "the embedded server still runs"
    _no_traceback(server)


def test_a_taken_port_is_one_line_and_exit_2(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_chatd(["serve", "--workers", "2", "--port", str(port)], env=_env(home))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        (
            f"chatd: error: port {port} on 127.0.0.1 is in use by another program; pick another "
            "with --port or CHATD_PORT (0: any free port)"
        )
    ]
    assert not (home / "pgdata").exists(), "the embedded server was started for nothing"
