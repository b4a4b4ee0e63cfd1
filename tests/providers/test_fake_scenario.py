"""The fake provider's knobs and reply plan: parsing, precedence, errors, and what gets planned."""

from __future__ import annotations

import email.utils
import json
from typing import Any

import pytest

from chatd.providers.fake.scenario import (
    KNOB_HEADER,
    KNOBS,
    Fault,
    Finish,
    KnobError,
    RequestFacts,
    Scenario,
    ToolCallSpec,
    knobs_header,
    knobs_marker,
    parse_header,
    parse_knobs,
    parse_markers,
    plan_reply,
    resolve,
    retry_after_headers,
    split_even,
)


def facts(**changes: Any) -> RequestFacts:
    values: dict[str, Any] = {
        "model": "m",
        "stream": True,
        "include_usage": True,
        "last_user_text": "hi",
        "last_is_tool_result": False,
        "input_chars": 40,
        "max_tokens": None,
    }
    values.update(changes)
    return RequestFacts(**values)


def test_every_knob_parses_and_lands_on_the_scenario() -> None:
    raw = {
        "chunks": 3,
        "reply": "hello",
        "first_chunk_delay_ms": 1.5,
        "chunk_interval_ms": 2,
        "tool_calls": [{"name": "f", "arguments": {"a": [1]}}, {"name": "g"}],
        "argument_chunks": 4,
        "text_before_tools": True,
        "reasoning_chunks": 2,
        "finish": "length",
        "input_tokens": 7,
        "output_tokens": 9,
        "fault": "rate_limit",
        "fault_after_chunks": 0,
        "fault_times": 1,
        "fault_key": "k",
        "retry_after_s": 0.5,
        "retry_after_ms": 1500,
        "retry_after_http_date": True,
        "context_window": 1000,
    }
    assert set(raw) == set(KNOBS)
    scenario = Scenario().with_knobs(parse_knobs(raw, "test"))
    assert scenario.tool_calls == (ToolCallSpec("f", {"a": [1]}), ToolCallSpec("g", {}))
    assert scenario.fault is Fault.RATE_LIMIT
    assert scenario.chunk_interval_ms == 2.0
    assert scenario.retry_after_s == 0.5
    assert scenario.context_window == 1000


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("chunks", -1),
        ("chunks", 1.5),
        ("chunks", True),
        ("chunks", "3"),
        ("reply", 3),
        ("first_chunk_delay_ms", -0.1),
        ("chunk_interval_ms", "5"),
        ("tool_calls", {"name": "f"}),
        ("tool_calls", [{"arguments": {}}]),
        ("tool_calls", [{"name": "", "arguments": {}}]),
        ("tool_calls", [{"name": "f", "arguments": [1]}]),
        ("tool_calls", [{"name": "f", "args": {}}]),
        ("argument_chunks", 0),
        ("text_before_tools", 1),
        ("finish", "tool_calls"),
        ("fault", "explode"),
        ("fault_times", -1),
        ("retry_after_ms", 1.5),
        ("retry_after_http_date", "yes"),
        ("context_window", 0),
    ],
)
def test_a_bad_knob_value_is_refused_naming_the_knob_and_the_source(name: str, value: Any) -> None:
    with pytest.raises(KnobError, match=rf"^src: knob '{name}' must be "):
        parse_knobs({name: value}, "src")


def test_an_unknown_knob_is_refused_with_the_known_ones_listed() -> None:
    with pytest.raises(KnobError, match=r"unknown knob 'chunkz'; known knobs: chunks, reply"):
        parse_knobs({"chunkz": 1}, "src")


def test_knobs_must_be_a_json_object() -> None:
    with pytest.raises(KnobError, match="expected a JSON object"):
        parse_knobs([1], "src")
    with pytest.raises(KnobError, match="x-fake-llm header is not valid JSON"):
        parse_header("{chunks: 1}")


