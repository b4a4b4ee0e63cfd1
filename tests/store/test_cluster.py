"""The workers table, shard owners and the link secret (chatd.store.cluster)."""

from __future__ import annotations

from chatd.store import cluster
from chatd.store.database import Database
from chatd.store.leases import acquire_shards, release_leases


async def test_a_worker_is_alive_until_its_row_expires_or_it_leaves(db: Database) -> None:
    await cluster.heartbeat(db, "worker-a", "http://127.0.0.1:9001", 60)
    await cluster.heartbeat(db, "worker-b", "", 60)
    assert [w.worker_id for w in await cluster.live_workers(db)] == ["worker-a", "worker-b"]

    await db.execute(
        "UPDATE workers SET expires_at = now() - interval '1 s' WHERE worker_id = 'worker-b'"
    )
    assert [w.worker_id for w in await cluster.live_workers(db)] == ["worker-a"]

    await cluster.leave(db, "worker-a")
    assert await cluster.live_workers(db) == []

    await cluster.heartbeat(db, "worker-a", "http://127.0.0.1:9002", 60)
    assert await cluster.live_workers(db) == [cluster.Worker("worker-a", "http://127.0.0.1:9002")]


async def test_shard_owners_name_the_live_holder_and_its_link(db: Database) -> None:
    await cluster.heartbeat(db, "worker-a", "http://127.0.0.1:9001", 60)
    [f0, f1] = await acquire_shards(db, "worker-a", [0, 1], 60)
    [f2] = await acquire_shards(db, "worker-b", [2], 60)  # no workers row: no link yet
    await release_leases(db, "worker-a", [f1])

    owners = await cluster.shard_owners(db)

    assert owners == {
        0: cluster.ShardOwner(0, f0.epoch, "worker-a", "http://127.0.0.1:9001"),
        2: cluster.ShardOwner(2, f2.epoch, "worker-b", ""),
    }


async def test_the_link_secret_is_made_once_by_the_migration(db: Database) -> None:
    secret = await cluster.link_secret(db)
    assert len(secret) == 64
    assert secret.isalnum()
    assert await cluster.link_secret(db) == secret
