"""The fake provider server over real sockets: both official SDKs, raw HTTP, and the CLI."""

from __future__ import annotations

import contextlib
import email.utils
import json
import math
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2
import openai
import pytest
import trio
import trio.testing
from anthropic.types import MessageParam, TextBlockParam, ToolUseBlock
from openai.types.chat import ChatCompletionMessageFunctionToolCall, ChatCompletionMessageParam

from chatd.domain.agent_prompts import SUMMARY_SYSTEM, TITLE_SYSTEM
from chatd.providers.fake import (
    FakeLLM,
    Fault,
    Purpose,
    Scenario,
    knobs_header,
    knobs_marker,
    open_fake_llm,
)
from chatd.providers.fake.scenario import strip_markers, text_chars
from tests.e2e.chatd_process import chatd_env

# When a stream stops before its end (closed early, an error event) the SDKs leave their inner
# SSE generators to the garbage collector, which trio reports as a ResourceWarning; the openai SDK
# does it on every `[DONE]` too. Closing the stream and its iterator cannot reach them.
sdk_generator_leak = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|anthropic|httpx2|httpcore2)\.:ResourceWarning"
)

USER = [{"role": "user", "content": "hello"}]
OAI_USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
ANT_USER: list[MessageParam] = [{"role": "user", "content": "hello"}]
OPENAI_MODEL = "gpt-fake"
ANTHROPIC_MODEL = "claude-fake"
OPENAI_KEY = "sk-test-0123456789abcdef"
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
STREAM_ERRORS = (openai.APIError, anthropic.APIError, httpx2.HTTPError)


@pytest.fixture
async def server() -> AsyncIterator[FakeLLM]:
    async with open_fake_llm() as fake:
        yield fake


@pytest.fixture
async def oai(server: FakeLLM) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key=OPENAI_KEY, max_retries=0, timeout=10
    )
    yield client
    await client.close()


@pytest.fixture
async def ant(server: FakeLLM) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(
        base_url=server.url, api_key="ant-test-key", max_retries=0, timeout=10
    )
    yield client
    await client.close()


@pytest.fixture
async def raw(server: FakeLLM) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=server.url, timeout=10) as client:
        yield client


def headers_for(knobs: dict[str, Any] | None) -> dict[str, str] | None:
    return knobs_header(**knobs) if knobs else None


async def drain(stream: Any) -> tuple[list[Any], Exception | None]:
    """Everything an SDK stream yields, and the error that ended it (if one did)."""
    items: list[Any] = []
    try:
        async with stream:
            async for item in stream:
                items.append(item)  # noqa: PERF401 (keeps what came before an error)
    except STREAM_ERRORS as exc:
        return items, exc
    return items, None


async def oai_stream(
    client: openai.AsyncOpenAI,
    knobs: dict[str, Any] | None = None,
    messages: list[ChatCompletionMessageParam] | None = None,
    **kwargs: Any,
) -> tuple[list[Any], Exception | None]:
    stream = await client.chat.completions.create(
        model=OPENAI_MODEL,
        messages=messages or OAI_USER,
        stream=True,
        extra_headers=headers_for(knobs),
        **kwargs,
    )
    return await drain(stream)


async def ant_stream(
    client: anthropic.AsyncAnthropic,
    knobs: dict[str, Any] | None = None,
    messages: list[MessageParam] | None = None,
    **kwargs: Any,
) -> tuple[list[Any], Exception | None]:
    kwargs.setdefault("max_tokens", 1000)
    stream = await client.messages.create(
        model=ANTHROPIC_MODEL,
        messages=messages or ANT_USER,
        stream=True,
        extra_headers=headers_for(knobs),
        **kwargs,
    )
    return await drain(stream)


def closing_iterator(stream: Any) -> contextlib.aclosing[Any]:
    """An SDK stream's own iterator (an async generator), to close when leaving early."""
    return contextlib.aclosing(stream._iterator)


def oai_texts(chunks: list[Any]) -> list[str]:
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


def oai_finishes(chunks: list[Any]) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def ant_texts(events: list[Any]) -> list[str]:
    return [
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    ]


def sse_events(body: bytes) -> list[tuple[str | None, bytes]]:
    """(event name, data) per SSE event, checking the framing on the way."""
    assert body.endswith(b"\n\n")
    events: list[tuple[str | None, bytes]] = []
    for block in body[:-2].split(b"\n\n"):
        lines = block.split(b"\n")
        name = None
        if lines[0].startswith(b"event: "):
            name = lines.pop(0).removeprefix(b"event: ").decode()
        [data] = lines
        assert data.startswith(b"data: ")
        events.append((name, data.removeprefix(b"data: ")))
    return events


def openai_body(**changes: Any) -> dict[str, Any]:
    return {"model": OPENAI_MODEL, "messages": USER, **changes}


def anthropic_body(**changes: Any) -> dict[str, Any]:
    return {"model": ANTHROPIC_MODEL, "max_tokens": 1000, "messages": USER, **changes}


# -- streaming, exact wire format ---------------------------------------------------------------


