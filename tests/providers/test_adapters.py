"""Both adapters, both stream parsers, over real HTTP from chatd's fake provider server.

Every case runs four ways: OpenAI and Anthropic, each through the SDK's typed stream and
through the fast (raw response + msgspec) path; the parts that come out must be identical.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from chatd.domain.conversation import (
    Message,
    ModelRequest,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    ToolSpec,
)
from chatd.domain.provider_failure import ErrorKind
from chatd.domain.stream_parts import (
    Finish,
    ReasoningDelta,
    StreamPart,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from chatd.providers.base import ModelProvider, ProviderConfig, StreamParser, Timeouts
from chatd.providers.errors import ProviderError
from chatd.providers.factory import build_provider
from chatd.providers.fake import FakeLLM, knobs_marker, open_fake_llm

API_KEY = "sk-test-0123456789abcdefghijklmnop"
WAYS = [
    pytest.param(kind, parser, id=f"{kind}-{parser}")
    for kind in ("openai", "anthropic")
    for parser in ("sdk", "fast")
]
WEATHER = ToolSpec(
    "weather", "Current weather", {"type": "object", "properties": {"city": {"type": "string"}}}
)


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    async with open_fake_llm() as server:
        yield server


def _provider(
    server: FakeLLM, kind: str, parser: StreamParser, *, silence_s: float = 30.0
) -> ModelProvider:
    config = ProviderConfig(
        name=f"fake-{kind}",
        kind="openai" if kind == "openai" else "anthropic",
        api_key=API_KEY,
        base_url=f"{server.url}/v1" if kind == "openai" else server.url,
    )
    return build_provider(config, timeouts=Timeouts(silence_s=silence_s), parser=parser)


def _request(text: str, **knobs: Any) -> ModelRequest:
    marker = knobs_marker(**knobs) if knobs else ""
    return ModelRequest(
        model="fake-model",
        system="be brief",
        messages=(Message("user", (TextPart(f"{marker} {text}"),)),),
        tools=(WEATHER,),
    )


async def _collect(provider: ModelProvider, request: ModelRequest) -> list[StreamPart]:
    try:
        with trio.fail_after(30):
            async with provider.stream(request) as parts:
                return [part async for part in parts]
    finally:
        await provider.aclose()


async def _failure(provider: ModelProvider, request: ModelRequest) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await _collect(provider, request)
    return caught.value


@pytest.mark.parametrize(("kind", "parser"), WAYS)
async def test_text_streams_then_usage_then_finish(
    fake_llm: FakeLLM, kind: str, parser: StreamParser
) -> None:
    parts = await _collect(_provider(fake_llm, kind, parser), _request("hi", chunks=5))
    assert parts[:5] == [TextDelta(f"w{i} ") for i in range(1, 6)]
    usage, finish = parts[5:]
    assert isinstance(usage, Usage)
    assert usage.output_tokens == 5
    assert usage.input_tokens > 0
    assert finish == Finish("stop")


@pytest.mark.parametrize(("kind", "parser"), WAYS)
async def test_parallel_tool_calls_stream_their_arguments(
    fake_llm: FakeLLM, kind: str, parser: StreamParser
) -> None:
    calls = [
        {"name": "weather", "arguments": {"city": "Paris"}},
        {"name": "weather", "arguments": {"city": "Rome", "units": "metric"}},
    ]
    parts = await _collect(
        _provider(fake_llm, kind, parser), _request("two cities", tool_calls=calls)
    )
    starts = [p for p in parts if isinstance(p, ToolCallStart)]
    assert [(s.index, s.name) for s in starts] == [(0, "weather"), (1, "weather")]
    assert len({s.id for s in starts}) == 2
    for index, call in enumerate(calls):
        pieces = [p.arguments for p in parts if isinstance(p, ToolCallDelta) and p.index == index]
        assert len(pieces) > 1, "arguments should arrive in several pieces"
        assert json.loads("".join(pieces)) == call["arguments"]
    assert [p.index for p in parts if isinstance(p, ToolCallEnd)] == [0, 1]
    assert parts[-1] == Finish("tool_calls")


@pytest.mark.parametrize(("kind", "parser"), WAYS)
async def test_a_tool_result_gets_a_text_answer(
    fake_llm: FakeLLM, kind: str, parser: StreamParser
) -> None:
    request = ModelRequest(
        model="fake-model",
        messages=(
            Message("user", (TextPart("weather?"),)),
            Message("assistant", (ToolCallPart("call_1", "weather", '{"city": "Paris"}'),)),
            Message("tool", (ToolResultPart("call_1", '{"sky": "clear"}'),)),
        ),
        tools=(WEATHER,),
    )
    parts = await _collect(_provider(fake_llm, kind, parser), request)
    assert any(isinstance(p, TextDelta) for p in parts)
    assert parts[-1] == Finish("stop")


@pytest.mark.parametrize("parser", ["sdk", "fast"])
async def test_anthropic_reasoning_arrives_with_its_signature(
    fake_llm: FakeLLM, parser: StreamParser
) -> None:
    parts = await _collect(
        _provider(fake_llm, "anthropic", parser), _request("think", reasoning_chunks=2, chunks=1)
    )
    reasoning = [p for p in parts if isinstance(p, ReasoningDelta)]
    assert "".join(r.text for r in reasoning) == "r1 r2 "
    assert reasoning[-1].signature


@pytest.mark.parametrize(("kind", "parser"), WAYS)
async def test_the_request_on_the_wire(fake_llm: FakeLLM, kind: str, parser: StreamParser) -> None:
    await _collect(_provider(fake_llm, kind, parser), _request("hello", chunks=1))
    [recorded] = fake_llm.requests
    body = recorded.body
    assert body["model"] == "fake-model"
    assert body["stream"] is True
    if kind == "openai":
        assert recorded.headers["authorization"] == f"Bearer {API_KEY}"
        assert body["messages"][0] == {"role": "system", "content": "be brief"}
        assert body["stream_options"] == {"include_usage": True}
        assert body["max_completion_tokens"] == 4096
        assert body["tools"][0]["function"]["name"] == "weather"
    else:
        # Anthropic's SDK sends the key as a bearer token these days; either header will do.
        assert API_KEY in (
            recorded.headers.get("x-api-key"),
            recorded.headers.get("authorization", "").removeprefix("Bearer "),
        )
        assert body["system"] == "be brief"
        assert body["max_tokens"] == 4096
        assert body["tools"][0]["input_schema"] == WEATHER.input_schema


FAULTS = [
    ("rate_limit", ErrorKind.RATE_LIMIT, True),
    ("server_error", ErrorKind.SERVER_ERROR, True),
    ("unavailable", ErrorKind.OVERLOADED, True),
    ("overloaded", ErrorKind.OVERLOADED, True),
    ("auth", ErrorKind.AUTH, False),
    ("context_length", ErrorKind.CONTEXT_LENGTH, False),
    ("bad_request", ErrorKind.CONFIG, False),
    ("not_found", ErrorKind.CONFIG, False),
    ("cut", ErrorKind.STREAM_INTERRUPTED, True),
    ("truncated", ErrorKind.STREAM_INTERRUPTED, True),
]


@pytest.mark.parametrize(("kind", "parser"), WAYS)
@pytest.mark.parametrize(("fault", "expected", "retryable"), FAULTS)
async def test_each_fault_is_classified(
    fake_llm: FakeLLM,
    kind: str,
    parser: StreamParser,
    fault: str,
    expected: ErrorKind,
    retryable: bool,
) -> None:
    error = await _failure(_provider(fake_llm, kind, parser), _request("x", fault=fault))
    assert error.failure.kind is expected
    assert error.failure.retryable is retryable
    assert error.failure.provider == f"fake-{kind}"
    assert API_KEY not in str(error.failure.to_json())


@pytest.mark.parametrize(("kind", "parser"), WAYS)
async def test_retry_after_is_read_from_the_response(
    fake_llm: FakeLLM, kind: str, parser: StreamParser
) -> None:
    error = await _failure(
        _provider(fake_llm, kind, parser),
        _request("x", fault="rate_limit", retry_after_s=7, retry_after_ms=7500),
    )
    assert error.failure.status_code == 429
    assert error.failure.retry_after_s == 7.5


@pytest.mark.parametrize(("kind", "parser"), WAYS)
async def test_an_error_inside_the_stream_is_classified(
    fake_llm: FakeLLM, kind: str, parser: StreamParser
) -> None:
    error = await _failure(
        _provider(fake_llm, kind, parser), _request("x", fault="midstream_error")
    )
    # The fake sends OpenAI a server_error and Anthropic an overloaded_error mid-stream.
    expected = ErrorKind.SERVER_ERROR if kind == "openai" else ErrorKind.OVERLOADED
    assert error.failure.kind is expected
    assert error.failure.retryable


@pytest.mark.parametrize(("kind", "parser"), WAYS)
async def test_a_silent_stream_times_out_and_is_closed(
    fake_llm: FakeLLM, kind: str, parser: StreamParser
) -> None:
    provider = _provider(fake_llm, kind, parser, silence_s=0.5)
    error = await _failure(provider, _request("x", fault="silent", fault_after_chunks=1))
    assert error.failure.kind is ErrorKind.STREAM_SILENCE_TIMEOUT
    assert error.failure.retryable
    with trio.fail_after(10):
        await fake_llm.wait_for_disconnect(0)


@pytest.mark.parametrize(("kind", "parser"), WAYS)
async def test_leaving_a_stream_early_closes_the_connection(
    fake_llm: FakeLLM, kind: str, parser: StreamParser
) -> None:
    provider = _provider(fake_llm, kind, parser)
    request = _request("long answer", chunks=200, chunk_interval_ms=20)
    try:
        with trio.fail_after(10):
            async with provider.stream(request) as parts:
                async for part in parts:
                    if isinstance(part, TextDelta):
                        break  # the engine does this on interrupt
            disconnected = await fake_llm.wait_for_disconnect(0)
    finally:
        await provider.aclose()
    assert not disconnected.completed


@pytest.mark.parametrize(("kind", "parser"), WAYS)
async def test_cancelling_a_stream_closes_the_connection(
    fake_llm: FakeLLM, kind: str, parser: StreamParser
) -> None:
    provider = _provider(fake_llm, kind, parser)
    request = _request("long answer", chunks=200, chunk_interval_ms=20)
    first_part = trio.Event()

    async def consume() -> None:
        async with provider.stream(request) as parts:
            async for _part in parts:
                first_part.set()

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                await first_part.wait()
                nursery.cancel_scope.cancel()
            await fake_llm.wait_for_disconnect(0)
    finally:
        await provider.aclose()


@pytest.mark.parametrize(("kind", "parser"), WAYS)
async def test_a_wrong_key_is_auth_and_never_echoed(kind: str, parser: StreamParser) -> None:
    async with open_fake_llm(expected_api_key="the-right-key") as server:
        error = await _failure(_provider(server, kind, parser), _request("x"))
    assert error.failure.kind is ErrorKind.AUTH
    assert not error.failure.retryable
    assert API_KEY not in str(error) + json.dumps(error.failure.to_json())


@pytest.mark.parametrize(("kind", "parser"), WAYS)
async def test_a_refused_connection_is_a_retryable_connection_failure(
    kind: str, parser: StreamParser
) -> None:
    async with open_fake_llm() as server:
        url = server.url  # the port is free again once the server is gone
    config = ProviderConfig(
        name="gone",
        kind="openai" if kind == "openai" else "anthropic",
        api_key=API_KEY,
        base_url=f"{url}/v1" if kind == "openai" else url,
    )
    provider = build_provider(config, timeouts=Timeouts(), parser=parser)
    error = await _failure(provider, _request("x"))
    assert error.failure.kind is ErrorKind.CONNECTION
    assert error.failure.retryable
