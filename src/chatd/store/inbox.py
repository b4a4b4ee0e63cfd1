"""Inbox notifications: a turn finished, a chat failed, or a chat needs the user's action."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from uuid import UUID, uuid4

import asyncpg

from chatd.store.database import Connection, Database
from chatd.store.errors import NotFound
from chatd.store.records import (
    InboxNotification,
    NotificationKind,
    PageCursor,
    inbox_notification_from_row,
)


@dataclass(frozen=True, slots=True)
class InboxPage:
    notifications: list[InboxNotification]
    next_cursor: PageCursor | None
    unread_count: int
    """All of the user's unread notifications, not only this page's."""


async def create_notification(
    db: Database,
    *,
    user_id: UUID,
    kind: NotificationKind,
    title: str,
    body: str = "",
    chat_id: UUID | None = None,
) -> InboxNotification:
    try:
        return await db.run(
            partial(
                insert_notification,
                notification_id=uuid4(),
                user_id=user_id,
                chat_id=chat_id,
                kind=kind,
                title=title,
                body=body,
            )
        )
    except asyncpg.ForeignKeyViolationError as exc:
        what = "chat" if exc.constraint_name == "inbox_notifications_chat_id_fkey" else "user"
        raise NotFound(what, chat_id if what == "chat" else user_id) from exc


async def insert_notification(
    conn: Connection,
    *,
    notification_id: UUID,
    user_id: UUID,
    chat_id: UUID | None,
    kind: NotificationKind,
    title: str,
    body: str,
) -> InboxNotification:
    """The one INSERT of a notification: on its own, or within a chat's commit (its turn)."""
    row = await conn.fetchrow(
        "INSERT INTO inbox_notifications (id, user_id, chat_id, kind, title, body)"
        " VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
        notification_id,
        user_id,
        chat_id,
        kind,
        title,
        body,
    )
    assert row is not None
    return inbox_notification_from_row(row)


async def list_notifications(
    db: Database,
    user_id: UUID,
    *,
    read: bool | None = None,
    limit: int = 50,
    cursor: PageCursor | None = None,
) -> InboxPage:
    """Newest first (ties by id); ``read`` filters to read or unread ones, ``None`` lists all."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    return await db.transaction(
        partial(_list, user_id=user_id, read=read, limit=limit, cursor=cursor)
    )


async def _list(
    conn: Connection, *, user_id: UUID, read: bool | None, limit: int, cursor: PageCursor | None
) -> InboxPage:
    rows = await conn.fetch(
        """
        SELECT * FROM inbox_notifications
        WHERE user_id = $1
          AND ($2::boolean IS NULL OR (read_at IS NOT NULL) = $2)
          AND ($3::timestamptz IS NULL
               OR created_at < $3 OR (created_at = $3 AND id > $4::uuid))
        ORDER BY created_at DESC, id
        LIMIT $5
        """,
        user_id,
        read,
        None if cursor is None else cursor.at,
        None if cursor is None else cursor.id,
        limit + 1,
    )
    unread = await conn.fetchval(
        "SELECT count(*) FROM inbox_notifications WHERE user_id = $1 AND read_at IS NULL",
        user_id,
    )
    items = [inbox_notification_from_row(row) for row in rows[:limit]]
    more = len(rows) > limit
    next_cursor = PageCursor(items[-1].created_at, items[-1].id) if more else None
    return InboxPage(items, next_cursor, unread)


async def unread_count(db: Database, user_id: UUID) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM inbox_notifications WHERE user_id = $1 AND read_at IS NULL",
        user_id,
    )
    return count


async def mark_read(
    db: Database, user_id: UUID, notification_id: UUID, *, read: bool = True
) -> InboxNotification:
    """Mark one of the user's notifications read (keeping the first read time) or unread."""
    row = await db.fetchrow(
        """
        UPDATE inbox_notifications
        SET read_at = CASE WHEN $3 THEN coalesce(read_at, now()) END
        WHERE id = $1 AND user_id = $2
        RETURNING *
        """,
        notification_id,
        user_id,
        read,
    )
    if row is None:
        raise NotFound("notification", notification_id)
    return inbox_notification_from_row(row)


async def mark_all_read(db: Database, user_id: UUID) -> int:
    """Mark every unread notification of the user read; returns how many changed."""
    rows = await db.fetch(
        "UPDATE inbox_notifications SET read_at = now()"
        " WHERE user_id = $1 AND read_at IS NULL RETURNING id",
        user_id,
    )
    return len(rows)
