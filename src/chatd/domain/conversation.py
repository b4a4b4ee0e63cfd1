"""A provider-neutral conversation: what chatd asks a model, whichever provider answers.

Adapters translate this to and from each provider's wire format; nothing here knows one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningPart:
    """The model's visible reasoning; Anthropic signs it and wants the signature back."""

    text: str
    signature: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCallPart:
    """A call the model made. ``arguments`` is the JSON text exactly as the model wrote it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolResultPart:
    """The answer to one tool call. ``output`` is JSON text."""

    call_id: str
    output: str
    is_error: bool = False


@dataclass(frozen=True, slots=True)
class SummaryPart:
    """A summary boundary (compaction): ``text`` stands for every message up to
    ``through_seq``; prompts start here. Clients render it as a marker."""

    text: str
    through_seq: int


ContentPart = TextPart | ReasoningPart | ToolCallPart | ToolResultPart | SummaryPart

# ``summary`` messages never reach a provider as messages: their text joins the system text.
Role = Literal["user", "assistant", "tool", "summary"]


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of the conversation.

    ``user`` messages hold text; ``assistant`` messages hold text, reasoning and tool calls;
    ``tool`` messages hold the results of the tool calls of the assistant message before them.
    """

    role: Role
    parts: tuple[ContentPart, ...]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool the model may call: built-in or declared by the client."""

    name: str
    description: str
    input_schema: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """One model step: everything a provider needs to stream the next assistant message."""

    model: str
    messages: tuple[Message, ...]
    system: str = ""
    tools: tuple[ToolSpec, ...] = ()
    max_output_tokens: int = 4096
    # Provider-specific extras from the model config (temperature, top_p, ...).
    options: Mapping[str, Any] = field(default_factory=dict)
