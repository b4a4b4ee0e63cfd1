"""The SSE reader yields each event's data whatever way the bytes were split."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import pytest

from chatd.providers.sse import iter_sse_data

STREAM = (
    b": keep-alive comment\n\n"
    b'event: message_start\ndata: {"a": 1}\n\n'
    b"data: line one\r\ndata: line two\r\n\r\n"
    b"id: 7\nretry: 10\ndata:no-space\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [b'{"a": 1}', b"line one\nline two", b"no-space", b"[DONE]"]


async def _chunks(data: bytes, size: int) -> AsyncGenerator[bytes, None]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(STREAM)])
async def test_events_survive_any_split(size: int) -> None:
    assert [d async for d in iter_sse_data(_chunks(STREAM, size))] == EXPECTED


async def test_an_unterminated_last_event_is_still_delivered() -> None:
    assert [d async for d in iter_sse_data(_chunks(b"data: x\n", 3))] == [b"x"]
