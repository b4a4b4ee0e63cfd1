"""One actor incarnation (ActorHost) with a toy behavior: no database needed.

Nothing here sleeps to wait for something: tests wait on events under a deadline, and the idle
timeout runs on trio's MockClock (``autojump_clock``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from uuid import uuid4

import pytest
import trio
import trio.testing

from chatd.actors.errors import ActorDead, AskTimeout, MailboxFull
from chatd.actors.host import ActorExit, ActorHost, ExitReason
from chatd.domain.effects import InvalidCommand
from chatd.store.leases import Fence
from tests.actors.toy import (
    Add,
    Block,
    Boom,
    Crash,
    Get,
    Note,
    Refuse,
    Registry,
    SetBusy,
    SpawnChild,
    TellSelf,
    start_ask,
)

FENCE = Fence(shard=0, epoch=1, worker_id="worker-a")
DEADLINE_S = 5


@dataclass
class Running:
    host: ActorHost
    nursery: trio.Nursery
    ended: trio.Event = field(default_factory=trio.Event)
    exit: ActorExit | None = None

    async def wait_exit(self, deadline_s: float = DEADLINE_S) -> ActorExit:
        with trio.fail_after(deadline_s):
            await self.ended.wait()
        assert self.exit is not None
        return self.exit


@asynccontextmanager
async def running(registry: Registry, **options: float) -> AsyncIterator[Running]:
    host = ActorHost(uuid4(), FENCE, registry.factory, **options)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        run = Running(host, nursery)

        async def go() -> None:
            run.exit = await host.run()
            run.ended.set()

        nursery.start_soon(go)
        yield run
        host.stop()


async def test_messages_are_handled_one_at_a_time_in_order() -> None:
    registry = Registry()
    async with running(registry) as run:
        host = run.host
        outcomes = [await start_ask(run.nursery, partial(host.ask, Add(n))) for n in range(1, 6)]
        host.tell(Note("told"))
        last = await start_ask(run.nursery, partial(host.ask, Get()))
        with trio.fail_after(DEADLINE_S):
            await last.done.wait()
        assert [o.value for o in outcomes] == [1, 3, 6, 10, 15]
        assert last.value == 15
        toy = registry.latest(host.chat_id)
        assert toy.started
        assert toy.handled == [*(Add(n) for n in range(1, 6)), Note("told"), Get()]
        assert len(registry.incarnations[host.chat_id]) == 1


async def test_a_refusal_goes_back_to_the_asker_and_the_actor_lives() -> None:
    registry = Registry()
    async with running(registry) as run:
        host = run.host
        with trio.fail_after(DEADLINE_S):
            assert await host.ask(Add(2)) == 2
            with pytest.raises(InvalidCommand, match="must not be empty"):
                await host.ask(Refuse())
            host.tell(Refuse())  # a refused tell is just discarded
            assert await host.ask(Add(1)) == 3
        assert len(registry.incarnations[host.chat_id]) == 1
        assert host.accepting


async def test_a_crash_fails_the_ask_in_flight_and_every_queued_ask_at_once() -> None:
    registry = Registry()
    async with running(registry) as run:
        host = run.host
        block = Block(crash=True)
        in_flight = await start_ask(run.nursery, partial(host.ask, block))
        with trio.fail_after(DEADLINE_S):
            await block.entered.wait()
        queued = [await start_ask(run.nursery, partial(host.ask, Add(1))) for _ in range(3)]
        host.tell(Add(100))
        assert host.mailbox_depth == 4

        block.release.set()
        with trio.fail_after(DEADLINE_S):
            for outcome in [in_flight, *queued]:
                await outcome.done.wait()
        assert isinstance(in_flight.error, ActorDead)
        assert "while handling" in str(in_flight.error)
        assert isinstance(in_flight.error.__cause__, Boom)
        for outcome in queued:
            assert isinstance(outcome.error, ActorDead)
            assert "before handling" in str(outcome.error)

        exit_ = await run.wait_exit()
        assert exit_.reason is ExitReason.CRASHED
        assert isinstance(exit_.error, Boom)
        # The queued messages were never handled, and the dead host refuses new ones at once.
        assert registry.latest(host.chat_id).count == 0
        with pytest.raises(ActorDead):
            host.tell(Get())
        with pytest.raises(ActorDead):
            await host.ask(Get())


async def test_a_crashing_child_crashes_the_actor() -> None:
    registry = Registry()
    async with running(registry) as run:
        host = run.host
        spawn = SpawnChild(crash=True)
        other = SpawnChild(crash=False)
        with trio.fail_after(DEADLINE_S):
            assert await host.ask(spawn) == "spawned"
            assert await host.ask(other) == "spawned"
        block = Block()
        in_flight = await start_ask(run.nursery, partial(host.ask, block))
        with trio.fail_after(DEADLINE_S):
            await block.entered.wait()
        queued = await start_ask(run.nursery, partial(host.ask, Get()))

        spawn.release.set()
        with trio.fail_after(DEADLINE_S):
            await in_flight.done.wait()
            await queued.done.wait()
            await other.cancelled.wait()  # the sibling child died with the actor
        assert isinstance(in_flight.error, ActorDead)
        assert isinstance(queued.error, ActorDead)
        exit_ = await run.wait_exit()
        assert exit_.reason is ExitReason.CRASHED
        assert isinstance(exit_.error, Boom)
        assert str(exit_.error) == "child crashed"


async def test_a_child_crashing_while_the_actor_is_idle_ends_it() -> None:
    registry = Registry()
    async with running(registry) as run:
        spawn = SpawnChild(crash=True)
        with trio.fail_after(DEADLINE_S):
            await run.host.ask(spawn)
        spawn.release.set()
        exit_ = await run.wait_exit()
        assert exit_.reason is ExitReason.CRASHED
        assert not run.host.accepting


async def test_a_crash_in_handle_kills_the_asker_with_actor_dead() -> None:
    registry = Registry()
    async with running(registry) as run:
        with trio.fail_after(DEADLINE_S), pytest.raises(ActorDead) as caught:
            await run.host.ask(Crash())
        assert isinstance(caught.value.__cause__, Boom)
        exit_ = await run.wait_exit()
        assert exit_.reason is ExitReason.CRASHED


async def test_a_failing_start_fails_the_waiting_asks() -> None:
    registry = Registry()
    host = ActorHost(uuid4(), FENCE, registry.factory)
    registry.fail_start.add(host.chat_id)
    async with trio.open_nursery() as nursery:
        waiting = await start_ask(nursery, partial(host.ask, Get()))
        with trio.fail_after(DEADLINE_S):
            exit_ = await host.run()
            await waiting.done.wait()
    assert exit_.reason is ExitReason.CRASHED
    assert isinstance(exit_.error, Boom)
    assert isinstance(waiting.error, ActorDead)


async def test_a_full_mailbox_refuses_at_once() -> None:
    registry = Registry()
    async with running(registry, mailbox_capacity=2) as run:
        host = run.host
        block = Block()
        in_flight = await start_ask(run.nursery, partial(host.ask, block))
        with trio.fail_after(DEADLINE_S):
            await block.entered.wait()
        host.tell(Add(1))
        queued = await start_ask(run.nursery, partial(host.ask, Add(1)))
        assert host.mailbox_depth == 2
        with pytest.raises(MailboxFull) as caught:
            host.tell(Add(1))
        assert caught.value.capacity == 2
        # ask refuses without waiting: no checkpoint, so it fails even in a cancelled scope
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(MailboxFull):
                await host.ask(Get())
        block.release.set()
        with trio.fail_after(DEADLINE_S):
            await in_flight.done.wait()
            await queued.done.wait()
            assert await host.ask(Get()) == 2
        assert queued.value == 2


async def test_internal_events_go_before_queued_commands() -> None:
    registry = Registry()
    async with running(registry) as run:
        host = run.host
        block = Block()
        in_flight = await start_ask(run.nursery, partial(host.ask, block))
        with trio.fail_after(DEADLINE_S):
            await block.entered.wait()
        host.tell(Note("command 1"))
        host.tell(TellSelf(Note("internal")))
        host.tell(Note("command 2"))
        block.release.set()
        with trio.fail_after(DEADLINE_S):
            await host.ask(Note("last"))
        assert in_flight.value == "released"
        assert registry.latest(host.chat_id).handled[1:] == [
            Note("command 1"),
            TellSelf(Note("internal")),
            Note("internal"),
            Note("command 2"),
            Note("last"),
        ]


async def test_ask_times_out_and_a_still_queued_message_is_skipped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = Registry()
    async with running(registry, ask_timeout_s=10) as run:
        host = run.host
        block = Block()
        in_flight = await start_ask(run.nursery, partial(host.ask, block))
        await block.entered.wait()
        with pytest.raises(AskTimeout) as caught:
            await host.ask(Add(5), timeout_s=1)
        assert caught.value.timeout_s == 1
        # The default deadline applies to the one in flight too.
        await in_flight.done.wait()
        assert isinstance(in_flight.error, AskTimeout)
        assert trio.current_time() == pytest.approx(10)
        block.release.set()
        assert await host.ask(Get()) == 0  # Add(5) was abandoned before it was handled
        assert Add(5) not in registry.latest(host.chat_id).handled


async def test_an_idle_passivatable_actor_passivates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = Registry()
    async with running(registry, idle_timeout_s=10) as run:
        host = run.host
        assert await host.ask(Add(1)) == 1
        await trio.sleep(9)
        assert await host.ask(Add(1)) == 2  # activity restarts the idle period
        await trio.sleep(9)
        assert not run.ended.is_set()
        exit_ = await run.wait_exit()
        assert exit_.reason is ExitReason.PASSIVATED
        assert trio.current_time() == pytest.approx(19)
        assert host.passivated
        assert not host.accepting
        with pytest.raises(ActorDead):
            host.tell(Get())


async def test_a_busy_actor_is_not_passivated(autojump_clock: trio.testing.MockClock) -> None:
    registry = Registry()
    async with running(registry, idle_timeout_s=10) as run:
        host = run.host
        spawn = SpawnChild(crash=False)
        assert await host.ask(spawn) == "spawned"
        assert await host.ask(SetBusy(True)) is True
        await trio.sleep(100)
        assert not run.ended.is_set()
        assert not spawn.cancelled.is_set()
        host.tell(SetBusy(False))
        exit_ = await run.wait_exit(deadline_s=60)
        assert exit_.reason is ExitReason.PASSIVATED
        # Looked again at 10 s intervals after the last message (at 100 s).
        assert trio.current_time() == pytest.approx(110)
        assert spawn.cancelled.is_set()  # never leaks a child


async def test_stop_fails_pending_asks_and_cancels_children() -> None:
    registry = Registry()
    async with running(registry) as run:
        host = run.host
        spawn = SpawnChild(crash=True)
        block = Block()
        with trio.fail_after(DEADLINE_S):
            await host.ask(spawn)
        in_flight = await start_ask(run.nursery, partial(host.ask, block))
        with trio.fail_after(DEADLINE_S):
            await block.entered.wait()
        queued = await start_ask(run.nursery, partial(host.ask, Get()))
        host.stop()
        with trio.fail_after(DEADLINE_S):
            await in_flight.done.wait()
            await queued.done.wait()
        assert isinstance(in_flight.error, ActorDead)
        assert isinstance(queued.error, ActorDead)
        exit_ = await run.wait_exit()
        assert exit_.reason is ExitReason.STOPPED
        assert exit_.error is None
        assert spawn.cancelled.is_set()


async def test_a_host_stopped_before_running_never_builds_its_behavior() -> None:
    registry = Registry()
    host = ActorHost(uuid4(), FENCE, registry.factory)
    host.stop()
    exit_ = await host.run()
    assert exit_.reason is ExitReason.STOPPED
    assert not registry.incarnations
    with pytest.raises(RuntimeError, match="already ran"):
        await host.run()


async def test_outer_cancellation_propagates_and_fails_asks() -> None:
    registry = Registry()
    host = ActorHost(uuid4(), FENCE, registry.factory)
    async with trio.open_nursery() as outer:
        block = Block()
        in_flight = await start_ask(outer, partial(host.ask, block))
        with trio.CancelScope() as scope:
            outer.start_soon(_cancel_when, block.entered, scope)
            await host.run()
        assert scope.cancelled_caught
        with trio.fail_after(DEADLINE_S):
            await in_flight.done.wait()
        assert isinstance(in_flight.error, ActorDead)


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def test_settings_are_validated() -> None:
    registry = Registry()
    with pytest.raises(ValueError, match="capacity"):
        ActorHost(uuid4(), FENCE, registry.factory, mailbox_capacity=0)
    with pytest.raises(ValueError, match="timeouts"):
        ActorHost(uuid4(), FENCE, registry.factory, idle_timeout_s=0)


# -- hibernation -------------------------------------------------------------------------------


async def test_an_idle_host_hibernates_and_runs_on_with_the_same_behavior() -> None:
    registry = Registry()
    woken: list[ActorHost] = []
    host = ActorHost(uuid4(), FENCE, registry.factory, on_wake=woken.append)
    async with trio.open_nursery() as nursery:
        first = await start_ask(nursery, partial(host.ask, Add(2)))
        with trio.fail_after(DEADLINE_S):
            assert (await host.run()).reason is ExitReason.HIBERNATED
            await first.done.wait()
        assert first.value == 2
        assert host.hibernating
        assert not woken

        host.tell(Add(1))  # no task: the message wakes the host through on_wake
        assert woken == [host]
        second = await start_ask(nursery, partial(host.ask, Get()))
        assert woken == [host]  # already awake: one wake per hibernation
        with trio.fail_after(DEADLINE_S):
            assert (await host.run()).reason is ExitReason.HIBERNATED
            await second.done.wait()
        assert second.value == 3
        assert len(registry.incarnations[host.chat_id]) == 1  # no restart, no reload

    assert host.passivate_hibernated()
    assert host.passivated
    assert not host.accepting
    with pytest.raises(ActorDead):
        host.tell(Add(1))


async def test_a_host_with_work_in_flight_does_not_hibernate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = Registry()
    host = ActorHost(uuid4(), FENCE, registry.factory, on_wake=lambda _: None, idle_timeout_s=60)
    spawn = SpawnChild(crash=False)
    async with trio.open_nursery() as nursery:
        busy = await start_ask(nursery, partial(host.ask, SetBusy(True)))
        child = await start_ask(nursery, partial(host.ask, spawn))
        exited: list[ActorExit] = []
        ended = trio.Event()

        async def go() -> None:
            exited.append(await host.run())
            ended.set()

        nursery.start_soon(go)
        with trio.fail_after(DEADLINE_S):
            await child.done.wait()
        assert busy.value is True
        await trio.sleep(30)  # not passivatable: keeps its task
        assert not exited
        host.tell(SetBusy(False))
        await trio.sleep(5)  # passivatable, but its child still runs
        assert not exited
        assert not spawn.cancelled.is_set()
        spawn.release.set()
        with trio.fail_after(DEADLINE_S):
            await ended.wait()
        assert exited[0].reason is ExitReason.HIBERNATED
        assert not spawn.cancelled.is_set()
    host.stop()
    assert not host.accepting
    assert not host.hibernating
