"""The process-wide config cache: TTL, singleflight, generations, negative caching, invalidation.

Generic ``TtlCache`` behaviour is tested with counting loaders whose interleaving is controlled by
trio events; ``ConfigCache`` against real PostgreSQL, counting queries with ``db.stats``.
Time is trio's ``MockClock``, jumped by hand (``mock_clock``) so that waiting on the database
never moves it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from uuid import UUID, uuid4

import pytest
import trio
import trio.testing

from chatd.store.config_cache import ConfigCache, TtlCache
from chatd.store.database import Database
from chatd.store.prompts import delete_user_prompt, get_user_prompt, put_user_prompt
from chatd.store.providers import (
    create_model_config,
    create_provider,
    set_default_model_config,
    update_model_config,
    update_provider,
)
from chatd.store.records import ModelConfig, Provider, User
from tests.store.helpers import make_user

TTL_S = 30.0


class Boom(Exception):
    pass


class CountingLoader:
    """Returns ``f"{key}-{n}"`` for its n-th call; optionally waits on ``release`` first."""

    def __init__(self, *, gated: bool = False, fail: bool = False) -> None:
        self.calls = 0
        self.gated = gated
        self.fail = fail
        self.started = trio.Event()
        self.release = trio.Event()

    async def __call__(self, key: str) -> str:
        self.calls += 1
        n = self.calls
        self.started.set()
        if self.gated:
            await self.release.wait()
        if self.fail:
            raise Boom(f"load {n} of {key} failed")
        return f"{key}-{n}"


async def _setup(db: Database) -> tuple[Provider, ModelConfig, User]:
    provider = await create_provider(db, name="openai", kind="openai", api_key="sk-x")
    config = await create_model_config(
        db, provider_id=provider.id, name="gpt", model="gpt-x", context_limit=8000, is_default=True
    )
    user = await make_user(db)
    await put_user_prompt(db, user.id, "Answer in French.")
    return provider, config, user


async def _turn(cache: ConfigCache, user_id: UUID) -> tuple[ModelConfig, Provider, str | None]:
    """The configuration lookups of one chat turn."""
    config = await cache.model_config(None)
    assert config is not None
    provider = await cache.provider(config.provider_id)
    assert provider is not None
    return config, provider, await cache.user_prompt(user_id)


# -- TtlCache ------------------------------------------------------------------------------


async def test_second_get_is_a_hit(mock_clock: trio.testing.MockClock) -> None:
    cache: TtlCache[str, str] = TtlCache(ttl_s=TTL_S)
    load = CountingLoader()
    assert await cache.get("a", load) == "a-1"
    assert await cache.get("a", load) == "a-1"
    assert await cache.get("b", load) == "b-2"
    assert load.calls == 2
    assert (cache.stats.hits, cache.stats.misses, cache.stats.loads) == (1, 2, 2)


async def test_entries_expire_after_the_ttl(mock_clock: trio.testing.MockClock) -> None:
    cache: TtlCache[str, str] = TtlCache(ttl_s=TTL_S)
    load = CountingLoader()
    assert await cache.get("a", load) == "a-1"
    mock_clock.jump(TTL_S - 0.001)
    assert await cache.get("a", load) == "a-1"
    mock_clock.jump(0.001)
    assert await cache.get("a", load) == "a-2"
    assert load.calls == 2
    mock_clock.jump(TTL_S / 2)
    assert await cache.get("a", load) == "a-2"  # the new entry has a TTL of its own
    assert load.calls == 2


async def test_concurrent_gets_share_one_load() -> None:
    cache: TtlCache[str, str] = TtlCache(ttl_s=TTL_S)
    load = CountingLoader(gated=True)
    results: list[str] = []

    async def get() -> None:
        results.append(await cache.get("a", load))

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(get)
        await trio.testing.wait_all_tasks_blocked()
        assert load.calls == 1
        load.release.set()
    assert results == ["a-1"] * 100
    assert load.calls == 1
    assert (cache.stats.loads, cache.stats.misses) == (1, 100)
    assert await cache.get("a", load) == "a-1"


async def test_a_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    cache: TtlCache[str, str] = TtlCache(ttl_s=TTL_S)
    load = CountingLoader(gated=True, fail=True)
    errors: list[Exception] = []

    async def get() -> None:
        try:
            await cache.get("a", load)
        except Boom as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(get)
        await trio.testing.wait_all_tasks_blocked()
        load.release.set()
    assert len(errors) == 100
    assert {str(exc) for exc in errors} == {"load 1 of a failed"}
    assert load.calls == 1
    assert len(cache) == 0

    load.fail = False
    assert await cache.get("a", load) == "a-2"  # the failure was not cached
    assert load.calls == 2


async def test_invalidation_during_a_load_does_not_store_its_stale_result() -> None:
    cache: TtlCache[str, str] = TtlCache(ttl_s=TTL_S)
    old = CountingLoader(gated=True)
    results: list[str] = []

    async def get() -> None:
        results.append(await cache.get("a", old))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(get)
        await old.started.wait()  # the load has read the "old" state and is still in flight
        cache.invalidate("a")
        # A getter after the invalidation does not join the stale load: it loads afresh.
        new = CountingLoader()
        assert await cache.get("a", new) == "a-1"
        old.release.set()
    assert results == ["a-1"]  # the early getter got the answer to the question it asked
    assert old.calls == new.calls == 1
    assert cache.stats.stale_discards == 1
    # The cache holds the fresh load's value, not the stale one that finished last.
    assert await cache.get("a", CountingLoader()) == "a-1"
    assert cache.stats.loads == 2


async def test_invalidation_with_no_later_get_leaves_the_key_empty() -> None:
    cache: TtlCache[str, str] = TtlCache(ttl_s=TTL_S)
    load = CountingLoader(gated=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.get, "a", load)
        await load.started.wait()
        cache.invalidate("a")
        load.release.set()
    assert len(cache) == 0
    assert await cache.get("a", load) == "a-2"


async def test_invalidate_all_during_a_load_does_not_store_its_stale_result() -> None:
    cache: TtlCache[str, str] = TtlCache(ttl_s=TTL_S)
    load = CountingLoader(gated=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.get, "a", load)
        await load.started.wait()
        cache.invalidate_all()
        load.release.set()
    assert len(cache) == 0
    assert cache.stats.stale_discards == 1
    assert cache.stats.invalidations == 1


async def test_none_is_cached() -> None:
    cache: TtlCache[str, str | None] = TtlCache(ttl_s=TTL_S)
    calls = 0

    async def load(_key: str) -> str | None:
        nonlocal calls
        calls += 1
        return None

    assert await cache.get("a", load) is None
    assert await cache.get("a", load) is None
    assert calls == 1


async def test_waiters_of_a_cancelled_load_retry() -> None:
    cache: TtlCache[str, str] = TtlCache(ttl_s=TTL_S)
    load = CountingLoader(gated=True)
    results: list[str] = []

    async def get() -> None:
        results.append(await cache.get("a", load))

    leader_scope = trio.CancelScope()

    async def lead() -> None:
        with leader_scope:
            await cache.get("a", load)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lead)
        await load.started.wait()
        for _ in range(3):
            nursery.start_soon(get)
        await trio.testing.wait_all_tasks_blocked()
        leader_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert load.calls == 2  # one waiter took over the load
        load.release.set()
    assert results == ["a-2"] * 3


async def test_the_least_recently_used_key_is_evicted() -> None:
    cache: TtlCache[str, str] = TtlCache(ttl_s=TTL_S, max_size=2)
    load = CountingLoader()
    await cache.get("a", load)
    await cache.get("b", load)
    await cache.get("a", load)  # "b" is now the least recently used
    await cache.get("c", load)
    assert len(cache) == 2
    assert cache.stats.evictions == 1
    assert await cache.get("a", load) == "a-1"
    assert await cache.get("b", load) == "b-4"  # reloaded


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        TtlCache[str, str](ttl_s=0)
    with pytest.raises(ValueError, match="max_size"):
        TtlCache[str, str](max_size=0)


# -- ConfigCache against PostgreSQL --------------------------------------------------------


async def test_lookups_hit_after_the_first_load(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    provider, config, user = await _setup(db)
    cache = ConfigCache(db, ttl_s=TTL_S)
    before = db.stats.statements
    assert await cache.model_config(config.id) == config
    assert await cache.model_config(None) == config
    assert await cache.provider(provider.id) == provider
    assert await cache.user_prompt(user.id) == "Answer in French."
    assert db.stats.statements - before == 4
    for _ in range(5):
        assert await cache.model_config(config.id) == config
        assert await cache.model_config(None) == config
        assert await cache.provider(provider.id) == provider
        assert await cache.user_prompt(user.id) == "Answer in French."
    assert db.stats.statements - before == 4


async def test_100_turns_within_the_ttl_make_one_query_each(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    provider, config, user = await _setup(db)
    cache = ConfigCache(db, ttl_s=TTL_S)
    before = db.stats.statements
    for _ in range(100):
        assert await _turn(cache, user.id) == (config, provider, "Answer in French.")
        mock_clock.jump(0.25)  # 100 turns over 25 simulated seconds
    assert db.stats.statements - before == 3
    assert (cache.model_configs.stats.loads, cache.providers.stats.loads) == (1, 1)
    assert cache.user_prompts.stats.loads == 1
    assert cache.model_configs.stats.hits == 99


async def test_100_turns_over_several_ttls_make_about_one_query_per_ttl(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    _, _, user = await _setup(db)
    cache = ConfigCache(db, ttl_s=TTL_S)
    before = db.stats.statements
    for _ in range(100):
        await _turn(cache, user.id)
        mock_clock.jump(1.0)  # 100 s: loads at 0, 30, 60 and 90 s
    loads = [c.stats.loads for c in (cache.model_configs, cache.providers, cache.user_prompts)]
    assert loads == [4, 4, 4]
    assert db.stats.statements - before == 12


async def test_no_prompt_is_cached(db: Database, mock_clock: trio.testing.MockClock) -> None:
    user = await make_user(db)
    cache = ConfigCache(db, ttl_s=TTL_S)
    before = db.stats.statements
    for _ in range(10):
        assert await cache.user_prompt(user.id) is None
    assert db.stats.statements - before == 1
    # A missing provider or model config is cached the same way.
    missing = uuid4()
    for _ in range(3):
        assert await cache.provider(missing) is None
        assert await cache.model_config(missing) is None
    assert db.stats.statements - before == 3


async def test_a_write_then_invalidate_is_visible_on_the_next_get(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    provider, config, user = await _setup(db)
    cache = ConfigCache(db, ttl_s=TTL_S)
    await _turn(cache, user.id)
    await cache.model_config(config.id)

    renamed = await update_provider(db, provider.id, name="openai-2")
    cache.invalidate_provider(provider.id)
    assert await cache.provider(provider.id) == renamed

    changed = await update_model_config(db, config.id, model="gpt-y")
    cache.invalidate_model_config(config.id)
    assert await cache.model_config(config.id) == changed
    assert await cache.model_config(None) == changed  # the default entry was dropped too

    await put_user_prompt(db, user.id, "Answer in German.")
    cache.invalidate_user_prompt(user.id)
    assert await cache.user_prompt(user.id) == "Answer in German."
    await delete_user_prompt(db, user.id)
    cache.invalidate_user_prompt(user.id)
    assert await cache.user_prompt(user.id) is None

    # Without an invalidation a write made elsewhere shows after the TTL, not before.
    await put_user_prompt(db, user.id, "Be brief.")
    assert await cache.user_prompt(user.id) is None
    mock_clock.jump(TTL_S)
    assert await cache.user_prompt(user.id) == "Be brief."


async def test_a_new_default_is_visible_on_the_next_get(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    provider, config, _ = await _setup(db)
    cache = ConfigCache(db, ttl_s=TTL_S)
    assert await cache.model_config(None) == config
    assert await cache.model_config(config.id) == config
    other = await create_model_config(
        db, provider_id=provider.id, name="claude", model="claude-x", context_limit=8000
    )
    new_default = await set_default_model_config(db, other.id)
    cache.invalidate_model_configs()
    assert await cache.model_config(None) == new_default
    old = await cache.model_config(config.id)
    assert old is not None
    assert not old.is_default


async def test_invalidation_during_a_database_load_does_not_store_stale_data(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    user = await make_user(db)
    await put_user_prompt(db, user.id, "old")
    cache: TtlCache[UUID, str | None] = TtlCache(ttl_s=TTL_S)
    read = trio.Event()
    release = trio.Event()

    async def slow_load(user_id: UUID) -> str | None:
        prompt = await get_user_prompt(db, user_id)
        read.set()
        await release.wait()  # the row was read; a write lands before the result is stored
        return None if prompt is None else prompt.prompt

    async def fast_load(user_id: UUID) -> str | None:
        prompt = await get_user_prompt(db, user_id)
        return None if prompt is None else prompt.prompt

    results: list[str | None] = []

    async def get(load: Callable[[UUID], Awaitable[str | None]]) -> None:
        results.append(await cache.get(user.id, load))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(get, slow_load)
        await read.wait()
        await put_user_prompt(db, user.id, "new")
        cache.invalidate(user.id)
        release.set()
    assert results == ["old"]
    assert await cache.get(user.id, fast_load) == "new"


async def test_apply_invalidation_takes_names_and_text_keys(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    provider, config, user = await _setup(db)
    cache = ConfigCache(db, ttl_s=TTL_S)
    await _turn(cache, user.id)
    await cache.model_config(config.id)
    assert (len(cache.providers), len(cache.model_configs), len(cache.user_prompts)) == (1, 2, 1)

    cache.apply_invalidation("provider", str(provider.id))
    cache.apply_invalidation("user_prompt", str(user.id))
    assert (len(cache.providers), len(cache.user_prompts)) == (0, 0)
    cache.apply_invalidation("model_config", str(config.id))
    assert len(cache.model_configs) == 0

    await _turn(cache, user.id)
    cache.invalidate_all()
    assert (len(cache.providers), len(cache.model_configs), len(cache.user_prompts)) == (0, 0, 0)

    with pytest.raises(ValueError, match="needs a key"):
        cache.apply_invalidation("provider", None)
    with pytest.raises(ValueError, match="unknown invalidation kind"):
        cache.apply_invalidation("chat", uuid4())  # type: ignore[arg-type]


async def test_model_configs_and_tokens_invalidations_by_name(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    """What other workers announce beside single keys: every model config, every token."""
    _provider, config, user = await _setup(db)
    cache = ConfigCache(db, ttl_s=TTL_S)
    forgotten: list[str] = []
    cache.on_tokens_revoked(lambda: forgotten.append("tokens"))
    await _turn(cache, user.id)
    await cache.model_config(config.id)
    assert len(cache.model_configs) == 2

    cache.apply_invalidation("model_configs", None)
    assert (len(cache.model_configs), len(cache.providers)) == (0, 1)
    cache.apply_invalidation("tokens", None)
    assert forgotten == ["tokens"]
    cache.apply_invalidation("all", None)  # lost notifications: the tokens too
    assert forgotten == ["tokens", "tokens"]
    assert len(cache.providers) == 0


async def test_a_cache_without_a_worker_announces_nothing(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    provider, _config, user = await _setup(db)
    cache = ConfigCache(db, ttl_s=TTL_S)
    statements = db.stats.statements
    cache.invalidate_provider(provider.id)
    cache.invalidate_user_prompt(user.id)
    cache.tokens_revoked()
    await cache.announce()
    assert (db.stats.statements, cache.announced) == (statements, 0)
