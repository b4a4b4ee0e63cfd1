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


async def test_a_chat_reports_the_model_config_that_answers_it(api: ApiWorld) -> None:
    alice = await api.client("alice")
    [default] = (await alice.http.get("/api/v1/model-configs")).json()["model_configs"]
    assert default["is_default"]
    chat = await alice.create_chat("hello")
    # The chat follows the default: it has no config of its own, and says which one answers.
    assert chat["model_config_id"] is None
    assert chat["effective_model_config_id"] == default["id"]
    assert chat["warnings"] == []
    read = (await alice.http.get(f"/api/v1/chats/{chat['id']}")).json()
    assert read["effective_model_config_id"] == default["id"]
    [listed] = (await alice.http.get("/api/v1/chats")).json()["chats"]
    assert listed["effective_model_config_id"] == default["id"]

    root = await api.client("root", admin=True)
    newer = {"provider_id": default["provider_id"], "name": "newer", "model": "m2"}
    created = await root.http.post("/api/v1/model-configs", json={**newer, "context_limit": 8000})
    assert created.status_code == 201, created.text
    newer_id = created.json()["id"]
    response = await root.http.patch(f"/api/v1/model-configs/{newer_id}", json={"is_default": True})
    assert response.status_code == 200, response.text
    read = (await alice.http.get(f"/api/v1/chats/{chat['id']}")).json()
    assert read["effective_model_config_id"] == newer_id
    own = await alice.create_chat("hi", model_config_id=default["id"])
    assert own["model_config_id"] == own["effective_model_config_id"] == default["id"]


async def test_creating_a_chat_with_no_model_config_warns_how_to_add_one(api: ApiWorld) -> None:
    alice = await api.client("alice")
    root = await api.client("root", admin=True)
    for config in (await root.http.get("/api/v1/model-configs")).json()["model_configs"]:
        response = await root.http.delete(f"/api/v1/model-configs/{config['id']}")
        assert response.status_code == 204, response.text
    chat = await alice.create_chat("hello")
    assert chat["model_config_id"] is None
    assert chat["effective_model_config_id"] is None
    [warning] = chat["warnings"]
    assert warning.startswith("no model config exists")
    assert "POST /api/v1/model-configs" in warning
    await alice.wait_status(chat["id"], "error")


async def test_an_integral_float_is_an_integer(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat("hello")
    response = await alice.http.put(
        f"/api/v1/chats/{chat['id']}/diff-status", json={"additions": 3.0, "deletions": 1}
    )
    assert response.status_code == 200, response.text
    assert response.json()["additions"] == 3
    response = await alice.http.put(
        f"/api/v1/chats/{chat['id']}/diff-status", json={"additions": 3.5}
    )
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "additions"
