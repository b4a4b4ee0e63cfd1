"""Which commits a PostgreSQL read saw: ``pg_current_snapshot()`` and the ids of transactions.

A chat's actor commits, then publishes what the commit did; a stream subscriber reads the chat
in between or after. To deliver each event once, the subscriber must know whether its read saw a
given commit. PostgreSQL says it exactly: a commit returns its transaction id
(``pg_current_xact_id()``), a read reports its snapshot, and a committed transaction is visible
in a snapshot when its id is below the snapshot's ``xmin``, or below its ``xmax`` and not among
the transactions in progress when the snapshot was taken (the rule of ``pg_visible_in_snapshot``).
Both are 64-bit ids (``xid8``, epoch included), so they never wrap around.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReadSnapshot:
    """The commits a read saw, from the text form of ``pg_current_snapshot()``."""

    xmin: int
    xmax: int
    in_progress: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> ReadSnapshot:
        """``"xmin:xmax:xip,xip,..."`` (the list may be empty), as PostgreSQL writes it."""
        try:
            xmin, xmax, xip = text.split(":")
            return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))
        except ValueError:
            raise ValueError(f"not a PostgreSQL snapshot: {text!r}") from None

    def sees(self, xid: int) -> bool:
        """Whether the read saw the commit of the (committed) transaction ``xid``."""
        return xid < self.xmin or (xid < self.xmax and xid not in self.in_progress)
