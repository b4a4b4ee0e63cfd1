from __future__ import annotations

from dataclasses import replace
from uuid import uuid4

import asyncpg
import pytest
import trio

from chatd.store.database import Database
from chatd.store.errors import Conflict, NotFound
from chatd.store.providers import (
    create_model_config,
    create_provider,
    delete_model_config,
    delete_provider,
    get_default_model_config,
    get_model_config,
    get_provider,
    list_model_configs,
    list_providers,
    set_default_model_config,
    update_model_config,
    update_provider,
)
from chatd.store.records import ModelConfig, Provider
from tests.store.helpers import lease, make_chat, make_user


async def _provider(db: Database, name: str = "openai") -> Provider:
    return await create_provider(db, name=name, kind="openai", api_key="sk-secret-value")


async def _config(
    db: Database,
    provider: Provider,
    name: str,
    *,
    is_default: bool = False,
    options: dict[str, object] | None = None,
) -> ModelConfig:
    return await create_model_config(
        db,
        provider_id=provider.id,
        name=name,
        model="gpt-x",
        context_limit=1000,
        is_default=is_default,
        options=options,
    )


async def test_provider_round_trip(db: Database) -> None:
    provider = await create_provider(
        db,
        name="local",
        kind="openai-compatible",
        base_url="http://127.0.0.1:9000/v1",
        api_key="sk-secret-value",
        enabled=False,
    )
    assert (provider.name, provider.kind, provider.base_url, provider.enabled) == (
        "local",
        "openai-compatible",
        "http://127.0.0.1:9000/v1",
        False,
    )
    assert provider.api_key == "sk-secret-value"
    assert provider.has_api_key
    assert await get_provider(db, provider.id) == provider
    assert await list_providers(db) == [provider]
    assert await get_provider(db, uuid4()) is None


async def test_provider_repr_never_shows_the_api_key(db: Database) -> None:
    provider = await _provider(db)
    assert "sk-secret-value" not in repr(provider)
    assert "sk-secret-value" not in str(provider)
    keyless = await create_provider(db, name="anthropic", kind="anthropic")
    assert not keyless.has_api_key


async def test_update_provider_changes_only_the_given_fields(db: Database) -> None:
    provider = await _provider(db)
    renamed = await update_provider(db, provider.id, name="openai-2", enabled=False)
    assert (renamed.name, renamed.enabled, renamed.api_key, renamed.kind) == (
        "openai-2",
        False,
        "sk-secret-value",
        "openai",
    )
    assert renamed.updated_at >= provider.updated_at
    cleared = await update_provider(db, provider.id, api_key=None, base_url="https://api.x.com")
    assert (cleared.api_key, cleared.base_url, cleared.name) == (
        None,
        "https://api.x.com",
        "openai-2",
    )
    assert await get_provider(db, provider.id) == cleared


async def test_provider_conflicts_and_missing(db: Database) -> None:
    provider = await _provider(db, "a")
    await _provider(db, "b")
    with pytest.raises(Conflict):
        await create_provider(db, name="a", kind="anthropic")
    with pytest.raises(Conflict):
        await update_provider(db, provider.id, name="b")
    with pytest.raises(NotFound):
        await update_provider(db, uuid4(), name="c")
    with pytest.raises(NotFound):
        await delete_provider(db, uuid4())
    # The cross-column rule holds on update too: an openai-compatible server needs a URL.
    with pytest.raises(asyncpg.CheckViolationError):
        await update_provider(db, provider.id, kind="openai-compatible")
    assert await get_provider(db, provider.id) == provider


async def test_a_provider_in_use_cannot_be_deleted(db: Database) -> None:
    provider = await _provider(db)
    config = await _config(db, provider, "m")
    with pytest.raises(Conflict):
        await delete_provider(db, provider.id)
    assert await get_provider(db, provider.id) == provider
    await delete_model_config(db, config.id)
    await delete_provider(db, provider.id)
    assert await get_provider(db, provider.id) is None


async def test_model_config_round_trip(db: Database) -> None:
    provider = await _provider(db)
    config = await create_model_config(
        db,
        provider_id=provider.id,
        name="fast",
        model="gpt-x-mini",
        context_limit=128_000,
        compression_threshold=0.5,
        options={"temperature": 0.2, "stop": ["\n\n"], "reasoning": {"effort": "low"}},
    )
    assert (config.provider_id, config.name, config.model) == (provider.id, "fast", "gpt-x-mini")
    assert (config.context_limit, config.compression_threshold) == (128_000, 0.5)
    assert config.options == {"temperature": 0.2, "stop": ["\n\n"], "reasoning": {"effort": "low"}}
    assert not config.is_default
    assert await get_model_config(db, config.id) == config
    assert await list_model_configs(db) == [config]
    assert await list_model_configs(db, provider_id=provider.id) == [config]
    assert await list_model_configs(db, provider_id=uuid4()) == []
    assert await get_model_config(db, uuid4()) is None


