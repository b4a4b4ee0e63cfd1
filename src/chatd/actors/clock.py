"""Wall-clock time that moves with trio's clock.

Retry and deadline times are stored as wall-clock timestamps (they must survive a restart or a
move to another worker); timers sleep on trio's clock. Deriving one from the other with a fixed
offset keeps both consistent, and under ``trio.testing.MockClock`` wall time jumps along.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import trio


class WallClock:
    def __init__(self) -> None:
        self._offset = time.time() - trio.current_time()

    def now(self) -> float:
        return trio.current_time() + self._offset

    async def sleep_until(self, wall_time: float) -> None:
        await trio.sleep_until(wall_time - self._offset)


def to_datetime(epoch_s: float | None) -> datetime | None:
    return None if epoch_s is None else datetime.fromtimestamp(epoch_s, tz=UTC)


def to_epoch(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()
