"""A toy actor behavior for the runtime tests: a counter that can be told to misbehave.

Every incarnation is recorded by the ``Registry`` that builds it, so a test can tell a restart
(a new incarnation with fresh state) from the same actor living on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from uuid import UUID

import trio

from chatd.actors.behavior import ActorContext
from chatd.actors.errors import ActorError
from chatd.domain.effects import InvalidCommand
from chatd.store.errors import Fenced


@dataclass(frozen=True)
class Add:
    n: int


@dataclass(frozen=True)
class Get:
    pass


@dataclass(frozen=True)
class Crash:
    pass


@dataclass(frozen=True)
class Refuse:
    pass


@dataclass(frozen=True)
class RaiseFenced:
    pass


@dataclass(frozen=True, eq=False)
class Block:
    """Handling waits for ``release``; then crashes when ``crash``."""

    entered: trio.Event = field(default_factory=trio.Event)
    release: trio.Event = field(default_factory=trio.Event)
    crash: bool = False


@dataclass(frozen=True, eq=False)
class SpawnChild:
    """Start a child in the actor's nursery that waits for ``release`` then raises (when
    ``crash``) or finishes; ``cancelled`` is set if it is cancelled instead."""

    release: trio.Event = field(default_factory=trio.Event)
    crash: bool = True
    cancelled: trio.Event = field(default_factory=trio.Event)


@dataclass(frozen=True)
class SetBusy:
    busy: bool


@dataclass(frozen=True)
class TellSelf:
    message: object


@dataclass(frozen=True, eq=False)
class Turn:
    """A turn like a model answer: a child task works for ``duration_s`` (simulated work) or
    until ``release``, then tells the actor it is done; until the actor handled that, the turn
    is in progress (``turn_in_progress``). Replies with the turn's token; the registry records
    every turn begun, finished (handled ``TurnDone``) and cut (its child cancelled), and sets
    ``Registry.turn_ended[token]`` either way."""

    duration_s: float = math.inf
    release: trio.Event = field(default_factory=trio.Event)


@dataclass(frozen=True)
class TurnDone:
    token: int


@dataclass(frozen=True)
class Note:
    """Recorded only: shows where a message was handled relative to others."""

    label: str


class Boom(RuntimeError):
    pass


class Toy:
    def __init__(self, ctx: ActorContext, registry: Registry) -> None:
        self.ctx = ctx
        self.registry = registry
        self.count = 0
        self.handled: list[object] = []
        self.busy = False
        self.started = False
        self.turn: int | None = None  # the token of the turn in progress
        self._in_handle = False

    async def start(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.ctx.chat_id in self.registry.fail_start:
            raise Boom("start failed")
        self.started = True

    async def handle(self, message: object) -> object:
        assert not self._in_handle, "two messages handled at once"
        self._in_handle = True
        try:
            # A checkpoint inside every handle: other tasks run meanwhile, so overlap would show.
            await trio.lowlevel.checkpoint()
            self.handled.append(message)
            return await self._handle(message)
        finally:
            self._in_handle = False

    async def _handle(self, message: object) -> object:
        match message:
            case Add(n=n):
                self.count += n
                return self.count
            case Get():
                return self.count
            case Crash():
                raise Boom("told to crash")
            case Refuse():
                raise InvalidCommand("text", "must not be empty")
            case RaiseFenced():
                raise Fenced(self.ctx.fence.shard, self.ctx.fence.epoch)
            case Block(entered=entered, release=release, crash=crash):
                entered.set()
                await release.wait()
                if crash:
                    raise Boom("crashed after blocking")
                return "released"
            case SpawnChild() as spawn:
                self.ctx.nursery.start_soon(_child, spawn)
                return "spawned"
            case SetBusy(busy=busy):
                self.busy = busy
                return busy
            case TellSelf(message=inner):
                self.ctx.tell_self(inner)
                return "told"
            case Turn() as turn:
                token = self.registry.begin_turn(self.ctx.chat_id)
                self.turn = token
                self.ctx.nursery.start_soon(self._work, token, turn)
                return token
            case TurnDone(token=token):
                self.turn = None
                self.registry.turns_finished.append(token)
                self.registry.turn_ended[token].set()
                return None
            case Note():
                return None
        raise AssertionError(f"unexpected message {message!r}")

    def passivatable(self) -> bool:
        return not self.busy and self.turn is None

    def turn_in_progress(self) -> bool:
        return self.turn is not None

    async def _work(self, token: int, turn: Turn) -> None:
        try:
            # The simulated work of the turn (a model answering).
            with trio.move_on_after(turn.duration_s):
                await turn.release.wait()
        except trio.Cancelled:
            self.registry.turns_cut.append(token)
            self.registry.turn_ended[token].set()
            raise
        self.ctx.tell_self(TurnDone(token))


async def _child(spawn: SpawnChild) -> None:
    try:
        await spawn.release.wait()
    except trio.Cancelled:
        spawn.cancelled.set()
        raise
    if spawn.crash:
        raise Boom("child crashed")


class Registry:
    """The factory of Toy behaviors; remembers every incarnation per chat."""

    def __init__(self) -> None:
        self.incarnations: defaultdict[UUID, list[Toy]] = defaultdict(list)
        self.fail_start: set[UUID] = set()
        self.turns_begun: dict[int, UUID] = {}  # token -> chat
        self.turns_finished: list[int] = []
        self.turns_cut: list[int] = []
        self.turn_ended: dict[int, trio.Event] = {}

    def begin_turn(self, chat_id: UUID) -> int:
        token = len(self.turns_begun)
        self.turns_begun[token] = chat_id
        self.turn_ended[token] = trio.Event()
        return token

    def factory(self, ctx: ActorContext) -> Toy:
        toy = Toy(ctx, self)
        self.incarnations[ctx.chat_id].append(toy)
        return toy

    def latest(self, chat_id: UUID) -> Toy:
        return self.incarnations[chat_id][-1]


class Outcome:
    """The result of an ask run in its own task."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: object = None
        self.error: Exception | None = None


async def start_ask(nursery: trio.Nursery, ask: Callable[[], Awaitable[object]]) -> Outcome:
    """Start ``ask`` in its own task; returns once its message is queued (an ask queues before
    its first checkpoint), so several asks started in a row queue in that order."""
    outcome = Outcome()

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            outcome.value = await ask()
        except (ActorError, InvalidCommand) as exc:
            outcome.error = exc
        finally:
            outcome.done.set()

    await nursery.start(run)
    return outcome
