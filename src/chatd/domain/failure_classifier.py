"""Turn the neutral facts of a provider failure into a classified ``ProviderFailure``.

Pure: no I/O and no SDK imports. ``chatd.providers.failure_facts`` extracts the facts from SDK
and transport exceptions; everything that decides a kind, whether to retry, how long the
provider asked us to wait and what may be shown lives here, so it can be tested as a table.

The kind decides retryability (``RETRYABLE_KINDS``); every kind has one fixed user-facing
message. The provider's own words go to ``detail`` only, whitespace-collapsed, scrubbed of
secrets and anything shaped like an API key, and truncated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import assert_never

from chatd.domain.provider_failure import ErrorKind, ProviderFailure

DETAIL_MAX_CHARS = 500
REDACTED = "[redacted]"


class Transport(StrEnum):
    """How the failure reached us, before any reading of status codes or provider text."""

    HTTP_STATUS = "http_status"
    """The provider answered with an HTTP error status (4xx / 5xx)."""
    TIMEOUT = "timeout"
    """A client-side timeout: connect, read, write or pool."""
    CONNECTION = "connection"
    """The provider could not be reached, or the connection failed before a response."""
    STREAM_SILENCE = "stream_silence"
    """chatd's silence guard gave up on a stream that sent nothing for too long."""
    STREAM_INTERRUPTED = "stream_interrupted"
    """The stream ended (or the body was cut) before the provider's terminal event."""
    MIDSTREAM_ERROR = "midstream_error"
    """The stream itself carried an error event (HTTP status was 200)."""
    OTHER = "other"
    """Anything else: an unexpected exception, a response that failed validation."""


@dataclass(frozen=True, slots=True)
class FailureFacts:
    """What is known about one failure, independent of which SDK or transport raised it."""

    provider: str
    transport: Transport
    status_code: int | None = None
    # Response headers; looked up case-insensitively. Never copied into the result.
    headers: Mapping[str, str] = field(default_factory=dict)
    # The provider's machine-readable error type / code, e.g. Anthropic ``overloaded_error``,
    # OpenAI type ``invalid_request_error`` with code ``context_length_exceeded``.
    error_type: str | None = None
    error_code: str | None = None
    # The provider's human-readable message (or the exception text); becomes ``detail``.
    message: str = ""


RETRYABLE_KINDS = frozenset(
    {
        ErrorKind.RATE_LIMIT,
        ErrorKind.OVERLOADED,
        ErrorKind.TIMEOUT,
        ErrorKind.STREAM_SILENCE_TIMEOUT,
        ErrorKind.STREAM_INTERRUPTED,
        ErrorKind.CONNECTION,
        ErrorKind.SERVER_ERROR,
    }
)
"""Kinds a later attempt may fix. ``generic`` is deliberately not here: what we cannot
recognise is most often a bug (ours, or an SDK/schema mismatch) that every retry would repeat
for the ~20 minutes 25 attempts take; stopping at once puts it in ``last_error`` for an operator.
"""


def user_message(kind: ErrorKind) -> str:  # noqa: PLR0911, PLR0912 - one case per kind
    """The fixed, user-facing sentence for a kind: no provider text, so nothing can leak."""
    match kind:
        case ErrorKind.RATE_LIMIT:
            return "The AI provider is receiving too many requests right now."
        case ErrorKind.OVERLOADED:
            return "The AI provider is overloaded right now."
        case ErrorKind.TIMEOUT:
            return "The AI provider took too long to respond."
        case ErrorKind.STREAM_SILENCE_TIMEOUT:
            return "The AI provider stopped sending the answer for too long."
        case ErrorKind.STREAM_INTERRUPTED:
            return "The connection to the AI provider broke off before the answer was complete."
        case ErrorKind.CONNECTION:
            return "chatd could not connect to the AI provider."
        case ErrorKind.SERVER_ERROR:
            return "The AI provider had an internal error."
        case ErrorKind.AUTH:
            return (
                "The AI provider rejected chatd's credentials or account. An administrator "
                "needs to check the provider's API key, permissions and billing."
            )
        case ErrorKind.CONFIG:
            return (
                "The AI provider rejected the request as configured (for example an unknown "
                "model or an unsupported parameter)."
            )
        case ErrorKind.CONTEXT_LENGTH:
            return "The conversation is too long for this model's context window."
        case ErrorKind.CONTENT_FILTER:
            return "The AI provider's content filter blocked this request."
        case ErrorKind.GENERIC:
            return "Something went wrong while talking to the AI provider."
        case _:
            assert_never(kind)


def classify(facts: FailureFacts, *, now: datetime, secrets: Iterable[str] = ()) -> ProviderFailure:
    """Classify ``facts``. ``now`` resolves an HTTP-date Retry-After; ``secrets`` (the API key
    in use, say) are replaced by ``[redacted]`` wherever they appear in the detail."""
    kind = _kind(facts)
    return ProviderFailure(
        kind=kind,
        provider=facts.provider,
        status_code=facts.status_code,
        retryable=kind in RETRYABLE_KINDS,
        retry_after_s=parse_retry_after(facts.headers, now=now),
        message=user_message(kind),
        detail=scrub_detail(facts.message, secrets),
    )


