"""What the internal link adds: a command sent to a worker that does not own its chat (forwarded
to the owner) against the same command sent to the owner, and a stream read through a worker
that relays it against the same stream read from the owner.

Run with ``python -m benchmarks.bench_forwarding``. It starts chatd's embedded PostgreSQL in a
temporary directory (fsync off), ``chatd fake-llm``, and two ``chatd serve`` processes on the
one database (each on its own port, as two machines would be), waits until they split the
shards evenly, creates chats through the first, then measures with one client, one request at
a time (latency, not throughput: the sweep's workers axis measures throughput):

- **refusal**: ``DELETE /api/v1/chats/{id}/queue/{unknown}``, answered 404 by the chat's actor
  without a write: the link's own cost (the ask, its encoding, the refusal sent back);
- **write**: ``PATCH /api/v1/chats/{id}`` flipping ``archived``, one transaction committed by the
  chat's actor;
- **relay**: every event of a turn, received on a stream opened on the owner and on one opened
  on the other worker; the extra is each event's arrival through the relay minus its arrival
  from the owner (paired per event).

The owner and the forwarded request alternate per sample (same chat, same moment), so a drift
of the machine's load shows in both. Takes about a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx2
import trio
import trio_websocket

from benchmarks.bench_bridge import Latency
from benchmarks.report import machine_line
from benchmarks.sweep import (
    HOST,
    RunFailed,
    admin_token,
    chatd_command,
    free_port,
    postgres_version,
    started,
    wait_until_ready,
)
from chatd.client import AsyncClient
from chatd.domain.sharding import shard_of
from chatd.scaletest.driver import add_fake_model
from chatd.scaletest.report import machine
from chatd.store import cluster
from chatd.store.database import Database
from chatd.store.embedded import EmbeddedPostgres

SHARDS = 64
DEADLINE_S = 60.0
MISSING = "00000000-0000-4000-8000-000000000000"
# What makes a stream event itself (the same on every stream of the chat).
_EVENT_KEY = ("type", "seq", "history_version", "generation_attempt", "status")


@dataclass(frozen=True)
class Worker:
    url: str
    worker_id: str


def worker_id_of(log: Path) -> str:
    """The worker id ``chatd serve`` logs once it holds its first shards."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        found = re.search(r"worker (\S+) owns \d+ shards", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        time.sleep(0.1)
    raise RunFailed(f"no 'worker ... owns' line in {log}")


