"""Every adapter's stream goes through here: bounded silence, classified errors, closing."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from typing import Any, Protocol

from chatd.domain.stream_parts import StreamPart
from chatd.providers.errors import ProviderError
from chatd.providers.failure_facts import provider_error
from chatd.providers.silence import SilenceGuard


class StepReader(Protocol):
    """Turns one provider's decoded stream events into normalised parts."""

    def feed(self, event: Any) -> Iterator[StreamPart]: ...

    def end(self) -> Iterator[StreamPart]:
        """The closing parts (usage, finish); raises ``StreamInterrupted`` if the stream was
        cut before its terminal event."""
        ...


@contextlib.asynccontextmanager
async def guarded_stream(
    events: AsyncGenerator[Any, None],
    step: StepReader,
    *,
    provider: str,
    silence_timeout_s: float,
    secrets: Sequence[str],
) -> AsyncIterator[AsyncIterator[StreamPart]]:
    """Yield the parts ``step`` reads from ``events``, with the silence guard on and any failure
    turned into ``ProviderError``.

    ``events`` is an async generator that makes the request on its first step, so the wait for
    the first chunk (connection and headers included) is bounded like any other silence.
    Leaving the block closes the generator, and with it the HTTP stream.
    """
    guarded = SilenceGuard(_normalised(events, step), silence_timeout_s=silence_timeout_s)
    classified = _classified(guarded, provider, [s for s in secrets if s])
    async with contextlib.aclosing(classified):
        yield classified


async def _normalised(
    events: AsyncGenerator[Any, None], step: StepReader
) -> AsyncGenerator[StreamPart, None]:
    async with contextlib.aclosing(events):
        async for event in events:
            for part in step.feed(event):
                yield part
    for part in step.end():
        yield part


async def _classified(
    parts: SilenceGuard[StreamPart], provider: str, secrets: Sequence[str]
) -> AsyncGenerator[StreamPart, None]:
    try:
        async with parts:
            async for part in parts:
                yield part
    except ProviderError:
        raise
    except Exception as exc:
        raise provider_error(exc, provider, secrets=secrets) from exc
