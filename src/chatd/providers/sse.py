"""A minimal server-sent-events reader: the ``data`` of each event, as bytes.

Enough for provider streams (``data:`` lines, blank-line dispatch, comments, CRLF); the event
name is not needed because both providers repeat it inside the JSON.
"""

from __future__ import annotations

from collections.abc import AsyncIterator


async def iter_sse_data(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    pending = b""
    data: list[bytes] = []
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
