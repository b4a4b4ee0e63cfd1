"""Logging for the whole process: one line per record on stderr, as text or as JSON.

``CHATD_LOG_LEVEL`` (default INFO) and ``CHATD_LOG_FORMAT`` (``text`` or ``json``) are read
from the environment before the other settings, so that even a mistake in them is logged as
configured; ``Settings`` validates both again and refuses a bad value with one line.

JSON: one object per line with ``ts`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``,
``msg`` and the record's extra fields (``log.info(..., extra={"status": 200})``); an
exception's traceback goes in ``exc``. Text: the same line a person reads, the fields already
in the message.

The access log (``chatd.access``) also lives here: ``AccessRecord`` is one request's, filled in
by the layers that know each part (the server: method, status, duration; the router: the
route's template; authentication: the user) through a context variable, so that no layer
depends on another.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, Final, TextIO

LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS: Final = ("text", "json")
DEFAULT_LEVEL: Final = "INFO"
DEFAULT_FORMAT: Final = "text"

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The attributes every LogRecord has: anything else on a record came in ``extra``.
_STANDARD: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(
            (key, value)
            for key, value in record.__dict__.items()
            if key not in _STANDARD and not key.startswith("_")
        )
        if record.exc_info and record.exc_info[1] is not None:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


def _iso_utc(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def log_level(env: Mapping[str, str]) -> str:
    """``CHATD_LOG_LEVEL`` in upper case, or the default when unset or not a level."""
    raw = env.get("CHATD_LOG_LEVEL", "").strip().upper()
    return raw if raw in LOG_LEVELS else DEFAULT_LEVEL


def log_format(env: Mapping[str, str]) -> str:
    raw = env.get("CHATD_LOG_FORMAT", "").strip().lower()
    return raw if raw in LOG_FORMATS else DEFAULT_FORMAT


def configure_logging(
    env: Mapping[str, str] | None = None, *, stream: TextIO | None = None
) -> None:
    """Send every record of the process to ``stream`` (stderr) at the configured level and
    format; replaces what was configured before (a worker configures itself again)."""
    import os  # noqa: PLC0415 - only the default needs it

    env = os.environ if env is None else env
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if log_format(env) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(log_level(env))
    # httpx2 logs every request at INFO: a line per model step in the server, per message in
    # the load driver; CPU and noise that say nothing an operator needs.
    logging.getLogger("httpx2").setLevel(logging.WARNING)


# -- the access log ------------------------------------------------------------------------------

access_log = logging.getLogger("chatd.access")


class AccessRecord:
    """What one request's access line says, filled in as the request goes through the layers."""

    __slots__ = ("route", "user_id")

    def __init__(self) -> None:
        self.route: str | None = None
        self.user_id: object = None


_current: contextvars.ContextVar[AccessRecord | None] = contextvars.ContextVar(
    "chatd_access_record", default=None
)


def begin_request() -> tuple[AccessRecord, contextvars.Token[AccessRecord | None]]:
    """A new record for the request the current task serves (its child tasks see it too)."""
    record = AccessRecord()
    return record, _current.set(record)


def end_request(token: contextvars.Token[AccessRecord | None]) -> None:
    _current.reset(token)


def note_user(user_id: object) -> None:
    """The request's caller, once authenticated (nothing when no request is being logged)."""
    record = _current.get()
    if record is not None:
        record.user_id = user_id


def note_route(route: str) -> None:
    """The template of the route the request matched (``/api/v1/chats/<chat_id>``)."""
    record = _current.get()
    if record is not None:
        record.route = route


def request_done(method: str, route: str, status: int, seconds: float, user_id: object) -> None:
    """The access line of one request (a WebSocket's when its handshake is answered)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    ms = round(seconds * 1000, 2)
    user = "-" if user_id is None else str(user_id)
    # Made and handled directly: ``info`` would also walk the stack for the caller's file and
    # line (a third of the cost, and always this line).
    record = access_log.makeRecord(
        access_log.name,
        logging.INFO,
        __file__,
        0,
        "%s %s %d %.2fms user=%s",
        (method, route, status, ms, user),
        None,
        extra={
            "method": method,
            "route": route,
            "status": status,
            "duration_ms": ms,
            "user_id": None if user_id is None else user,
        },
    )
    access_log.handle(record)
