"""Real SDK, httpx2 and chatd exceptions, mapped end to end through ``provider_error``.

The exceptions are built the way the installed SDKs build them: status errors from an
``httpx2.Response`` with the body shape each SDK passes (openai: the inner ``error`` object;
anthropic: the whole body), stream error events as each SDK's ``_streaming`` module raises them
(openai: a bare ``APIError``; anthropic: an ``APIStatusError`` on the stream's 200 response),
and transport failures chained to their httpx2 cause. A second table drives both SDK clients
over ``httpx2.MockTransport`` so the SDKs pick the exception classes themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from chatd.domain.provider_failure import ErrorKind
from chatd.providers.errors import StreamInterrupted, StreamSilence
from chatd.providers.failure_facts import StreamErrorEvent, facts_from_exception, provider_error

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
OPENAI_URL = "https://api.openai.com/v1/chat/completions"
ANTHROPIC_URL = "https://api.anthropic.com/v1/messages"
OPENAI_KEY = "sk-proj-0penAIsecretKEY1234567890"
ANTHROPIC_KEY = "sk-ant-api03-AnthropicSecretKey_0987654321"
K = ErrorKind


def _request(url: str) -> httpx2.Request:
    return httpx2.Request("POST", url)


def _response(url: str, status: int, headers: dict[str, str] | None = None) -> httpx2.Response:
    return httpx2.Response(status, headers=headers or {}, request=_request(url))


def oai(
    cls: type[openai.APIStatusError],
    status: int,
    error: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> openai.APIStatusError:
    """As ``AsyncOpenAI._make_status_error``: the body passed is the inner ``error`` object."""
    message = f"Error code: {status}" + (f" - {error['message']}" if error else "")
    return cls(message, response=_response(OPENAI_URL, status, headers), body=error)


def ant(
    cls: type[anthropic.APIStatusError],
    status: int,
    error_type: str | None = None,
    message: str = "",
    headers: dict[str, str] | None = None,
) -> anthropic.APIStatusError:
    """As ``anthropic.make_status_error``: the whole ``{"type": "error", ...}`` body."""
    body = (
        {"type": "error", "error": {"type": error_type, "message": message}} if error_type else None
    )
    return cls(
        f"Error code: {status} - {body}",
        response=_response(ANTHROPIC_URL, status, headers),
        body=body,
    )


def ant_stream_error(error_type: str, message: str) -> anthropic.APIStatusError:
    """As anthropic's ``AsyncStream`` on an ``event: error``: built on the 200 response."""
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    return anthropic.APIStatusError(f"{body}", response=_response(ANTHROPIC_URL, 200), body=body)


def oai_stream_error(error: dict[str, Any]) -> openai.APIError:
    """As openai's ``AsyncStream`` on a chunk carrying ``error``."""
    return openai.APIError(error["message"], _request(OPENAI_URL), body=error)


def chained(outer: Exception, cause: Exception) -> Exception:
    """``raise outer from cause``, as the SDKs wrap httpx2 errors."""
    outer.__cause__ = cause
    return outer