def test_bad_server_defaults_fail_at_construction() -> None:
    with pytest.raises(KnobError, match="knob 'chunks'"):
        Scenario(chunks=-1)
    with pytest.raises(KnobError, match="knob 'fault'"):
        Scenario(fault="nope")  # type: ignore[arg-type]


def test_markers_anywhere_in_the_text_later_ones_winning() -> None:
    text = 'before [[fake-llm {"chunks": 2, "reply": "a]]b"}]] middle [[fake-llm{"chunks": 5}]] end'
    assert parse_markers(text) == {"chunks": 5, "reply": "a]]b"}


def test_a_marker_with_nested_brackets_in_its_json() -> None:
    marker = knobs_marker(tool_calls=[{"name": "f", "arguments": {"x": [[1, 2]]}}])
    assert marker.endswith("}]}]]")
    knobs = parse_markers(f"please {marker}")
    assert knobs["tool_calls"] == (ToolCallSpec("f", {"x": [[1, 2]]}),)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[[fake-llm {chunks: 1}]]", "not valid JSON"),
        ('[[fake-llm {"chunks": 1}', "must be followed by ']]'"),
        ('[[fake-llm {"chunks": 1} ]', "must be followed by ']]'"),
        ('[[fake-llm {"chunks": -1}]]', "knob 'chunks'"),
    ],
)
def test_a_broken_marker_is_refused(text: str, error: str) -> None:
    with pytest.raises(KnobError, match=r"\[\[fake-llm \.\.\.\]\] marker: .*" + error):
        parse_markers(text)


def test_header_wins_over_marker_which_wins_over_defaults() -> None:
    defaults = Scenario(chunks=1, reasoning_chunks=1, argument_chunks=2)
    text = knobs_marker(chunks=2, reasoning_chunks=2)
    header = json.dumps({"chunks": 3})
    scenario, knobs, _ = resolve(defaults, header, text)
    assert (scenario.chunks, scenario.reasoning_chunks, scenario.argument_chunks) == (3, 2, 2)
    assert knobs == {"chunks": 3, "reasoning_chunks": 2}
    assert resolve(defaults, None, "no marker here").scenario is defaults


def test_the_default_fault_key_is_the_requests_knobs_whatever_their_order() -> None:
    a = resolve(Scenario(), '{"fault": "rate_limit", "fault_times": 1}', None).fault_key
    b = resolve(Scenario(), '{"fault_times": 1,  "fault": "rate_limit"}', None).fault_key
    c = resolve(Scenario(), '{"fault_times": 1, "fault": "rate_limit", "chunks": 2}', None)
    d = resolve(Scenario(), '{"fault": "rate_limit", "fault_key": "mine"}', None)
    assert a == b != c.fault_key
    assert d.fault_key == "mine"


def test_knobs_header_and_marker_check_their_knobs() -> None:
    assert knobs_header(chunks=2) == {KNOB_HEADER: '{"chunks":2}'}
    with pytest.raises(KnobError):
        knobs_header(chunks=-2)
    with pytest.raises(KnobError):
        knobs_marker(nope=1)


@pytest.mark.parametrize(
    ("knobs", "fault", "expected"),
    [
        ({}, Fault.RATE_LIMIT, [(b"retry-after", b"1")]),
        ({"retry_after_s": 3}, Fault.RATE_LIMIT, [(b"retry-after", b"3")]),
        ({"retry_after_s": 0.25}, Fault.RATE_LIMIT, [(b"retry-after", b"0.25")]),
        (
            {"retry_after_ms": 1500},
            Fault.RATE_LIMIT,
            [(b"retry-after", b"2"), (b"retry-after-ms", b"1500")],
        ),
        ({}, Fault.OVERLOADED, []),
        ({"retry_after_s": 7}, Fault.OVERLOADED, [(b"retry-after", b"7")]),
    ],
)
def test_retry_after_headers(
    knobs: dict[str, Any], fault: Fault, expected: list[tuple[bytes, bytes]]
) -> None:
    assert retry_after_headers(Scenario(**knobs), fault, now=1_000_000.0) == expected


