"""Schema migrations: plain SQL files in ``chatd/store/migrations``, applied in order.

Each file is named ``NNNN_description.sql`` and runs in its own transaction; the migrations
table records its version and a SHA-256 of its text, so an edited migration that was already
applied is refused instead of silently ignored. A transaction-level advisory lock serialises
workers that start together.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from importlib import resources

from chatd.store.database import Connection, Database

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# An arbitrary constant shared by every chatd process: "the migrations lock".
_LOCK_KEY = 0x63686174_64000001 - (1 << 63)


class MigrationError(RuntimeError):
    """The database's recorded migrations disagree with the ones this chatd ships."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str = field(repr=False)

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def bundled_migrations() -> list[Migration]:
    found: list[Migration] = []
    for entry in resources.files("chatd.store.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match is None:
            continue
        found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migration versions must run 1, 2, 3, ... without gaps: {versions}")
    return found


_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def migrate(db: Database, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply every migration not yet applied; return the ones applied now."""
    todo = bundled_migrations() if migrations is None else migrations
    known = max((m.version for m in todo), default=0)
    newest = max(await applied_versions(db), default=0)
    if newest > known:
        raise MigrationError(
            f"the database is at schema version {newest}, newer than this chatd knows ({known}): "
            "upgrade chatd, or point it at another database"
        )
    # Sequential on purpose: each migration sees the ones before it.
    return [m for m in todo if await db.transaction(functools.partial(_apply_one, migration=m))]


async def _apply_one(conn: Connection, migration: Migration) -> bool:
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
    await conn.execute(_CREATE_TABLE)
    row = await conn.fetchrow(
        "SELECT name, checksum FROM schema_migrations WHERE version = $1", migration.version
    )
    if row is not None:
        if row["checksum"] != migration.checksum:
            raise MigrationError(
                f"migration {migration.version:04d}_{row['name']} was already applied but its "
                "file has changed since; add a new migration instead of editing an applied one"
            )
        return False
    await conn.execute(migration.sql)
    await conn.execute(
        "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
        migration.version,
        migration.name,
        migration.checksum,
    )
    return True


async def applied_versions(db: Database) -> list[int]:
    exists = await db.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return []
    rows = await db.fetch("SELECT version FROM schema_migrations ORDER BY version")
    return [r["version"] for r in rows]
