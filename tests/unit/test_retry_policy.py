"""The retry policy: backoff sequence, Retry-After, non-retryable kinds, the attempt limit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatd.config import Settings
from chatd.domain.provider_failure import ErrorKind, ProviderFailure
from chatd.domain.retry_policy import GiveUp, GiveUpReason, RetryAfter, RetryPolicy


def failure(
    kind: ErrorKind = ErrorKind.OVERLOADED,
    *,
    retryable: bool = True,
    retry_after_s: float | None = None,
) -> ProviderFailure:
    return ProviderFailure(
        kind=kind,
        provider="anthropic",
        status_code=529,
        retryable=retryable,
        retry_after_s=retry_after_s,
        message="m",
        detail="d",
    )


def test_the_delay_doubles_from_one_second_up_to_sixty() -> None:
    policy = RetryPolicy()
    delays = [policy.decide(failure(), n) for n in range(1, 11)]
    assert delays == [
        RetryAfter(delay_s=d, attempt=n + 1)
        for n, d in enumerate([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0, 60.0], start=1)
    ]


def test_a_longer_retry_after_wins() -> None:
    assert RetryPolicy().decide(failure(retry_after_s=30.0), 1) == RetryAfter(30.0, 2)
    # Even beyond the cap: retrying earlier than asked would only be refused again.
    assert RetryPolicy().decide(failure(retry_after_s=90.0), 8) == RetryAfter(90.0, 9)


def test_a_shorter_retry_after_is_ignored() -> None:
    assert RetryPolicy().decide(failure(retry_after_s=0.5), 3) == RetryAfter(4.0, 4)
    assert RetryPolicy().decide(failure(retry_after_s=0.0), 1) == RetryAfter(1.0, 2)


@pytest.mark.parametrize("attempt", [1, 2, 24, 25])
def test_a_non_retryable_failure_stops_at_once(attempt: int) -> None:
    decision = RetryPolicy().decide(failure(ErrorKind.AUTH, retryable=False), attempt)
    assert decision == GiveUp(GiveUpReason.NOT_RETRYABLE)


def test_twenty_five_attempts_in_all_by_default() -> None:
    policy = RetryPolicy()
    assert policy.decide(failure(), 24) == RetryAfter(60.0, 25)
    assert policy.decide(failure(), 25) == GiveUp(GiveUpReason.ATTEMPTS_EXHAUSTED)
    assert policy.decide(failure(), 26) == GiveUp(GiveUpReason.ATTEMPTS_EXHAUSTED)


def test_walking_the_policy_makes_exactly_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=4)
    attempts = 1
    while isinstance(decision := policy.decide(failure(), attempts), RetryAfter):
        assert decision.attempt == attempts + 1
        attempts = decision.attempt
    assert attempts == 4
    assert decision == GiveUp(GiveUpReason.ATTEMPTS_EXHAUSTED)


def test_one_attempt_means_no_retry() -> None:
    assert RetryPolicy(max_attempts=1).decide(failure(), 1) == GiveUp(
        GiveUpReason.ATTEMPTS_EXHAUSTED
    )


def test_from_settings() -> None:
    settings = Settings(retry_base_delay_s=0.5, retry_max_delay_s=10.0, provider_max_attempts=3)
    assert RetryPolicy.from_settings(settings) == RetryPolicy(0.5, 10.0, 3)
    assert RetryPolicy.from_settings(Settings()) == RetryPolicy()


def test_huge_attempt_numbers_do_not_overflow() -> None:
    policy = RetryPolicy(max_attempts=10**9)
    assert policy.backoff_s(5000) == 60.0
    assert policy.decide(failure(), 10**6) == RetryAfter(60.0, 10**6 + 1)


@pytest.mark.parametrize(
    "kwargs",
    [{"base_delay_s": 0}, {"max_delay_s": -1}, {"max_attempts": 0}],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_attempts_are_numbered_from_one() -> None:
    with pytest.raises(ValueError, match="from 1"):
        RetryPolicy().decide(failure(), 0)


delays = st.floats(min_value=0.001, max_value=3600.0, allow_nan=False)


@given(
    base=delays,
    cap=delays,
    retry_after=st.none() | st.floats(min_value=0.0, max_value=86400.0, allow_nan=False),
    attempt=st.integers(min_value=1, max_value=10_000),
)
def test_delay_is_always_within_bounds(
    base: float, cap: float, retry_after: float | None, attempt: int
) -> None:
    policy = RetryPolicy(base_delay_s=base, max_delay_s=cap, max_attempts=attempt + 1)
    decision = policy.decide(failure(retry_after_s=retry_after), attempt)
    assert isinstance(decision, RetryAfter)
    assert decision.attempt == attempt + 1
    assert min(base, cap) <= decision.delay_s <= max(cap, retry_after or 0.0)
    if retry_after is not None:
        assert decision.delay_s >= retry_after


@given(base=delays, cap=delays, attempts=st.integers(min_value=2, max_value=200))
def test_delays_never_shrink_without_retry_after(base: float, cap: float, attempts: int) -> None:
    policy = RetryPolicy(base_delay_s=base, max_delay_s=cap, max_attempts=attempts + 1)
    sequence = []
    for n in range(1, attempts + 1):
        decision = policy.decide(failure(), n)
        assert isinstance(decision, RetryAfter)
        sequence.append(decision.delay_s)
    assert sequence == sorted(sequence)
    assert sequence[-1] <= cap
