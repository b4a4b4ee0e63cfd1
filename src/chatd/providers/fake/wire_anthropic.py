"""Anthropic messages on the wire: request facts in, response and SSE bytes out.

A stream is ``message_start`` (input token usage), a ``ping``, then per content block
``content_block_start`` / ``content_block_delta``... / ``content_block_stop`` (thinking blocks
end with a ``signature_delta``; tool_use blocks stream ``input_json_delta`` pieces), then
``message_delta`` (stop reason, output tokens) and ``message_stop``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import msgspec

from chatd.providers.fake.scenario import (
    ErrorCase,
    Fault,
    Finish,
    InvalidRequest,
    ReplyPlan,
    RequestFacts,
    StreamScript,
    content_text,
    purpose_of,
    text_chars,
)

PROVIDER = "anthropic"
DEFAULT_CONTEXT_WINDOW = 200_000
_encode = msgspec.json.Encoder().encode


def parse_request(body: Any) -> RequestFacts:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Field required", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: Field required", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise InvalidRequest(f"messages.{i}: expected an object with role user or assistant")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequest("max_tokens: Field required (an integer >= 1)", "max_tokens")
    # Tool results come back in user messages of tool_result blocks: those have no text, so
    # the turn's anchor is the last user message that has.
    anchor, last_user_text = -1, None
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user" and (text := content_text(messages[i].get("content"))):
            anchor, last_user_text = i, text
            break
    return RequestFacts(
        model=model,
        stream=body.get("stream") is True,
        include_usage=True,
        last_user_text=last_user_text,
        last_is_tool_result=bool(_tool_results(messages[-1])),
        input_chars=text_chars(messages) + text_chars(body.get("system")),
        max_tokens=max_tokens,
        step_index=sum(m["role"] == "assistant" for m in messages[anchor + 1 :]),
        purpose=purpose_of(system_text(body)),
    )


def _tool_results(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if message.get("role") != "user" or not isinstance(content, list):
        return []
    return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]


def digest_parts(body: Any) -> tuple[Any, ...]:
    """What identifies a request for its stable tool call ids: the system and the messages."""
    if not isinstance(body, dict):
        return (body,)
    return body.get("system"), body.get("messages")


def system_text(body: Any) -> str:
    """The ``system`` field: a string, or the joined text of its text blocks."""
    return content_text(body.get("system")) if isinstance(body, dict) else ""


def conversation(body: Any) -> list[tuple[str, str]]:
    """``(role, text)`` per message, shaped like OpenAI's: each tool_result block of a user
    message is a ``("tool", its text)`` entry, and the user entry (if it has text) follows them;
    tool calls are not text."""
    messages = body.get("messages") if isinstance(body, dict) else None
    pairs: list[tuple[str, str]] = []
    for m in messages if isinstance(messages, list) else []:
        if not isinstance(m, dict):
            continue
        results = _tool_results(m)
        pairs += [("tool", content_text(r.get("content"))) for r in results]
        text = content_text(m.get("content"))
        if text or not results:
            pairs.append((str(m.get("role", "")), text))
    return pairs


def api_key(headers: Mapping[str, str]) -> str | None:
    if (key := headers.get("x-api-key")) is not None:
        return key
    auth = headers.get("authorization", "")
    return auth[7:] if auth[:7].lower() == "bearer " else None


def headers(request_id: str, content_type: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", content_type), (b"request-id", request_id.encode())]


def _event(name: bytes, data: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + _encode(data) + b"\n\n"


def _block_event(kind: bytes, index: int, **fields: Any) -> bytes:
    return _event(kind, {"type": kind.decode(), "index": index, **fields})


def _signature(thinking: str) -> str:
    return hashlib.sha256(thinking.encode()).hexdigest()


def render_stream(
    plan: ReplyPlan,
    *,
    token: str,
    created: int,  # noqa: ARG001
    include_usage: bool,  # noqa: ARG001
) -> StreamScript:
    head = _event(
        b"message_start",
        {"type": "message_start", "message": {**_message_shell(plan, token), "content": []}},
    ) + _event(b"ping", {"type": "ping"})
    chunks: list[bytes] = []
    pending = b""  # block boundaries, sent with the next chunk (or the tail)
    index = 0

    def block(start: dict[str, Any], deltas: list[dict[str, Any]], end: bytes = b"") -> None:
        nonlocal pending, index
        pending += _block_event(b"content_block_start", index, content_block=start)
        for delta in deltas:
            chunks.append(pending + _block_event(b"content_block_delta", index, delta=delta))
            pending = b""
        pending += end + _block_event(b"content_block_stop", index)
        index += 1

    if plan.reasoning:
        signature = _signature("".join(plan.reasoning))
        block(
            {"type": "thinking", "thinking": "", "signature": ""},
            [{"type": "thinking_delta", "thinking": piece} for piece in plan.reasoning],
            _block_event(
                b"content_block_delta",
                index,
                delta={"type": "signature_delta", "signature": signature},
            ),
        )
    if plan.text:
        block(
            {"type": "text", "text": ""},
            [{"type": "text_delta", "text": piece} for piece in plan.text],
        )
    for call in plan.tool_calls:
        block(
            {"type": "tool_use", "id": f"toolu_{call.id}", "name": call.name, "input": {}},
            [{"type": "input_json_delta", "partial_json": piece} for piece in call.pieces],
        )
    tail = pending + _event(
        b"message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": _STOP[plan.finish], "stop_sequence": None},
            "usage": {"input_tokens": plan.input_tokens, "output_tokens": plan.output_tokens},
        },
    )
    tail += _event(b"message_stop", {"type": "message_stop"})
    error = _event(b"error", _error_body("overloaded_error", "Overloaded", f"req_{token}"))
    return StreamScript(head, chunks, tail, error)


def render_message(plan: ReplyPlan, *, token: str, created: int) -> bytes:  # noqa: ARG001
    content: list[dict[str, Any]] = []
    if plan.reasoning:
        thinking = "".join(plan.reasoning)
        content.append(
            {"type": "thinking", "thinking": thinking, "signature": _signature(thinking)}
        )
    if plan.text:
        content.append({"type": "text", "text": "".join(plan.text)})
    content.extend(
        {"type": "tool_use", "id": f"toolu_{c.id}", "name": c.name, "input": dict(c.arguments)}
        for c in plan.tool_calls
    )
    message = _message_shell(plan, token)
    message["content"] = content
    message["stop_reason"] = _STOP[plan.finish]
    message["usage"]["output_tokens"] = plan.output_tokens
    return _encode(message)


def _message_shell(plan: ReplyPlan, token: str) -> dict[str, Any]:
    return {
        "id": f"msg_{token}",
        "type": "message",
        "role": "assistant",
        "model": plan.model,
        "content": None,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": plan.input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 1,
            "service_tier": "standard",
        },
    }


def render_error(case: ErrorCase) -> tuple[int, bytes]:
    status, kind, message = _STOCK[case.fault]
    if case.message is not None:
        message = case.message
    elif case.fault is Fault.AUTH:
        message = "invalid x-api-key" if case.api_key else "x-api-key header is required"
    else:
        window = case.context_window or DEFAULT_CONTEXT_WINDOW
        message = message.format(model=case.model, window=window, tokens=window + case.input_tokens)
    return status, _encode(_error_body(kind, message, case.request_id))


def _error_body(kind: str, message: str, request_id: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}


_STOP = {Finish.STOP: "end_turn", Finish.LENGTH: "max_tokens", Finish.TOOL_CALLS: "tool_use"}

# fault -> (status, error.type, message template); templates use {model}, {window}, {tokens}.
_STOCK: dict[Fault, tuple[int, str, str]] = {
    Fault.RATE_LIMIT: (
        429,
        "rate_limit_error",
        (
            "This request would exceed the rate limit for your organization of 50 requests per "
            "minute. For details, refer to: https://docs.claude.com/en/api/rate-limits. You can "
            "see the response headers for current usage. Please try again later."
        ),
    ),
    Fault.SERVER_ERROR: (500, "api_error", "Internal server error"),
    Fault.UNAVAILABLE: (503, "api_error", "Service unavailable"),
    Fault.OVERLOADED: (529, "overloaded_error", "Overloaded"),
    Fault.AUTH: (401, "authentication_error", ""),
    Fault.CONTEXT_LENGTH: (
        400,
        "invalid_request_error",
        "prompt is too long: {tokens} tokens > {window} maximum",
    ),
    Fault.BAD_REQUEST: (
        400,
        "invalid_request_error",
        "Invalid request: rejected by the fake LLM server (bad_request).",
    ),
    Fault.NOT_FOUND: (404, "not_found_error", "model: {model}"),
}
