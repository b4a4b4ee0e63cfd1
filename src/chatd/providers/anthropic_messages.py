"""Anthropic's messages API through ``anthropic.AsyncAnthropic``.

As for OpenAI, each stream event is read either as the SDK's typed object or as a msgspec
struct holding only the fields chatd reads; both feed the same normalisation.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Iterator
from typing import Any, cast

import anthropic
import httpx2
import msgspec
from anthropic.types import RawMessageStreamEvent

from chatd.domain.conversation import (
    ModelRequest,
    ReasoningPart,
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
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "refusal": "content_filter",
}


class AnthropicMessagesProvider(SdkAdapter):
    def __init__(
        self, config: ProviderConfig, *, timeouts: Timeouts, parser: StreamParser = "fast"
    ) -> None:
        super().__init__(config, timeouts=timeouts, parser=parser)
        self._client = anthropic.AsyncAnthropic(**self._sdk_options)

    async def aclose(self) -> None:
        await self._client.close()

    def _step_reader(self) -> _Step:
        return _Step()

    def _create_kwargs(self, request: ModelRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": to_anthropic_messages(request)}
        if request.system:
            body["system"] = request.system
        if request.tools:
            body["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": dict(t.input_schema)}
                for t in request.tools
            ]
        body.update(request.options)
        return {
            "model": request.model,
            "max_tokens": request.max_output_tokens,
            "messages": [],
            "stream": True,
            # The history goes as built, past the SDK's per-field transform of typed params:
            # the body is already plain JSON, and that walk of a long history cost more CPU
            # than the rest of the request. ``extra_body`` wins over the typed fields.
            "extra_body": body,
        }

    # -- reading the stream -----------------------------------------------------------------

    async def _events(self, request: ModelRequest) -> AsyncGenerator[Any, None]:
        """The raw streaming response, one decoded event per SSE event.

        Not the SDK's ``AsyncStream``: it leaves async generators unclosed per stream (a
        ResourceWarning under trio). In "sdk" mode each event is built into the SDK's typed
        ``RawMessageStreamEvent`` exactly as ``AsyncStream`` does it.
        """
        create = cast(Any, self._client.messages.with_streaming_response.create)
        async with create(**self._create_kwargs(request)) as response:
            http: httpx2.Response = response.http_response
            decode = self._sdk_event if self._parser == "sdk" else self._fast_event
            async with contextlib.aclosing(
                decoded_events(http, lambda data: decode(data, http))
            ) as events:
                async for event in events:
                    yield event

    def _sdk_event(self, data: bytes, http: httpx2.Response) -> Any:
        obj = json.loads(data)
        self._raise_if_error(obj.get("type"), obj, http)
        return self._client._process_response_data(data=obj, cast_to=_SDK_EVENT, response=http)

    def _fast_event(self, data: bytes, http: httpx2.Response) -> _Event:
        event = _EVENT.decode(data)
        if event.type == "error":
            self._raise_if_error(event.type, json.loads(data), http)
        return event

    def _raise_if_error(self, event_type: object, body: object, http: httpx2.Response) -> None:
        """What the SDK raises for an error event inside a stream."""
        if event_type == "error":
            raise self._client._make_status_error(f"{body}", body=body, response=http)


def to_anthropic_messages(request: ModelRequest) -> list[dict[str, Any]]:
    """Anthropic wants user and assistant turns alternating: tool results ride in user turns,
    and consecutive turns of one role are merged."""
    out: list[dict[str, Any]] = []
    for message in request.messages:
        role = "assistant" if message.role == "assistant" else "user"
        blocks: list[dict[str, Any]] = []
        for p in message.parts:
            match p:
                case TextPart(text=text):
                    if text:
                        blocks.append({"type": "text", "text": text})
                case ReasoningPart(text=text, signature=signature):
                    # Unsigned reasoning (from another provider) cannot be sent back.
                    if signature:
                        blocks.append(
                            {"type": "thinking", "thinking": text, "signature": signature}
                        )
                case ToolCallPart(id=call_id, name=name, arguments=arguments):
                    blocks.append(
                        {
                            "type": "tool_use",
                            "id": call_id,
                            "name": name,
                            "input": _input(arguments),
                        }
                    )
                case ToolResultPart(call_id=call_id, output=output, is_error=is_error):
                    blocks.append(
                        {
                            "type": "tool_result",
                            "tool_use_id": call_id,
                            "content": output,
                            "is_error": is_error,
                        }
                    )
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return out


def _input(arguments: str) -> dict[str, Any]:
    """Tool input must be an object; arguments the model garbled are kept, not dropped."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        return {"_unparsed_arguments": arguments}
    return value if isinstance(value, dict) else {"_unparsed_arguments": arguments}


