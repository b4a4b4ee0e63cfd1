"""The fake provider's knobs and reply plan: parsing, precedence, errors, and what gets planned."""

from __future__ import annotations

import dataclasses
import email.utils
import json
import re
from typing import Any

import pytest

from chatd.domain.agent_prompts import SUMMARY_SYSTEM, TITLE_SYSTEM
from chatd.providers.fake import wire_anthropic, wire_openai
from chatd.providers.fake.scenario import (
    KNOB_HEADER,
    KNOBS,
    Fault,
    Finish,
    KnobError,
    Purpose,
    RequestFacts,
    Scenario,
    StepSpec,
    ToolCallSpec,
    knobs_header,
    knobs_marker,
    own_reply,
    parse_header,
    parse_knobs,
    parse_markers,
    plan_reply,
    request_digest,
    resolve,
    retry_after_headers,
    split_even,
    strip_markers,
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
        "steps": [{"tool_calls": [{"name": "f"}], "text_before_tools": True}, {"reply": "ok"}],
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
    assert scenario.steps == (
        StepSpec(tool_calls=(ToolCallSpec("f", {}),), text_before_tools=True),
        StepSpec(reply="ok"),
    )
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
        ("steps", {"reply": "x"}),
        ("steps[0]", [{}]),
        ("steps[0]", [{"tool_calls": []}]),
        ("steps[0]", [{"reply": None}]),
        ("steps[1]", [{"reply": "a"}, {"reply": "b", "extra": 1}]),
        ("steps[1]", [{"reply": "a"}, "b"]),
        ("steps[0].tool_calls", [{"tool_calls": [{"name": ""}]}]),
        ("steps[0].reply", [{"reply": 3}]),
        ("steps[0].text_before_tools", [{"reply": "a", "text_before_tools": "yes"}]),
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
    knob = name.split("[", 1)[0]
    with pytest.raises(KnobError, match=rf"^src: knob '{re.escape(name)}' must be "):
        parse_knobs({knob: value}, "src")


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


def test_a_scenario_built_in_python_takes_steps_as_json() -> None:
    scenario = Scenario(
        steps=[{"tool_calls": [{"name": "f", "arguments": {"a": 1}}]}, {"reply": "r"}]  # type: ignore[arg-type]
    )
    assert scenario.steps == (
        StepSpec(tool_calls=(ToolCallSpec("f", {"a": 1}),)),
        StepSpec(reply="r"),
    )
    assert Scenario(steps=scenario.steps) == scenario
    with pytest.raises(KnobError, match=r"Scenario: knob 'steps\[0\]' must be"):
        Scenario(steps=[{}])  # type: ignore[arg-type]


# -- scripted steps ---------------------------------------------------------------------------

STEPS = Scenario(
    chunks=2,
    steps=(
        StepSpec(tool_calls=(ToolCallSpec("write_file", {"path": "a"}),)),
        StepSpec(
            tool_calls=(ToolCallSpec("read_file", {"path": "a"}), ToolCallSpec("execute", {})),
            reply="reading",
            text_before_tools=True,
        ),
        StepSpec(reply="all done"),
    ),
)


def test_each_step_plays_by_the_assistant_messages_since_the_user_text() -> None:
    first = plan_reply(STEPS, facts(step_index=0), "t", digest="d" * 64)
    assert first.finish is Finish.TOOL_CALLS
    assert first.text == ()
    assert [(c.id, c.name) for c in first.tool_calls] == [("dddddddddddddddd_0_0", "write_file")]
    second = plan_reply(STEPS, facts(step_index=1, last_is_tool_result=True), "t", digest="e" * 64)
    assert second.finish is Finish.TOOL_CALLS
    assert second.text == ("read", "ing")
    assert [c.id for c in second.tool_calls] == ["eeeeeeeeeeeeeeee_1_0", "eeeeeeeeeeeeeeee_1_1"]
    third = plan_reply(STEPS, facts(step_index=2, last_is_tool_result=True), "t", digest="f")
    assert (third.text, third.tool_calls, third.finish) == (("all ", "done"), (), Finish.STOP)
    assert third.output_tokens == 2
    past = plan_reply(STEPS, facts(step_index=3), "t", digest="f")
    assert (past.text, past.tool_calls, past.finish) == (("w1 ", "w2 "), (), Finish.STOP)


def test_steps_replace_the_tool_calls_knob() -> None:
    both = dataclasses.replace(STEPS, tool_calls=(ToolCallSpec("other", {}),))
    assert [c.name for c in plan_reply(both, facts(), "t", digest="d").tool_calls] == ["write_file"]
    assert plan_reply(both, facts(step_index=5), "t", digest="d").tool_calls == ()


def test_a_step_can_override_text_before_tools_either_way() -> None:
    tools = (ToolCallSpec("f", {}),)
    scenario = Scenario(
        chunks=1,
        text_before_tools=True,
        steps=(StepSpec(tool_calls=tools, text_before_tools=False), StepSpec(tool_calls=tools)),
    )
    assert plan_reply(scenario, facts(step_index=0), "t", digest="d").text == ()
    assert plan_reply(scenario, facts(step_index=1), "t", digest="d").text == ("w1 ",)


def test_the_request_digest_is_stable_and_tells_requests_apart() -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert request_digest(messages) == request_digest([{"role": "user", "content": "hi"}])
    assert request_digest(messages) != request_digest([{"role": "user", "content": "hi!"}])
    assert request_digest("s", messages) != request_digest(None, messages)


def _openai(*messages: dict[str, Any], system: str | None = None) -> RequestFacts:
    head = [{"role": "system", "content": system}] if system is not None else []
    return wire_openai.parse_request({"model": "m", "messages": [*head, *messages]})


def _anthropic(*messages: dict[str, Any], system: Any = None) -> RequestFacts:
    body: dict[str, Any] = {"model": "m", "max_tokens": 10, "messages": list(messages)}
    if system is not None:
        body["system"] = system
    return wire_anthropic.parse_request(body)


ASK = {"role": "user", "content": "do it"}
OAI_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
}
OAI_RESULT = {"role": "tool", "tool_call_id": "c1", "content": "ok"}
ANT_CALL = {
    "role": "assistant",
    "content": [{"type": "tool_use", "id": "c1", "name": "f", "input": {}}],
}
ANT_RESULT = {
    "role": "user",
    "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "ok"}],
}


