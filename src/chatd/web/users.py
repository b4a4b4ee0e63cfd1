"""Users and their API tokens, made by an admin over the API (what ``chatd token create`` does
from the command line), so that a program such as a load driver runs as a user of its own.

Every route here is admin-only. A token's secret is in the answer that makes it and nowhere
else: the store keeps only its SHA-256. Its owner lists and revokes it through ``/users/me/tokens``.

Each write is one INSERT, checked here first (the name against the CHECK of ``users.name``,
the label against that of ``api_tokens.label``), so a database CHECK never answers a request
and nothing is half-written.

With an ``Idempotency-Key``, a retry is answered from the key's record. After a crash between
the write and that record, the retry runs again: a user's id is derived from the key, so the
retry finds the user its first attempt made and answers 201 with it (not a 409 for its own
name); a token is made again (the first one's secret was never shown; it stays listed to its
owner, who may revoke it).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final
from uuid import UUID

import msgspec

from chatd.domain.user_name import MAX_TOKEN_LABEL_CHARS, valid_user_name
from chatd.domain.user_name import USER_NAME_RULE as _CLI_RULE
from chatd.store import users
from chatd.store.errors import Conflict
from chatd.store.records import User
from chatd.web.decode import check_length, parse_uuid
from chatd.web.errors import ApiError
from chatd.web.routing import ApiRoutes, Call

routes = ApiRoutes("users", tag="users")

# The CHECK on users.name (0001_initial.sql), which ``valid_user_name`` checks (as ``chatd
# token create`` does), declared in the document as JSON Schema says it.
USER_NAME_PATTERN: Final = "^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"
MAX_USER_NAME_CHARS: Final = 128
USER_NAME_RULE: Final = f"{_CLI_RULE} (ASCII)"

# Documented here; checked by the views with their own rules.
UserName = Annotated[
    str,
    msgspec.Meta(
        description=f"Unique; {USER_NAME_RULE}.",
        extra_json_schema={
            "minLength": 1,
            "maxLength": MAX_USER_NAME_CHARS,
            "pattern": USER_NAME_PATTERN,
        },
    ),
]
TokenLabel = Annotated[
    str,
    msgspec.Meta(
        description="A note to recognise the token by (shown in GET /users/me/tokens).",
        extra_json_schema={"maxLength": MAX_TOKEN_LABEL_CHARS, "pattern": "^[^\\x00]*$"},
    ),
]


class CreateUser(msgspec.Struct, forbid_unknown_fields=True):
    name: UserName
    is_admin: bool = False


class CreateToken(msgspec.Struct, forbid_unknown_fields=True):
    label: TokenLabel = ""


class UserView(msgspec.Struct):
    id: UUID
    name: str
    is_admin: bool
    created_at: datetime


class UserList(msgspec.Struct):
    users: list[UserView]


class CreatedToken(msgspec.Struct):
    """A new token: ``token`` is its secret, shown in this answer only."""

    id: UUID
    label: str
    created_at: datetime
    token: str


def user_view(user: User) -> UserView:
    return UserView(user.id, user.name, user.is_admin, user.created_at)


def check_user_name(name: str) -> None:
    if not valid_user_name(name):
        raise ApiError.invalid("name", USER_NAME_RULE)


@routes.http(
    "POST",
    "/users",
    summary="Add a user (then make it a token: POST /users/{user_id}/tokens)",
    body=CreateUser,
    response=UserView,
    status=201,
    admin=True,
    errors=(409,),
)
async def create_user(call: Call[CreateUser]) -> UserView:
    body, db = call.body, call.services.db
    check_user_name(body.name)
    user_id = call.new_id("user")
    try:
        user = await users.create_user(db, body.name, is_admin=body.is_admin, user_id=user_id)
    except Conflict:
        # The retry of a request whose first attempt made the user: the same answer.
        found = await users.get_user_by_name(db, body.name)
        if found is not None and found.id == user_id:
            return user_view(found)
        raise ApiError(
            409,
            "conflict",
            f"the user name {body.name!r} is taken",
            field="name",
            rule="not the name of another user",
        ) from None
    return user_view(user)


@routes.http(
    "GET",
    "/users",
    summary="Every user, in the order they were created",
    response=UserList,
    admin=True,
)
async def list_users(call: Call[None]) -> UserList:
    found = await users.list_users(call.services.db)
    return UserList([user_view(user) for user in found])


@routes.http(
    "POST",
    "/users/<user_id>/tokens",
    summary="Make an API token for a user; its secret (token) is shown in this answer only",
    body=CreateToken,
    response=CreatedToken,
    status=201,
    admin=True,
    errors=(404,),
)
async def create_token(call: Call[CreateToken], user_id: str) -> CreatedToken:
    owner = parse_uuid("user_id", user_id)
    label = call.body.label
    check_length("label", label, MAX_TOKEN_LABEL_CHARS)
    # An unknown user is the store's NotFound("user"): a 404.
    token, secret = await users.create_api_token(call.services.db, owner, label)
    return CreatedToken(token.id, token.label, token.created_at, secret)
