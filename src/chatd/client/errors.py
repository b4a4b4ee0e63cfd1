"""Typed errors mapped from the API's answers: ``{"error": {code, message, field, rule}}``."""

from __future__ import annotations

from typing import Any


class ChatdError(Exception):
    """Anything the client could not do."""


class ConnectionFailed(ChatdError):
    """No answer from the server (after the retries an idempotent request gets)."""


class ApiError(ChatdError):
    """The server refused: ``status``, a stable ``code``, and when one field is at fault its
    ``field`` and the ``rule`` it breaks; ``retry_after`` (seconds) when the server said it."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        rule: str | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.rule = rule
        self.retry_after = retry_after
        self.request_id = request_id


class InvalidRequest(ApiError):
    """400: ``field`` breaks ``rule``; nothing was done."""


class Unauthorized(ApiError):
    """401: no token, or a bad or revoked one."""


class Forbidden(ApiError):
    """403: not an admin (or a foreign origin)."""


class NotFound(ApiError):
    """404: missing, or not the caller's."""


class Conflict(ApiError):
    """409: not allowed in the chat's status (or an idempotency key still in progress)."""


class PayloadTooLarge(ApiError):
    """413: the body is over the server's limit."""


class IdempotencyKeyReused(ApiError):
    """422: the Idempotency-Key was used with another request."""


class RateLimited(ApiError):
    """429: the chat's queue or mailbox is full, or too many running chats."""


class ServerError(ApiError):
    """500: a bug on the server; ``request_id`` is in its log."""


class Unavailable(ApiError):
    """503: retry shortly (``retry_after``)."""


class GatewayTimeout(ApiError):
    """504: the chat did not answer in time; the command may still be done."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: IdempotencyKeyReused,
    429: RateLimited,
    500: ServerError,
    503: Unavailable,
    504: GatewayTimeout,
}


def retry_after_of(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def api_error(status: int, body: Any, retry_after: str | None = None) -> ApiError:
    """The typed error of an HTTP answer ``status`` with the decoded JSON ``body``."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {}
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    return cls(
        status,
        str(error.get("code", "http_error")),
        str(error.get("message", f"HTTP {status}")),
        field=error.get("field"),
        rule=error.get("rule"),
        retry_after=retry_after_of(retry_after),
        request_id=error.get("request_id"),
    )
