"""The store's typed refusals: the few outcomes a caller is expected to handle.

Anything else that PostgreSQL rejects (a CHECK or NOT NULL violation) means the caller skipped
validation or the state machine has a bug, and keeps its asyncpg type.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of the store's typed refusals."""


class Fenced(StoreError):
    """A chat write under a shard lease that moved on or expired; the writer is deposed."""

    def __init__(self, shard: int, epoch: int) -> None:
        super().__init__(f"shard {shard} epoch {epoch} is no longer held by this worker")
        self.shard = shard
        self.epoch = epoch


class NotFound(StoreError):
    """The row to read, change or refer to does not exist (or belongs to someone else)."""

    def __init__(self, kind: str, key: object) -> None:
        super().__init__(f"{kind} {key} not found")
        self.kind = kind
        self.key = key


class Conflict(StoreError):
    """The write collides with existing data: a taken name, a row still in use."""

    def __init__(self, message: str, *, constraint: str | None = None) -> None:
        super().__init__(message)
        self.constraint = constraint
