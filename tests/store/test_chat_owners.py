"""The chat owner memory against real PostgreSQL: a seen chat costs no query, a missing one is
never remembered, and the size bound drops the least recently used chat."""

from __future__ import annotations

from uuid import uuid4

from chatd.store.chat_owners import ChatOwners
from chatd.store.database import Database
from tests.store.helpers import lease, make_chat, make_user


async def test_an_owner_is_read_once(db: Database) -> None:
    owner = await make_user(db)
    chat = await make_chat(db, await lease(db), owner.id)
    owners = ChatOwners(db)
    statements = db.stats.statements
    assert await owners.owner(chat.id) == owner.id
    assert await owners.owner(chat.id) == owner.id
    assert db.stats.statements == statements + 1
    assert (owners.stats.loads, owners.stats.hits) == (1, 1)


async def test_a_missing_chat_is_not_remembered(db: Database) -> None:
    owners = ChatOwners(db)
    missing = uuid4()
    assert await owners.owner(missing) is None
    assert await owners.owner(missing) is None
    assert (owners.stats.loads, len(owners)) == (2, 0)


async def test_a_remembered_owner_costs_no_query(db: Database) -> None:
    owners = ChatOwners(db)
    chat_id, owner_id = uuid4(), uuid4()
    owners.remember(chat_id, owner_id)
    statements = db.stats.statements
    assert await owners.owner(chat_id) == owner_id
    assert db.stats.statements == statements


async def test_the_least_recently_used_chat_is_dropped(db: Database) -> None:
    owners = ChatOwners(db, max_size=2)
    first, second, third = uuid4(), uuid4(), uuid4()
    owner_id = uuid4()
    owners.remember(first, owner_id)
    owners.remember(second, owner_id)
    assert await owners.owner(first) == owner_id  # now the most recent
    owners.remember(third, owner_id)
    assert len(owners) == 2
    assert owners.stats.evictions == 1
    assert await owners.owner(second) is None  # dropped, and no such chat in the database
    assert await owners.owner(first) == owner_id


async def test_a_forgotten_chat_is_read_again(db: Database) -> None:
    owner = await make_user(db)
    chat = await make_chat(db, await lease(db), owner.id)
    owners = ChatOwners(db)
    assert await owners.owner(chat.id) == owner.id
    await db.execute("DELETE FROM chats WHERE id = $1", chat.id)
    assert await owners.owner(chat.id) == owner.id  # remembered: no query
    owners.forget(chat.id)
    owners.forget(uuid4())  # an unknown chat: nothing to do
    assert await owners.owner(chat.id) is None
    assert len(owners) == 0
