"""chatd.client's admin methods for users and tokens over a real server: an admin makes a user
and its token, which works as that user and can revoke itself; the refusals are typed; the same
through the sync client."""

from __future__ import annotations

import uuid

import pytest
import trio

from chatd.client import (
    AsyncClient,
    Client,
    Conflict,
    Forbidden,
    InvalidRequest,
    NewToken,
    NotFound,
    Unauthorized,
    User,
)
from chatd.store.database import Database
from chatd.web.users import USER_NAME_RULE
from tests.e2e.api_world import DEADLINE_S, serve_api


async def test_an_admin_makes_a_user_and_a_token_that_works_as_that_user(db: Database) -> None:
    async with serve_api(db) as world:
        root = await world.client("root", admin=True)
        async with AsyncClient(world.url, root.token) as admin:
            driver = await admin.create_user("scaletest-1")
            assert isinstance(driver, User)
            assert (driver.name, driver.is_admin) == ("scaletest-1", False)
            assert driver.created_at is not None
            assert [u.name for u in await admin.list_users()] == ["root", "scaletest-1"]
            assert (await admin.list_users())[1] == driver

            token = await admin.create_token(driver.id, label="load")
            assert isinstance(token, NewToken)
            assert token.label == "load"
            assert token.token.startswith("chatd_")
            assert token.token not in repr(token)
            assert "token='...'" in repr(token)

            with pytest.raises(InvalidRequest, match="name") as bad:
                await admin.create_user("no spaces allowed")
            assert bad.value.field == "name"
            assert bad.value.rule == USER_NAME_RULE
            with pytest.raises(Conflict, match="taken"):
                await admin.create_user("scaletest-1")
            with pytest.raises(NotFound, match="404"):
                await admin.create_token(str(uuid.uuid4()))
            with pytest.raises(InvalidRequest, match="label") as long_label:
                await admin.create_token(driver.id, label="x" * 201)
            assert long_label.value.field == "label"

        async with AsyncClient(world.url, token.token) as chatd:
            me = await chatd.me()
            assert (me.id, me.name, me.is_admin) == (driver.id, "scaletest-1", False)
            with pytest.raises(Forbidden, match="403"):
                await chatd.create_user("mallory")
            with pytest.raises(Forbidden, match="403"):
                await chatd.list_users()
            with pytest.raises(Forbidden, match="403"):
                await chatd.create_token(driver.id)
            [listed] = await chatd.list_tokens()
            assert (listed.id, listed.label, listed.revoked_at) == (token.id, "load", None)
            await chatd.revoke_token(token.id)
            with pytest.raises(Unauthorized, match="401"):
                await chatd.me()


async def test_the_sync_client_makes_users_and_tokens(db: Database) -> None:
    async with serve_api(db) as world:
        root = await world.client("root", admin=True)

        def session() -> tuple[User, User, list[str]]:
            with Client(world.url, root.token) as admin:
                ops = admin.create_user("ops@example.org", is_admin=True)
                secret = admin.create_token(ops.id, label="sync").token
                with pytest.raises(Conflict, match="taken"):
                    admin.create_user("ops@example.org")
            with Client(world.url, secret) as chatd:
                names = [u.name for u in chatd.list_users()]  # an admin: allowed
                return ops, chatd.me(), names

        with trio.fail_after(DEADLINE_S):
            ops, me, names = await trio.to_thread.run_sync(session)
        assert ops.is_admin
        assert (me.id, me.name, me.is_admin) == (ops.id, "ops@example.org", True)
        assert names == ["root", "ops@example.org"]
