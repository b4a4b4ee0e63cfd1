"""Passivation of hibernating actors: one task for all of them, oldest first.

An idle actor hibernates (``chatd.actors.host``): its task ends, its state stays, and its next
message starts a task again; so an idle chat costs its state, not a task. Having no task, it
cannot passivate itself when its idle time is up: this queue does it, ``idle_timeout_s`` after
its last message, waking only at the oldest one's deadline.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from uuid import UUID

import trio


class Passivation:
    """The hibernating actors by the time of their last message, in the order they hibernated.

    ``passivate(chat_id)`` is called once a chat's idle time is up; it passivates the actor if
    it still may (its owner's business: the actor may have been woken or stopped meanwhile).
    """

    def __init__(self, idle_timeout_s: float, passivate: Callable[[UUID], None]) -> None:
        self._idle_timeout_s = idle_timeout_s
        self._passivate = passivate
        self._hibernating: OrderedDict[UUID, float] = OrderedDict()
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self._hibernating)

    def add(self, chat_id: UUID, since: float) -> None:
        """``chat_id`` hibernated, idle since ``since`` (trio time)."""
        # Entries go in the order the actors hibernated, which is almost that of their last
        # messages; one older than the first goes first, one out of order behind it may
        # passivate a bit late.
        hibernating = self._hibernating
        first = next(iter(hibernating.values()), math.inf)
        hibernating[chat_id] = since
        hibernating.move_to_end(chat_id)
        if since < first:
            hibernating.move_to_end(chat_id, last=False)
            self._changed.set()  # the loop's next deadline moved

    def discard(self, chat_id: UUID) -> None:
        """``chat_id`` woke, or its actor is gone."""
        self._hibernating.pop(chat_id, None)

    def clear(self) -> None:
        self._hibernating.clear()

    async def run(self) -> None:
        """Passivate hibernating actors idle for ``idle_timeout_s``; runs until cancelled."""
        while True:
            now = trio.current_time()
            while self._hibernating:
                chat_id, since = next(iter(self._hibernating.items()))
                if now < since + self._idle_timeout_s:
                    break
                del self._hibernating[chat_id]
                self._passivate(chat_id)
            deadline = math.inf
            if self._hibernating:
                deadline = next(iter(self._hibernating.values())) + self._idle_timeout_s
            self._changed = trio.Event()
            with trio.move_on_at(deadline):
                await self._changed.wait()
