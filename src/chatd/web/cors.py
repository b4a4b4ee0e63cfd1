"""CORS for the HTTP API: the origins a browser page may call it from.

The allowed origins are the WebSockets' (``ws_allowed_origins``, ``CHATD_WS_ALLOWED_ORIGINS``,
comma-separated or ``*``), so that one setting says which pages may use this server: the
server's own origin always, and the listed ones. A preflight (``OPTIONS`` with
``Access-Control-Request-Method``) from an allowed origin is answered 204 with the route's
methods and the headers the API reads; any answer to an allowed origin carries
``Access-Control-Allow-Origin``. A request from another origin gets no CORS header at all, so
the browser keeps its answer from the page (the request itself is still authenticated by its
token like any other: CORS protects the browser's user, not the server).

Tokens travel in the ``Authorization`` header, never in cookies, so credentials are not
allowed (no ``Access-Control-Allow-Credentials``), and ``*`` is safe to answer as the origin
itself.
"""

from __future__ import annotations

from quart import Quart, Response, request
from werkzeug.datastructures import Headers
from werkzeug.exceptions import MethodNotAllowed

from chatd.web.auth import check_origin
from chatd.web.errors import ApiError

ALLOWED_HEADERS = "Authorization, Content-Type, Idempotency-Key"
# What a page may read besides the simple response headers.
EXPOSED_HEADERS = "Idempotent-Replayed, Retry-After, X-Request-Id, WWW-Authenticate, Allow"


def allowed_origin(headers: Headers, allowed: str) -> str | None:
    """The request's ``Origin`` when it may read our answers; None without one or when not
    allowed (the same rule as a WebSocket handshake's)."""
    origin = headers.get("Origin")
    if origin is None:
        return None
    try:
        check_origin(headers, allowed)
    except ApiError:
        return None
    return origin


def route_methods() -> list[str]:
    """The methods of the route the request's path names (empty when it names none)."""
    if request.url_rule is not None:
        return sorted(request.url_rule.methods or ())
    exc = request.routing_exception
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        return sorted(exc.valid_methods)
    return []


def install(app: Quart, *, allowed: str, max_age_s: float) -> None:
    max_age = str(round(max_age_s))

    @app.before_request
    async def preflight() -> Response | None:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        methods = route_methods()
        if not methods:
            return None  # no such route: its 404
        response = Response(b"", status=204)
        origin = allowed_origin(request.headers, allowed)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Methods"] = ", ".join(methods)
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = max_age
        response.headers["Vary"] = "Origin"
        return response

    @app.after_request
    async def allow_origin(response: Response) -> Response:
        if "Origin" not in request.headers or "Access-Control-Allow-Origin" in response.headers:
            return response
        response.vary.add("Origin")
        origin = allowed_origin(request.headers, allowed)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        return response
