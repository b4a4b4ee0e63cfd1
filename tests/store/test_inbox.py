from __future__ import annotations

from uuid import UUID, uuid4

import pytest

from chatd.store.database import Database
from chatd.store.errors import NotFound
from chatd.store.inbox import (
    create_notification,
    list_notifications,
    mark_all_read,
    mark_read,
    unread_count,
)
from chatd.store.records import InboxNotification, PageCursor
from tests.store.helpers import lease, make_chat, make_user


async def test_notification_round_trip(db: Database) -> None:
    user = await make_user(db)
    chat = await make_chat(db, await lease(db), user.id)
    created = await create_notification(
        db,
        user_id=user.id,
        chat_id=chat.id,
        kind="action_required",
        title="Tool results needed",
        body="run_tests is waiting",
    )
    assert (created.user_id, created.chat_id, created.kind) == (user.id, chat.id, "action_required")
    assert (created.title, created.body, created.read_at, created.read) == (
        "Tool results needed",
        "run_tests is waiting",
        None,
        False,
    )
    page = await list_notifications(db, user.id)
    assert page.notifications == [created]
    assert (page.next_cursor, page.unread_count) == (None, 1)

    chatless = await create_notification(db, user_id=user.id, kind="failed", title="t")
    assert (chatless.chat_id, chatless.body) == (None, "")


async def test_notification_for_missing_user_or_chat_is_not_found(db: Database) -> None:
    user = await make_user(db)
    with pytest.raises(NotFound) as no_user:
        await create_notification(db, user_id=uuid4(), kind="failed", title="t")
    assert no_user.value.kind == "user"
    with pytest.raises(NotFound) as no_chat:
        await create_notification(db, user_id=user.id, chat_id=uuid4(), kind="failed", title="t")
    assert no_chat.value.kind == "chat"
    assert await db.fetchval("SELECT count(*) FROM inbox_notifications") == 0


async def test_mark_read_and_unread(db: Database) -> None:
    alice, bob = await make_user(db, "alice"), await make_user(db, "bob")
    note = await create_notification(db, user_id=alice.id, kind="turn_finished", title="done")
    read = await mark_read(db, alice.id, note.id)
    assert read.read
    assert read.read_at is not None
    assert read.read_at >= note.created_at
    assert (await mark_read(db, alice.id, note.id)).read_at == read.read_at  # first time kept
    assert await unread_count(db, alice.id) == 0

    unread = await mark_read(db, alice.id, note.id, read=False)
    assert not unread.read
    assert await unread_count(db, alice.id) == 1

    with pytest.raises(NotFound):
        await mark_read(db, bob.id, note.id)  # not bob's
    with pytest.raises(NotFound):
        await mark_read(db, alice.id, uuid4())
    assert await unread_count(db, alice.id) == 1


async def test_mark_all_read_touches_only_the_users_unread(db: Database) -> None:
    alice, bob = await make_user(db, "alice"), await make_user(db, "bob")
    notes = [
        await create_notification(db, user_id=alice.id, kind="failed", title=f"n{i}")
        for i in range(3)
    ]
    already = await mark_read(db, alice.id, notes[0].id)
    await create_notification(db, user_id=bob.id, kind="failed", title="bob's")
    assert await mark_all_read(db, alice.id) == 2
    assert await unread_count(db, alice.id) == 0
    assert await unread_count(db, bob.id) == 1
    page = await list_notifications(db, alice.id, read=True)
    assert {n.id for n in page.notifications} == {n.id for n in notes}
    assert [n.read_at for n in page.notifications if n.id == already.id] == [already.read_at]
    assert await mark_all_read(db, alice.id) == 0


async def _page_all(
    db: Database, user_id: UUID, *, read: bool | None, limit: int
) -> tuple[list[InboxNotification], list[int]]:
    seen: list[InboxNotification] = []
    sizes: list[int] = []
    cursor: PageCursor | None = None
    while True:
        page = await list_notifications(db, user_id, read=read, limit=limit, cursor=cursor)
        seen.extend(page.notifications)
        sizes.append(len(page.notifications))
        if page.next_cursor is None:
            return seen, sizes
        cursor = PageCursor.decode(page.next_cursor.encode())


@pytest.mark.parametrize("limit", [1, 2, 4, 7, 20])
async def test_list_pages_newest_first_then_id(db: Database, limit: int) -> None:
    user, other = await make_user(db, "alice"), await make_user(db, "bob")
    for i in range(3):
        await create_notification(db, user_id=user.id, kind="failed", title=f"single {i}")
    # Four at the very same created_at (one statement, one now()): ties are ordered by id.
    await db.execute(
        "INSERT INTO inbox_notifications (id, user_id, kind, title)"
        " SELECT gen_random_uuid(), $1, 'turn_finished', 'tie ' || g FROM generate_series(1, 4) g",
        user.id,
    )
    await create_notification(db, user_id=other.id, kind="failed", title="not alice's")
    rows = await db.fetch(
        "SELECT id FROM inbox_notifications WHERE user_id = $1 ORDER BY created_at DESC, id",
        user.id,
    )
    seen, sizes = await _page_all(db, user.id, read=None, limit=limit)
    assert [n.id for n in seen] == [r["id"] for r in rows]
    assert sizes == [min(limit, 7 - i) for i in range(0, 7, limit)]


async def test_list_filters_read_and_counts_all_unread(db: Database) -> None:
    user = await make_user(db)
    notes = [
        await create_notification(db, user_id=user.id, kind="failed", title=f"n{i}")
        for i in range(5)
    ]
    for note in notes[:2]:
        await mark_read(db, user.id, note.id)
    read, _ = await _page_all(db, user.id, read=True, limit=1)
    unread, _ = await _page_all(db, user.id, read=False, limit=2)
    assert {n.id for n in read} == {n.id for n in notes[:2]}
    assert {n.id for n in unread} == {n.id for n in notes[2:]}
    first_page = await list_notifications(db, user.id, read=True, limit=1)
    assert first_page.unread_count == 3  # all unread, whatever the filter and page
    with pytest.raises(ValueError, match="limit"):
        await list_notifications(db, user.id, limit=0)
