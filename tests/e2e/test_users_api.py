"""``/users`` and ``/users/{id}/tokens`` over a real server: an admin makes a user and its
token, the token works as that user (not the admin) and its owner can revoke it; names are
checked as the database's CHECK would, a taken name is a 409, everything is admin-only, and
nothing is written by a refused request."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx2
import pytest

from chatd.domain.user_name import valid_user_name
from chatd.store import users
from chatd.web.users import USER_NAME_RULE
from tests.e2e.api_world import DEADLINE_S, ApiWorld, Client

USERS = "/api/v1/users"
HEADER = "Idempotency-Key"


@pytest.fixture
async def admin(api: ApiWorld) -> Client:
    return await api.client("root", admin=True)


def error_of(response: httpx2.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def as_bearer(api: ApiWorld, secret: str) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        base_url=api.url, headers={"Authorization": f"Bearer {secret}"}, timeout=DEADLINE_S
    )


async def names(api: ApiWorld) -> list[str]:
    return [u.name for u in await users.list_users(api.db)]


async def test_an_admin_makes_a_user_whose_token_works_as_that_user(
    api: ApiWorld, admin: Client
) -> None:
    created = await admin.http.post(USERS, json={"name": "load-driver@bench.1"})
    assert created.status_code == 201, created.text
    user = created.json()
    assert set(user) == {"id", "name", "is_admin", "created_at"}
    assert (user["name"], user["is_admin"]) == ("load-driver@bench.1", False)

    minted = await admin.http.post(f"{USERS}/{user['id']}/tokens", json={"label": "scaletest"})
    assert minted.status_code == 201, minted.text
    token = minted.json()
    assert set(token) == {"id", "label", "created_at", "token"}
    assert token["label"] == "scaletest"
    assert token["token"].startswith("chatd_")

    async with as_bearer(api, token["token"]) as driver:
        me = (await driver.get("/api/v1/users/me")).json()
        assert me == {"id": user["id"], "name": "load-driver@bench.1", "is_admin": False}
        # Its own tokens: the one just made, never its secret.
        [listed] = (await driver.get("/api/v1/users/me/tokens")).json()["tokens"]
        assert (listed["id"], listed["label"], listed["revoked_at"]) == (
            token["id"],
            "scaletest",
            None,
        )
        assert token["token"] not in str(listed)
        # Not an admin: the admin routes refuse it.
        assert error_of(await driver.get(USERS), 403)["code"] == "forbidden"
        # Its chats are its own, not the admin's.
        chat = await driver.post("/api/v1/chats", json={"text": "hello"})
        assert chat.status_code == 201, chat.text
        theirs = await admin.http.get(f"/api/v1/chats/{chat.json()['id']}")
        assert error_of(theirs, 404)["code"] == "not_found"
        # It revokes itself, and is refused from then on.
        revoked = await driver.delete(f"/api/v1/users/me/tokens/{token['id']}")
        assert revoked.status_code == 204, revoked.text
        assert error_of(await driver.get("/api/v1/users/me"), 401)["code"] == "unauthorized"

    # The admin may make it another one, without a body (the label defaults to empty).
    again = await admin.http.post(f"{USERS}/{user['id']}/tokens")
    assert error_of(again, 400)["field"] == "body"
    again = await admin.http.post(f"{USERS}/{user['id']}/tokens", json={})
    assert again.status_code == 201, again.text
    assert again.json()["label"] == ""
    async with as_bearer(api, again.json()["token"]) as driver:
        assert (await driver.get("/api/v1/users/me")).json()["id"] == user["id"]


async def test_an_admin_user_made_over_the_api_is_an_admin(api: ApiWorld, admin: Client) -> None:
    created = await admin.http.post(USERS, json={"name": "ops", "is_admin": True})
    assert created.status_code == 201, created.text
    assert created.json()["is_admin"] is True
    minted = await admin.http.post(f"{USERS}/{created.json()['id']}/tokens", json={})
    async with as_bearer(api, minted.json()["token"]) as ops:
        assert (await ops.get(USERS)).status_code == 200


async def test_users_are_listed_in_creation_order(api: ApiWorld, admin: Client) -> None:
    made = []
    for name in ("zed", "amy", "Mo"):
        response = await admin.http.post(USERS, json={"name": name})
        assert response.status_code == 201, response.text
        made.append(response.json())
    listed = await admin.http.get(USERS)
    assert listed.status_code == 200, listed.text
    assert listed.json() == {"users": [*listed.json()["users"][:1], *made]}
    assert [u["name"] for u in listed.json()["users"]] == ["root", "zed", "amy", "Mo"]


BAD_NAMES = (
    "",
    "-leading-dash",
    ".dot",
    "has space",
    "a" * 129,
    "émile",
    "semi;colon",
    "trailing-newline\n",
    "slash/y",
)


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_a_bad_name_is_a_400_naming_name_and_the_rule(
    api: ApiWorld, admin: Client, name: str
) -> None:
    before = await names(api)
    error = error_of(await admin.http.post(USERS, json={"name": name}), 400)
    assert (error["code"], error["field"]) == ("invalid_request", "name"), error
    assert error["rule"] == USER_NAME_RULE
    assert "128" in error["rule"]
    assert await names(api) == before


GOOD_NAMES = ("a", "9" + "x" * 127, "A.b_c@d-e")


async def test_names_at_the_limits_are_taken(api: ApiWorld, admin: Client) -> None:
    for name in GOOD_NAMES:
        response = await admin.http.post(USERS, json={"name": name})
        assert response.status_code == 201, (name, response.text)


async def test_the_document_declares_the_name_rule_the_server_checks(api: ApiWorld) -> None:
    async with api.anonymous() as anonymous:
        document = (await anonymous.get("/api/v1/openapi.json")).json()
    schemas = document["components"]["schemas"]
    name = schemas["CreateUser"]["properties"]["name"]
    assert (name["minLength"], name["maxLength"]) == (1, 128)
    # JSON Schema's $ is the end of the text (Python's would let a final newline through).
    assert name["pattern"].startswith("^")
    assert name["pattern"].endswith("$")
    whole = re.compile(name["pattern"][1:-1])
    for sample in (*GOOD_NAMES, *BAD_NAMES):
        assert (whole.fullmatch(sample) is not None) == valid_user_name(sample), sample
    label = schemas["CreateToken"]["properties"]["label"]
    assert label["maxLength"] == 200
    assert schemas["CreateUser"]["additionalProperties"] is False
    assert schemas["CreateToken"]["additionalProperties"] is False
    operations = document["paths"]
    assert set(operations["/api/v1/users"]) == {"get", "post"}
    assert set(operations["/api/v1/users/{user_id}/tokens"]) == {"post"}
    for operation in (
        operations["/api/v1/users"]["get"],
        operations["/api/v1/users"]["post"],
        operations["/api/v1/users/{user_id}/tokens"]["post"],
    ):
        assert "403" in operation["responses"]


async def test_a_taken_name_is_a_409(api: ApiWorld, admin: Client) -> None:
    assert (await admin.http.post(USERS, json={"name": "dup"})).status_code == 201
    error = error_of(await admin.http.post(USERS, json={"name": "dup"}), 409)
    assert error["code"] == "conflict"
    assert "taken" in error["message"]
    assert error["field"] == "name"
    assert (await names(api)).count("dup") == 1
    # The admin's own name too (created by the CLI's store function).
    assert error_of(await admin.http.post(USERS, json={"name": "root"}), 409)["field"] == "name"


async def test_unknown_fields_and_wrong_types_are_400s(api: ApiWorld, admin: Client) -> None:
    before = await names(api)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"name": "ok", "admin": True}, "admin"),
        ({"name": "ok", "is_admin": "yes"}, "is_admin"),
        ({"name": 7}, "name"),
        ({}, "name"),
    ]
    for body, field in cases:
        error = error_of(await admin.http.post(USERS, json=body), 400)
        assert error["field"] == field, (body, error)
    assert await names(api) == before
    user = (await admin.http.post(USERS, json={"name": "labelled"})).json()
    tokens = f"{USERS}/{user['id']}/tokens"
    label_cases: list[tuple[dict[str, Any], str]] = [
        ({"label": "x", "secret": "mine"}, "secret"),
        ({"label": 3}, "label"),
        ({"label": "x" * 201}, "label"),
        ({"label": "nul\x00"}, "label"),
    ]
    for body, field in label_cases:
        error = error_of(await admin.http.post(tokens, json=body), 400)
        assert error["field"] == field, (body, error)
    assert await users.list_api_tokens(api.db, uuid.UUID(user["id"])) == []
    longest = await admin.http.post(tokens, json={"label": "é" * 200})
    assert longest.status_code == 201, longest.text


async def test_a_token_for_an_unknown_user_is_a_404(api: ApiWorld, admin: Client) -> None:
    missing = await admin.http.post(f"{USERS}/{uuid.uuid4()}/tokens", json={})
    assert error_of(missing, 404)["code"] == "not_found"
    malformed = await admin.http.post(f"{USERS}/not-a-uuid/tokens", json={})
    assert error_of(malformed, 400)["field"] == "user_id"


async def test_a_user_who_is_not_an_admin_gets_403_and_changes_nothing(
    api: ApiWorld, admin: Client
) -> None:
    alice = await api.client("alice")
    before = await names(api)
    requests: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", USERS, {"name": "mallory", "is_admin": True}),
        ("GET", USERS, None),
        ("POST", f"{USERS}/{alice.user.id}/tokens", {"label": "stolen"}),
        ("POST", f"{USERS}/{admin.user.id}/tokens", {}),
    ]
    for method, path, body in requests:
        error = error_of(await alice.http.request(method, path, json=body), 403)
        assert error["code"] == "forbidden"
    async with api.anonymous() as anonymous:
        for method, path, body in requests:
            response = await anonymous.request(method, path, json=body)
            assert error_of(response, 401)["code"] == "unauthorized"
    assert await names(api) == before
    assert len(await users.list_api_tokens(api.db, alice.user.id)) == 1
    assert len(await users.list_api_tokens(api.db, admin.user.id)) == 1


async def test_a_retried_create_is_done_once(api: ApiWorld, admin: Client) -> None:
    """With an Idempotency-Key: a retry is answered from the record; after a crash between
    the insert and the record (the key left pending, as a kill -9 leaves it), the retry finds
    the user its first attempt made and answers 201 with it, not a 409 for its own name."""
    body = {"name": "keyed"}
    first = await admin.http.post(USERS, json=body, headers={HEADER: "make-keyed"})
    assert first.status_code == 201, first.text
    replay = await admin.http.post(USERS, json=body, headers={HEADER: "make-keyed"})
    assert replay.content == first.content
    assert replay.headers["Idempotent-Replayed"] == "true"
    await api.db.execute(
        "UPDATE idempotency_keys SET status = NULL, body = NULL, content_type = NULL,"
        " locked_until = now() - interval '1 second', claimed_by = 'dead-worker'"
        " WHERE key = 'make-keyed'"
    )
    retry = await admin.http.post(USERS, json=body, headers={HEADER: "make-keyed"})
    assert retry.status_code == 201, retry.text
    assert retry.json() == first.json()
    # Another key (another request) for the same name is a conflict.
    other = await admin.http.post(USERS, json=body, headers={HEADER: "make-keyed-2"})
    assert error_of(other, 409)["field"] == "name"
    assert (await names(api)).count("keyed") == 1

    path = f"{USERS}/{first.json()['id']}/tokens"
    minted = await admin.http.post(path, json={"label": "k"}, headers={HEADER: "mint"})
    assert minted.status_code == 201, minted.text
    again = await admin.http.post(path, json={"label": "k"}, headers={HEADER: "mint"})
    assert again.content == minted.content  # the same secret, replayed to its admin
    assert len(await users.list_api_tokens(api.db, uuid.UUID(first.json()["id"]))) == 1
