"""A minimal server-sent-events reader: the ``data`` of each event, as bytes.

Enough for provider streams (``data:`` lines, blank-line dispatch, comments, CRLF); the event
name is not needed because both providers repeat it inside the JSON.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import TypeVar

import httpx2

T = TypeVar("T")


async def iter_sse_data(body: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    """Closing this generator closes ``body`` too."""
    pending = b""
    data: list[bytes] = []
    try:
        async for chunk in body:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw[:-1] if raw.endswith(b"\r") else raw
                if not line:
                    if data:
                        yield data[0] if len(data) == 1 else b"\n".join(data)
                        data = []
                elif line.startswith(b"data:"):
                    value = line[5:]
                    data.append(value[1:] if value.startswith(b" ") else value)
                # "event:", "id:", "retry:" and ":" comments carry nothing chatd needs.
        if data:
            yield b"\n".join(data)
    finally:
        await body.aclose()


async def decoded_events(
    response: httpx2.Response, decode: Callable[[bytes], T | None]
) -> AsyncGenerator[T, None]:
    """Each event's data through ``decode`` (``None``: skip it), reading the body to its end.

    A failure of ``decode`` (an error event, or garbage) is raised once the body has ended, so
    the connection goes back to the pool instead of being closed; what the server sends after
    it is not decoded.
    """
    failure: Exception | None = None
    async with contextlib.aclosing(iter_sse_data(response.aiter_bytes())) as events:
        async for data in events:
            if failure is not None:
                continue
            try:
                item = decode(data)
            except Exception as exc:  # noqa: BLE001 - raised below, after the body ended
                failure = exc
                continue
            if item is not None:
                yield item
    if failure is not None:
        raise failure
