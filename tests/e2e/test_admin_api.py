"""Providers and model configs over a real server: admin-only access, the checks made before
anything reaches the database, the API key that never comes back, one default model config, and
the config cache: writes seen by the very next turn, and about one load per TTL over 100 turns.
"""

from __future__ import annotations

import json
import math
from typing import Any
from uuid import UUID, uuid4

import httpx2
import pytest
import trio

from chatd.store import providers
from chatd.store.config_cache import TtlCache
from tests.e2e.api_world import DEADLINE_S, ApiWorld, Client, frames

SECRET = "sk-very-secret-0123456789"
PROVIDERS = "/api/v1/providers"
CONFIGS = "/api/v1/model-configs"


class Recorder:
    """Every response an admin client got, to check that no API key is in any of them."""

    def __init__(self) -> None:
        self.bodies: list[str] = []

    async def __call__(self, response: httpx2.Response) -> None:
        await response.aread()
        self.bodies.append(response.text)

    def assert_never_shown(self, *secrets: str) -> None:
        assert self.bodies
        for body in self.bodies:
            for secret in secrets:
                assert secret not in body
            assert '"api_key"' not in body


@pytest.fixture
async def admin(api: ApiWorld) -> Client:
    return await api.client("root", admin=True)


def assert_invalid(response: httpx2.Response, field: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_request", field), error


def assert_status(response: httpx2.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    if code is not None:
        assert response.json()["error"]["code"] == code


async def create_provider(client: Client, **fields: Any) -> dict[str, Any]:
    body = {"name": f"p-{uuid4().hex[:8]}", "kind": "openai", **fields}
    response = await client.http.post(PROVIDERS, json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def create_config(client: Client, provider_id: str, **fields: Any) -> dict[str, Any]:
    body = {
        "provider_id": provider_id,
        "name": f"m-{uuid4().hex[:8]}",
        "model": "some-model",
        "context_limit": 8000,
        **fields,
    }
    response = await client.http.post(CONFIGS, json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def default_config(client: Client) -> dict[str, Any]:
    configs = (await client.http.get(CONFIGS)).json()["model_configs"]
    defaults = [c for c in configs if c["is_default"]]
    assert len(defaults) == 1, configs
    found: dict[str, Any] = defaults[0]
    return found


async def next_turn(api: ApiWorld, client: Client, chat_id: str) -> dict[str, Any]:
    """One more turn of the waiting chat; the body of the model request it made."""
    before = api.llm.request_count
    response = await client.http.post(f"/api/v1/chats/{chat_id}/messages", json={"text": "go"})
    assert response.status_code == 202, response.text
    with trio.fail_after(DEADLINE_S):
        requests = await api.llm.wait_for_requests(before + 1)
    await client.wait_status(chat_id, "waiting", "error")
    body: dict[str, Any] = requests[before].body
    return body


# -- access ----------------------------------------------------------------------------------

ADMIN_ROUTES = (
    ("POST", PROVIDERS, {"name": "x", "kind": "openai"}),
    ("GET", PROVIDERS, None),
    ("GET", f"{PROVIDERS}/{uuid4()}", None),
    ("PATCH", f"{PROVIDERS}/{uuid4()}", {"name": "y"}),
    ("DELETE", f"{PROVIDERS}/{uuid4()}", None),
    ("POST", CONFIGS, {"provider_id": str(uuid4()), "name": "x", "model": "m", "context_limit": 1}),
    ("GET", f"{CONFIGS}/{uuid4()}", None),
    ("PATCH", f"{CONFIGS}/{uuid4()}", {"name": "y"}),
    ("DELETE", f"{CONFIGS}/{uuid4()}", None),
)


async def test_admin_routes_need_an_admin_token(api: ApiWorld, admin: Client) -> None:
    bob = await api.client("bob")
    providers_before = (await admin.http.get(PROVIDERS)).json()
    async with api.anonymous() as anonymous:
        for method, path, body in ADMIN_ROUTES:
            assert_status(await anonymous.request(method, path, json=body), 401, "unauthorized")
            assert_status(await bob.http.request(method, path, json=body), 403, "forbidden")
        assert_status(await anonymous.get(CONFIGS), 401, "unauthorized")
    assert (await admin.http.get(PROVIDERS)).json() == providers_before
    # Every user may list the model configs: chats are created with their ids.
    listed = await bob.http.get(CONFIGS)
    assert listed.status_code == 200
    assert [c["is_default"] for c in listed.json()["model_configs"]] == [True]


# -- providers -------------------------------------------------------------------------------


async def test_provider_lifecycle_never_shows_the_key(api: ApiWorld, admin: Client) -> None:
    recorder = Recorder()
    admin.http.event_hooks["response"].append(recorder)

    created = await create_provider(admin, name="openai", api_key=SECRET)
    assert created["name"] == "openai"
    assert created["kind"] == "openai"
    assert created["base_url"] is None
    assert created["has_api_key"] is True
    assert created["enabled"] is True
    assert set(created) == {
        "id",
        "name",
        "kind",
        "base_url",
        "has_api_key",
        "enabled",
        "created_at",
        "updated_at",
    }
    path = f"{PROVIDERS}/{created['id']}"
    assert (await admin.http.get(path)).json() == created
    listed = (await admin.http.get(PROVIDERS)).json()["providers"]
    assert created in listed
    assert len(listed) == 2  # with the fake LLM's provider, whose key is not shown either

    # An absent api_key is kept; other fields change.
    renamed = await admin.http.patch(path, json={"name": "openai-2", "enabled": False})
    assert renamed.status_code == 200, renamed.text
    assert (renamed.json()["name"], renamed.json()["enabled"]) == ("openai-2", False)
    assert renamed.json()["has_api_key"] is True
    stored = await providers.get_provider(api.db, UUID(created["id"]))
    assert stored is not None
    assert stored.api_key == SECRET

    # null clears the key; a string sets a new one.
    cleared = await admin.http.patch(path, json={"api_key": None})
    assert cleared.json()["has_api_key"] is False
    stored = await providers.get_provider(api.db, UUID(created["id"]))
    assert stored is not None
    assert stored.api_key is None
    other = SECRET + "-rotated"
    rotated = await admin.http.patch(path, json={"api_key": other, "base_url": "https://x.test"})
    assert (rotated.json()["has_api_key"], rotated.json()["base_url"]) == (True, "https://x.test")
    unset = await admin.http.patch(path, json={"base_url": None})
    assert unset.json()["base_url"] is None

    deleted = await admin.http.delete(path)
    assert (deleted.status_code, deleted.content) == (204, b"")
    assert_status(await admin.http.get(path), 404, "not_found")
    assert_status(await admin.http.delete(path), 404, "not_found")
    assert_status(await admin.http.patch(path, json={"name": "z"}), 404, "not_found")

    recorder.assert_never_shown(SECRET, other, "unused")  # "unused": the fake LLM's key


async def test_provider_fields_are_checked(admin: Client) -> None:
    post = admin.http.post

    async def refused(body: dict[str, Any], field: str) -> None:
        assert_invalid(await post(PROVIDERS, json={"name": "p", "kind": "openai", **body}), field)

    await refused({"name": ""}, "name")
    await refused({"name": "   "}, "name")
    await refused({"name": "n" * 101}, "name")
    await refused({"name": "a\x00b"}, "name")
    await refused({"name": 7}, "name")
    await refused({"kind": "bogus"}, "kind")
    await refused({"base_url": "ftp://x.test"}, "base_url")
    await refused({"base_url": "http://a b.test"}, "base_url")
    await refused({"base_url": "http://"}, "base_url")
    await refused({"base_url": "https://x.test/" + "p" * 2000}, "base_url")
    await refused({"api_key": ""}, "api_key")
    await refused({"api_key": "k" * 4097}, "api_key")
    await refused({"api_key": "sk-a\nX-Injected: 1"}, "api_key")
    await refused({"api_key": "sk a"}, "api_key")
    await refused({"enabled": "yes"}, "enabled")
    await refused({"color": "red"}, "color")
    await refused({"kind": "openai-compatible"}, "base_url")  # it has no well-known address
    assert_invalid(await post(PROVIDERS, json={"kind": "openai"}), "name")
    assert_invalid(await post(PROVIDERS, content=b"[]"), "body")
    assert (await admin.http.get(PROVIDERS)).json()["providers"].__len__() == 1

    # At the limits: accepted.
    await create_provider(admin, name="n" * 100, api_key="k" * 4096)
    compatible = await create_provider(
        admin, name="local", kind="openai-compatible", base_url="http://127.0.0.1:9/v1"
    )
    assert compatible["has_api_key"] is False

    # A name is taken once.
    assert_status(await post(PROVIDERS, json={"name": "local", "kind": "openai"}), 409, "conflict")

    path = f"{PROVIDERS}/{compatible['id']}"
    assert_invalid(await admin.http.patch(path, json={}), "body")
    assert_invalid(await admin.http.patch(path, json={"name": None}), "name")
    assert_invalid(await admin.http.patch(path, json={"name": "n" * 101}), "name")
    assert_invalid(await admin.http.patch(path, json={"kind": None}), "kind")
    assert_invalid(await admin.http.patch(path, json={"api_key": "k" * 4097}), "api_key")
    assert_invalid(await admin.http.patch(path, json={"base_url": None}), "base_url")
    assert_invalid(await admin.http.patch(path, json={"nope": 1}), "nope")
    assert_status(await admin.http.patch(path, json={"name": "n" * 100}), 409, "conflict")
    plain = await create_provider(admin, name="plain")
    assert_invalid(
        await admin.http.patch(f"{PROVIDERS}/{plain['id']}", json={"kind": "openai-compatible"}),
        "base_url",
    )
    moved = await admin.http.patch(
        f"{PROVIDERS}/{plain['id']}",
        json={"kind": "openai-compatible", "base_url": "https://llm.test/v1"},
    )
    assert moved.status_code == 200, moved.text

    for bad in ("nope", str(uuid4())[:-1], str(uuid4()).replace("-", "")):
        for method in ("GET", "PATCH", "DELETE"):
            response = await admin.http.request(method, f"{PROVIDERS}/{bad}", json={"name": "q"})
            assert_invalid(response, "provider_id")


async def test_a_provider_in_use_is_not_deleted(api: ApiWorld, admin: Client) -> None:
    provider = await create_provider(admin)
    config = await create_config(admin, provider["id"])
    path = f"{PROVIDERS}/{provider['id']}"
    assert_status(await admin.http.delete(path), 409, "conflict")
    assert (await admin.http.get(path)).status_code == 200
    assert (await admin.http.delete(f"{CONFIGS}/{config['id']}")).status_code == 204
    assert (await admin.http.delete(path)).status_code == 204


# -- model configs -------------------------------------------------------------------------


async def test_model_config_lifecycle(api: ApiWorld, admin: Client) -> None:
    provider = await create_provider(admin)
    fake_default = await default_config(admin)
    created = await create_config(
        admin,
        provider["id"],
        name="gpt",
        model="gpt-x",
        context_limit=100_000,
        compression_threshold=0.5,
        options={"temperature": 0.2, "top_p": 1},
    )
    assert created["provider_id"] == provider["id"]
    assert (created["name"], created["model"]) == ("gpt", "gpt-x")
    assert created["context_limit"] == 100_000
    assert created["compression_threshold"] == 0.5
    assert created["options"] == {"temperature": 0.2, "top_p": 1}
    assert created["is_default"] is False  # there is a default already
    path = f"{CONFIGS}/{created['id']}"
    assert (await admin.http.get(path)).json() == created

    patched = await admin.http.patch(
        path, json={"model": "gpt-y", "options": {}, "compression_threshold": 1}
    )
    assert patched.status_code == 200, patched.text
    assert (patched.json()["model"], patched.json()["options"]) == ("gpt-y", {})
    assert patched.json()["compression_threshold"] == 1.0
    assert patched.json()["name"] == "gpt"

    # Making it the default clears the old one: exactly one default.
    made = await admin.http.patch(path, json={"is_default": True})
    assert made.json()["is_default"] is True
    assert (await default_config(admin))["id"] == created["id"]
    old = (await admin.http.get(f"{CONFIGS}/{fake_default['id']}")).json()
    assert old["is_default"] is False
    again = await admin.http.patch(path, json={"is_default": True})  # already: unchanged
    assert again.json() == made.json()
    # The default cannot be un-defaulted or deleted while there are others.
    assert_invalid(await admin.http.patch(path, json={"is_default": False}), "is_default")
    assert_status(await admin.http.delete(path), 409, "conflict")
    # Clearing a non-default is a no-op.
    old_path = f"{CONFIGS}/{fake_default['id']}"
    unchanged = await admin.http.patch(old_path, json={"is_default": False})
    assert unchanged.json() == old

    # A config created with is_default takes over.
    third = await create_config(admin, provider["id"], is_default=True)
    assert third["is_default"] is True
    assert (await default_config(admin))["id"] == third["id"]

    # Deleting the non-defaults, then the last one (the default) is allowed.
    for config_id in (created["id"], fake_default["id"]):
        assert (await admin.http.delete(f"{CONFIGS}/{config_id}")).status_code == 204
    assert_status(await admin.http.get(path), 404, "not_found")
    assert_status(await admin.http.delete(path), 404, "not_found")
    assert_status(await admin.http.patch(path, json={"name": "x"}), 404, "not_found")
    assert_status(await admin.http.patch(path, json={"is_default": True}), 404, "not_found")
    assert (await admin.http.delete(f"{CONFIGS}/{third['id']}")).status_code == 204
    assert (await admin.http.get(CONFIGS)).json() == {"model_configs": []}

    # With no model config at all, the first one becomes the default.
    first = await create_config(admin, provider["id"])
    assert first["is_default"] is True


async def test_model_config_fields_are_checked(admin: Client) -> None:
    provider = await create_provider(admin)
    base = {"provider_id": provider["id"], "name": "c", "model": "m", "context_limit": 10}

    async def refused(body: dict[str, Any], field: str) -> None:
        assert_invalid(await admin.http.post(CONFIGS, json={**base, **body}), field)

    await refused({"name": ""}, "name")
    await refused({"name": "n" * 101}, "name")
    await refused({"model": ""}, "model")
    await refused({"model": "m" * 201}, "model")
    await refused({"model": "a\x00"}, "model")
    await refused({"context_limit": 0}, "context_limit")
    await refused({"context_limit": -5}, "context_limit")
    await refused({"context_limit": 2**31}, "context_limit")
    await refused({"context_limit": 1.5}, "context_limit")
    await refused({"context_limit": "10"}, "context_limit")
    await refused({"compression_threshold": 0}, "compression_threshold")
    await refused({"compression_threshold": 1.01}, "compression_threshold")
    await refused({"compression_threshold": True}, "compression_threshold")
    await refused({"options": []}, "options")
    await refused({"options": "{}"}, "options")
    await refused({"options": {"model": "other"}}, "options.model")
    await refused({"options": {"messages": []}}, "options.messages")
    await refused({"options": {"blob": "x" * 40_000}}, "options")
    await refused({"options": {"k": "a\x00"}}, "options.k")
    await refused({"is_default": "yes"}, "is_default")
    await refused({"provider_id": "nope"}, "provider_id")
    await refused({"provider_id": str(uuid4())}, "provider_id")  # no such provider
    await refused({"extra": True}, "extra")
    assert_invalid(await admin.http.post(CONFIGS, json={"name": "c"}), "provider_id")
    assert len((await admin.http.get(CONFIGS)).json()["model_configs"]) == 1

    at_limits = await create_config(
        admin,
        provider["id"],
        name="n" * 100,
        model="m" * 200,
        context_limit=2**31 - 1,
        compression_threshold=1,
    )
    assert_status(await admin.http.post(CONFIGS, json={**base, "name": "n" * 100}), 409, "conflict")

    path = f"{CONFIGS}/{at_limits['id']}"
    assert_invalid(await admin.http.patch(path, json={}), "body")
    assert_invalid(await admin.http.patch(path, json={"model": "m" * 201}), "model")
    assert_invalid(await admin.http.patch(path, json={"model": None}), "model")
    assert_invalid(await admin.http.patch(path, json={"context_limit": 0}), "context_limit")
    assert_invalid(await admin.http.patch(path, json={"options": {"tools": []}}), "options.tools")
    assert_invalid(await admin.http.patch(path, json={"provider_id": str(uuid4())}), "provider_id")
    assert_invalid(await admin.http.patch(path, json={"is_default": None}), "is_default")
    assert_invalid(await admin.http.patch(path, json={"what": 1}), "what")
    other = await create_config(admin, provider["id"], name="other")
    assert_status(await admin.http.patch(path, json={"name": "other"}), 409, "conflict")
    assert (await admin.http.get(f"{CONFIGS}/{other['id']}")).json() == other
    for bad in ("nope", str(uuid4()).upper()[:35]):
        for method in ("GET", "PATCH", "DELETE"):
            response = await admin.http.request(method, f"{CONFIGS}/{bad}", json={"name": "q"})
            assert_invalid(response, "config_id")


# -- the config cache ----------------------------------------------------------------------


async def test_writes_are_seen_by_the_very_next_turn(api: ApiWorld, admin: Client) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat("hello")
    await alice.wait_status(chat["id"], "waiting")
    assert api.llm.requests[-1].body["model"] == "fake-model"  # cached now, for a TTL

    default = await default_config(admin)
    path = f"{CONFIGS}/{default['id']}"
    await admin.http.patch(path, json={"model": "fake-model-2", "options": {"temperature": 0.25}})
    body = await next_turn(api, alice, chat["id"])
    assert (body["model"], body["temperature"]) == ("fake-model-2", 0.25)

    # A new default on the same provider takes over at once.
    newer = await create_config(
        admin, default["provider_id"], model="fake-model-3", is_default=True
    )
    body = await next_turn(api, alice, chat["id"])
    assert (body["model"], "temperature" in body) == ("fake-model-3", False)

    # A chat with its own model config follows that config's changes.
    pinned = await create_config(admin, default["provider_id"], model="pinned-1")
    own = await alice.create_chat("hi", model_config_id=pinned["id"])
    await alice.wait_status(own["id"], "waiting")
    assert api.llm.requests[-1].body["model"] == "pinned-1"
    await admin.http.patch(f"{CONFIGS}/{pinned['id']}", json={"model": "pinned-2"})
    assert (await next_turn(api, alice, own["id"]))["model"] == "pinned-2"

    # Switching back to the old default.
    await admin.http.patch(path, json={"is_default": True})
    assert (await next_turn(api, alice, chat["id"]))["model"] == "fake-model-2"
    assert (await admin.http.get(f"{CONFIGS}/{newer['id']}")).json()["is_default"] is False

    # The provider's changes too: a wrong key is sent at once.
    provider_path = f"{PROVIDERS}/{default['provider_id']}"
    await admin.http.patch(provider_path, json={"api_key": "sk-rotated"})
    await next_turn(api, alice, chat["id"])
    assert api.llm.requests[-1].headers["authorization"] == "Bearer sk-rotated"


async def test_a_disabled_provider_fails_the_next_turn(api: ApiWorld, admin: Client) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat("hello")
    await alice.wait_status(chat["id"], "waiting")
    default = await default_config(admin)
    disabled = await admin.http.patch(
        f"{PROVIDERS}/{default['provider_id']}", json={"enabled": False}
    )
    assert disabled.json()["enabled"] is False
    before = api.llm.request_count
    sent = await alice.http.post(f"/api/v1/chats/{chat['id']}/messages", json={"text": "go"})
    assert sent.status_code == 202
    await alice.wait_status(chat["id"], "error")
    assert api.llm.request_count == before  # no request was made
    failed = (await alice.http.get(f"/api/v1/chats/{chat['id']}")).json()
    assert failed["last_error"]["kind"] == "config"


async def test_config_is_loaded_about_once_per_ttl_over_100_turns(api: ApiWorld) -> None:
    alice = await api.client("alice")
    await alice.http.put("/api/v1/users/me/prompt", json={"prompt": "Be nice."})
    cache = api.engine.config
    caches: dict[str, TtlCache[Any, Any]] = {
        "provider": cache.providers,
        "model_config": cache.model_configs,
        "user_prompt": cache.user_prompts,
    }
    loads_before = {kind: c.stats.loads for kind, c in caches.items()}
    hits_before = {kind: c.stats.hits for kind, c in caches.items()}
    started = trio.current_time()
    turns = 100
    finished = 0
    with trio.fail_after(DEADLINE_S * 4):
        async with alice.ws("/api/v1/notifications/inbox/watch") as inbox:
            chat = await alice.create_chat("turn 1")

            async def turn_finished() -> None:
                nonlocal finished
                events = frames(await inbox.get_message())
                assert [e["kind"] for e in events] == ["turn_finished"], events
                finished += 1

            await turn_finished()
            while finished < turns:
                path = f"/api/v1/chats/{chat['id']}/messages"
                response = await alice.http.post(path, json={"text": f"turn {finished + 1}"})
                assert response.status_code == 202, response.text
                assert response.json()["queued"] is False
                await turn_finished()
    elapsed = trio.current_time() - started
    assert finished == turns
    assert api.llm.request_count == turns  # one model request per turn
    budget = 1 + math.ceil(elapsed / cache.model_configs.ttl_s)
    loads = {kind: c.stats.loads - loads_before[kind] for kind, c in caches.items()}
    hits = {kind: c.stats.hits - hits_before[kind] for kind, c in caches.items()}
    report = json.dumps({"elapsed_s": elapsed, "loads": loads, "hits": hits, "budget": budget})
    for kind in caches:
        assert 1 <= loads[kind] <= budget, report
        assert hits[kind] >= turns - budget, report
