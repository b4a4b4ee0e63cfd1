"""The stream-silence guard under trio's MockClock: exact deadlines, no real waiting."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest
import trio
import trio.testing

from chatd.providers.errors import StreamSilence
from chatd.providers.silence import SilenceGuard, guard_silence


class Source:
    """An async generator of items sent after given delays, which records how it ended."""

    def __init__(self, schedule: Sequence[tuple[float, str]]) -> None:
        self.schedule = schedule
        self.closed = False
        self.finished = False

    async def stream(self) -> AsyncIterator[str]:
        try:
            for delay, item in self.schedule:
                await trio.sleep(delay)
                yield item
            self.finished = True
        finally:
            self.closed = True


class SdkLikeStream:
    """Like the SDKs' AsyncStream: an async iterator closed by ``await close()``, no aclose."""

    def __init__(self) -> None:
        self.closed = False

    def __aiter__(self) -> SdkLikeStream:
        return self

    async def __anext__(self) -> str:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self.closed = True


async def test_a_healthy_stream_passes_through_unchanged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = Source([(5.0, "a"), (9.9, "b"), (0.0, "c"), (9.9, "d")])
    start = trio.current_time()
    async with guard_silence(
        source.stream(), silence_timeout_s=10.0, first_chunk_timeout_s=10.0
    ) as guarded:
        items = [item async for item in guarded]
    assert items == ["a", "b", "c", "d"]
    assert source.finished
    assert trio.current_time() - start == pytest.approx(5.0 + 9.9 + 9.9)


async def test_silence_before_the_first_chunk(autojump_clock: trio.testing.MockClock) -> None:
    source = Source([(31.0, "late")])
    start = trio.current_time()
    guarded = SilenceGuard(source.stream(), silence_timeout_s=10.0, first_chunk_timeout_s=30.0)
    with pytest.raises(StreamSilence) as caught:
        await anext(guarded)
    assert trio.current_time() - start == 30.0
    assert caught.value.before_first_chunk is True
    assert caught.value.waited_s == 30.0
    assert source.closed


async def test_silence_between_chunks(autojump_clock: trio.testing.MockClock) -> None:
    source = Source([(25.0, "a"), (1.0, "b"), (10.5, "never")])
    guarded = SilenceGuard(source.stream(), silence_timeout_s=10.0, first_chunk_timeout_s=30.0)
    assert await anext(guarded) == "a"
    assert await anext(guarded) == "b"
    last = trio.current_time()
    with pytest.raises(StreamSilence) as caught:
        await anext(guarded)
    assert trio.current_time() - last == 10.0
    assert caught.value.before_first_chunk is False
    assert caught.value.waited_s == 10.0
    assert source.closed
    # After the silence the guard is finished, not stuck.
    assert [item async for item in guarded] == []


async def test_the_first_chunk_timeout_defaults_to_the_silence_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    guarded = SilenceGuard(Source([(100.0, "x")]).stream(), silence_timeout_s=7.0)
    start = trio.current_time()
    with pytest.raises(StreamSilence, match="before the first chunk"):
        await anext(guarded)
    assert trio.current_time() - start == 7.0


async def test_an_item_just_in_time_resets_the_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 9.999 s gaps, 100 times: far longer than the timeout in total, never silent for 10 s.
    source = Source([(9.999, str(i)) for i in range(100)])
    async with guard_silence(source.stream(), silence_timeout_s=10.0) as guarded:
        assert len([item async for item in guarded]) == 100


async def test_an_sdk_stream_is_closed_through_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = SdkLikeStream()
    guarded = guard_silence(stream, silence_timeout_s=1.0)
    with pytest.raises(StreamSilence):
        await anext(guarded)
    assert stream.closed


async def test_leaving_the_block_early_closes_the_source(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = Source([(1.0, "a"), (1.0, "b")])
    async with guard_silence(source.stream(), silence_timeout_s=10.0) as guarded:
        assert await anext(guarded) == "a"
    assert source.closed
    assert not source.finished


async def test_errors_of_the_source_pass_through(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def failing() -> AsyncIterator[str]:
        yield "a"
        raise ValueError("boom")

    async with guard_silence(failing(), silence_timeout_s=10.0) as guarded:
        assert await anext(guarded) == "a"
        with pytest.raises(ValueError, match="boom"):
            await anext(guarded)


async def test_an_outer_cancel_is_not_reported_as_silence(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = Source([(100.0, "x")])
    start = trio.current_time()
    async with guard_silence(source.stream(), silence_timeout_s=50.0) as guarded:
        with trio.move_on_after(5.0) as outer:
            await anext(guarded)
    assert outer.cancelled_caught
    assert trio.current_time() - start == 5.0
    assert source.closed


@pytest.mark.parametrize(
    "kwargs",
    [
        {"silence_timeout_s": 0.0},
        {"silence_timeout_s": 1.0, "first_chunk_timeout_s": 0.0},
    ],
)
def test_non_positive_timeouts_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        SilenceGuard(SdkLikeStream(), **kwargs)
