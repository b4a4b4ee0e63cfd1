"""Context compaction, the pure part: when a prompt is too big, what a summary covers, and the
texts of the summary call and of a prompt that starts at a summary.

A chat's prompt is its system text plus the messages after its newest summary boundary (a
``summary`` message, see ``SummaryPart``), whose text joins the system text. Its size in tokens
is what the provider reported for the newest answer in it (prompt + answer) plus an estimate
of what was added after that answer (about four characters per token); before any answer, the
estimate alone. Past ``threshold`` (a fraction) of the model's context limit, the chat first
summarizes: every message up to the one before the turn's newest user message (so the request
being answered stays word for word), or, when the turn itself fills the context, everything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from chatd.domain.conversation import (
    Message,
    ReasoningPart,
    SummaryPart,
    TextPart,
    ToolCallPart,
    ToolResultPart,
)
from chatd.domain.stream_parts import Usage

CHARS_PER_TOKEN = 4
# The transcript a summary call reads is cut to this many characters per message: a tool's
# huge output says little that its first lines do not.
TRANSCRIPT_MESSAGE_CHARS = 4000


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def message_chars(message: Message) -> int:
    total = 0
    for part in message.parts:
        match part:
            case TextPart(text=text) | ReasoningPart(text=text) | SummaryPart(text=text):
                total += len(text)
            case ToolCallPart(name=name, arguments=arguments):
                total += len(name) + len(arguments)
            case ToolResultPart(output=output):
                total += len(output)
    return total


def prompt_tokens(system: str, history: Sequence[Message], usages: Sequence[Usage | None]) -> int:
    """The size of the next prompt: ``usages[i]`` is what the provider reported for
    ``history[i]`` (an answer in this prompt), or None."""
    for index in range(len(history) - 1, -1, -1):
        usage = usages[index]
        if usage is not None:
            later = sum(message_chars(m) for m in history[index + 1 :])
            return usage.input_tokens + usage.output_tokens + math.ceil(later / CHARS_PER_TOKEN)
    chars = len(system) + sum(message_chars(m) for m in history)
    return math.ceil(chars / CHARS_PER_TOKEN)


def over_threshold(tokens: int, context_limit: int, threshold: float) -> bool:
    return context_limit > 0 and tokens > context_limit * threshold


def summary_cut(history: Sequence[Message], *, whole: bool) -> int | None:
    """How many of ``history``'s messages the summary covers (None: nothing to summarize).
    ``whole``: all of them (asked for by hand); else up to the turn's newest user message,
    or all when that message is the first one."""
    if not history:
        return None
    if whole:
        return len(history)
    newest_user = max((i for i, m in enumerate(history) if m.role == "user"), default=0)
    return newest_user if newest_user > 0 else len(history)


def summary_request_text(previous: str, covered: Sequence[Message]) -> str:
    """The user message of a summary call: the earlier summary, then a transcript."""
    lines: list[str] = []
    if previous:
        lines += ["Summary of the conversation before this part:", previous, ""]
    lines.append("Conversation:")
    for message in covered:
        lines.append(f"{_speaker(message)}: {_clip(_message_text(message))}")
    return "\n".join(lines)


def system_with_summary(system: str, summary: str) -> str:
    if not summary:
        return system
    note = f"Summary of the conversation so far (the earlier messages are not shown):\n{summary}"
    return f"{system}\n\n{note}" if system else note


def _speaker(message: Message) -> str:
    return {"user": "User", "assistant": "Assistant", "tool": "Tool results"}.get(
        message.role, message.role.capitalize()
    )


def _message_text(message: Message) -> str:
    pieces: list[str] = []
    for part in message.parts:
        match part:
            case TextPart(text=text):
                pieces.append(text)
            case ToolCallPart(name=name, arguments=arguments):
                pieces.append(f"[calls {name} {arguments}]")
            case ToolResultPart(output=output):
                pieces.append(f"[result {output}]")
            case SummaryPart(text=text):
                pieces.append(text)
            case ReasoningPart():
                pass
    return " ".join(pieces)


def _clip(text: str) -> str:
    if len(text) <= TRANSCRIPT_MESSAGE_CHARS:
        return text
    half = TRANSCRIPT_MESSAGE_CHARS // 2
    return f"{text[:half]} [... {len(text) - 2 * half} characters cut ...] {text[-half:]}"
