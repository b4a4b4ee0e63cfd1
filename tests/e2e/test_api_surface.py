"""The API as a whole: every route needs a token, and the OpenAPI document lists them all."""

from __future__ import annotations

import re
import uuid

from chatd.web.routing import API_PREFIX
from tests.e2e.api_world import ApiWorld

_PARAM = re.compile(r"<(?:[a-z]+:)?([A-Za-z_]+)>")


def api_rules(api: ApiWorld) -> list[tuple[str, str, bool]]:
    """(method, concrete path, is_websocket) of every API route the app serves."""
    app = api.app
    out = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(API_PREFIX):
            continue
        path = _PARAM.sub(lambda _m: str(uuid.uuid4()), rule.rule)
        if rule.websocket:
            out.append(("GET", path, True))
        else:
            out.extend((m, path, False) for m in sorted(rule.methods or ()) if m != "HEAD")
    return out


async def test_every_route_refuses_a_request_without_a_valid_token(api: ApiWorld) -> None:
    routes = api_rules(api)
    assert len(routes) >= 30
    async with api.anonymous() as anonymous:
        for method, path, websocket in routes:
            for headers in ({}, {"Authorization": "Bearer chatd_not-a-real-token"}):
                if websocket:
                    response = await api.refused(path, headers)
                else:
                    response = await anonymous.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, response.text)
                assert response.json()["error"]["code"] == "unauthorized"


async def test_health_needs_no_token(api: ApiWorld) -> None:
    async with api.anonymous() as anonymous:
        assert (await anonymous.get("/healthz")).status_code == 200


async def test_admin_routes_refuse_a_user_token(api: ApiWorld) -> None:
    alice = await api.client("alice")
    admin_routes = [s for s in api.services.routes if s.admin]
    assert admin_routes
    for spec in admin_routes:
        path = _PARAM.sub(lambda _m: str(uuid.uuid4()), API_PREFIX + spec.path)
        response = await alice.http.request(spec.method, path, json={})
        assert response.status_code == 403, (spec.method, path, response.text)


async def test_openapi_lists_exactly_the_routes_served(api: ApiWorld) -> None:
    alice = await api.client("alice")
    response = await alice.http.get("/api/v1/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    served = set()
    for rule in api.app.url_map.iter_rules():
        if rule.rule.startswith(API_PREFIX):
            path = _PARAM.sub(r"{\1}", rule.rule)
            methods = {"GET"} if rule.websocket else set(rule.methods or ()) - {"HEAD"}
            served |= {(m, path) for m in methods}
    assert documented == served
    for operations in document["paths"].values():
        for operation in operations.values():
            assert operation["summary"]
            assert "401" in operation["responses"]
    schemas = document["components"]["schemas"]
    assert "ChatDetail" in schemas
    assert "ErrorResponse" in schemas
