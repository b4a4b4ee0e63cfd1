"""The OpenAPI document: the API described from the same declarations that route it.

Served by ``chatd.web.docs`` (no token needed). Beyond the routes it carries:

- the events each WebSocket sends (``x-websocket-events`` on the route: the frame's schema, one
  event object or an array of them; the event types are component schemas);
- the limits the server enforces on request bodies (``_limits``), from the process's
  settings, so that a body valid by the document is never refused with a 400 for its shape.
  What JSON Schema cannot say (a reference to a row that must exist, names unique within a
  list, a cursor that only this API can make) is said in the field's description.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from chatd.config import Settings
from chatd.tools.registry import BUILTINS
from chatd.web import idempotency
from chatd.web.errors import ErrorResponse
from chatd.web.frames import StreamFrame, WatchFrame
from chatd.web.inbox import NotificationEvent
from chatd.web.routing import API_PREFIX, RouteSpec

_REF = "#/components/schemas/{name}"
_PATH_PARAM = re.compile(r"\{([A-Za-z_]+)\}")
_REASONS = {
    400: "invalid input: the body names the field and the rule",
    401: "missing, unknown or revoked token",
    403: "the token is not an admin's (or the WebSocket's Origin is not allowed)",
    404: "not found, or not the caller's",
    409: (
        "not allowed in the chat's current status, a conflict with existing data, or a "
        "request with the same Idempotency-Key still in progress"
    ),
    413: "the body is larger than max_body_bytes",
    422: "the Idempotency-Key was used for another request (method, path or body)",
    429: "the chat's queue or mailbox is full",
    503: "temporarily unavailable; retry",
    504: "the chat did not answer in time",
}


_IDEMPOTENCY_DOC = (
    "Makes a retry safe: the first request with this key is done and its 2xx answer kept "
    "for idempotency_key_ttl_s; the same request again gets that answer (with "
    "Idempotent-Replayed: true) and nothing is done twice. Another request with the key: "
    "422. While the first one runs: the retry waits for its answer (same process, at most "
    "idempotency_wait_s) or gets 409 with Retry-After. A refused (4xx) request frees its key."
)


def _idempotency_header(max_chars: int) -> dict[str, Any]:
    return {
        "name": idempotency.HEADER,
        "in": "header",
        "required": False,
        "description": _IDEMPOTENCY_DOC,
        "schema": {
            "type": "string",
            "minLength": 1,
            "maxLength": max_chars,
            "pattern": f"^[{idempotency.KEY_CHARSET}]+$",
        },
    }


_UUID_PARAM = {
    "type": "string",
    "format": "uuid",
    "pattern": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
}


def _query_limits(name: str, settings: Settings) -> dict[str, Any]:
    """The bounds ``Query.integer`` checks, by parameter name (the same for every route)."""
    if name == "limit":
        return {"minimum": 1, "maximum": settings.max_page_size}
    if name.endswith("_seq"):
        return {"minimum": 0, "maximum": 2**62}
    if name == "cursor":
        return {"pattern": _NO_NUL}
    return {}


# The events each WebSocket route sends: (component name, type of one event, description).
WS_EVENTS: dict[str, tuple[str, Any, str]] = {
    "/chats/<chat_id>/stream": (
        "StreamEvent",
        StreamFrame,
        "A chat's events, tagged by `type`. Resume with the cursor of the last one held.",
    ),
    "/chats/watch": (
        "WatchEvent",
        WatchFrame,
        "Lifecycle events of the caller's chats, tagged by `kind`.",
    ),
    "/notifications/inbox/watch": (
        "InboxEvent",
        NotificationEvent,
        "A new notification of the caller (`type`: notification).",
    ),
}


def document(specs: tuple[RouteSpec, ...], settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or Settings()
    types: list[Any] = [ErrorResponse]
    for spec in specs:
        types += [t for t in (spec.body, spec.response) if t is not None]
    events = [WS_EVENTS[path] for path in sorted(WS_EVENTS)]
    types += [kind for _, kind, _ in events]
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    schema_of = dict(zip(map(id, types), schemas, strict=True))
    for name, kind, text in events:
        components[name] = {**schema_of[id(kind)], "description": text}
    _limits(components, settings)
    error = {"application/json": {"schema": schema_of[id(ErrorResponse)]}}
    paths: dict[str, dict[str, Any]] = {}
    for spec in specs:
        path = spec.openapi_path
        responses = _success(spec, schema_of)
        codes = {401, *spec.errors}
        if spec.body is not None or spec.query or "{" in path:
            codes.add(400)
        if spec.idempotent:
            codes |= {400, 409, 422}
        if spec.admin:
            codes.add(403)
        for code in sorted(codes):
            responses[str(code)] = {"description": _REASONS.get(code, "error"), "content": error}
        # Every path parameter of this API is an id: a UUID in its canonical form.
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": _UUID_PARAM}
            for name in _PATH_PARAM.findall(path)
        ]
        parameters += [
            {
                "name": q.name,
                "in": "query",
                "required": False,
                "description": q.description,
                "schema": {"type": q.type, **_query_limits(q.name, settings)},
            }
            for q in spec.query
        ]
        if spec.idempotent:
            parameters.append(_idempotency_header(settings.idempotency_key_max_chars))
        operation: dict[str, Any] = {
            "summary": spec.summary,
            "tags": [spec.tag],
            "parameters": parameters,
            "responses": responses,
        }
        if spec.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema_of[id(spec.body)]}},
            }
        if spec.method == "WEBSOCKET":
            operation.update(_websocket(spec))
        method = "get" if spec.method == "WEBSOCKET" else spec.method.lower()
        paths.setdefault(path, {})[method] = operation
    paths[f"{API_PREFIX}/openapi.json"] = {
        "get": {
            "summary": "This API's OpenAPI document (no token needed; rendered at /docs)",
            "tags": ["meta"],
            "security": [],
            "parameters": [],
            "responses": {"200": {"description": "the document"}},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "chatd",
            "version": "1",
            "description": (
                "Chats for LLM agents over HTTP and WebSockets. Every route but this document"
                " needs `Authorization: Bearer <token>` (`chatd token create --user NAME`, or"
                " an admin's `POST /api/v1/users/{user_id}/tokens`)."
                " Errors are `{error: {code, message, field, rule}}`. The WebSocket routes"
                " list the events they send in `x-websocket-events`; the event types are the"
                " StreamEvent, WatchEvent and InboxEvent schemas."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _success(spec: RouteSpec, schema_of: dict[int, Any]) -> dict[str, Any]:
    if spec.method == "WEBSOCKET":
        return {"101": {"description": "switching to the WebSocket protocol"}}
    if spec.response is None:
        return {str(spec.status if spec.status != 200 else 204): {"description": "done"}}
    return {
        str(spec.status): {
            "description": "success",
            "content": {spec.media_type: {"schema": schema_of[id(spec.response)]}},
        }
    }


def _websocket(spec: RouteSpec) -> dict[str, Any]:
    """What a WebSocket route's operation says beyond an HTTP one's: the events it sends."""
    name, _, text = WS_EVENTS[spec.path]
    ref = {"$ref": _REF.format(name=name)}
    return {
        "x-websocket": True,
        "description": (
            "A WebSocket (send `Authorization: Bearer`, or `?access_token=` from a browser)."
            " Each text frame is one event or an array of events. " + text
        ),
        "x-websocket-events": {"schema": {"anyOf": [ref, {"type": "array", "items": ref}]}},
    }


# -- the limits the server enforces, declared ------------------------------------------------

_NO_NUL = "^[^\\x00]*$"
# Not empty once stripped (a message of spaces is refused), no NUL.
_NOT_BLANK = "^[^\\x00]*[^\\x00\\s][^\\x00]*$"
_TOOL_NAME = "^[A-Za-z0-9_-]{1,64}$"
_HTTP_URL = "^https?://[A-Za-z0-9._~-]+(:[0-9]{1,5})?(/[!-~]*)?$"
_URL_NO_SPACES = "^https?://[^\\x00\\s]*$"
_PRINTABLE_ASCII = "^[!-~]+$"
_INT32 = {"minimum": 0, "maximum": 2**31 - 1}
_REQUEST_BODIES = (
    "CreateChat",
    "UpdateChat",
    "ToolDeclaration",
    "SendMessageBody",
    "EditMessageBody",
    "ToolResultBody",
    "DiffStatusBody",
    "PromptBody",
    "ReadStatusBody",
    "CreateProvider",
    "UpdateProvider",
    "CreateModelConfig",
    "UpdateModelConfig",
)


def _limits(components: dict[str, Any], settings: Settings) -> None:
    """Declare on the request schemas the checks the handlers make (``decode``, ``chats``,
    ``admin``, ``me``, ``chatd.tools.dynamic``), with the values this process enforces."""
    from chatd.web import admin, me  # noqa: PLC0415 - admin imports views this module needs

    text = {"minLength": 1, "maxLength": settings.max_message_chars, "pattern": _NOT_BLANK}
    name = {"minLength": 1, "maxLength": admin.MAX_NAME_CHARS, "pattern": _NOT_BLANK}
    model = {"minLength": 1, "maxLength": admin.MAX_MODEL_CHARS, "pattern": _NOT_BLANK}
    base_url = {"maxLength": admin.MAX_BASE_URL_CHARS, "pattern": _HTTP_URL}
    api_key = {"minLength": 1, "maxLength": admin.MAX_API_KEY_CHARS, "pattern": _PRINTABLE_ASCII}
    options = {
        "propertyNames": {"not": {"enum": sorted(admin.RESERVED_OPTIONS)}, "pattern": _NO_NUL},
        "description": f"Extra request fields for the provider, at most "
        f"{admin.MAX_OPTIONS_BYTES} bytes as JSON; not the ones chatd sets.",
    }
    exists = "must name an existing {}: a 400 otherwise"
    table: dict[str, dict[str, dict[str, Any]]] = {
        "CreateChat": {
            "text": text,
            "title": {"maxLength": settings.max_title_chars},
            "system_prompt": {"maxLength": settings.max_system_prompt_chars},
            "dynamic_tools": {
                "maxItems": settings.max_tools_per_chat,
                "description": "Tools the client runs; names unique within the list.",
            },
            "model_config_id": {"description": exists.format("model config")},
        },
        "ToolDeclaration": {
            "name": {"pattern": _TOOL_NAME, "not": {"enum": sorted(BUILTINS)}},
            "description": {"maxLength": settings.max_tool_description_chars},
            "input_schema": {
                "required": ["type"],
                "properties": {"type": {"const": "object"}},
                "propertyNames": {"pattern": _NO_NUL},
                "description": (
                    f'A JSON schema with "type": "object", at most '
                    f"{settings.max_tool_schema_bytes} bytes of compact JSON, nested at most "
                    f"{settings.max_tool_schema_depth} levels."
                ),
            },
        },
        "UpdateChat": {"title": {"maxLength": settings.max_title_chars}},
        "SendMessageBody": {"text": text},
        "EditMessageBody": {"text": text},
        "ToolResultBody": {"output": {"description": "the call's result as JSON text"}},
        "DiffStatusBody": {
            "branch": {"maxLength": 500},
            "remote": {"maxLength": 2000},
            "pull_request_url": {"maxLength": 2000, "pattern": _URL_NO_SPACES},
            "additions": _INT32,
            "deletions": _INT32,
            "changed_files": _INT32,
        },
        "PromptBody": {
            "prompt": {"maxLength": min(settings.max_user_prompt_chars, me.STORED_PROMPT_MAX_CHARS)}
        },
        "CreateProvider": {"name": name, "base_url": base_url, "api_key": api_key},
        "UpdateProvider": {"name": name, "base_url": base_url, "api_key": api_key},
        "CreateModelConfig": {
            "provider_id": {"description": exists.format("provider")},
            "name": name,
            "model": model,
            "context_limit": {"minimum": 1, "maximum": admin.MAX_CONTEXT_LIMIT},
            "options": options,
        },
        "UpdateModelConfig": {
            "provider_id": {"description": exists.format("provider")},
            "name": name,
            "model": model,
            "context_limit": {"minimum": 1, "maximum": admin.MAX_CONTEXT_LIMIT},
            "options": options,
        },
    }
    for schema_name, fields in table.items():
        properties = components[schema_name]["properties"]
        for field, extra in fields.items():
            _constrain(properties[field], extra)
    for schema_name in _REQUEST_BODIES:
        for prop in components[schema_name]["properties"].values():
            _constrain(prop, {"pattern": _NO_NUL}, only_new=True)
    # Cross-field rules.
    components["UpdateChat"]["anyOf"] = [
        {"required": ["title"], "properties": {"title": {"type": "string"}}},
        {"required": ["archived"], "properties": {"archived": {"type": "boolean"}}},
    ]
    for schema_name in ("UpdateProvider", "UpdateModelConfig"):
        components[schema_name]["minProperties"] = 1
    components["CreateProvider"]["if"] = {
        "required": ["kind"],
        "properties": {"kind": {"const": "openai-compatible"}},
    }
    components["CreateProvider"]["then"] = {
        "required": ["base_url"],
        "properties": {"base_url": {"type": "string"}},
    }


def _constrain(prop: dict[str, Any], extra: dict[str, Any], *, only_new: bool = False) -> None:
    """Add ``extra`` to a property's schema: to its string (or object, array, number) branch
    when it is a union with null; descriptions to the property itself."""
    extra = dict(extra)
    if "description" in extra:
        prop["description"] = extra.pop("description")
    if not extra:
        return
    branches = prop.get("anyOf", [prop])
    for branch in branches:
        if "$ref" in branch or branch.get("type") in (None, "null"):
            continue
        if only_new:
            if branch.get("type") == "string" and not {"pattern", "enum", "format"} & set(branch):
                branch.update(extra)
            continue
        if _fits(branch, extra):
            branch.update(extra)


def _fits(branch: dict[str, Any], extra: dict[str, Any]) -> bool:
    kind = branch.get("type")
    strings = {"minLength", "maxLength", "pattern", "not"}
    if kind == "string":
        return set(extra) <= strings
    if kind == "array":
        return set(extra) <= {"maxItems", "minItems"}
    if kind in ("integer", "number"):
        return set(extra) <= {"minimum", "maximum"}
    return kind == "object"