def test_retry_after_as_an_http_date() -> None:
    scenario = Scenario(retry_after_s=30, retry_after_http_date=True)
    [(name, value)] = retry_after_headers(scenario, Fault.RATE_LIMIT, now=1_700_000_000.2)
    assert name == b"retry-after"
    assert email.utils.parsedate_to_datetime(value.decode()).timestamp() == 1_700_000_031


def test_split_even_keeps_every_character_in_near_equal_pieces() -> None:
    assert split_even("abcdefg", 3) == ("abc", "de", "fg")
    assert split_even("ab", 5) == ("a", "b")
    assert split_even("", 3) == ()
    assert split_even("abc", 0) == ()


def test_a_plain_reply_is_numbered_words_with_usage() -> None:
    plan = plan_reply(Scenario(chunks=3, reasoning_chunks=2), facts(input_chars=41), "t")
    assert plan.text == ("w1 ", "w2 ", "w3 ")
    assert plan.reasoning == ("r1 ", "r2 ")
    assert plan.tool_calls == ()
    assert plan.finish is Finish.STOP
    assert (plan.input_tokens, plan.output_tokens) == (11, 5)
    assert plan.chunk_count == 5


def test_a_given_reply_is_split_into_the_chunks() -> None:
    plan = plan_reply(Scenario(chunks=2, reply="Hello there"), facts(), "t")
    assert plan.text == ("Hello ", "there")


def test_tool_calls_replace_the_text_unless_asked_for_both() -> None:
    tools = (ToolCallSpec("f", {"city": "Paris"}), ToolCallSpec("g", {}))
    plan = plan_reply(Scenario(chunks=2, tool_calls=tools, argument_chunks=3), facts(), "t")
    assert plan.finish is Finish.TOOL_CALLS
    assert plan.text == ()
    assert [c.id for c in plan.tool_calls] == ["t_0", "t_1"]
    first, second = plan.tool_calls
    assert first.arguments_json == '{"city":"Paris"}'
    assert "".join(first.pieces) == first.arguments_json
    assert len(first.pieces) == 3
    assert second.pieces == ("{", "}")
    assert plan.output_tokens == 5
    both = plan_reply(Scenario(chunks=2, tool_calls=tools, text_before_tools=True), facts(), "t")
    assert both.text == ("w1 ", "w2 ")


def test_a_request_ending_in_a_tool_result_gets_text() -> None:
    tools = (ToolCallSpec("f", {}),)
    plan = plan_reply(Scenario(chunks=2, tool_calls=tools), facts(last_is_tool_result=True), "t")
    assert plan.tool_calls == ()
    assert plan.text == ("w1 ", "w2 ")
    assert plan.finish is Finish.STOP


def test_max_tokens_truncates_the_text_and_finishes_with_length() -> None:
    plan = plan_reply(Scenario(chunks=5, reasoning_chunks=1), facts(max_tokens=3), "t")
    assert plan.text == ("w1 ", "w2 ")
    assert plan.finish is Finish.LENGTH
    assert plan_reply(Scenario(chunks=2, finish="length"), facts(), "t").finish is Finish.LENGTH
    assert plan_reply(Scenario(chunks=2), facts(max_tokens=2), "t").finish is Finish.STOP


def test_usage_can_be_given() -> None:
    plan = plan_reply(Scenario(input_tokens=100, output_tokens=0), facts(), "t")
    assert (plan.input_tokens, plan.output_tokens) == (100, 0)


def test_a_scenario_built_in_python_gets_the_normal_forms() -> None:
    scenario = Scenario(
        chunk_interval_ms=5,
        retry_after_s=2,
        fault="cut",  # type: ignore[arg-type]
        tool_calls=[{"name": "f", "arguments": {"a": 1}}],  # type: ignore[arg-type]
    )
    assert scenario.chunk_interval_ms == 5.0
    assert isinstance(scenario.chunk_interval_ms, float)
    assert isinstance(scenario.retry_after_s, float)
    assert scenario.fault is Fault.CUT
    assert scenario.tool_calls == (ToolCallSpec("f", {"a": 1}),)
