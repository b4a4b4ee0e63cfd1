"""A process-wide cache of who a bearer token belongs to.

Every HTTP request and WebSocket handshake authenticates; read from PostgreSQL each time, that
is one query per request for data that changes only when a token is revoked. ``TokenCache``
keeps ``token hash -> User`` for ``ttl_s`` seconds, on the config cache's ``TtlCache`` (trio's
clock, one load per key at a time, generations, an LRU bound), so once warm a request makes no
authentication query.

Freshness rules:

- a revocation made by this process goes through ``TokenCache.revoke``: the entry is dropped
  at once, and a check of that token already in flight cannot store what it read;
- a revocation made elsewhere (another worker process, another machine, SQL by hand) is seen
  here after at most ``ttl_s`` seconds; ``ttl_s=0`` turns the cache off where that window is
  not acceptable;
- unknown and revoked tokens are never cached: each costs one query, as without the cache, and
  random tokens can neither grow the cache nor push real tokens out of it;
- at most ``max_size`` tokens are kept, the least recently used goes first (it costs one query
  at its next use);
- ``last_used_at`` is recorded by the loading query, so a cached token's use is recorded at
  most once per TTL (it was already coarse: at most once a minute).
"""

from __future__ import annotations

from typing import Final
from uuid import UUID

from chatd.store import users
from chatd.store.config_cache import CacheStats, TtlCache
from chatd.store.database import Database
from chatd.store.errors import NotFound
from chatd.store.records import ApiToken, User

DEFAULT_TTL_S: Final = 10.0
# Live tokens kept; an entry (a User and its key) takes about 0.5 KB, so 5 MB at most. A busy
# process with more live tokens than this re-reads the least recently used ones, nothing worse.
DEFAULT_MAX_SIZE: Final = 10_000


class _Refused(Exception):
    """The loader's answer for an unknown or revoked token: ``TtlCache`` stores no failed load."""


class TokenCache:
    """``authenticate(secret)`` answers like ``chatd.store.users.authenticate``, from the cache
    when it can; ``revoke`` revokes a token and forgets it here at once."""

    def __init__(
        self, db: Database, *, ttl_s: float = DEFAULT_TTL_S, max_size: int = DEFAULT_MAX_SIZE
    ) -> None:
        if ttl_s < 0:
            raise ValueError(f"ttl_s must be >= 0 (0: no cache), got {ttl_s}")
        self._db = db
        self.ttl_s = ttl_s
        # None when off (ttl_s == 0): every call reads the database.
        self._users: TtlCache[bytes, User] | None = (
            TtlCache(ttl_s=ttl_s, max_size=max_size) if ttl_s > 0 else None
        )
        self._uncached = CacheStats()

    @property
    def stats(self) -> CacheStats:
        """Hits, misses, loads (queries), invalidations and evictions."""
        return self._uncached if self._users is None else self._users.stats

    def __len__(self) -> int:
        return 0 if self._users is None else len(self._users)

    async def authenticate(self, secret: str) -> User | None:
        """The user a live token belongs to, or ``None`` for an unknown or revoked secret."""
        if not users.is_token_shaped(secret):
            return None
        digest = users.hash_token(secret)
        if self._users is None:
            self._uncached.misses += 1
            self._uncached.loads += 1
            return await users.authenticate_hash(self._db, digest)
        try:
            return await self._users.get(digest, self._load)
        except _Refused:
            return None

    async def _load(self, digest: bytes) -> User:
        user = await users.authenticate_hash(self._db, digest)
        if user is None:
            raise _Refused
        return user

    async def revoke(self, token_id: UUID, *, user_id: UUID | None = None) -> ApiToken:
        """Revoke the token (of ``user_id`` when given) and forget it: refused from now on."""
        try:
            token, digest = await users.revoke_api_token_and_hash(
                self._db, token_id, user_id=user_id
            )
        except NotFound:
            raise  # nothing was revoked
        except BaseException:
            # The revocation may have committed without telling us which token it was.
            self.invalidate_all()
            raise
        if self._users is not None:
            self._users.invalidate(digest)
        return token

    def invalidate_all(self) -> None:
        """Forget every token (each is read again on its next use)."""
        if self._users is not None:
            self._users.invalidate_all()
