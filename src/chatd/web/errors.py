"""Every refusal the edge can answer, mapped to HTTP in this one place.

A 4xx body names what is wrong (``field`` and ``rule`` when one field is at fault); a 5xx body
carries only a request id, which is also in the log next to the traceback.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping

import msgspec
from quart import (
    Quart,
    Response,
    current_app,
    has_app_context,
    has_request_context,
    has_websocket_context,
    request,
    websocket,
)
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from chatd.actors.errors import ActorDead, AskTimeout, MailboxFull, NotOwner
from chatd.actors.hub import CursorError
from chatd.domain.effects import (
    InvalidCommand,
    QueueFull,
    RunningChatsLimit,
    TransitionNotAllowed,
    UnknownTarget,
)
from chatd.store.database import DatabaseUnavailable
from chatd.store.errors import Conflict, Fenced, NotFound

log = logging.getLogger(__name__)

_RETRY_SOON = {"Retry-After": "1"}


class ApiError(Exception):
    """A refusal with its HTTP status; ``code`` is a stable machine-readable name."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        rule: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.rule = rule
        self.headers = dict(headers or {})

    @classmethod
    def invalid(cls, field: str, rule: str) -> ApiError:
        """400: ``field`` breaks ``rule``; nothing was done."""
        return cls(400, "invalid_request", f"{field}: {rule}", field=field, rule=rule)

    @classmethod
    def not_found(cls, what: str) -> ApiError:
        """404, the same for a missing row and for someone else's."""
        return cls(404, "not_found", f"{what} not found")


class ErrorBody(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    field: str | None = None
    rule: str | None = None
    request_id: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


def api_error_for(exc: BaseException) -> ApiError | None:  # noqa: PLR0911, PLR0912 - one case per kind
    """The HTTP answer to a known refusal; ``None`` for an unexpected failure (a 500)."""
    match exc:
        case ApiError():
            return exc
        case InvalidCommand(field=field, rule=rule):
            return ApiError.invalid(field, rule)
        case CursorError(field=field):
            return ApiError.invalid(field, str(exc).removeprefix(f"{field}: "))
        case TransitionNotAllowed():
            return ApiError(409, "conflict", str(exc))
        case QueueFull():
            return ApiError(429, "queue_full", str(exc))
        case RunningChatsLimit():
            # No Retry-After: when a run ends is the model's business; the watch feed says it.
            return ApiError(429, "max_running_chats_per_user", str(exc))
        case UnknownTarget(what=what):
            return ApiError.not_found(what)
        case NotFound(kind=kind):
            return ApiError.not_found(kind)
        case Conflict():
            return ApiError(409, "conflict", str(exc))
        case MailboxFull():
            return ApiError(429, "busy", "the chat is busy; retry shortly", headers=_RETRY_SOON)
        case AskTimeout():
            return ApiError(
                504, "timeout", "the chat did not answer in time; the command may still be done"
            )
        case ActorDead() | NotOwner() | Fenced() | DatabaseUnavailable():
            return ApiError(
                503, "unavailable", "temporarily unavailable; retry shortly", headers=_RETRY_SOON
            )
        case MethodNotAllowed(valid_methods=methods):
            allow = ", ".join(sorted(methods or ()))
            return ApiError(
                405,
                "method_not_allowed",
                f"{_method()} is not allowed here; the route allows {allow}",
                headers={"Allow": allow},
            )
        case RequestEntityTooLarge():
            return ApiError(413, "payload_too_large", _too_large())
        case HTTPException(code=int(code)):
            return ApiError(code, _http_code(code), exc.description or exc.name)
    return None


def _method() -> str:
    return request.method if has_request_context() else "this method"


def _too_large() -> str:
    """What a 413 says: the body's size when it was declared, and the limit's setting."""
    limit = current_app.config.get("MAX_CONTENT_LENGTH") if has_app_context() else None
    setting = "max_body_bytes (CHATD_MAX_BODY_BYTES)"
    length = request.content_length if has_request_context() else None
    if limit is None:
        return f"the body is over the limit, {setting}"
    if length is not None and length > limit:
        return f"the body is {length} bytes; the limit is {limit} bytes, {setting}"
    return f"the body is over the limit of {limit} bytes, {setting}"


def _http_code(status: int) -> str:
    return {
        404: "not_found",
        405: "method_not_allowed",
        413: "payload_too_large",
    }.get(status, "http_error")


def error_response(error: ApiError, *, request_id: str | None = None) -> Response:
    body = ErrorBody(error.code, error.message, error.field, error.rule, request_id)
    return Response(
        msgspec.json.encode(ErrorResponse(body)),
        status=error.status,
        headers=error.headers,
        content_type="application/json",
    )


async def _handle(exc: Exception) -> Response:
    if outage := _outage(exc):
        # An outage, not a bug: one line per refused request, no traceback.
        log.warning("%s: database unavailable: %s", _where(), outage)
        exc = outage
    error = api_error_for(exc)
    if error is not None:
        return error_response(error)
    request_id = uuid.uuid4().hex
    log.error("request %s failed", request_id, exc_info=exc)
    internal = ApiError(500, "internal", "internal error")
    response = error_response(internal, request_id=request_id)
    response.headers["X-Request-Id"] = request_id
    return response


def _where() -> str:
    if has_request_context():
        return f"{request.method} {request.path}"
    if has_websocket_context():
        return f"WEBSOCKET {websocket.path}"
    return "?"


def _outage(exc: BaseException) -> DatabaseUnavailable | None:
    """The ``DatabaseUnavailable`` behind ``exc``, also when a nursery wrapped it in a group."""
    if isinstance(exc, DatabaseUnavailable):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        match, _ = exc.split(DatabaseUnavailable)
        if match is not None:
            return _outage(match.exceptions[0])
    return None


def install(app: Quart) -> None:
    app.register_error_handler(Exception, _handle)