async def test_update_model_config(db: Database) -> None:
    first, second = await _provider(db, "one"), await _provider(db, "two")
    config = await _config(db, first, "m", options={"a": 1})
    updated = await update_model_config(
        db, config.id, provider_id=second.id, context_limit=5, options={"b": [2]}
    )
    assert (updated.provider_id, updated.context_limit, updated.options) == (
        second.id,
        5,
        {"b": [2]},
    )
    # Created without a threshold: the column's default.
    assert (updated.name, updated.model, updated.compression_threshold) == ("m", "gpt-x", 0.7)
    assert await get_model_config(db, config.id) == updated
    with pytest.raises(NotFound):
        await update_model_config(db, uuid4(), name="x")
    with pytest.raises(NotFound):
        await update_model_config(db, config.id, provider_id=uuid4())
    await _config(db, first, "other")
    with pytest.raises(Conflict):
        await update_model_config(db, config.id, name="other")
    with pytest.raises(Conflict):
        await _config(db, first, "m")
    with pytest.raises(NotFound):
        await create_model_config(db, provider_id=uuid4(), name="z", model="gpt-x", context_limit=1)
    assert await get_model_config(db, config.id) == updated


async def test_a_model_configs_tools_default_and_change(db: Database) -> None:
    provider = await _provider(db)
    plain = await _config(db, provider, "plain")
    assert plain.tools == ("current_time", "calculate")  # the column's default
    chosen = await create_model_config(
        db,
        provider_id=provider.id,
        name="agent",
        model="gpt-x",
        context_limit=1000,
        tools=["read_file", "execute"],
    )
    assert chosen.tools == ("read_file", "execute")
    assert await get_model_config(db, chosen.id) == chosen
    renamed = await update_model_config(db, chosen.id, name="agent-2")
    assert renamed.tools == ("read_file", "execute")  # not given: kept
    emptied = await update_model_config(db, chosen.id, tools=[])
    assert emptied.tools == ()
    assert (await update_model_config(db, chosen.id, tools=("calculate",))).tools == ("calculate",)


async def test_set_default_model_config_replaces_the_old_default(db: Database) -> None:
    provider = await _provider(db)
    assert await get_default_model_config(db) is None
    a = await _config(db, provider, "a", is_default=True)
    assert a.is_default
    b = await _config(db, provider, "b", is_default=True)
    assert b.is_default
    old = await get_model_config(db, a.id)
    assert old is not None
    assert not old.is_default
    assert replace(old, is_default=True, updated_at=a.updated_at) == a  # nothing else changed
    c = await _config(db, provider, "c")
    assert not c.is_default

    now_default = await set_default_model_config(db, c.id)
    assert now_default.is_default
    assert await get_default_model_config(db) == now_default
    assert [x.name for x in await list_model_configs(db) if x.is_default] == ["c"]
    # Setting the current default again keeps it the only one.
    await set_default_model_config(db, c.id)
    assert [x.name for x in await list_model_configs(db) if x.is_default] == ["c"]


async def test_set_default_to_a_missing_config_keeps_the_old_default(db: Database) -> None:
    provider = await _provider(db)
    a = await _config(db, provider, "a", is_default=True)
    with pytest.raises(NotFound):
        await set_default_model_config(db, uuid4())
    default = await get_default_model_config(db)
    assert default is not None
    assert default.id == a.id


async def test_concurrent_default_changes_leave_exactly_one(db: Database) -> None:
    provider = await _provider(db)
    configs = [await _config(db, provider, f"m{i}") for i in range(6)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for config in configs:
                nursery.start_soon(set_default_model_config, db, config.id)
    assert len([c for c in await list_model_configs(db) if c.is_default]) == 1


async def test_deleting_a_model_config_unlinks_its_chats(db: Database) -> None:
    provider = await _provider(db)
    config = await _config(db, provider, "m")
    user = await make_user(db)
    chat = await make_chat(db, await lease(db), user.id, model_config_id=config.id)
    assert chat.model_config_id == config.id
    await delete_model_config(db, config.id)
    assert await get_model_config(db, config.id) is None
    assert await db.fetchval("SELECT model_config_id FROM chats WHERE id = $1", chat.id) is None
    with pytest.raises(NotFound):
        await delete_model_config(db, config.id)
