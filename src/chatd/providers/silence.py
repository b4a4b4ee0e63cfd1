"""The stream-silence guard: a provider stream that goes quiet fails instead of hanging.

A stalled stream (provider stuck, proxy holding a dead connection open) would otherwise keep a
chat ``running`` forever. The guard bounds the wait for the first item and the gap between
items, and turns a breach into ``StreamSilence``, which classifies as a retryable
``stream_silence_timeout``. Deadlines use trio's clock, so tests run under ``MockClock``.

Wrap the lowest-level iterator the adapter has (SDK events or raw SSE events, not assembled
parts), so that everything the provider sends counts as a sign of life.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Generic, Self, TypeVar

import trio

from chatd.providers.errors import StreamSilence

T = TypeVar("T")


class SilenceGuard(Generic[T]):
    """An async iterator over ``parts`` that raises ``StreamSilence`` when ``parts`` is silent.

    The first item may take ``first_chunk_timeout_s`` (default: ``silence_timeout_s``); every
    later one ``silence_timeout_s`` after the previous. On silence the underlying iterator is
    closed (``aclose()``, or an async ``close()`` as the SDK streams have) before raising, so
    the HTTP connection is released. Use ``async with`` to close it on every other exit too.

    A class rather than an async generator: a generator wrapper would itself need closing, and
    a forgotten one is a ResourceWarning (fatal in our tests).
    """

    def __init__(
        self,
        parts: AsyncIterator[T],
        *,
        silence_timeout_s: float,
        first_chunk_timeout_s: float | None = None,
    ) -> None:
        if not silence_timeout_s > 0:
            raise ValueError("silence_timeout_s must be greater than 0")
        if first_chunk_timeout_s is not None and not first_chunk_timeout_s > 0:
            raise ValueError("first_chunk_timeout_s must be greater than 0")
        self._parts = parts
        self._silence_timeout_s = silence_timeout_s
        self._first_chunk_timeout_s = (
            silence_timeout_s if first_chunk_timeout_s is None else first_chunk_timeout_s
        )
        self._received_any = False
        self._closed = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        if self._closed:
            raise StopAsyncIteration
        first = not self._received_any
        timeout = self._first_chunk_timeout_s if first else self._silence_timeout_s
        with trio.move_on_after(timeout) as scope:
            item = await anext(self._parts)
        if scope.cancelled_caught:
            await self.aclose()
            raise StreamSilence(timeout, before_first_chunk=first)
        self._received_any = True
        return item

    async def aclose(self) -> None:
        """Close the underlying stream (once); later ``__anext__`` calls end the iteration."""
        if self._closed:
            return
        self._closed = True
        close = getattr(self._parts, "aclose", None) or getattr(self._parts, "close", None)
        if close is not None:
            result = close()
            if inspect.isawaitable(result):
                await result

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def guard_silence(
    parts: AsyncIterator[T],
    *,
    silence_timeout_s: float,
    first_chunk_timeout_s: float | None = None,
) -> SilenceGuard[T]:
    """``SilenceGuard(parts, ...)``, for call sites that read better as a function."""
    return SilenceGuard(
        parts, silence_timeout_s=silence_timeout_s, first_chunk_timeout_s=first_chunk_timeout_s
    )
