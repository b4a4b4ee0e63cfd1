"""What the Supervisor's parts share about database outages: the retry backoff, and finding
the outage inside an exception group."""

from __future__ import annotations

import random


def outage_delay(attempt: int, base_s: float, max_s: float) -> float:
    """The wait before retry ``attempt`` (0, 1, ...) after a database outage: the capped
    exponential ``min(base * 2^attempt, max)``, drawn from its upper half (jitter), so that
    thousands of actors do not reconnect in step."""
    capped = min(max_s, base_s * 2.0 ** min(attempt, 32))
    return capped * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not a secret


def contains(error: BaseException, kind: type[BaseException]) -> bool:
    return first(error, kind) is not None


def first(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in ``error`` or, for a group, anywhere inside it."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := first(inner, kind)) is not None:
                return found
        return None
    return error if isinstance(error, kind) else None
