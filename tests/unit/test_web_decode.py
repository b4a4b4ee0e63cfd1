"""Request bodies to typed values, or a 400 that names the field and the rule."""

from __future__ import annotations

import logging

import msgspec
import pytest
from quart_trio import QuartTrio

from chatd.web import errors
from chatd.web.decode import decode_body
from chatd.web.errors import ApiError


class Inner(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class Outer(msgspec.Struct, forbid_unknown_fields=True):
    text: str
    items: list[Inner] = []


def refusal(raw: bytes, *, max_depth: int = 8) -> ApiError:
    with pytest.raises(ApiError) as caught:
        decode_body(raw, Outer, max_depth=max_depth)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize(
    ("raw", "field", "rule"),
    [
        (b"", "body", "a JSON object is required"),
        (b"{", "body", "must be valid JSON"),
        (b"[]", "body", "must be a JSON object"),
        (b"{}", "text", "is required"),
        (b'{"text": 1}', "text", "expected str, got int"),
        (b'{"text": "a", "other": 1}', "other", "is not a known field"),
        (b'{"text": "a", "items": [{"name": "x", "z": 1}]}', "items[0].z", "is not a known field"),
        (b'{"text": "a", "items": [{}]}', "items[0].name", "is required"),
        (b'{"text": "a", "items": [{"name": 2}]}', "items[0].name", "expected str, got int"),
        (b'{"text": "a\\u0000"}', "text", "must not contain NUL characters"),
        (b'{"text": "a", "items": [{"name": "\\u0000"}]}', "items[0].name", "must not contain NUL"),
    ],
)
def test_refusals_name_the_field_and_the_rule(raw: bytes, field: str, rule: str) -> None:
    error = refusal(raw)
    assert error.field == field
    assert error.rule is not None
    assert error.rule.startswith(rule)


def test_depth_is_limited() -> None:
    assert decode_body(b'{"text": "a", "items": []}', Outer, max_depth=2).text == "a"
    error = refusal(b'{"text": "a", "items": [{"name": "n"}]}', max_depth=2)
    assert error.field == "items[0]"
    assert error.rule == "nested at most 2 levels"


def test_an_escaped_backslash_is_not_a_nul() -> None:
    assert decode_body(b'{"text": "\\\\u0000"}', Outer, max_depth=4).text == "\\u0000"


async def test_an_unexpected_failure_is_a_500_with_a_request_id_and_no_internals(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = QuartTrio("t")
    errors.install(app)

    @app.get("/boom")
    async def boom() -> str:
        raise RuntimeError("secret internals")

    with caplog.at_level(logging.ERROR, logger="chatd.web.errors"):
        response = await app.test_client().get("/boom")
    assert response.status_code == 500
    body = await response.get_json()
    request_id = body["error"]["request_id"]
    assert body == {
        "error": {"code": "internal", "message": "internal error", "request_id": request_id}
    }
    assert response.headers["X-Request-Id"] == request_id
    assert "secret" not in str(body)
    assert request_id in caplog.text
    assert "secret internals" in caplog.text


@pytest.mark.parametrize("levels", [1_000, 100_000])
def test_nesting_past_the_parser_is_refused_naming_the_depth_rule(levels: int) -> None:
    raw = b'{"text": ' + b"[" * levels + b"]" * levels + b"}"
    error = refusal(raw, max_depth=64)
    assert (error.field, error.rule) == ("body", "nested at most 64 levels")


@pytest.mark.parametrize(
    "raw", [b'{"text": "\xff\xfe"}', b'{"t\xffext": "a"}', b'{"text": "\xc3"}']
)
def test_invalid_utf8_is_refused(raw: bytes) -> None:
    error = refusal(raw)
    assert (error.field, error.rule) == ("body", "must be valid UTF-8")
