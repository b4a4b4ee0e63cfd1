"""The API's description, readable without a token: ``GET /api/v1/openapi.json`` and ``/docs``.

The document tells nothing a client could not learn by trying (routes, shapes, limits), and a
newcomer wants it before holding a token, so neither needs one. ``/docs`` is Swagger UI (its
built files come from the ``flask-swagger-ui`` package, Apache-2.0, served from this process:
no CDN, the page works offline) on this server's document; its "Authorize" button takes a
token for "Try it out". The document is built once per process, from the same declarations
that route the API (``chatd.web.openapi``).
"""

from __future__ import annotations

import functools
import mimetypes
from importlib import resources

import msgspec
from quart import Blueprint, Response, current_app

from chatd.web.context import services
from chatd.web.errors import ApiError
from chatd.web.openapi import document
from chatd.web.routing import API_PREFIX

OPENAPI_PATH = f"{API_PREFIX}/openapi.json"
DOCS_PATH = "/docs"
# Paths anyone may read; every other API route needs a token.
PUBLIC_PATHS = frozenset({OPENAPI_PATH})

blueprint = Blueprint("docs", __name__)

_SWAGGER_DIST = resources.files("flask_swagger_ui").joinpath("dist")
_SWAGGER_FILES = frozenset(
    {"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "favicon-16x16.png"}
)
_OWN_FILES = frozenset({"docs.js"})
_CACHE = "public, max-age=3600"


def _own(name: str) -> bytes:
    return resources.files("chatd.web").joinpath("docs_assets", name).read_bytes()


@functools.cache
def _asset(name: str) -> bytes:
    if name in _OWN_FILES:
        return _own(name)
    return _SWAGGER_DIST.joinpath(name).read_bytes()


@blueprint.get(OPENAPI_PATH)
async def openapi_json() -> Response:
    cached = current_app.extensions.get("chatd.openapi")
    if cached is None:
        svc = services(current_app)
        cached = msgspec.json.encode(document(svc.routes, svc.settings))
        current_app.extensions["chatd.openapi"] = cached
    return Response(cached, content_type="application/json")


@blueprint.get(DOCS_PATH)
async def docs_page() -> Response:
    return Response(_own("index.html"), content_type="text/html; charset=utf-8")


@blueprint.get(f"{DOCS_PATH}/assets/<name>")
async def docs_asset(name: str) -> Response:
    if name not in _SWAGGER_FILES and name not in _OWN_FILES:
        raise ApiError.not_found("asset")
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if kind.startswith("text/") or kind.endswith("javascript"):
        kind += "; charset=utf-8"
    return Response(_asset(name), content_type=kind, headers={"Cache-Control": _CACHE})
