"""Content parts to and from their stored JSON: round trips, and refusals that name the key."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatd.domain.content_json import (
    MalformedContent,
    part_from_json,
    part_to_json,
    parts_from_json,
    parts_to_json,
)
from chatd.domain.conversation import (
    ContentPart,
    ReasoningPart,
    TextPart,
    ToolCallPart,
    ToolResultPart,
)

EXAMPLES: list[tuple[ContentPart, dict[str, Any]]] = [
    (TextPart("hello"), {"type": "text", "text": "hello"}),
    (
        ReasoningPart("think", "sig"),
        {"type": "reasoning", "text": "think", "signature": "sig"},
    ),
    (ReasoningPart("think"), {"type": "reasoning", "text": "think", "signature": None}),
    (
        ToolCallPart("c1", "lookup", '{"q": 1}'),
        {"type": "tool_call", "id": "c1", "name": "lookup", "arguments": '{"q": 1}'},
    ),
    (
        ToolResultPart("c1", '"ok"', is_error=True),
        {"type": "tool_result", "call_id": "c1", "output": '"ok"', "is_error": True},
    ),
]


@pytest.mark.parametrize(("part", "stored"), EXAMPLES)
def test_each_part_has_its_stored_shape(part: ContentPart, stored: dict[str, Any]) -> None:
    assert part_to_json(part) == stored
    assert part_from_json(stored) == part


texts = st.text(max_size=20)
parts = st.one_of(
    st.builds(TextPart, texts),
    st.builds(ReasoningPart, texts, st.none() | texts),
    st.builds(ToolCallPart, texts, texts, texts),
    st.builds(ToolResultPart, texts, texts, st.booleans()),
)


@given(st.lists(parts, max_size=6))
def test_parts_survive_a_trip_through_json_text(content: list[ContentPart]) -> None:
    stored = json.loads(json.dumps(parts_to_json(content)))
    assert parts_from_json(stored) == tuple(content)


def test_optional_keys_may_be_left_out() -> None:
    assert part_from_json({"type": "reasoning", "text": "t"}) == ReasoningPart("t")
    assert part_from_json({"type": "tool_result", "call_id": "c", "output": "1"}) == (
        ToolResultPart("c", "1")
    )


@pytest.mark.parametrize(
    ("stored", "names"),
    [
        ({"type": "image", "url": "x"}, "'image'"),
        ({"text": "no type"}, "None"),
        ({"type": "text"}, "'text'"),
        ({"type": "text", "text": 3}, "'text'"),
        ({"type": "reasoning", "text": "t", "signature": 1}, "'signature'"),
        ({"type": "tool_call", "id": "c", "name": "n", "arguments": {"q": 1}}, "'arguments'"),
        ({"type": "tool_result", "call_id": "c", "output": "1", "is_error": 0}, "'is_error'"),
        ("text", "object"),
    ],
)
def test_malformed_parts_are_refused_naming_what_is_wrong(stored: Any, names: str) -> None:
    with pytest.raises(MalformedContent, match=names):
        part_from_json(stored)


def test_content_must_be_a_list() -> None:
    stored: Any = {"type": "text", "text": "x"}
    with pytest.raises(MalformedContent):
        parts_from_json(stored)
    assert parts_from_json([]) == ()