@pytest.mark.parametrize(
    ("messages", "step"),
    [
        ([ASK], 0),
        ([ASK, OAI_CALL, OAI_RESULT], 1),
        ([ASK, OAI_CALL, OAI_RESULT, OAI_CALL, OAI_RESULT], 2),
        ([ASK, OAI_CALL, OAI_RESULT, {"role": "assistant", "content": "done"}, ASK], 0),
        ([ASK, OAI_CALL, OAI_RESULT, {"role": "user", "content": ""}], 1),
        ([OAI_CALL, OAI_RESULT], 1),
    ],
)
def test_openai_steps_count_assistant_messages_after_the_last_user_text(
    messages: list[dict[str, Any]], step: int
) -> None:
    parsed = _openai(*messages, system="be brief")
    assert parsed.step_index == step
    assert parsed.last_user_text == ("do it" if ASK in messages else None)


@pytest.mark.parametrize(
    ("messages", "step"),
    [
        ([ASK], 0),
        ([ASK, ANT_CALL, ANT_RESULT], 1),
        ([ASK, ANT_CALL, ANT_RESULT, ANT_CALL, ANT_RESULT], 2),
        ([ASK, ANT_CALL, ANT_RESULT, {"role": "assistant", "content": "done"}, ASK], 0),
        # Tool results and a new question in one user message: a new turn.
        (
            [
                ASK,
                ANT_CALL,
                {
                    "role": "user",
                    "content": [*ANT_RESULT["content"], {"type": "text", "text": "x"}],
                },
            ],
            0,
        ),
    ],
)
def test_anthropic_steps_skip_user_messages_of_tool_results(
    messages: list[dict[str, Any]], step: int
) -> None:
    parsed = _anthropic(*messages)
    assert parsed.step_index == step
    assert parsed.last_user_text in ("do it", "x")


# -- chatd's own calls ------------------------------------------------------------------------


def test_summary_and_title_calls_are_told_by_their_exact_system_text() -> None:
    assert _openai(ASK, system=SUMMARY_SYSTEM).purpose is Purpose.SUMMARY
    assert _openai(ASK, system=TITLE_SYSTEM).purpose is Purpose.TITLE
    assert _openai(ASK, system=SUMMARY_SYSTEM + " ").purpose is Purpose.CHAT
    assert _openai(ASK).purpose is Purpose.CHAT
    developer = {"role": "developer", "content": [{"type": "text", "text": TITLE_SYSTEM}]}
    assert _openai(developer, ASK).purpose is Purpose.TITLE
    # Only the first system message counts.
    later = {"role": "system", "content": SUMMARY_SYSTEM}
    assert _openai(later, ASK, system="you are chatd").purpose is Purpose.CHAT
    assert _anthropic(ASK, system=SUMMARY_SYSTEM).purpose is Purpose.SUMMARY
    blocks = [
        {"type": "text", "text": TITLE_SYSTEM[:20]},
        {"type": "text", "text": TITLE_SYSTEM[20:]},
    ]
    assert _anthropic(ASK, system=blocks).purpose is Purpose.TITLE
    assert _anthropic(ASK, system="other").purpose is Purpose.CHAT
    assert _anthropic(ASK).purpose is Purpose.CHAT


