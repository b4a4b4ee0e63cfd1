"""A process-wide memory of who owns each chat, for the ownership check of the chat routes.

Every chat command (send, edit, interrupt, tool results, queue operations) and every stream
handshake first checks that the caller owns the chat; read from PostgreSQL each time, that is
one query per command. A chat's owner never changes (a trigger forbids it), so ``ChatOwners``
keeps ``chat id -> owner id`` once seen, with no TTL: an entry cannot go stale, it is only
pushed out by the size bound (least recently used first).

- The edge remembers the owner of a chat it creates or reads, so a warm chat's commands make no
  ownership query at all.
- Missing chats are not remembered: each costs one query, as without the cache, and random ids
  cannot push real chats out. A chat id names a chat only once its creation committed, and the
  edge remembers it then.
- A chat deleted through this process's edge is forgotten at once (``forget``). One deleted
  through another worker (or by hand) keeps its entry here until pushed out: it still passes
  the ownership check, and the chat's actor answers the command with the same 404.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final
from uuid import UUID

from chatd.store.config_cache import CacheStats
from chatd.store.database import Database

# Chats remembered; an entry (two UUIDs and the LRU link) takes about 280 bytes, so 28 MB at
# most. A chat pushed out costs one query at its next command, nothing worse.
DEFAULT_MAX_SIZE: Final = 100_000


class ChatOwners:
    """``owner(chat_id)``: the chat's owner, or ``None`` when there is no such chat."""

    def __init__(self, db: Database, *, max_size: int = DEFAULT_MAX_SIZE) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self._db = db
        self.max_size = max_size
        self.stats = CacheStats()
        self._owners: OrderedDict[UUID, UUID] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owners)

    async def owner(self, chat_id: UUID) -> UUID | None:
        owner = self._owners.get(chat_id)
        if owner is not None:
            self._owners.move_to_end(chat_id)
            self.stats.hits += 1
            return owner
        self.stats.misses += 1
        self.stats.loads += 1
        # Concurrent first commands to one chat may each read it: harmless, and rare enough
        # not to need the config cache's single flight.
        found: UUID | None = await self._db.fetchval(
            "SELECT owner_id FROM chats WHERE id = $1", chat_id
        )
        if found is not None:
            self.remember(chat_id, found)
        return found

    def forget(self, chat_id: UUID) -> None:
        """Drop a chat that was deleted: its next check reads the database (and finds none)."""
        self._owners.pop(chat_id, None)

    def remember(self, chat_id: UUID, owner_id: UUID) -> None:
        """Record a chat's owner learnt otherwise (the chat was just created or read)."""
        self._owners[chat_id] = owner_id
        self._owners.move_to_end(chat_id)
        while len(self._owners) > self.max_size:
            self._owners.popitem(last=False)
            self.stats.evictions += 1
