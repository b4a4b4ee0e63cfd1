"""Shard leases: which worker owns which shard, until when, and under which epoch.

Expiry is judged by the database's clock (``now()``), never a worker's, so workers with skewed
clocks still agree. The epoch increases whenever a shard changes hands (or its owner lets the
lease lapse), and every chat write re-checks it with ``check_fence`` inside its own transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from chatd.store.database import Connection, Database, Record
from chatd.store.errors import Fenced
from chatd.store.records import ShardLease, shard_lease_from_row


@dataclass(frozen=True, slots=True)
class Fence:
    """Proof of holding a shard's lease at ``epoch``; chat writes carry it."""

    shard: int
    epoch: int
    worker_id: str


def ttl_seconds(ttl_s: float) -> float:
    if not ttl_s > 0:
        raise ValueError(f"lease ttl must be positive, got {ttl_s} s")
    return float(ttl_s)


def own_fences(worker_id: str, fences: Iterable[Fence]) -> list[Fence]:
    """``fences`` as a list, checked to be ``worker_id``'s."""
    fences = list(fences)
    for fence in fences:
        if fence.worker_id != worker_id:
            raise ValueError(f"fence of shard {fence.shard} belongs to {fence.worker_id!r}")
    return fences


# Ascending shard order: two workers racing for overlapping sets lock rows in the same order.
# Parameters: worker id, shards, ttl in seconds.
ACQUIRE_SQL = """
INSERT INTO shard_leases AS l (shard, worker_id, epoch, expires_at)
SELECT s, $1, 1, now() + make_interval(secs => $3)
FROM unnest($2::integer[]) AS s ORDER BY s
ON CONFLICT (shard) DO UPDATE
SET worker_id = EXCLUDED.worker_id,
    epoch = CASE WHEN l.worker_id = EXCLUDED.worker_id AND l.expires_at > now()
                 THEN l.epoch ELSE l.epoch + 1 END,
    expires_at = EXCLUDED.expires_at,
    updated_at = now()
WHERE l.expires_at <= now() OR l.worker_id = EXCLUDED.worker_id
RETURNING l.shard, l.epoch, l.worker_id
"""

# The rows are locked in shard order first, as ACQUIRE_SQL locks them, so that a release and a
# check of the same worker (or a taker) never deadlock. Parameters: worker id, shards, epochs.
RELEASE_SQL = """
WITH held AS (
    SELECT l.shard FROM shard_leases AS l
    JOIN unnest($2::integer[], $3::bigint[]) AS f (shard, epoch)
      ON l.shard = f.shard AND l.epoch = f.epoch
    WHERE l.worker_id = $1 AND l.expires_at > now()
    ORDER BY l.shard FOR UPDATE OF l
)
UPDATE shard_leases AS l
SET expires_at = now(), updated_at = now()
FROM held
WHERE l.shard = held.shard
"""


def fences_from_rows(rows: Iterable[Record]) -> list[Fence]:
    return sorted(
        (Fence(row["shard"], row["epoch"], row["worker_id"]) for row in rows),
        key=lambda f: f.shard,
    )


async def acquire_shards(
    db: Database, worker_id: str, shards: Iterable[int], ttl_s: float
) -> list[Fence]:
    """Take every listed shard that is free or whose lease expired; renew our own live ones.

    Taking a shard bumps its epoch; renewing a live lease of ours keeps it. Shards held live by
    another worker are left alone and missing from the result (ordered by shard).
    """
    wanted = sorted(set(shards))
    if not wanted:
        return []
    rows = await db.fetch(ACQUIRE_SQL, worker_id, wanted, ttl_seconds(ttl_s))
    return fences_from_rows(rows)