async def test_openai_stream_on_the_wire(raw: httpx2.AsyncClient) -> None:
    body = openai_body(stream=True, stream_options={"include_usage": True})
    response = await raw.post("/v1/chat/completions", json=body, headers=knobs_header(chunks=3))
    assert response.status_code == 200
    assert response.headers["content-type"] == SSE_CONTENT_TYPE
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.headers["x-request-id"].startswith("req_")
    events = sse_events(response.content)
    assert events[-1] == (None, b"[DONE]")
    chunks = [json.loads(data) for name, data in events[:-1]]
    assert {(c["object"], c["id"], c["model"]) for c in chunks} == {
        ("chat.completion.chunk", chunks[0]["id"], OPENAI_MODEL)
    }
    assert chunks[0]["id"].startswith("chatcmpl-")
    role, *content, finish, usage = chunks
    assert role["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert [c["choices"][0]["delta"] for c in content] == [
        {"content": "w1 "},
        {"content": "w2 "},
        {"content": "w3 "},
    ]
    assert all(c["usage"] is None for c in [role, *content, finish])
    assert finish["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert usage["choices"] == []
    # "user" + "hello": 9 characters of prompt text, 4 per token; one token per chunk.
    assert usage["usage"]["prompt_tokens"] == 3
    assert usage["usage"]["completion_tokens"] == 3
    assert usage["usage"]["total_tokens"] == 6

    plain = await raw.post("/v1/chat/completions", json=openai_body(stream=True))
    chunks = [json.loads(data) for name, data in sse_events(plain.content)[:-1]]
    assert all("usage" not in c and c["choices"] for c in chunks), "no usage unless asked"


async def test_anthropic_stream_on_the_wire(raw: httpx2.AsyncClient) -> None:
    body = anthropic_body(stream=True)
    response = await raw.post("/v1/messages", json=body, headers=knobs_header(chunks=2))
    assert response.status_code == 200
    assert response.headers["content-type"] == SSE_CONTENT_TYPE
    assert response.headers["request-id"].startswith("req_")
    events = []
    for name, data in sse_events(response.content):
        event = json.loads(data)
        assert event["type"] == name
        events.append(event)
    assert [e["type"] for e in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    message = events[0]["message"]
    assert message["id"].startswith("msg_")
    assert (message["role"], message["model"], message["content"]) == (
        "assistant",
        ANTHROPIC_MODEL,
        [],
    )
    assert message["usage"]["input_tokens"] == 3
    assert events[2] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert [e["delta"] for e in events[3:5]] == [
        {"type": "text_delta", "text": "w1 "},
        {"type": "text_delta", "text": "w2 "},
    ]
    assert events[5] == {"type": "content_block_stop", "index": 0}
    assert events[6]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[6]["usage"]["output_tokens"] == 2


# -- streaming through the SDKs -----------------------------------------------------------------


@sdk_generator_leak
async def test_openai_sdk_streams_text_and_usage(oai: openai.AsyncOpenAI) -> None:
    chunks, error = await oai_stream(oai, {"chunks": 4}, stream_options={"include_usage": True})
    assert error is None
    assert oai_texts(chunks) == ["w1 ", "w2 ", "w3 ", "w4 "]
    assert oai_finishes(chunks) == ["stop"]
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 4)


async def test_anthropic_sdk_streams_text_and_usage(ant: anthropic.AsyncAnthropic) -> None:
    async with ant.messages.stream(
        model=ANTHROPIC_MODEL,
        max_tokens=1000,
        messages=ANT_USER,
        extra_headers=knobs_header(chunks=4),
    ) as stream:
        texts = [text async for text in stream.text_stream]
        message = await stream.get_final_message()
    assert texts == ["w1 ", "w2 ", "w3 ", "w4 "]
    assert message.stop_reason == "end_turn"
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [
        ("text", "w1 w2 w3 w4 ")
    ]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 4)


TOOLS = [
    {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2, 3]}},
    {"name": "get_time", "arguments": {"tz": "Europe/Paris"}},
]


@sdk_generator_leak
async def test_openai_sdk_parallel_tool_calls_with_streamed_arguments(
    oai: openai.AsyncOpenAI,
) -> None:
    chunks, error = await oai_stream(oai, {"tool_calls": TOOLS, "argument_chunks": 4})
    assert error is None
    assert oai_texts(chunks) == []
    assert oai_finishes(chunks) == ["tool_calls"]
    deltas: dict[int, list[Any]] = defaultdict(list)
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            deltas[call.index].append(call)
    assert sorted(deltas) == [0, 1]
    ids = []
    for index, spec in enumerate(TOOLS):
        first, *pieces = deltas[index]
        assert (first.type, first.function.name, first.function.arguments) == (
            "function",
            spec["name"],
            "",
        )
        assert first.id.startswith("call_")
        ids.append(first.id)
        assert len(pieces) == 4
        assert all(p.id is None and p.function.name is None for p in pieces)
        assert json.loads("".join(p.function.arguments for p in pieces)) == spec["arguments"]
    assert len(set(ids)) == 2


async def test_anthropic_sdk_parallel_tool_calls_with_streamed_arguments(
    ant: anthropic.AsyncAnthropic,
) -> None:
    async with ant.messages.stream(
        model=ANTHROPIC_MODEL,
        max_tokens=1000,
        messages=ANT_USER,
        extra_headers=knobs_header(tool_calls=TOOLS, argument_chunks=3),
    ) as stream:
        events = [event async for event in stream]
        message = await stream.get_final_message()
    assert message.stop_reason == "tool_use"
    assert [
        (b.type, getattr(b, "name", None), getattr(b, "input", None)) for b in message.content
    ] == [("tool_use", spec["name"], spec["arguments"]) for spec in TOOLS]
    ids = [getattr(b, "id", "") for b in message.content]
    assert all(i.startswith("toolu_") for i in ids)
    assert len(set(ids)) == 2
    json_deltas = [
        (e.index, e.delta.partial_json)
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    assert [index for index, _ in json_deltas] == [0, 0, 0, 1, 1, 1]


@sdk_generator_leak
async def test_reasoning_in_both_formats(
    oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    knobs = {"chunks": 1, "reasoning_chunks": 2}
    chunks, _ = await oai_stream(oai, knobs)
    reasoning = [
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") for c in chunks[1:3]
    ]
    assert reasoning == ["r1 ", "r2 "]
    assert oai_texts(chunks) == ["w1 "]

    events, _ = await ant_stream(ant, knobs)
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert [(d.type, getattr(d, "thinking", None)) for d in deltas[:2]] == [
        ("thinking_delta", "r1 "),
        ("thinking_delta", "r2 "),
    ]
    assert deltas[2].type == "signature_delta"
    assert deltas[2].signature
    assert ant_texts(events) == ["w1 "]
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["thinking", "text"]


async def test_tool_results_get_a_text_reply_so_tool_loops_end(
    oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    ask = "weather in Paris? " + knobs_marker(tool_calls=TOOLS[:1], chunks=2)
    first = await oai.chat.completions.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": ask}]
    )
    [call] = first.choices[0].message.tool_calls or []
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert first.choices[0].finish_reason == "tool_calls"
    after_tool = await oai.chat.completions.create(
        model=OPENAI_MODEL,
        messages=[
            {"role": "user", "content": ask},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.function.name,
                            "arguments": call.function.arguments,
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
    )
    assert after_tool.choices[0].finish_reason == "stop"
    assert after_tool.choices[0].message.content == "w1 w2 "

    step = await ant.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=100, messages=[{"role": "user", "content": ask}]
    )
    assert step.stop_reason == "tool_use"
    [tool_use] = step.content
    assert isinstance(tool_use, ToolUseBlock)
    after_tool_result = await ant.messages.create(
        model=ANTHROPIC_MODEL,
        max_tokens=100,
        messages=[
            {"role": "user", "content": ask},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": tool_use.id,
                        "name": tool_use.name,
                        "input": tool_use.input,
                    }
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}
                ],
            },
        ],
    )
    assert after_tool_result.stop_reason == "end_turn"
    assert [getattr(b, "text", None) for b in after_tool_result.content] == ["w1 w2 "]


