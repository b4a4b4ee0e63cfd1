"""The workers of one deployment, as PostgreSQL knows them: who is alive, where each one's
internal link listens, who owns which shard, and the link's shared secret.

A worker is alive while its row in ``workers`` has not expired by database time; its lease
loop renews the row together with its shard leases (``chatd.store.leases``), so a worker that
stops renewing loses both at the same moment. Nothing else keeps membership: no gossip, no
separate heartbeat protocol.

NOTIFY channels (hints only: whoever listens also re-reads on a timer or when told that
notifications may have been lost):

- ``SHARDS_CHANNEL``: a shard changed hands or a worker joined or left; placement and the
  owner lookups of forwarding re-read the tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from chatd.store.database import Database

SHARDS_CHANNEL: Final = "chatd_shards"


@dataclass(frozen=True, slots=True)
class Worker:
    worker_id: str
    link_url: str


@dataclass(frozen=True, slots=True)
class ShardOwner:
    """The live holder of a shard's lease and where its internal link listens."""

    shard: int
    epoch: int
    worker_id: str
    link_url: str


async def heartbeat(db: Database, worker_id: str, link_url: str, ttl_s: float) -> None:
    """Say that ``worker_id`` is alive for ``ttl_s`` more seconds (database time)."""
    await db.execute(
        """
        INSERT INTO workers (worker_id, link_url, expires_at)
        VALUES ($1, $2, now() + make_interval(secs => $3))
        ON CONFLICT (worker_id) DO UPDATE
        SET link_url = EXCLUDED.link_url, expires_at = EXCLUDED.expires_at
        """,
        worker_id,
        link_url,
        float(ttl_s),
    )


async def leave(db: Database, worker_id: str) -> None:
    """A clean stop: the worker no longer counts as alive (its row stays, expired)."""
    await db.execute("UPDATE workers SET expires_at = now() WHERE worker_id = $1", worker_id)


async def live_workers(db: Database) -> list[Worker]:
    rows = await db.fetch(
        "SELECT worker_id, link_url FROM workers WHERE expires_at > now() ORDER BY worker_id"
    )
    return [Worker(row["worker_id"], row["link_url"]) for row in rows]


async def shard_owners(db: Database) -> dict[int, ShardOwner]:
    """Every shard held by a live lease, with its holder's link (shards without one: absent)."""
    rows = await db.fetch(
        """
        SELECT l.shard, l.epoch, l.worker_id, coalesce(w.link_url, '') AS link_url
        FROM shard_leases AS l LEFT JOIN workers AS w ON w.worker_id = l.worker_id
        WHERE l.expires_at > now()
        """
    )
    return {
        row["shard"]: ShardOwner(row["shard"], row["epoch"], row["worker_id"], row["link_url"])
        for row in rows
    }


async def link_secret(db: Database) -> str:
    """The secret of the internal link (made by migration 0004)."""
    secret = await db.fetchval("SELECT secret FROM cluster_secret")
    if secret is None:
        raise RuntimeError("the cluster secret is missing: run the migrations")
    return str(secret)