def oerr(message: str, type_: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": type_, "param": None, "code": code}


OREQ = _request(OPENAI_URL)
AREQ = _request(ANTHROPIC_URL)
INCOMPLETE = (
    "peer closed connection without sending complete message body (incomplete chunked read)"
)

# (id, exception factory, expected kind, expected status, expected retry_after_s)
CASES: list[tuple[str, Callable[[], BaseException], ErrorKind, int | None, float | None]] = [
    # --- openai: HTTP statuses ---
    (
        "openai 429 retry-after-ms",
        lambda: oai(
            openai.RateLimitError,
            429,
            oerr("Rate limit reached for requests", "requests", "rate_limit_exceeded"),
            {"retry-after-ms": "1500", "retry-after": "2"},
        ),
        K.RATE_LIMIT,
        429,
        1.5,
    ),
    (
        "openai 429 quota",
        lambda: oai(
            openai.RateLimitError,
            429,
            oerr("You exceeded your current quota", "insufficient_quota", "insufficient_quota"),
        ),
        K.AUTH,
        429,
        None,
    ),
    (
        "openai 500",
        lambda: oai(
            openai.InternalServerError, 500, oerr("The server had an error", "server_error")
        ),
        K.SERVER_ERROR,
        500,
        None,
    ),
    ("openai 502", lambda: oai(openai.InternalServerError, 502), K.SERVER_ERROR, 502, None),
    (
        "openai 503",
        lambda: oai(openai.InternalServerError, 503, headers={"Retry-After": "5"}),
        K.OVERLOADED,
        503,
        5.0,
    ),
    ("openai 504", lambda: oai(openai.InternalServerError, 504), K.SERVER_ERROR, 504, None),
    (
        "openai 401",
        lambda: oai(
            openai.AuthenticationError,
            401,
            oerr(
                f"Incorrect API key provided: {OPENAI_KEY}.",
                "invalid_request_error",
                "invalid_api_key",
            ),
        ),
        K.AUTH,
        401,
        None,
    ),
    (
        "openai 403",
        lambda: oai(openai.PermissionDeniedError, 403, oerr("Country not supported")),
        K.AUTH,
        403,
        None,
    ),
    (
        "openai 400 context length",
        lambda: oai(
            openai.BadRequestError,
            400,
            oerr(
                "This model's maximum context length is 8192 tokens.",
                "invalid_request_error",
                "context_length_exceeded",
            ),
        ),
        K.CONTEXT_LENGTH,
        400,
        None,
    ),
    (
        "openai 400 generic",
        lambda: oai(
            openai.BadRequestError,
            400,
            oerr("Invalid value for 'temperature'", "invalid_request_error"),
        ),
        K.CONFIG,
        400,
        None,
    ),
    (
        "openai 400 content filter",
        lambda: oai(
            openai.BadRequestError,
            400,
            oerr("The prompt triggered the content management policy.", None, "content_filter"),
        ),
        K.CONTENT_FILTER,
        400,
        None,
    ),
    (
        "openai 404",
        lambda: oai(
            openai.NotFoundError, 404, oerr("The model `x` does not exist", None, "model_not_found")
        ),
        K.CONFIG,
        404,
        None,
    ),
    ("openai 408", lambda: oai(openai.APIStatusError, 408), K.TIMEOUT, 408, None),
    ("openai 409", lambda: oai(openai.ConflictError, 409), K.SERVER_ERROR, 409, None),
    (
        "openai 422",
        lambda: oai(openai.UnprocessableEntityError, 422, oerr("Unprocessable")),
        K.CONFIG,
        422,
        None,
    ),
    # --- openai: transport ---
    ("openai timeout", lambda: openai.APITimeoutError(request=OREQ), K.TIMEOUT, None, None),
    (
        "openai timeout from ReadTimeout",
        lambda: chained(
            openai.APITimeoutError(request=OREQ), httpx2.ReadTimeout("timed out", request=OREQ)
        ),
        K.TIMEOUT,
        None,
        None,
    ),
    (
        "openai connection refused",
        lambda: chained(
            openai.APIConnectionError(request=OREQ),
            httpx2.ConnectError("[Errno 111] Connection refused", request=OREQ),
        ),
        K.CONNECTION,
        None,
        None,
    ),
    (
        "openai connection, no cause",
        lambda: openai.APIConnectionError(request=OREQ),
        K.CONNECTION,
        None,
        None,
    ),
    (
        "openai body cut mid-stream",
        lambda: chained(
            openai.APIConnectionError(request=OREQ),
            httpx2.RemoteProtocolError(INCOMPLETE, request=OREQ),
        ),
        K.STREAM_INTERRUPTED,
        None,
        None,
    ),
    # --- openai: error events inside the stream ---
    (
        "openai stream server_error",
        lambda: oai_stream_error(oerr("The server had an error while processing", "server_error")),
        K.SERVER_ERROR,
        None,
        None,
    ),
    (
        "openai stream rate limit",
        lambda: oai_stream_error(oerr("Rate limit reached", "tokens", "rate_limit_exceeded")),
        K.RATE_LIMIT,
        None,
        None,
    ),
    (
        "openai stream without type",
        lambda: oai_stream_error({"message": "An error occurred during streaming"}),
        K.GENERIC,
        None,
        None,
    ),
    (
        "openai content filter finish",
        openai.ContentFilterFinishReasonError,
        K.CONTENT_FILTER,
        None,
        None,
    ),
    (
        "openai invalid response",
        lambda: openai.APIResponseValidationError(_response(OPENAI_URL, 200), body={"x": 1}),
        K.GENERIC,
        None,
        None,
    ),
    # --- anthropic: HTTP statuses ---
    (
        "anthropic 429 retry-after",
        lambda: ant(
            anthropic.RateLimitError, 429, "rate_limit_error", "Rate limited", {"retry-after": "10"}
        ),
        K.RATE_LIMIT,
        429,
        10.0,
    ),
    (
        "anthropic OverloadedError 529",
        lambda: ant(anthropic.OverloadedError, 529, "overloaded_error", "Overloaded"),
        K.OVERLOADED,
        529,
        None,
    ),
    (
        "anthropic plain APIStatusError 529",
        lambda: ant(anthropic.APIStatusError, 529, "overloaded_error", "Overloaded"),
        K.OVERLOADED,
        529,
        None,
    ),
    (
        "anthropic 529 no body",
        lambda: ant(anthropic.InternalServerError, 529),
        K.OVERLOADED,
        529,
        None,
    ),
    (
        "anthropic 500",
        lambda: ant(anthropic.InternalServerError, 500, "api_error", "Internal server error"),
        K.SERVER_ERROR,
        500,
        None,
    ),
    (
        "anthropic 503",
        lambda: ant(anthropic.ServiceUnavailableError, 503),
        K.OVERLOADED,
        503,
        None,
    ),
    (
        "anthropic 504",
        lambda: ant(anthropic.GatewayTimeoutError, 504, "timeout_error", "Gateway timeout"),
        K.SERVER_ERROR,
        504,
        None,
    ),
    (
        "anthropic 401",
        lambda: ant(
            anthropic.AuthenticationError, 401, "authentication_error", "invalid x-api-key"
        ),
        K.AUTH,
        401,
        None,
    ),
    (
        "anthropic 403",
        lambda: ant(anthropic.PermissionDeniedError, 403, "permission_error", "no access"),
        K.AUTH,
        403,
        None,
    ),
    (
        "anthropic 400 prompt too long",
        lambda: ant(
            anthropic.BadRequestError,
            400,
            "invalid_request_error",
            "prompt is too long: 210000 tokens > 200000 maximum",
        ),
        K.CONTEXT_LENGTH,
        400,
        None,
    ),
    (
        "anthropic 400 generic",
        lambda: ant(
            anthropic.BadRequestError, 400, "invalid_request_error", "max_tokens: Field required"
        ),
        K.CONFIG,
        400,
        None,
    ),
    (
        "anthropic 404",
        lambda: ant(anthropic.NotFoundError, 404, "not_found_error", "model: claude-x"),
        K.CONFIG,
        404,
        None,
    ),
    (
        "anthropic 408",
        lambda: ant(anthropic.RequestTimeoutError, 408),
        K.TIMEOUT,
        408,
        None,
    ),
    (
        "anthropic 413",
        lambda: ant(anthropic.ContentTooLargeError, 413, "request_too_large", "Request too large"),
        K.CONTEXT_LENGTH,
        413,
        None,
    ),
    (
        "anthropic 422",
        lambda: ant(anthropic.UnprocessableEntityError, 422),
        K.CONFIG,
        422,
        None,
    ),
    # --- anthropic: transport ---
    ("anthropic timeout", lambda: anthropic.APITimeoutError(request=AREQ), K.TIMEOUT, None, None),
    (
        "anthropic connection refused",
        lambda: chained(
            anthropic.APIConnectionError(request=AREQ),
            httpx2.ConnectError("[Errno 111] Connection refused", request=AREQ),
        ),
        K.CONNECTION,
        None,
        None,
    ),
    # --- anthropic: error events inside the stream ---
    (
        "anthropic stream overloaded_error",
        lambda: ant_stream_error("overloaded_error", "Overloaded"),
        K.OVERLOADED,
        None,
        None,
    ),
    (
        "anthropic stream rate_limit_error",
        lambda: ant_stream_error("rate_limit_error", "Rate limited"),
        K.RATE_LIMIT,
        None,
        None,
    ),
    (
        "anthropic stream api_error",
        lambda: ant_stream_error("api_error", "Internal server error"),
        K.SERVER_ERROR,
        None,
        None,
    ),
    (
        "anthropic stream invalid_request_error",
        lambda: ant_stream_error("invalid_request_error", "bad"),
        K.CONFIG,
        None,
        None,
    ),
    # --- raw httpx2 (anthropic lets these through mid-stream) ---
    (
        "httpx2 ReadTimeout",
        lambda: httpx2.ReadTimeout("timed out", request=AREQ),
        K.TIMEOUT,
        None,
        None,
    ),
    (
        "httpx2 ConnectTimeout",
        lambda: httpx2.ConnectTimeout("t", request=AREQ),
        K.TIMEOUT,
        None,
        None,
    ),
    ("httpx2 PoolTimeout", lambda: httpx2.PoolTimeout("t", request=AREQ), K.TIMEOUT, None, None),
    ("httpx2 WriteTimeout", lambda: httpx2.WriteTimeout("t", request=AREQ), K.TIMEOUT, None, None),
    (
        "httpx2 ConnectError",
        lambda: httpx2.ConnectError("refused", request=AREQ),
        K.CONNECTION,
        None,
        None,
    ),
    (
        "httpx2 ReadError",
        lambda: httpx2.ReadError("reset by peer", request=AREQ),
        K.CONNECTION,
        None,
        None,
    ),
    ("httpx2 ProxyError", lambda: httpx2.ProxyError("proxy said no"), K.CONNECTION, None, None),
    (
        "httpx2 body cut",
        lambda: httpx2.RemoteProtocolError(INCOMPLETE, request=AREQ),
        K.STREAM_INTERRUPTED,
        None,
        None,
    ),
    (
        "httpx2 disconnect before response",
        lambda: httpx2.RemoteProtocolError("Server disconnected without sending a response."),
        K.CONNECTION,
        None,
        None,
    ),
    (
        "httpx2 unsupported protocol",
        lambda: httpx2.UnsupportedProtocol("Request URL has an unsupported protocol 'ftp://'."),
        K.GENERIC,
        None,
        None,
    ),
    (
        "httpx2 HTTPStatusError 503",
        lambda: httpx2.HTTPStatusError(
            "503", request=AREQ, response=_response(ANTHROPIC_URL, 503, {"retry-after": "3"})
        ),
        K.OVERLOADED,
        503,
        3.0,
    ),
    # --- chatd's own ---
    (
        "silence before first chunk",
        lambda: StreamSilence(120.0, before_first_chunk=True),
        K.STREAM_SILENCE_TIMEOUT,
        None,
        None,
    ),
    (
        "silence between chunks",
        lambda: StreamSilence(120.0, before_first_chunk=False),
        K.STREAM_SILENCE_TIMEOUT,
        None,
        None,
    ),
    (
        "stream interrupted",
        lambda: StreamInterrupted("the stream ended before message_stop"),
        K.STREAM_INTERRUPTED,
        None,
        None,
    ),
    (
        "fast path error event",
        lambda: StreamErrorEvent("overloaded_error", "Overloaded"),
        K.OVERLOADED,
        None,
        None,
    ),
    (
        "fast path error event context",
        lambda: StreamErrorEvent(
            "invalid_request_error", "x", error_code="context_length_exceeded"
        ),
        K.CONTEXT_LENGTH,
        None,
        None,
    ),
    # --- anything else ---
    ("builtin TimeoutError", lambda: TimeoutError("slow"), K.TIMEOUT, None, None),
    ("ConnectionResetError", lambda: ConnectionResetError("reset"), K.CONNECTION, None, None),
    ("a bug", lambda: KeyError("choices"), K.GENERIC, None, None),
    (
        "a nursery's group of one",
        lambda: ExceptionGroup("g", [httpx2.ReadTimeout("t", request=AREQ)]),
        K.TIMEOUT,
        None,
        None,
    ),
    (
        "a group of two",
        lambda: ExceptionGroup("g", [ValueError("a"), ValueError("b")]),
        K.GENERIC,
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    ("make", "kind", "status", "retry_after"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_exception_maps_to_kind(
    make: Callable[[], BaseException],
    kind: ErrorKind,
    status: int | None,
    retry_after: float | None,
) -> None:
    error = provider_error(make(), "prov", secrets=(OPENAI_KEY, ANTHROPIC_KEY), now=NOW)
    failure = error.failure
    assert failure.kind is kind
    assert failure.status_code == status
    assert failure.retry_after_s == retry_after
    assert failure.provider == "prov"
    assert kind.value in str(error)


def test_provider_text_goes_to_detail() -> None:
    exc = ant(anthropic.BadRequestError, 400, "invalid_request_error", "max_tokens:\n  required")
    failure = provider_error(exc, "anthropic", now=NOW).failure
    assert failure.detail == "max_tokens: required"
    assert "max_tokens" not in failure.message


def test_mid_stream_status_200_is_not_reported_as_a_status() -> None:
    facts = facts_from_exception(ant_stream_error("overloaded_error", "Overloaded"), "anthropic")
    assert facts.status_code is None
    assert facts.error_type == "overloaded_error"


def test_an_http_date_retry_after_is_read_against_now() -> None:
    exc = oai(openai.RateLimitError, 429, headers={"retry-after": "Sun, 01 Jun 2025 12:00:45 GMT"})
    assert provider_error(exc, "openai", now=NOW).failure.retry_after_s == 45.0


def test_no_key_leaks_from_any_field() -> None:
    headers = {"authorization": f"Bearer {OPENAI_KEY}", "x-api-key": ANTHROPIC_KEY}
    exc = oai(
        openai.AuthenticationError,
        401,
        oerr(
            f"Incorrect API key provided: {OPENAI_KEY}; also tried {ANTHROPIC_KEY} and "
            "Bearer some-session-token",
            "invalid_request_error",
            "invalid_api_key",
        ),
        headers,
    )
    error = provider_error(exc, "openai", secrets=(OPENAI_KEY,), now=NOW)
    rendered = f"{error} {error.failure!r} {error.failure.to_json()!r}"
    for secret in (OPENAI_KEY, ANTHROPIC_KEY, OPENAI_KEY[-10:], "some-session-token"):
        assert secret not in rendered
    assert "[redacted]" in error.failure.detail


def test_a_secret_that_does_not_look_like_a_key_is_redacted() -> None:
    exc = StreamErrorEvent("api_error", "failed for key hunter2-corp-token")
    failure = provider_error(exc, "custom", secrets=("hunter2-corp-token",), now=NOW).failure
    assert "hunter2" not in failure.detail