async def test_header_wins_over_the_marker_in_the_last_user_message(
    server: FakeLLM, oai: openai.AsyncOpenAI
) -> None:
    async def reply(
        messages: list[ChatCompletionMessageParam], knobs: dict[str, Any] | None = None
    ) -> str:
        completion = await oai.chat.completions.create(
            model=OPENAI_MODEL,
            messages=messages,
            extra_headers=headers_for(knobs),
        )
        return completion.choices[0].message.content or ""

    marked: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "hi " + knobs_marker(chunks=2)}
    ]
    assert await reply(marked) == "w1 w2 "
    assert await reply(marked, {"chunks": 3}) == "w1 w2 w3 "
    earlier: list[ChatCompletionMessageParam] = [
        *marked,
        {"role": "assistant", "content": "w1 w2 "},
        {"role": "user", "content": "plain"},
    ]
    assert await reply(earlier) == "w1 w2 w3 w4 w5 w6 w7 w8 ", "only the last user message"
    assert [r.knobs for r in server.requests] == [{"chunks": 2}, {"chunks": 3}, {}]


async def test_max_tokens_finishes_with_length(
    oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    completion = await oai.chat.completions.create(
        model=OPENAI_MODEL,
        messages=OAI_USER,
        max_completion_tokens=2,
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "w1 w2 "
    message = await ant.messages.create(model=ANTHROPIC_MODEL, max_tokens=2, messages=ANT_USER)
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 2


# -- non-streaming ------------------------------------------------------------------------------


async def test_non_streaming_replies_in_both_formats(
    oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    text = await oai.chat.completions.create(model=OPENAI_MODEL, messages=OAI_USER)
    assert text.object == "chat.completion"
    assert text.choices[0].message.content == "w1 w2 w3 w4 w5 w6 w7 w8 "
    assert text.usage is not None
    assert (text.usage.prompt_tokens, text.usage.completion_tokens) == (3, 8)

    tools = await oai.chat.completions.create(
        model=OPENAI_MODEL,
        messages=OAI_USER,
        extra_headers=knobs_header(tool_calls=TOOLS),
    )
    message = tools.choices[0].message
    assert tools.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    assert [
        (c.function.name, json.loads(c.function.arguments))  # type: ignore[union-attr]
        for c in message.tool_calls or []
    ] == [(t["name"], t["arguments"]) for t in TOOLS]

    reply = await ant.messages.create(
        model=ANTHROPIC_MODEL,
        max_tokens=100,
        messages=ANT_USER,
        extra_headers=knobs_header(chunks=2, reasoning_chunks=1, tool_calls=TOOLS[:1]),
    )
    assert reply.type == "message"
    assert reply.id.startswith("msg_")
    assert reply.stop_reason == "tool_use"
    assert [b.type for b in reply.content] == ["thinking", "tool_use"]
    assert reply.content[1].input == TOOLS[0]["arguments"]  # type: ignore[union-attr]
    assert reply.usage.input_tokens == 3


# -- status faults ------------------------------------------------------------------------------


OPENAI_FAULTS = [
    ("rate_limit", openai.RateLimitError, 429, "rate_limit_exceeded"),
    ("server_error", openai.InternalServerError, 500, None),
    ("unavailable", openai.InternalServerError, 503, None),
    ("overloaded", openai.InternalServerError, 503, None),
    ("auth", openai.AuthenticationError, 401, "invalid_api_key"),
    ("context_length", openai.BadRequestError, 400, "context_length_exceeded"),
    ("bad_request", openai.BadRequestError, 400, None),
    ("not_found", openai.NotFoundError, 404, "model_not_found"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("fault", "error", "status", "code"), OPENAI_FAULTS)
async def test_openai_status_faults_raise_the_sdks_error(
    oai: openai.AsyncOpenAI,
    fault: str,
    error: type[openai.APIStatusError],
    status: int,
    code: str | None,
    stream: bool,
) -> None:
    with pytest.raises(error) as caught:
        await oai.chat.completions.create(
            model=OPENAI_MODEL,
            messages=OAI_USER,
            stream=stream,
            extra_headers=knobs_header(fault=fault),
        )
    exc = caught.value
    assert type(exc) is error
    assert exc.status_code == status
    assert exc.code == code
    assert exc.response.headers["x-request-id"].startswith("req_")
    assert exc.response.headers["content-type"] == "application/json"
    assert isinstance(exc.body, dict)
    assert set(exc.body) == {"message", "type", "param", "code"}
    assert ("overloaded" in exc.message) == (fault == "overloaded")
    assert ("retry-after" in exc.response.headers) == (fault == "rate_limit")


ANTHROPIC_FAULTS = [
    ("rate_limit", anthropic.RateLimitError, 429, "rate_limit_error"),
    ("server_error", anthropic.InternalServerError, 500, "api_error"),
    ("unavailable", anthropic.ServiceUnavailableError, 503, "api_error"),
    ("overloaded", anthropic.OverloadedError, 529, "overloaded_error"),
    ("auth", anthropic.AuthenticationError, 401, "authentication_error"),
    ("context_length", anthropic.BadRequestError, 400, "invalid_request_error"),
    ("bad_request", anthropic.BadRequestError, 400, "invalid_request_error"),
    ("not_found", anthropic.NotFoundError, 404, "not_found_error"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("fault", "error", "status", "kind"), ANTHROPIC_FAULTS)
async def test_anthropic_status_faults_raise_the_sdks_error(
    ant: anthropic.AsyncAnthropic,
    fault: str,
    error: type[anthropic.APIStatusError],
    status: int,
    kind: str,
    stream: bool,
) -> None:
    with pytest.raises(error) as caught:
        await ant.messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=100,
            messages=ANT_USER,
            stream=stream,
            extra_headers=knobs_header(fault=fault),
        )
    exc = caught.value
    assert type(exc) is error
    assert exc.status_code == status
    assert exc.type == kind
    assert exc.request_id is not None
    assert exc.request_id.startswith("req_")
    assert isinstance(exc.body, dict)
    assert exc.body["request_id"] == exc.request_id
    assert ("retry-after" in exc.response.headers) == (fault == "rate_limit")


async def test_context_length_messages_look_like_the_real_ones(
    oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    knobs = knobs_header(fault="context_length", context_window=1000)
    with pytest.raises(openai.BadRequestError) as oai_error:
        await oai.chat.completions.create(
            model=OPENAI_MODEL, messages=OAI_USER, extra_headers=knobs
        )
    assert oai_error.value.param == "messages"
    assert isinstance(oai_error.value.body, dict)
    assert oai_error.value.body["message"].startswith(
        "This model's maximum context length is 1000 tokens. However, your messages resulted "
        "in 1003 tokens."
    )
    with pytest.raises(anthropic.BadRequestError) as ant_error:
        await ant.messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=10,
            messages=ANT_USER,
            extra_headers=knobs,
        )
    assert ant_error.value.api_message == "prompt is too long: 1003 tokens > 1000 maximum"


@pytest.mark.parametrize(
    ("knobs", "retry_after", "retry_after_ms"),
    [
        ({}, "1", None),
        ({"retry_after_s": 3}, "3", None),
        ({"retry_after_ms": 1500}, "2", "1500"),
        ({"retry_after_s": 0, "retry_after_ms": 250}, "0", "250"),
    ],
)
async def test_rate_limits_carry_retry_after(
    oai: openai.AsyncOpenAI,
    ant: anthropic.AsyncAnthropic,
    knobs: dict[str, Any],
    retry_after: str,
    retry_after_ms: str | None,
) -> None:
    headers = knobs_header(fault="rate_limit", **knobs)
    with pytest.raises(openai.RateLimitError) as oai_error:
        await oai.chat.completions.create(
            model=OPENAI_MODEL, messages=OAI_USER, extra_headers=headers
        )
    with pytest.raises(anthropic.RateLimitError) as ant_error:
        await ant.messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=10,
            messages=ANT_USER,
            extra_headers=headers,
        )
    for exc in (oai_error.value, ant_error.value):
        assert exc.response.headers.get("retry-after") == retry_after
        assert exc.response.headers.get("retry-after-ms") == retry_after_ms


async def test_retry_after_as_an_http_date_and_on_other_errors(
    ant: anthropic.AsyncAnthropic,
) -> None:
    headers = knobs_header(fault="rate_limit", retry_after_s=30, retry_after_http_date=True)
    with pytest.raises(anthropic.RateLimitError) as caught:
        await ant.messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=10,
            messages=ANT_USER,
            extra_headers=headers,
        )
    when = email.utils.parsedate_to_datetime(caught.value.response.headers["retry-after"])
    assert 25 < when.timestamp() - time.time() <= 31

    headers = knobs_header(fault="overloaded", retry_after_s=5)
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        await ant.messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=10,
            messages=ANT_USER,
            extra_headers=headers,
        )
    assert overloaded.value.response.headers["retry-after"] == "5"


async def test_fault_times_fails_the_first_requests_then_succeeds(
    server: FakeLLM, oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    once = knobs_header(fault="rate_limit", fault_times=1)
    with pytest.raises(openai.RateLimitError):
        await oai.chat.completions.create(model=OPENAI_MODEL, messages=OAI_USER, extra_headers=once)
    for _ in range(2):
        ok = await oai.chat.completions.create(
            model=OPENAI_MODEL, messages=OAI_USER, extra_headers=once
        )
        assert ok.choices[0].finish_reason == "stop"

    twice = knobs_header(fault="overloaded", fault_times=2, fault_key="k")
    for _ in range(2):
        with pytest.raises(anthropic.OverloadedError):
            await ant.messages.create(
                model=ANTHROPIC_MODEL,
                max_tokens=10,
                messages=ANT_USER,
                extra_headers=twice,
            )
    ok_message = await ant.messages.create(
        model=ANTHROPIC_MODEL,
        max_tokens=10,
        messages=ANT_USER,
        extra_headers=twice,
    )
    assert ok_message.stop_reason == "end_turn"
    assert [r.fault for r in server.requests] == [
        Fault.RATE_LIMIT,
        None,
        None,
        Fault.OVERLOADED,
        Fault.OVERLOADED,
        None,
    ]


# -- stream faults ------------------------------------------------------------------------------


async def test_cut_drops_the_connection_before_the_terminal_event(
    server: FakeLLM, oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    knobs = {"chunks": 5, "fault": "cut", "fault_after_chunks": 2}
    chunks, error = await oai_stream(oai, knobs)
    assert isinstance(error, openai.APIConnectionError)
    assert oai_texts(chunks) == ["w1 ", "w2 "]
    assert oai_finishes(chunks) == []

    events, error = await ant_stream(ant, knobs)
    # The anthropic SDK lets the transport's error through as it is.
    assert isinstance(error, httpx2.RemoteProtocolError | anthropic.APIConnectionError)
    assert ant_texts(events) == ["w1 ", "w2 "]
    assert "message_stop" not in [e.type for e in events]

    for index in (0, 1):
        record = await server.wait_for_finished(index)
        assert (record.fault, record.completed, record.client_disconnected) == (
            Fault.CUT,
            False,
            False,
        )


async def test_truncated_ends_the_response_cleanly_without_the_terminal_event(
    server: FakeLLM, oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic, raw: httpx2.AsyncClient
) -> None:
    knobs = {"chunks": 5, "fault": "truncated", "fault_after_chunks": 3}
    chunks, error = await oai_stream(oai, knobs)
    assert error is None
    assert oai_texts(chunks) == ["w1 ", "w2 ", "w3 "]
    assert oai_finishes(chunks) == []

    events, error = await ant_stream(ant, knobs)
    assert error is None
    assert ant_texts(events) == ["w1 ", "w2 ", "w3 "]
    assert [e.type for e in events][-1] == "content_block_delta"

    response = await raw.post(
        "/v1/chat/completions", json=openai_body(stream=True), headers=knobs_header(**knobs)
    )
    assert response.status_code == 200
    assert b"[DONE]" not in response.content
    assert b'finish_reason":"stop' not in response.content
    record = await server.wait_for_finished(2)
    assert (record.completed, record.client_disconnected) == (True, False)


async def test_silent_streams_then_says_nothing_until_the_client_leaves(
    server: FakeLLM, oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    knobs = {"chunks": 5, "fault": "silent", "fault_after_chunks": 2}
    impatient = httpx2.Timeout(10, read=0.3)
    chunks, error = await oai_stream(oai.with_options(timeout=impatient), knobs)
    assert isinstance(error, openai.APITimeoutError)
    assert oai_texts(chunks) == ["w1 ", "w2 "]
    with trio.fail_after(5):
        record = await server.wait_for_disconnect(0)
    assert (record.fault, record.completed, record.finished) == (Fault.SILENT, False, True)

    events, error = await ant_stream(ant.with_options(timeout=impatient), knobs)
    assert isinstance(error, httpx2.ReadTimeout | anthropic.APITimeoutError)
    assert ant_texts(events) == ["w1 ", "w2 "]
    with trio.fail_after(5):
        await server.wait_for_disconnect(1)

    # Not streaming: the status line and headers, then silence.
    with pytest.raises(openai.APITimeoutError):
        await oai.with_options(timeout=impatient).chat.completions.create(
            model=OPENAI_MODEL,
            messages=OAI_USER,
            extra_headers=knobs_header(fault="silent"),
        )
    with trio.fail_after(5):
        await server.wait_for_disconnect(2)


@sdk_generator_leak
async def test_midstream_error_is_an_error_event_inside_the_stream(
    server: FakeLLM, oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic, raw: httpx2.AsyncClient
) -> None:
    knobs = {"chunks": 5, "fault": "midstream_error", "fault_after_chunks": 2}
    chunks, error = await oai_stream(oai, knobs)
    assert type(error) is openai.APIError
    assert isinstance(error.body, dict)
    assert error.body["type"] == "server_error"
    assert oai_texts(chunks) == ["w1 ", "w2 "]

    events, error = await ant_stream(ant, knobs)
    assert type(error) is anthropic.APIStatusError
    assert error.type == "overloaded_error"
    assert ant_texts(events) == ["w1 ", "w2 "]

    openai_wire = await raw.post(
        "/v1/chat/completions", json=openai_body(stream=True), headers=knobs_header(**knobs)
    )
    name, data = sse_events(openai_wire.content)[-1]
    assert name is None
    assert json.loads(data)["error"]["type"] == "server_error"
    anthropic_wire = await raw.post(
        "/v1/messages", json=anthropic_body(stream=True), headers=knobs_header(**knobs)
    )
    name, data = sse_events(anthropic_wire.content)[-1]
    assert name == "error"
    assert json.loads(data)["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    assert [(await server.wait_for_finished(i)).completed for i in range(4)] == [True] * 4

    # Without a stream there is no "middle": it is a plain server error.
    with pytest.raises(openai.InternalServerError):
        await oai.chat.completions.create(
            model=OPENAI_MODEL,
            messages=OAI_USER,
            extra_headers=knobs_header(**knobs),
        )


# -- disconnects, timing, bookkeeping -----------------------------------------------------------


@sdk_generator_leak
@pytest.mark.parametrize("client", ["openai", "anthropic", "httpx2"])
@pytest.mark.parametrize("interval_ms", [20, 10_000])
async def test_a_client_leaving_mid_stream_is_seen_as_a_disconnect(
    server: FakeLLM,
    oai: openai.AsyncOpenAI,
    ant: anthropic.AsyncAnthropic,
    raw: httpx2.AsyncClient,
    client: str,
    interval_ms: int,
) -> None:
    """Short pauses learn it from the next send, long ones from reading the socket."""
    knobs = knobs_header(chunks=1000, chunk_interval_ms=interval_ms)
    wanted = 3 if interval_ms < 1000 else 1  # with a long interval: the first chunk only
    if client == "openai":
        openai_stream = await oai.chat.completions.create(
            model=OPENAI_MODEL,
            messages=OAI_USER,
            stream=True,
            extra_headers=knobs,
        )
        async with openai_stream, closing_iterator(openai_stream) as chunks:
            async for chunk in chunks:
                wanted -= bool(chunk.choices[0].delta.content)
                if not wanted:
                    break
    elif client == "anthropic":
        anthropic_stream = await ant.messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=10,
            messages=ANT_USER,
            stream=True,
            extra_headers=knobs,
        )
        async with anthropic_stream, closing_iterator(anthropic_stream) as events:
            async for event in events:
                wanted -= event.type == "content_block_delta"
                if not wanted:
                    break
    else:
        body = openai_body(stream=True)
        request = raw.stream("POST", "/v1/chat/completions", json=body, headers=knobs)
        async with request as response, contextlib.aclosing(response.aiter_raw()) as pieces:
            async for _piece in pieces:
                wanted -= 1
                if not wanted:
                    break
    with trio.fail_after(5):
        record = await server.wait_for_disconnect()
    assert (record.index, record.completed) == (0, False)


async def test_closing_the_server_closes_its_connections() -> None:
    async with httpx2.AsyncClient(timeout=10) as client:
        async with open_fake_llm(Scenario(fault=Fault.SILENT)) as server:
            request = client.build_request(
                "POST", server.url + "/v1/chat/completions", json=openai_body(stream=True)
            )
            response = await client.send(request, stream=True)
        try:
            with trio.fail_after(5), pytest.raises(httpx2.RemoteProtocolError):
                await response.aread()
        finally:
            await response.aclose()
    assert server.requests[0].finished


async def test_waiting_for_requests_in_flight(server: FakeLLM, raw: httpx2.AsyncClient) -> None:
    slow = knobs_header(first_chunk_delay_ms=60_000)

    async def ask() -> None:
        await raw.post("/v1/messages", json=anthropic_body(), headers=slow)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ask)
        with trio.fail_after(5):
            records = await server.wait_for_requests(3)
        assert [r.finished for r in records] == [False] * 3
        nursery.cancel_scope.cancel()
    with trio.fail_after(5):
        await server.wait_until(lambda: all(r.client_disconnected for r in server.requests))


async def test_delays_hold_back_the_chunks(raw: httpx2.AsyncClient) -> None:
    knobs = knobs_header(chunks=3, first_chunk_delay_ms=60, chunk_interval_ms=20)
    start = trio.current_time()
    async with raw.stream(
        "POST", "/v1/chat/completions", json=openai_body(stream=True), headers=knobs
    ) as response:
        headers_at = trio.current_time() - start
        body = await response.aread()
    elapsed = trio.current_time() - start
    assert body.endswith(b"data: [DONE]\n\n")
    assert headers_at < elapsed
    assert elapsed >= 0.1
    start = trio.current_time()
    await raw.post("/v1/messages", json=anthropic_body(), headers=knobs)
    assert trio.current_time() - start >= 0.1


async def test_delays_follow_trios_clock(autojump_clock: trio.testing.MockClock) -> None:
    """Pauses are trio timers, so a test on a mock clock gets them without waiting."""
    async with (
        open_fake_llm(
            Scenario(chunks=3, first_chunk_delay_ms=5000, chunk_interval_ms=60_000)
        ) as server,
        httpx2.AsyncClient(base_url=server.url, timeout=600) as client,
    ):
        start = trio.current_time()
        response = await client.post("/v1/chat/completions", json=openai_body(stream=True))
        assert trio.current_time() - start == pytest.approx(125, abs=0.5)
        assert response.content.endswith(b"data: [DONE]\n\n")
    assert autojump_clock.current_time() > 0


async def test_requests_are_recorded_with_their_connection(
    server: FakeLLM, raw: httpx2.AsyncClient
) -> None:
    await raw.post(
        "/v1/chat/completions?x=1",
        json=openai_body(stream=True),
        headers={"authorization": "Bearer k", **knobs_header(chunks=1)},
    )
    await raw.post("/v1/messages", json=anthropic_body(), headers={"x-api-key": "a"})
    with pytest.raises(httpx2.RemoteProtocolError):
        await raw.post(
            "/v1/chat/completions", json=openai_body(stream=True), headers=knobs_header(fault="cut")
        )
    await raw.post("/v1/messages", json=anthropic_body())
    first, second, cut, after_cut = await server.wait_for_requests(4)
    assert (first.method, first.path, first.provider) == (
        "POST",
        "/v1/chat/completions?x=1",
        "openai",
    )
    assert first.headers["authorization"] == "Bearer k"
    assert first.body == openai_body(stream=True)
    assert first.knobs == {"chunks": 1}
    assert first.scenario is not None
    assert first.scenario.chunks == 1
    assert (first.stream, first.status, first.completed) == (True, 200, True)
    assert (second.provider, second.stream, second.headers["x-api-key"]) == (
        "anthropic",
        False,
        "a",
    )
    assert first.connection == second.connection == cut.connection, "keep-alive"
    assert after_cut.connection != cut.connection


async def test_an_expected_api_key_is_enforced_in_each_providers_shape() -> None:
    async with (
        open_fake_llm(expected_api_key="sk-right-key-000001") as server,
        httpx2.AsyncClient(base_url=server.url, timeout=10) as raw,
    ):
        for key, ok in (("sk-wrong-key-999999", False), ("sk-right-key-000001", True)):
            oai = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
            ant = anthropic.AsyncAnthropic(base_url=server.url, api_key=key, max_retries=0)
            try:
                if ok:
                    await oai.chat.completions.create(model=OPENAI_MODEL, messages=OAI_USER)
                    await ant.messages.create(
                        model=ANTHROPIC_MODEL, max_tokens=5, messages=ANT_USER
                    )
                    continue
                with pytest.raises(openai.AuthenticationError) as oai_error:
                    await oai.chat.completions.create(model=OPENAI_MODEL, messages=OAI_USER)
                assert "sk-******" in oai_error.value.message
                assert key not in oai_error.value.message
                with pytest.raises(anthropic.AuthenticationError) as ant_error:
                    await ant.messages.create(
                        model=ANTHROPIC_MODEL, max_tokens=5, messages=ANT_USER
                    )
                assert ant_error.value.api_message == "invalid x-api-key"
            finally:
                await oai.close()
                await ant.close()
        keyless = await raw.post("/v1/chat/completions", json=openai_body())
        assert keyless.status_code == 401
        assert keyless.json()["error"]["message"].startswith("You didn't provide an API key.")
        keyless = await raw.post("/v1/messages", json=anthropic_body())
        assert keyless.json()["error"]["message"] == "x-api-key header is required"


@pytest.mark.parametrize(
    ("path", "body", "headers", "message"),
    [
        ("/v1/chat/completions", b"{not json", {}, "could not parse the JSON body"),
        ("/v1/chat/completions", {"messages": USER}, {}, "you must provide a model parameter"),
        ("/v1/chat/completions", {"model": "m", "messages": []}, {}, "'messages'"),
        ("/v1/messages", b"[1]", {}, "must be a JSON object"),
        ("/v1/messages", {"model": "m", "messages": USER}, {}, "max_tokens: Field required"),
        ("/v1/messages", anthropic_body(), {"x-fake-llm": '{"chunks": "x"}'}, "knob 'chunks'"),
        (
            "/v1/chat/completions",
            openai_body(messages=[{"role": "user", "content": "[[fake-llm {]]"}]),
            {},
            "marker: not valid JSON",
        ),
    ],
)
async def test_bad_requests_get_a_400_in_the_providers_shape(
    raw: httpx2.AsyncClient,
    path: str,
    body: Any,
    headers: dict[str, str],
    message: str,
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await raw.post(path, content=content, headers=headers)
    assert response.status_code == 400
    error = response.json()
    if path == "/v1/messages":
        assert error["type"] == "error"
        assert error["error"]["type"] == "invalid_request_error"
        assert error["request_id"] == response.headers["request-id"]
        assert message in error["error"]["message"]
    else:
        assert set(error["error"]) == {"message", "type", "param", "code"}
        assert error["error"]["type"] == "invalid_request_error"
        assert message in error["error"]["message"]


async def test_a_bad_knob_is_a_bad_request_for_the_sdk(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="unknown knob 'chunkz'"):
        await oai.chat.completions.create(
            model=OPENAI_MODEL,
            messages=OAI_USER,
            extra_headers={"x-fake-llm": '{"chunkz": 1}'},
        )


async def test_other_routes(raw: httpx2.AsyncClient) -> None:
    assert (await raw.get("/healthz")).json() == {"status": "ok"}
    missing = await raw.post("/v1/completions", json={})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "unknown_url"
    assert (await raw.get("/v1/messages")).status_code == 405


# -- the command --------------------------------------------------------------------------------


FAKE_LLM = [sys.executable, "-m", "chatd", "fake-llm"]


async def _read_line(stream: trio.abc.ReceiveStream) -> str:
    buffer = b""
    while b"\n" not in buffer:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buffer += chunk
    return buffer.decode()


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
async def test_the_fake_llm_command_serves_until_signalled(stop: signal.Signals) -> None:
    process = await trio.lowlevel.open_process(
        [*FAKE_LLM, "--port", "0", "--chunks", "3", "--api-key", "k1", "--chunk-interval-ms", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=chatd_env(),
    )
    try:
        assert process.stdout is not None
        assert process.stderr is not None
        with trio.fail_after(30):
            line = await _read_line(process.stdout)
        assert line.startswith("fake LLM serving on http://127.0.0.1:")
        url = line.split()[-1]
        async with httpx2.AsyncClient(base_url=url, timeout=10) as client:
            reply = await client.post(
                "/v1/messages", json=anthropic_body(), headers={"x-api-key": "k1"}
            )
            assert reply.json()["content"] == [{"type": "text", "text": "w1 w2 w3 "}]
            refused = await client.post("/v1/messages", json=anthropic_body())
            assert refused.status_code == 401
        process.send_signal(stop)
        with trio.fail_after(10):
            assert await process.wait() == 0
            errors = await process.stderr.receive_some(65536)
        assert b"Traceback" not in errors
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


@pytest.mark.slow
async def test_the_fake_llm_command_on_a_port_in_use() -> None:
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        port = listener.socket.getsockname()[1]
        with trio.fail_after(30):
            result = await trio.run_process(
                [*FAKE_LLM, "--port", str(port)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=chatd_env(),
            )
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        f"chatd: error: cannot listen on 127.0.0.1:{port}: address already in use"
    ]


async def _exchange(url: str, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(request)
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


async def test_http_1_0_garbage_and_oversized_requests() -> None:
    fake = FakeLLM(max_body_bytes=1000)
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve, [listener])
        body = json.dumps(openai_body(stream=True)).encode()
        old = await _exchange(
            fake.url,
            b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%b"
            % (len(body), body),
        )
        head, _, content = old.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"chunked" not in head.lower()
        assert content.endswith(b"data: [DONE]\n\n"), "HTTP/1.0: the body ends with the connection"

        garbage = await _exchange(fake.url, b"NOT HTTP AT ALL\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 ")

        big = b"x" * 500_000
        too_large = await _exchange(
            fake.url,
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b"
            % (len(big), big),
        )
        assert too_large.startswith(b"HTTP/1.1 413 ")
        nursery.cancel_scope.cancel()


# -- scripted turns and chatd's own calls -------------------------------------------------------

SCRIPT: list[dict[str, Any]] = [
    {"tool_calls": [{"name": "write_file", "arguments": {"path": "a.txt", "content": "hi"}}]},
    {
        "tool_calls": [
            {"name": "edit_file", "arguments": {"path": "a.txt", "old": "hi", "new": "yo"}},
            {"name": "execute", "arguments": {"command": "cat a.txt"}},
        ]
    },
    {"reply": "all done"},
]
SCRIPT_ASK = "work on a.txt " + knobs_marker(steps=SCRIPT, chunks=2)


def expected_input_tokens(request: Any) -> int:
    system = request.body.get("system") if request.provider == "anthropic" else None
    return max(1, math.ceil((text_chars(request.body["messages"]) + text_chars(system)) / 4))


async def oai_step(
    client: openai.AsyncOpenAI, messages: list[ChatCompletionMessageParam]
) -> tuple[list[dict[str, Any]], str, str | None, Any]:
    """One streamed step: its tool calls (id, name, arguments), text, finish and usage."""
    chunks, error = await oai_stream(
        client, messages=messages, stream_options={"include_usage": True}
    )
    assert error is None
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
            assert delta.function is not None
            call["id"] = call["id"] or delta.id
            call["name"] = call["name"] or delta.function.name
            call["arguments"] += delta.function.arguments or ""
    [finish] = oai_finishes(chunks)
    return [calls[i] for i in sorted(calls)], "".join(oai_texts(chunks)), finish, chunks[-1].usage


@sdk_generator_leak
async def test_openai_sdk_plays_a_scripted_turn_feeding_back_tool_results(
    server: FakeLLM, oai: openai.AsyncOpenAI
) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "you are chatd"},
        {"role": "user", "content": SCRIPT_ASK},
    ]
    played = []
    while True:
        calls, text, finish, usage = await oai_step(oai, messages)
        played.append(([(c["name"], json.loads(c["arguments"])) for c in calls], text, finish))
        request = server.requests[-1]
        assert usage is not None
        assert usage.prompt_tokens == expected_input_tokens(request)
        assert usage.completion_tokens == (len(calls) * 3 if calls else 2)
        if not calls:
            break
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]},
                    }
                    for c in calls
                ],
            }
        )
        messages += [
            {"role": "tool", "tool_call_id": c["id"], "content": f"ok {c['name']}"} for c in calls
        ]
    assert played == [
        ([("write_file", SCRIPT[0]["tool_calls"][0]["arguments"])], "", "tool_calls"),
        ([(c["name"], c["arguments"]) for c in SCRIPT[1]["tool_calls"]], "", "tool_calls"),
        ([], "all done", "stop"),
    ]
    ids = [c["id"] for m in messages if m["role"] == "assistant" for c in m["tool_calls"]]
    assert len(set(ids)) == 3
    assert all(i.startswith("call_") for i in ids)
    last = server.requests[-1]
    assert last.system_text() == "you are chatd"
    assert last.messages() == [
        ("user", SCRIPT_ASK),
        ("assistant", ""),
        ("tool", "ok write_file"),
        ("assistant", ""),
        ("tool", "ok edit_file"),
        ("tool", "ok execute"),
    ]
    assert {r.purpose for r in server.requests} == {Purpose.CHAT}

    # The same request again (a retry) gets the same call ids.
    again, _, _, _ = await oai_step(oai, messages[:4])
    assert [c["id"] for c in again] == ids[1:]


