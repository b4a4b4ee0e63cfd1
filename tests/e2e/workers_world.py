"""Several real ``chatd serve`` processes sharing one PostgreSQL database: a cluster of workers.

Each worker is its own process (``python -m chatd serve``) with its own port, home and worker
id (``w1``, ``w2``, ...), all on the test's fresh database (``CHATD_DATABASE_URL``), with a
short lease ttl so that a dead or stopped worker's shards are taken within seconds. The fake
LLM runs in the test process (it outlives any worker and records every request); one user and
one admin have tokens. Workers can be added, killed (SIGKILL), stopped (SIGSTOP) and continued
(SIGCONT) while the others run.

The test reads the truth from the database (``shard_leases``, ``chats``, ``chat_messages``) and
each worker's ``/metrics``; clients (``tests/faults/client.py``) talk to any worker, retrying a
503 with its ``Retry-After`` under the same ``Idempotency-Key``, as a careful client does.
Every wait polls a condition under a deadline (``eventually``): none sleeps for a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import signal
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx2
import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

from chatd.providers.fake import FakeLLM, RecordedRequest, open_fake_llm
from chatd.runtime import register_default_model
from chatd.scaletest.prometheus import parse_metrics
from chatd.store import users
from chatd.store.database import Database
from tests.e2e.chatd_process import ServerProcess, chatd_server
from tests.faults.client import ApiClient, ChatStream, Op

T = TypeVar("T")

SHARD_COUNT = 64
# Short, so that failover is quick: a dead worker's shards are free 3 s after its last renewal.
LEASE_TTL_S = 3.0
# Generous: a worker starts in about 3 s alone, several at once share 2 cores.
START_TIMEOUT_S = 60.0
# A client's request (all its retries of a 503) gives up after this long.
OP_DEADLINE_S = 15.0
# Bounds on waits for things that take no time on an idle machine (an answer of a few chunks).
DEADLINE_S = 20.0

WORKER_SETTINGS: Mapping[str, str] = {
    "CHATD_SHARD_COUNT": str(SHARD_COUNT),
    "CHATD_LEASE_TTL_S": str(LEASE_TTL_S),
    "CHATD_DB_POOL_MIN_SIZE": "1",
    "CHATD_DB_POOL_MAX_SIZE": "6",
    "CHATD_DB_CONNECT_TIMEOUT_S": "3",
    "CHATD_DB_COMMAND_TIMEOUT_S": "5",
    "CHATD_DB_LISTEN_RECONNECT_DELAY_S": "0.2",
    "CHATD_ASK_TIMEOUT_S": "5",
    "CHATD_IDEMPOTENCY_PENDING_TIMEOUT_S": "6",
    "CHATD_LINK_TIMEOUT_S": "5",
    "CHATD_HANDOVER_TIMEOUT_S": "5",
    "CHATD_RELAY_RECONNECT_TIMEOUT_S": "15",
    "CHATD_RETRY_BASE_DELAY_S": "0.2",
    "CHATD_RETRY_MAX_DELAY_S": "1",
    "CHATD_STREAM_SILENCE_TIMEOUT_S": "20",
    # Long, so that only a cross-worker invalidation can make an admin change reach another
    # worker's next turn in time (the tests wait far less than this).
    "CHATD_CONFIG_CACHE_TTL_S": "600",
    "CHATD_AUTH_CACHE_TTL_S": "60",
    "CHATD_WS_PING_INTERVAL_S": "0",
    "CHATD_SHUTDOWN_GRACE_S": "1",
    "CHATD_MAX_RUNNING_CHATS_PER_USER": "0",
    "CHATD_MAX_WEBSOCKETS_PER_USER": "0",
}


class Timeout(AssertionError):
    """A condition did not come true within its deadline (the message says what was seen)."""


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    *,
    within_s: float,
    what: str,
    interval_s: float = 0.05,
) -> T:
    """Poll ``probe`` until it returns something true; return that. Past ``within_s``: fail
    with ``what`` and the last value seen."""
    last: T | None = None
    try:
        with trio.fail_after(within_s):
            while True:
                last = await probe()
                if last:
                    return last
                await trio.sleep(interval_s)  # the polling period, not a wait for the condition
    except trio.TooSlowError:
        raise Timeout(f"{what}: not within {within_s:g} s (last seen: {last!r})") from None


def even_counts(workers: int, shards: int = SHARD_COUNT) -> set[int]:
    """The shard counts an even split allows each of ``workers`` live workers: floor or ceil."""
    return {shards // workers, math.ceil(shards / workers)}


# -- one worker --------------------------------------------------------------------------------


@dataclass
class Worker:
    """One ``chatd serve`` process of the cluster."""

    worker_id: str
    home: Path
    server: ServerProcess | None = None
    ready_at: float = 0.0  # trio time at which it printed its URL
    paused: bool = False
    killed_at: float | None = None
    _end: trio.Event = field(default_factory=trio.Event)
    _ended: trio.Event = field(default_factory=trio.Event)

    @property
    def running(self) -> bool:
        return self.server is not None and self.server.process.returncode is None

    @property
    def url(self) -> str:
        assert self.server is not None, f"{self.worker_id} was never started"
        return self.server.url

    @property
    def process(self) -> trio.Process:
        assert self.server is not None, f"{self.worker_id} was never started"
        return self.server.process

    async def kill(self) -> float:
        """kill -9: no shutdown code runs, its connections drop; returns the time of the kill."""
        self.process.kill()
        killed_at = trio.current_time()
        self.killed_at = killed_at
        with trio.fail_after(DEADLINE_S):
            await self.process.wait()
        self._end.set()
        return killed_at

    def pause(self) -> float:
        """SIGSTOP: the process is frozen as it stands (a long GC pause, a stalled VM)."""
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True
        return trio.current_time()

    def resume(self) -> float:
        """SIGCONT after ``pause``."""
        self.process.send_signal(signal.SIGCONT)
        self.paused = False
        return trio.current_time()

    async def stop(self) -> None:
        """A clean stop (SIGINT), waited for; a paused worker is continued first."""
        if self.paused and self.running:
            self.resume()
        self._end.set()
        with trio.fail_after(DEADLINE_S + 30):
            await self._ended.wait()

    def output(self, tail: int = 60) -> str:
        lines = self.server.output if self.server is not None else []
        return "\n".join(lines[-tail:])

    def logged(self, pattern: str) -> list[str]:
        """The lines of its output that match the regex ``pattern``."""
        regex = re.compile(pattern)
        lines = self.server.output if self.server is not None else []
        return [line for line in lines if regex.search(line)]


# -- the cluster -------------------------------------------------------------------------------


@dataclass
class WorkersWorld:
    database_url: str
    db: Database
    llm: FakeLLM
    token: str  # a plain user's
    admin_token: str
    env: dict[str, str]
    _nursery: trio.Nursery
    workers: list[Worker] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)  # every command of every client, in order
    _clients: dict[tuple[str, str], NodeClient] = field(default_factory=dict)
    _homes: list[Path] = field(default_factory=list)

    # -- workers -----------------------------------------------------------------------------

    @property
    def live(self) -> list[Worker]:
        """The workers running now (a paused one counts: its process is there)."""
        return [w for w in self.workers if w.running]

    def worker(self, worker_id: str) -> Worker:
        return next(w for w in self.workers if w.worker_id == worker_id)

    async def add_worker(self) -> Worker:
        """Start one more worker; return once it serves."""
        home = _private_home()
        self._homes.append(home)
        worker = Worker(f"w{len(self.workers) + 1}", home)
        self.workers.append(worker)
        await self._nursery.start(self._run_worker, worker)
        return worker

    async def add_workers(self, count: int) -> list[Worker]:
        """Start ``count`` workers at once (as an operator starting a fleet would)."""
        started: list[Worker] = []

        async def one() -> None:
            started.append(await self.add_worker())

        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
        return sorted(started, key=lambda w: int(w.worker_id[1:]))

    async def _run_worker(self, worker: Worker, *, task_status: trio.TaskStatus[None]) -> None:
        args = ["--port", "0", "--home", str(worker.home)]
        env = {**self.env, "CHATD_WORKER_ID": worker.worker_id}
        try:
            async with chatd_server(args, env=env, timeout_s=START_TIMEOUT_S) as server:
                worker.server = server
                worker.ready_at = trio.current_time()
                task_status.started()
                await worker._end.wait()
                if worker.paused and server.process.returncode is None:
                    worker.resume()  # a stopped process would not see the SIGINT
        finally:
            worker._ended.set()

    def output(self, tail: int = 60) -> str:
        """The last lines each worker printed, for a failure's message."""
        blocks = []
        for worker in self.workers:
            code = worker.server.process.returncode if worker.server is not None else None
            blocks.append(f"--- {worker.worker_id} (exit {code}) ---\n{worker.output(tail)}")
        return "\n".join(blocks)

    # -- what the database says ----------------------------------------------------------------

    async def holdings(self) -> dict[str, set[int]]:
        """Live worker id -> the shards it holds a live lease on (database time)."""
        rows = await self.db.fetch(
            "SELECT shard, worker_id FROM shard_leases WHERE expires_at > now() ORDER BY shard"
        )
        held: dict[str, set[int]] = {}
        for row in rows:
            held.setdefault(row["worker_id"], set()).add(row["shard"])
        return held

    async def leases(self) -> dict[int, tuple[str, int, bool]]:
        """Shard -> (worker id, epoch, live) for every lease row."""
        rows = await self.db.fetch(
            "SELECT shard, worker_id, epoch, expires_at > now() AS live FROM shard_leases"
        )
        return {row["shard"]: (row["worker_id"], row["epoch"], row["live"]) for row in rows}

    async def split(self) -> dict[str, int]:
        return {w: len(s) for w, s in sorted((await self.holdings()).items())}

    async def wait_for_even_split(
        self, workers: Iterable[Worker], *, within_s: float
    ) -> dict[str, int]:
        """Until exactly ``workers`` hold live leases, every shard is held, and each holds floor
        or ceil of shards / workers; returns the split (worker id -> shard count)."""
        ids = {w.worker_id for w in workers}
        allowed = even_counts(len(ids))

        async def probe() -> dict[str, int] | None:
            split = await self.split()
            even = (
                set(split) == ids
                and sum(split.values()) == SHARD_COUNT
                and set(split.values()) <= allowed
            )
            return split if even else None

        try:
            return await eventually(
                probe,
                within_s=within_s,
                what=f"an even split of {SHARD_COUNT} shards over {sorted(ids)}"
                f" (each holding one of {sorted(allowed)})",
            )
        except Timeout as timeout:
            raise Timeout(f"{timeout}; split now {await self.split()}") from None

    async def wait_for_all_shards_held(self, *, within_s: float) -> dict[str, int]:
        """Until every shard has a live lease (whoever holds it)."""

        async def probe() -> dict[str, int] | None:
            split = await self.split()
            return split if sum(split.values()) == SHARD_COUNT else None

        return await eventually(probe, within_s=within_s, what="every shard held")

    async def shard_of(self, chat_id: str) -> int:
        shard: int = await self.db.fetchval(
            "SELECT shard FROM chats WHERE id = $1", uuid.UUID(chat_id)
        )
        return shard

    async def owner_of(self, chat_id: str) -> str | None:
        """The worker holding a live lease on the chat's shard (None: nobody now)."""
        owner: str | None = await self.db.fetchval(
            """
            SELECT l.worker_id FROM chats AS c JOIN shard_leases AS l ON l.shard = c.shard
            WHERE c.id = $1 AND l.expires_at > now()
            """,
            uuid.UUID(chat_id),
        )
        return owner

    async def chat_row(self, chat_id: str) -> dict[str, Any]:
        row = await self.db.fetchrow(
            """
            SELECT status, history_version, generation_attempt, last_message_seq, last_error
            FROM chats WHERE id = $1
            """,
            uuid.UUID(chat_id),
        )
        assert row is not None, f"chat {chat_id} is not stored"
        return dict(row)

    async def stored_messages(self, chat_id: str, *, deleted: bool = False) -> list[dict[str, Any]]:
        """The chat's stored messages in seq order (live ones; with ``deleted``, every row)."""
        rows = await self.db.fetch(
            """
            SELECT id, seq, role, content, history_version, deleted_at IS NOT NULL AS deleted
            FROM chat_messages WHERE chat_id = $1 AND ($2 OR deleted_at IS NULL) ORDER BY seq
            """,
            uuid.UUID(chat_id),
            deleted,
        )
        return [
            {**dict(row), "id": str(row["id"]), "content": _json(row["content"])} for row in rows
        ]

    async def wait_for_status(
        self, chat_id: str, *statuses: str, within_s: float = DEADLINE_S
    ) -> dict[str, Any]:
        """Until the stored chat's status is one of ``statuses``; returns its row."""

        async def probe() -> dict[str, Any] | None:
            row = await self.chat_row(chat_id)
            return row if row["status"] in statuses else None

        return await eventually(
            probe, within_s=within_s, what=f"chat {chat_id} in status {statuses}"
        )

    async def hold_lease_rows(
        self, *, except_shard: int, hold_s: float, task_status: trio.TaskStatus[None]
    ) -> None:
        """Lock every lease row but ``except_shard``'s for ``hold_s`` seconds (a fault: lease
        checks and renewals wait meanwhile, while writes fenced by that one shard go through).
        ``task_status.started()`` once the locks are held."""

        async def locked(conn: Any) -> None:
            await conn.execute(
                "SELECT FROM shard_leases WHERE shard <> $1 ORDER BY shard FOR UPDATE",
                except_shard,
            )
            await conn.execute(f"SELECT pg_sleep({float(hold_s)}) /* {marker} */")

        marker = f"hold-{uuid.uuid4().hex}"

        async def holding() -> bool:
            found: bool = await self.db.fetchval(
                "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE state = 'active'"
                " AND strpos(query, $1) > 0 AND pid <> pg_backend_pid())",
                marker,
            )
            return found

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.db.transaction, locked)
            await eventually(holding, within_s=DEADLINE_S, what="the lease rows locked")
            task_status.started()

    # -- what the fake model was asked -----------------------------------------------------------

    def requests_for(self, tag: str) -> list[RecordedRequest]:
        """The model requests whose last message mentions ``tag`` (a text unique to a turn)."""
        return [r for r in self.llm.requests if tag in _last_message(r)]

    async def wait_for_request(
        self, tag: str, *, count: int = 1, within_s: float = DEADLINE_S
    ) -> RecordedRequest:
        """Until the model got ``count`` requests for the turn ``tag``; returns the last."""
        try:
            with trio.fail_after(within_s):
                await self.llm.wait_until(lambda: len(self.requests_for(tag)) >= count)
        except trio.TooSlowError:
            seen = len(self.requests_for(tag))
            raise Timeout(
                f"{count} model requests for {tag!r}: not within {within_s:g} s ({seen} seen)"
            ) from None
        return self.requests_for(tag)[count - 1]

    # -- clients -------------------------------------------------------------------------------

    def client(self, worker: Worker, *, admin: bool = False) -> NodeClient:
        """The (plain or admin) user's client of ``worker``; its commands go to ``self.ops``."""
        key = (worker.worker_id, "admin" if admin else "user")
        if key not in self._clients:
            self._clients[key] = NodeClient(
                f"{key[1]}@{worker.worker_id}",
                worker.url,
                self.admin_token if admin else self.token,
                self.ops,
                op_deadline_s=OP_DEADLINE_S,
            )
        return self._clients[key]

    def stream(self, worker: Worker, chat_id: str) -> ChatStream:
        """A client's stream of the chat, opened on ``worker`` (reconnecting from its cursor)."""
        return ChatStream(f"stream@{worker.worker_id}", worker.url, self.token, chat_id)

    async def metrics(self, worker: Worker) -> dict[str, float]:
        """The worker's ``/metrics``, parsed (series -> value)."""
        async with httpx2.AsyncClient(
            base_url=worker.url,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=DEADLINE_S,
        ) as http:
            response = await http.get("/api/v1/metrics")
        assert response.status_code == 200, response.text
        return parse_metrics(response.text)


