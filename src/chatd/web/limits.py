"""Per-user limits the edge enforces itself: open WebSockets.

Every WebSocket of a user counts, whatever its route (a chat's stream, the chat watch, the
inbox watch): one budget is simpler for a client to reason about than one per kind, and each
kind costs the server about the same (a task, a subscriber queue, a socket). The tally is this
process's: a socket lives and dies with the process that accepted it, so a count kept anywhere
else would outlive a crash. With several workers, a user's budget is per worker.

Admins are limited like anyone: ``make run`` hands people an admin token, and a client holding
one can exhaust a process as well as any other. A load test driving thousands of sockets as one
user turns the limit off (0) for its server.

The running-chats limit is not here: it must hold across workers, so it is counted in
PostgreSQL by the commit that starts a run (``chatd.store.chats.ClaimRun``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from uuid import UUID

import trio

from chatd.store.records import User
from chatd.web.errors import ApiError


class UserSockets:
    """The open WebSockets of each user on this process, held by ``open``."""

    def __init__(self, limit: int) -> None:
        """``limit``: WebSockets per user; 0: no limit, and nothing is counted."""
        if limit < 0:
            raise ValueError(f"the WebSocket limit must be 0 (no limit) or more, got {limit}")
        self.limit = limit
        self._open: dict[UUID, int] = {}
        self._changed = trio.Event()

    def count(self, user_id: UUID) -> int:
        return self._open.get(user_id, 0)

    @contextlib.contextmanager
    def open(self, user: User) -> Iterator[None]:
        """Count a WebSocket of ``user`` for the block; raise the 429 its handshake gets when
        the user already has ``limit`` open, admin or not. With no limit, nothing is counted
        (``count`` stays 0)."""
        if not self.limit:
            yield
            return
        held = self._open.get(user.id, 0)
        if held >= self.limit:
            raise ApiError(
                429,
                "max_websockets_per_user",
                f"you already have {self.limit} WebSockets open on this server"
                " (max_websockets_per_user): close one, then retry",
            )
        self._open[user.id] = held + 1
        self._signal()
        try:
            yield
        finally:
            left = self._open[user.id] - 1
            if left:
                self._open[user.id] = left
            else:
                del self._open[user.id]  # no entry per user who ever connected
            self._signal()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (unbounded: wrap it in a deadline) until ``predicate()`` holds; re-checked at
        every open and close (tests, diagnostics)."""
        while not predicate():
            await self._changed.wait()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
