"""The classifier, as a table: neutral facts in, kind / retryability / Retry-After / text out."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from chatd.domain.failure_classifier import (
    DETAIL_MAX_CHARS,
    RETRYABLE_KINDS,
    FailureFacts,
    Transport,
    classify,
    parse_retry_after,
    scrub_detail,
    user_message,
)
from chatd.domain.provider_failure import ErrorKind, ProviderFailure

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
K = ErrorKind


def http(
    status: int,
    message: str = "",
    *,
    error_type: str | None = None,
    error_code: str | None = None,
    headers: Mapping[str, str] | None = None,
    provider: str = "openai",
) -> FailureFacts:
    return FailureFacts(
        provider,
        Transport.HTTP_STATUS,
        status_code=status,
        headers=headers or {},
        error_type=error_type,
        error_code=error_code,
        message=message,
    )


def midstream(
    error_type: str | None, message: str = "", *, code: str | None = None
) -> FailureFacts:
    return FailureFacts(
        "anthropic",
        Transport.MIDSTREAM_ERROR,
        error_type=error_type,
        error_code=code,
        message=message,
    )


def run(facts: FailureFacts, secrets: tuple[str, ...] = ()) -> ProviderFailure:
    return classify(facts, now=NOW, secrets=secrets)


KIND_CASES: list[tuple[str, FailureFacts, ErrorKind]] = [
    # --- HTTP statuses ---
    (
        "429",
        http(429, "Rate limit reached for requests", error_code="rate_limit_exceeded"),
        K.RATE_LIMIT,
    ),
    (
        "429 anthropic",
        http(
            429,
            "Number of request tokens has exceeded your per-minute rate limit",
            error_type="rate_limit_error",
            provider="anthropic",
        ),
        K.RATE_LIMIT,
    ),
    (
        "429 quota exhausted is not a rate limit",
        http(
            429,
            "You exceeded your current quota, please check your plan and billing details.",
            error_type="insufficient_quota",
            error_code="insufficient_quota",
        ),
        K.AUTH,
    ),
    ("500", http(500, "The server had an error while processing your request."), K.SERVER_ERROR),
    (
        "500 anthropic api_error",
        http(500, "Internal server error", error_type="api_error"),
        K.SERVER_ERROR,
    ),
    ("500 saying overloaded", http(500, "The engine is currently overloaded"), K.OVERLOADED),
    ("502", http(502, "Bad gateway"), K.SERVER_ERROR),
    ("503", http(503, "Service Unavailable"), K.OVERLOADED),
    ("504", http(504, "Gateway timeout"), K.SERVER_ERROR),
    ("520 other 5xx", http(520, ""), K.SERVER_ERROR),
    (
        "529",
        http(529, "Overloaded", error_type="overloaded_error", provider="anthropic"),
        K.OVERLOADED,
    ),
    ("529 empty body", http(529), K.OVERLOADED),
    ("401", http(401, "Incorrect API key provided", error_code="invalid_api_key"), K.AUTH),
    ("402 billing", http(402, "credit balance too low", error_type="billing_error"), K.AUTH),
    (
        "403",
        http(403, "Your API key does not have permission", error_type="permission_error"),
        K.AUTH,
    ),
    (
        "400 context openai",
        http(
            400,
            "This model's maximum context length is 128000 tokens. However, your messages "
            "resulted in 130000 tokens.",
            error_type="invalid_request_error",
            error_code="context_length_exceeded",
        ),
        K.CONTEXT_LENGTH,
    ),
    (
        "400 context openai code only",
        http(400, "", error_code="context_length_exceeded"),
        K.CONTEXT_LENGTH,
    ),
    (
        "400 context anthropic",
        http(
            400,
            "prompt is too long: 215000 tokens > 200000 maximum",
            error_type="invalid_request_error",
            provider="anthropic",
        ),
        K.CONTEXT_LENGTH,
    ),
    (
        "400 context anthropic max_tokens",
        http(
            400,
            "input length and `max_tokens` exceed context limit: 197000 + 8192 > 200000",
            error_type="invalid_request_error",
            provider="anthropic",
        ),
        K.CONTEXT_LENGTH,
    ),
    (
        "413 request too large",
        http(413, "Request exceeds the maximum size", error_type="request_too_large"),
        K.CONTEXT_LENGTH,
    ),
    (
        "400 generic",
        http(
            400, "Unrecognized request argument supplied: foo", error_type="invalid_request_error"
        ),
        K.CONFIG,
    ),
    (
        "400 content filter azure",
        http(
            400,
            "The response was filtered due to the prompt triggering Azure OpenAI's content "
            "management policy.",
            error_code="content_filter",
        ),
        K.CONTENT_FILTER,
    ),
    (
        "400 content policy code",
        http(400, "Your request was rejected", error_code="content_policy_violation"),
        K.CONTENT_FILTER,
    ),
    ("404", http(404, "The model `gpt-9` does not exist", error_code="model_not_found"), K.CONFIG),
    ("404 anthropic", http(404, "model: claude-9", error_type="not_found_error"), K.CONFIG),
    ("408", http(408, "Request timeout"), K.TIMEOUT),
    ("409 lock contention", http(409, "Conflict"), K.SERVER_ERROR),
    ("422", http(422, "Unprocessable entity"), K.CONFIG),
    ("other 4xx", http(418, "I'm a teapot"), K.CONFIG),
    ("status below 400", http(200, "odd"), K.GENERIC),
    ("no status", FailureFacts("openai", Transport.HTTP_STATUS, message="?"), K.GENERIC),
    # --- transports ---
    ("client timeout", FailureFacts("openai", Transport.TIMEOUT, message="ReadTimeout"), K.TIMEOUT),
    ("connection", FailureFacts("openai", Transport.CONNECTION, message="refused"), K.CONNECTION),
    (
        "silence",
        FailureFacts("openai", Transport.STREAM_SILENCE, message="no data for 120 s"),
        K.STREAM_SILENCE_TIMEOUT,
    ),
    (
        "interrupted",
        FailureFacts("anthropic", Transport.STREAM_INTERRUPTED, message="no message_stop"),
        K.STREAM_INTERRUPTED,
    ),
    # --- error events inside a stream, read by type as if they were the status ---
    ("event overloaded_error", midstream("overloaded_error", "Overloaded"), K.OVERLOADED),
    ("event rate_limit_error", midstream("rate_limit_error", "Rate limited"), K.RATE_LIMIT),
    ("event api_error", midstream("api_error", "Internal server error"), K.SERVER_ERROR),
    (
        "event openai server_error",
        midstream("server_error", "The server had an error"),
        K.SERVER_ERROR,
    ),
    ("event timeout_error", midstream("timeout_error", "Timed out"), K.TIMEOUT),
    ("event authentication_error", midstream("authentication_error", "bad key"), K.AUTH),
    ("event invalid_request_error", midstream("invalid_request_error", "bad param"), K.CONFIG),
    (
        "event invalid_request_error context",
        midstream("invalid_request_error", "prompt is too long"),
        K.CONTEXT_LENGTH,
    ),
    (
        "event code wins over broad type",
        midstream("invalid_request_error", "x", code="context_length_exceeded"),
        K.CONTEXT_LENGTH,
    ),
    (
        "event rate limit text does not look like context",
        midstream("rate_limit_error", "would exceed the context window rate for your org"),
        K.RATE_LIMIT,
    ),
    (
        "event quota behind a rate-limit code",
        midstream("requests", "You exceeded your current quota", code="rate_limit_exceeded"),
        K.AUTH,
    ),
    ("event untyped saying overloaded", midstream(None, "Overloaded"), K.OVERLOADED),
    ("event unknown type", midstream("mystery_error", "???"), K.GENERIC),
    ("event content filter", midstream(None, "blocked by content filter"), K.CONTENT_FILTER),
    # --- anything else ---
    ("other", FailureFacts("openai", Transport.OTHER, message="KeyError: 'choices'"), K.GENERIC),
    (
        "other content filter",
        FailureFacts("openai", Transport.OTHER, error_code="content_filter"),
        K.CONTENT_FILTER,
    ),
]


@pytest.mark.parametrize(
    ("facts", "kind"), [(f, k) for _, f, k in KIND_CASES], ids=[n for n, _, _ in KIND_CASES]
)
def test_kind(facts: FailureFacts, kind: ErrorKind) -> None:
    failure = run(facts)
    assert failure.kind is kind
    assert failure.retryable is (kind in RETRYABLE_KINDS)
    assert failure.message == user_message(kind)
    assert failure.provider == facts.provider
    assert failure.status_code == facts.status_code


def test_every_kind_is_reachable() -> None:
    assert {k for _, _, k in KIND_CASES} == set(ErrorKind)


@pytest.mark.parametrize(
    ("kind", "retryable"),
    [
        (K.RATE_LIMIT, True),
        (K.OVERLOADED, True),
        (K.TIMEOUT, True),
        (K.STREAM_SILENCE_TIMEOUT, True),
        (K.STREAM_INTERRUPTED, True),
        (K.CONNECTION, True),
        (K.SERVER_ERROR, True),
        (K.AUTH, False),
        (K.CONFIG, False),
        (K.CONTEXT_LENGTH, False),
        (K.CONTENT_FILTER, False),
        (K.GENERIC, False),
    ],
)
def test_retryable_per_kind(kind: ErrorKind, retryable: bool) -> None:
    assert (kind in RETRYABLE_KINDS) is retryable


def test_user_messages_are_distinct_and_free_of_provider_text() -> None:
    messages = [user_message(k) for k in ErrorKind]
    assert len(set(messages)) == len(messages)
    failure = run(http(500, "UNIQUE-PROVIDER-WORDS"))
    assert "UNIQUE-PROVIDER-WORDS" not in failure.message
    assert failure.detail == "UNIQUE-PROVIDER-WORDS"


def test_the_result_survives_json() -> None:
    failure = run(http(429, "slow down", headers={"retry-after": "3"}))
    assert ProviderFailure.from_json(failure.to_json()) == failure


# --- Retry-After ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "7"}, 7.0),
        ({"Retry-After": "7"}, 7.0),
        ({"RETRY-AFTER": " 12 "}, 12.0),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": ".25"}, 0.25),
        ({"retry-after": format_datetime(NOW + timedelta(seconds=30), usegmt=True)}, 30.0),
        ({"retry-after": "Sun, 01 Jun 2025 12:02:00 GMT"}, 120.0),
        ({"retry-after": "Sun, 01 Jun 2025 14:02:00 +0200"}, 120.0),
        # A date already past: "you may retry now".
        ({"retry-after": "Sun, 01 Jun 2025 11:00:00 GMT"}, 0.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"Retry-After-Ms": "250.5"}, 0.2505),
        # Milliseconds win over seconds, whichever is longer.
        ({"retry-after": "30", "retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "1", "retry-after-ms": "30000"}, 30.0),
        # Garbage milliseconds fall back to seconds; garbage everywhere means "not said".
        ({"retry-after": "4", "retry-after-ms": "soon"}, 4.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "-5"}, None),
        ({"retry-after-ms": "-5"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "1e400"}, None),
        ({"retry-after": "1_000"}, None),
        ({"retry-after": "Sun, 99 Foo 2025 99:99:99 GMT"}, None),
    ],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, now=NOW) == (
        pytest.approx(expected) if expected is not None else None
    )


def test_retry_after_reaches_the_failure() -> None:
    failure = run(http(429, headers={"Retry-After": "20"}))
    assert failure.retry_after_s == 20.0
    assert run(http(429)).retry_after_s is None


def test_a_naive_now_is_read_as_utc() -> None:
    naive = NOW.replace(tzinfo=None)
    header = {"retry-after": "Sun, 01 Jun 2025 12:00:10 GMT"}
    assert parse_retry_after(header, now=naive) == 10.0


# --- detail ----------------------------------------------------------------------------------


def test_detail_collapses_whitespace() -> None:
    assert run(http(500, "  line one\n\n\tline   two  ")).detail == "line one line two"


def test_detail_is_truncated_with_an_ellipsis() -> None:
    detail = run(http(500, "x" * 5000)).detail
    assert len(detail) == DETAIL_MAX_CHARS
    assert detail.endswith("…")
    assert run(http(500, "y" * DETAIL_MAX_CHARS)).detail == "y" * DETAIL_MAX_CHARS


KEY = "sk-proj-Abc123DEF456ghi789JKL"
ODD_SECRET = "hunter2-correct-horse"


@pytest.mark.parametrize(
    "text",
    [
        f"Incorrect API key provided: {KEY}. You can find your API key at ...",
        f"Incorrect API key provided: {KEY[:8]}****************{KEY[-4:]}.",
        "invalid x-api-key: sk-ant-api03-Zz9_Yy8-Xx7Ww6",
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.abc.def rejected",
        'request {"api_key": "abc123secretvalue"} rejected',
        f"the key {ODD_SECRET} is not valid",
        # A secret cut by truncation must not leave its head behind.
        "z" * (DETAIL_MAX_CHARS - 5) + KEY,
    ],
)
def test_no_key_leaks(text: str) -> None:
    headers = {"authorization": f"Bearer {KEY}", "x-api-key": KEY, "retry-after": "1"}
    failure = run(http(401, text, headers=headers), secrets=(KEY, ODD_SECRET))
    rendered = repr(failure) + repr(failure.to_json())
    for leaked in (KEY, KEY[:12], KEY[-8:], ODD_SECRET, "sk-ant-api03", "abc123secretvalue"):
        assert leaked not in rendered
    assert "eyJhbGciOiJIUzI1NiJ9" not in rendered


def test_secrets_are_replaced_even_when_not_key_shaped() -> None:
    assert scrub_detail("token=ok; pass hunter2", ["hunter2"]) == "token=ok; pass [redacted]"
    assert scrub_detail("nothing to hide", [""]) == "nothing to hide"


def test_words_merely_containing_sk_are_kept() -> None:
    assert scrub_detail("task-12345678 and disk-abcdefgh") == "task-12345678 and disk-abcdefgh"
