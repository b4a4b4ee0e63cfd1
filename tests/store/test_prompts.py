from __future__ import annotations

from uuid import uuid4

import pytest

from chatd.store.database import Database
from chatd.store.errors import NotFound
from chatd.store.prompts import delete_user_prompt, get_user_prompt, put_user_prompt
from tests.store.helpers import make_user


async def test_prompt_round_trip(db: Database) -> None:
    user = await make_user(db)
    assert await get_user_prompt(db, user.id) is None
    created = await put_user_prompt(db, user.id, "Answer in French.\nBe brief ✓")
    assert (created.user_id, created.prompt) == (user.id, "Answer in French.\nBe brief ✓")
    assert await get_user_prompt(db, user.id) == created

    replaced = await put_user_prompt(db, user.id, "")
    assert replaced.prompt == ""
    assert replaced.updated_at >= created.updated_at
    assert await get_user_prompt(db, user.id) == replaced
    assert await db.fetchval("SELECT count(*) FROM user_prompts") == 1


async def test_prompts_are_per_user(db: Database) -> None:
    alice, bob = await make_user(db, "alice"), await make_user(db, "bob")
    await put_user_prompt(db, alice.id, "a")
    await put_user_prompt(db, bob.id, "b")
    assert [p.prompt for p in [await get_user_prompt(db, alice.id)] if p] == ["a"]
    assert await delete_user_prompt(db, alice.id)
    assert not await delete_user_prompt(db, alice.id)
    assert await get_user_prompt(db, alice.id) is None
    assert [p.prompt for p in [await get_user_prompt(db, bob.id)] if p] == ["b"]


async def test_prompt_for_missing_user_is_not_found(db: Database) -> None:
    with pytest.raises(NotFound):
        await put_user_prompt(db, uuid4(), "x")
    assert await db.fetchval("SELECT count(*) FROM user_prompts") == 0
