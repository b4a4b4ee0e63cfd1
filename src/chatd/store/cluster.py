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

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Final

from chatd.store.database import Connection, Database
from chatd.store.leases import (
    ACQUIRE_SQL,
    RELEASE_SQL,
    Fence,
    fences_from_rows,
    own_fences,
    release_args,
    ttl_seconds,
)

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


# Parameters: worker id, link url, ttl in seconds.
_HEARTBEAT_SQL = """
INSERT INTO workers (worker_id, link_url, expires_at)
VALUES ($1, $2, now() + make_interval(secs => $3))
ON CONFLICT (worker_id) DO UPDATE
SET link_url = EXCLUDED.link_url, expires_at = EXCLUDED.expires_at
"""


async def heartbeat(db: Database, worker_id: str, link_url: str, ttl_s: float) -> None:
    """Say that ``worker_id`` is alive for ``ttl_s`` more seconds (database time)."""
    await db.execute(_HEARTBEAT_SQL, worker_id, link_url, ttl_seconds(ttl_s))


async def leave(db: Database, worker_id: str, fences: Iterable[Fence] = ()) -> None:
    """A clean stop: release ``fences`` and stop counting as alive (the rows stay, expired),
    in one transaction, then announce it on ``SHARDS_CHANNEL`` (sent at commit)."""
    fences = own_fences(worker_id, fences)

    async def run(conn: Connection) -> None:
        if fences:
            await conn.execute(RELEASE_SQL, worker_id, *release_args(fences))
        await conn.execute("UPDATE workers SET expires_at = now() WHERE worker_id = $1", worker_id)
        await _announce(conn, worker_id)

    await db.transaction(run)


async def hand_back(db: Database, worker_id: str, fences: Iterable[Fence]) -> None:
    """Release the leases of ``fences`` now (a handover) and announce it on ``SHARDS_CHANNEL``
    in the same transaction, so a taker learns of it when they are free."""
    fences = own_fences(worker_id, fences)
    if not fences:
        return

    async def run(conn: Connection) -> None:
        await conn.execute(RELEASE_SQL, worker_id, *release_args(fences))
        await _announce(conn, worker_id)

    await db.transaction(run)


async def _announce(conn: Connection, worker_id: str) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", SHARDS_CHANNEL, worker_id)


@dataclass(frozen=True, slots=True)
class LeaseView:
    """The leases and workers as one lease check read them (within its transaction)."""

    live_workers: tuple[str, ...]  # sorted, the checking worker included
    mine: frozenset[int]  # shards with a live lease of the checking worker
    others: dict[int, str]  # shard -> the other worker holding a live lease on it
    # Seconds until the soonest live lease or worker row of another worker expires, if any:
    # when a dead worker's shards become free (and the live count drops).
    next_expiry_s: float | None

    def free(self, shard_count: int) -> set[int]:
        """Shards nobody holds a live lease on."""
        return set(range(shard_count)) - self.mine - self.others.keys()


@dataclass(frozen=True, slots=True)
class CheckIn:
    fences: list[Fence]  # every lease the worker holds after the check, ordered by shard
    view: LeaseView  # what the check read before taking


async def check_in(
    db: Database,
    worker_id: str,
    *,
    link_url: str,
    ttl_s: float,
    choose: Callable[[LeaseView], Collection[int]],
    announce: bool = False,
) -> CheckIn:
    """One lease check, in one transaction: renew the worker's row in ``workers`` (carrying
    ``link_url``), read the live workers and leases, then hold the shards ``choose(view)``
    names: its live leases among them are renewed (same epoch), free ones taken (new epoch),
    and its live leases left out are not renewed (they lapse). ``choose`` runs inside the
    transaction: it must be pure and quick. With ``announce``, NOTIFY ``SHARDS_CHANNEL`` at
    commit (a join).

    The worker's row and its leases get the same expiry, so a worker that stops checking in
    stops counting as live when its shards become free. Leases are renewed and taken by one
    statement locking rows in shard order (``ACQUIRE_SQL``); a lease of the worker that
    expired meanwhile is taken back under a new epoch if still free.
    """
    ttl = ttl_seconds(ttl_s)

    async def run(conn: Connection) -> CheckIn:
        await conn.execute(_HEARTBEAT_SQL, worker_id, link_url, ttl)
        if announce:
            await _announce(conn, worker_id)
        workers = await conn.fetch(
            "SELECT worker_id, extract(epoch FROM expires_at - now())::float8 AS left_s"
            " FROM workers WHERE expires_at > now()"
        )
        leases = await conn.fetch(
            "SELECT shard, worker_id, extract(epoch FROM expires_at - now())::float8 AS left_s"
            " FROM shard_leases WHERE expires_at > now()"
        )
        expiries = [r["left_s"] for r in [*workers, *leases] if r["worker_id"] != worker_id]
        view = LeaseView(
            live_workers=tuple(sorted({r["worker_id"] for r in workers} | {worker_id})),
            mine=frozenset(r["shard"] for r in leases if r["worker_id"] == worker_id),
            others={r["shard"]: r["worker_id"] for r in leases if r["worker_id"] != worker_id},
            next_expiry_s=min(expiries, default=None),
        )
        wanted = sorted(set(choose(view)))
        rows = await conn.fetch(ACQUIRE_SQL, worker_id, wanted, ttl) if wanted else []
        return CheckIn(fences_from_rows(rows), view)

    return await db.transaction(run)


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
