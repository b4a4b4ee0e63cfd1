"""Small builders shared by the store tests."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

from chatd.store.chats import AppendMessage, Committed, CreateChat, commit
from chatd.store.database import Database
from chatd.store.leases import Fence, acquire_shards
from chatd.store.records import Chat, MessageRole, User
from chatd.store.users import create_user

LEASE_TTL_S = 60.0


async def make_user(db: Database, name: str | None = None, *, is_admin: bool = False) -> User:
    return await create_user(db, name or f"user-{uuid4().hex[:8]}", is_admin=is_admin)


async def lease(db: Database, shard: int = 0, worker_id: str = "worker-a") -> Fence:
    [fence] = await acquire_shards(db, worker_id, [shard], LEASE_TTL_S)
    return fence


async def make_chat(db: Database, fence: Fence, owner_id: UUID, **fields: Any) -> Chat:
    create = CreateChat(id=uuid4(), owner_id=owner_id, shard=fence.shard, **fields)
    return (await commit(db, fence, None, [create])).chat


def text(value: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": value}]


async def append(
    db: Database, fence: Fence, chat: Chat, seq: int, body: str, *, role: MessageRole = "user"
) -> Committed:
    message = AppendMessage(
        id=uuid4(),
        seq=seq,
        role=role,
        content=text(body),
        history_version=chat.history_version,
    )
    return await commit(db, fence, chat.id, [message])