async def settled(db: Database, workers: tuple[Worker, Worker]) -> None:
    """Until the shards are split evenly (the second worker was handed its half)."""
    with trio.fail_after(DEADLINE_S):
        while True:
            held = [o.worker_id for o in (await cluster.shard_owners(db)).values()]
            if all(held.count(w.worker_id) == SHARDS // 2 for w in workers):
                return
            await trio.sleep(0.1)


async def wait_waiting(http: httpx2.AsyncClient, chat_id: str) -> None:
    # Polled: the benchmark's client has no stream on most chats to wait on.
    with trio.fail_after(DEADLINE_S):
        while (  # noqa: ASYNC110
            (await http.get(f"/api/v1/chats/{chat_id}")).json()["status"] != "waiting"
        ):
            await trio.sleep(0.05)


async def paired(
    chats: list[tuple[httpx2.AsyncClient, httpx2.AsyncClient, str]],
    samples: int,
    request: Callable[[httpx2.AsyncClient, str], Awaitable[None]],
) -> tuple[list[float], list[float]]:
    """``samples`` requests each to the owner and to the other worker, alternating first."""
    local: list[float] = []
    forwarded: list[float] = []
    for i in range(samples + samples // 10):
        owner, other, chat_id = chats[i % len(chats)]
        order = [(owner, local), (other, forwarded)]
        for http, into in order if i % 2 else order[::-1]:
            t0 = time.perf_counter()
            await request(http, chat_id)
            if i >= samples // 10:  # the first tenth warms connections and caches up
                into.append(time.perf_counter() - t0)
    return local, forwarded


async def refusal(http: httpx2.AsyncClient, chat_id: str) -> None:
    answer = await http.delete(f"/api/v1/chats/{chat_id}/queue/{MISSING}")
    if answer.status_code != 404:
        raise RunFailed(f"expected 404, got {answer.status_code}: {answer.text}")


class Toggle:
    """PATCH archived to the opposite of what it is: every request is one write by the actor."""

    def __init__(self) -> None:
        self.archived: dict[str, bool] = {}

    async def __call__(self, http: httpx2.AsyncClient, chat_id: str) -> None:
        value = not self.archived.get(chat_id, False)
        answer = await http.patch(f"/api/v1/chats/{chat_id}", json={"archived": value})
        if answer.status_code != 200 or answer.json()["archived"] is not value:
            raise RunFailed(f"expected 200, got {answer.status_code}: {answer.text}")
        self.archived[chat_id] = value


class Arrivals:
    """When each event of a stream arrived (``time.perf_counter``), keyed by what it is."""

    def __init__(self) -> None:
        self.at: dict[tuple[Any, ...], float] = {}
        self.changed = trio.Event()

    async def run(
        self, url: str, token: str, chat_id: str, *, task_status: trio.TaskStatus[None]
    ) -> None:
        ws_url = url.replace("http://", "ws://") + f"/api/v1/chats/{chat_id}/stream"
        headers = [(b"authorization", f"Bearer {token}".encode())]
        async with trio_websocket.open_websocket_url(ws_url, extra_headers=headers) as ws:
            task_status.started()
            while True:
                frame = json.loads(await ws.get_message())
                now = time.perf_counter()
                for event in frame if isinstance(frame, list) else [frame]:
                    key = tuple(event.get(k) for k in _EVENT_KEY)
                    self.at.setdefault(key, now)
                self.changed.set()
                self.changed = trio.Event()

    async def wait_for(self, key: tuple[Any, ...]) -> None:
        with trio.fail_after(DEADLINE_S):
            while key not in self.at:
                await self.changed.wait()


async def relay_extra(
    token: str,
    owner: Worker,
    other: Worker,
    owner_http: httpx2.AsyncClient,
    chat_id: str,
    turns: int,
) -> list[float]:
    """Per event of ``turns`` turns: arrival through the relay minus arrival from the owner."""
    direct, relayed = Arrivals(), Arrivals()
    unarchived = await owner_http.patch(f"/api/v1/chats/{chat_id}", json={"archived": False})
    if unarchived.status_code != 200:
        raise RunFailed(f"unarchive: {unarchived.status_code} {unarchived.text}")
    async with trio.open_nursery() as nursery:
        await nursery.start(direct.run, owner.url, token, chat_id)
        await nursery.start(relayed.run, other.url, token, chat_id)
        for _turn in range(turns):
            sent = await owner_http.post(
                f"/api/v1/chats/{chat_id}/messages", json={"text": "again"}
            )
            if sent.status_code != 202:
                raise RunFailed(f"send: {sent.status_code} {sent.text}")
            await wait_waiting(owner_http, chat_id)
        # Both streams have every event once the chat waits and its last status arrived.
        last = max(direct.at, key=direct.at.__getitem__)
        await relayed.wait_for(last)
        nursery.cancel_scope.cancel()
    return [relayed.at[k] - direct.at[k] for k in direct.at if k in relayed.at]


async def measure(
    url: str, token: str, llm_url: str, workers: tuple[Worker, Worker], args: Any
) -> None:
    async with Database.connect(url) as db:
        await settled(db, workers)
        auth = {"Authorization": f"Bearer {token}"}
        clients = {w.worker_id: httpx2.AsyncClient(base_url=w.url, headers=auth) for w in workers}
        try:
            first = clients[workers[0].worker_id]
            async with AsyncClient(workers[0].url, token) as admin:
                _provider, model = await add_fake_model(
                    admin, name="forwarding", llm_url=llm_url, kind="openai"
                )
            chat_ids = []
            for _ in range(args.chats):
                body = {"text": "hello", "model_config_id": model}
                made = await first.post("/api/v1/chats", json=body)
                if made.status_code != 201:
                    raise RunFailed(f"create: {made.status_code} {made.text}")
                chat_ids.append(made.json()["id"])
            for chat_id in chat_ids:
                await wait_waiting(first, chat_id)
            owners = await cluster.shard_owners(db)
            chats = []
            for chat_id in chat_ids:
                owner_id = owners[shard_of(UUID(chat_id), SHARDS)].worker_id
                other_id = next(w.worker_id for w in workers if w.worker_id != owner_id)
                chats.append((clients[owner_id], clients[other_id], chat_id))

            for name, what, request in (
                ("refusal", "DELETE a queued message that is not there: 404", refusal),
                ("write", "PATCH archived to its opposite: one committed write", Toggle()),
            ):
                local, forwarded = await paired(chats, args.samples, request)
                at_owner, through = Latency.of(local), Latency.of(forwarded)
                print(f"{name} ({what}), {len(local)} samples each way:")
                print(f"  to the owner      {at_owner.line()}")
                print(f"  forwarded         {through.line()}")
                extra = Latency(
                    through.mean_ms - at_owner.mean_ms,
                    through.p50_ms - at_owner.p50_ms,
                    through.p99_ms - at_owner.p99_ms,
                )
                print(f"  extra             {extra.line()}")

            owner_http, _other_http, chat_id = chats[0]
            owner = next(w for w in workers if clients[w.worker_id] is owner_http)
            other = next(w for w in workers if w is not owner)
            gaps = await relay_extra(token, owner, other, owner_http, chat_id, args.turns)
            print(
                f"relay ({args.turns} turns of {args.chunks} chunks, {args.chunk_interval_ms:g} ms "
                f"apart; {len(gaps)} events, relayed minus direct arrival):"
            )
            print(f"  extra             {Latency.of(gaps).line()}")
        finally:
            for client in clients.values():
                await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_forwarding", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--samples", type=int, default=2000, help="requests each way per kind")
    parser.add_argument("--chats", type=int, default=32)
    parser.add_argument("--turns", type=int, default=20, help="turns streamed for the relay")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--chunk-interval-ms", type=float, default=5)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="chatd-forwarding-"))
    work.chmod(0o711)  # PostgreSQL runs as the postgres user when this runs as root
    chatd = chatd_command()
    with EmbeddedPostgres(work / "pg", durable=False) as pg:
        print(f"machine: {machine_line({**machine(), 'postgresql': postgres_version(pg)})}")
        url = pg.url_for("postgres")
        env = {**os.environ, "CHATD_DATABASE_URL": url, "CHATD_SHARD_COUNT": str(SHARDS)}
        token = admin_token(chatd, {**env, "CHATD_HOME": str(work / "h0")}, work / "token.log")
        llm_port = free_port()
        llm_argv = [*chatd, "fake-llm", "--host", HOST, "--port", str(llm_port)]
        llm_argv += ["--chunks", str(args.chunks), "--first-chunk-delay-ms", "0"]
        llm_argv += ["--chunk-interval-ms", f"{args.chunk_interval_ms:g}"]
        with started(llm_argv, work / "llm.log") as llm:
            wait_until_ready(llm, f"tcp://{HOST}:{llm_port}", work / "llm.log", "fake-llm")
            with contextlib.ExitStack() as stack:
                workers: list[Worker] = []
                for i in range(2):
                    port, log = free_port(), work / f"serve{i}.log"
                    serve = [*chatd, "serve", "--host", HOST, "--port", str(port)]
                    server_env = {**env, "CHATD_HOME": str(work / f"h{i}")}
                    proc = stack.enter_context(started(serve, log, server_env))
                    wait_until_ready(proc, f"http://{HOST}:{port}/healthz", log, "chatd serve")
                    workers.append(Worker(f"http://{HOST}:{port}", worker_id_of(log)))
                llm_url = f"http://{HOST}:{llm_port}"
                trio.run(measure, url, token, llm_url, (workers[0], workers[1]), args)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
