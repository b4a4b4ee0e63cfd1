"""The conversation as each provider wants it on the wire."""

from __future__ import annotations

from chatd.domain.conversation import (
    Message,
    ModelRequest,
    ReasoningPart,
    TextPart,
    ToolCallPart,
    ToolResultPart,
)
from chatd.providers.anthropic_messages import to_anthropic_messages
from chatd.providers.openai_chat import to_openai_messages

CONVERSATION = ModelRequest(
    model="m",
    system="be brief",
    messages=(
        Message("user", (TextPart("weather in Paris and Rome?"),)),
        Message(
            "assistant",
            (
                ReasoningPart("two cities", signature="sig"),
                TextPart("Looking."),
                ToolCallPart("c1", "weather", '{"city": "Paris"}'),
                ToolCallPart("c2", "weather", '{"city": "Rome"'),  # garbled by the model
            ),
        ),
        Message("tool", (ToolResultPart("c1", '"sunny"'), ToolResultPart("c2", '"rain"', True))),
        Message("user", (TextPart("thanks"),)),
    ),
)


def test_openai_wire_messages() -> None:
    assert to_openai_messages(CONVERSATION) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Looking.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Rome"'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '"sunny"'},
        {"role": "tool", "tool_call_id": "c2", "content": '"rain"'},
        {"role": "user", "content": "thanks"},
    ]


def test_anthropic_wire_messages_alternate_and_keep_signed_reasoning() -> None:
    assert to_anthropic_messages(CONVERSATION) == [
        {"role": "user", "content": [{"type": "text", "text": "weather in Paris and Rome?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "two cities", "signature": "sig"},
                {"type": "text", "text": "Looking."},
                {"type": "tool_use", "id": "c1", "name": "weather", "input": {"city": "Paris"}},
                {
                    "type": "tool_use",
                    "id": "c2",
                    "name": "weather",
                    "input": {"_unparsed_arguments": '{"city": "Rome"'},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "c1",
                    "content": '"sunny"',
                    "is_error": False,
                },
                {"type": "tool_result", "tool_use_id": "c2", "content": '"rain"', "is_error": True},
                {"type": "text", "text": "thanks"},
            ],
        },
    ]


def test_unsigned_reasoning_is_not_sent_to_anthropic() -> None:
    request = ModelRequest(
        model="m",
        messages=(
            Message("user", (TextPart("hi"),)),
            Message("assistant", (ReasoningPart("hmm"), TextPart("hello"))),
        ),
    )
    assert to_anthropic_messages(request)[1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "hello"}],
    }