# --- kinds -----------------------------------------------------------------------------------

# Error types / codes as both providers spell them (Anthropic types, OpenAI types and codes),
# lower-cased. An error event inside a stream is read through this table as if it were a status.
_TYPE_KINDS: Mapping[str, ErrorKind] = {
    "overloaded_error": ErrorKind.OVERLOADED,
    "overloaded": ErrorKind.OVERLOADED,
    "service_unavailable": ErrorKind.OVERLOADED,
    "rate_limit_error": ErrorKind.RATE_LIMIT,
    "rate_limit_exceeded": ErrorKind.RATE_LIMIT,
    "api_error": ErrorKind.SERVER_ERROR,
    "server_error": ErrorKind.SERVER_ERROR,
    "internal_server_error": ErrorKind.SERVER_ERROR,
    "internal_error": ErrorKind.SERVER_ERROR,
    "timeout_error": ErrorKind.TIMEOUT,
    "timeout": ErrorKind.TIMEOUT,
    "authentication_error": ErrorKind.AUTH,
    "permission_error": ErrorKind.AUTH,
    "invalid_api_key": ErrorKind.AUTH,
    "billing_error": ErrorKind.AUTH,
    "insufficient_quota": ErrorKind.AUTH,
    "not_found_error": ErrorKind.CONFIG,
    "model_not_found": ErrorKind.CONFIG,
    "invalid_request_error": ErrorKind.CONFIG,
    "request_too_large": ErrorKind.CONTEXT_LENGTH,
    "context_length_exceeded": ErrorKind.CONTEXT_LENGTH,
    "content_filter": ErrorKind.CONTENT_FILTER,
    "content_policy_violation": ErrorKind.CONTENT_FILTER,
}

_CONTEXT_LENGTH_TEXT = re.compile(
    r"maximum context length|context[ _]length|context window|context limit"
    r"|prompt is too long|input is too long|too many (?:input )?tokens",
    re.IGNORECASE,
)
_CONTENT_FILTER_TEXT = re.compile(
    r"content[ _]filter|content[ _]management[ _]policy|content[ _]policy|responsibleaipolicy",
    re.IGNORECASE,
)
_OVERLOADED_TEXT = re.compile(r"overloaded", re.IGNORECASE)
# OpenAI answers 429 both for "slow down" and for "your quota / billing is exhausted"; only the
# first goes away by waiting.
_QUOTA_TEXT = re.compile(r"insufficient_quota|exceeded your current quota", re.IGNORECASE)


def _kind(facts: FailureFacts) -> ErrorKind:  # noqa: PLR0911 - one case per transport
    match facts.transport:
        case Transport.TIMEOUT:
            return ErrorKind.TIMEOUT
        case Transport.CONNECTION:
            return ErrorKind.CONNECTION
        case Transport.STREAM_SILENCE:
            return ErrorKind.STREAM_SILENCE_TIMEOUT
        case Transport.STREAM_INTERRUPTED:
            return ErrorKind.STREAM_INTERRUPTED
        case Transport.HTTP_STATUS:
            if facts.status_code is None or not 400 <= facts.status_code <= 599:
                return _from_signs(facts)
            return _from_status(facts.status_code, facts)
        case Transport.MIDSTREAM_ERROR | Transport.OTHER:
            return _from_signs(facts)
        case _:
            assert_never(facts.transport)


# Statuses whose meaning does not depend on the body.
_STATUS_KINDS: Mapping[int, ErrorKind] = {
    401: ErrorKind.AUTH,
    402: ErrorKind.AUTH,  # payment required: the account, not the request
    403: ErrorKind.AUTH,
    408: ErrorKind.TIMEOUT,
    # Both SDKs retry 409 by default: the providers use it for transient lock contention.
    409: ErrorKind.SERVER_ERROR,
    413: ErrorKind.CONTEXT_LENGTH,  # a request body too large means a conversation too long
    503: ErrorKind.OVERLOADED,
    529: ErrorKind.OVERLOADED,
}


def _from_status(status: int, facts: FailureFacts) -> ErrorKind:
    if (fixed := _STATUS_KINDS.get(status)) is not None:
        return fixed
    if status == 429:
        return ErrorKind.AUTH if _is_quota(facts) else ErrorKind.RATE_LIMIT
    if status >= 500:
        return ErrorKind.OVERLOADED if _says_overloaded(facts) else ErrorKind.SERVER_ERROR
    # 400, 404, 422 and every other 4xx: the request itself is wrong, unless it says why.
    if _is_content_filter(facts):
        return ErrorKind.CONTENT_FILTER
    if _is_context_length(facts):
        return ErrorKind.CONTEXT_LENGTH
    return ErrorKind.CONFIG


