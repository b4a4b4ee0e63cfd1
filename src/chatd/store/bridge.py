"""Run asyncio coroutines from trio on one dedicated asyncio thread.

asyncpg only runs on asyncio. A thread owning an asyncio loop, fed with
``call_soon_threadsafe`` and answering through the caller's ``TrioToken``, costs one wake-up each
way and no trio worker thread per call; it measured well ahead of trio-asyncio and of
``trio.to_thread.run_sync(future.result)`` (which cannot be cancelled).

Cancellation is honest: when the trio caller is cancelled, the asyncio task is cancelled and the
caller waits, shielded, until that task has really finished (for asyncpg: the query cancelled on
the server, the transaction rolled back, the connection back in its pool). A task that does not
finish within ``cancel_grace_s`` of being cancelled is abandoned so that no trio caller waits
without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import outcome
import trio

T = TypeVar("T")

log = logging.getLogger(__name__)


class BridgeClosed(RuntimeError):
    """The bridge was stopped (or never started) while a call needed it."""


class AsyncioBridge:
    """An asyncio event loop on its own thread, callable from any trio task."""

    def __init__(self, *, name: str = "chatd-asyncio", cancel_grace_s: float = 10.0) -> None:
        self._name = name
        self._cancel_grace_s = cancel_grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._stopping:
            raise BridgeClosed("the asyncio bridge is not running")
        return self._loop

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the asyncio bridge was already started")
        ready = threading.Event()
        loop = asyncio.new_event_loop()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                _cancel_remaining(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=main, name=self._name, daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loop (cancelling whatever still runs on it) and join the thread."""
        if self._thread is None or self._loop is None or self._stopping:
            return
        self._stopping = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise RuntimeError(f"the asyncio bridge thread did not stop within {timeout_s} s")

    async def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` as a task on the asyncio loop and return its result to this trio task.

        Exceptions keep their type. If this trio task is cancelled, the asyncio task is cancelled
        and this call returns (raising ``trio.Cancelled``) only once it has finished.
        """
        loop = self.loop
        await trio.lowlevel.checkpoint_if_cancelled()
        call = _Call(fn, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task())
        try:
            loop.call_soon_threadsafe(call.start)
        except RuntimeError:
            raise BridgeClosed("the asyncio bridge is not running") from None

        def abort(raise_cancel: Callable[[], Any]) -> trio.lowlevel.Abort:
            call.raise_cancel = raise_cancel
            try:
                loop.call_soon_threadsafe(call.cancel, self._cancel_grace_s)
            except RuntimeError:
                # The loop is gone, and with it the task: nothing left to wait for. A wake-up the
                # loop queued for this call before closing must now be ignored (a second
                # reschedule of this task would be a TrioInternalError).
                call.aborted = True
                return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result


class _Call(Generic[T]):
    """One coroutine crossing the bridge; the asyncio side runs on the loop thread only."""

    __slots__ = ("_done", "_fn", "_task", "_token", "_trio_task", "aborted", "raise_cancel")

    def __init__(
        self,
        fn: Callable[[], Awaitable[T]],
        token: trio.lowlevel.TrioToken,
        trio_task: trio.lowlevel.Task,
    ) -> None:
        self._fn = fn
        self._token = token
        self._trio_task = trio_task
        self._task: asyncio.Future[T] | None = None
        self._done = False
        self.raise_cancel: Callable[[], Any] | None = None
        self.aborted = False

    # -- asyncio thread --------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._task = asyncio.ensure_future(self._guarded())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who re-raises it
            self._finish(outcome.Error(exc))
            return
        self._task.add_done_callback(self._on_task_done)

    async def _guarded(self) -> T:
        # ``fn()`` is called inside the task: a task cancelled before its first step then never
        # made a coroutine that nobody awaits (a RuntimeWarning, fatal in our tests).
        # An asyncio task re-raises KeyboardInterrupt and SystemExit out of the loop, which would
        # kill the bridge thread; hand them to the caller instead, like any other exception.
        try:
            return await self._fn()
        except (KeyboardInterrupt, SystemExit) as exc:
            self._finish(outcome.Error(exc))
            # The caller has its outcome; end the task quietly (``_on_task_done`` is a no-op now).
            raise asyncio.CancelledError from None

    def cancel(self, grace_s: float) -> None:
        if self._task is None or self._task.done():
            return
        self._task.cancel()
        asyncio.get_running_loop().call_later(grace_s, self._abandon, grace_s)

    def _abandon(self, grace_s: float) -> None:
        if self._done:
            return
        log.error("an asyncio task ignored cancellation for %.1f s; abandoning it", grace_s)
        self._finish(None)

    def _on_task_done(self, task: asyncio.Future[T]) -> None:
        if task.cancelled():
            self._finish(None)
        elif (exc := task.exception()) is not None:
            self._finish(outcome.Error(exc))
        else:
            self._finish(outcome.Value(task.result()))

    def _finish(self, result: outcome.Outcome[T] | None) -> None:
        """``None`` means "ended by cancellation": the trio side turns that into the right error."""
        if self._done:
            return
        self._done = True
        # If the trio run has ended, nobody is left waiting.
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._wake, result)

    # -- trio thread -----------------------------------------------------------------------

    def _wake(self, result: outcome.Outcome[T] | None) -> None:
        if self.aborted:
            return
        if result is None:
            if self.raise_cancel is not None:
                result = outcome.capture(self.raise_cancel)
            else:
                result = outcome.Error(BridgeClosed("the asyncio bridge stopped during the call"))
        trio.lowlevel.reschedule(self._trio_task, result)


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
