"""The actor engine: ask throughput, memory per idle actor, activation and passivation cost,
and database work per plain turn.

    .venv/bin/python -m benchmarks.bench_engine [--chats 10000 100000] [--turns 200]

Runs chatd's embedded PostgreSQL (fsync off) in a temporary directory and the fake provider in
this process; everything is in one process, so the CPU figures include the fake provider's
share for the turn measurement (said so in the output).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import trio

from chatd.actors.chat_actor import CreateChatRequest
from chatd.actors.engine import Engine, EngineOptions, open_engine
from chatd.actors.hub import StreamCursor
from chatd.domain.chat_status import ChatStatus
from chatd.domain.events import StatusChanged
from chatd.domain.mailbox import Interrupt, SendMessage, SetArchived
from chatd.domain.sharding import shard_of
from chatd.providers.fake import knobs_marker, open_fake_llm
from chatd.runtime import register_default_model
from chatd.store import users
from chatd.store.database import Connection, Database
from chatd.store.embedded import EmbeddedPostgres
from chatd.store.migrate import migrate

SHARDS = 64


def rss_kib() -> int:
    with open("/proc/self/status") as f:  # noqa: PTH123 - read between phases
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def seed_chats(db: Database, owner: uuid.UUID, n: int) -> list[uuid.UUID]:
    """Idle chats written straight into the table (the engine is not what is measured here)."""
    ids = [uuid.uuid4() for _ in range(n)]
    rows = [(i, owner, shard_of(i, SHARDS)) for i in ids]

    async def insert(conn: Connection) -> None:
        await conn.copy_records_to_table("chats", records=rows, columns=["id", "owner_id", "shard"])

    await db.run(insert)
    return ids


async def wait_waiting(engine: Engine, chat_id: uuid.UUID) -> None:
    with trio.fail_after(60):
        async with engine.hub.subscribe(chat_id, StreamCursor()) as events:
            async for batch in events:
                for e in batch:
                    if isinstance(e, StatusChanged) and e.status is ChatStatus.WAITING:
                        return


async def measure(url: str, sizes: list[int], turns: int) -> None:
    async with Database.connect(url, min_size=4, max_size=16) as db:
        await migrate(db)
        owner = await users.create_user(db, "bench")
        async with open_fake_llm() as llm:
            await register_default_model(db, base_url=f"{llm.url}/v1")
            options = EngineOptions(worker_id="bench", shard_count=SHARDS, idle_timeout_s=3600)
            async with open_engine(db, options) as engine:
                await plain_turns(db, engine, owner.id, turns)
                await asks(engine, db, owner.id)
                for n in sizes:
                    await activation(engine, db, owner.id, n)
            for n in sizes:
                await passivation(db, owner.id, n)


async def plain_turns(db: Database, engine: Engine, owner: uuid.UUID, turns: int) -> None:
    marker = knobs_marker(chunks=20)
    chat_id = uuid.uuid4()
    await engine.router.ask(chat_id, CreateChatRequest(owner, uuid.uuid4(), f"{marker} hi"))
    await wait_waiting(engine, chat_id)
    tx0, st0 = db.stats.transactions, db.stats.statements
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(turns):
        await engine.router.ask(chat_id, SendMessage(uuid.uuid4(), f"{marker} again"))
        await wait_waiting(engine, chat_id)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    tx = db.stats.transactions - tx0
    print(f"\nplain turns (20 chunks, no delay), one chat, {turns} turns in a row")
    print(f"  transactions per turn: {tx / turns:.2f}")
    print(
        "  statements per turn (the two commits with BEGIN and COMMIT, and the waiting "
        f"subscriber's hub reads): "
        f"{(db.stats.statements - st0) / turns:.2f}"
    )
    print(
        f"  {turns / wall:.1f} turns/s, {cpu / turns * 1000:.2f} ms CPU per turn "
        "(engine + fake provider + subscriber, one process)"
    )


async def asks(engine: Engine, db: Database, owner: uuid.UUID) -> None:
    chat_ids = await seed_chats(db, owner, 100)
    for chat_id in chat_ids:  # activate
        await engine.router.ask(chat_id, Interrupt())
    for label, writes in (
        ("no-op ask (Interrupt on an idle chat: no database write)", False),
        ("ask that commits (SetArchived toggled)", True),
    ):
        n = 0
        cpu0, t0 = time.process_time(), time.perf_counter()

        async def worker(chat_id: uuid.UUID, *, writes: bool = writes) -> None:
            nonlocal n
            for i in range(50):
                message = SetArchived(archived=i % 2 == 0) if writes else Interrupt()
                await engine.router.ask(chat_id, message)
                n += 1

        async with trio.open_nursery() as nursery:
            for chat_id in chat_ids:
                nursery.start_soon(worker, chat_id)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        print(f"\n{label}, 100 chats x 50 asks concurrently")
        print(f"  {n / wall:,.0f} asks/s, {cpu / n * 1e6:.0f} us CPU per ask")


async def activation(engine: Engine, db: Database, owner: uuid.UUID, n: int) -> None:
    chat_ids = await seed_chats(db, owner, n)
    gc.collect()
    rss0 = rss_kib()
    active0 = engine.supervisor.active_actors
    t0 = time.perf_counter()
    limiter = trio.CapacityLimiter(64)

    async def activate(chat_id: uuid.UUID) -> None:
        async with limiter:
            await engine.router.ask(chat_id, Interrupt())

    async with trio.open_nursery() as nursery:
        for chat_id in chat_ids:
            nursery.start_soon(activate, chat_id)
    wall = time.perf_counter() - t0
    gc.collect()
    grown = rss_kib() - rss0
    active = engine.supervisor.active_actors - active0
    hibernating = engine.supervisor.hibernating_actors
    print(f"\nactivation of {n:,} idle chats (64 at a time; each loads its chat from the DB)")
    print(f"  {n / wall:,.0f} activations/s ({wall / n * 1e3:.2f} ms each)")
    print(
        f"  memory: {grown / 1024:.0f} MiB for {active:,} idle actors, "
        f"{grown * 1024 / max(active, 1) / 1024:.1f} KiB per actor"
        f" ({hibernating:,} of all the active actors hibernating: state kept, no task)"
    )


async def passivation(db: Database, owner: uuid.UUID, n: int) -> None:
    """A separate engine whose idle timeout outlasts the activation of all n: then measure the
    CPU spent from the end of activation until every actor has passivated."""
    chat_ids = await seed_chats(db, owner, n)
    idle_s = 5 + n / 500  # activation runs at about 1,500/s here
    options = EngineOptions(worker_id="bench-p", shard_count=SHARDS, idle_timeout_s=idle_s)
    async with open_engine(db, options) as engine:
        limiter = trio.CapacityLimiter(64)

        async def activate(chat_id: uuid.UUID) -> None:
            async with limiter:
                await engine.router.ask(chat_id, Interrupt())

        async with trio.open_nursery() as nursery:
            for chat_id in chat_ids:
                nursery.start_soon(activate, chat_id)
        early = engine.supervisor.stats.passivations
        cpu0 = time.process_time()
        with trio.fail_after(idle_s + 600):
            await engine.supervisor.wait_until(lambda: engine.supervisor.active_actors == 0)
        cpu = time.process_time() - cpu0
        passivated = engine.supervisor.stats.passivations - early
    print(f"\npassivation of {n:,} idle actors ({idle_s:.0f} s idle timeout)")
    print(
        f"  {passivated:,} passivated after activation ended ({early:,} before);"
        f" {cpu / max(passivated, 1) * 1e6:.0f} us CPU per passivation"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chats", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--turns", type=int, default=200)
    args = parser.parse_args()
    print("machine")
    print(f"  nproc: {os.cpu_count()}, python {platform.python_version()}")
    home = Path(tempfile.mkdtemp(prefix="chatd-bench-"))
    home.chmod(0o711)
    try:
        with EmbeddedPostgres(home, durable=False, max_connections=100) as pg:
            print("  postgresql: embedded, fsync off")
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            del soft
            trio.run(measure, pg.url, args.chats, args.turns)
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
