"""The shard keeper: one per worker process; keeps its shard leases and its place among the
workers, and moves shards to even out the placement.

Every check is one transaction (``chatd.store.cluster.check_in``): it renews this worker's row
in ``workers`` (with its internal link's URL) and its leases, with the same expiry by database
time, reads who is live and which shards are free, and takes the free shards that the placement
plan (``chatd.domain.placement``) says are this worker's to take. Checks run every
``lease_ttl_s / 3``, at once when told (``request_check``, or a NOTIFY on
``cluster.SHARDS_CHANNEL``: a worker joined, released shards or left), and when another
worker's lease is due to expire (a dead worker's shards are free then, and the live count that
sets each worker's quota drops with its row).

A shard above this worker's quota is handed over gracefully: marked as handing over (it is no
longer served: new messages for its chats get ``NotOwner``, a 503 with Retry-After at the edge,
while the lease is still renewed so that the turns in progress can commit), its actors are left
``handover_timeout_s`` at most to finish their turn in progress, then they are stopped, the
shard is reported lost and its lease is released with a NOTIFY, so the taker checks at once and
resumes its chats.

Database outages. The lease loop doubles as the outage detector: a failed check is retried after
the outage backoff (never later than the regular interval) instead of a third of the ttl later,
and leases are kept as long as they are valid by the last successful check (a lower bound of the
database's expiry); only past that are the shards dropped, and when they are taken back (under a
new epoch) their chats are resumed, as for any gained shard.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio

from chatd.actors.outages import contains, outage_delay
from chatd.actors.stats import SupervisorStats
from chatd.domain.placement import plan_shards
from chatd.store import cluster
from chatd.store.database import Database, DatabaseUnavailable, NotificationsLost
from chatd.store.leases import Fence

log = logging.getLogger(__name__)

# A check scheduled for another worker's lease expiry comes this much later, so that the lease
# has expired by the database's clock too (it runs at the same rate as ours, not in step).
_EXPIRY_MARGIN_S = 0.05


@dataclass(frozen=True, slots=True)
class ShardHooks:
    """What the keeper tells the actor side (all called on the trio thread)."""

    # Shards no longer served here (lost, handed over, dropped): stop their actors. Called
    # after the keeper stopped counting them as held.
    lost: Callable[[frozenset[int]], None]
    # Wait (until the trio time given at most) for the actors of these shards to finish their
    # turns in progress, stopping each one once it did; True when all did in time.
    drain: Callable[[frozenset[int], float], Awaitable[bool]]
    # Something observable changed (held shards, a handover began).
    changed: Callable[[], None]


class ShardKeeper:
    def __init__(
        self,
        db: Database,
        worker_id: str,
        hooks: ShardHooks,
        stats: SupervisorStats,
        *,
        shard_count: int,
        eligible: Iterable[int],
        lease_ttl_s: float,
        link_url: str,
        handover_timeout_s: float,
        release_timeout_s: float,
        db_retry_base_delay_s: float,
        db_retry_max_delay_s: float,
    ) -> None:
        self._db = db
        self.worker_id = worker_id
        self._hooks = hooks
        self.stats = stats
        self._shard_count = shard_count
        self._eligible = frozenset(eligible)
        self._lease_ttl_s = lease_ttl_s
        self._check_interval_s = lease_ttl_s / 3
        self._link_url = link_url
        self._handover_timeout_s = handover_timeout_s
        self._release_timeout_s = release_timeout_s
        self._db_retry_base_delay_s = db_retry_base_delay_s
        self._db_retry_max_delay_s = db_retry_max_delay_s

        self._fences: dict[int, Fence] = {}
        self._handing_over: set[int] = set()
        self._view: cluster.LeaseView | None = None  # what the last successful check read
        self._announce = True  # NOTIFY at the next check: joined (or back after an outage)
        self._checked_in = False  # a check succeeded once: there is a row to leave
        self._lock = trio.Lock()  # one lease write at a time: a check, a release, the leave
        self._check_requested = trio.Event()
        self._next_check = -math.inf
        self._next_expiry = math.inf  # when another worker's lease is due to expire
        self._valid_until = -math.inf
        self._check_failures = 0  # lease checks failed in a row
        self._handovers: trio.Nursery | None = None

    # -- state ---------------------------------------------------------------------------------

    @property
    def fences(self) -> dict[int, Fence]:
        """The leases held right now, by shard (those being handed over included)."""
        return dict(self._fences)

    @property
    def handing_over(self) -> frozenset[int]:
        return frozenset(self._handing_over)

    def serving(self, shard: int) -> Fence | None:
        """The shard's fence if it is held and not being handed over."""
        if shard in self._handing_over:
            return None
        return self._fences.get(shard)

    def held(self, shard: int) -> Fence | None:
        """The shard's fence while its lease is held (also while it is handed over): its
        actors may write under it."""
        return self._fences.get(shard)

    @property
    def check_failures(self) -> int:
        """Lease checks failed in a row (0: the database answered the last one)."""
        return self._check_failures

    def request_check(self) -> None:
        """Check the leases now instead of at the next tick."""
        self._check_requested.set()

    def outage_delay(self, attempt: int) -> float:
        return outage_delay(attempt, self._db_retry_base_delay_s, self._db_retry_max_delay_s)

    # -- the lease loop --------------------------------------------------------------------------

    async def run(self, after_check: Callable[[list[Fence]], Awaitable[None]]) -> None:
        """Check the leases until cancelled; ``after_check(gained)`` follows every check."""
        async with trio.open_nursery() as handovers:
            self._handovers = handovers
            try:
                while True:
                    self._rebalance()
                    deadline = min(self._next_check, self._next_expiry)
                    if self._fences:
                        deadline = min(deadline, self._valid_until)
                    with trio.move_on_at(deadline):
                        await self._check_requested.wait()
                    gained = await self.check()
                    await after_check(gained)
            finally:
                self._handovers = None

    async def check(self, *, initial: bool = False) -> list[Fence]:
        """Renew this worker's row and leases, take the shards the plan says; returns the
        fences gained. The first check raises when it fails (the start fails with it).

        A lease counts as held until ``ttl`` after the last successful check was *sent* (a
        lower bound of the database's expiry); past that, without a successful check, every
        shard is dropped.
        """
        async with self._lock:
            return await self._check(initial=initial)

    async def _check(self, *, initial: bool) -> list[Fence]:
        self._check_requested = trio.Event()
        sent_at = trio.current_time()
        self._next_check = sent_at + self._check_interval_s
        # A check may take until the held leases would lapse, then they are dropped. The first
        # one is bounded by the database's own timeouts only: its failure fails the start.
        deadline = math.inf if initial else max(self._valid_until, sent_at + self._check_interval_s)
        held = frozenset(self._fences)
        handing_over = frozenset(self._handing_over)

        def choose(view: cluster.LeaseView) -> set[int]:
            # At start, the live leases already ours (left by our previous run) are adopted;
            # later only those held here are renewed: one released, or dropped in an outage,
            # is not taken back behind the placement's back (it may be taken as a free one).
            keep = set(view.mine) if initial else set(view.mine & held)
            plan = plan_shards(
                shard_count=self._shard_count,
                live_workers=view.live_workers,
                worker_id=self.worker_id,
                held=keep - handing_over,
                free=view.free(self._shard_count),
                eligible=self._eligible,
            )
            return keep | set(plan.take)

        result: cluster.CheckIn | None = None
        failure: Exception | None = None
        try:
            with trio.move_on_at(deadline):
                result = await cluster.check_in(
                    self._db,
                    self.worker_id,
                    link_url=self._link_url,
                    ttl_s=self._lease_ttl_s,
                    choose=choose,
                    announce=self._announce,
                )
        except Exception as exc:
            if initial:
                raise
            failure = exc
        if result is None:
            self._check_failed(sent_at, failure)
            if self._fences and trio.current_time() >= self._valid_until:
                log.error("shard leases not renewed within their ttl; dropping every shard")
                self._apply([])
            self._hooks.changed()
            return []
        if self._check_failures:
            log.warning(
                "the database answers again after %d failed lease checks", self._check_failures
            )
            self._check_failures = 0
            self._announce = True  # our row may have expired meanwhile: say we are back
        else:
            self._announce = False
        self._checked_in = True
        self._valid_until = sent_at + self._lease_ttl_s
        self.stats.lease_renewals += 1
        view = result.view
        self._view = view
        expiry = view.next_expiry_s
        self._next_expiry = (
            math.inf if expiry is None else sent_at + max(0.0, expiry) + _EXPIRY_MARGIN_S
        )
        gained = self._apply(result.fences)
        self._hooks.changed()
        return gained

    def _check_failed(self, sent_at: float, failure: Exception | None) -> None:
        """Count a failed (or timed out) check and retry it after the outage backoff, sooner
        than the regular interval: the lease loop is what notices the database is back."""
        self.stats.lease_failures += 1
        delay = min(self._check_interval_s, self.outage_delay(self._check_failures))
        self._check_failures += 1
        self._next_check = sent_at + delay
        if failure is not None and not contains(failure, DatabaseUnavailable):
            log.warning("shard lease check failed; retrying in %.2f s", delay, exc_info=failure)
        elif self._check_failures == 1:  # one line per outage, not one per probe
            what = "timed out" if failure is None else str(failure)
            at_most = min(self._check_interval_s, self._db_retry_max_delay_s)
            log.warning(
                "shard lease check failed (%s); retrying in %.2f s, then every %g s at most",
                what,
                delay,
                at_most,
            )

    def _apply(self, fences: list[Fence]) -> list[Fence]:
        """Adopt the leases now held: report lost (or re-epoched) shards; returns the gained."""
        new = {f.shard: f for f in fences}
        lost = frozenset(shard for shard, f in self._fences.items() if new.get(shard) != f)
        gained = [f for shard, f in new.items() if self._fences.get(shard) != f]
        self._fences = new
        self._handing_over -= lost
        if lost:
            self.stats.shards_lost += len(lost)
            shards = sorted(lost)
            log.warning(
                "lost shards %s (worker %s); stopping their actors",
                shards,
                self.worker_id,
                extra={"shard_move": "lost", "shards": shards, "worker_id": self.worker_id},
            )
            self._hooks.lost(lost)
        if gained:
            self.stats.shards_gained += len(gained)
            shards = sorted(f.shard for f in gained)
            log.info(
                "acquired shards %s (worker %s, epochs %s)",
                shards,
                self.worker_id,
                sorted({f.epoch for f in gained}),
                extra={"shard_move": "acquired", "shards": shards, "worker_id": self.worker_id},
            )
        return gained

    # -- handover ----------------------------------------------------------------------------

    def _rebalance(self) -> None:
        """Start handing over the shards above this worker's quota (per the last check), and
        check again at once when the plan still has shards to take (a racing taker got some of
        those this check wanted)."""
        view = self._view
        if view is None or self._handovers is None or self._check_failures:
            return
        serving = set(self._fences) - self._handing_over
        plan = plan_shards(
            shard_count=self._shard_count,
            live_workers=view.live_workers,
            worker_id=self.worker_id,
            held=serving,
            free=view.free(self._shard_count) - set(self._fences),
            eligible=self._eligible,
        )
        self._view = None  # one plan per check
        if plan.take:
            self.request_check()
        if not plan.give:
            return
        shards = frozenset(plan.give)
        self._handing_over |= shards
        log.info(
            "handing over shards %s (%d live workers; keeping %d)",
            sorted(shards),
            len(view.live_workers),
            len(serving) - len(shards),
        )
        self._hooks.changed()
        self._handovers.start_soon(self._hand_over, shards)

    async def _hand_over(self, shards: frozenset[int]) -> None:
        deadline = trio.current_time() + self._handover_timeout_s
        if not await self._hooks.drain(shards, deadline):
            self.stats.handover_timeouts += 1
            log.warning(
                "turns in progress on shards %s did not end within %g s; stopping them",
                sorted(shards),
                self._handover_timeout_s,
            )
        async with self._lock:
            given = sorted(s for s in shards if s in self._handing_over)  # not lost meanwhile
            fences = [self._fences.pop(s) for s in given]
            self._handing_over -= shards
            if not fences:
                return
            self.stats.shards_handed_over += len(fences)
            self._hooks.lost(frozenset(given))
            self._hooks.changed()
            await self._release(fences, leaving=False)
        log.info(
            "released shards %s (worker %s, handed over)",
            given,
            self.worker_id,
            extra={"shard_move": "released", "shards": given, "worker_id": self.worker_id},
        )

    # -- leaving -------------------------------------------------------------------------------

    def drop_all(self) -> list[Fence]:
        """Stop holding every shard (shutdown): returns their fences, to ``leave`` with."""
        fences = list(self._fences.values())
        self._fences = {}
        self._handing_over.clear()
        self._hooks.changed()
        return fences

    async def leave(self, fences: list[Fence]) -> None:
        """Release ``fences`` and leave the live workers, with a NOTIFY (shielded, bounded:
        on failure the leases and the row expire instead)."""
        if self._checked_in or fences:  # not when the start failed: nothing to undo
            await self._release(fences, leaving=True)
        if fences:
            shards = sorted(f.shard for f in fences)
            log.info(
                "released shards %s (worker %s, leaving)",
                shards,
                self.worker_id,
                extra={"shard_move": "released", "shards": shards, "worker_id": self.worker_id},
            )

    async def _release(self, fences: list[Fence], *, leaving: bool) -> None:
        what = "leave the workers" if leaving else "release the handed-over shards"
        with trio.CancelScope(shield=True), trio.move_on_after(self._release_timeout_s) as scope:
            try:
                if leaving:
                    await cluster.leave(self._db, self.worker_id, fences)
                else:
                    await cluster.hand_back(self._db, self.worker_id, fences)
            except Exception:
                log.exception("could not %s; the leases will expire instead", what)
        if scope.cancelled_caught:
            log.warning("could not %s in time; the leases will expire instead", what)

    # -- notifications ---------------------------------------------------------------------------

    async def listen(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Check at once when another worker announces a shard move (a NOTIFY, a hint), or when
        notifications may have been lost. Started once the first LISTEN is in place (or
        failed: then the regular checks are the backstop while it is retried)."""
        attempt = 0
        started = False
        while True:
            try:
                # Only the first subscription is bounded: the start waits for it.
                first_at = trio.current_time() + self._check_interval_s
                with trio.CancelScope(deadline=math.inf if started else first_at) as scope:
                    async with self._db.listen(cluster.SHARDS_CHANNEL) as events:
                        scope.deadline = math.inf
                        if started:
                            self.request_check()  # what happened while not listening
                        else:
                            task_status.started()
                            started = True
                        attempt = 0
                        async for event in events:
                            # Our own announcements need no check; a lost one might.
                            if (
                                isinstance(event, NotificationsLost)
                                or event.payload != self.worker_id
                            ):
                                self.request_check()
            except Exception as exc:  # noqa: BLE001 - a hint: the regular checks back it up
                # One line per outage, not one per attempt.
                log.log(
                    logging.WARNING if attempt == 0 else logging.DEBUG,
                    "cannot LISTEN for shard moves (%s); retrying",
                    exc,
                )
            if not started:
                task_status.started()
                started = True
            await trio.sleep(self.outage_delay(attempt))
            attempt += 1
