"""One actor incarnation: a trio task that handles one message at a time from a bounded mailbox.

Two queues feed it: the mailbox of commands (``ask``/``tell``, bounded, refused at once when
full) and the internal queue (``tell_self``, unbounded, always handled first, so an event from a
child such as "generation step done" is never stuck behind a backlog of commands). They are
plain deques with one parking lot rather than two memory channels: the loop must take from
either one with priority, which two channels cannot express without a helper task per actor.

When the incarnation ends for any reason (crash, stop, passivation, cancellation) every ask in
flight or queued fails at once with ``ActorDead``; no ask ever outlives its actor or its own
deadline. A crash is returned to the caller of ``run`` (the Supervisor), never raised: one
actor's failure must not cancel its siblings.

Hibernation (opt-in, with ``on_wake``): an idle actor that could passivate and has no child
task left ends its task but keeps its behavior (its state), so that an idle chat costs its state
only, not a task, a nursery and their frames. ``run`` then returns ``HIBERNATED``; the next
message calls ``on_wake``, whose caller must call ``run`` again, which goes on with the same
behavior (no ``start``, no reload). Passivating a hibernating host is ``passivate_hibernated``.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

import trio

from chatd.actors.behavior import ActorBehavior, ActorFactory
from chatd.actors.errors import ActorDead, AskTimeout, MailboxFull
from chatd.domain.effects import Refusal
from chatd.store.leases import Fence

log = logging.getLogger(__name__)


class ExitReason(enum.Enum):
    STOPPED = "stopped"
    """``stop()`` was called (shard lost, shutdown) or the incarnation never got to run."""
    PASSIVATED = "passivated"
    """Idle past the idle timeout and its behavior said it could stop."""
    CRASHED = "crashed"
    """``start``/``handle`` or a child task raised; ``ActorExit.error`` holds what."""
    HIBERNATED = "hibernated"
    """Idle and passivatable with no child left: the task ended, the behavior is kept, and the
    next message calls ``on_wake`` (only with hibernation enabled)."""


_CHILD_RECHECK_S = 1.0
"""How often an idle, passivatable actor whose children are still finishing looks again
whether it may hibernate (a cancelled timer task is gone by the next look)."""


@dataclass(frozen=True, slots=True)
class ActorExit:
    reason: ExitReason
    error: BaseException | None = None


class _Reply:
    """A one-shot reply slot; ``abandoned`` once the asker stopped waiting."""

    __slots__ = ("_done", "_error", "_value", "abandoned")

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: object = None
        self._error: BaseException | None = None
        self.abandoned = False

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def set(self, value: object) -> None:
        if not self.done:
            self._value = value
            self._done.set()

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self._error = error
            self._done.set()

    async def wait(self) -> None:
        await self._done.wait()

    def unwrap(self) -> object:
        if self._error is not None:
            raise self._error
        return self._value


@dataclass(slots=True)
class _Envelope:
    message: object
    reply: _Reply | None  # None for tell


class _Context:
    """The ``ActorContext`` handed to one incarnation's behavior."""

    __slots__ = ("_host",)

    def __init__(self, host: ActorHost) -> None:
        self._host = host

    @property
    def chat_id(self) -> UUID:
        return self._host.chat_id

    @property
    def fence(self) -> Fence:
        return self._host.fence

    @property
    def nursery(self) -> trio.Nursery:
        # The nursery of the current run: a hibernated actor gets a new one when it wakes, and
        # its behavior only runs (and so only spawns children) while awake.
        nursery = self._host._nursery
        if nursery is None:
            raise RuntimeError(f"actor of chat {self._host.chat_id} is not running")
        return nursery

    @property
    def carried(self) -> dict[str, object]:
        host = self._host
        if host._carried is None:
            host._carried = {}
        return host._carried

    def tell_self(self, message: object) -> None:
        self._host._tell_self(message)


