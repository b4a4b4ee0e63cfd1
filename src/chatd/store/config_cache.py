"""A process-wide cache of configuration: providers, model configs and user custom prompts.

A chat turn needs its model config, that config's provider and the user's custom prompt; read
from PostgreSQL each time, that is three queries per turn for data that changes a few times a
day. ``ConfigCache`` keeps them for a TTL, so once warm a turn makes no configuration query.

Freshness rules:

- every write made by this process is followed by an ``invalidate_*`` call (write-through), so
  it is visible on the next lookup, not after the TTL;
- writes made by other workers are seen on their next lookup too: ``announce()`` (awaited by
  the edge after its ``invalidate_*`` calls, before it answers) NOTIFYs them on
  ``CONFIG_CHANNEL``, and every worker's ``follow`` task applies what the others announce
  (``apply_invalidation``). NOTIFY is a hint: when the listener reports lost notifications,
  everything is invalidated; an announcement that cannot be sent (the database is away) leaves
  the other workers on the TTL, which stays as the last backstop;
- a load that started before an invalidation never stores its result (it may have read the old
  row), thanks to a per-key generation counter;
- "nothing there" (no prompt for this user, no default model config) is cached like a value.

``TtlCache`` is the generic part: TTL on trio's clock, one in-flight load per key
(singleflight), generations, negative caching, an LRU bound and counters.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Final, Generic, Literal, TypeVar, get_args
from uuid import UUID

import msgspec
import trio

from chatd.store.database import Database, DatabaseUnavailable, NotificationsLost, is_unavailable
from chatd.store.prompts import get_user_prompt
from chatd.store.providers import get_default_model_config, get_model_config, get_provider
from chatd.store.records import ModelConfig, Provider

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

log = logging.getLogger(__name__)

DEFAULT_TTL_S: Final = 30.0
DEFAULT_MAX_SIZE: Final = 10_000

CONFIG_CHANNEL: Final = "chatd_config"
"""Invalidations made by one worker, for the others' caches."""
# Invalidations per NOTIFY payload: each is at most ~50 bytes, far under the 8000-byte limit.
_ITEMS_PER_PAYLOAD: Final = 100


@dataclass(slots=True)
class CacheStats:
    """Counters of one cache (read by tests, metrics and benchmarks)."""

    hits: int = 0  # answered from a fresh entry
    misses: int = 0  # no fresh entry: started a load or joined the one in flight
    loads: int = 0  # calls of the loader
    invalidations: int = 0  # invalidate() and invalidate_all() calls
    stale_discards: int = 0  # loads whose result was not stored: invalidated while in flight
    evictions: int = 0  # entries dropped by the size bound


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    expires_at: float


class _Flight(Generic[V]):
    """One load in progress; the getters that joined it wait on ``done``."""

    __slots__ = ("abandoned", "done", "epoch", "error", "generation", "value")

    def __init__(self, epoch: int, generation: int) -> None:
        self.epoch = epoch
        self.generation = generation
        self.done = trio.Event()
        self.value: V | None = None
        self.error: Exception | None = None
        # The loading task was cancelled (or died of a BaseException): it has no result to share,
        # and the getters that joined it try again, one of them loading.
        self.abandoned = False


