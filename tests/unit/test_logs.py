"""``chatd.logs``: the JSON lines, the settings read from the environment, the access line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from chatd.logs import begin_request, configure_logging, end_request, note_user, request_done


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_ts_level_logger_msg_extras_and_the_traceback() -> None:
    out = io.StringIO()
    configure_logging({"CHATD_LOG_FORMAT": "json"}, stream=out)
    log = logging.getLogger("chatd.test")
    log.warning("chat %s failed", "c1", extra={"chat_id": "c1", "status": 429})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it broke")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "WARNING"
    assert first["logger"] == "chatd.test"
    assert first["msg"] == "chat c1 failed"
    assert (first["chat_id"], first["status"]) == ("c1", 429)
    assert first["ts"].endswith("Z")
    assert "ValueError: boom" in second["exc"]


@pytest.mark.usefixtures("restore_logging")
def test_the_level_is_read_from_the_environment_and_a_bad_one_is_the_default() -> None:
    out = io.StringIO()
    configure_logging({"CHATD_LOG_LEVEL": "warning"}, stream=out)
    assert logging.getLogger().level == logging.WARNING
    request_done("GET", "/healthz", 200, 0.001, None)
    assert out.getvalue() == ""  # access lines are INFO
    configure_logging({"CHATD_LOG_LEVEL": "loud"}, stream=out)
    assert logging.getLogger().level == logging.INFO


@pytest.mark.usefixtures("restore_logging")
def test_the_access_line_names_the_user_noted_during_the_request() -> None:
    out = io.StringIO()
    configure_logging({}, stream=out)
    record, token = begin_request()
    note_user("u-1")
    end_request(token)
    note_user("u-2")  # outside a request: nothing to note
    assert record.user_id == "u-1"
    request_done("POST", "/api/v1/chats", 201, 0.0125, record.user_id)
    line = out.getvalue()
    assert "INFO chatd.access: POST /api/v1/chats 201 12.50ms user=u-1" in line