def _from_signs(facts: FailureFacts) -> ErrorKind:  # noqa: PLR0911 - an ordered rule list
    """No usable HTTP status (an error event in a stream, an odd exception): read the error
    code, then the type, as a status would be read; refine a bare "bad request" by its text."""
    by_type = _type_kind(facts)
    if by_type in (None, ErrorKind.CONFIG):
        if _is_content_filter(facts):
            return ErrorKind.CONTENT_FILTER
        if _is_context_length(facts):
            return ErrorKind.CONTEXT_LENGTH
    if by_type is ErrorKind.RATE_LIMIT and _is_quota(facts):
        return ErrorKind.AUTH
    if by_type is not None:
        return by_type
    if _is_quota(facts):
        return ErrorKind.AUTH
    if _says_overloaded(facts):
        return ErrorKind.OVERLOADED
    return ErrorKind.GENERIC


def _type_kind(facts: FailureFacts) -> ErrorKind | None:
    # The code first: OpenAI pairs a broad type with a precise code
    # (invalid_request_error / context_length_exceeded).
    for token in (facts.error_code, facts.error_type):
        if token and (kind := _TYPE_KINDS.get(token.strip().lower())) is not None:
            return kind
    return None


def _tokens(facts: FailureFacts) -> tuple[str, ...]:
    return tuple(t.strip().lower() for t in (facts.error_type, facts.error_code) if t)


def _is_content_filter(facts: FailureFacts) -> bool:
    tokens = _tokens(facts)
    if any(_TYPE_KINDS.get(t) is ErrorKind.CONTENT_FILTER for t in tokens):
        return True
    return _CONTENT_FILTER_TEXT.search(facts.message) is not None


def _is_context_length(facts: FailureFacts) -> bool:
    tokens = _tokens(facts)
    if any(_TYPE_KINDS.get(t) is ErrorKind.CONTEXT_LENGTH for t in tokens):
        return True
    return _CONTEXT_LENGTH_TEXT.search(facts.message) is not None


def _is_quota(facts: FailureFacts) -> bool:
    return "insufficient_quota" in _tokens(facts) or _QUOTA_TEXT.search(facts.message) is not None


def _says_overloaded(facts: FailureFacts) -> bool:
    tokens = _tokens(facts)
    if any(_TYPE_KINDS.get(t) is ErrorKind.OVERLOADED for t in tokens):
        return True
    return _OVERLOADED_TEXT.search(facts.message) is not None


# --- Retry-After -----------------------------------------------------------------------------

_SECONDS = re.compile(r"\d+(?:\.\d+)?|\.\d+")


def parse_retry_after(headers: Mapping[str, str], *, now: datetime) -> float | None:
    """Seconds the provider asked us to wait, or None when it did not say (usably).

    ``retry-after-ms`` (OpenAI, Anthropic) wins when valid: it is the more precise of the two.
    ``retry-after`` is delta-seconds (fractions accepted) or an HTTP date, read against ``now``;
    a date already past gives 0.0 ("you may retry now", which is what the provider said).
    Negative, non-finite and unparsable values are ignored, as if the header were absent.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    millis = _parse_seconds(lowered.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000.0
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    seconds = _parse_seconds(raw)
    if seconds is not None:
        return seconds
    return _parse_http_date(raw, now)


def _parse_seconds(raw: str | None) -> float | None:
    if raw is None:
        return None
    text = raw.strip()
    # A strict shape, not float(): float() also takes "inf", "nan", "1e400", "-3" and "1_0".
    if _SECONDS.fullmatch(text) is None:
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _parse_http_date(raw: str, now: datetime) -> float | None:
    try:
        when = parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone: HTTP dates are always GMT.
        when = when.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


# --- detail ----------------------------------------------------------------------------------

# Anything shaped like a credential, whoever's it is: OpenAI / Anthropic keys (also masked as
# OpenAI prints them, "sk-proj-****abcd"), bearer tokens, and key=value / "key": "value" pairs.
_KEY_PATTERNS = (
    re.compile(r"\bsk-[A-Za-z0-9_\-*.]{4,}"),
    re.compile(r"(\bBearer\s+)[^\s\"',;]+", re.IGNORECASE),
    re.compile(
        r"""((?:api[_-]?key|x-api-key|access[_-]?token|authorization)["']?\s*[:=]\s*["']?)"""
        r"""[^\s"',;]+""",
        re.IGNORECASE,
    ),
)


def scrub_detail(text: str, secrets: Iterable[str] = (), *, limit: int = DETAIL_MAX_CHARS) -> str:
    """Collapse whitespace, redact ``secrets`` and key-shaped tokens, then truncate.

    Redaction comes before truncation, so a cut can never leave the head of a secret behind.
    """
    collapsed = " ".join(text.split())
    wanted = {" ".join(s.split()) for s in secrets}
    for secret in sorted((s for s in wanted if s), key=len, reverse=True):
        collapsed = collapsed.replace(secret, REDACTED)
    for pattern in _KEY_PATTERNS:
        collapsed = pattern.sub(
            lambda m: (m.group(1) if m.groups() else "") + REDACTED,
            collapsed,
        )
    if len(collapsed) > limit:
        collapsed = collapsed[: limit - 1].rstrip() + "…"
    return collapsed
