"""Which provider and model answer a chat: model configs resolved to live adapters.

Rows come from the process-wide config cache, so a warm step makes no configuration query.
Adapters hold connection pools, so one is built per provider and kept for the process's life
(rebuilt when the provider's row changed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from chatd.domain.provider_failure import ErrorKind, ProviderFailure
from chatd.providers.base import ModelProvider, ProviderConfig, StreamParser, Timeouts
from chatd.providers.factory import build_provider
from chatd.store.config_cache import ConfigCache


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    provider: ModelProvider
    model: str
    options: Mapping[str, Any]
    # The built-in tools the model config enables (a chat may name its own instead).
    tools: tuple[str, ...] = ()
    # Compaction: a prompt past ``compression_threshold`` (a fraction) of ``context_limit``
    # tokens is summarized first.
    context_limit: int = 0
    compression_threshold: float = 0.7


class ModelUnavailable(Exception):
    """No usable model config: the chat's step fails with a non-retryable config error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.failure = ProviderFailure(
            kind=ErrorKind.CONFIG,
            provider="chatd",
            status_code=None,
            retryable=False,
            retry_after_s=None,
            message="This chat has no usable model configured.",
            detail=reason,
        )


class ModelCatalog:
    def __init__(
        self, config: ConfigCache, *, timeouts: Timeouts, parser: StreamParser = "fast"
    ) -> None:
        self._config = config
        self._timeouts = timeouts
        self._parser = parser
        self._adapters: dict[UUID, tuple[object, ModelProvider]] = {}

    async def resolve(self, model_config_id: UUID | None) -> ResolvedModel:
        config = await self._config.model_config(model_config_id)
        if config is None and model_config_id is not None:
            # Deleting a model config sets its chats' config to NULL (the default) in the
            # database; a live actor still holds the old id, so it follows the default too.
            config = await self._config.model_config(None)
        if config is None:
            raise ModelUnavailable("no model config is set for this chat and none is the default")
        row = await self._config.provider(config.provider_id)
        if row is None or not row.enabled:
            raise ModelUnavailable(f"provider {config.provider_id} is missing or disabled")
        version = (row.kind, row.base_url, row.api_key, row.updated_at)
        cached = self._adapters.get(row.id)
        if cached is None or cached[0] != version:
            if cached is not None:
                await cached[1].aclose()
            adapter = build_provider(
                ProviderConfig(row.name, row.kind, row.api_key or "", row.base_url),
                timeouts=self._timeouts,
                parser=self._parser,
            )
            cached = (version, adapter)
            self._adapters[row.id] = cached
        return ResolvedModel(
            cached[1],
            config.model,
            config.options,
            tools=config.tools,
            context_limit=config.context_limit,
            compression_threshold=config.compression_threshold,
        )

    async def aclose(self) -> None:
        adapters, self._adapters = self._adapters, {}
        for _version, adapter in adapters.values():
            await adapter.aclose()
