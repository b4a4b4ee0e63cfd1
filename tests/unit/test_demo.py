"""The pure pieces of ``chatd serve --demo``: which model, the fake's pace, what gets printed."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

import pytest

from chatd.demo import (
    ANTHROPIC_DEFAULT_MODEL,
    FAKE_MODEL,
    OPENAI_DEFAULT_MODEL,
    DemoChoice,
    DemoError,
    DemoModel,
    choose_model,
    start_message,
)
from chatd.providers.fake import DEMO_REPLY, demo_scenario
from chatd.providers.fake.scenario import RequestFacts, plan_reply
from chatd.store.records import ModelConfig, Provider

URL = "http://127.0.0.1:8080"
TOKEN = "chatd_abc"


def test_without_keys_the_fake_model_answers() -> None:
    choice = choose_model({"OPENAI_API_KEY": " ", "CHATD_DEMO_MODEL": "gpt-4o"})
    assert choice.is_fake
    assert (choice.name, choice.kind, choice.model) == (
        "demo-fake",
        "openai-compatible",
        FAKE_MODEL,
    )
    assert "neither OPENAI_API_KEY nor ANTHROPIC_API_KEY" in choice.reason


def test_an_openai_key_picks_openai_and_wins_over_anthropic() -> None:
    alone = choose_model({"OPENAI_API_KEY": "sk-a"})
    assert (alone.name, alone.kind, alone.model, alone.api_key) == (
        "demo-openai",
        "openai",
        OPENAI_DEFAULT_MODEL,
        "sk-a",
    )
    both = choose_model({"OPENAI_API_KEY": "sk-a", "ANTHROPIC_API_KEY": "sk-ant-b"})
    assert (both.name, both.api_key) == ("demo-openai", "sk-a")
    assert "OpenAI wins" in both.reason
    assert "sk-" not in repr(both)


def test_an_anthropic_key_picks_anthropic_and_the_model_is_overridable() -> None:
    choice = choose_model({"ANTHROPIC_API_KEY": "sk-ant-b"})
    assert (choice.name, choice.kind, choice.model) == (
        "demo-anthropic",
        "anthropic",
        ANTHROPIC_DEFAULT_MODEL,
    )
    picked = choose_model({"ANTHROPIC_API_KEY": "k", "CHATD_DEMO_MODEL": " claude-opus-4-1 "})
    assert picked.model == "claude-opus-4-1"


def test_an_overlong_model_name_is_refused_by_name() -> None:
    with pytest.raises(DemoError, match="CHATD_DEMO_MODEL"):
        choose_model({"OPENAI_API_KEY": "k", "CHATD_DEMO_MODEL": "m" * 201})


def test_the_demo_reply_streams_in_token_sized_chunks_at_reading_speed() -> None:
    scenario = demo_scenario()
    facts = RequestFacts("m", True, True, "Hello!", False, 6, None)
    plan = plan_reply(scenario, facts, "t")
    assert "".join(plan.text) == DEMO_REPLY
    assert all(1 <= len(piece) <= 6 for piece in plan.text)
    assert 200 <= scenario.first_chunk_delay_ms <= 1000
    assert 30 <= scenario.chunk_interval_ms <= 50
    seconds = (scenario.first_chunk_delay_ms + len(plan.text) * scenario.chunk_interval_ms) / 1000
    assert 1 < seconds < 6


def _model(choice: DemoChoice, *, default_name: str | None = None) -> DemoModel:
    now = datetime.now(UTC)
    provider = Provider(uuid4(), choice.name, choice.kind, None, "k", True, now, now)
    if choice.is_fake:
        provider = Provider(
            provider.id, choice.name, choice.kind, "http://127.0.0.1:4321/v1", "k", True, now, now
        )
    config = ModelConfig(
        uuid4(), provider.id, choice.name, choice.model, 1000, 0.8, {}, True, now, now
    )
    default = config
    if default_name is not None:
        default = ModelConfig(
            uuid4(), uuid4(), default_name, "their-model", 1000, 0.8, {}, True, now, now
        )
    return DemoModel(choice, provider, config, default)


def test_without_demo_the_url_token_page_and_docs_lines_are_printed() -> None:
    page_and_docs = [
        f"chat in a browser: {URL}/ (sign in with an API token)",
        f"API docs: {URL}/docs",
    ]
    assert start_message([URL], TOKEN, Path("t"), None).splitlines() == [
        f"chatd is serving on {URL}",
        f"admin API token: {TOKEN}  (kept in t)",
        *page_and_docs,
    ]
    assert start_message([URL], None, None, None).splitlines() == [
        f"chatd is serving on {URL}",
        *page_and_docs,
    ]


def test_the_demo_prints_the_model_and_a_curl_to_copy() -> None:
    lines = start_message([URL], TOKEN, Path("t"), _model(choose_model({}))).splitlines()
    assert lines[:2] == [f"chatd is serving on {URL}", f"admin API token: {TOKEN}  (kept in t)"]
    assert lines[4].startswith("model: chatd's fake LLM, in this process at http://127.0.0.1:4321")
    assert lines[6] == (
        f'  curl -s -X POST {URL}/api/v1/chats -H "Authorization: Bearer {TOKEN}"'
        """ -H 'Content-Type: application/json' -d '{"text": "Hello!"}'"""
    )
    assert '"A first session"' in lines[-1]


def test_the_demo_names_a_real_model_and_an_operator_default() -> None:
    real = _model(choose_model({"OPENAI_API_KEY": "sk-a", "ANTHROPIC_API_KEY": "b"}))
    line = start_message([URL], TOKEN, None, real).splitlines()[4]
    assert line.startswith(f"model: OpenAI {OPENAI_DEFAULT_MODEL} (OPENAI_API_KEY is set")
    assert "OpenAI wins" in line
    theirs = _model(choose_model({}), default_name="prod")
    line = start_message([URL], TOKEN, None, theirs).splitlines()[4]
    assert "'prod'" in line
    assert "'demo-fake'" in line


def test_without_a_token_the_curl_says_where_to_get_one() -> None:
    text = start_message([URL], None, None, _model(choose_model({})))
    assert '-H "Authorization: Bearer $CHATD_TOKEN"' in text
    assert "chatd token create" in text
