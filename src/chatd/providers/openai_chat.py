"""OpenAI chat completions (and any OpenAI-compatible server) through ``openai.AsyncOpenAI``.

Two ways to read the stream, with the same request and the same normalisation: the SDK's typed
chunk objects, or msgspec structs holding only the fields chatd reads.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Iterator
from typing import Any, cast

import httpx2
import msgspec
import openai
from openai.types.chat import ChatCompletionChunk

from chatd.domain.conversation import (
    ModelRequest,
    TextPart,
    ToolCallPart,
    ToolResultPart,
)
from chatd.domain.stream_parts import (
    Finish,
    FinishReason,
    ReasoningDelta,
    StreamPart,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from chatd.providers.adapter import SdkAdapter
from chatd.providers.base import ProviderConfig, StreamParser, Timeouts
from chatd.providers.errors import StreamInterrupted
from chatd.providers.sse import decoded_events

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "length": "length",
    "content_filter": "content_filter",
}


class OpenAIChatProvider(SdkAdapter):
    def __init__(
        self, config: ProviderConfig, *, timeouts: Timeouts, parser: StreamParser = "fast"
    ) -> None:
        super().__init__(config, timeouts=timeouts, parser=parser)
        self._client = openai.AsyncOpenAI(**self._sdk_options)

    async def aclose(self) -> None:
        await self._client.close()

    def _step_reader(self) -> _Step:
        return _Step()

    # -- request -----------------------------------------------------------------------------

    def _body(self, request: ModelRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": to_openai_messages(request),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        # OpenAI's own API wants the newer name; compatible servers mostly know only the old one.
        if self._config.kind == "openai":
            body["max_completion_tokens"] = request.max_output_tokens
        else:
            body["max_tokens"] = request.max_output_tokens
        if request.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": dict(t.input_schema),
                    },
                }
                for t in request.tools
            ]
        body.update(request.options)
        return body

    def _create_kwargs(self, request: ModelRequest) -> dict[str, Any]:
        # The body goes as built, past the SDK's per-field transform of typed params: it is
        # already plain JSON, and that walk of a long history cost more CPU than the rest of
        # the request. ``extra_body`` wins over the typed fields, so ``messages`` is the real one.
        return {
            "model": request.model,
            "messages": [],
            "stream": True,
            "extra_body": self._body(request),
        }

    # -- reading the stream -----------------------------------------------------------------

    async def _events(self, request: ModelRequest) -> AsyncGenerator[Any, None]:
        """The raw streaming response, one decoded chunk per SSE event.

        Not the SDK's ``AsyncStream``: it leaves two async generators unclosed per stream (a
        ResourceWarning under trio, and fatal in our tests). In "sdk" mode each chunk is built
        into the SDK's typed ``ChatCompletionChunk`` exactly as ``AsyncStream`` does it.
        """
        create = cast(Any, self._client.chat.completions.with_streaming_response.create)
        async with create(**self._create_kwargs(request)) as response:
            http: httpx2.Response = response.http_response
            decode = self._sdk_chunk if self._parser == "sdk" else _fast_chunk
            async with contextlib.aclosing(
                decoded_events(http, lambda data: decode(data, http))
            ) as chunks:
                async for chunk in chunks:
                    yield chunk

    def _sdk_chunk(self, data: bytes, http: httpx2.Response) -> Any:
        if data == b"[DONE]":
            return None
        obj = json.loads(data)
        if isinstance(obj, dict) and obj.get("error"):
            error = obj["error"]
            message = error.get("message") if isinstance(error, dict) else None
            raise openai.APIError(
                message or "An error occurred during streaming", request=http.request, body=error
            )
        return self._client._process_response_data(
            data=obj, cast_to=ChatCompletionChunk, response=http
        )


def _fast_chunk(data: bytes, http: httpx2.Response) -> _Chunk | None:
    if data == b"[DONE]":
        return None
    chunk = _CHUNK.decode(data)
    if chunk.error is not None:
        # What the SDK raises for an error inside a stream.
        raise openai.APIError(
            chunk.error.message or "An error occurred during streaming",
            request=http.request,
            body=msgspec.to_builtins(chunk.error),
        )
    return chunk


def to_openai_messages(request: ModelRequest) -> list[dict[str, Any]]:
    """Reasoning parts are not sent back: OpenAI-style servers do not take them as input."""
    out: list[dict[str, Any]] = []
    if request.system:
        out.append({"role": "system", "content": request.system})
    for message in request.messages:
        texts = [p.text for p in message.parts if isinstance(p, TextPart)]
        match message.role:
            case "user":
                out.append({"role": "user", "content": "".join(texts)})
            case "assistant":
                calls = [
                    {
                        "id": p.id,
                        "type": "function",
                        "function": {"name": p.name, "arguments": p.arguments},
                    }
                    for p in message.parts
                    if isinstance(p, ToolCallPart)
                ]
                entry: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
                if calls:
                    entry["tool_calls"] = calls
                out.append(entry)
            case "tool":
                out.extend(
                    {"role": "tool", "tool_call_id": p.call_id, "content": p.output}
                    for p in message.parts
                    if isinstance(p, ToolResultPart)
                )
    return out


class _Step:
    """Turns OpenAI's chunk fields into normalised parts; knows which tool calls are open."""

    __slots__ = ("_finish", "_open", "usage")

    def __init__(self) -> None:
        self._open: dict[int, bool] = {}
        self._finish: FinishReason | None = None
        self.usage: Usage | None = None

    def feed(self, chunk: Any) -> Iterator[StreamPart]:
        usage = chunk.usage
        if usage is not None:
            details = usage.prompt_tokens_details
            self.usage = Usage(
                input_tokens=usage.prompt_tokens or 0,
                output_tokens=usage.completion_tokens or 0,
                cache_read_tokens=(details.cached_tokens if details else None) or 0,
            )
        for choice in chunk.choices[:1]:
            delta = choice.delta
            if delta.content:
                yield TextDelta(delta.content)
            # Not in OpenAI's API; DeepSeek, vLLM and others stream reasoning this way.
            reasoning = getattr(delta, "reasoning_content", None)
            if reasoning:
                yield ReasoningDelta(reasoning)
            for call in delta.tool_calls or ():
                fn = call.function
                if call.index not in self._open:
                    self._open[call.index] = True
                    name = fn.name if fn else None
                    yield ToolCallStart(call.index, call.id or f"call_{call.index}", name or "")
                if fn is not None and fn.arguments:
                    yield ToolCallDelta(call.index, fn.arguments)
            if choice.finish_reason:
                yield from self._finish_with(choice.finish_reason)

    def _finish_with(self, reason: str) -> Iterator[StreamPart]:
        self._finish = _FINISH.get(reason, "other")
        for index in sorted(self._open):
            if self._open[index]:
                self._open[index] = False
                yield ToolCallEnd(index)

    def end(self) -> Iterator[StreamPart]:
        if self._finish is None:
            raise StreamInterrupted("the stream ended before a finish reason")
        if self.usage is not None:
            yield self.usage
        yield Finish(self._finish)


# -- msgspec types for the fast path: only what chatd reads --------------------------------


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)
    finish_reason: str | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None


class _Error(msgspec.Struct):
    message: str | None = None
    type: str | None = None
    code: str | int | None = None
    param: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None
    error: _Error | None = None


_CHUNK = msgspec.json.Decoder(_Chunk)