def test_markers_are_stripped_and_broken_ones_left_alone() -> None:
    marker = knobs_marker(
        fault="server_error", tool_calls=[{"name": "f", "arguments": {"x": [[1]]}}]
    )
    assert strip_markers(f"a {marker} b{marker}") == "a  b"
    assert strip_markers("keep [[fake-llm {broken]] this") == "keep [[fake-llm {broken]] this"
    assert strip_markers('x [[fake-llm {"chunks": 1} ]] y') == "x  y"
    assert strip_markers("plain") == "plain"


def test_a_summary_quotes_the_first_200_characters_of_its_input() -> None:
    transcript = "Conversation:\nUser: first " + knobs_marker(fault="cut") + " words\n" + "x" * 300
    reply = own_reply(Purpose.SUMMARY, transcript)
    assert reply.startswith("Summary: Conversation: User: first words x")
    assert reply == "Summary: " + ("Conversation: User: first words " + "x" * 300)[:200]
    assert own_reply(Purpose.SUMMARY, "  a\n\n b  ") == "Summary: a b"
    assert own_reply(Purpose.SUMMARY, None) == "Summary:"


@pytest.mark.parametrize(
    ("text", "title"),
    [
        ("plan a trip to Lisbon in May, please", "plan a trip to Lisbon in"),
        ("Hello,   world!!", "Hello, world"),
        ("one two three four five six, seven", "one two three four five six"),
        (knobs_marker(chunks=1) + "  fix the\nbug. ", "fix the bug"),
        ("", "Untitled"),
        ("?!", "Untitled"),
        (None, "Untitled"),
    ],
)
def test_a_title_is_the_first_six_words(text: str | None, title: str) -> None:
    assert own_reply(Purpose.TITLE, text) == title


def test_own_calls_reply_a_word_per_chunk_and_never_call_tools() -> None:
    scenario = Scenario(
        chunks=2,
        reply="ignored",
        tool_calls=(ToolCallSpec("f", {}),),
        steps=(StepSpec(tool_calls=(ToolCallSpec("g", {}),)),),
        input_tokens=50,
    )
    plan = plan_reply(scenario, facts(purpose=Purpose.TITLE, last_user_text="fix  the bug"), "t")
    assert (plan.text, plan.tool_calls, plan.finish) == (("fix ", "the ", "bug"), (), Finish.STOP)
    assert (plan.input_tokens, plan.output_tokens) == (50, 3)
    summary = plan_reply(Scenario(), facts(purpose=Purpose.SUMMARY, input_chars=400), "t")
    assert "".join(summary.text) == "Summary: hi"
    assert (summary.input_tokens, summary.output_tokens) == (100, 2)


def test_recorded_conversations_look_the_same_in_both_formats() -> None:
    openai_body = {
        "messages": [
            {"role": "developer", "content": "a"},
            {"role": "system", "content": [{"type": "text", "text": "b"}]},
            ASK,
            OAI_CALL,
            OAI_RESULT,
            {"role": "user", "content": [{"type": "text", "text": "next"}]},
        ]
    }
    anthropic_body = {
        "system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        "messages": [
            ASK,
            ANT_CALL,
            {"role": "user", "content": [*ANT_RESULT["content"], {"type": "text", "text": "next"}]},
        ],
    }
    expected = [("user", "do it"), ("assistant", ""), ("tool", "ok"), ("user", "next")]
    assert wire_openai.conversation(openai_body) == expected
    assert wire_anthropic.conversation(anthropic_body) == expected
    assert wire_openai.system_text(openai_body) == "a\n\nb"
    assert wire_anthropic.system_text(anthropic_body) == "ab"
    malformed: list[Any] = [None, [], {"messages": "x"}, {"messages": [1, {"content": 2}]}]
    for wire in (wire_openai, wire_anthropic):
        for body in malformed:
            assert wire.system_text(body) == ""
            assert all(isinstance(text, str) for _, text in wire.conversation(body))
