"""The HTTP edge seen from a browser and a careless client: 405 with Allow, CORS, 413 naming
its setting; over a real server."""

from __future__ import annotations

import uuid

from chatd.store.database import Database
from tests.e2e.api_world import ApiWorld, serve_api

ALLOWED = "https://app.example"


async def test_a_405_lists_the_methods_of_the_route(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = f"/api/v1/chats/{uuid.uuid4()}"
    response = await alice.http.put(chat, json={})
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD", "PATCH", "DELETE"}
    error = response.json()["error"]
    assert error["code"] == "method_not_allowed"
    assert "PUT" in error["message"]
    response = await alice.http.delete("/api/v1/chats")
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}


async def test_a_413_names_the_limit_and_its_setting(db: Database) -> None:
    async with serve_api(db, max_body_bytes=1000) as api:
        alice = await api.client("alice")
        body = b'{"text": "' + b"x" * 2000 + b'"}'
        response = await alice.http.post(
            "/api/v1/chats", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413
        message = response.json()["error"]["message"]
        assert message == (
            f"the body is {len(body)} bytes; the limit is 1000 bytes,"
            " max_body_bytes (CHATD_MAX_BODY_BYTES)"
        )


async def test_cors_preflight_and_answers_for_an_allowed_origin_only(db: Database) -> None:
    async with serve_api(db, ws_allowed_origins=ALLOWED, cors_max_age_s=120) as api:
        alice = await api.client("alice")
        preflight = {
            "Origin": ALLOWED,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        }
        async with api.anonymous() as anonymous:
            response = await anonymous.options("/api/v1/chats", headers=preflight)
            assert response.status_code == 204
            assert response.headers["access-control-allow-origin"] == ALLOWED
            assert set(response.headers["access-control-allow-methods"].split(", ")) == {
                "GET",
                "HEAD",
                "POST",
            }
            allowed = response.headers["access-control-allow-headers"].lower().split(", ")
            assert {"authorization", "content-type", "idempotency-key"} <= set(allowed)
            assert response.headers["access-control-max-age"] == "120"
            assert "access-control-allow-credentials" not in response.headers

            foreign = {**preflight, "Origin": "https://evil.example"}
            response = await anonymous.options("/api/v1/chats", headers=foreign)
            assert not any(h.startswith("access-control-") for h in response.headers)

            # A 401 to an allowed page is readable by it (so it can tell the user).
            response = await anonymous.get("/api/v1/chats", headers={"Origin": ALLOWED})
            assert response.status_code == 401
            assert response.headers["access-control-allow-origin"] == ALLOWED

        response = await alice.http.get("/api/v1/chats", headers={"Origin": ALLOWED})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == ALLOWED
        assert "origin" in response.headers["vary"].lower()
        assert "idempotent-replayed" in response.headers["access-control-expose-headers"].lower()
        response = await alice.http.get("/api/v1/chats", headers={"Origin": "https://evil.example"})
        assert response.status_code == 200
        assert not any(h.startswith("access-control-") for h in response.headers)
        # No Origin (not a browser): nothing CORS either.
        response = await alice.http.get("/api/v1/chats")
        assert not any(h.startswith("access-control-") for h in response.headers)


async def test_the_servers_own_origin_is_allowed_without_a_setting(api: ApiWorld) -> None:
    alice = await api.client("alice")
    own = api.url.rstrip("/")
    response = await alice.http.get("/api/v1/chats", headers={"Origin": own})
    assert response.headers["access-control-allow-origin"] == own
