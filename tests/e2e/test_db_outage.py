"""A PostgreSQL blip under a running chat, from outside: ``chatd serve`` as a real process on its
own embedded PostgreSQL, the server stopped with ``pg_ctl stop -m fast`` mid-answer and started
again 5 s later, a client watching the chat's stream over a real WebSocket.

The chat must continue on its own once PostgreSQL is back (the answer whose commit failed is
committed by the restarted actor, not generated again) and reach ``waiting`` within a few
seconds, and the stream a client resumes must show the answer once. Real time, every wait under
a deadline; the only sleep is the outage itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shlex
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx2
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from chatd.providers.fake import knobs_marker
from chatd.store.embedded import EmbeddedPostgres, find_binaries
from tests.e2e.chatd_process import chatd_server

pytestmark = pytest.mark.slow

ANSWER = "".join(f"w{i} " for i in range(1, 61))
# 60 chunks 50 ms apart: a 3 s answer, so that PostgreSQL goes away in the middle of it.
LONG_TURN = knobs_marker(reply=ANSWER, chunks=60, chunk_interval_ms=50)
OUTAGE_S = 5.0
DEADLINE_S = 60.0


@pytest.fixture
def chatd_home() -> Iterator[Path]:
    """A short path that the `postgres` user can reach when the tests run as root."""
    home = Path(tempfile.mkdtemp(prefix="chatd-outage-"))
    home.chmod(0o711)
    yield home
    if (home / "pgdata" / "postmaster.pid").exists():  # left running by a failed test
        pg = EmbeddedPostgres(home)
        pg.start()
        pg.stop()
    shutil.rmtree(home, ignore_errors=True)


class PgControl:
    """``pg_ctl`` on the data directory of a chatd home, as the server's own user."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.data_dir = home / "pgdata"
        self._pg_ctl = find_binaries(os.environ.get("CHATD_PG_BIN")).path("pg_ctl")
        self._user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self._options = ""

    async def _run(self, *args: str) -> None:
        env = {**os.environ, "LC_ALL": "C.UTF-8"}
        kwargs: dict[str, Any] = {}
        if self._user is not None:
            env["HOME"] = self._user.pw_dir
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        with trio.fail_after(DEADLINE_S):
            await trio.run_process(
                [self._pg_ctl, *args],
                env=env,
                cwd=str(self.home),
                capture_stdout=True,
                capture_stderr=True,
                **kwargs,
            )

    async def stop_fast(self) -> None:
        # Start it again as chatd started it: the options are those the server runs with now.
        argv = shlex.split((self.data_dir / "postmaster.opts").read_text())
        options = [a for i, a in enumerate(argv[1:], 1) if "-D" not in (a, argv[i - 1])]
        self._options = " ".join(options)
        await self._run("stop", "-D", str(self.data_dir), "-m", "fast", "-w")

    async def start(self) -> None:
        log_file = str(self.home / "postgres.log")
        await self._run(
            "start", "-D", str(self.data_dir), "-w", "-l", log_file, "-o", self._options
        )


@dataclass
class Watcher:
    """A client of the chat's stream that reconnects with its cursor whenever it is cut."""

    url: str
    token: str
    chat_id: str
    events: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    connections: int = 0
    cursor: dict[str, int] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)

    async def run(self) -> None:
        while True:
            try:
                async with self._connect() as conn:
                    self.connections += 1
                    while True:
                        self._take(json.loads(await conn.get_message()))
            except (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError):
                await trio.sleep(0.2)  # a client's retry delay, not a wait for a condition

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[WebSocketConnection]:
        address = urlsplit(self.url)
        assert address.hostname is not None
        assert address.port is not None
        path = f"/api/v1/chats/{self.chat_id}/stream"
        if self.cursor:
            path += "?" + urlencode(self.cursor)
        auth = [(b"authorization", f"Bearer {self.token}".encode())]
        async with (
            await trio.open_tcp_stream(address.hostname, address.port) as tcp,
            trio.open_nursery() as nursery,
        ):
            conn = await wrap_client_stream(nursery, tcp, address.netloc, path, extra_headers=auth)
            try:
                yield conn
            finally:
                with trio.move_on_after(5, shield=True):
                    await conn.aclose()

    def _take(self, frame: Any) -> None:
        for event in frame if isinstance(frame, list) else [frame]:
            self.events.append(event)
            self.arrivals.append(time.monotonic())
            if event["type"] == "message":
                self.cursor = {"message_seq": event["seq"]}
            elif event["type"] == "message_part":
                self.cursor = {
                    "message_seq": self.cursor.get("message_seq", 0),
                    "history_version": event["history_version"],
                    "generation_attempt": event["generation_attempt"],
                    "part_seq": event["seq"],
                }
        self.changed.set()
        self.changed = trio.Event()

    async def until(self, predicate: Any) -> dict[str, Any]:
        """The first event (seen so far or to come) that matches."""
        seen = 0
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            await self.changed.wait()

    def arrival_of(self, event: dict[str, Any]) -> float:
        return self.arrivals[next(i for i, e in enumerate(self.events) if e is event)]