class TtlCache(Generic[K, V]):
    """A trio cache of ``key -> value`` loaded on demand, fresh for ``ttl_s`` seconds.

    - ``get(key, load)`` returns the cached value, or calls ``load(key)`` once however many
      tasks ask for the key at the same time; they all get its value or its exception. A failed
      load caches nothing. If the task running the load is cancelled, the others retry.
    - ``invalidate(key)`` drops the entry and bumps the key's generation: a load in flight for
      the key still answers the getters that were waiting for it, but cannot store its result,
      and the next ``get`` starts a new load. ``invalidate_all()`` does the same for every key.
    - Any value is cached, ``None`` included (negative caching).
    - At most ``max_size`` entries are kept; the least recently used one goes first.

    Not thread-safe: use it from the tasks of one trio run.
    """

    def __init__(self, *, ttl_s: float = DEFAULT_TTL_S, max_size: int = DEFAULT_MAX_SIZE) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.ttl_s = ttl_s
        self.max_size = max_size
        self.stats = CacheStats()
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._inflight: dict[K, _Flight[V]] = {}
        # Generations matter only while a load of the key runs (the only thing they guard), so a
        # key's counter is kept while it has running loads (``_running``) and dropped after.
        self._generations: dict[K, int] = {}
        self._running: dict[K, int] = {}
        self._epoch = 0  # bumped by invalidate_all(): the generation of every key at once

    def __len__(self) -> int:
        return len(self._entries)

    def generation(self, key: K) -> tuple[int, int]:
        """The key's current ``(epoch, generation)``; a load stores only if it did not change."""
        return self._epoch, self._generations.get(key, 0)

    async def get(self, key: K, load: Callable[[K], Awaitable[V]]) -> V:
        while True:
            entry = self._entries.get(key)
            if entry is not None:
                if entry.expires_at > trio.current_time():
                    self._entries.move_to_end(key)
                    self.stats.hits += 1
                    return entry.value
                del self._entries[key]
            self.stats.misses += 1
            flight = self._inflight.get(key)
            if flight is None:
                return await self._load(key, load)
            await flight.done.wait()
            if flight.abandoned:
                continue  # its loader was cancelled: look again, maybe load ourselves
            if flight.error is not None:
                raise flight.error
            return flight.value  # type: ignore[return-value]  # set when not failed/abandoned

    async def _load(self, key: K, load: Callable[[K], Awaitable[V]]) -> V:
        epoch, generation = self.generation(key)
        flight: _Flight[V] = _Flight(epoch, generation)
        self._inflight[key] = flight
        self._running[key] = self._running.get(key, 0) + 1
        self.stats.loads += 1
        try:
            value = await load(key)
        except Exception as exc:
            flight.error = exc
            raise
        except BaseException:
            flight.abandoned = True
            raise
        else:
            flight.value = value
            if self.generation(key) == (epoch, generation):
                self._store(key, value)
            else:
                self.stats.stale_discards += 1
            return value
        finally:
            if self._inflight.get(key) is flight:
                del self._inflight[key]
            remaining = self._running[key] - 1
            if remaining:
                self._running[key] = remaining
            else:
                del self._running[key]
                self._generations.pop(key, None)
            flight.done.set()

    def _store(self, key: K, value: V) -> None:
        self._entries[key] = _Entry(value, trio.current_time() + self.ttl_s)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)
            self.stats.evictions += 1

    def invalidate(self, key: K) -> None:
        """Forget ``key`` now; a load of it already in flight cannot store its result."""
        self.stats.invalidations += 1
        self._entries.pop(key, None)
        self._inflight.pop(key, None)  # later getters must not join the stale load
        if key in self._running:
            self._generations[key] = self._generations.get(key, 0) + 1

    def invalidate_all(self) -> None:
        """Forget every key; no load in flight can store its result."""
        self.stats.invalidations += 1
        self._entries.clear()
        self._inflight.clear()
        self._epoch += 1


InvalidationKind = Literal[
    "provider", "model_config", "model_configs", "user_prompt", "tokens", "all"
]
_KINDS: Final[frozenset[str]] = frozenset(get_args(InvalidationKind))


