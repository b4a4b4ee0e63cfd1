"""OpenAI chat completions on the wire: request facts in, response and SSE bytes out.

Shapes follow the real service: ``chat.completion.chunk`` objects as ``data:`` lines (role
delta first, then content / tool-call deltas, a finish chunk, a usage chunk with no choices when
``stream_options.include_usage`` is set, then ``data: [DONE]``). Reasoning, which OpenAI's chat
completions do not stream, goes out as ``reasoning_content`` deltas the way OpenAI-compatible
servers (DeepSeek, vLLM) send it.
"""

from __future__ import annotations

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
    mask_key,
    purpose_of,
    text_chars,
)

PROVIDER = "openai"
DEFAULT_CONTEXT_WINDOW = 128_000
_FINGERPRINT = "fp_fakellm"
_encode = msgspec.json.Encoder().encode
_DONE = b"data: [DONE]\n\n"


def parse_request(body: Any) -> RequestFacts:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("Missing required parameter: 'messages'.", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"Invalid type for 'messages[{i}]': expected an object with a role.",
                f"messages[{i}]",
            )
    stream = body.get("stream") is True
    options = body.get("stream_options")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    anchor, last_user_text = -1, None  # the last user message that has text
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user" and (text := content_text(messages[i].get("content"))):
            anchor, last_user_text = i, text
            break
    first_system = next((m for m in messages if m["role"] in _SYSTEM_ROLES), None)
    return RequestFacts(
        model=model,
        stream=stream,
        include_usage=stream and isinstance(options, dict) and options.get("include_usage") is True,
        last_user_text=last_user_text,
        last_is_tool_result=messages[-1]["role"] == "tool",
        input_chars=text_chars(messages),
        max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None,
        step_index=sum(m["role"] == "assistant" for m in messages[anchor + 1 :]),
        purpose=purpose_of(
            "" if first_system is None else content_text(first_system.get("content"))
        ),
    )


_SYSTEM_ROLES = ("system", "developer")


def digest_parts(body: Any) -> tuple[Any, ...]:
    """What identifies a request for its stable tool call ids: the messages (system included)."""
    return (body.get("messages"),) if isinstance(body, dict) else (body,)


def system_text(body: Any) -> str:
    """The text of the system (and developer) messages, joined by a blank line."""
    return "\n\n".join(
        content_text(m.get("content")) for m in _messages(body) if m.get("role") in _SYSTEM_ROLES
    )


def conversation(body: Any) -> list[tuple[str, str]]:
    """``(role, text)`` per message but the system ones; tool calls are not text."""
    return [
        (str(m.get("role", "")), content_text(m.get("content")))
        for m in _messages(body)
        if m.get("role") not in _SYSTEM_ROLES
    ]


def _messages(body: Any) -> list[dict[str, Any]]:
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return []
    return [m for m in messages if isinstance(m, dict)]


def api_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    return auth[7:] if auth[:7].lower() == "bearer " else None