def _text(message: dict[str, Any]) -> str:
    return "".join(str(p.get("text", "")) for p in message["content"])


async def test_a_running_chat_completes_by_itself_after_postgresql_restarts(
    chatd_home: Path,
) -> None:
    token_file = chatd_home / "admin-token"
    args = ["--home", str(chatd_home), "--port", "0", "--demo", "--admin-token-file"]
    async with chatd_server([*args, str(token_file)]) as server:
        assert server.admin_token is not None
        headers = {"Authorization": f"Bearer {server.admin_token}"}
        pg = PgControl(chatd_home)
        async with (
            httpx2.AsyncClient(base_url=server.url, headers=headers, timeout=10) as http,
            trio.open_nursery() as nursery,
        ):
            response = await http.post("/api/v1/chats", json={"text": f"{LONG_TURN} go on"})
            assert response.status_code == 201, response.text
            chat_id = response.json()["id"]
            watcher = Watcher(server.url, server.admin_token, chat_id)
            nursery.start_soon(watcher.run)

            with trio.fail_after(DEADLINE_S):
                # Mid-answer: 1.5 s into the 3 s answer, PostgreSQL goes away for 5 s.
                await watcher.until(lambda e: e["type"] == "message_part" and e["seq"] >= 30)
                await pg.stop_fast()
                down = time.monotonic()
                # The answer streams to its end; its commit fails. A message now is refused at
                # once with 503 and Retry-After, not left hanging until PostgreSQL is back.
                await watcher.until(lambda e: e["type"] == "message_part" and e["seq"] >= 60)
                sent = time.monotonic()
                refused = await http.post(
                    f"/api/v1/chats/{chat_id}/messages", json={"text": "are you there?"}
                )
                assert refused.status_code == 503, refused.text
                assert refused.headers["retry-after"].isdigit()
                assert time.monotonic() - sent < 2
                await trio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down)))  # the outage
                await pg.start()
                back = time.monotonic()
                done = await watcher.until(
                    lambda e: e["type"] == "status" and e["status"] in ("waiting", "error")
                )
            recovery_s = watcher.arrival_of(done) - back
            print(f"\nchat {done['status']} {recovery_s:.2f} s after PostgreSQL came back")

            chat = (await http.get(f"/api/v1/chats/{chat_id}")).json()
            nursery.cancel_scope.cancel()

        # A classified error would do, but nothing here fails for good: the turn completes.
        assert done["status"] == "waiting", watcher.events[-5:]
        assert chat["status"] == "waiting"
        # The step the outage cut short is committed by the actor's restart (its back-off is at
        # most 2 s by default), not generated again: no 3 s answer to wait for a second time.
        assert recovery_s < 2 + 2, f"took {recovery_s:.1f} s after PostgreSQL came back"

        # The stream showed the answer once: streamed, then committed as one message.
        answers = [e for e in watcher.events if e["type"] == "message" and e["role"] == "assistant"]
        assert [_text(m) for m in answers] == [ANSWER]
        assert not [e for e in watcher.events if e["type"] == "preview_reset"]
        parts = [e["part"].get("text", "") for e in watcher.events if e["type"] == "message_part"]
        assert "".join(parts) == ANSWER

        # A client that opens the stream afresh sees the turn once.
        fresh = Watcher(server.url, server.admin_token, chat_id)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fresh.run)
            with trio.fail_after(DEADLINE_S):
                await fresh.until(lambda e: e["type"] == "message" and e["role"] == "assistant")
            nursery.cancel_scope.cancel()
        messages = [(e["role"], _text(e)) for e in fresh.events if e["type"] == "message"]
        assert messages == [("user", f"{LONG_TURN} go on"), ("assistant", ANSWER)]
    assert server.process.returncode == 0
    # Waited out, not taken for a crash: no restart budget spent, nothing parked.
    assert not any(" crashed" in line or "parking" in line for line in server.output)