class ConfigCache:
    """Providers, model configs and user prompts, cached process-wide for ``ttl_s`` seconds.

    Lookups return what the store functions return (``None`` for a missing row). The edge calls
    the ``invalidate_*`` helpers right after each write it makes, then ``await announce()``.
    With a ``worker_id``, the invalidations are announced to the other workers (module doc);
    without one (a lone cache), ``announce`` does nothing.
    """

    def __init__(
        self,
        db: Database,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_size: int = DEFAULT_MAX_SIZE,
        worker_id: str = "",
        retry_delay_s: float = 1.0,
    ) -> None:
        self._db = db
        self._worker_id = worker_id
        self._retry_delay_s = retry_delay_s
        self._unannounced: list[str] = []
        self._announcements = 0  # sequence of this worker's announcements
        self._echoed = 0  # the last of them heard back by this worker's own listener
        self._echo = trio.Event()
        self._listening = False
        # Called when another worker revoked a token (or notifications were lost): the token
        # cache of the edge registers its invalidate_all (``on_tokens_revoked``).
        self._token_hooks: list[Callable[[], None]] = []
        self.announced = 0  # invalidations sent to the other workers
        self.applied_remote = 0  # invalidations other workers sent, applied here
        self.providers: TtlCache[UUID, Provider | None] = TtlCache(ttl_s=ttl_s, max_size=max_size)
        # Key ``None`` is the default model config.
        self.model_configs: TtlCache[UUID | None, ModelConfig | None] = TtlCache(
            ttl_s=ttl_s, max_size=max_size
        )
        self.user_prompts: TtlCache[UUID, str | None] = TtlCache(ttl_s=ttl_s, max_size=max_size)

    # -- lookups ----------------------------------------------------------------------------

    async def provider(self, provider_id: UUID) -> Provider | None:
        return await self.providers.get(provider_id, self._load_provider)

    async def model_config(self, config_id: UUID | None) -> ModelConfig | None:
        """The model config ``config_id``, or the default one for ``None``."""
        return await self.model_configs.get(config_id, self._load_model_config)

    async def user_prompt(self, user_id: UUID) -> str | None:
        """The user's custom prompt; ``None`` (cached too) when they have none."""
        return await self.user_prompts.get(user_id, self._load_user_prompt)

    async def _load_provider(self, provider_id: UUID) -> Provider | None:
        return await get_provider(self._db, provider_id)

    async def _load_model_config(self, config_id: UUID | None) -> ModelConfig | None:
        if config_id is None:
            return await get_default_model_config(self._db)
        return await get_model_config(self._db, config_id)

    async def _load_user_prompt(self, user_id: UUID) -> str | None:
        prompt = await get_user_prompt(self._db, user_id)
        return None if prompt is None else prompt.prompt

    # -- write-through invalidation ---------------------------------------------------------

    def invalidate_provider(self, provider_id: UUID) -> None:
        """After creating, updating or deleting the provider."""
        self._invalidate("provider", provider_id)

    def invalidate_model_config(self, config_id: UUID) -> None:
        """After creating, updating or deleting the model config; drops the default entry too.

        When the default moves from one config to another (``set_default_model_config``, or a
        create with ``is_default``), the old default's cached ``is_default`` is stale as well:
        use ``invalidate_model_configs()`` then.
        """
        self._invalidate("model_config", config_id)

    def invalidate_model_configs(self) -> None:
        """Every model config, the default included (after the default changed)."""
        self._invalidate("model_configs", None)

    def invalidate_user_prompt(self, user_id: UUID) -> None:
        """After putting or deleting the user's prompt."""
        self._invalidate("user_prompt", user_id)

    def invalidate_all(self) -> None:
        self._invalidate("all", None)

    def tokens_revoked(self) -> None:
        """After revoking an API token: the other workers forget the tokens they cached (this
        worker's token cache forgot it already, ``TokenCache.revoke``)."""
        self._record("tokens", None)

    def on_tokens_revoked(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` when another worker revoked a token or notifications were lost."""
        self._token_hooks.append(hook)

    def _invalidate(self, kind: InvalidationKind, key: UUID | None) -> None:
        self.apply_invalidation(kind, key)
        self._record(kind, key)

    def _record(self, kind: InvalidationKind, key: UUID | None) -> None:
        if self._worker_id:
            self._unannounced.append(kind if key is None else f"{kind}:{key}")

    # -- across workers ---------------------------------------------------------------------

    async def announce(self) -> None:
        """Send the invalidations made here since the last call to the other workers.

        Returns once the NOTIFY came back to this worker's own listener (within
        ``retry_delay_s``): PostgreSQL hands a notification to every listener at once, so the
        other workers have it too before the caller answers its client, and a client's next
        request, wherever it goes, finds the cache entry gone. A database outage is logged, not
        raised (the write it follows is done): the other workers then see the change after at
        most the TTL.
        """
        items, self._unannounced = self._unannounced, []
        if not items:
            return
        self._announcements += 1
        seq = self._announcements
        payloads = [
            msgspec.json.encode(
                {"w": self._worker_id, "s": seq, "i": items[at : at + _ITEMS_PER_PAYLOAD]}
            ).decode()
            for at in range(0, len(items), _ITEMS_PER_PAYLOAD)
        ]
        try:
            await self._db.execute(
                "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, n)"
                " ORDER BY n",
                CONFIG_CHANNEL,
                payloads,
            )
        except DatabaseUnavailable as exc:
            log.warning(
                "could not announce %d config invalidations to the other workers (they see "
                "the change within the cache TTL): %s",
                len(items),
                exc,
            )
            return
        self.announced += len(items)
        if self._listening:
            with trio.move_on_after(self._retry_delay_s):
                while self._echoed < seq:
                    await self._echo.wait()

    async def follow(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Apply the invalidations other workers announce, until cancelled.

        Returns from ``nursery.start`` once listening (or once the first try failed: an outage
        at start is waited out). Lost notifications, or listening again after a failure,
        invalidate everything.
        """
        started = False
        while True:
            try:
                async with self._db.listen(CONFIG_CHANNEL) as events:
                    self._listening = True
                    if started:
                        self.apply_invalidation("all", None)
                    else:
                        task_status.started()
                        started = True
                    async for event in events:
                        if isinstance(event, NotificationsLost):
                            log.info("config notifications may have been lost: cache cleared")
                            self.apply_invalidation("all", None)
                        else:
                            self._apply_remote(event.payload)
            except Exception as exc:
                if not (isinstance(exc, DatabaseUnavailable) or is_unavailable(exc)):
                    raise
                log.warning("config listener lost the database (%s)", exc)
            finally:
                self._listening = False
            if not started:
                task_status.started()
                started = True
            await trio.sleep(self._retry_delay_s)

    def _apply_remote(self, payload: str) -> None:
        try:
            message = msgspec.json.decode(payload, type=dict[str, object])
            origin, items = message["w"], message["i"]
        except (msgspec.DecodeError, msgspec.ValidationError, KeyError):
            log.warning("ignored a malformed config notification: %.200r", payload)
            return
        if origin == self._worker_id:
            seq = message.get("s")
            if isinstance(seq, int):
                self._echoed = max(self._echoed, seq)
                self._echo.set()
                self._echo = trio.Event()
            return
        if not isinstance(items, list):
            return
        for item in items:
            kind, _, key = str(item).partition(":")
            if kind not in _KINDS:
                log.warning("ignored an unknown config invalidation: %.200r", item)
                continue
            try:
                self.apply_invalidation(kind, key or None)  # type: ignore[arg-type]
            except ValueError:
                log.warning("ignored a malformed config invalidation: %.200r", item)
                continue
            self.applied_remote += 1

    def apply_invalidation(self, kind: InvalidationKind, key: UUID | str | None) -> None:
        """Apply one invalidation by name and key, whoever made the write.

        The seam for cross-process invalidation: ``follow`` parses a NOTIFY item such as
        ``"model_config:<uuid>"`` and calls this, so the local write-through helpers and
        remote notifications share one path. Local only: nothing is announced. ``key`` may be a
        UUID or its text form; ``"all"``, ``"model_configs"`` and ``"tokens"`` take no key.
        """
        if kind == "all":
            self.providers.invalidate_all()
            self.model_configs.invalidate_all()
            self.user_prompts.invalidate_all()
            for hook in self._token_hooks:
                hook()
            return
        if kind == "model_configs":
            self.model_configs.invalidate_all()
            return
        if kind == "tokens":
            for hook in self._token_hooks:
                hook()
            return
        if key is None:
            raise ValueError(f"invalidation of {kind!r} needs a key")
        ident = key if isinstance(key, UUID) else UUID(key)
        if kind == "provider":
            self.providers.invalidate(ident)
        elif kind == "model_config":
            self.model_configs.invalidate(ident)
            self.model_configs.invalidate(None)  # it may be (or have been) the default
        elif kind == "user_prompt":
            self.user_prompts.invalidate(ident)
        else:
            raise ValueError(f"unknown invalidation kind {kind!r}")