async def test_anthropic_sdk_plays_a_scripted_turn_feeding_back_tool_results(
    server: FakeLLM, ant: anthropic.AsyncAnthropic
) -> None:
    messages: list[MessageParam] = [{"role": "user", "content": SCRIPT_ASK}]
    played, ids = [], []
    while True:
        async with ant.messages.stream(
            model=ANTHROPIC_MODEL, max_tokens=1000, system="you are chatd", messages=messages
        ) as stream:
            message = await stream.get_final_message()
        uses = [b for b in message.content if isinstance(b, ToolUseBlock)]
        texts = [getattr(b, "text", "") for b in message.content if b.type == "text"]
        played.append(([(u.name, u.input) for u in uses], texts, message.stop_reason))
        request = server.requests[-1]
        assert message.usage.input_tokens == expected_input_tokens(request)
        assert message.usage.output_tokens == (len(uses) * 3 if uses else 2)
        if not uses:
            break
        ids += [u.id for u in uses]
        messages.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": u.id, "name": u.name, "input": u.input} for u in uses
                ],
            }
        )
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": u.id, "content": f"ok {u.name}"}
                    for u in uses
                ],
            }
        )
    assert played == [
        ([("write_file", SCRIPT[0]["tool_calls"][0]["arguments"])], [], "tool_use"),
        ([(c["name"], c["arguments"]) for c in SCRIPT[1]["tool_calls"]], [], "tool_use"),
        ([], ["all done"], "end_turn"),
    ]
    assert len(set(ids)) == 3
    assert all(i.startswith("toolu_") for i in ids)
    last = server.requests[-1]
    assert last.system_text() == "you are chatd"
    assert last.messages() == [
        ("user", SCRIPT_ASK),
        ("assistant", ""),
        ("tool", "ok write_file"),
        ("assistant", ""),
        ("tool", "ok edit_file"),
        ("tool", "ok execute"),
    ]
    again = await ant.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=1000, system="you are chatd", messages=messages[:3]
    )
    assert [getattr(b, "id", None) for b in again.content] == ids[1:]


