"""The API as a whole: every route needs a token, and the OpenAPI document lists them all."""

from __future__ import annotations

import re
import uuid
from html.parser import HTMLParser

from chatd.web.docs import PUBLIC_PATHS
from chatd.web.frames import StreamFrame, WatchFrame
from chatd.web.routing import API_PREFIX
from tests.e2e.api_world import ApiWorld

_PARAM = re.compile(r"<(?:[a-z]+:)?([A-Za-z_]+)>")


def api_rules(api: ApiWorld) -> list[tuple[str, str, bool]]:
    """(method, concrete path, is_websocket) of every API route the app serves."""
    app = api.app
    out = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(API_PREFIX) or rule.rule in PUBLIC_PATHS:
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
    async with api.anonymous() as anonymous:
        response = await anonymous.get("/api/v1/openapi.json")
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
            public = operation.get("security") == []
            assert ("401" in operation["responses"]) != public
    schemas = document["components"]["schemas"]
    assert "ChatDetail" in schemas
    assert "ErrorResponse" in schemas


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


async def test_the_docs_page_needs_no_token_and_nothing_from_elsewhere(api: ApiWorld) -> None:
    async with api.anonymous() as anonymous:
        page = await anonymous.get("/docs")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        links = _Links()
        links.feed(page.text)
        assert len(links.urls) >= 3
        for url in links.urls:
            assert url.startswith("/"), url  # served here: no CDN, works offline
            asset = await anonymous.get(url)
            assert asset.status_code == 200, url
            assert len(asset.content) > 0
        script = (await anonymous.get("/docs/assets/docs.js")).text
        assert '"/api/v1/openapi.json"' in script
        assert "validatorUrl: null" in script
        bundle = await anonymous.get("/docs/assets/swagger-ui-bundle.js")
        assert bundle.headers["content-type"].startswith("text/javascript")
        assert "SwaggerUIBundle" in bundle.text
        missing = await anonymous.get("/docs/assets/..%2F..%2Fpyproject.toml")
        assert missing.status_code == 404


async def test_the_document_describes_every_websocket_event(api: ApiWorld) -> None:
    async with api.anonymous() as anonymous:
        document = (await anonymous.get("/api/v1/openapi.json")).json()
    schemas = document["components"]["schemas"]
    stream_types = set(schemas["StreamEvent"]["discriminator"]["mapping"])
    assert stream_types == {cls.__struct_config__.tag for cls in StreamFrame.__args__}
    assert stream_types == {
        "message_part",
        "message",
        "status",
        "error",
        "retry",
        "queue_update",
        "action_required",
        "preview_reset",
        "history_reset",
    }
    watch_kinds = set(schemas["WatchEvent"]["discriminator"]["mapping"])
    assert watch_kinds == {cls.__struct_config__.tag for cls in WatchFrame.__args__}
    assert schemas["InboxEvent"]["$ref"].endswith("/NotificationEvent")
    assert schemas["NotificationEvent"]["properties"]["type"]["enum"] == ["notification"]
    assert set(schemas["MessagePartFrame"]["properties"]) >= {"seq", "part", "history_version"}
    websockets = {
        path: operation["get"]
        for path, operation in document["paths"].items()
        if operation.get("get", {}).get("x-websocket")
    }
    assert set(websockets) == {
        "/api/v1/chats/{chat_id}/stream",
        "/api/v1/chats/watch",
        "/api/v1/notifications/inbox/watch",
    }
    for operation in websockets.values():
        [one, many] = operation["x-websocket-events"]["schema"]["anyOf"]
        assert many == {"type": "array", "items": one}
        assert one["$ref"].removeprefix("#/components/schemas/") in schemas


async def test_the_document_declares_the_limits_of_this_server(api: ApiWorld) -> None:
    async with api.anonymous() as anonymous:
        document = (await anonymous.get("/api/v1/openapi.json")).json()
    schemas = document["components"]["schemas"]
    settings = api.settings
    text = schemas["SendMessageBody"]["properties"]["text"]
    assert text["maxLength"] == settings.max_message_chars
    create = schemas["CreateChat"]["properties"]
    assert create["title"]["maxLength"] == settings.max_title_chars
    assert create["dynamic_tools"]["maxItems"] == settings.max_tools_per_chat
    tool = schemas["ToolDeclaration"]["properties"]
    assert tool["description"]["maxLength"] == settings.max_tool_description_chars
    assert tool["name"]["pattern"] == "^[A-Za-z0-9_-]{1,64}$"
