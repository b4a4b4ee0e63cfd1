"""``/users/me`` and the custom prompt over a real server: who the caller is, the prompt's
limits, and that a prompt written through the API reaches the very next turn's system text."""

from __future__ import annotations

from typing import Any

import httpx2
import trio

from tests.e2e.api_world import DEADLINE_S, ApiWorld, Client

PROMPT = "/api/v1/users/me/prompt"


def assert_invalid(response: httpx2.Response, field: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_request", field), error


def system_text(body: dict[str, Any]) -> str | None:
    """The system message of an OpenAI-style request the fake LLM recorded."""
    found = [m["content"] for m in body["messages"] if m["role"] == "system"]
    assert len(found) <= 1
    return found[0] if found else None


async def next_turn(api: ApiWorld, client: Client, chat_id: str, text: str) -> dict[str, Any]:
    """Send ``text`` to the waiting chat; the body of the model request its turn made."""
    before = api.llm.request_count
    response = await client.http.post(f"/api/v1/chats/{chat_id}/messages", json={"text": text})
    assert response.status_code == 202, response.text
    with trio.fail_after(DEADLINE_S):
        requests = await api.llm.wait_for_requests(before + 1)
    await client.wait_status(chat_id, "waiting")
    body: dict[str, Any] = requests[before].body
    return body


async def test_me_is_the_token_owner(api: ApiWorld) -> None:
    alice = await api.client("alice", admin=True)
    bob = await api.client("bob")
    for client in (alice, bob):
        response = await client.http.get("/api/v1/users/me")
        assert response.status_code == 200
        assert response.json() == {
            "id": str(client.user.id),
            "name": client.user.name,
            "is_admin": client.user.is_admin,
        }


async def test_every_route_needs_a_token(api: ApiWorld) -> None:
    async with api.anonymous() as anonymous:
        for method, path in (
            ("GET", "/api/v1/users/me"),
            ("GET", PROMPT),
            ("PUT", PROMPT),
            ("DELETE", PROMPT),
        ):
            response = await anonymous.request(method, path, json={"prompt": "x"})
            assert response.status_code == 401, (method, path)
            assert response.json()["error"]["code"] == "unauthorized"
        forged = await anonymous.get(
            "/api/v1/users/me", headers={"Authorization": "Bearer not-a-token"}
        )
        assert forged.status_code == 401


async def test_prompt_put_get_clear(api: ApiWorld) -> None:
    alice = await api.client("alice")
    bob = await api.client("bob")
    empty = await alice.http.get(PROMPT)
    assert (empty.status_code, empty.json()) == (200, {"prompt": "", "updated_at": None})

    put = await alice.http.put(PROMPT, json={"prompt": "Answer in French."})
    assert put.status_code == 200, put.text
    assert put.json()["prompt"] == "Answer in French."
    assert put.json()["updated_at"] is not None
    got = await alice.http.get(PROMPT)
    assert got.json() == put.json()
    # Each user has their own.
    assert (await bob.http.get(PROMPT)).json()["prompt"] == ""

    replaced = await alice.http.put(PROMPT, json={"prompt": "Answer in German."})
    assert replaced.json()["prompt"] == "Answer in German."

    # An empty prompt removes it; so does DELETE (idempotent).
    cleared = await alice.http.put(PROMPT, json={"prompt": ""})
    assert cleared.json() == {"prompt": "", "updated_at": None}
    assert (await alice.http.get(PROMPT)).json() == {"prompt": "", "updated_at": None}
    await alice.http.put(PROMPT, json={"prompt": "again"})
    for _ in range(2):
        deleted = await alice.http.delete(PROMPT)
        assert (deleted.status_code, deleted.content) == (204, b"")
    assert (await alice.http.get(PROMPT)).json()["prompt"] == ""


async def test_prompt_is_checked(api: ApiWorld) -> None:
    alice = await api.client("alice")
    limit = api.settings.max_user_prompt_chars
    at_limit = await alice.http.put(PROMPT, json={"prompt": "p" * limit})
    assert at_limit.status_code == 200
    assert len(at_limit.json()["prompt"]) == limit
    assert_invalid(await alice.http.put(PROMPT, json={"prompt": "p" * (limit + 1)}), "prompt")
    assert_invalid(await alice.http.put(PROMPT, json={"prompt": 5}), "prompt")
    assert_invalid(await alice.http.put(PROMPT, json={"prompt": None}), "prompt")
    assert_invalid(await alice.http.put(PROMPT, json={"prompt": "a\x00b"}), "prompt")
    assert_invalid(await alice.http.put(PROMPT, json={}), "prompt")
    assert_invalid(await alice.http.put(PROMPT, json={"prompt": "x", "extra": 1}), "extra")
    assert_invalid(await alice.http.put(PROMPT, json=["x"]), "body")
    assert_invalid(await alice.http.put(PROMPT, content=b"{not json"), "body")
    # Nothing was changed by the refusals.
    assert len((await alice.http.get(PROMPT)).json()["prompt"]) == limit


async def test_prompt_reaches_the_next_turn(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat("hello", system_prompt="Be brief.")
    await alice.wait_status(chat["id"], "waiting")
    assert system_text(api.llm.requests[-1].body) == "Be brief."  # the prompt cache is warm now

    await alice.http.put(PROMPT, json={"prompt": "Answer in French."})
    body = await next_turn(api, alice, chat["id"], "second")
    assert system_text(body) == "Be brief.\n\nAnswer in French."

    await alice.http.put(PROMPT, json={"prompt": "Answer in German."})
    body = await next_turn(api, alice, chat["id"], "third")
    assert system_text(body) == "Be brief.\n\nAnswer in German."

    await alice.http.delete(PROMPT)
    body = await next_turn(api, alice, chat["id"], "fourth")
    assert system_text(body) == "Be brief."