TRANSCRIPT = (
    "Conversation:\n"
    f"User: first question {knobs_marker(fault='server_error', tool_calls=TOOLS[:1])}\n"
    "Assistant: first answer\n"
    f"User: {knobs_marker(steps=[{'tool_calls': TOOLS[:1]}])} more " + "x " * 150
)
SUMMARY = "Summary: " + " ".join(strip_markers(TRANSCRIPT).split())[:200].rstrip()


@sdk_generator_leak
async def test_summary_calls_ignore_markers_and_quote_their_input_with_usage(
    server: FakeLLM, oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    assert SUMMARY.startswith("Summary: Conversation: User: first question Assistant: first")
    words = len(SUMMARY.split())
    summarize: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": SUMMARY_SYSTEM},
        {"role": "user", "content": TRANSCRIPT},
    ]
    chunks, error = await oai_stream(
        oai, messages=summarize, stream_options={"include_usage": True}
    )
    assert error is None
    assert "".join(oai_texts(chunks)) == SUMMARY
    assert oai_finishes(chunks) == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.prompt_tokens == expected_input_tokens(server.requests[-1])
    assert usage.completion_tokens == words

    plain = await oai.chat.completions.create(model=OPENAI_MODEL, messages=summarize)
    assert plain.choices[0].message.content == SUMMARY
    assert plain.usage is not None
    assert plain.usage.completion_tokens == words

    ant_user: list[MessageParam] = [{"role": "user", "content": TRANSCRIPT}]
    system_blocks: list[TextBlockParam] = [{"type": "text", "text": SUMMARY_SYSTEM}]
    async with ant.messages.stream(
        model=ANTHROPIC_MODEL, max_tokens=1000, system=system_blocks, messages=ant_user
    ) as stream:
        streamed = [text async for text in stream.text_stream]
        message = await stream.get_final_message()
    assert "".join(streamed) == SUMMARY
    assert len(streamed) == words
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == expected_input_tokens(server.requests[-1])
    assert message.usage.output_tokens == words

    recorded = server.requests
    assert [r.purpose for r in recorded] == [Purpose.SUMMARY] * 3
    assert all(r.knobs == {} and r.fault is None for r in recorded)
    assert recorded[0].system_text() == recorded[2].system_text() == SUMMARY_SYSTEM
    assert recorded[0].messages() == recorded[2].messages() == [("user", TRANSCRIPT)]


