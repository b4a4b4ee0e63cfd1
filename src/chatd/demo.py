"""``chatd serve --demo`` (what ``make run`` runs): a model that answers out of the box.

Without an API key in the environment, chatd's fake provider runs in this process (same trio
nursery, a free port on 127.0.0.1) and streams a canned reply at reading speed. With
``OPENAI_API_KEY`` or ``ANTHROPIC_API_KEY`` set, that real provider answers instead (OpenAI when
both are set), with a cheap current model unless ``CHATD_DEMO_MODEL`` names another.

The demo manages only its own rows: a provider and a model config of the same fixed name
(``demo-fake``, ``demo-openai``, ``demo-anthropic``), created once and updated on later starts
(the fake's port changes every time), so restarts never pile up rows. The demo's model config
becomes the default only when there is none, or when the default is one of the demo's own:
a default the operator made stays the default.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from chatd.providers.fake import demo_scenario, open_fake_llm
from chatd.store import providers
from chatd.store.database import Database
from chatd.store.records import ModelConfig, Provider, ProviderKind

log = logging.getLogger(__name__)

OPENAI_KEY_ENV = "OPENAI_API_KEY"
ANTHROPIC_KEY_ENV = "ANTHROPIC_API_KEY"
MODEL_ENV = "CHATD_DEMO_MODEL"

FAKE_NAME = "demo-fake"
OPENAI_NAME = "demo-openai"
ANTHROPIC_NAME = "demo-anthropic"
DEMO_NAMES = frozenset({FAKE_NAME, OPENAI_NAME, ANTHROPIC_NAME})

FAKE_MODEL = "chatd-fake"
OPENAI_DEFAULT_MODEL = "gpt-4o-mini"
ANTHROPIC_DEFAULT_MODEL = "claude-haiku-4-5"
_MAX_MODEL_CHARS = 200  # model_configs.model's limit

README_FIRST_SESSION = 'README.md, "A first session"'


class DemoError(ValueError):
    """The demo cannot be set up as asked; the message says what to change."""


@dataclass(frozen=True, slots=True)
class DemoChoice:
    """Which model the demo configures, decided from the environment alone."""

    name: str  # of the demo's provider and of its model config
    kind: ProviderKind
    model: str
    context_limit: int
    api_key: str = field(repr=False)
    reason: str  # why this one, for the log

    @property
    def is_fake(self) -> bool:
        return self.name == FAKE_NAME


def choose_model(env: Mapping[str, str]) -> DemoChoice:
    """The fake model, or OpenAI / Anthropic when its API key is set (OpenAI first)."""
    openai_key = env.get(OPENAI_KEY_ENV, "").strip()
    anthropic_key = env.get(ANTHROPIC_KEY_ENV, "").strip()
    wanted = env.get(MODEL_ENV, "").strip()
    if len(wanted) > _MAX_MODEL_CHARS:
        raise DemoError(f"{MODEL_ENV} is longer than {_MAX_MODEL_CHARS} characters")
    if openai_key:
        reason = f"{OPENAI_KEY_ENV} is set"
        if anthropic_key:
            reason += f" ({ANTHROPIC_KEY_ENV} too: OpenAI wins)"
        model = wanted or OPENAI_DEFAULT_MODEL
        return DemoChoice(OPENAI_NAME, "openai", model, 128_000, openai_key, reason)
    if anthropic_key:
        model = wanted or ANTHROPIC_DEFAULT_MODEL
        reason = f"{ANTHROPIC_KEY_ENV} is set"
        return DemoChoice(ANTHROPIC_NAME, "anthropic", model, 200_000, anthropic_key, reason)
    reason = f"neither {OPENAI_KEY_ENV} nor {ANTHROPIC_KEY_ENV} is set"
    return DemoChoice(FAKE_NAME, "openai-compatible", FAKE_MODEL, 128_000, "unused", reason)


@dataclass(frozen=True, slots=True)
class DemoModel:
    """The demo's rows once set up, and the default model config that answers new chats."""

    choice: DemoChoice
    provider: Provider
    config: ModelConfig
    default: ModelConfig  # the demo's config, or one the operator made

    @property
    def is_default(self) -> bool:
        return self.default.id == self.config.id

    def describe(self) -> str:
        """One line: which model answers new chats."""
        if not self.is_default:
            return (
                f"model: the default model config {self.default.name!r} (model "
                f"{self.default.model}), which the demo leaves alone; the demo's own is "
                f"{self.config.name!r}"
            )
        if self.choice.is_fake:
            return (
                f"model: chatd's fake LLM, in this process at {self.provider.base_url} (set "
                f"{OPENAI_KEY_ENV} or {ANTHROPIC_KEY_ENV} and restart for a real model)"
            )
        vendor = "OpenAI" if self.choice.kind == "openai" else "Anthropic"
        return (
            f"model: {vendor} {self.config.model} ({self.choice.reason}; {MODEL_ENV} picks another)"
        )


