"""The token cache against real PostgreSQL: queries counted with ``db.stats`` and the cache's own
counters, time on trio's ``MockClock`` jumped by hand (``mock_clock``), so that waiting on the
database never moves it."""

from __future__ import annotations

from uuid import uuid4

import pytest
import trio
import trio.testing

from chatd.store import users
from chatd.store.database import Database
from chatd.store.errors import NotFound
from chatd.store.records import ApiToken, User
from chatd.store.token_cache import TokenCache
from tests.store.helpers import make_user

TTL_S = 10.0


async def user_with_token(db: Database) -> tuple[User, str, ApiToken]:
    user = await make_user(db)
    token, secret = await users.create_api_token(db, user.id)
    return user, secret, token


async def test_a_cached_token_costs_no_query(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    user, secret, _token = await user_with_token(db)
    cache = TokenCache(db, ttl_s=TTL_S)
    assert await cache.authenticate(secret) == user
    statements = db.stats.statements
    for _ in range(10):
        assert await cache.authenticate(secret) == user
    assert db.stats.statements == statements
    assert (cache.stats.loads, cache.stats.hits) == (1, 10)


async def test_a_token_is_read_again_after_the_ttl(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    user, secret, _token = await user_with_token(db)
    cache = TokenCache(db, ttl_s=TTL_S)
    await cache.authenticate(secret)
    mock_clock.jump(TTL_S - 0.001)
    await cache.authenticate(secret)
    assert cache.stats.loads == 1
    mock_clock.jump(0.001)
    assert await cache.authenticate(secret) == user
    assert cache.stats.loads == 2


async def test_a_revocation_by_another_process_is_seen_within_the_ttl(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    user, secret, token = await user_with_token(db)
    cache = TokenCache(db, ttl_s=TTL_S)
    assert await cache.authenticate(secret) == user
    await users.revoke_api_token(db, token.id)  # not through this cache: another process
    assert await cache.authenticate(secret) == user  # the documented window
    mock_clock.jump(TTL_S)
    assert await cache.authenticate(secret) is None


async def test_a_revocation_through_the_cache_applies_at_once(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    user, secret, token = await user_with_token(db)
    _other_user, other_secret, _other = await user_with_token(db)
    cache = TokenCache(db, ttl_s=TTL_S)
    assert await cache.authenticate(secret) == user
    assert await cache.authenticate(other_secret) is not None
    revoked = await cache.revoke(token.id, user_id=user.id)
    assert revoked.id == token.id
    assert revoked.revoked_at is not None
    assert await cache.authenticate(secret) is None
    assert len(cache) == 1  # the other token stays cached
    loads = cache.stats.loads
    assert await cache.authenticate(other_secret) is not None
    assert cache.stats.loads == loads


async def test_revoking_someone_elses_token_changes_nothing(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    user, secret, token = await user_with_token(db)
    intruder = await make_user(db)
    cache = TokenCache(db, ttl_s=TTL_S)
    await cache.authenticate(secret)
    with pytest.raises(NotFound):
        await cache.revoke(token.id, user_id=intruder.id)
    with pytest.raises(NotFound):
        await cache.revoke(uuid4())
    assert await cache.authenticate(secret) == user
    assert cache.stats.loads == 1
    assert await users.authenticate(db, secret) == user


async def test_a_revocation_during_a_check_is_not_undone_by_it(
    db: Database, mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check that read the token before the revocation committed answers its caller with what
    it read, but does not store it: the next request is refused."""
    user, secret, token = await user_with_token(db)
    cache = TokenCache(db, ttl_s=TTL_S)
    read, release = trio.Event(), trio.Event()
    real = users.authenticate_hash

    async def slow(db: Database, digest: bytes) -> User | None:
        found = await real(db, digest)
        read.set()
        await release.wait()
        return found

    monkeypatch.setattr(users, "authenticate_hash", slow)
    answers: list[User | None] = []

    async def check() -> None:
        answers.append(await cache.authenticate(secret))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(check)
        await read.wait()
        await cache.revoke(token.id)
        release.set()
    monkeypatch.setattr(users, "authenticate_hash", real)
    assert answers == [user]
    assert cache.stats.stale_discards == 1
    assert await cache.authenticate(secret) is None


async def test_unknown_tokens_are_not_cached(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    cache = TokenCache(db, ttl_s=TTL_S)
    statements = db.stats.statements
    for n in range(5):
        assert await cache.authenticate(f"{users.TOKEN_PREFIX}guess-{n}") is None
        assert await cache.authenticate(f"{users.TOKEN_PREFIX}guess-{n}") is None
    assert db.stats.statements == statements + 10
    assert len(cache) == 0
    # Not even shaped like a token: refused without a query.
    assert await cache.authenticate("Basic abc") is None
    assert db.stats.statements == statements + 10


async def test_a_token_checked_by_many_requests_at_once_is_read_once(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    user, secret, _token = await user_with_token(db)
    cache = TokenCache(db, ttl_s=TTL_S)
    answers: list[User | None] = []

    async def check(value: str) -> None:
        answers.append(await cache.authenticate(value))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(check, secret)
            nursery.start_soon(check, f"{users.TOKEN_PREFIX}unknown")
    assert answers.count(user) == 20
    assert answers.count(None) == 20
    assert cache.stats.loads == 2


async def test_the_cache_keeps_at_most_max_size_tokens(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    cache = TokenCache(db, ttl_s=TTL_S, max_size=2)
    made = [await user_with_token(db) for _ in range(3)]
    for user, secret, _token in made:
        assert await cache.authenticate(secret) == user
    assert len(cache) == 2
    assert cache.stats.evictions == 1
    loads = cache.stats.loads
    assert await cache.authenticate(made[0][1]) == made[0][0]  # the least recent went first
    assert cache.stats.loads == loads + 1


async def test_a_zero_ttl_reads_every_time(db: Database) -> None:
    user, secret, token = await user_with_token(db)
    cache = TokenCache(db, ttl_s=0)
    assert await cache.authenticate(secret) == user
    assert await cache.authenticate(secret) == user
    assert (cache.stats.loads, len(cache)) == (2, 0)
    await cache.revoke(token.id)
    assert await cache.authenticate(secret) is None
    with pytest.raises(ValueError, match="ttl_s"):
        TokenCache(db, ttl_s=-1)