class ActorHost:
    """Runs one incarnation of one chat's actor; create a new host to restart it.

    Messages may be sent as soon as the host exists: they wait while ``run`` starts the
    behavior. ``run`` must be called once, in a nursery that outlives it (again after each
    ``HIBERNATED`` exit, when ``on_wake`` is called). Per-run objects (mailbox deques, parking
    lot, cancel scope) exist only while needed: thousands of hosts sit idle at once.
    """

    __slots__ = (
        "_ask_timeout_s",
        "_awake",
        "_behavior",
        "_capacity",
        "_carried",
        "_closed_reason",
        "_current",
        "_factory",
        "_handling",
        "_hibernate_after_s",
        "_idle_timeout_s",
        "_internal",
        "_last_activity",
        "_mailbox",
        "_nursery",
        "_on_wake",
        "_ran",
        "_scope",
        "_started",
        "_wakeup",
        "chat_id",
        "fence",
    )

    def __init__(
        self,
        chat_id: UUID,
        fence: Fence,
        factory: ActorFactory,
        *,
        mailbox_capacity: int = 256,
        idle_timeout_s: float = 300.0,
        ask_timeout_s: float = 30.0,
        on_wake: Callable[[ActorHost], None] | None = None,
        hibernate_after_s: float = 0.0,
        carried: dict[str, object] | None = None,
    ) -> None:
        if mailbox_capacity < 1:
            raise ValueError(f"mailbox capacity must be at least 1, got {mailbox_capacity}")
        if not idle_timeout_s > 0 or not ask_timeout_s > 0:
            raise ValueError("idle and ask timeouts must be positive")
        if hibernate_after_s < 0:
            raise ValueError("hibernate_after_s must not be negative")
        self.chat_id = chat_id
        self.fence = fence
        self._factory = factory
        self._capacity = mailbox_capacity
        self._idle_timeout_s = idle_timeout_s
        self._ask_timeout_s = ask_timeout_s
        self._on_wake = on_wake  # None: never hibernate
        self._hibernate_after_s = hibernate_after_s
        # Created on first use and dropped on hibernation (an empty deque holds a 64-slot block).
        self._mailbox: deque[_Envelope] | None = None
        self._internal: deque[object] | None = None
        self._wakeup: trio.lowlevel.ParkingLot | None = None  # while running
        self._scope: trio.CancelScope | None = None  # while running
        self._nursery: trio.Nursery | None = None  # while running
        self._current: _Envelope | None = None
        self._handling = False  # a message or an internal event is being handled
        self._behavior: ActorBehavior | None = None
        self._ran = False
        self._started = False
        self._awake = True  # a run is due or going on: the creator calls ``run``
        self._closed_reason: str | None = None
        self._last_activity = 0.0  # set once the behavior started
        # What a previous incarnation left for this one (ActorContext.carried); made on use.
        self._carried = carried

    # -- sending ------------------------------------------------------------------------------

    def tell(self, message: object) -> None:
        """Queue ``message``; its reply (or refusal) is discarded. Raises at once, never waits:
        ``MailboxFull`` when the mailbox is full, ``ActorDead`` when the actor is gone."""
        self._enqueue(_Envelope(message, None))

    async def ask(self, message: object, *, timeout_s: float | None = None) -> object:
        """Queue ``message`` and wait for the behavior's reply (returned) or refusal (raised).

        Raises ``MailboxFull`` at once when full, ``ActorDead`` when the actor is gone or dies
        before answering, ``AskTimeout`` after ``timeout_s`` (default: the host's ask timeout).
        """
        timeout = self._ask_timeout_s if timeout_s is None else timeout_s
        reply = _Reply()
        self._enqueue(_Envelope(message, reply))
        try:
            with trio.move_on_after(timeout):
                await reply.wait()
        finally:
            # Timed out or cancelled: a message still queued is skipped, not handled for nobody.
            if not reply.done:
                reply.abandoned = True
        if not reply.done:
            raise AskTimeout(self.chat_id, timeout)
        return reply.unwrap()

    def _enqueue(self, envelope: _Envelope) -> None:
        if self._closed_reason is not None:
            raise ActorDead(self.chat_id, self._closed_reason)
        mailbox = self._mailbox
        if mailbox is None:
            mailbox = self._mailbox = deque()
        elif len(mailbox) >= self._capacity:
            raise MailboxFull(self.chat_id, self._capacity)
        mailbox.append(envelope)
        self._wake()

    def _tell_self(self, message: object) -> None:
        if self._closed_reason is not None:
            return  # a child finishing during teardown: nobody is left to handle it
        if self._internal is None:
            self._internal = deque()
        self._internal.append(message)
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.unpark()
        elif not self._awake and self._on_wake is not None:
            self._awake = True
            self._on_wake(self)

    # -- state ---------------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """False once the incarnation ended or is ending: messages are refused with ActorDead."""
        return self._closed_reason is None

    @property
    def in_turn(self) -> bool:
        """True while stopping the actor would cut work in progress: a message or internal
        event being handled or waiting, or the behavior's turn (``turn_in_progress``: a model
        answer streaming). A shard handover waits for it to turn False (for a bounded time)."""
        if self._closed_reason is not None:
            return False
        if self._handling or self._mailbox or self._internal:
            return True
        return self._behavior is not None and self._behavior.turn_in_progress()

    @property
    def passivated(self) -> bool:
        return self._closed_reason == ExitReason.PASSIVATED.value

    @property
    def hibernating(self) -> bool:
        """No task: idle, its behavior kept; the next message wakes it."""
        return not self._awake and self._closed_reason is None

    @property
    def idle_since(self) -> float:
        """When the last message was handled (trio time): idle time counts from there."""
        return self._last_activity

    @property
    def mailbox_depth(self) -> int:
        return 0 if self._mailbox is None else len(self._mailbox)

    @property
    def leftovers(self) -> dict[str, object] | None:
        """What the behavior left for its next incarnation (``ActorContext.carried``), if any:
        the Supervisor hands it over when it restarts the actor after a database outage."""
        return self._carried or None

    @property
    def started(self) -> bool:
        """True once the behavior's ``start`` returned (its state was loaded): a failure after
        that happened to a running actor, not to one that could not even begin."""
        return self._started

    @property
    def behavior(self) -> ActorBehavior | None:
        """The running behavior (for inspection in tests and tools), once ``run`` built it."""
        return self._behavior

    def stop(self) -> None:
        """End the incarnation now: queued and in-flight asks fail at once, children are
        cancelled, ``run`` returns ``STOPPED``. Idempotent; safe before ``run``."""
        self._close(ExitReason.STOPPED.value)
        if self._scope is not None:
            self._scope.cancel()

    def passivate_hibernated(self) -> bool:
        """Passivate a hibernating host (it has no task to do it itself); False when it is not
        hibernating or its behavior says it may not stop."""
        if not self.hibernating or (
            self._behavior is not None and not self._behavior.passivatable()
        ):
            return False
        self._close(ExitReason.PASSIVATED.value)
        return True

    # -- running -------------------------------------------------------------------------------

    async def run(self) -> ActorExit:
        """Build the behavior, start it, handle messages until stopped, passivated, crashed or
        hibernated (a run after ``HIBERNATED`` goes on with the same behavior).

        Returns how it ended (a crash is returned, not raised); only cancellation from outside
        propagates. Every ask still pending has failed by the time this returns, unless it
        returns ``HIBERNATED`` (then nothing is pending).
        """
        if self._ran or not self._awake:
            raise RuntimeError(f"actor host of chat {self.chat_id} already ran")
        self._ran = True
        if self._closed_reason is not None:
            return ActorExit(ExitReason.STOPPED)
        crash: BaseException | None = None
        hibernate = False
        try:
            while True:
                self._wakeup = trio.lowlevel.ParkingLot()
                self._scope = trio.CancelScope()
                with self._scope:
                    async with trio.open_nursery() as nursery:
                        hibernate = await self._body(nursery)
                self._wakeup = self._scope = None
                if not hibernate:
                    break
                if not self.accepting:  # stopped while the run was ending
                    hibernate = False
                    break
                if not self._mailbox and not self._internal:
                    self._awake = self._ran = False  # the next message calls on_wake
                    self._mailbox = self._internal = None
                    break
                hibernate = False  # a message came while the run was ending: run on
        except* Exception as group:  # noqa: BLE001 - any crash is returned to the Supervisor
            crash = _single(group)
        finally:
            self._wakeup = self._scope = self._nursery = None
            if not hibernate:
                self._close(ExitReason.STOPPED.value)
        if crash is not None:
            return ActorExit(ExitReason.CRASHED, crash)
        if self.passivated:
            return ActorExit(ExitReason.PASSIVATED)
        if hibernate:
            return ActorExit(ExitReason.HIBERNATED)
        return ActorExit(ExitReason.STOPPED)

    async def _body(self, nursery: trio.Nursery) -> bool:
        """One run; True when the actor hibernates, False when it passivated."""
        self._nursery = nursery
        try:
            behavior = self._behavior
            if behavior is None:
                behavior = self._factory(_Context(self))
                self._behavior = behavior
                await behavior.start()
                self._started = True
                self._last_activity = trio.current_time()
            hibernate = await self._loop(behavior, nursery)
        except BaseException as exc:
            # Fail every ask now, not after the children are torn down. Cancelled here with the
            # nursery's own scope cancelled means a child raised.
            crashed = not isinstance(exc, trio.Cancelled) or nursery.cancel_scope.cancel_called
            reason = ExitReason.CRASHED if crashed else ExitReason.STOPPED
            self._close(reason.value, None if isinstance(exc, trio.Cancelled) else exc)
            raise
        finally:
            self._nursery = None
        if not hibernate:
            # Passivated: nothing should be left running, but never leak a child.
            nursery.cancel_scope.cancel()
        return hibernate

    async def _loop(self, behavior: ActorBehavior, nursery: trio.Nursery) -> bool:
        """Handle messages until the actor passivates (False) or may hibernate (True)."""
        while True:
            if self._internal:
                await self._handle_internal(behavior, self._internal.popleft())
            elif self._mailbox:
                envelope = self._mailbox.popleft()
                if envelope.reply is not None and envelope.reply.abandoned:
                    continue
                await self._handle_envelope(behavior, envelope)
            else:
                outcome = await self._idle(behavior, nursery)
                if outcome is not None:
                    return outcome
                continue
            self._last_activity = trio.current_time()

    async def _handle_internal(self, behavior: ActorBehavior, message: object) -> None:
        self._handling = True
        try:
            await behavior.handle(message)
        except Refusal as refusal:
            log.debug("chat %s refused its own event %r: %s", self.chat_id, message, refusal)
        finally:
            self._handling = False

    async def _handle_envelope(self, behavior: ActorBehavior, envelope: _Envelope) -> None:
        reply = envelope.reply
        self._current = envelope
        self._handling = True
        try:
            result = await behavior.handle(envelope.message)
        except Refusal as refusal:
            if reply is not None:
                reply.fail(refusal)
        else:
            if reply is not None:
                reply.set(result)
        finally:
            self._handling = False
        self._current = None

    async def _idle(self, behavior: ActorBehavior, nursery: trio.Nursery) -> bool | None:
        """Wait for a message (None); True to hibernate, False once passivated.

        Hibernating needs what passivating needs (``passivatable``) and no child task left, so
        that nothing can happen to the actor while it has no task of its own.
        """
        assert self._wakeup is not None
        deadline = self._last_activity + self._idle_timeout_s
        if self._on_wake is not None and behavior.passivatable():
            if not nursery.child_tasks:
                at = self._last_activity + self._hibernate_after_s
                if at <= trio.current_time():
                    return True
            else:
                at = trio.current_time() + _CHILD_RECHECK_S
            deadline = min(deadline, at)
        with trio.CancelScope(deadline=deadline):
            await self._wakeup.park()
            return None
        if self._mailbox or self._internal:
            return None
        if trio.current_time() < self._last_activity + self._idle_timeout_s:
            return None  # time to look at hibernating again
        if behavior.passivatable():
            self._close(ExitReason.PASSIVATED.value)
            return False
        # Busy with work in flight (a generation, a timer): look again one idle period later.
        self._last_activity = trio.current_time()
        return None

    def _close(self, reason: str, cause: BaseException | None = None) -> None:
        """Refuse new messages and fail every pending ask; the first reason sticks."""
        if self._closed_reason is not None:
            return
        self._closed_reason = reason
        current, self._current = self._current, None
        if current is not None and current.reply is not None:
            dead = ActorDead(self.chat_id, f"{reason} while handling the message")
            dead.__cause__ = cause
            current.reply.fail(dead)
        for envelope in self._mailbox or ():
            if envelope.reply is not None:
                envelope.reply.fail(ActorDead(self.chat_id, f"{reason} before handling it"))
        self._mailbox = self._internal = None
        if self._wakeup is not None:
            self._wakeup.unpark_all()


def _single(error: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (trio's strict nurseries)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error
