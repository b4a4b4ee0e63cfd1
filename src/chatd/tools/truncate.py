"""Cutting tool output to size: the head and the tail are kept, the middle is dropped and said.

Every workspace tool (file contents, search results, command output) goes through ``clip``, so
the model always sees the same note, and never half of a UTF-8 character at a cut.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Clipped:
    text: str
    cut_bytes: int  # 0 when the whole output is in ``text``


def clip(head: bytes, max_bytes: int, *, tail: bytes = b"", skipped_bytes: int = 0) -> Clipped:
    """The output ``head + <skipped_bytes not kept> + tail`` in at most ``max_bytes`` bytes of
    text (plus the note): its first half and its last half, cut on UTF-8 character boundaries,
    with ``[... N bytes cut ...]`` between them. Bytes that are not UTF-8 are replaced.

    A whole output is passed as ``head`` alone; ``OutputBuffer`` passes the parts it kept of a
    stream too long to hold (its head holds at least the first half, its tail the last half).
    """
    total = len(head) + skipped_bytes + len(tail)
    if total <= max_bytes:
        return Clipped((head + tail).decode("utf-8", "replace"), 0)
    front_budget = max_bytes // 2
    back_budget = max_bytes - front_budget
    if skipped_bytes == 0:
        head, tail = head + tail, head + tail
    front = head[:front_budget]
    back = tail[max(0, len(tail) - back_budget) :] if back_budget else b""
    front = front[: _end_of_last_whole_char(front)]
    back = back[_start_of_first_whole_char(back) :]
    cut = total - len(front) - len(back)
    # No line break around the note: a search result line stays one line.
    note = f"[... {cut} bytes cut ...]"
    return Clipped(
        f"{front.decode('utf-8', 'replace')}{note}{back.decode('utf-8', 'replace')}", cut
    )


def _end_of_last_whole_char(data: bytes) -> int:
    """Where ``data`` ends if a character begun in its last three bytes is left out."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: its lead is further back
            continue
        if byte < 0xC0:  # ASCII (or a stray byte): nothing is open at the end
            return len(data)
        needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
        return len(data) if back >= needed else len(data) - back
    return len(data)


def _start_of_first_whole_char(data: bytes) -> int:
    """How many continuation bytes (the end of a character cut before them) begin ``data``."""
    start = 0
    while start < min(3, len(data)) and data[start] & 0xC0 == 0x80:
        start += 1
    return start


class OutputBuffer:
    """Keeps the first and the last bytes of a stream of any length in ``max_bytes`` of memory,
    so a command printing gigabytes costs no more than one printing ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._head_room = max_bytes // 2
        self._tail_room = max_bytes - self._head_room
        self._head = bytearray()
        self._tail = bytearray()
        self._skipped = 0

    @property
    def total_bytes(self) -> int:
        return len(self._head) + self._skipped + len(self._tail)

    def feed(self, data: bytes | bytearray) -> None:
        room = self._head_room - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if not data:
            return
        self._tail += data
        excess = len(self._tail) - self._tail_room
        if excess > 0:
            del self._tail[:excess]
            self._skipped += excess

    def clipped(self) -> Clipped:
        return clip(
            bytes(self._head), self._max_bytes, tail=bytes(self._tail), skipped_bytes=self._skipped
        )
