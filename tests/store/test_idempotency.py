"""Idempotency keys in PostgreSQL: claim, replay, mismatch, take-over, expiry by a driven clock."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest
import trio

from chatd.config import Settings, SettingsError
from chatd.store import idempotency
from chatd.store.database import Database
from chatd.store.idempotency import Claimed, InProgress, Mismatch, Replay
from tests.store.helpers import append, lease, make_chat, make_user

TTL_S = 3600.0
PENDING_S = 60.0
T0 = datetime(2030, 1, 1, tzinfo=UTC)
FP_A = hashlib.sha256(b"POST /chats/1/messages {a}").digest()
FP_B = hashlib.sha256(b"POST /chats/1/messages {b}").digest()


async def claim(
    db: Database, user_id: UUID, key: str, fp: bytes, at: datetime, *, worker: str = "w1"
) -> object:
    return await idempotency.claim(
        db,
        user_id=user_id,
        key=key,
        fingerprint=fp,
        ttl_s=TTL_S,
        pending_timeout_s=PENDING_S,
        worker_id=worker,
        now=at,
    )


async def test_a_recorded_result_is_replayed_and_another_request_is_a_mismatch(
    db: Database,
) -> None:
    user = await make_user(db)
    first = await claim(db, user.id, "k1", FP_A, T0)
    assert isinstance(first, Claimed)
    assert not first.took_over
    recorded = await idempotency.record(
        db,
        user_id=user.id,
        key="k1",
        seed=first.seed,
        status=202,
        content_type="application/json",
        body=b'{"ok":1}',
    )
    assert recorded
    again = await claim(db, user.id, "k1", FP_A, T0 + timedelta(seconds=5))
    assert again == Replay(202, "application/json", b'{"ok":1}')
    other = await claim(db, user.id, "k1", FP_B, T0 + timedelta(seconds=5))
    assert other == Mismatch()


async def test_another_workers_pending_key_is_in_progress_until_its_timeout_then_taken_over(
    db: Database,
) -> None:
    user = await make_user(db)
    first = await claim(db, user.id, "k", FP_A, T0, worker="w1")
    assert isinstance(first, Claimed)
    busy = await claim(db, user.id, "k", FP_A, T0 + timedelta(seconds=20), worker="w2")
    assert busy == InProgress(40.0)
    later = T0 + timedelta(seconds=PENDING_S)
    taken = await claim(db, user.id, "k", FP_A, later, worker="w2")
    assert taken == Claimed(first.seed, took_over=True)
    # The take-over holds the key for a new pending timeout, now in w2's name.
    busy_again = await claim(db, user.id, "k", FP_A, later + timedelta(seconds=1), worker="w1")
    assert isinstance(busy_again, InProgress)


async def test_a_restarted_worker_takes_its_own_pending_key_over_at_once(db: Database) -> None:
    """The same worker id on a key it claimed: that attempt is over (a process holds a worker
    id alone, and takes turns per key within itself), so no need to wait the timeout out."""
    user = await make_user(db)
    first = await claim(db, user.id, "k", FP_A, T0, worker="w1")
    assert isinstance(first, Claimed)
    again = await claim(db, user.id, "k", FP_A, T0 + timedelta(seconds=1), worker="w1")
    assert again == Claimed(first.seed, took_over=True)


async def test_released_keys_are_free_and_abandoned_ones_are_taken_over_at_once(
    db: Database,
) -> None:
    user = await make_user(db)
    first = await claim(db, user.id, "k", FP_A, T0)
    assert isinstance(first, Claimed)
    await idempotency.release(db, user_id=user.id, key="k", seed=first.seed)
    # Released: the key is free, even for another body (the refused one did nothing).
    fresh = await claim(db, user.id, "k", FP_B, T0)
    assert isinstance(fresh, Claimed)
    assert fresh.seed != first.seed
    await idempotency.abandon(db, user_id=user.id, key="k", seed=fresh.seed)
    taken = await idempotency.claim(
        db,
        user_id=user.id,
        key="k",
        fingerprint=FP_B,
        ttl_s=TTL_S,
        pending_timeout_s=PENDING_S,
        worker_id="w2",
    )
    assert taken == Claimed(fresh.seed, took_over=True)


async def test_an_expired_key_is_claimed_afresh_with_a_new_seed(db: Database) -> None:
    user = await make_user(db)
    first = await claim(db, user.id, "k", FP_A, T0)
    assert isinstance(first, Claimed)
    await idempotency.record(
        db, user_id=user.id, key="k", seed=first.seed, status=201, content_type=None, body=b""
    )
    just_before = await claim(db, user.id, "k", FP_B, T0 + timedelta(seconds=TTL_S - 1))
    assert just_before == Mismatch()
    after = await claim(db, user.id, "k", FP_B, T0 + timedelta(seconds=TTL_S))
    assert isinstance(after, Claimed)
    assert not after.took_over
    assert after.seed != first.seed
    # The old claim can no longer record over the new one.
    late = await idempotency.record(
        db, user_id=user.id, key="k", seed=first.seed, status=200, content_type=None, body=b"x"
    )
    assert not late


async def test_a_fresh_claim_deletes_expired_keys_of_any_user_in_a_bounded_batch(
    db: Database,
) -> None:
    alice, bob = await make_user(db), await make_user(db)
    count = idempotency.PURGE_BATCH + 3
    for i in range(count):
        await claim(db, alice.id, f"old-{i}", FP_A, T0)
    later = T0 + timedelta(seconds=TTL_S + 1)
    await claim(db, bob.id, "new", FP_A, later)
    left = await db.fetchval("SELECT count(*) FROM idempotency_keys WHERE user_id = $1", alice.id)
    assert left == 3
    assert await idempotency.purge_expired(db, limit=100, now=later) == 3
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 1


async def test_keys_are_per_user_and_go_with_their_user(db: Database) -> None:
    alice, bob = await make_user(db), await make_user(db)
    mine = await claim(db, alice.id, "shared", FP_A, T0)
    theirs = await claim(db, bob.id, "shared", FP_B, T0)
    assert isinstance(mine, Claimed)
    assert isinstance(theirs, Claimed)
    await db.execute("DELETE FROM users WHERE id = $1", bob.id)
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 1


async def test_concurrent_claims_of_one_key_let_exactly_one_through(db: Database) -> None:
    user = await make_user(db)
    outcomes: list[object] = []

    async def one(worker: str) -> None:
        outcomes.append(await claim(db, user.id, "race", FP_A, T0, worker=worker))

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(one, f"w{i}")
    assert sum(isinstance(o, Claimed) for o in outcomes) == 1
    assert sum(isinstance(o, InProgress) for o in outcomes) == 7


async def test_effect_exists_finds_the_derived_rows_of_the_owner_only(db: Database) -> None:
    alice, bob = await make_user(db), await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, alice.id)
    committed = await append(db, fence, chat, 1, "hello")
    [message] = committed.appended
    assert await idempotency.effect_exists(db, owner_id=alice.id, ids=[message.id])
    assert await idempotency.effect_exists(db, owner_id=alice.id, ids=[uuid4(), chat.id])
    assert not await idempotency.effect_exists(db, owner_id=bob.id, ids=[message.id, chat.id])
    assert not await idempotency.effect_exists(db, owner_id=alice.id, ids=[uuid4()])


def test_the_idempotency_settings_are_validated_and_read_from_the_environment() -> None:
    loaded = Settings.load(
        {"CHATD_IDEMPOTENCY_KEY_TTL_S": "60", "CHATD_IDEMPOTENCY_KEY_MAX_CHARS": "64"}
    )
    assert (loaded.idempotency_key_ttl_s, loaded.idempotency_key_max_chars) == (60.0, 64)
    assert Settings().idempotency_key_ttl_s == 86_400.0
    with pytest.raises(SettingsError, match=r"CHATD_IDEMPOTENCY_KEY_TTL_S.*greater than 0"):
        Settings(idempotency_key_ttl_s=0)
    with pytest.raises(SettingsError, match=r"CHATD_IDEMPOTENCY_KEY_MAX_CHARS.*must not exceed"):
        Settings(idempotency_key_max_chars=1025)
    with pytest.raises(SettingsError, match=r"CHATD_IDEMPOTENCY_PENDING_TIMEOUT_S.*must exceed"):
        Settings(idempotency_pending_timeout_s=30.0, ask_timeout_s=30.0)
