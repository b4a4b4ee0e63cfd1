"""What the OpenAI and Anthropic adapters share: configuration, closing, the guarded stream."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx2

from chatd.domain.conversation import ModelRequest
from chatd.domain.stream_parts import StreamPart
from chatd.providers.base import ProviderConfig, StreamParser, Timeouts
from chatd.providers.guard import StepReader, guarded_stream


class SdkAdapter(ABC):
    """One SDK client per configured provider (it holds the connection pool)."""

    def __init__(
        self, config: ProviderConfig, *, timeouts: Timeouts, parser: StreamParser = "fast"
    ) -> None:
        self._config = config
        self._timeouts = timeouts
        self._parser = parser

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def _sdk_options(self) -> dict[str, Any]:
        """Client options both SDKs take alike."""
        return {
            "api_key": self._config.api_key or "unset",
            "base_url": self._config.base_url,
            "max_retries": 0,  # chatd owns retries
            "timeout": httpx2.Timeout(self._timeouts.silence_s, connect=self._timeouts.connect_s),
        }

    def stream(
        self, request: ModelRequest
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[StreamPart]]:
        return guarded_stream(
            self._events(request),
            self._step_reader(),
            provider=self._config.name,
            silence_timeout_s=self._timeouts.silence_s,
            secrets=(self._config.api_key,),
        )

    @abstractmethod
    async def aclose(self) -> None: ...

    @abstractmethod
    def _events(self, request: ModelRequest) -> AsyncGenerator[Any, None]:
        """Send the request; yield the stream's events decoded per ``self._parser``."""

    @abstractmethod
    def _step_reader(self) -> StepReader: ...
