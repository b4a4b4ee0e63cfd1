"""The demo's rows (``chatd.demo``) against real PostgreSQL: created once, kept up to date, never
piled up, and never in the way of a default model config the operator made."""

from __future__ import annotations

import httpx2
import pytest
import trio

from chatd.demo import choose_model, ensure_demo_model, open_demo_model
from chatd.providers.fake import DEMO_REPLY, knobs_header
from chatd.store import providers
from chatd.store.database import Database


async def _ask(base_url: str) -> str:
    """One quick (knobs: no pauses) non-streaming completion from the OpenAI-style server."""
    async with httpx2.AsyncClient(timeout=10) as client:
        response = await client.post(
            f"{base_url}/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "Hello!"}]},
            headers=knobs_header(first_chunk_delay_ms=0, chunk_interval_ms=0),
        )
    response.raise_for_status()
    text: str = response.json()["choices"][0]["message"]["content"]
    return text


async def test_the_fake_runs_while_the_block_runs_and_its_row_follows_its_port(
    db: Database,
) -> None:
    async with open_demo_model(db, {}) as first:
        assert first.is_default
        assert first.provider.kind == "openai-compatible"
        assert first.provider.base_url is not None
        assert first.provider.base_url.startswith("http://127.0.0.1:")
        with trio.fail_after(10):
            assert await _ask(first.provider.base_url) == DEMO_REPLY
    with pytest.raises(httpx2.ConnectError):
        await _ask(first.provider.base_url)

    async with open_demo_model(db, {}) as second:
        assert (second.provider.id, second.config.id) == (first.provider.id, first.config.id)
        assert second.provider.base_url is not None
        with trio.fail_after(10):
            assert await _ask(second.provider.base_url) == DEMO_REPLY
    assert [p.name for p in await providers.list_providers(db)] == ["demo-fake"]
    assert [c.name for c in await providers.list_model_configs(db)] == ["demo-fake"]


async def test_a_real_key_takes_over_the_demo_default_and_gives_it_back(db: Database) -> None:
    fake = await ensure_demo_model(db, choose_model({}), base_url="http://127.0.0.1:1/v1")
    env = {"OPENAI_API_KEY": "sk-one", "CHATD_DEMO_MODEL": "gpt-4.1-mini"}
    real = await ensure_demo_model(db, choose_model(env), base_url=None)
    assert real.is_default
    assert (real.provider.kind, real.provider.base_url, real.provider.api_key) == (
        "openai",
        None,
        "sk-one",
    )
    assert real.config.model == "gpt-4.1-mini"

    # A new key and the default model: the same rows, updated.
    again = await ensure_demo_model(db, choose_model({"OPENAI_API_KEY": "sk-two"}), base_url=None)
    assert (again.provider.id, again.config.id) == (real.provider.id, real.config.id)
    assert (again.provider.api_key, again.config.model) == ("sk-two", "gpt-4o-mini")

    back = await ensure_demo_model(db, choose_model({}), base_url="http://127.0.0.1:2/v1")
    assert back.is_default
    assert back.config.id == fake.config.id
    assert back.provider.base_url == "http://127.0.0.1:2/v1"
    default = await providers.get_default_model_config(db)
    assert default is not None
    assert default.id == fake.config.id
    assert len(await providers.list_providers(db)) == 2
    assert len(await providers.list_model_configs(db)) == 2


async def test_an_operator_default_stays_the_default(db: Database) -> None:
    theirs = await providers.create_provider(db, name="prod", kind="openai", api_key="sk-prod")
    config = await providers.create_model_config(
        db, provider_id=theirs.id, name="prod", model="gpt-4o", context_limit=1000, is_default=True
    )
    demo = await ensure_demo_model(db, choose_model({}), base_url="http://127.0.0.1:1/v1")
    assert not demo.is_default
    assert demo.default.id == config.id
    default = await providers.get_default_model_config(db)
    assert default is not None
    assert default.id == config.id


async def test_an_edited_or_disabled_demo_row_is_put_back(db: Database) -> None:
    demo = await ensure_demo_model(db, choose_model({}), base_url="http://127.0.0.1:1/v1")
    await providers.update_provider(db, demo.provider.id, enabled=False, kind="openai")
    await providers.update_model_config(db, demo.config.id, model="other", context_limit=5)
    again = await ensure_demo_model(db, choose_model({}), base_url="http://127.0.0.1:1/v1")
    assert (again.provider.enabled, again.provider.kind) == (True, "openai-compatible")
    assert (again.config.model, again.config.context_limit) == ("chatd-fake", 128_000)
