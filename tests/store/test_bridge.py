"""AsyncioBridge on its own, with plain asyncio coroutines (no database).

What crosses the bridge: results, and exceptions as the very same objects, ordinary ones and
``BaseException`` subclasses alike. ``KeyboardInterrupt`` and ``SystemExit`` cross too and leave the
bridge running: an asyncio task would otherwise re-raise them out of the loop and kill its thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable

import pytest
import trio

from chatd.store.bridge import AsyncioBridge, BridgeClosed

GRACE_S = 0.3
_bridge_numbers = itertools.count()


class CustomError(Exception):
    pass


class CustomBaseError(BaseException):
    """Not an Exception: must still cross unchanged."""


def new_bridge(*, cancel_grace_s: float = GRACE_S) -> AsyncioBridge:
    return AsyncioBridge(name=f"test-bridge-{next(_bridge_numbers)}", cancel_grace_s=cancel_grace_s)


def bridge_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def setter(event: trio.Event) -> Callable[[], None]:
    """A function the asyncio thread can call to set a trio event (through the trio token)."""
    token = trio.lowlevel.current_trio_token()
    return lambda: token.run_sync_soon(event.set)


@pytest.fixture
async def bridge() -> AsyncIterator[AsyncioBridge]:
    b = new_bridge()
    b.start()
    try:
        yield b
    finally:
        await trio.to_thread.run_sync(b.stop)
    assert b.thread is not None
    assert not b.thread.is_alive()


async def answer(value: str = "answer") -> str:
    await asyncio.sleep(0)
    return value


# -- results and exceptions ----------------------------------------------------------------


async def test_result_crosses_and_the_coroutine_runs_on_the_bridge_loop(
    bridge: AsyncioBridge,
) -> None:
    async def where() -> tuple[str, asyncio.AbstractEventLoop, str]:
        await asyncio.sleep(0)
        return threading.current_thread().name, asyncio.get_running_loop(), "result"

    thread_name, loop, result = await bridge.run(where)

    assert bridge.thread is not None
    assert thread_name == bridge.thread.name
    assert thread_name != threading.current_thread().name
    assert loop is bridge.loop
    assert result == "result"


@pytest.mark.parametrize(
    "error",
    [
        CustomError("custom"),
        ValueError("bad value"),
        CustomBaseError("base"),
        KeyboardInterrupt(),
        SystemExit(3),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_exceptions_cross_unchanged_and_the_bridge_survives(
    bridge: AsyncioBridge, error: BaseException
) -> None:
    async def fail() -> None:
        await asyncio.sleep(0)
        raise error

    with pytest.raises(type(error)) as info:
        await bridge.run(fail)

    assert info.value is error
    assert bridge.thread is not None
    assert bridge.thread.is_alive()
    assert await bridge.run(answer) == "answer"


async def test_exception_from_the_callable_itself_crosses(bridge: AsyncioBridge) -> None:
    def refuse() -> asyncio.Future[None]:
        raise CustomError("before any awaitable exists")

    with pytest.raises(CustomError, match="before any awaitable exists"):
        await bridge.run(refuse)
    assert await bridge.run(answer) == "answer"


# -- cancellation --------------------------------------------------------------------------


async def test_cancellation_cancels_the_task_and_returns_only_after_its_cleanup(
    bridge: AsyncioBridge,
) -> None:
    started = trio.Event()
    mark_started = setter(started)
    seen: list[str] = []

    async def slow_to_clean_up() -> None:
        mark_started()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            # Cleanup that takes several loop turns and some time, like asyncpg cancelling a
            # query on the server and rolling back.
            for _ in range(5):
                await asyncio.sleep(0)
            await asyncio.sleep(0.05)
            seen.append("cleaned up")

    with trio.fail_after(10):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def cancel_once_started() -> None:
                    await started.wait()
                    scope.cancel()

                nursery.start_soon(cancel_once_started)
                await bridge.run(slow_to_clean_up)
        # Checked right as the cancel scope exits: the cleanup must already have run.
        assert seen == ["cancelled", "cleaned up"]
    assert scope.cancelled_caught


async def test_already_cancelled_caller_submits_nothing(bridge: AsyncioBridge) -> None:
    called: list[bool] = []

    async def record() -> None:
        called.append(True)

    with trio.CancelScope() as scope:
        scope.cancel()
        await bridge.run(record)
    assert scope.cancelled_caught
    # Calls start in submission order: had the first been submitted, it has run by now.
    assert await bridge.run(answer) == "answer"
    assert called == []


async def test_task_ignoring_cancellation_is_abandoned_after_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="chatd.store.bridge")
    bridge = new_bridge(cancel_grace_s=GRACE_S)
    bridge.start()
    try:
        started, finished = trio.Event(), trio.Event()
        mark_started, mark_finished = setter(started), setter(finished)
        release = asyncio.Event()  # binds to the bridge loop on first use

        async def stubborn() -> str:
            mark_started()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await release.wait()  # ignores the cancellation until released
            mark_finished()
            return "late"

        with trio.fail_after(10):
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    cancelled_at: list[float] = []

                    async def cancel_once_started() -> None:
                        await started.wait()
                        cancelled_at.append(trio.current_time())
                        scope.cancel()

                    nursery.start_soon(cancel_once_started)
                    await bridge.run(stubborn)
            waited = trio.current_time() - cancelled_at[0]

            assert scope.cancelled_caught
            assert waited >= GRACE_S - 0.01, "returned before the grace was over"
            assert waited < GRACE_S + 3, "waited far longer than the grace"
            assert not finished.is_set(), "the task was abandoned, not finished"
            assert any("ignored cancellation" in r.getMessage() for r in caplog.records)

            # The abandoned task still runs on the loop; the bridge keeps working.
            assert await bridge.run(answer) == "answer"
            bridge.loop.call_soon_threadsafe(release.set)
            await finished.wait()
    finally:
        await trio.to_thread.run_sync(bridge.stop)


async def test_cancel_arriving_after_the_loop_closed_wakes_the_caller_once() -> None:
    """A stop queues the caller's wake-up; a cancel that follows must not wake it a second time."""
    bridge = new_bridge()
    bridge.start()
    started = trio.Event()
    mark_started = setter(started)
    returned = trio.Event()

    async def forever() -> None:
        mark_started()
        await asyncio.sleep(3600)

    scope = trio.CancelScope()

    async def caller() -> None:
        with scope:
            await bridge.run(forever)
        returned.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await started.wait()
            # Synchronously, so that trio runs nothing in between: the loop cancels the task,
            # queues the caller's wake-up and closes; then the caller is cancelled.
            bridge.stop()
            scope.cancel()
            await returned.wait()
    assert scope.cancelled_caught


