"""The web page at ``/``: plain HTML, one hand-written script and one stylesheet, no build step.

The assets ship inside the package (``chatd/web/static``) and are served without a token: the
page asks for one and then calls the API with it (a browser's WebSockets pass it as the
``access_token`` query parameter, see ``chatd.web.auth``). Only the files listed in ``ASSETS``
are served, read once per process, so no path from a request ever reaches the file system.

Every answer carries a Content-Security-Policy that allows only this origin: no inline script
or style, no framing, no other host to connect to (the page works offline).
"""

from __future__ import annotations

import hashlib
from importlib import resources

from quart import Blueprint, Response, request

from chatd.web.errors import ApiError

blueprint = Blueprint("page", __name__)

# name -> media type; the only files served.
ASSETS: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
INDEX = "index.html"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _read(name: str) -> bytes:
    return resources.files("chatd.web").joinpath("static", name).read_bytes()


class _Asset:
    def __init__(self, body: bytes, media_type: str) -> None:
        self.body = body
        self.media_type = media_type
        self.etag = hashlib.sha256(body).hexdigest()[:32]


_cache: dict[str, _Asset] = {}


def _asset(name: str, media_type: str) -> _Asset:
    found = _cache.get(name)
    if found is None:
        found = _cache[name] = _Asset(_read(name), media_type)
    return found


def _answer(asset: _Asset) -> Response:
    headers = {**_HEADERS, "ETag": f'"{asset.etag}"', "Cache-Control": "no-cache"}
    if request.if_none_match.contains(asset.etag):
        return Response(b"", status=304, headers=headers)
    return Response(asset.body, status=200, content_type=asset.media_type, headers=headers)


@blueprint.get("/")
async def index() -> Response:
    return _answer(_asset(INDEX, "text/html; charset=utf-8"))


@blueprint.get("/static/<name>")
async def static_asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", f"no asset named {name!r}")
    return _answer(_asset(name, media_type))
