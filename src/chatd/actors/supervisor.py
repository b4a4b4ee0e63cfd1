"""The Supervisor: one per worker process; owns the actors of the shards this worker holds.

It is made of three parts, one per job:

- ``chatd.actors.shard_keeper``: the shard leases, this worker's row among the live workers,
  even placement (``chatd.domain.placement``) and graceful handover, NOTIFY on shard moves.
  It tells the Supervisor when shards are lost (their actors are stopped, then the
  ``on_shards_lost`` hook is called) and asks it to drain the shards it hands over;
- this module: the actors (activation, crashes and restarts, database outages, parking) and the
  resume of the chats with work left on the shards served;
- ``chatd.actors.passivation``: passivating hibernating actors once idle long enough.

Actors are activated on the first message for a chat, passivate themselves when idle, and are
restarted from the database after a crash, at most ``restart_limit`` times in
``restart_window_s``; past that the chat is handed to the ``park`` hook and forgotten, so the
next message activates it afresh (from its ``error`` state, with a fresh budget). Each actor runs
in its own task whose crash is caught and handled here: it never reaches a sibling or the
Supervisor. Every shard gained (at start or later) has its unfinished chats resumed; every shard
lost has its actors stopped at once, since their writes would be fenced anyway. A shard being
handed over is no longer served (``owns`` is False, messages get ``NotOwner``) while its actors
finish the turn in progress (``ActorHost.in_turn``), for ``handover_timeout_s`` at most.

Database outages. An unreachable PostgreSQL (or a connection lost under a statement) reaches
the code as ``DatabaseUnavailable``; it is an outage, not a bug, and is handled apart from
crashes, so that a blip never strands or parks a chat (DESIGN.md section 4):

- An incarnation that ends with ``DatabaseUnavailable`` anywhere in its exception group is not
  a crash: it spends nothing of the restart budget and is restarted after a capped exponential
  backoff with jitter (``db_retry_base_delay_s`` doubling up to ``db_retry_max_delay_s``, each
  wait drawn from the upper half of that, so thousands of actors do not reconnect in step),
  for as long as its shard is held. Its restart reloads the chat from the database; while that
  still fails, the backoff grows. Messages for it meanwhile are refused at once with
  ``ActorDead`` (the edge answers 503 with Retry-After) instead of waiting for an ask timeout.
  What the ended incarnation left for the next one (``ActorContext.carried``: the ChatActor
  leaves the model's finished step whose commit the outage cut) is handed to the restart, so
  that the answer is committed rather than generated again; only across outage restarts, since
  after a crash the thing left behind may be what crashed it.
- The shard keeper's lease loop doubles as the outage detector (see there): leases are kept as
  long as they are valid by the last successful check, and dropped only past that.
- Resume sweep: after any failed database call seen here (a lease check, an actor's outage),
  the next successful lease check is followed by one query for the runnable chats of every
  served shard, and each one without an actor here is activated, so that a chat whose actor was
  lost to the outage in any way continues with no user action. The sweep also runs every
  ``resume_sweep_interval_s`` as a safety net, since it costs one indexed query.
- Parking writes to the database too: when the park hook fails with ``DatabaseUnavailable`` (or
  does not finish within ``park_timeout_s``), parking is retried after the backoff while the
  shard is held, rather than forgotten with the chat left ``running``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from uuid import UUID

import trio

from chatd.actors.behavior import ActorBehavior, ActorFactory, ParkHook
from chatd.actors.errors import ActorDead, NotOwner
from chatd.actors.host import ActorHost, ExitReason
from chatd.actors.outages import contains as _contains
from chatd.actors.outages import first as _first
from chatd.actors.passivation import Passivation
from chatd.actors.shard_keeper import ShardHooks, ShardKeeper
from chatd.actors.stats import SupervisorStats
from chatd.domain.sharding import shard_of
from chatd.store.chats import list_resumable_chats_in
from chatd.store.database import Database, DatabaseUnavailable
from chatd.store.errors import Fenced
from chatd.store.leases import Fence

__all__ = ["Supervisor", "SupervisorStats"]

log = logging.getLogger(__name__)

# How often a handover looks again whether the actors of its shards finished their turns: turn
# ends are not signalled, and a handover is rare and bounded (handover_timeout_s).
_DRAIN_POLL_S = 0.02


@dataclass(eq=False, slots=True)
class _Slot:
    """A chat with an actor here: its current incarnation and its recent crash times."""

    chat_id: UUID
    fence: Fence
    host: ActorHost
    crashes: deque[float] | None = None  # recent crash times; made at the first crash
    parking: bool = False
    # Database outages: consecutive outage exits (the backoff's exponent), when the current
    # incarnation began, and whether the slot is waiting out its backoff now.
    outages: int = 0
    began_at: float = 0.0
    waiting_out: bool = False


class Supervisor:
    """Run with ``await nursery.start(supervisor.run)``; it returns once the leases are taken
    and the resumable chats of those shards are activated. Stop with ``shutdown()`` (or by
    cancelling): actors are cancelled, then the leases are released for the next owner and
    the worker leaves the live workers.

    ``on_shards_lost`` is called (on the trio thread, synchronously) with every set of shards
    this worker stops serving: handed over, taken over, dropped in an outage, at shutdown;
    after their actors were stopped."""

    def __init__(
        self,
        db: Database,
        worker_id: str,
        factory: ActorFactory,
        park: ParkHook,
        *,
        shard_count: int = 64,
        shards: Iterable[int] | None = None,
        lease_ttl_s: float = 15.0,
        mailbox_capacity: int = 256,
        idle_timeout_s: float = 300.0,
        restart_limit: int = 3,
        restart_window_s: float = 60.0,
        ask_timeout_s: float = 30.0,
        park_timeout_s: float = 10.0,
        release_timeout_s: float = 5.0,
        hibernate_after_s: float | None = 0.0,
        db_retry_base_delay_s: float = 0.25,
        db_retry_max_delay_s: float = 2.0,
        resume_sweep_interval_s: float = 60.0,
        link_url: str = "",
        handover_timeout_s: float = 10.0,
        on_shards_lost: Callable[[frozenset[int]], None] | None = None,
    ) -> None:
        if shard_count < 1:
            raise ValueError(f"shard count must be at least 1, got {shard_count}")
        wanted = sorted(set(range(shard_count) if shards is None else shards))
        if any(not 0 <= s < shard_count for s in wanted):
            raise ValueError(f"shards must lie in [0, {shard_count}), got {wanted}")
        if mailbox_capacity < 1:
            raise ValueError(f"mailbox capacity must be at least 1, got {mailbox_capacity}")
        if restart_limit < 0:
            raise ValueError(f"restart limit must not be negative, got {restart_limit}")
        for name, value in (
            ("lease ttl", lease_ttl_s),
            ("idle timeout", idle_timeout_s),
            ("ask timeout", ask_timeout_s),
            ("restart window", restart_window_s),
            ("park timeout", park_timeout_s),
            ("release timeout", release_timeout_s),
            ("database retry base delay", db_retry_base_delay_s),
            ("database retry max delay", db_retry_max_delay_s),
            ("resume sweep interval", resume_sweep_interval_s),
            ("handover timeout", handover_timeout_s),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value} s")
        self._db = db
        self.worker_id = worker_id
        self._factory = factory
        self._park = park
        self._shard_count = shard_count
        self._check_interval_s = lease_ttl_s / 3
        self._mailbox_capacity = mailbox_capacity
        self._idle_timeout_s = idle_timeout_s
        self._restart_limit = restart_limit
        self._restart_window_s = restart_window_s
        self._ask_timeout_s = ask_timeout_s
        self._park_timeout_s = park_timeout_s
        _check_options(hibernate_after_s, db_retry_base_delay_s, db_retry_max_delay_s)
        self._db_retry_max_delay_s = db_retry_max_delay_s
        self._resume_sweep_interval_s = resume_sweep_interval_s
        self._hibernate_after_s = hibernate_after_s  # None: actors keep their task while idle
        self._wake_host = self._wake  # one bound method shared by every host

        self._on_shards_lost = on_shards_lost

        self.stats = SupervisorStats()
        self._keeper = ShardKeeper(
            db,
            worker_id,
            ShardHooks(lost=self._shards_lost, drain=self._drain, changed=self._notify),
            self.stats,
            shard_count=shard_count,
            eligible=wanted,
            lease_ttl_s=lease_ttl_s,
            link_url=link_url,
            handover_timeout_s=handover_timeout_s,
            release_timeout_s=release_timeout_s,
            db_retry_base_delay_s=db_retry_base_delay_s,
            db_retry_max_delay_s=db_retry_max_delay_s,
        )
        self._passivation = Passivation(idle_timeout_s, self._passivate)
        self._slots: dict[UUID, _Slot] = {}
        self._nursery: trio.Nursery | None = None
        self._run_scope = trio.CancelScope()
        self._started = False
        self._stopped = False
        self._to_release: list[Fence] = []
        self._sweep_due = False  # a database call failed since the last sweep
        self._next_sweep = math.inf  # set once running
        self._changed: trio.Event | None = None

    # -- the edge's entry points (through the Router) -----------------------------------------

    async def ask(
        self, chat_id: UUID, message: object, *, timeout_s: float | None = None
    ) -> object:
        """Deliver ``message`` to the chat's actor (activating it) and return its reply.

        Raises the behavior's ``Refusal`` as-is, or ``NotOwner``, ``MailboxFull``,
        ``ActorDead`` or ``AskTimeout`` (``chatd.actors.errors``); never waits past the timeout.
        """
        return await self._host_for(chat_id).ask(message, timeout_s=timeout_s)

    def tell(self, chat_id: UUID, message: object) -> None:
        """Deliver without waiting for a reply; raises ``NotOwner``/``MailboxFull``/``ActorDead``
        at once when the message cannot even be queued."""
        self._host_for(chat_id).tell(message)

    def owns(self, chat_id: UUID) -> bool:
        """True when this worker serves the chat's shard: it holds the lease and is not
        handing the shard over."""
        return self._keeper.serving(shard_of(chat_id, self._shard_count)) is not None

    def shard_of(self, chat_id: UUID) -> int:
        return shard_of(chat_id, self._shard_count)

    def _host_for(self, chat_id: UUID) -> ActorHost:
        shard = shard_of(chat_id, self._shard_count)
        fence = self._keeper.serving(shard)
        if fence is None or self._nursery is None:
            raise NotOwner(chat_id, shard)
        slot = self._slots.get(chat_id)
        if slot is not None and slot.parking:
            raise ActorDead(chat_id, "being parked after repeated crashes")
        if slot is not None and slot.waiting_out:
            # Quick refusal (503 at the edge): it would only wait for the restart's reload.
            raise ActorDead(chat_id, "waiting for the database to come back")
        if slot is None or slot.host.passivated:
            slot = self._activate(chat_id, fence)
        return slot.host

    # -- gauges and inspection ------------------------------------------------------------------

    @property
    def fences(self) -> dict[int, Fence]:
        """The leases held right now, by shard (those being handed over included)."""
        return self._keeper.fences

    @property
    def handing_over(self) -> frozenset[int]:
        """Shards being handed over: held, no longer served."""
        return self._keeper.handing_over

    @property
    def stopped(self) -> bool:
        """True once ``run`` ended: every actor is gone and the leases were released (or left
        to expire when that failed), so another worker may take the shards at once."""
        return self._stopped

    @property
    def active_actors(self) -> int:
        return len(self._slots)

    @property
    def hibernating_actors(self) -> int:
        """Active actors without a task of their own right now (idle; state kept)."""
        return len(self._passivation)

    @property
    def mailbox_depth(self) -> int:
        """Messages queued across every actor (computed on demand: O(actors))."""
        return sum(slot.host.mailbox_depth for slot in self._slots.values())

    def metrics(self) -> dict[str, int]:
        return {
            "active_actors": self.active_actors,
            "mailbox_depth": self.mailbox_depth,
            "owned_shards": len(self._keeper.fences),
            **dataclasses.asdict(self.stats),
        }

    def behavior(self, chat_id: UUID) -> ActorBehavior | None:
        """The running behavior of a chat's actor, if any (tests and diagnostics)."""
        slot = self._slots.get(chat_id)
        return None if slot is None else slot.host.behavior

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (unbounded: wrap it in a deadline) until ``predicate()`` holds; it is re-checked
        after every activation, passivation, crash, restart, park and lease check."""
        while not predicate():
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def request_lease_check(self) -> None:
        """Renew (and re-read) the leases now instead of at the next tick."""
        self._keeper.request_check()

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take the leases, resume their chats, then supervise until ``shutdown()``.

        Fails (before ``started``) if the leases cannot be read at all at start.
        """
        if self._started:
            raise RuntimeError("a Supervisor runs only once")
        self._started = True
        try:
            with self._run_scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    # Listening first: a worker joining after our first check wakes us.
                    await nursery.start(self._keeper.listen)
                    gained = await self._keeper.check(initial=True)
                    await self._resume(gained)
                    self._next_sweep = trio.current_time() + self._resume_sweep_interval_s
                    nursery.start_soon(self._keeper.run, self._after_check)
                    nursery.start_soon(self._passivation.run)
                    task_status.started()
        finally:
            self._leave()
            self._nursery = None
            fences, self._to_release = self._to_release, []
            await self._keeper.leave(fences)
            self._stopped = True
            self._notify()

    def shutdown(self) -> None:
        """Stop now: messages get ``NotOwner`` at once, pending asks ``ActorDead``; ``run``
        returns after every actor ended and the leases were released."""
        self._leave()
        self._run_scope.cancel()

    def _leave(self) -> None:
        fences = self._keeper.drop_all()
        self._to_release.extend(fences)
        for slot in list(self._slots.values()):
            self._stop(slot)
        self._passivation.clear()
        if fences:
            self._report_lost(frozenset(f.shard for f in fences))
        self._notify()

    # -- what the shard keeper tells -----------------------------------------------------------

    def _shards_lost(self, shards: frozenset[int]) -> None:
        for slot in [s for s in self._slots.values() if s.fence.shard in shards]:
            self._stop(slot)
        self._report_lost(shards)

    def _report_lost(self, shards: frozenset[int]) -> None:
        if self._on_shards_lost is None:
            return
        try:
            self._on_shards_lost(shards)
        except Exception:
            log.exception("the on_shards_lost hook failed for shards %s", sorted(shards))

    async def _drain(self, shards: frozenset[int], deadline: float) -> bool:
        """Stop each actor of ``shards`` as soon as it is between turns (nothing being handled
        or queued, no answer streaming); True when all were by ``deadline`` (trio time)."""
        pending = [slot for slot in self._slots.values() if slot.fence.shard in shards]
        with trio.move_on_at(deadline):
            while True:
                busy = []
                for slot in pending:
                    if self._slots.get(slot.chat_id) is not slot:
                        continue  # gone meanwhile (passivated, parked, stopped)
                    if slot.host.in_turn:
                        busy.append(slot)
                    else:
                        self._stop(slot)
                pending = busy
                if not pending:
                    return True
                await trio.sleep(_DRAIN_POLL_S)
        return False

    async def _after_check(self, gained: list[Fence]) -> None:
        """After every lease check: the sweep, when due and the database answers."""
        if gained or self._keeper.check_failures:
            # Gained shards have their chats with work left resumed; after a failed check,
            # whatever ran meanwhile may have lost its actor.
            self._sweep_due = True
        if self._keeper.check_failures == 0 and (
            self._sweep_due or trio.current_time() >= self._next_sweep
        ):
            await self._sweep()

    # -- resuming ------------------------------------------------------------------------------

    async def _resume(self, fences: Iterable[Fence]) -> int:
        """Activate every chat of the shards of ``fences`` that was left with work to do and has
        no actor here (one query); returns how many were activated."""
        held = {f.shard: f for f in fences}
        rows = await list_resumable_chats_in(self._db, sorted(held))
        activated = 0
        for shard, chat_id in rows:
            fence = held[shard]
            if self._keeper.serving(shard) == fence and chat_id not in self._slots:
                self._activate(chat_id, fence)
                self.stats.resumed += 1
                activated += 1
        self._notify()
        return activated

    async def _sweep(self) -> None:
        """Resume the runnable chats of every held shard that have no actor here: after shards
        were gained, after a database call failed, and every ``resume_sweep_interval_s``;
        called by the lease loop after a successful check. A failure leaves it due."""
        handing_over = self._keeper.handing_over
        fences = [f for f in self._keeper.fences.values() if f.shard not in handing_over]
        self._sweep_due = False
        self._next_sweep = trio.current_time() + self._resume_sweep_interval_s
        if not fences:
            return
        try:
            with trio.fail_after(self._check_interval_s):
                activated = await self._resume(fences)
        except Exception as exc:
            self._sweep_due = True
            outage = _contains(exc, DatabaseUnavailable) or isinstance(exc, trio.TooSlowError)
            log.warning(
                "resume sweep failed (%s); retrying after the next lease check",
                exc,
                exc_info=not outage,
            )
            return
        self.stats.sweeps += 1
        if activated:
            log.info("resume sweep: %d runnable chats had no actor; activated them", activated)

    # -- actors --------------------------------------------------------------------------------

    def _nursery_or_fail(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("the Supervisor is not running")
        return self._nursery

    def _new_host(
        self, chat_id: UUID, fence: Fence, carried: dict[str, object] | None = None
    ) -> ActorHost:
        hibernating = self._hibernate_after_s is not None
        return ActorHost(
            chat_id,
            fence,
            self._factory,
            mailbox_capacity=self._mailbox_capacity,
            idle_timeout_s=self._idle_timeout_s,
            ask_timeout_s=self._ask_timeout_s,
            on_wake=self._wake_host if hibernating else None,
            hibernate_after_s=self._hibernate_after_s or 0.0,
            carried=carried,
        )

    def _activate(self, chat_id: UUID, fence: Fence) -> _Slot:
        """Synchronous, so two messages racing for a new chat share one actor."""
        nursery = self._nursery_or_fail()
        slot = _Slot(chat_id, fence, self._new_host(chat_id, fence))
        slot.began_at = trio.current_time()
        self._slots[chat_id] = slot
        nursery.start_soon(self._supervise, slot)
        self.stats.activations += 1
        self._notify()
        return slot

    def _stop(self, slot: _Slot) -> None:
        if self._slots.get(slot.chat_id) is slot:
            del self._slots[slot.chat_id]
            self._passivation.discard(slot.chat_id)
            self.stats.stopped += 1
        slot.host.stop()

    def _forget(self, slot: _Slot) -> None:
        if self._slots.get(slot.chat_id) is slot:
            del self._slots[slot.chat_id]
            self._passivation.discard(slot.chat_id)

    def _wake(self, host: ActorHost) -> None:
        """A hibernating actor got a message: give it a task again (synchronous, so that a
        second message finds it awake)."""
        slot = self._slots.get(host.chat_id)
        if slot is None or slot.host is not host or self._nursery is None:
            host.stop()  # not ours any more (it would have been stopped): refuse the message
            return
        self._passivation.discard(host.chat_id)
        self._nursery.start_soon(self._supervise, slot)

    def _hibernated(self, slot: _Slot) -> None:
        if not self._current(slot):
            self._stop(slot)
            return
        # Idle time counts from the last message handled, as for an actor with a task.
        self._passivation.add(slot.chat_id, slot.host.idle_since)
        self._notify()

    def _passivate(self, chat_id: UUID) -> None:
        """A hibernating actor's idle time is up: passivate it, unless it may not stop."""
        slot = self._slots.get(chat_id)
        if slot is not None and slot.host.passivate_hibernated():
            self.stats.passivations += 1
            self._forget(slot)
            self._notify()

    def _current(self, slot: _Slot) -> bool:
        return (
            self._slots.get(slot.chat_id) is slot
            and self._keeper.held(slot.fence.shard) == slot.fence
        )

    async def _supervise(self, slot: _Slot) -> None:
        """Run the chat's incarnations one after another until it passivates, is stopped or is
        parked. Only cancellation escapes; every other outcome is handled here."""
        while True:
            exit_ = await slot.host.run()
            if exit_.reason is ExitReason.HIBERNATED:
                self._hibernated(slot)
                return
            if exit_.reason is ExitReason.PASSIVATED:
                self.stats.passivations += 1
            if exit_.reason is not ExitReason.CRASHED or not self._current(slot):
                self._forget(slot)  # passivated, or already stopped or replaced
                self._notify()
                return
            assert exit_.error is not None
            if not await self._after_crash(slot, exit_.error):
                self._notify()
                return
            self._notify()

    async def _after_crash(self, slot: _Slot, error: BaseException) -> bool:
        """Count the crash; True when the chat was given a new incarnation to run."""
        if _contains(error, Fenced):
            # Deposed, not broken: no restart (it would be fenced again), check the leases now.
            self.stats.crashes += 1
            log.warning("actor of chat %s was fenced; checking the leases", slot.chat_id)
            self._forget(slot)
            self.request_lease_check()
            return False
        if _contains(error, DatabaseUnavailable):
            return await self._wait_out_outage(slot, error)
        self.stats.crashes += 1
        self._notify()
        log.error("actor of chat %s crashed", slot.chat_id, exc_info=error)
        now = trio.current_time()
        if slot.crashes is None:
            slot.crashes = deque()
        while slot.crashes and slot.crashes[0] <= now - self._restart_window_s:
            slot.crashes.popleft()
        slot.crashes.append(now)
        if len(slot.crashes) <= self._restart_limit:
            self.stats.restarts += 1
            slot.host = self._new_host(slot.chat_id, slot.fence)
            slot.began_at = now
            return True
        await self._park_chat(slot, error)
        return False

    async def _wait_out_outage(self, slot: _Slot, error: BaseException) -> bool:
        """An incarnation ended because the database is unavailable: not a crash. Restart it
        after the backoff while its shard is held; True when it was given a new incarnation."""
        self.stats.outages += 1
        now = trio.current_time()
        if slot.host.started and now - slot.began_at >= self._db_retry_max_delay_s:
            slot.outages = 0  # it ran a good while since the last one: a new outage
        delay = self._keeper.outage_delay(slot.outages)
        slot.outages += 1
        # One line per actor and outage; its later attempts only at debug level.
        log.log(
            logging.WARNING if slot.outages == 1 else logging.DEBUG,
            "actor of chat %s stopped: %s; restarting it in %.2f s",
            slot.chat_id,
            _first(error, DatabaseUnavailable),
            delay,
        )
        self._sweep_due = True
        if self._keeper.check_failures == 0:
            self.request_lease_check()  # the lease loop probes the database from now on
        slot.waiting_out = True
        self._notify()
        try:
            await trio.sleep(delay)
        finally:
            slot.waiting_out = False
        if not self._current(slot):
            self._forget(slot)  # its shard was lost meanwhile (or the chat has a new actor)
            return False
        self.stats.outage_restarts += 1
        # What the ended incarnation left (a model outcome whose commit failed) goes on.
        slot.host = self._new_host(slot.chat_id, slot.fence, slot.host.leftovers)
        slot.began_at = trio.current_time()
        return True

    async def _park_chat(self, slot: _Slot, error: BaseException) -> None:
        """Out of restarts: let the park hook record the failure, then forget the chat so that
        its next message starts it afresh (from the state the hook wrote).

        The hook is shielded (within ``park_timeout_s``) so that a shutdown does not cut the
        write short: the next owner would only resume the chat to watch it crash again.
        """
        slot.parking = True
        log.error(
            "chat %s crashed %d times within %g s; parking it",
            slot.chat_id,
            len(slot.crashes or ()),
            self._restart_window_s,
        )
        attempt = 0
        try:
            while True:
                try:
                    with (
                        trio.CancelScope(shield=True),
                        trio.move_on_after(self._park_timeout_s) as scope,
                    ):
                        await self._park(slot.chat_id, slot.fence, error)
                    if not scope.cancelled_caught:
                        break
                    cause = f"no answer within {self._park_timeout_s:g} s"
                except Exception as exc:
                    if not _contains(exc, DatabaseUnavailable):
                        log.exception("parking chat %s failed", slot.chat_id)
                        break
                    cause = str(_first(exc, DatabaseUnavailable))
                # An outage: the chat would stay `running` with nobody on it. Try again later,
                # as long as the shard is ours (a new owner resumes it, crashes and parks it).
                if not self._current(slot):
                    log.warning("parking chat %s left to the shard's next owner", slot.chat_id)
                    return
                delay = self._keeper.outage_delay(attempt)
                attempt += 1
                self.stats.park_retries += 1
                self._notify()
                log.warning(
                    "parking chat %s failed (%s); retrying in %.2f s", slot.chat_id, cause, delay
                )
                await trio.sleep(delay)
            self.stats.parked += 1
        finally:
            self._forget(slot)
            self._notify()


def _check_options(hibernate_after_s: float | None, base_s: float, max_s: float) -> None:
    if hibernate_after_s is not None and hibernate_after_s < 0:
        raise ValueError(f"hibernate_after_s must not be negative, got {hibernate_after_s}")
    if base_s > max_s:
        raise ValueError(
            f"the database retry base delay ({base_s} s) must not exceed the max delay ({max_s} s)"
        )
