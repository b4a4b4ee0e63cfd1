"""What the engine needs from a model provider: stream one model step as normalised parts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from chatd.domain.conversation import ModelRequest
from chatd.domain.stream_parts import StreamPart

ProviderKind = Literal["openai", "anthropic", "openai-compatible"]

# "sdk": the SDK's typed stream objects. "fast": the SDK's raw streaming response, parsed
# with msgspec into just the fields chatd reads (several times less CPU per chunk).
StreamParser = Literal["sdk", "fast"]


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    kind: ProviderKind
    api_key: str = field(repr=False, default="")
    base_url: str | None = None


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float = 10.0
    # Silence before the first chunk and between chunks; also bounds the non-streamed reads.
    silence_s: float = 120.0


class ModelProvider(Protocol):
    """One configured provider; cheap to call, holds a connection pool, closed once."""

    @property
    def name(self) -> str: ...

    def stream(
        self, request: ModelRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[StreamPart]]:
        """Stream one step. Failures surface as ``ProviderError`` while iterating (or on entry).

        Leaving the block early (cancellation included) closes the HTTP stream at once.
        """
        ...

    async def aclose(self) -> None: ...
