"""Build the adapter for a provider configuration."""

from __future__ import annotations

from chatd.providers.anthropic_messages import AnthropicMessagesProvider
from chatd.providers.base import ModelProvider, ProviderConfig, StreamParser, Timeouts
from chatd.providers.openai_chat import OpenAIChatProvider


def build_provider(
    config: ProviderConfig, *, timeouts: Timeouts, parser: StreamParser = "fast"
) -> ModelProvider:
    match config.kind:
        case "anthropic":
            return AnthropicMessagesProvider(config, timeouts=timeouts, parser=parser)
        case "openai" | "openai-compatible":
            return OpenAIChatProvider(config, timeouts=timeouts, parser=parser)