def retarget(stream: ChatStream, worker: Worker) -> None:
    """Point the stream's next reconnections at ``worker``: a client failing over to another
    address (the current connection, if any, stays where it is until it ends)."""
    address = urlsplit(worker.url)
    assert address.hostname is not None
    assert address.port is not None
    # ChatStream keeps its target in these three fields, read at every reconnection.
    stream._host, stream._port, stream._netloc = address.hostname, address.port, address.netloc
    stream.name = f"stream@{worker.worker_id}"


class NodeClient(ApiClient):
    """``ApiClient`` with the queue routes (logged as ops of kind ``queue``)."""

    async def promote(self, chat_id: str, queued_id: str) -> Op:
        op = Op(self.name, "queue", chat_id, target=queued_id)
        await self._run(op, "POST", f"/api/v1/chats/{chat_id}/queue/{queued_id}/promote", None)
        return op

    async def delete_queued(self, chat_id: str, queued_id: str) -> Op:
        op = Op(self.name, "queue", chat_id, target=queued_id)
        await self._run(op, "DELETE", f"/api/v1/chats/{chat_id}/queue/{queued_id}", None)
        return op

    async def command(self, method: str, path: str, body: Any = None) -> Op:
        """Any other mutating request (admin routes...), retried like the others."""
        op = Op(self.name, "other", None)
        await self._run(op, method, path, body)
        return op


