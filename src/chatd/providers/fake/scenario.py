"""What the fake provider does for one request: the knobs, where they come from, the reply plan.

Pure: no I/O. Knobs come from the server's defaults, then a ``[[fake-llm {...}]]`` marker in
the last user message's text, then the ``x-fake-llm`` header (each later source wins, knob by
knob). chatd's own summary and title calls (recognised by their system text) ignore markers and
get a reply made from their input. The wire modules turn a ``ReplyPlan`` into one provider's
bytes.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import json
import math
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, NamedTuple

import msgspec

from chatd.domain.agent_prompts import SUMMARY_SYSTEM, TITLE_SYSTEM

KNOB_HEADER = "x-fake-llm"
MARKER_PREFIX = "[[fake-llm"


class Fault(StrEnum):
    """A failure to inject: the first group answers with an HTTP error, the rest break a stream."""

    RATE_LIMIT = "rate_limit"
    SERVER_ERROR = "server_error"
    UNAVAILABLE = "unavailable"
    OVERLOADED = "overloaded"
    AUTH = "auth"
    CONTEXT_LENGTH = "context_length"
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    CUT = "cut"
    TRUNCATED = "truncated"
    SILENT = "silent"
    MIDSTREAM_ERROR = "midstream_error"


STREAM_FAULTS = frozenset({Fault.CUT, Fault.TRUNCATED, Fault.SILENT, Fault.MIDSTREAM_ERROR})


class Purpose(StrEnum):
    """Whose request it is: a chat step, or one of chatd's own calls (told by its system text)."""

    CHAT = "chat"
    SUMMARY = "summary"
    TITLE = "title"


def purpose_of(system_text: str) -> Purpose:
    if system_text == SUMMARY_SYSTEM:
        return Purpose.SUMMARY
    if system_text == TITLE_SYSTEM:
        return Purpose.TITLE
    return Purpose.CHAT


# What chatd's own calls answer: the summary quotes this much of its input, the title this many
# words of it.
SUMMARY_QUOTE_CHARS = 200
TITLE_WORDS = 6
UNTITLED = "Untitled"


