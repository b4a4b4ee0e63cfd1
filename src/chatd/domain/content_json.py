"""Message content parts to and from the JSON stored in ``chat_messages.content``.

The stored shape is a list of typed objects, the same that clients see::

    {"type": "text", "text": ...}
    {"type": "reasoning", "text": ..., "signature": ... | null}
    {"type": "tool_call", "id": ..., "name": ..., "arguments": <JSON text>}
    {"type": "tool_result", "call_id": ..., "output": <JSON text>, "is_error": false}
    {"type": "chat_summarized", "summary": ..., "through_seq": <int>}   (role "summary")

This module is the only place that knows it, so the actor, the loader and the event hub agree.
Decoding is strict about types (a row that does not fit is a bug or a foreign write, and
``MalformedContent``, a ``ValueError``, says where) but lenient about optional keys that older
writers left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, assert_never

from chatd.domain.conversation import (
    ContentPart,
    ReasoningPart,
    SummaryPart,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    ToolSpec,
)


class MalformedContent(ValueError):
    """Stored content that does not have the shape above."""


def part_to_json(part: ContentPart) -> dict[str, Any]:
    match part:
        case TextPart(text=text):
            return {"type": "text", "text": text}
        case ReasoningPart(text=text, signature=signature):
            return {"type": "reasoning", "text": text, "signature": signature}
        case ToolCallPart(id=call_id, name=name, arguments=arguments):
            return {"type": "tool_call", "id": call_id, "name": name, "arguments": arguments}
        case ToolResultPart(call_id=call_id, output=output, is_error=is_error):
            return {
                "type": "tool_result",
                "call_id": call_id,
                "output": output,
                "is_error": is_error,
            }
        case SummaryPart(text=text, through_seq=through_seq):
            return {"type": "chat_summarized", "summary": text, "through_seq": through_seq}
        case _:
            assert_never(part)


def part_from_json(data: Mapping[str, Any]) -> ContentPart:
    """The part ``data`` describes; ``MalformedContent`` names a missing or mistyped key."""
    if not isinstance(data, Mapping):
        raise MalformedContent(f"a content part must be an object, got {type(data).__name__}")
    kind = data.get("type")
    match kind:
        case "text":
            return TextPart(_str(data, "text"))
        case "reasoning":
            return ReasoningPart(_str(data, "text"), _optional_str(data, "signature"))
        case "tool_call":
            return ToolCallPart(_str(data, "id"), _str(data, "name"), _str(data, "arguments"))
        case "tool_result":
            is_error = data.get("is_error", False)
            if not isinstance(is_error, bool):
                raise MalformedContent("tool_result part: 'is_error' must be a boolean")
            return ToolResultPart(_str(data, "call_id"), _str(data, "output"), is_error)
        case "chat_summarized":
            through = data.get("through_seq")
            if not isinstance(through, int) or isinstance(through, bool):
                raise MalformedContent("chat_summarized part: 'through_seq' must be an integer")
            return SummaryPart(_str(data, "summary"), through)
        case _:
            raise MalformedContent(f"unknown content part type {kind!r}")


def parts_to_json(parts: Iterable[ContentPart]) -> list[dict[str, Any]]:
    return [part_to_json(part) for part in parts]


def parts_from_json(items: Iterable[Mapping[str, Any]]) -> tuple[ContentPart, ...]:
    if isinstance(items, Mapping | str | bytes):
        raise MalformedContent("content must be a list of parts")
    return tuple(part_from_json(item) for item in items)


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise MalformedContent(f"{data.get('type')} part: {key!r} must be a string")
    return value


def _optional_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise MalformedContent(f"{data.get('type')} part: {key!r} must be a string or null")
    return value


def tool_spec_to_json(spec: ToolSpec) -> dict[str, Any]:
    """How a chat's declared tools are stored (``chats.dynamic_tools``)."""
    return {
        "name": spec.name,
        "description": spec.description,
        "input_schema": dict(spec.input_schema),
    }


def tool_spec_from_json(data: Mapping[str, Any]) -> ToolSpec:
    return ToolSpec(data["name"], data.get("description", ""), data.get("input_schema", {}))