# -- stopping ------------------------------------------------------------------------------


async def test_calls_after_stop_or_before_start_raise_bridge_closed() -> None:
    bridge = new_bridge()
    with pytest.raises(BridgeClosed):
        await bridge.run(answer)

    bridge.start()
    assert await bridge.run(answer) == "answer"
    await trio.to_thread.run_sync(bridge.stop)
    bridge.stop()  # a second stop is a no-op

    called: list[bool] = []

    async def record() -> None:
        called.append(True)

    with pytest.raises(BridgeClosed):
        await bridge.run(record)
    with pytest.raises(BridgeClosed):
        _ = bridge.loop
    assert called == []


async def test_stop_cancels_in_flight_calls_and_their_callers_get_bridge_closed() -> None:
    bridge = new_bridge()
    bridge.start()
    callers = 5
    all_started = trio.Event()
    mark_all_started = setter(all_started)
    started = 0
    cleaned_up: list[int] = []
    outcomes: dict[int, str] = {}

    async def forever(i: int) -> None:
        nonlocal started
        started += 1
        if started == callers:
            mark_all_started()
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned_up.append(i)

    async def caller(i: int) -> None:
        try:
            await bridge.run(lambda: forever(i))
        except BridgeClosed:
            outcomes[i] = "closed"
        else:
            outcomes[i] = "returned"

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(callers):
                nursery.start_soon(caller, i)
            await all_started.wait()
            await trio.to_thread.run_sync(bridge.stop)

    assert outcomes == dict.fromkeys(range(callers), "closed")
    assert sorted(cleaned_up) == list(range(callers))


async def test_many_concurrent_callers_each_get_their_own_result(bridge: AsyncioBridge) -> None:
    callers = 200
    arrived = 0
    everyone_in = asyncio.Event()  # binds to the bridge loop on first use
    results: dict[int, int] = {}

    async def square_once_all_are_in(i: int) -> int:
        nonlocal arrived
        arrived += 1
        if arrived == callers:
            everyone_in.set()
        await everyone_in.wait()  # all 200 are in flight at once
        await asyncio.sleep(0)
        return i * i

    async def caller(i: int) -> None:
        results[i] = await bridge.run(lambda: square_once_all_are_in(i))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(callers):
                nursery.start_soon(caller, i)

    assert results == {i: i * i for i in range(callers)}


async def test_stop_leaves_no_thread() -> None:
    bridge = new_bridge()
    bridge.start()
    assert bridge.thread is not None
    name = bridge.thread.name
    assert bridge_threads(name) == [bridge.thread]

    assert await bridge.run(answer) == "answer"
    with trio.move_on_after(0.05):
        await bridge.run(lambda: asyncio.sleep(3600))
    await trio.to_thread.run_sync(bridge.stop)

    assert not bridge.thread.is_alive()
    assert bridge_threads(name) == []