# -- WebSocket feeds (watch, inbox) ------------------------------------------------------------


@dataclass
class Feed:
    """The events of one WebSocket, one at a time whatever frames they came in."""

    conn: WebSocketConnection
    seen: list[dict[str, Any]] = field(default_factory=list)
    _read: int = 0

    async def until(
        self, predicate: Callable[[dict[str, Any]], bool], *, within_s: float = DEADLINE_S
    ) -> dict[str, Any]:
        """The first event (already received or to come) that matches."""
        try:
            with trio.fail_after(within_s):
                while True:
                    for event in self.seen[self._read :]:
                        self._read += 1
                        if predicate(event):
                            return event
                    value = json.loads(await self.conn.get_message())
                    self.seen.extend(value if isinstance(value, list) else [value])
        except trio.TooSlowError:
            raise Timeout(
                f"no matching event within {within_s:g} s; got {self.seen[-10:]}"
            ) from None


@contextlib.asynccontextmanager
async def open_feed(worker: Worker, token: str, path: str) -> AsyncIterator[Feed]:
    """A WebSocket on ``worker`` at ``path``, as the token's user."""
    address = urlsplit(worker.url)
    assert address.hostname is not None
    assert address.port is not None
    auth = [(b"authorization", f"Bearer {token}".encode())]
    async with (
        await trio.open_tcp_stream(address.hostname, address.port) as tcp,
        trio.open_nursery() as nursery,
    ):
        with trio.fail_after(DEADLINE_S):
            conn = await wrap_client_stream(nursery, tcp, address.netloc, path, extra_headers=auth)
        try:
            yield Feed(conn)
        finally:
            with trio.move_on_after(2) as cleanup:
                cleanup.shield = True
                await conn.aclose()
            nursery.cancel_scope.cancel()


