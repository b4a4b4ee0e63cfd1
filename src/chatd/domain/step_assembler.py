"""Fold a step's stream parts into the content parts of the assistant message.

Consecutive text deltas become one text part, reasoning likewise (with its signature), and
each tool call one part with its arguments joined. Whatever has arrived can be read at any
moment: an interrupted step keeps its partial output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chatd.domain.conversation import ContentPart, ReasoningPart, TextPart, ToolCallPart
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


@dataclass
class _Text:
    pieces: list[str]


@dataclass
class _Reasoning:
    pieces: list[str]
    signature: str | None = None


@dataclass
class _Call:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)
    ended: bool = False


@dataclass
class StepAssembler:
    _parts: list[_Text | _Reasoning | _Call] = field(default_factory=list)
    _calls: dict[int, _Call] = field(default_factory=dict)
    usage: Usage | None = None
    finish: FinishReason | None = None

    def add(self, part: StreamPart) -> None:
        last = self._parts[-1] if self._parts else None
        match part:
            case TextDelta(text=text):
                if isinstance(last, _Text):
                    last.pieces.append(text)
                else:
                    self._parts.append(_Text([text]))
            case ReasoningDelta(text=text, signature=signature):
                if not isinstance(last, _Reasoning):
                    last = _Reasoning([])
                    self._parts.append(last)
                last.pieces.append(text)
                last.signature = signature or last.signature
            case ToolCallStart(index=index, id=call_id, name=name):
                call = _Call(call_id, name)
                self._calls[index] = call
                self._parts.append(call)
            case ToolCallDelta(index=index, arguments=arguments):
                if index in self._calls:
                    self._calls[index].arguments.append(arguments)
            case ToolCallEnd(index=index):
                if index in self._calls:
                    self._calls[index].ended = True
            case Usage():
                self.usage = part
            case Finish(reason=reason):
                self.finish = reason

    def content(self, *, complete_calls_only: bool = False) -> tuple[ContentPart, ...]:
        """The message so far; ``complete_calls_only`` leaves out calls still streaming."""
        out: list[ContentPart] = []
        for item in self._parts:
            match item:
                case _Text(pieces=pieces):
                    out.append(TextPart("".join(pieces)))
                case _Reasoning(pieces=pieces, signature=signature):
                    out.append(ReasoningPart("".join(pieces), signature))
                case _Call():
                    if item.ended or not complete_calls_only:
                        out.append(ToolCallPart(item.id, item.name, "".join(item.arguments)))
        return tuple(out)

    def tool_calls(self) -> tuple[ToolCallPart, ...]:
        return tuple(p for p in self.content() if isinstance(p, ToolCallPart))