def headers(request_id: str, content_type: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", content_type), (b"x-request-id", request_id.encode())]


def render_stream(
    plan: ReplyPlan, *, token: str, created: int, include_usage: bool
) -> StreamScript:
    base: dict[str, Any] = {
        "id": f"chatcmpl-{token}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": plan.model,
        "system_fingerprint": _FINGERPRINT,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        obj = {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            obj["usage"] = None
        return b"data: " + _encode(obj) + b"\n\n"

    first_content: str | None = "" if plan.text or not plan.tool_calls else None
    head = chunk({"role": "assistant", "content": first_content, "refusal": None})
    chunks = [chunk({"reasoning_content": piece}) for piece in plan.reasoning]
    chunks += [chunk({"content": piece}) for piece in plan.text]
    for index, call in enumerate(plan.tool_calls):
        start = {
            "index": index,
            "id": f"call_{call.id}",
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        opening = chunk({"tool_calls": [start]})
        for n, piece in enumerate(call.pieces):
            delta = {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
            chunks.append((opening if n == 0 else b"") + chunk(delta))
    tail = chunk({}, _FINISH[plan.finish])
    if include_usage:
        tail += b"data: " + _encode({**base, "choices": [], "usage": _usage(plan)}) + b"\n\n"
    error = {"error": _error_object(Fault.SERVER_ERROR, _STOCK[Fault.SERVER_ERROR][1])}
    return StreamScript(head, chunks, tail + _DONE, b"data: " + _encode(error) + b"\n\n")


def render_message(plan: ReplyPlan, *, token: str, created: int) -> bytes:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(plan.text) if plan.text or not plan.tool_calls else None,
        "refusal": None,
        "annotations": [],
    }
    if plan.reasoning:
        message["reasoning_content"] = "".join(plan.reasoning)
    if plan.tool_calls:
        message["tool_calls"] = [
            {
                "id": f"call_{c.id}",
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments_json},
            }
            for c in plan.tool_calls
        ]
    return _encode(
        {
            "id": f"chatcmpl-{token}",
            "object": "chat.completion",
            "created": created,
            "model": plan.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": _FINISH[plan.finish],
                }
            ],
            "usage": _usage(plan),
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
        }
    )


def render_error(case: ErrorCase) -> tuple[int, bytes]:
    status, message = _STOCK[case.fault]
    if case.message is not None:
        message = case.message
    elif case.fault is Fault.AUTH:
        message = (
            f"Incorrect API key provided: {mask_key(case.api_key)}. You can find your API key "
            "at https://platform.openai.com/account/api-keys."
            if case.api_key
            else "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    elif case.fault is Fault.CONTEXT_LENGTH:
        window = case.context_window or DEFAULT_CONTEXT_WINDOW
        message = message.format(window=window, tokens=window + case.input_tokens)
    else:
        message = message.format(model=case.model)
    body = _error_object(case.fault, message, case.param)
    if case.fault is Fault.AUTH and not case.api_key:
        body["code"] = None
    return status, _encode({"error": body})


def _error_object(fault: Fault, message: str, param: str | None = None) -> dict[str, Any]:
    kind, code, default_param = _TYPES[fault]
    return {"message": message, "type": kind, "param": param or default_param, "code": code}


def _usage(plan: ReplyPlan) -> dict[str, Any]:
    return {
        "prompt_tokens": plan.input_tokens,
        "completion_tokens": plan.output_tokens,
        "total_tokens": plan.input_tokens + plan.output_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": len(plan.reasoning),
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


_FINISH = {Finish.STOP: "stop", Finish.LENGTH: "length", Finish.TOOL_CALLS: "tool_calls"}

# fault -> (status, message template); templates use {model}, {window}, {tokens}.
_STOCK: dict[Fault, tuple[int, str]] = {
    Fault.RATE_LIMIT: (
        429,
        (
            "Rate limit reached for {model} in organization org-fakellm on requests per min (RPM): "
            "Limit 3, Used 3, Requested 1. Please try again in 20s. Visit "
            "https://platform.openai.com/account/rate-limits to learn more."
        ),
    ),
    Fault.SERVER_ERROR: (
        500,
        "The server had an error while processing your request. Sorry about that!",
    ),
    Fault.UNAVAILABLE: (503, "The server is temporarily unavailable. Please try again later."),
    # OpenAI has no 529: an overloaded engine answers 503 and says so.
    Fault.OVERLOADED: (
        503,
        (
            "That model is currently overloaded with other requests. You can retry your request, "
            "or contact us through our help center at help.openai.com if the error persists."
        ),
    ),
    Fault.AUTH: (401, ""),
    Fault.CONTEXT_LENGTH: (
        400,
        (
            "This model's maximum context length is {window} tokens. However, your messages "
            "resulted in {tokens} tokens. Please reduce the length of the messages."
        ),
    ),
    Fault.BAD_REQUEST: (400, "Invalid request: rejected by the fake LLM server (bad_request)."),
    Fault.NOT_FOUND: (
        404,
        "The model `{model}` does not exist or you do not have access to it.",
    ),
}

# fault -> (error.type, error.code, error.param)
_TYPES: dict[Fault, tuple[str, str | None, str | None]] = {
    Fault.RATE_LIMIT: ("requests", "rate_limit_exceeded", None),
    Fault.SERVER_ERROR: ("server_error", None, None),
    Fault.UNAVAILABLE: ("server_error", None, None),
    Fault.OVERLOADED: ("server_error", None, None),
    Fault.AUTH: ("invalid_request_error", "invalid_api_key", None),
    Fault.CONTEXT_LENGTH: ("invalid_request_error", "context_length_exceeded", "messages"),
    Fault.BAD_REQUEST: ("invalid_request_error", None, None),
    Fault.NOT_FOUND: ("invalid_request_error", "model_not_found", None),
}
