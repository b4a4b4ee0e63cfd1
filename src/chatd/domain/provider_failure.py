"""A classified provider failure: what went wrong, whether to retry, and what to tell the user.

This is what chats store as ``last_error`` and what ``error`` / ``retry`` events carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class ErrorKind(StrEnum):
    RATE_LIMIT = "rate_limit"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    STREAM_SILENCE_TIMEOUT = "stream_silence_timeout"
    # The stream ended before its terminal event (connection cut, proxy hiccup).
    STREAM_INTERRUPTED = "stream_interrupted"
    CONNECTION = "connection"
    SERVER_ERROR = "server_error"
    AUTH = "auth"
    # The request cannot succeed as configured: unknown model, bad parameters, no such endpoint.
    CONFIG = "config"
    CONTEXT_LENGTH = "context_length"
    CONTENT_FILTER = "content_filter"
    GENERIC = "generic"


@dataclass(frozen=True, slots=True)
class ProviderFailure:
    kind: ErrorKind
    provider: str
    status_code: int | None
    retryable: bool
    # Seconds the provider asked us to wait (Retry-After / retry-after-ms), if it said.
    retry_after_s: float | None
    # Fixed per kind, safe to show to the user.
    message: str
    # The provider's own words, truncated and scrubbed of secrets; for operators.
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "provider": self.provider,
            "status_code": self.status_code,
            "retryable": self.retryable,
            "retry_after_s": self.retry_after_s,
            "message": self.message,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProviderFailure:
        return cls(
            kind=ErrorKind(data["kind"]),
            provider=str(data["provider"]),
            status_code=data.get("status_code"),
            retryable=bool(data["retryable"]),
            retry_after_s=data.get("retry_after_s"),
            message=str(data["message"]),
            detail=str(data.get("detail", "")),
        )