async def reclaim_leases(db: Database, worker_id: str, ttl_s: float) -> list[Fence]:
    """Take back, at once and under a new epoch, the live leases an earlier incarnation of
    ``worker_id`` left behind (a crash); returns them (ordered by shard).

    Only a process that proved it is that worker may call this (``chatd.identity``: the
    identity's lock is free only once its last holder died). The epoch moves on so that a
    write the dead incarnation still had in flight stays fenced: the UPDATE waits for any
    transaction holding the lease row (``check_fence``'s FOR SHARE), and none can pass the
    fence after it.
    """
    rows = await db.fetch(
        """
        WITH mine AS (
            -- Locked in shard order, as acquire_shards locks them: no deadlock between the two.
            SELECT shard FROM shard_leases WHERE worker_id = $1 AND expires_at > now()
            ORDER BY shard FOR UPDATE
        )
        UPDATE shard_leases AS l
        SET epoch = l.epoch + 1, expires_at = now() + make_interval(secs => $2),
            updated_at = now()
        FROM mine
        WHERE l.shard = mine.shard
        RETURNING l.shard, l.epoch, l.worker_id
        """,
        worker_id,
        ttl_seconds(ttl_s),
    )
    return sorted(
        (Fence(row["shard"], row["epoch"], row["worker_id"]) for row in rows),
        key=lambda f: f.shard,
    )


async def renew_leases(
    db: Database, worker_id: str, fences: Iterable[Fence], ttl_s: float
) -> list[Fence]:
    """Extend the leases still held live at their epoch; the result is those still held.

    An expired lease is lost even if nobody took it yet, as ``check_fence`` already treats it:
    the worker takes it again with ``acquire_shards``, under a new epoch.
    """
    fences = own_fences(worker_id, fences)
    if not fences:
        return []
    rows = await db.fetch(
        """
        UPDATE shard_leases AS l
        SET expires_at = now() + make_interval(secs => $4), updated_at = now()
        FROM unnest($2::integer[], $3::bigint[]) AS f (shard, epoch)
        WHERE l.shard = f.shard AND l.epoch = f.epoch AND l.worker_id = $1
          AND l.expires_at > now()
        RETURNING l.shard, l.epoch
        """,
        worker_id,
        [f.shard for f in fences],
        [f.epoch for f in fences],
        ttl_seconds(ttl_s),
    )
    held = {(row["shard"], row["epoch"]) for row in rows}
    return sorted((f for f in fences if (f.shard, f.epoch) in held), key=lambda f: f.shard)


async def release_leases(db: Database, worker_id: str, fences: Iterable[Fence]) -> None:
    """Let the shards go now (graceful shutdown) so another worker need not wait for expiry.

    The row stays, expired, so the next owner's epoch is still higher than every earlier one.
    """
    fences = own_fences(worker_id, fences)
    if not fences:
        return
    await db.execute(RELEASE_SQL, worker_id, *release_args(fences))


def release_args(fences: list[Fence]) -> tuple[list[int], list[int]]:
    return [f.shard for f in fences], [f.epoch for f in fences]


async def list_leases(db: Database) -> list[ShardLease]:
    rows = await db.fetch("SELECT * FROM shard_leases ORDER BY shard")
    return [shard_lease_from_row(row) for row in rows]


def fence_subquery(first: int) -> str:
    """The fence check as a subquery for ``EXISTS (...)``, taking ``fence_args`` as its
    parameters from ``$first`` on; it locks the lease row as ``check_fence`` says."""
    shard, epoch, worker = (f"${n}" for n in range(first, first + 3))
    return (
        f"SELECT FROM shard_leases WHERE shard = {shard} AND epoch = {epoch}"
        f" AND worker_id = {worker} AND expires_at > now() FOR SHARE"
    )


def fence_args(fence: Fence) -> tuple[int, int, str]:
    return (fence.shard, fence.epoch, fence.worker_id)


async def check_fence(conn: Connection, fence: Fence) -> None:
    """Raise ``Fenced`` unless ``fence`` still holds its shard live; asyncio side, in a transaction.

    FOR SHARE keeps the lease row locked until this transaction ends, so a takeover (an UPDATE
    of that row) waits for our commit: a write that passed this check lands before the new
    owner's epoch begins, and none can land after.
    """
    held = await conn.fetchval(f"SELECT EXISTS ({fence_subquery(1)})", *fence_args(fence))
    if not held:
        raise Fenced(fence.shard, fence.epoch)
