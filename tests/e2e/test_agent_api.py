"""The web side of the agent half over real sockets: built-in tool allow-lists on model configs
and chats, token usage (per chat, per user, as a metric), deleting a chat, compacting one, the
``deleted`` watch event (on the socket and across workers), and the OpenAPI document of it all.

Tests that need the chat's actor to delete or compact are marked until that side lands.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import UUID

import httpx2
import pytest
import trio
from trio_websocket import WebSocketConnection

from chatd.actors.feed_bridge import FeedBridge
from chatd.actors.feeds import UserFeed
from chatd.domain.watch_events import ChatDeleted, WatchEvent
from chatd.providers.fake import knobs_marker
from chatd.store import chats, providers
from chatd.store.database import Database
from chatd.store.records import InboxNotification
from chatd.tools.registry import DEFAULT_TOOLS, TOOL_NAMES
from chatd.web.frames import encode_watch_batch
from tests.e2e.api_world import DEADLINE_S, ApiWorld, Client, frames
from tests.e2e.test_metrics import Scrape, scrape_until

CHATS = "/api/v1/chats"
CONFIGS = "/api/v1/model-configs"
USAGE = "/api/v1/users/me/usage"
QUICK = knobs_marker(chunks=1)
SLOW = knobs_marker(first_chunk_delay_ms=600_000)


def error_of(response: httpx2.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    return body


def assert_invalid(response: httpx2.Response, field: str, rule_part: str = "") -> None:
    error = error_of(response, 400)
    assert (error["code"], error["field"]) == ("invalid_request", field), error
    assert rule_part.lower() in error["rule"].lower(), error


async def chat_count(db: Database) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM chats")
    return count


async def new_config(admin: Client, provider_id: str, **fields: Any) -> dict[str, Any]:
    body = {
        "provider_id": provider_id,
        "name": f"m-{uuid.uuid4().hex[:8]}",
        "model": "some-model",
        "context_limit": 8000,
        **fields,
    }
    response = await admin.http.post(CONFIGS, json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def default_config(client: Client) -> dict[str, Any]:
    configs = (await client.http.get(CONFIGS)).json()["model_configs"]
    found: dict[str, Any] = next(c for c in configs if c["is_default"])
    return found


class Watch:
    """The events of a ``/chats/watch`` socket, one at a time, whatever frames they came in."""

    def __init__(self, conn: WebSocketConnection) -> None:
        self.conn = conn
        self.pending: list[dict[str, Any]] = []

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        with trio.fail_after(DEADLINE_S):
            while True:
                while not self.pending:
                    self.pending.extend(frames(await self.conn.get_message()))
                event = self.pending.pop(0)
                if predicate(event):
                    return event


@contextlib.asynccontextmanager
async def watch(client: Client) -> AsyncIterator[Watch]:
    async with client.ws(f"{CHATS}/watch") as conn:
        yield Watch(conn)


# -- model configs: tools and the compression threshold -------------------------------------


async def test_a_model_configs_tools_round_trip(api: ApiWorld) -> None:
    admin = await api.client("root", admin=True)
    provider_id = (await default_config(admin))["provider_id"]

    plain = await new_config(admin, provider_id)
    assert plain["tools"] == list(DEFAULT_TOOLS)  # the database's default
    assert plain["compression_threshold"] == 0.7  # the database's default too

    chosen = await new_config(admin, provider_id, tools=["read_file", "calculate", "read_file"])
    assert chosen["tools"] == ["read_file", "calculate"]  # duplicates dropped, order kept
    path = f"{CONFIGS}/{chosen['id']}"
    assert (await admin.http.get(path)).json() == chosen
    stored = await providers.get_model_config(api.db, UUID(chosen["id"]))
    assert stored is not None
    assert stored.tools == ("read_file", "calculate")

    patched = await admin.http.patch(path, json={"tools": ["execute", "write_file"]})
    assert patched.status_code == 200, patched.text
    assert patched.json()["tools"] == ["execute", "write_file"]
    assert patched.json()["name"] == chosen["name"]
    renamed = await admin.http.patch(path, json={"name": "renamed"})
    assert renamed.json()["tools"] == ["execute", "write_file"]  # absent: kept
    emptied = await admin.http.patch(path, json={"tools": []})
    assert emptied.json()["tools"] == []
    every = await new_config(admin, provider_id, tools=list(TOOL_NAMES))
    assert every["tools"] == list(TOOL_NAMES)
    listed = (await admin.http.get(CONFIGS)).json()["model_configs"]
    assert {c["id"]: c["tools"] for c in listed}[chosen["id"]] == []


async def test_an_unknown_tool_name_is_a_400_naming_its_index(api: ApiWorld) -> None:
    admin = await api.client("root", admin=True)
    provider_id = (await default_config(admin))["provider_id"]
    base = {"provider_id": provider_id, "name": "c", "model": "m", "context_limit": 10}
    before = (await admin.http.get(CONFIGS)).json()

    async def refused(tools: object, field: str, rule_part: str = "") -> None:
        response = await admin.http.post(CONFIGS, json={**base, "tools": tools})
        assert_invalid(response, field, rule_part)

    await refused(["calculate", "rm_rf"], "tools[1]", "built-in tool")
    await refused(["nope"], "tools[0]", "built-in tool")
    await refused(["calculate", 5], "tools[1]")
    await refused("calculate", "tools")
    await refused(["calculate"] * 65, "tools", "64")
    assert (await admin.http.get(CONFIGS)).json() == before  # nothing written

    config = await new_config(admin, provider_id, tools=["calculate"])
    path = f"{CONFIGS}/{config['id']}"
    assert_invalid(await admin.http.patch(path, json={"tools": ["x"]}), "tools[0]", "built-in")
    assert_invalid(await admin.http.patch(path, json={"tools": None}), "tools")
    both = {"name": "other", "tools": ["calculate", "bogus"]}
    assert_invalid(await admin.http.patch(path, json=both), "tools[1]")
    assert (await admin.http.get(path)).json() == config  # nothing changed


async def test_a_compression_threshold_is_a_fraction_of_the_context(api: ApiWorld) -> None:
    admin = await api.client("root", admin=True)
    provider_id = (await default_config(admin))["provider_id"]
    config = await new_config(admin, provider_id, compression_threshold=0.5)
    assert config["compression_threshold"] == 0.5
    base = {"provider_id": provider_id, "name": "c", "model": "m", "context_limit": 10}
    for bad in (0, 70, 1.5, -0.1):
        response = await admin.http.post(CONFIGS, json={**base, "compression_threshold": bad})
        assert_invalid(response, "compression_threshold", "at most 1")


# -- chats: their own tools and token totals ------------------------------------------------


async def test_a_chat_is_created_with_its_own_tools(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat(f"{QUICK} hi", tools=["calculate", "current_time", "calculate"])
    assert chat["tools"] == ["calculate", "current_time"]
    assert (chat["input_tokens"], chat["output_tokens"]) == (0, 0)
    await alice.wait_status(chat["id"], "waiting")
    got = (await alice.http.get(f"{CHATS}/{chat['id']}")).json()
    assert got["tools"] == ["calculate", "current_time"]
    stored = await chats.get_chat(api.db, UUID(chat["id"]))
    assert stored is not None
    assert stored.tools == ("calculate", "current_time")

    # Without tools (or with null): the model config's, shown as null.
    inherited = await alice.create_chat(f"{QUICK} hi")
    assert inherited["tools"] is None
    explicit_null = await alice.create_chat(f"{QUICK} hi", tools=None)
    assert explicit_null["tools"] is None
    none_at_all = await alice.create_chat(f"{QUICK} hi", tools=[])
    assert none_at_all["tools"] == []
    listed = (await alice.http.get(CHATS)).json()["chats"]
    by_id = {c["id"]: c for c in listed}
    assert by_id[chat["id"]]["tools"] == ["calculate", "current_time"]
    assert by_id[inherited["id"]]["tools"] is None
    assert all(
        isinstance(c["input_tokens"], int) and isinstance(c["output_tokens"], int) for c in listed
    )


@pytest.mark.parametrize(
    ("tools", "field", "rule_part"),
    [
        (["calculate", "rm_rf"], "tools[1]", "built-in tool"),
        (["shell"], "tools[0]", "built-in tool"),
        (["calculate", 7], "tools[1]", "str"),
        ("calculate", "tools", "array"),
        (["calculate"] * 65, "tools", "64"),
    ],
)
async def test_bad_chat_tools_are_400_and_create_no_chat(
    api: ApiWorld, tools: object, field: str, rule_part: str
) -> None:
    alice = await api.client("alice")
    response = await alice.http.post(CHATS, json={"text": "hi", "tools": tools})
    assert_invalid(response, field, rule_part)
    assert await chat_count(api.db) == 0
    assert (await alice.http.get(CHATS)).json()["chats"] == []


# -- usage ----------------------------------------------------------------------------------


async def test_a_new_users_usage_is_zero(api: ApiWorld) -> None:
    alice = await api.client("alice")
    response = await alice.http.get(USAGE)
    assert response.status_code == 200, response.text
    assert response.json() == {"input_tokens": 0, "output_tokens": 0}
    async with api.anonymous() as anonymous:
        assert (await anonymous.get(USAGE)).status_code == 401


async def test_usage_is_the_sum_of_the_callers_chats(api: ApiWorld) -> None:
    alice = await api.client("alice")
    bob = await api.client("bob")
    ids = []
    for i in range(2):
        chat = await alice.create_chat(f"{QUICK} chat {i}", title=f"chat {i}")
        await alice.wait_status(chat["id"], "waiting")
        ids.append(chat["id"])
    views = [(await alice.http.get(f"{CHATS}/{i}")).json() for i in ids]
    usage = (await alice.http.get(USAGE)).json()
    assert usage == {
        "input_tokens": sum(v["input_tokens"] for v in views),
        "output_tokens": sum(v["output_tokens"] for v in views),
    }
    assert (await bob.http.get(USAGE)).json() == {"input_tokens": 0, "output_tokens": 0}


async def test_a_turns_tokens_are_counted_for_the_chat_the_user_and_the_metric(
    api: ApiWorld,
) -> None:
    admin = await api.client("root", admin=True)
    # A title is given: no title call adds its own tokens.
    marker = knobs_marker(chunks=1, input_tokens=100, output_tokens=7)
    chat = await admin.create_chat(f"{marker} count me", title="counted")
    await admin.wait_status(chat["id"], "waiting")
    got = (await admin.http.get(f"{CHATS}/{chat['id']}")).json()
    assert (got["input_tokens"], got["output_tokens"]) == (100, 7)
    assert (await admin.http.get(USAGE)).json() == {"input_tokens": 100, "output_tokens": 7}

    def counted(figures: Scrape) -> bool:
        return figures['chatd_tokens_total{direction="input"}'] >= 100

    figures = await scrape_until(admin, counted)
    assert figures['chatd_tokens_total{direction="input"}'] == 100
    assert figures['chatd_tokens_total{direction="output"}'] == 7


async def test_the_tokens_metric_is_described_with_both_directions(api: ApiWorld) -> None:
    admin = await api.client("root", admin=True)
    figures = await scrape_until(admin, lambda _f: True)
    assert figures.types["chatd_tokens_total"] == "counter"
    assert "input" in figures.help["chatd_tokens_total"]
    for direction in ("input", "output"):
        assert figures[f'chatd_tokens_total{{direction="{direction}"}}'] == 0


# -- delete ---------------------------------------------------------------------------------


async def test_deleting_another_users_chat_is_a_404_and_changes_nothing(api: ApiWorld) -> None:
    alice = await api.client("alice")
    bob = await api.client("bob")
    chat = await alice.create_chat(f"{QUICK} private", title="mine")
    await alice.wait_status(chat["id"], "waiting")
    path = f"{CHATS}/{chat['id']}"
    before = (await alice.http.get(path)).json()
    history = (await alice.http.get(f"{path}/messages")).json()

    theirs = await bob.http.delete(path)
    missing = await bob.http.delete(f"{CHATS}/{uuid.uuid4()}")
    assert error_of(theirs, 404)["code"] == "not_found"
    assert theirs.json() == missing.json()
    keyed = await bob.http.delete(path, headers={"Idempotency-Key": "bob-1"})
    assert keyed.json() == missing.json()
    assert_invalid(await bob.http.delete(f"{CHATS}/nope"), "chat_id")

    assert (await alice.http.get(path)).json() == before
    assert (await alice.http.get(f"{path}/messages")).json() == history
    assert await chat_count(api.db) == 1


async def test_deleting_a_chat_removes_it_and_tells_the_watch(api: ApiWorld) -> None:
    alice = await api.client("alice")
    marker = knobs_marker(chunks=1, input_tokens=40, output_tokens=3)
    async with watch(alice) as events:
        chat = await alice.create_chat(f"{marker} soon gone", title="gone")
        await alice.wait_status(chat["id"], "waiting")
        path = f"{CHATS}/{chat['id']}"
        spent = (await alice.http.get(path)).json()
        put = await alice.http.put(f"{path}/diff-status", json={"branch": "main"})
        assert put.status_code == 200, put.text

        deleted = await alice.http.delete(path)
        assert (deleted.status_code, deleted.content) == (204, b"")
        seen = await events.until(lambda e: e["kind"] == "deleted")
        assert seen == {"kind": "deleted", "chat_id": chat["id"]}

    for method, suffix, body in [
        ("GET", "", None),
        ("GET", "/messages", None),
        ("POST", "/messages", {"text": "still there?"}),
        ("POST", "/compact", None),
        ("GET", "/diff-status", None),
        ("DELETE", "", None),
    ]:
        response = await alice.http.request(method, f"{path}{suffix}", json=body)
        assert error_of(response, 404)["code"] == "not_found", (method, suffix)
    assert (await alice.http.get(CHATS)).json()["chats"] == []
    assert await chat_count(api.db) == 0
    # The chat's tokens stay in the user's usage.
    usage = (await alice.http.get(USAGE)).json()
    assert usage == {"input_tokens": spent["input_tokens"], "output_tokens": spent["output_tokens"]}


async def test_a_running_chat_is_deleted_too(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat(f"{SLOW} think slowly")
    deleted = await alice.http.delete(f"{CHATS}/{chat['id']}")
    assert deleted.status_code == 204, deleted.text
    assert error_of(await alice.http.get(f"{CHATS}/{chat['id']}"), 404)["code"] == "not_found"


async def test_a_delete_retried_with_its_key_is_answered_again(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat(f"{QUICK} once")
    await alice.wait_status(chat["id"], "waiting")
    path = f"{CHATS}/{chat['id']}"
    first = await alice.http.delete(path, headers={"Idempotency-Key": "delete-1"})
    assert first.status_code == 204, first.text
    again = await alice.http.delete(path, headers={"Idempotency-Key": "delete-1"})
    assert again.status_code == 204, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    other = await alice.http.delete(path, headers={"Idempotency-Key": "delete-2"})
    assert error_of(other, 404)["code"] == "not_found"


# -- compact --------------------------------------------------------------------------------


async def test_compacting_a_missing_or_foreign_chat_is_a_404(api: ApiWorld) -> None:
    alice = await api.client("alice")
    bob = await api.client("bob")
    chat = await alice.create_chat(f"{QUICK} private")
    await alice.wait_status(chat["id"], "waiting")
    missing = await alice.http.post(f"{CHATS}/{uuid.uuid4()}/compact")
    assert error_of(missing, 404)["code"] == "not_found"
    theirs = await bob.http.post(f"{CHATS}/{chat['id']}/compact")
    assert theirs.json() == missing.json()
    assert_invalid(await alice.http.post(f"{CHATS}/12345/compact"), "chat_id")
    detail = (await alice.http.get(f"{CHATS}/{chat['id']}")).json()
    assert detail["status"] == "waiting"


async def test_compacting_a_busy_chat_is_a_409(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat(f"{SLOW} think slowly")
    busy = await alice.http.post(f"{CHATS}/{chat['id']}/compact")
    assert error_of(busy, 409)["code"] == "conflict"


async def test_a_chat_is_compacted_then_has_nothing_to_summarize(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat(f"{QUICK} a long story", title="story")
    await alice.wait_status(chat["id"], "waiting")
    path = f"{CHATS}/{chat['id']}/compact"
    started = await alice.http.post(path)
    assert started.status_code == 202, started.text
    assert started.json() == {"compacting": True}
    await alice.wait_status(chat["id"], "waiting", "error")
    assert (await alice.http.get(f"{CHATS}/{chat['id']}")).json()["status"] == "waiting"
    nothing = await alice.http.post(path)
    assert error_of(nothing, 409)["code"] == "conflict"


# -- the deleted watch event ----------------------------------------------------------------


def test_a_deletion_has_its_watch_wire_form() -> None:
    chat_id = uuid.uuid4()
    wire = json.loads(encode_watch_batch([ChatDeleted(chat_id)]))
    assert wire == {"kind": "deleted", "chat_id": str(chat_id)}


async def test_a_deletion_crosses_workers_through_the_feed_bridge(db: Database) -> None:
    def feeds() -> tuple[UserFeed[WatchEvent], UserFeed[InboxNotification]]:
        return (
            UserFeed(queue_size=16, slow_consumer_timeout_s=DEADLINE_S),
            UserFeed(queue_size=16, slow_consumer_timeout_s=DEADLINE_S),
        )

    watch_a, inbox_a = feeds()
    watch_b, inbox_b = feeds()
    user_id, chat_id = uuid.uuid4(), uuid.uuid4()
    async with trio.open_nursery() as nursery:
        await nursery.start(FeedBridge(db, "worker-a", watch_a, inbox_a).run)
        await nursery.start(FeedBridge(db, "worker-b", watch_b, inbox_b).run)
        with trio.fail_after(DEADLINE_S):
            async with watch_b.subscribe(user_id) as events:
                watch_a.publish(user_id, ChatDeleted(chat_id))
                async for batch in events:
                    assert list(batch) == [ChatDeleted(chat_id)]
                    break
        nursery.cancel_scope.cancel()


# -- the OpenAPI document -------------------------------------------------------------------


async def test_the_document_describes_the_new_routes_and_fields(api: ApiWorld) -> None:
    alice = await api.client("alice")
    document = (await alice.http.get("/api/v1/openapi.json")).json()
    paths = document["paths"]
    delete = paths["/api/v1/chats/{chat_id}"]["delete"]
    assert {"204", "404"} <= set(delete["responses"])
    assert any(p["name"] == "Idempotency-Key" for p in delete["parameters"])
    compact = paths["/api/v1/chats/{chat_id}/compact"]["post"]
    assert {"202", "404", "409"} <= set(compact["responses"])
    assert "200" in paths["/api/v1/users/me/usage"]["get"]["responses"]

    schemas = document["components"]["schemas"]
    assert set(schemas["Compacting"]["properties"]) == {"compacting"}
    assert set(schemas["UsageView"]["properties"]) == {"input_tokens", "output_tokens"}
    for name in ("ChatView", "ChatDetail"):
        assert {"tools", "input_tokens", "output_tokens"} <= set(schemas[name]["properties"])
    for name in ("CreateModelConfig", "UpdateModelConfig", "CreateChat"):
        tools = json.dumps(schemas[name]["properties"]["tools"])
        assert '"maxItems": 64' in tools, tools
        assert all(f'"{tool}"' in tools for tool in TOOL_NAMES), tools
    assert "tools" in schemas["ModelConfigView"]["properties"]
    for name in ("CreateModelConfig", "UpdateModelConfig", "ModelConfigView"):
        threshold = json.dumps(schemas[name]["properties"]["compression_threshold"])
        assert "fraction of context_limit" in threshold, threshold
        assert '"exclusiveMinimum": 0' in threshold, threshold
        assert '"maximum": 1' in threshold, threshold
