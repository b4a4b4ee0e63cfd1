"""``GET /api/v1/openapi.json``: the API described from the same declarations that route it."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from chatd.web import idempotency
from chatd.web.errors import ErrorResponse
from chatd.web.routing import ApiRoutes, Call, RouteSpec

routes = ApiRoutes("openapi", tag="meta")

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


def document(
    specs: tuple[RouteSpec, ...], *, idempotency_key_max_chars: int = 255
) -> dict[str, Any]:
    types: list[Any] = [ErrorResponse]
    for spec in specs:
        types += [t for t in (spec.body, spec.response) if t is not None]
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    schema_of = dict(zip(map(id, types), schemas, strict=True))
    error = {"application/json": {"schema": schema_of[id(ErrorResponse)]}}
    paths: dict[str, dict[str, Any]] = {}
    for spec in specs:
        path = spec.openapi_path
        responses: dict[str, Any] = {}
        if spec.method == "WEBSOCKET":
            responses["101"] = {"description": "switching to the WebSocket protocol"}
        elif spec.response is None:
            responses[str(spec.status if spec.status != 200 else 204)] = {"description": "done"}
        else:
            responses[str(spec.status)] = {
                "description": "success",
                "content": {spec.media_type: {"schema": schema_of[id(spec.response)]}},
            }
        codes = {401, *spec.errors}
        if spec.body is not None or spec.query or "{" in path:
            codes.add(400)
        if spec.idempotent:
            codes |= {400, 409, 422}
        if spec.admin:
            codes.add(403)
        for code in sorted(codes):
            responses[str(code)] = {"description": _REASONS.get(code, "error"), "content": error}
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PATH_PARAM.findall(path)
        ]
        parameters += [
            {
                "name": q.name,
                "in": "query",
                "required": False,
                "description": q.description,
                "schema": {"type": q.type},
            }
            for q in spec.query
        ]
        if spec.idempotent:
            parameters.append(_idempotency_header(idempotency_key_max_chars))
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
            operation["x-websocket"] = True
        method = "get" if spec.method == "WEBSOCKET" else spec.method.lower()
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "chatd", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


@routes.http("GET", "/openapi.json", summary="This API's OpenAPI document", response=dict[str, Any])
async def openapi_json(call: Call[None]) -> msgspec.Raw:
    settings = call.services.settings
    doc = document(
        call.services.routes, idempotency_key_max_chars=settings.idempotency_key_max_chars
    )
    return msgspec.Raw(msgspec.json.encode(doc))