# -- setting up --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_workers_world(
    database_url: str, *, workers: int, settings: Mapping[str, str] | None = None
) -> AsyncIterator[WorkersWorld]:
    """``workers`` chatd processes (started at once) on the database at ``database_url``."""
    async with (
        Database.connect(database_url, min_size=1, max_size=4) as db,
        open_fake_llm() as llm,
    ):
        await register_default_model(db, base_url=f"{llm.url}/v1")
        user = await users.create_user(db, f"alice-{uuid.uuid4().hex[:8]}")
        _id, token = await users.create_api_token(db, user.id)
        admin = await users.create_user(db, f"root-{uuid.uuid4().hex[:8]}", is_admin=True)
        _id, admin_token = await users.create_api_token(db, admin.id)
        env = {**WORKER_SETTINGS, **(settings or {}), "CHATD_DATABASE_URL": database_url}
        async with trio.open_nursery() as nursery:
            world = WorkersWorld(database_url, db, llm, token, admin_token, env, nursery)
            try:
                if workers:
                    await world.add_workers(workers)
                yield world
            finally:
                with trio.CancelScope(shield=True):
                    for client in world._clients.values():
                        await client.aclose()
                    async with trio.open_nursery() as stopping:
                        for worker in world.workers:
                            stopping.start_soon(worker.stop)
                    for home in world._homes:
                        shutil.rmtree(home, ignore_errors=True)


# -- small helpers -----------------------------------------------------------------------------


def _private_home() -> Path:
    """A short temporary path (unix socket paths are limited) that the `postgres` user can
    reach when the tests run as root."""
    home = Path(tempfile.mkdtemp(prefix="chatd-w-"))
    home.chmod(0o711)
    return home


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _last_message(request: RecordedRequest) -> str:
    body = request.body if isinstance(request.body, dict) else {}
    messages = body.get("messages") or []
    return json.dumps(messages[-1]) if messages else ""


def roles(messages: Iterable[Mapping[str, Any]]) -> list[str]:
    return [str(m["role"]) for m in messages]


def user_texts(messages: Iterable[Mapping[str, Any]]) -> list[str]:
    return [
        "".join(p.get("text", "") for p in m["content"] if p.get("type") == "text")
        for m in messages
        if m["role"] == "user"
    ]


def duplicates(values: Iterable[str]) -> list[str]:
    return [v for v, n in Counter(values).items() if n > 1]
