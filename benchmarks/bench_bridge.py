"""How much the asyncio bridge costs: asyncpg from trio versus asyncpg on plain asyncio.

Run with ``python -m benchmarks.bench_bridge``. It starts chatd's embedded PostgreSQL in a
temporary directory (``durable=False``: fsync and synchronous_commit off, so commits are cheaper
than on a durable server), then measures:

- single-caller latency of ``SELECT 1`` through the bridge (and on plain asyncio);
- ``SELECT 1`` throughput from 1, 10, 50 and 200 concurrent trio tasks through the bridge, and
  from as many asyncio tasks on plain asyncpg (its own ``asyncio.run``, same pool settings and the
  same connection class, i.e. no reset query on release);
- small INSERT transactions per second through ``Database.transaction``.

The whole run takes well under a minute with the default settings.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import trio

from chatd.store.database import Connection, Database, _Connection
from chatd.store.embedded import EmbeddedPostgres

CONCURRENCY = (1, 10, 50, 200)
TX_CONCURRENCY = (1, 16, 50)
POOL_MIN, POOL_MAX = 2, 16
WARMUP_S = 0.3


@dataclass(frozen=True)
class Settings:
    duration_s: float
    latency_n: int


@dataclass(frozen=True)
class Rate:
    per_s: float
    cpu_us_per_op: float  # process CPU time (every thread, PostgreSQL excluded) per operation

    @classmethod
    def of(cls, done: int, wall_s: float, cpu_s: float) -> Rate:
        return cls(done / wall_s, cpu_s / max(done, 1) * 1e6)

    def line(self, unit: str) -> str:
        return f"{self.per_s:8.0f} {unit}/s   {self.cpu_us_per_op:5.0f} us CPU per op"


@dataclass(frozen=True)
class Latency:
    mean_ms: float
    p50_ms: float
    p99_ms: float

    @classmethod
    def of(cls, samples_s: list[float]) -> Latency:
        ordered = sorted(samples_s)

        def at(q: float) -> float:
            return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000

        return cls(statistics.fmean(ordered) * 1000, at(0.50), at(0.99))

    def line(self) -> str:
        return f"mean {self.mean_ms:6.3f} ms  p50 {self.p50_ms:6.3f} ms  p99 {self.p99_ms:6.3f} ms"


# -- machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def print_machine(pg_version: str) -> None:
    print("machine")
    print(f"  nproc:       {usable_cpus()} (os.cpu_count {os.cpu_count()})")
    print(f"  cpu:         {cpu_model()}")
    print(f"  python:      {sys.version.split()[0]} ({platform.python_implementation()})")
    print(f"  trio:        {trio.__version__}, asyncpg {asyncpg.__version__}")
    print(f"  postgresql:  {pg_version}, chatd embedded server, durable=False")
    print("               (fsync=off, synchronous_commit=off: commits cost less than on disk)")
    print(f"  pool:        min {POOL_MIN}, max {POOL_MAX} connections, no reset query")


# -- through the bridge (trio) -------------------------------------------------------------


async def trio_rate(
    concurrency: int, duration_s: float, op: Callable[[int], Awaitable[object]]
) -> Rate:
    """Operations per second from ``concurrency`` trio tasks calling ``op`` for ``duration_s``."""
    done = 0
    deadline = trio.current_time() + duration_s

    async def worker(n: int) -> None:
        nonlocal done
        while trio.current_time() < deadline:
            await op(n)
            done += 1

    started, cpu_started = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for n in range(concurrency):
            nursery.start_soon(worker, n)
    return Rate.of(done, time.perf_counter() - started, time.process_time() - cpu_started)


async def bench_bridge(url: str, settings: Settings) -> None:
    async with Database.connect(url, min_size=POOL_MIN, max_size=POOL_MAX) as db:

        async def select_one(_n: int) -> object:
            return await db.fetchval("SELECT 1")

        await trio_rate(1, WARMUP_S, select_one)
        samples: list[float] = []
        for _ in range(settings.latency_n):
            started = time.perf_counter()
            await db.fetchval("SELECT 1")
            samples.append(time.perf_counter() - started)
        print(f"\nSELECT 1 latency, one caller, n={settings.latency_n}")
        print(f"  trio via bridge:   {Latency.of(samples).line()}")

        print(f"\nSELECT 1 throughput through the bridge ({settings.duration_s:.1f} s each)")
        for concurrency in CONCURRENCY:
            await trio_rate(concurrency, WARMUP_S, select_one)
            rate = await trio_rate(concurrency, settings.duration_s, select_one)
            print(f"  {concurrency:4d} trio tasks:    {rate.line('queries')}")

        await db.execute(
            "CREATE TABLE bench_tx (id bigserial PRIMARY KEY, chat int NOT NULL,"
            " body text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
        )

        async def insert_tx(n: int) -> object:
            async def insert(conn: Connection) -> None:
                await conn.execute("INSERT INTO bench_tx (chat, body) VALUES ($1, $2)", n, "hi")

            return await db.transaction(insert)

        print(
            f"\nINSERT transactions through Database.transaction ({settings.duration_s:.1f} s"
            " each; BEGIN + INSERT + COMMIT)"
        )
        for concurrency in TX_CONCURRENCY:
            await trio_rate(concurrency, WARMUP_S, insert_tx)
            rate = await trio_rate(concurrency, settings.duration_s, insert_tx)
            print(f"  {concurrency:4d} trio tasks:    {rate.line('transactions')}")
        rows = await db.fetchval("SELECT count(*) FROM bench_tx")
        print(f"  ({rows} rows inserted)")


# -- plain asyncio, for comparison ---------------------------------------------------------


async def asyncio_rate(
    concurrency: int, duration_s: float, op: Callable[[], Awaitable[object]]
) -> Rate:
    loop = asyncio.get_running_loop()
    done = 0
    deadline = loop.time() + duration_s

    async def worker() -> None:
        nonlocal done
        while loop.time() < deadline:
            await op()
            done += 1

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Rate.of(done, time.perf_counter() - started, time.process_time() - cpu_started)


async def bench_asyncio(url: str, settings: Settings) -> None:
    pool: asyncpg.Pool[asyncpg.Record] = await asyncpg.create_pool(
        url, min_size=POOL_MIN, max_size=POOL_MAX, connection_class=_Connection
    )
    try:

        async def select_one() -> object:
            return await pool.fetchval("SELECT 1")

        await asyncio_rate(1, WARMUP_S, select_one)
        samples: list[float] = []
        for _ in range(settings.latency_n):
            started = time.perf_counter()
            await pool.fetchval("SELECT 1")
            samples.append(time.perf_counter() - started)
        print(f"\nSELECT 1 latency, one caller, n={settings.latency_n}")
        print(f"  plain asyncio:     {Latency.of(samples).line()}")

        print(f"\nSELECT 1 throughput, plain asyncio + asyncpg ({settings.duration_s:.1f} s each)")
        for concurrency in CONCURRENCY:
            await asyncio_rate(concurrency, WARMUP_S, select_one)
            rate = await asyncio_rate(concurrency, settings.duration_s, select_one)
            print(f"  {concurrency:4d} asyncio tasks: {rate.line('queries')}")
    finally:
        await pool.close()


async def server_version(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        version: str = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--latency-n", type=int, default=2000, help="queries for the latency")
    args = parser.parse_args()
    settings = Settings(duration_s=args.duration, latency_n=args.latency_n)

    began = time.perf_counter()
    # A short path: the unix socket path must fit in 108 bytes, and when running as root the
    # `postgres` user must be able to reach it.
    home = Path(tempfile.mkdtemp(prefix="chatd-bench-"))
    home.chmod(0o711)
    pg = EmbeddedPostgres(home, durable=False, bindir=os.environ.get("CHATD_PG_BIN"))
    try:
        url = pg.start()
        print_machine(asyncio.run(server_version(url)))
        print(f"  server start: {time.perf_counter() - began:.1f} s (initdb included)")
        sys.stdout.flush()
        trio.run(bench_bridge, url, settings)
        sys.stdout.flush()
        asyncio.run(bench_asyncio(url, settings))
    finally:
        pg.stop()
        shutil.rmtree(home, ignore_errors=True)
    print(f"\ntotal run time: {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
