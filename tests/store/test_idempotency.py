"""Idempotency keys in PostgreSQL: claim, replay, mismatch, take-over, expiry by a driven clock."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest
import trio

from chatd.config import Settings, SettingsError
from chatd.domain.mailbox import AttemptSuperseded, IdempotencyMark
from chatd.store import idempotency
from chatd.store.chats import AppendMessage, MarkIdempotencyKey, commit, list_messages
from chatd.store.database import Database
from chatd.store.idempotency import Claimed, InProgress, Mismatch, Replay
from chatd.store.records import Chat
from tests.store.helpers import append, lease, make_chat, make_user, text

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


def assert_taken_over(outcome: object, first: Claimed, *, committed: bool = False) -> Claimed:
    """``outcome`` takes ``first``'s claim over: the same seed, a new attempt."""
    assert isinstance(outcome, Claimed)
    assert (outcome.seed, outcome.took_over, outcome.committed) == (first.seed, True, committed)
    assert outcome.attempt != first.attempt
    return outcome


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
        attempt=first.attempt,
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
    assert_taken_over(taken, first)
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
    assert_taken_over(again, first)


async def test_released_keys_are_free_and_abandoned_ones_are_taken_over_at_once(
    db: Database,
) -> None:
    user = await make_user(db)
    first = await claim(db, user.id, "k", FP_A, T0)
    assert isinstance(first, Claimed)
    await idempotency.release(db, user_id=user.id, key="k", attempt=first.attempt)
    # Released: the key is free, even for another body (the refused one did nothing).
    fresh = await claim(db, user.id, "k", FP_B, T0)
    assert isinstance(fresh, Claimed)
    assert fresh.seed != first.seed
    await idempotency.abandon(db, user_id=user.id, key="k", attempt=fresh.attempt)
    taken = await idempotency.claim(
        db,
        user_id=user.id,
        key="k",
        fingerprint=FP_B,
        ttl_s=TTL_S,
        pending_timeout_s=PENDING_S,
        worker_id="w2",
    )
    assert_taken_over(taken, fresh)


async def test_an_expired_key_is_claimed_afresh_with_a_new_seed(db: Database) -> None:
    user = await make_user(db)
    first = await claim(db, user.id, "k", FP_A, T0)
    assert isinstance(first, Claimed)
    await idempotency.record(
        db, user_id=user.id, key="k", attempt=first.attempt, status=201, content_type=None, body=b""
    )
    just_before = await claim(db, user.id, "k", FP_B, T0 + timedelta(seconds=TTL_S - 1))
    assert just_before == Mismatch()
    after = await claim(db, user.id, "k", FP_B, T0 + timedelta(seconds=TTL_S))
    assert isinstance(after, Claimed)
    assert not after.took_over
    assert after.seed != first.seed
    # The old claim can no longer record over the new one.
    late = await idempotency.record(
        db,
        user_id=user.id,
        key="k",
        attempt=first.attempt,
        status=200,
        content_type=None,
        body=b"x",
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


def message_write(chat: Chat, body: str) -> AppendMessage:
    return AppendMessage(
        id=uuid4(), seq=1, role="user", content=text(body), history_version=chat.history_version
    )


async def test_a_take_over_knows_whether_the_first_attempts_command_committed(
    db: Database,
) -> None:
    """The command's own commit marks its key: a take-over after the answer was lost finds the
    command done; after a command that never committed (or no command), not done."""
    user = await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, user.id)
    done = await claim(db, user.id, "done", FP_A, T0)
    lost = await claim(db, user.id, "lost", FP_A, T0)
    assert isinstance(done, Claimed)
    assert isinstance(lost, Claimed)
    assert not done.committed
    mark = IdempotencyMark(user.id, "done", done.attempt)
    await commit(db, fence, chat.id, [MarkIdempotencyKey(mark), message_write(chat, "once")])
    later = T0 + timedelta(seconds=PENDING_S)
    assert_taken_over(
        await claim(db, user.id, "done", FP_A, later, worker="w2"), done, committed=True
    )
    assert_taken_over(await claim(db, user.id, "lost", FP_A, later, worker="w2"), lost)


async def test_a_mark_alone_commits_a_command_that_changed_nothing(db: Database) -> None:
    """An interrupt of a waiting chat writes nothing but the mark: still done once."""
    user = await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, user.id)
    first = await claim(db, user.id, "noop", FP_A, T0)
    assert isinstance(first, Claimed)
    mark = IdempotencyMark(user.id, "noop", first.attempt)
    await commit(db, fence, chat.id, [MarkIdempotencyKey(mark)])
    again = await claim(db, user.id, "noop", FP_A, T0 + timedelta(seconds=1))
    assert_taken_over(again, first, committed=True)


async def test_a_superseded_attempts_commit_is_refused_and_writes_nothing(db: Database) -> None:
    """The first attempt's command is still on its way when a retry takes the key over: its
    commit is refused whole (the retry does the command), and it can no longer record,
    release or abandon the key; the attempt that holds the key can."""
    user = await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, user.id)
    first = await claim(db, user.id, "k", FP_A, T0, worker="w1")
    assert isinstance(first, Claimed)
    later = T0 + timedelta(seconds=PENDING_S)
    second = assert_taken_over(await claim(db, user.id, "k", FP_A, later, worker="w2"), first)
    stale = IdempotencyMark(user.id, "k", first.attempt)
    with pytest.raises(AttemptSuperseded, match="another request holds it now"):
        await commit(db, fence, chat.id, [MarkIdempotencyKey(stale), message_write(chat, "no")])
    assert await list_messages(db, chat.id, after_seq=0, limit=10) == []
    assert not await idempotency.record(
        db, user_id=user.id, key="k", attempt=first.attempt, status=204, content_type=None, body=b""
    )
    await idempotency.release(db, user_id=user.id, key="k", attempt=first.attempt)
    await idempotency.abandon(db, user_id=user.id, key="k", attempt=first.attempt)
    busy = await claim(db, user.id, "k", FP_A, later + timedelta(seconds=1), worker="w1")
    assert isinstance(busy, InProgress)  # still held by the second attempt, for its timeout
    mark = IdempotencyMark(user.id, "k", second.attempt)
    committed = await commit(
        db, fence, chat.id, [MarkIdempotencyKey(mark), message_write(chat, "yes")]
    )
    assert [m.content for m in committed.appended] == [text("yes")]
    assert await idempotency.record(
        db,
        user_id=user.id,
        key="k",
        attempt=second.attempt,
        status=204,
        content_type=None,
        body=b"",
    )


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