class _Step:
    """Turns Anthropic's events into normalised parts.

    Anthropic numbers content blocks (text, thinking and tool_use alike); tool calls are
    renumbered 0, 1, ... within the step, as OpenAI numbers them.
    """

    __slots__ = ("_cache_read", "_cache_write", "_input", "_output", "_stop", "_tools", "stopped")

    def __init__(self) -> None:
        self._tools: dict[int, int] = {}
        self._input = self._output = self._cache_read = self._cache_write = 0
        self._stop: str | None = None
        self.stopped = False

    def feed(self, event: Any) -> Iterator[StreamPart]:
        match event.type:
            case "content_block_delta":
                part = self._delta(event.index, event.delta)
                if part is not None:
                    yield part
            case "content_block_start":
                part = self._block_start(event.index, event.content_block)
                if part is not None:
                    yield part
            case "content_block_stop":
                call = self._tools.get(event.index)
                if call is not None:
                    yield ToolCallEnd(call)
            case "message_start":
                usage = event.message.usage
                self._input = usage.input_tokens or 0
                self._output = usage.output_tokens or 0
                self._cache_read = usage.cache_read_input_tokens or 0
                self._cache_write = usage.cache_creation_input_tokens or 0
            case "message_delta":
                if event.delta.stop_reason:
                    self._stop = event.delta.stop_reason
                if event.usage is not None and event.usage.output_tokens is not None:
                    self._output = event.usage.output_tokens
            case "message_stop":
                self.stopped = True
            case _:
                pass  # ping, and event types added after this was written

    def _block_start(self, index: int, block: Any) -> StreamPart | None:
        if block.type == "tool_use":
            call = len(self._tools)
            self._tools[index] = call
            return ToolCallStart(call, block.id or f"toolu_{call}", block.name or "")
        if block.type == "text" and block.text:
            return TextDelta(block.text)
        return None

    def _delta(self, index: int, delta: Any) -> StreamPart | None:
        match delta.type:
            case "text_delta":
                return TextDelta(delta.text) if delta.text else None
            case "input_json_delta":
                call = self._tools.get(index)
                if call is None or not delta.partial_json:
                    return None
                return ToolCallDelta(call, delta.partial_json)
            case "thinking_delta":
                return ReasoningDelta(delta.thinking) if delta.thinking else None
            case "signature_delta":
                return ReasoningDelta("", signature=delta.signature) if delta.signature else None
            case _:
                return None

    def end(self) -> Iterator[StreamPart]:
        if not self.stopped:
            raise StreamInterrupted("the stream ended before message_stop")
        yield Usage(
            input_tokens=self._input,
            output_tokens=self._output,
            cache_read_tokens=self._cache_read,
            cache_write_tokens=self._cache_write,
        )
        yield Finish(_FINISH.get(self._stop or "", "other"))


# -- msgspec types for the fast path: only what chatd reads --------------------------------


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


class _Message(msgspec.Struct):
    usage: _Usage = msgspec.field(default_factory=_Usage)


class _Block(msgspec.Struct):
    type: str = ""
    id: str | None = None
    name: str | None = None
    text: str | None = None


class _Delta(msgspec.Struct):
    type: str | None = None
    text: str | None = None
    partial_json: str | None = None
    thinking: str | None = None
    signature: str | None = None
    stop_reason: str | None = None


class _Event(msgspec.Struct):
    """Every event type in one struct: each reads only the fields its type carries."""

    type: str
    index: int = 0
    delta: _Delta = msgspec.field(default_factory=_Delta)
    content_block: _Block = msgspec.field(default_factory=_Block)
    message: _Message = msgspec.field(default_factory=_Message)
    usage: _Usage | None = None


_EVENT = msgspec.json.Decoder(_Event)
_SDK_EVENT: Any = RawMessageStreamEvent
