"""A stream subscriber's read of a chat against real PostgreSQL: one consistent read that says
which commits it saw, by the transaction ids the commits report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

from chatd.domain.chat_status import ChatStatus
from chatd.store.chat_snapshot import read_chat_snapshot
from chatd.store.chats import CreateChat, Enqueue, UpdateChat, commit
from chatd.store.database import Database
from tests.store.helpers import append, lease, make_user, text


async def test_a_read_sees_the_commits_before_it_and_none_after(db: Database) -> None:
    user = await make_user(db)
    fence = await lease(db)
    created = await commit(
        db, fence, None, [CreateChat(id=uuid4(), owner_id=user.id, shard=fence.shard)]
    )
    chat = created.chat
    first = await append(db, fence, chat, 1, "q1")
    running = await commit(db, fence, chat.id, [UpdateChat(status=ChatStatus.RUNNING)])
    assert 0 < created.xid < first.xid < running.xid

    before = await read_chat_snapshot(db, chat.id, message_seq=1)
    assert before is not None
    queued = await commit(
        db, fence, chat.id, [Enqueue(id=uuid4(), position=1, content=text("later"))]
    )
    retry_at = datetime.now(UTC) + timedelta(seconds=30)
    retrying = await commit(db, fence, chat.id, [UpdateChat(retry_count=1, retry_at=retry_at)])
    after = await read_chat_snapshot(db, chat.id, message_seq=1)
    assert after is not None

    assert [before.seen.sees(c.xid) for c in (created, first, running, queued, retrying)] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert all(after.seen.sees(c.xid) for c in (created, first, running, queued, retrying))
    # What each read says agrees with what it saw.
    assert (before.chat.retry_at, before.queue) == (None, ())
    assert after.chat.retry_at == retry_at
    assert [q.content for q in after.queue] == [text("later")]
    assert (before.kept_seq, after.kept_seq) == (1, 1)


async def test_a_missing_chat_has_no_snapshot(db: Database) -> None:
    assert await read_chat_snapshot(db, uuid4()) is None
