"""The chat routes over real sockets: success and error codes, isolation, bad input."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from chatd.providers.fake import knobs_marker
from chatd.store.database import Database
from tests.e2e.api_world import ApiWorld, serve_api

SLOW = knobs_marker(first_chunk_delay_ms=600_000)
LOOKUP = {
    "name": "lookup",
    "description": "Look a word up",
    "input_schema": {"type": "object", "properties": {"word": {"type": "string"}}},
}
CALL_LOOKUP = knobs_marker(tool_calls=[{"name": "lookup", "arguments": {"word": "kiwi"}}])


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    return body


async def chat_count(db: Database) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM chats")
    return count


async def test_a_chat_is_created_answered_and_read_back(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat(f"{knobs_marker(chunks=3)} hello", title="First")
    assert chat["title"] == "First"
    assert chat["status"] in ("running", "waiting")
    await alice.wait_status(chat["id"], "waiting")

    got = (await alice.http.get(f"/api/v1/chats/{chat['id']}")).json()
    assert got["status"] == "waiting"
    assert got["queue"] == []
    assert got["pending_tool_calls"] == []
    page = (await alice.http.get(f"/api/v1/chats/{chat['id']}/messages")).json()
    roles = [m["role"] for m in page["messages"]]
    assert roles == ["user", "assistant"]
    assert page["messages"][1]["content"] == [{"type": "text", "text": "w1 w2 w3 "}]
    assert page["next_after_seq"] is None


async def test_messages_page_with_after_seq(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat(f"{knobs_marker(chunks=1)} one")
    await alice.wait_status(chat["id"], "waiting")
    sent = await alice.http.post(f"/api/v1/chats/{chat['id']}/messages", json={"text": "two"})
    assert sent.status_code == 202
    assert sent.json()["queued"] is False
    await alice.wait_status(chat["id"], "waiting")
    url = f"/api/v1/chats/{chat['id']}/messages"
    first = (await alice.http.get(url, params={"limit": 3})).json()
    assert [m["seq"] for m in first["messages"]] == [1, 2, 3]
    assert first["next_after_seq"] == 3
    rest = (await alice.http.get(url, params={"after_seq": 3, "limit": 3})).json()
    assert [m["seq"] for m in rest["messages"]] == [4]
    assert rest["next_after_seq"] is None


async def test_chats_list_pages_and_filters_archived(api: ApiWorld) -> None:
    alice = await api.client("alice")
    ids = []
    for i in range(3):
        chat = await alice.create_chat(f"{knobs_marker(chunks=1)} chat {i}")
        await alice.wait_status(chat["id"], "waiting")
        ids.append(chat["id"])
    first = (await alice.http.get("/api/v1/chats", params={"limit": 2})).json()
    assert len(first["chats"]) == 2
    second = (
        await alice.http.get("/api/v1/chats", params={"limit": 2, "cursor": first["next_cursor"]})
    ).json()
    assert second["next_cursor"] is None
    listed = [c["id"] for c in first["chats"] + second["chats"]]
    assert sorted(listed) == sorted(ids)

    archived = await alice.http.patch(f"/api/v1/chats/{ids[0]}", json={"archived": True})
    assert archived.status_code == 200
    assert archived.json()["archived"] is True
    only = (await alice.http.get("/api/v1/chats", params={"archived": "true"})).json()
    assert [c["id"] for c in only["chats"]] == [ids[0]]
    others = (await alice.http.get("/api/v1/chats", params={"archived": "false"})).json()
    assert sorted(c["id"] for c in others["chats"]) == sorted(ids[1:])
    back = await alice.http.patch(f"/api/v1/chats/{ids[0]}", json={"archived": False})
    assert back.json()["archived"] is False


async def test_rename(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat(f"{knobs_marker(chunks=1)} hi")
    renamed = await alice.http.patch(f"/api/v1/chats/{chat['id']}", json={"title": "New name"})
    assert renamed.status_code == 200
    assert renamed.json()["title"] == "New name"
    got = (await alice.http.get(f"/api/v1/chats/{chat['id']}")).json()
    assert got["title"] == "New name"
    empty = await alice.http.patch(f"/api/v1/chats/{chat['id']}", json={})
    assert error_of(empty, 400)["field"] == "body"


async def test_busy_chat_queues_and_the_queue_is_managed(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat(f"{SLOW} think slowly")
    base = f"/api/v1/chats/{chat['id']}"
    first = (await alice.http.post(f"{base}/messages", json={"text": "first"})).json()
    second = (await alice.http.post(f"{base}/messages", json={"text": "second"})).json()
    assert first["queued"] is True
    assert second["queued"] is True
    detail = (await alice.http.get(base)).json()
    assert [q["text"] for q in detail["queue"]] == ["first", "second"]

    promoted = await alice.http.post(f"{base}/queue/{second['message_id']}/promote")
    assert promoted.status_code == 204
    detail = (await alice.http.get(base)).json()
    assert [q["text"] for q in detail["queue"]] == ["second", "first"]
    deleted = await alice.http.delete(f"{base}/queue/{first['message_id']}")
    assert deleted.status_code == 204
    detail = (await alice.http.get(base)).json()
    assert [q["text"] for q in detail["queue"]] == ["second"]
    missing = await alice.http.delete(f"{base}/queue/{uuid.uuid4()}")
    assert error_of(missing, 404)["code"] == "not_found"
    bad = await alice.http.post(f"{base}/queue/nope/promote")
    assert error_of(bad, 400)["field"] == "queued_id"


async def test_interrupt(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat(f"{SLOW} think slowly")
    base = f"/api/v1/chats/{chat['id']}"
    stopped = await alice.http.post(f"{base}/interrupt")
    assert stopped.status_code == 204
    await alice.wait_status(chat["id"], "waiting")
    # Stopping a chat that already stopped is not an error: the client's intent holds.
    again = await alice.http.post(f"{base}/interrupt")
    assert again.status_code == 204


async def test_send_with_interrupt_goes_next(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat(f"{SLOW} think slowly")
    base = f"/api/v1/chats/{chat['id']}"
    body = {"text": f"{knobs_marker(chunks=1)} now", "busy_behavior": "interrupt"}
    sent = await alice.http.post(f"{base}/messages", json=body)
    assert sent.status_code == 202
    await alice.wait_status(chat["id"], "waiting")
    messages = (await alice.http.get(f"{base}/messages")).json()["messages"]
    assert messages[-1]["role"] == "assistant"
    assert messages[-2]["content"][0]["text"].endswith(" now")
    wrong = await alice.http.post(f"{base}/messages", json={"text": "x", "busy_behavior": "no"})
    assert error_of(wrong, 400)["field"] == "busy_behavior"


async def test_edit_regenerates(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat(f"{knobs_marker(chunks=1)} first")
    await alice.wait_status(chat["id"], "waiting")
    base = f"/api/v1/chats/{chat['id']}"
    messages = (await alice.http.get(f"{base}/messages")).json()["messages"]
    user_id = messages[0]["id"]
    edit = await alice.http.patch(
        f"{base}/messages/{user_id}", json={"text": f"{knobs_marker(chunks=2)} edited"}
    )
    assert edit.status_code == 202
    assert edit.json()["message_id"] != user_id
    await alice.wait_status(chat["id"], "waiting")
    after = (await alice.http.get(f"{base}/messages")).json()["messages"]
    assert [m["role"] for m in after] == ["user", "assistant"]
    assert after[0]["content"][0]["text"].endswith(" edited")
    assert after[1]["content"][0]["text"] == "w1 w2 "
    unknown = await alice.http.patch(f"{base}/messages/{uuid.uuid4()}", json={"text": "x"})
    assert error_of(unknown, 404)["code"] == "not_found"


async def test_dynamic_tool_call_is_answered(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat(f"{CALL_LOOKUP} look it up", dynamic_tools=[LOOKUP])
    base = f"/api/v1/chats/{chat['id']}"
    early = await alice.http.post(f"{base}/tool-results", json={"results": []})
    assert early.status_code in (400, 409)  # 409 until the call arrives
    await alice.wait_status(chat["id"], "requires_action")
    detail = (await alice.http.get(base)).json()
    [call] = detail["pending_tool_calls"]
    assert call["name"] == "lookup"
    assert json.loads(call["arguments"]) == {"word": "kiwi"}

    url = f"{base}/tool-results"
    missing = await alice.http.post(url, json={"results": []})
    assert error_of(missing, 400)["field"] == "results"
    extra = {"call_id": "nope", "output": "{}"}
    answer = {"call_id": call["id"], "output": '{"meaning": "a fruit"}'}
    too_many = await alice.http.post(url, json={"results": [answer, extra]})
    assert error_of(too_many, 400)["field"] == "results"
    twice = await alice.http.post(url, json={"results": [answer, answer]})
    assert error_of(twice, 400)["field"] == "results"
    not_json = await alice.http.post(url, json={"results": [{**answer, "output": "{oops"}]})
    assert error_of(not_json, 400)["field"] == "results[0].output"

    done = await alice.http.post(url, json={"results": [answer]})
    assert done.status_code == 204
    await alice.wait_status(chat["id"], "waiting")
    late = await alice.http.post(url, json={"results": [answer]})
    assert error_of(late, 409)["code"] == "conflict"


async def test_diff_status(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat(f"{knobs_marker(chunks=1)} hi")
    url = f"/api/v1/chats/{chat['id']}/diff-status"
    empty = (await alice.http.get(url)).json()
    assert empty["branch"] is None
    assert empty["updated_at"] is None
    body = {
        "branch": "feature/x",
        "remote": "origin",
        "pull_request_url": "https://example.com/pr/1",
        "pull_request_state": "open",
        "additions": 10,
        "deletions": 2,
        "changed_files": 3,
    }
    put = await alice.http.put(url, json=body)
    assert put.status_code == 200
    got = (await alice.http.get(url)).json()
    assert {k: got[k] for k in body} == body
    bad_url = await alice.http.put(url, json={"pull_request_url": "ftp://x"})
    assert error_of(bad_url, 400)["field"] == "pull_request_url"
    bad_state = await alice.http.put(url, json={"pull_request_state": "weird"})
    assert error_of(bad_state, 400)["field"] == "pull_request_state"
    negative = await alice.http.put(url, json={"additions": -1})
    assert error_of(negative, 400)["field"] == "additions"


async def test_another_users_chat_is_a_404_like_a_missing_one(api: ApiWorld) -> None:
    alice = await api.client("alice")
    bob = await api.client("bob")
    chat = await alice.create_chat(f"{SLOW} private")
    queued = await alice.http.post(f"/api/v1/chats/{chat['id']}/messages", json={"text": "q"})
    qid = queued.json()["message_id"]
    mid = str(uuid.uuid4())
    requests: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", "", None),
        ("PATCH", "", {"title": "mine"}),
        ("GET", "/messages", None),
        ("POST", "/messages", {"text": "hi"}),
        ("PATCH", f"/messages/{mid}", {"text": "hi"}),
        ("POST", "/interrupt", None),
        ("POST", "/tool-results", {"results": []}),
        ("DELETE", f"/queue/{qid}", None),
        ("POST", f"/queue/{qid}/promote", None),
        ("GET", "/diff-status", None),
        ("PUT", "/diff-status", {"branch": "x"}),
        ("POST", "/compact", None),
        ("DELETE", "", None),
    ]
    for method, suffix, body in requests:
        theirs = await bob.http.request(method, f"/api/v1/chats/{chat['id']}{suffix}", json=body)
        missing = await bob.http.request(method, f"/api/v1/chats/{uuid.uuid4()}{suffix}", json=body)
        assert theirs.status_code == 404, (method, suffix, theirs.text)
        assert theirs.json() == missing.json()
    listed = (await bob.http.get("/api/v1/chats")).json()
    assert listed["chats"] == []
    detail = (await alice.http.get(f"/api/v1/chats/{chat['id']}")).json()
    assert detail["title"] == ""
    assert [q["id"] for q in detail["queue"]] == [qid]


@pytest.mark.parametrize(
    ("body", "field", "rule_part"),
    [
        ({}, "text", "required"),
        ({"text": 5}, "text", "str"),
        ({"text": "hi", "colour": "red"}, "colour", "not a known field"),
        ({"text": "a\u0000b"}, "text", "NUL"),
        ({"text": "hi", "title": None}, "title", "str"),
        ({"text": "hi", "model_config_id": "not-a-uuid"}, "model_config_id", "uuid"),
        ({"text": "hi", "model_config_id": str(uuid.UUID(int=7))}, "model_config_id", "exist"),
        ({"text": "   "}, "text", "empty"),
        ({"text": "hi", "dynamic_tools": [{"name": "bad name"}]}, "dynamic_tools[0].name", "1-64"),
        (
            {"text": "hi", "dynamic_tools": [{"name": "calculate"}]},
            "dynamic_tools[0].name",
            "built-in",
        ),
        (
            {"text": "hi", "dynamic_tools": [{"name": "t", "input_schema": {"type": "array"}}]},
            "dynamic_tools[0].input_schema",
            "object",
        ),
    ],
)
async def test_bad_create_bodies_are_400_and_write_nothing(
    api: ApiWorld, body: dict[str, Any], field: str, rule_part: str
) -> None:
    alice = await api.client("alice")
    response = await alice.http.post("/api/v1/chats", json=body)
    error = error_of(response, 400)
    assert error["field"] == field
    assert rule_part.lower() in error["rule"].lower(), error
    assert error["message"] == f"{field}: {error['rule']}"
    assert await chat_count(api.db) == 0


async def test_malformed_requests(api: ApiWorld) -> None:
    alice = await api.client("alice")
    not_json = await alice.http.post(
        "/api/v1/chats", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert error_of(not_json, 400)["field"] == "body"
    not_object = await alice.http.post("/api/v1/chats", json=["text"])
    assert error_of(not_object, 400)["field"] == "body"
    bad_id = await alice.http.get("/api/v1/chats/12345")
    assert error_of(bad_id, 400)["field"] == "chat_id"
    bad_limit = await alice.http.get("/api/v1/chats", params={"limit": "0"})
    assert error_of(bad_limit, 400)["field"] == "limit"
    bad_cursor = await alice.http.get("/api/v1/chats", params={"cursor": "xyz"})
    assert error_of(bad_cursor, 400)["field"] == "cursor"
    unknown = await alice.http.get("/api/v1/chats", params={"colour": "red"})
    assert error_of(unknown, 400)["field"] == "colour"
    nul_query = await alice.http.get("/api/v1/chats", params={"archived": "tr\x00ue"})
    assert error_of(nul_query, 400)["field"] == "archived"
    no_route = await alice.http.get("/api/v1/nothing-here")
    assert error_of(no_route, 404)["code"] == "not_found"
    wrong_method = await alice.http.put("/api/v1/chats")
    assert error_of(wrong_method, 405)["code"] == "method_not_allowed"
    assert await chat_count(api.db) == 0


async def test_limits_pass_at_n_and_fail_at_n_plus_one(db: Database) -> None:
    limits = {
        "max_message_chars": 100,
        "max_title_chars": 10,
        "max_system_prompt_chars": 20,
        "max_tools_per_chat": 2,
        "max_tool_schema_bytes": 120,
        "max_json_depth": 6,
        "max_body_bytes": 4096,
        "max_queue_length": 2,
    }
    async with serve_api(db, **limits) as api:
        alice = await api.client("alice")
        slow = f"{SLOW}"

        async def create(**fields: Any) -> Any:
            return await alice.http.post("/api/v1/chats", json={"text": slow, **fields})

        def tools(n: int, schema: dict[str, Any] | None = None) -> list[dict[str, Any]]:
            return [
                {"name": f"t{i}", "input_schema": schema or {"type": "object"}} for i in range(n)
            ]

        schema_at_limit = {"type": "object", "description": "x" * 86}
        assert len(json.dumps(schema_at_limit, separators=(",", ":"))) == 120
        # The body's depth: the body 1, the tools list 2, a tool 3, its schema 4, "a" 5, ...
        depth_6 = {"type": "object", "a": {"b": {"c": 1}}}
        depth_7 = {"type": "object", "a": {"b": {"c": {"d": 1}}}}
        cases: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
            ("title", {"title": "t" * 10}, {"title": "t" * 11}),
            ("system_prompt", {"system_prompt": "s" * 20}, {"system_prompt": "s" * 21}),
            ("dynamic_tools", {"dynamic_tools": tools(2)}, {"dynamic_tools": tools(3)}),
            (
                "dynamic_tools[0].input_schema",
                {"dynamic_tools": tools(1, schema_at_limit)},
                {"dynamic_tools": tools(1, {**schema_at_limit, "description": "x" * 87})},
            ),
            (
                "dynamic_tools[0].input_schema.a.b.c",
                {"dynamic_tools": tools(1, depth_6)},
                {"dynamic_tools": tools(1, depth_7)},
            ),
        ]
        for field, ok, too_much in cases:
            passed = await create(**ok)
            assert passed.status_code == 201, (field, passed.text)
            failed = await create(**too_much)
            assert error_of(failed, 400)["field"] == field

        chat_id = (await create()).json()["id"]
        url = f"/api/v1/chats/{chat_id}/messages"
        at_limit = await alice.http.post(url, json={"text": "m" * 100})
        assert at_limit.status_code == 202
        over = await alice.http.post(url, json={"text": "m" * 101})
        assert error_of(over, 400)["field"] == "text"
        assert (await alice.http.post(url, json={"text": "second"})).status_code == 202
        full = await alice.http.post(url, json={"text": "third"})
        assert error_of(full, 429)["code"] == "queue_full"

        big = {"text": "b", "title": "x" * 5000}
        too_big = await alice.http.post("/api/v1/chats", json=big)
        assert error_of(too_big, 413)["code"] == "payload_too_large"


async def test_clients_helper_rejects_missing_token(api: ApiWorld) -> None:
    async with api.anonymous() as anonymous:
        response = await anonymous.post("/api/v1/chats", json={"text": "hi"})
    error = error_of(response, 401)
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert error["code"] == "unauthorized"
    assert await chat_count(api.db) == 0
