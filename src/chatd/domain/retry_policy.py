"""When to retry a failed model step, and after how long.

Pure: the caller keeps the attempt count (durably, in the chat row) and runs the timer; this
module only decides. Because the decision depends on nothing but the failure and the attempt
number, a countdown resumed after a restart or on another worker decides the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from chatd.domain.provider_failure import ProviderFailure

if TYPE_CHECKING:
    from chatd.config import Settings


class GiveUpReason(StrEnum):
    NOT_RETRYABLE = "not_retryable"
    """The failure's kind cannot be fixed by trying again (auth, config, ...)."""
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    """``max_attempts`` attempts were made and the last one failed too."""


@dataclass(frozen=True, slots=True)
class RetryAfter:
    """Try again in ``delay_s`` seconds; the next try is attempt number ``attempt``."""

    delay_s: float
    attempt: int


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop: the chat goes to ``error`` with the failure as ``last_error``."""

    reason: GiveUpReason


RetryDecision = RetryAfter | GiveUp


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with a cap, honouring a longer Retry-After, bounded in attempts.

    An *attempt* is one request to the provider for one model step. The first try is attempt 1;
    the n-th retry is attempt n + 1. ``max_attempts`` counts all of them, the first included, so
    the default 25 means one try and at most 24 retries.
    """

    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    max_attempts: int = 25

    def __post_init__(self) -> None:
        if not self.base_delay_s > 0:
            raise ValueError("base_delay_s must be greater than 0")
        if not self.max_delay_s > 0:
            raise ValueError("max_delay_s must be greater than 0")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            base_delay_s=settings.retry_base_delay_s,
            max_delay_s=settings.retry_max_delay_s,
            max_attempts=settings.provider_max_attempts,
        )

    def backoff_s(self, failed_attempt: int) -> float:
        """``min(base * 2**(n-1), max)`` after attempt n failed: 1, 2, 4, ... 32, 60, 60 s."""
        _check_attempt(failed_attempt)
        try:
            delay = self.base_delay_s * 2.0 ** (failed_attempt - 1)
        except OverflowError:  # 2.0 ** 1024 and up; the cap has long been reached
            return self.max_delay_s
        return min(delay, self.max_delay_s)

    def decide(self, failure: ProviderFailure, failed_attempt: int) -> RetryDecision:
        """What to do after attempt number ``failed_attempt`` (1 for the first try) failed.

        A Retry-After the provider sent wins when it is longer than the backoff, even beyond
        ``max_delay_s``: retrying earlier than asked would only be refused again.
        """
        _check_attempt(failed_attempt)
        if not failure.retryable:
            return GiveUp(GiveUpReason.NOT_RETRYABLE)
        if failed_attempt >= self.max_attempts:
            return GiveUp(GiveUpReason.ATTEMPTS_EXHAUSTED)
        delay = self.backoff_s(failed_attempt)
        if failure.retry_after_s is not None and failure.retry_after_s > delay:
            delay = failure.retry_after_s
        return RetryAfter(delay_s=delay, attempt=failed_attempt + 1)


def _check_attempt(failed_attempt: int) -> None:
    if failed_attempt < 1:
        raise ValueError(f"attempts are numbered from 1, got {failed_attempt}")
