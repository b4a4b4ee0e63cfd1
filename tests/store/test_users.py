from __future__ import annotations

import hashlib
from collections.abc import Callable
from uuid import uuid4

import pytest

from chatd.store.database import Database
from chatd.store.errors import Conflict, NotFound
from chatd.store.users import (
    authenticate,
    create_api_token,
    create_user,
    get_user,
    get_user_by_name,
    list_api_tokens,
    revoke_api_token,
)


async def test_user_round_trip(db: Database) -> None:
    user = await create_user(db, "alice", is_admin=True)
    assert user.name == "alice"
    assert user.is_admin
    assert await get_user(db, user.id) == user
    assert await get_user_by_name(db, "alice") == user
    assert await get_user(db, uuid4()) is None
    assert await get_user_by_name(db, "nobody") is None


async def test_taken_name_is_a_conflict(db: Database) -> None:
    await create_user(db, "alice")
    with pytest.raises(Conflict) as caught:
        await create_user(db, "alice", is_admin=True)
    assert caught.value.constraint == "users_name_key"
    assert await db.fetchval("SELECT count(*) FROM users") == 1


async def test_token_round_trip_stores_only_the_hash(db: Database) -> None:
    user = await create_user(db, "alice")
    token, secret = await create_api_token(db, user.id, "laptop")
    assert secret.startswith("chatd_")
    assert len(secret) > len("chatd_") + 40
    assert (token.user_id, token.label, token.revoked_at, token.last_used_at) == (
        user.id,
        "laptop",
        None,
        None,
    )
    assert await list_api_tokens(db, user.id) == [token]

    row = await db.fetchrow("SELECT * FROM api_tokens WHERE id = $1", token.id)
    assert row is not None
    assert row["token_hash"] == hashlib.sha256(secret.encode()).digest()
    assert len(row["token_hash"]) == 32
    stored = " ".join(str(value) for value in row.values())
    assert secret not in stored
    assert secret.removeprefix("chatd_") not in stored
    assert secret not in repr(token)


async def test_authenticate(db: Database) -> None:
    alice = await create_user(db, "alice")
    bob = await create_user(db, "bob")
    _, alice_secret = await create_api_token(db, alice.id)
    _, bob_secret = await create_api_token(db, bob.id)
    assert await authenticate(db, alice_secret) == alice
    assert await authenticate(db, bob_secret) == bob


@pytest.mark.parametrize(
    "wrong",
    [
        lambda s: s[:-1] + ("A" if s[-1] != "A" else "B"),
        lambda s: s.removeprefix("chatd_"),
        lambda s: s + "x",
        lambda _s: "",
        lambda _s: "chatd_",
    ],
    ids=["one-char-off", "no-prefix", "extra-char", "empty", "prefix-only"],
)
async def test_wrong_secret_fails(db: Database, wrong: Callable[[str], str]) -> None:
    user = await create_user(db, "alice")
    _, secret = await create_api_token(db, user.id)
    assert await authenticate(db, wrong(secret)) is None
    assert await authenticate(db, secret) == user


async def test_revoked_token_fails_and_others_still_work(db: Database) -> None:
    user = await create_user(db, "alice")
    token, secret = await create_api_token(db, user.id)
    _, other_secret = await create_api_token(db, user.id)
    revoked = await revoke_api_token(db, token.id)
    assert revoked.revoked_at is not None
    assert await authenticate(db, secret) is None
    assert await authenticate(db, other_secret) == user
    # Revoking again keeps the first revocation time.
    assert (await revoke_api_token(db, token.id)).revoked_at == revoked.revoked_at


async def test_revoke_checks_the_owner(db: Database) -> None:
    alice = await create_user(db, "alice")
    bob = await create_user(db, "bob")
    token, secret = await create_api_token(db, alice.id)
    with pytest.raises(NotFound):
        await revoke_api_token(db, token.id, user_id=bob.id)
    with pytest.raises(NotFound):
        await revoke_api_token(db, uuid4())
    assert await authenticate(db, secret) == alice
    await revoke_api_token(db, token.id, user_id=alice.id)
    assert await authenticate(db, secret) is None


async def test_token_for_missing_user_is_not_found(db: Database) -> None:
    with pytest.raises(NotFound):
        await create_api_token(db, uuid4())
    assert await db.fetchval("SELECT count(*) FROM api_tokens") == 0


async def test_last_used_at_is_written_at_most_once_a_minute(db: Database) -> None:
    user = await create_user(db, "alice")
    token, secret = await create_api_token(db, user.id)

    async def last_used() -> object:
        return await db.fetchval("SELECT last_used_at FROM api_tokens WHERE id = $1", token.id)

    await authenticate(db, secret)
    first = await last_used()
    assert first is not None
    await authenticate(db, secret)
    assert await last_used() == first  # within the minute: not written again

    await db.execute(
        "UPDATE api_tokens SET last_used_at = now() - interval '61 seconds' WHERE id = $1",
        token.id,
    )
    stale = await last_used()
    await authenticate(db, secret)
    refreshed = await last_used()
    assert refreshed is not None
    assert stale is not None
    assert refreshed != stale
    assert await db.fetchval("SELECT $1::timestamptz > now() - interval '5 seconds'", refreshed)
