"""Migrations from an empty database: applied in order, once, and never silently edited."""

from __future__ import annotations

import dataclasses

import asyncpg
import pytest
import trio

from chatd.store.database import Database
from chatd.store.migrate import MigrationError, applied_versions, bundled_migrations, migrate


async def _tables(db: Database) -> set[str]:
    rows = await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r["tablename"] for r in rows}


async def test_apply_from_empty_then_again_is_a_no_op(empty_database_url: str) -> None:
    async with Database.connect(empty_database_url, min_size=1, max_size=2) as db:
        assert await applied_versions(db) == []
        applied = await migrate(db)
        assert [m.version for m in applied] == [m.version for m in bundled_migrations()]
        tables = await _tables(db)
        assert {"users", "api_tokens", "chats", "chat_messages", "shard_leases"} <= tables
        assert await migrate(db) == []
        assert await _tables(db) == tables
        assert await applied_versions(db) == [m.version for m in bundled_migrations()]


async def test_concurrent_migrators_apply_each_migration_once(empty_database_url: str) -> None:
    results: list[int] = []
    async with Database.connect(empty_database_url, min_size=1, max_size=4) as db:

        async def one() -> None:
            results.append(len(await migrate(db)))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
        # Each migration runs in its own transaction, so the migrators may share the work;
        # every migration is applied exactly once in all.
        assert sum(results) == len(bundled_migrations())
        assert await applied_versions(db) == [m.version for m in bundled_migrations()]


async def test_an_edited_applied_migration_is_refused(db: Database) -> None:
    first, *rest = bundled_migrations()
    edited = dataclasses.replace(first, sql=first.sql + "\n-- edited")
    with pytest.raises(MigrationError, match="has changed"):
        await migrate(db, [edited, *rest])


async def test_a_database_from_a_newer_chatd_is_refused(db: Database) -> None:
    await db.execute(
        "INSERT INTO schema_migrations (version, name, checksum) VALUES (999, 'future', 'x')"
    )
    with pytest.raises(MigrationError, match="newer than this chatd"):
        await migrate(db)


async def test_a_failing_migration_leaves_nothing_behind(empty_database_url: str) -> None:
    broken = dataclasses.replace(
        bundled_migrations()[0], sql="CREATE TABLE half_made (id int); SELECT 1/0;"
    )
    async with Database.connect(empty_database_url, min_size=1, max_size=2) as db:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrate(db, [broken])
        assert "half_made" not in await _tables(db)
        assert await applied_versions(db) == []
