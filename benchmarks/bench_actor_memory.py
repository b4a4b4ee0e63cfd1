"""Memory per hibernating chat actor with a long history, without and with a summary boundary.

    .venv/bin/python -m benchmarks.bench_actor_memory [--chats 100] [--messages 1000]

Seeds ``--chats`` chats with ``--messages`` messages each (alternating user and assistant
texts of about 200 characters, written straight into the tables: the engine is not what is
measured), activates every actor with a no-op command, and reports the Python memory still
held per actor once they all hibernate (tracemalloc, which counts what the actors keep whatever
the allocator does with freed pages; resident memory is printed beside it). Then the same with
a summary message after the history (a compacted chat): its actor keeps only what the next
prompt needs. The first is what every actor held before compaction existed, whatever its
history's length. Embedded PostgreSQL, fsync off, in a temporary directory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import tempfile
import tracemalloc
import uuid
from pathlib import Path

import trio

from chatd.actors.engine import EngineOptions, open_engine
from chatd.domain.mailbox import SetArchived
from chatd.domain.sharding import shard_of
from chatd.providers.fake import open_fake_llm
from chatd.runtime import register_default_model
from chatd.store import users
from chatd.store.database import Connection, Database
from chatd.store.embedded import EmbeddedPostgres
from chatd.store.migrate import migrate

SHARDS = 64
TEXT = "The quick brown fox jumps over the lazy dog; " * 4  # about 200 characters


def rss_kib() -> int:
    with open("/proc/self/status") as f:  # noqa: PTH123 - read between phases
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def seed(
    db: Database, owner: uuid.UUID, chats: int, messages: int, *, summarized: bool
) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(chats)]
    last = messages + 1 if summarized else messages
    chat_rows = [(i, owner, shard_of(i, SHARDS), last, last) for i in ids]
    rows = []
    for chat_id in ids:
        for seq in range(1, messages + 1):
            role = "user" if seq % 2 else "assistant"
            content = json.dumps([{"type": "text", "text": f"{seq} {TEXT}"}])
            rows.append((uuid.uuid4(), chat_id, seq, role, content, seq))
        if summarized:
            part = {"type": "chat_summarized", "summary": TEXT * 5, "through_seq": messages}
            rows.append((uuid.uuid4(), chat_id, last, "summary", json.dumps([part]), last))

    async def insert(conn: Connection) -> None:
        await conn.copy_records_to_table(
            "chats",
            records=chat_rows,
            columns=["id", "owner_id", "shard", "last_message_seq", "history_version"],
        )
        await conn.copy_records_to_table(
            "chat_messages",
            records=rows,
            columns=["id", "chat_id", "seq", "role", "content", "history_version"],
        )

    await db.run(insert)
    return ids


async def measure(url: str, chats: int, messages: int) -> None:
    async with Database.connect(url, min_size=4, max_size=16) as db:
        await migrate(db)
        owner = await users.create_user(db, "bench")
        async with open_fake_llm() as llm:
            await register_default_model(db, base_url=f"{llm.url}/v1")
            options = EngineOptions(worker_id="bench", shard_count=SHARDS, idle_timeout_s=3600)
            async with open_engine(db, options) as engine:
                for summarized in (False, True):
                    ids = await seed(db, owner.id, chats, messages, summarized=summarized)
                    gc.collect()
                    rss_before = rss_kib()
                    tracemalloc.start()
                    for chat_id in ids:
                        await engine.router.ask(chat_id, SetArchived(archived=False))
                    gc.collect()
                    held_kib = tracemalloc.get_traced_memory()[0] / 1024
                    tracemalloc.stop()
                    rss_grown = rss_kib() - rss_before
                    what = "with a summary after them" if summarized else "no summary"
                    print(
                        f"  {messages} messages, {what}: {held_kib / chats:,.1f} KiB per "
                        f"hibernating actor ({chats} actors, Python memory held "
                        f"{held_kib / 1024:,.1f} MiB, RSS +{rss_grown / 1024:,.1f} MiB)"
                    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chats", type=int, default=100)
    parser.add_argument("--messages", type=int, default=1000)
    args = parser.parse_args()
    print("machine")
    print(f"  nproc: {os.cpu_count()}, python {platform.python_version()}")
    home = Path(tempfile.mkdtemp(prefix="chatd-bench-"))
    home.chmod(0o711)
    try:
        with EmbeddedPostgres(home, durable=False, max_connections=100) as pg:
            print("  postgresql: embedded, fsync off")
            print("memory per hibernating actor")
            trio.run(measure, pg.url, args.chats, args.messages)
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
