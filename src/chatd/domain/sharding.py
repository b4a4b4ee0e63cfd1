"""Which shard a chat belongs to: fixed for the chat's life, spread evenly."""

from __future__ import annotations

from uuid import UUID


def shard_of(chat_id: UUID, shard_count: int) -> int:
    """Chat ids are random (uuid4), so their integer value modulo the count is uniform and
    the same in every process and every release."""
    return chat_id.int % shard_count