@contextlib.asynccontextmanager
async def open_demo_model(db: Database, env: Mapping[str, str]) -> AsyncIterator[DemoModel]:
    """Set up the demo's model (running the fake provider while the block runs, if chosen)."""
    choice = choose_model(env)
    label = "chatd's fake LLM" if choice.is_fake else f"{choice.kind} {choice.model}"
    log.info("demo model: %s, because %s", label, choice.reason)
    if not choice.is_fake:
        yield await ensure_demo_model(db, choice, base_url=None)
        return
    async with open_fake_llm(demo_scenario(), record=False) as llm:
        yield await ensure_demo_model(db, choice, base_url=f"{llm.url}/v1")


async def ensure_demo_model(db: Database, choice: DemoChoice, *, base_url: str | None) -> DemoModel:
    """Create or update the demo's provider and model config; make it the default unless the
    default is someone else's."""
    provider = await _ensure_provider(db, choice, base_url)
    config = await _ensure_model_config(db, choice, provider)
    default = await providers.get_default_model_config(db)
    if default is None or (default.id != config.id and default.name in DEMO_NAMES):
        default = await providers.set_default_model_config(db, config.id)
    elif default.id == config.id:
        default = config
    return DemoModel(choice, provider, config, default)


async def _ensure_provider(db: Database, choice: DemoChoice, base_url: str | None) -> Provider:
    found = next((p for p in await providers.list_providers(db) if p.name == choice.name), None)
    if found is None:
        return await providers.create_provider(
            db, name=choice.name, kind=choice.kind, base_url=base_url, api_key=choice.api_key
        )
    wanted = (choice.kind, base_url, choice.api_key, True)
    if (found.kind, found.base_url, found.api_key, found.enabled) == wanted:
        return found
    return await providers.update_provider(
        db, found.id, kind=choice.kind, base_url=base_url, api_key=choice.api_key, enabled=True
    )


async def _ensure_model_config(db: Database, choice: DemoChoice, provider: Provider) -> ModelConfig:
    configs = await providers.list_model_configs(db)
    found = next((c for c in configs if c.name == choice.name), None)
    if found is None:
        return await providers.create_model_config(
            db,
            provider_id=provider.id,
            name=choice.name,
            model=choice.model,
            context_limit=choice.context_limit,
        )
    wanted = (provider.id, choice.model, choice.context_limit)
    if (found.provider_id, found.model, found.context_limit) == wanted:
        return found
    return await providers.update_model_config(
        db,
        found.id,
        provider_id=provider.id,
        model=choice.model,
        context_limit=choice.context_limit,
    )


def start_message(
    urls: Sequence[str], token: str | None, token_file: Path | None, model: DemoModel | None
) -> str:
    """What ``chatd serve`` prints once it serves: its URLs, the admin token, where the page
    and the API docs are, and with ``--demo`` the model that answers and a first request to
    copy."""
    lines = [f"chatd is serving on {url}" for url in urls]
    if token is not None:
        lines.append(f"admin API token: {token}  (kept in {token_file})")
    if urls:
        lines.append(f"chat in a browser: {urls[0]}/ (sign in with an API token)")
        lines.append(f"API docs: {urls[0]}/docs")
    if model is None or not urls:
        return "\n".join(lines)
    bearer = f"Bearer {token}" if token is not None else "Bearer $CHATD_TOKEN"
    curl = " ".join(
        [
            "curl -s -X POST",
            shlex.quote(f"{urls[0]}/api/v1/chats"),
            f'-H "Authorization: {bearer}"',
            "-H 'Content-Type: application/json'",
            """-d '{"text": "Hello!"}'""",
        ]
    )
    lines += [model.describe(), "create a chat with a first message:", f"  {curl}"]
    if token is None:
        lines.append("  ($CHATD_TOKEN: a token from `chatd token create --user NAME`)")
    lines.append(f"then watch its answer stream: see {README_FIRST_SESSION}")
    return "\n".join(lines)
