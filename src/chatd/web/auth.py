"""Who is calling: a bearer token checked against its stored hash, and the admin flag.

Tokens are checked through the process's ``TokenCache`` (``chatd.store.token_cache``): a warm
token costs no query, and a revocation elsewhere is seen within ``auth_cache_ttl_s``.

Browsers cannot set headers on a WebSocket, so a WebSocket handshake may carry the token as the
``access_token`` query parameter instead (the access log names
the route's template, never a query string, so it is not written down).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from werkzeug.datastructures import Headers

from chatd.logs import note_user
from chatd.store.records import User
from chatd.store.token_cache import TokenCache
from chatd.web.errors import ApiError

ACCESS_TOKEN_PARAM = "access_token"  # noqa: S105 - the parameter's name, not a secret


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def bearer_token(headers: Headers, query_token: str | None = None) -> str:
    header = headers.get("Authorization")
    if header is None:
        if query_token:
            return query_token
        raise _unauthorized("an Authorization: Bearer <token> header is required")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("the Authorization header must be 'Bearer <token>'")
    return token.strip()


async def authenticate(tokens: TokenCache, token: str) -> User:
    user = await tokens.authenticate(token)
    if user is None:
        raise _unauthorized("the token is unknown or revoked")
    note_user(user.id)  # for the request's access line
    return user


def require_admin(user: User) -> None:
    if not user.is_admin:
        raise ApiError(403, "forbidden", "this route needs an admin token")


def check_origin(headers: Headers, allowed: str) -> None:
    """A browser's cross-site WebSocket must come from the server's own origin or an allowed
    one (clients that are not browsers send no Origin and pass)."""
    origin = headers.get("Origin")
    if origin is None:
        return
    allowlist = {o.strip().rstrip("/") for o in allowed.split(",") if o.strip()}
    if "*" in allowlist or origin.rstrip("/") in allowlist:
        return
    parts = urlsplit(origin)
    host = headers.get("Host", "")
    if parts.scheme in ("http", "https") and parts.netloc and parts.netloc == host:
        return
    raise ApiError(403, "forbidden_origin", f"origin {origin!r} is not allowed")
