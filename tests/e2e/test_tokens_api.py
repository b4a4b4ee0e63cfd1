"""``/users/me/tokens`` over a real server: a token revoked through the API is refused by this
process at once, on HTTP and on the WebSocket handshake, although it was cached."""

from __future__ import annotations

import uuid

import httpx2

from chatd.store import users
from tests.e2e.api_world import DEADLINE_S, ApiWorld, Client

TOKENS = "/api/v1/users/me/tokens"


async def second_token(api: ApiWorld, client: Client, label: str) -> tuple[str, str]:
    """Another token of the client's user: its id and its secret."""
    token, secret = await users.create_api_token(api.db, client.user.id, label=label)
    return str(token.id), secret


def as_bearer(api: ApiWorld, secret: str) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        base_url=api.url, headers={"Authorization": f"Bearer {secret}"}, timeout=DEADLINE_S
    )


async def test_a_revoked_token_is_refused_at_once(api: ApiWorld) -> None:
    alice = await api.client("alice")
    token_id, secret = await second_token(api, alice, "laptop")
    async with as_bearer(api, secret) as laptop:
        assert (await laptop.get("/api/v1/users/me")).status_code == 200  # now cached
        listed = (await alice.http.get(TOKENS)).json()["tokens"]
        assert {t["label"]: t["revoked_at"] for t in listed} == {"": None, "laptop": None}
        assert all("secret" not in t and "token_hash" not in t for t in listed)

        revoked = await alice.http.delete(f"{TOKENS}/{token_id}")
        assert revoked.status_code == 204, revoked.text

        refused = await laptop.get("/api/v1/users/me")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthorized"
    handshake = await api.refused("/api/v1/chats/watch", {"Authorization": f"Bearer {secret}"})
    assert handshake.status_code == 401
    listed = (await alice.http.get(TOKENS)).json()["tokens"]
    assert {t["label"]: t["revoked_at"] is not None for t in listed} == {"": False, "laptop": True}
    again = await alice.http.delete(f"{TOKENS}/{token_id}")
    assert again.status_code == 204  # revoking twice keeps the first time


async def test_the_token_in_use_can_revoke_itself(api: ApiWorld) -> None:
    alice = await api.client("alice")
    [mine] = (await alice.http.get(TOKENS)).json()["tokens"]
    assert (await alice.http.delete(f"{TOKENS}/{mine['id']}")).status_code == 204
    assert (await alice.http.get("/api/v1/users/me")).status_code == 401


async def test_someone_elses_token_is_a_404_like_a_missing_one(api: ApiWorld) -> None:
    alice = await api.client("alice")
    bob = await api.client("bob")
    [alices] = (await alice.http.get(TOKENS)).json()["tokens"]
    theirs = await bob.http.delete(f"{TOKENS}/{alices['id']}")
    missing = await bob.http.delete(f"{TOKENS}/{uuid.uuid4()}")
    assert theirs.status_code == 404, theirs.text
    assert theirs.json() == missing.json()
    assert (await alice.http.get("/api/v1/users/me")).status_code == 200
    assert [t["id"] for t in (await bob.http.get(TOKENS)).json()["tokens"]] != [alices["id"]]
    malformed = await bob.http.delete(f"{TOKENS}/not-a-uuid")
    assert malformed.status_code == 400
    assert malformed.json()["error"]["field"] == "token_id"