class Finish(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"


class InvalidRequest(ValueError):
    """The request cannot be served; answered with a 400 in the provider's error shape."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class KnobError(InvalidRequest):
    """A knob is unknown or has a bad value; the message names the knob and its source."""


@dataclass(frozen=True, slots=True)
class ToolCallSpec:
    name: str
    arguments: Mapping[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class StepSpec:
    """One scripted model step of a turn: tool calls (with optional text first), or a reply."""

    tool_calls: tuple[ToolCallSpec, ...] = ()
    reply: str | None = None
    text_before_tools: bool | None = None  # None: the scenario's ``text_before_tools``


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    """Every knob with its default. See the package docstring for what each one does."""

    chunks: int = 8
    reply: str | None = None
    first_chunk_delay_ms: float = 0.0
    chunk_interval_ms: float = 0.0
    tool_calls: tuple[ToolCallSpec, ...] = ()
    steps: tuple[StepSpec, ...] = ()
    argument_chunks: int = 3
    text_before_tools: bool = False
    reasoning_chunks: int = 0
    finish: Literal["stop", "length"] = "stop"
    input_tokens: int | None = None
    output_tokens: int | None = None
    fault: Fault | None = None
    fault_after_chunks: int = 2
    fault_times: int | None = None
    fault_key: str | None = None
    retry_after_s: float | None = None
    retry_after_ms: int | None = None
    retry_after_http_date: bool = False
    context_window: int | None = None

    def __post_init__(self) -> None:
        # The same checks as for JSON knobs, so a bad server default fails at construction,
        # and the same normal forms (floats for times, a Fault, ToolCallSpecs, StepSpecs).
        for f in dataclasses.fields(self):
            value = _PARSERS[f.name](f.name, _as_json(getattr(self, f.name)), "Scenario")
            object.__setattr__(self, f.name, value)

    def with_knobs(self, knobs: Mapping[str, Any]) -> Scenario:
        """This scenario with already-parsed knobs (from ``parse_knobs``) applied."""
        return dataclasses.replace(self, **knobs) if knobs else self


def _as_json(value: Any) -> Any:
    """A Python knob value back in its JSON form, for the shared checks."""
    if isinstance(value, tuple | list):
        return [_as_json(v) for v in value]
    if isinstance(value, ToolCallSpec):
        return {"name": value.name, "arguments": dict(value.arguments)}
    if isinstance(value, StepSpec):
        step: dict[str, Any] = {}
        if value.tool_calls:
            step["tool_calls"] = _as_json(value.tool_calls)
        if value.reply is not None:
            step["reply"] = value.reply
        if value.text_before_tools is not None:
            step["text_before_tools"] = value.text_before_tools
        return step
    if isinstance(value, Fault):
        return value.value
    return value


# -- knob parsing ------------------------------------------------------------------------------


def _bad(source: str, name: str, rule: str, value: Any) -> KnobError:
    return KnobError(f"{source}: knob {name!r} must be {rule}, got {json.dumps(value)[:80]}")


def _count(minimum: int) -> Callable[[str, Any, str], int]:
    def parse(name: str, value: Any, source: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _bad(source, name, f"an integer >= {minimum}", value)
        return value

    return parse


def _millis(name: str, value: Any, source: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise _bad(source, name, "a number >= 0", value)
    return float(value)


def _flag(name: str, value: Any, source: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(source, name, "true or false", value)
    return value


def _text(name: str, value: Any, source: str) -> str:
    if not isinstance(value, str):
        raise _bad(source, name, "a string", value)
    return value


def _optional(parse: Callable[[str, Any, str], Any]) -> Callable[[str, Any, str], Any]:
    def parse_optional(name: str, value: Any, source: str) -> Any:
        return None if value is None else parse(name, value, source)

    return parse_optional


def _fault(name: str, value: Any, source: str) -> Fault:
    try:
        return Fault(value)
    except ValueError:
        rule = "one of " + ", ".join(f.value for f in Fault)
        raise _bad(source, name, rule, value) from None


def _finish(name: str, value: Any, source: str) -> str:
    if value not in ("stop", "length"):
        raise _bad(source, name, '"stop" or "length"', value)
    return str(value)


def _tool_calls(name: str, value: Any, source: str) -> tuple[ToolCallSpec, ...]:
    rule = 'a list of {"name": non-empty string, "arguments": object}'
    if not isinstance(value, list):
        raise _bad(source, name, rule, value)
    calls = []
    for item in value:
        if (
            not isinstance(item, dict)
            or set(item) - {"name", "arguments"}
            or not isinstance(item.get("name"), str)
            or not item["name"]
            or not isinstance(item.get("arguments", {}), dict)
        ):
            raise _bad(source, name, rule, value)
        calls.append(ToolCallSpec(item["name"], item.get("arguments", {})))
    return tuple(calls)


def _steps(name: str, value: Any, source: str) -> tuple[StepSpec, ...]:
    if not isinstance(value, list):
        raise _bad(source, name, "a list of steps", value)
    steps = []
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        rule = (
            'an object with "tool_calls" (a non-empty list) or "reply" or both, and optionally '
            '"text_before_tools"'
        )
        if (
            not isinstance(item, dict)
            or set(item) - {"tool_calls", "reply", "text_before_tools"}
            or not (item.get("tool_calls") or item.get("reply") is not None)
        ):
            raise _bad(source, where, rule, item)
        text_before = item.get("text_before_tools")
        steps.append(
            StepSpec(
                tool_calls=_tool_calls(f"{where}.tool_calls", item.get("tool_calls", []), source),
                reply=_optional(_text)(f"{where}.reply", item.get("reply"), source),
                text_before_tools=(
                    None
                    if text_before is None
                    else _flag(f"{where}.text_before_tools", text_before, source)
                ),
            )
        )
    return tuple(steps)


_PARSERS: dict[str, Callable[[str, Any, str], Any]] = {
    "chunks": _count(0),
    "reply": _optional(_text),
    "first_chunk_delay_ms": _millis,
    "chunk_interval_ms": _millis,
    "tool_calls": _tool_calls,
    "steps": _steps,
    "argument_chunks": _count(1),
    "text_before_tools": _flag,
    "reasoning_chunks": _count(0),
    "finish": _finish,
    "input_tokens": _optional(_count(0)),
    "output_tokens": _optional(_count(0)),
    "fault": _optional(_fault),
    "fault_after_chunks": _count(0),
    "fault_times": _optional(_count(0)),
    "fault_key": _optional(_text),
    "retry_after_s": _optional(_millis),
    "retry_after_ms": _optional(_count(0)),
    "retry_after_http_date": _flag,
    "context_window": _optional(_count(1)),
}
KNOBS = tuple(_PARSERS)


def parse_knobs(raw: Any, source: str) -> dict[str, Any]:
    """Validate a JSON object of knobs; return them as ``Scenario`` field values."""
    if not isinstance(raw, dict):
        raise KnobError(f"{source}: expected a JSON object of knobs, got {json.dumps(raw)[:80]}")
    knobs: dict[str, Any] = {}
    for name, value in raw.items():
        parse = _PARSERS.get(name)
        if parse is None:
            raise KnobError(f"{source}: unknown knob {name!r}; known knobs: {', '.join(KNOBS)}")
        knobs[name] = parse(name, value, source)
    return knobs


def parse_header(text: str) -> dict[str, Any]:
    source = f"{KNOB_HEADER} header"
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KnobError(f"{source} is not valid JSON: {exc}") from None
    return parse_knobs(raw, source)


_MARKER = re.compile(re.escape(MARKER_PREFIX) + r"\s*")
_DECODER = json.JSONDecoder()


def parse_markers(text: str) -> dict[str, Any]:
    """Knobs of every ``[[fake-llm {...}]]`` marker in ``text``, later markers winning."""
    knobs: dict[str, Any] = {}
    source = f"{MARKER_PREFIX} ...]] marker"
    for match in _MARKER.finditer(text):
        try:
            raw, end = _DECODER.raw_decode(text, match.end())
        except json.JSONDecodeError as exc:
            raise KnobError(f"{source}: not valid JSON: {exc}") from None
        if not text[end:].lstrip().startswith("]]"):
            raise KnobError(f"{source}: the JSON object must be followed by ']]'")
        knobs.update(parse_knobs(raw, source))
    return knobs


def strip_markers(text: str) -> str:
    """``text`` without its well-formed markers (a broken one stays: this never fails)."""
    kept: list[str] = []
    start = 0
    for match in _MARKER.finditer(text):
        if match.start() < start:
            continue  # inside a marker already removed
        try:
            _, end = _DECODER.raw_decode(text, match.end())
        except json.JSONDecodeError:
            continue
        rest = text[end:]
        closing = len(rest) - len(rest.lstrip())
        if not rest[closing:].startswith("]]"):
            continue
        kept.append(text[start : match.start()])
        start = end + closing + 2
    kept.append(text[start:])
    return "".join(kept)


class Resolved(NamedTuple):
    scenario: Scenario
    knobs: dict[str, Any]  # the request's own knobs (marker, then header), as parsed
    fault_key: str


def resolve(defaults: Scenario, header: str | None, user_text: str | None) -> Resolved:
    """The scenario for one request: defaults, then marker knobs, then header knobs.

    Pass ``user_text=None`` for chatd's own calls: the conversation they carry holds the users'
    markers, which are not meant for them.
    """
    knobs: dict[str, Any] = {}
    if user_text and MARKER_PREFIX in user_text:
        knobs.update(parse_markers(user_text))
    if header is not None:
        knobs.update(parse_header(header))
    scenario = defaults.with_knobs(knobs)
    key = scenario.fault_key
    if key is None:
        key = json.dumps(
            {k: _as_json(v) for k, v in knobs.items()}, sort_keys=True, separators=(",", ":")
        )
    return Resolved(scenario, knobs, key)


def knobs_header(**knobs: Any) -> dict[str, str]:
    """Request headers that carry ``knobs`` (checked now, so a typo fails in the test)."""
    parse_knobs(knobs, "knobs_header()")
    return {KNOB_HEADER: json.dumps(knobs, separators=(",", ":"))}


def knobs_marker(**knobs: Any) -> str:
    """A marker to put in a user message's text that carries ``knobs``."""
    parse_knobs(knobs, "knobs_marker()")
    return f"{MARKER_PREFIX} {json.dumps(knobs, separators=(',', ':'))}]]"


def retry_after_headers(scenario: Scenario, fault: Fault, now: float) -> list[tuple[bytes, bytes]]:
    """``retry-after`` (seconds or an HTTP date at wall time ``now``) and ``retry-after-ms``.

    A rate limit always carries ``retry-after`` (1 s unless set); other errors only when a
    retry-after knob is set.
    """
    s, ms = scenario.retry_after_s, scenario.retry_after_ms
    if fault is not Fault.RATE_LIMIT and s is None and ms is None:
        return []
    if s is None:
        s = 1.0 if ms is None else float(math.ceil(ms / 1000))
    if scenario.retry_after_http_date:
        value = email.utils.formatdate(math.ceil(now + s), usegmt=True)
    else:
        value = str(int(s)) if s.is_integer() else repr(s)
    headers = [(b"retry-after", value.encode())]
    if ms is not None:
        headers.append((b"retry-after-ms", str(ms).encode()))
    return headers


@dataclass(frozen=True, slots=True)
class ErrorCase:
    """An error answer to render in a provider's shape."""

    fault: Fault  # which error; the status faults only
    request_id: str
    message: str | None = None  # replaces the provider's stock message (validation errors)
    param: str | None = None
    model: str = ""
    input_tokens: int = 0
    context_window: int | None = None
    api_key: str | None = None  # the key the client presented, for auth errors


def mask_key(key: str) -> str:
    """A key the way providers echo it in auth errors: a few characters, the rest starred."""
    if len(key) <= 8:
        return "*" * len(key)
    return key[:3] + "*" * (len(key) - 7) + key[-4:]


# -- the reply ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the reply depends on, read from a provider request by its wire module."""

    model: str
    stream: bool
    include_usage: bool
    last_user_text: str | None
    last_is_tool_result: bool
    input_chars: int
    max_tokens: int | None
    # Assistant messages after the last user message that has text: the scripted step to play.
    step_index: int = 0
    purpose: Purpose = Purpose.CHAT


@dataclass(frozen=True, slots=True)
class PlannedToolCall:
    id: str  # provider-neutral; the wire module adds its prefix ("call_", "toolu_")
    name: str
    arguments: Mapping[str, Any]
    arguments_json: str
    pieces: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReplyPlan:
    """One model step's output, provider-neutral. Every piece is one streamed content chunk."""

    model: str
    reasoning: tuple[str, ...]
    text: tuple[str, ...]
    tool_calls: tuple[PlannedToolCall, ...]
    finish: Finish
    input_tokens: int
    output_tokens: int

    @property
    def chunk_count(self) -> int:
        return len(self.reasoning) + len(self.text) + sum(len(c.pieces) for c in self.tool_calls)


class StreamScript(NamedTuple):
    """A streamed reply in wire bytes, cut where the server may pause or inject a fault."""

    head: bytes  # sent with the response headers (role chunk / message_start)
    chunks: list[bytes]  # one per content chunk, with any block boundary before it
    tail: bytes  # finish, usage and the terminal event
    error: bytes  # the in-stream error event of `midstream_error`


def split_even(text: str, pieces: int) -> tuple[str, ...]:
    """``text`` in ``pieces`` contiguous parts of near-equal length (fewer if it is shorter)."""
    pieces = min(pieces, len(text))
    if pieces <= 0:
        return ()
    size, extra = divmod(len(text), pieces)
    parts, start = [], 0
    for i in range(pieces):
        end = start + size + (1 if i < extra else 0)
        parts.append(text[start:end])
        start = end
    return tuple(parts)


def text_chars(value: Any) -> int:
    """Total length of the strings inside a JSON value: the basis of fake input token counts."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(text_chars(v) for v in value)
    if isinstance(value, dict):
        return sum(text_chars(v) for v in value.values())
    return 0


def request_digest(*parts: Any) -> str:
    """A hash of a request's JSON parts (its messages, its system text): same request, same hash."""
    return hashlib.sha256(msgspec.json.encode(parts)).hexdigest()


def own_reply(purpose: Purpose, user_text: str | None) -> str:
    """What chatd's summary or title call gets, made from its last user message's text."""
    text = " ".join(strip_markers(user_text or "").split())
    if purpose is Purpose.SUMMARY:
        return f"Summary: {text[:SUMMARY_QUOTE_CHARS]}".rstrip()
    if purpose is Purpose.TITLE:
        title = " ".join(text.split()[:TITLE_WORDS]).rstrip(string.punctuation + " ")
        return title or UNTITLED
    raise ValueError(f"purpose {purpose} has no reply of its own")


# chatd's own replies go a word per chunk, so their output tokens count their words.
_WORD = re.compile(r"\S+\s*")


class _Content(NamedTuple):
    text: tuple[str, ...]
    tools: tuple[ToolCallSpec, ...]
    text_before_tools: bool
    call_id: str  # a format string for the call index


def _content(scenario: Scenario, facts: RequestFacts, id_token: str, digest: str) -> _Content:
    """The text and the tool calls this request gets, before the finish and truncation."""
    if facts.purpose is not Purpose.CHAT:
        own = own_reply(facts.purpose, facts.last_user_text)
        return _Content(tuple(_WORD.findall(own)), (), text_before_tools=False, call_id="")
    reply, tools = scenario.reply, scenario.tool_calls
    text_before_tools, call_id = scenario.text_before_tools, f"{id_token}_{{}}"
    if scenario.steps:
        tools = ()
        if facts.step_index < len(scenario.steps):
            step = scenario.steps[facts.step_index]
            tools = step.tool_calls
            reply = step.reply if step.reply is not None else reply
            if step.text_before_tools is not None:
                text_before_tools = step.text_before_tools
            call_id = f"{digest[:16] or id_token}_{facts.step_index}_{{}}"
    elif facts.last_is_tool_result:
        tools = ()
    if reply is not None:
        text = split_even(reply, scenario.chunks)
    else:
        text = tuple(f"w{i} " for i in range(1, scenario.chunks + 1))
    return _Content(text, tools, text_before_tools, call_id)


def plan_reply(
    scenario: Scenario, facts: RequestFacts, id_token: str, *, digest: str = ""
) -> ReplyPlan:
    """What to answer. A request ending in a tool result gets text, so tool loops end; scripted
    ``steps`` go by ``facts.step_index`` instead, and their call ids are ``digest`` (a hash of
    the request, so a repeated request gets the same ids), the step index and the call index.
    chatd's own calls get ``own_reply``, a chunk per word, and never call tools."""
    reasoning = tuple(f"r{i} " for i in range(1, scenario.reasoning_chunks + 1))
    text, tools, text_before_tools, call_id = _content(scenario, facts, id_token, digest)
    calls: tuple[PlannedToolCall, ...] = ()
    if tools:
        finish = Finish.TOOL_CALLS
        if not text_before_tools:
            text = ()
        calls = tuple(
            _plan_call(call_id.format(i), spec, scenario.argument_chunks)
            for i, spec in enumerate(tools)
        )
    else:
        finish = Finish.LENGTH if scenario.finish == "length" else Finish.STOP
        if facts.max_tokens is not None and len(reasoning) + len(text) > facts.max_tokens:
            text = text[: max(0, facts.max_tokens - len(reasoning))]
            finish = Finish.LENGTH
    output = len(reasoning) + len(text) + sum(len(c.pieces) for c in calls)
    return ReplyPlan(
        model=facts.model,
        reasoning=reasoning,
        text=text,
        tool_calls=calls,
        finish=finish,
        input_tokens=(
            scenario.input_tokens
            if scenario.input_tokens is not None
            else max(1, math.ceil(facts.input_chars / 4))
        ),
        output_tokens=scenario.output_tokens if scenario.output_tokens is not None else output,
    )


def _plan_call(call_id: str, spec: ToolCallSpec, pieces: int) -> PlannedToolCall:
    arguments_json = json.dumps(spec.arguments, separators=(",", ":"))
    return PlannedToolCall(
        id=call_id,
        name=spec.name,
        arguments=spec.arguments,
        arguments_json=arguments_json,
        pieces=split_even(arguments_json, pieces),
    )


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the joined text parts of a list."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "".join(
        part["text"]
        for part in content
        if isinstance(part, dict)
        and part.get("type") == "text"
        and isinstance(part.get("text"), str)
    )
