"""chatd.client's event decoding and resume cursor, without a server."""

from __future__ import annotations

import json

import pytest

from chatd.client.errors import InvalidRequest, RateLimited, ServerError, api_error
from chatd.client.events import (
    Cursor,
    MessageEvent,
    MessagePartEvent,
    PreviewResetEvent,
    TextPart,
    UnknownEvent,
    decode_stream_frame,
)


def test_a_frame_of_one_event_or_a_batch_and_unknown_types_kept_raw() -> None:
    part = {
        "type": "message_part",
        "history_version": 2,
        "generation_attempt": 1,
        "seq": 3,
        "part": {"type": "text", "text": "hi"},
    }
    reset = '{"type": "preview_reset", "history_version": 1, "generation_attempt": 2}'
    assert decode_stream_frame(reset) == [PreviewResetEvent(1, 2)]
    [decoded, unknown] = decode_stream_frame(
        "[" + json.dumps(part) + ', {"type": "new_thing", "x": 1}]'
    )
    assert decoded == MessagePartEvent(2, 1, 3, TextPart("hi"))
    assert unknown == UnknownEvent("new_thing", {"type": "new_thing", "x": 1})


def test_the_cursor_follows_messages_parts_and_resets() -> None:
    cursor = Cursor()
    assert cursor.query() == {"message_seq": 0}
    cursor = cursor.after(MessageEvent("m1", 1, "user", [], 1))
    cursor = cursor.after(MessagePartEvent(1, 1, 4, TextPart("x")))
    assert cursor.query() == {
        "message_seq": 1,
        "history_version": 1,
        "generation_attempt": 1,
        "part_seq": 4,
    }
    assert cursor.after(MessageEvent("m0", 0, "user", [], 1)).message_seq == 1


@pytest.mark.parametrize(
    ("status", "cls"), [(400, InvalidRequest), (429, RateLimited), (502, ServerError)]
)
def test_errors_map_by_status_with_field_rule_and_retry_after(status: int, cls: type) -> None:
    body = {"error": {"code": "c", "message": "m", "field": "text", "rule": "not empty"}}
    error = api_error(status, body, "2")
    assert type(error) is cls
    assert (error.field, error.rule, error.retry_after) == ("text", "not empty", 2.0)
