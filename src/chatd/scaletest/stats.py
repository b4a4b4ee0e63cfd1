"""Latency distributions: pure, so the summary can be tested without a server."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Distribution:
    """Nearest-rank percentiles of a sample, in milliseconds."""

    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Distribution:
        if not samples_ms:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        ordered = sorted(samples_ms)
        return cls(
            count=len(ordered),
            p50_ms=_rank(ordered, 50),
            p90_ms=_rank(ordered, 90),
            p99_ms=_rank(ordered, 99),
            max_ms=ordered[-1],
            mean_ms=sum(ordered) / len(ordered),
        )


def _rank(ordered: Sequence[float], percent: float) -> float:
    """The smallest sample with at least ``percent``% of the samples at or below it."""
    index = max(0, math.ceil(percent / 100 * len(ordered)) - 1)
    return ordered[index]