async def test_title_calls_name_the_chat_after_its_first_words(
    server: FakeLLM, oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    ask = f"Plan a trip {knobs_marker(tool_calls=TOOLS)} to Lisbon in May, please!"
    named = await oai.chat.completions.create(
        model=OPENAI_MODEL,
        max_tokens=64,
        messages=[{"role": "system", "content": TITLE_SYSTEM}, {"role": "user", "content": ask}],
    )
    assert named.choices[0].message.content == "Plan a trip to Lisbon in"
    assert named.choices[0].message.tool_calls is None
    assert named.usage is not None
    assert named.usage.completion_tokens == 6
    untitled = await ant.messages.create(
        model=ANTHROPIC_MODEL,
        max_tokens=64,
        system=TITLE_SYSTEM,
        messages=[{"role": "user", "content": knobs_marker(chunks=1)}],
    )
    assert [getattr(b, "text", None) for b in untitled.content] == ["Untitled"]
    assert untitled.usage.output_tokens == 1
    assert [r.purpose for r in server.requests] == [Purpose.TITLE, Purpose.TITLE]


async def test_own_calls_still_take_the_header_knobs_and_the_server_defaults() -> None:
    # One fault_key for the defaults' fault: by default the key is the request's own knobs.
    defaults = Scenario(fault=Fault.SERVER_ERROR, fault_times=1, fault_key="own")
    summarize: list[MessageParam] = [{"role": "user", "content": "User: hello"}]
    async with (
        open_fake_llm(defaults) as server,
        anthropic.AsyncAnthropic(
            base_url=server.url, api_key="k", max_retries=0, timeout=10
        ) as ant,
    ):
        with pytest.raises(anthropic.InternalServerError):
            await ant.messages.create(
                model=ANTHROPIC_MODEL, max_tokens=100, system=SUMMARY_SYSTEM, messages=summarize
            )
        ok = await ant.messages.create(
            model=ANTHROPIC_MODEL, max_tokens=100, system=SUMMARY_SYSTEM, messages=summarize
        )
        assert [getattr(b, "text", None) for b in ok.content] == ["Summary: User: hello"]
        with pytest.raises(anthropic.RateLimitError):
            await ant.messages.create(
                model=ANTHROPIC_MODEL,
                max_tokens=100,
                system=TITLE_SYSTEM,
                messages=summarize,
                extra_headers=knobs_header(fault="rate_limit", fault_key="limited"),
            )
        counted = await ant.messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=100,
            system=TITLE_SYSTEM,
            messages=summarize,
            extra_headers=knobs_header(input_tokens=7, output_tokens=9),
        )
    assert (counted.usage.input_tokens, counted.usage.output_tokens) == (7, 9)
    assert [r.fault for r in server.requests] == [Fault.SERVER_ERROR, None, Fault.RATE_LIMIT, None]
