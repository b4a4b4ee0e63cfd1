"""The SQL of the cross-worker feeds (``chatd.actors.feed_bridge``): NOTIFY in bulk, and the
reads of a receiver (inbox rows named by id) and of its backstop after lost notifications
(what changed for some users since a time)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final
from uuid import UUID

from chatd.domain.chat_status import ChatStatus
from chatd.store.database import Database, Record
from chatd.store.records import InboxNotification, inbox_notification_from_row

FEEDS_CHANNEL: Final = "chatd_feeds"
"""Watch events and inbox notifications published on one worker, for the others' subscribers."""

# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more (the default build's limit).
NOTIFY_PAYLOAD_MAX_BYTES: Final = 7999


@dataclass(frozen=True, slots=True)
class ChangedChat:
    id: UUID
    owner_id: UUID
    title: str
    status: ChatStatus
    archived: bool
    created_at: datetime


async def notify_many(db: Database, channel: str, payloads: Sequence[str]) -> None:
    """NOTIFY every payload on ``channel`` in one statement (one round trip), in order."""
    if payloads:
        await db.execute(
            "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, n) ORDER BY n",
            channel,
            list(payloads),
        )


async def chats_changed_since(
    db: Database, owners: Sequence[UUID], since: datetime
) -> list[ChangedChat]:
    """The chats of ``owners`` created or changed at ``since`` or later (oldest change first)."""
    if not owners:
        return []
    rows = await db.fetch(
        "SELECT id, owner_id, title, status, archived, created_at FROM chats"
        " WHERE owner_id = ANY($1::uuid[]) AND updated_at >= $2 ORDER BY updated_at, id",
        list(owners),
        since,
    )
    return [_changed_chat(row) for row in rows]


def _changed_chat(row: Record) -> ChangedChat:
    return ChangedChat(
        row["id"],
        row["owner_id"],
        row["title"],
        ChatStatus(row["status"]),
        row["archived"],
        row["created_at"],
    )


async def chats_by_id(db: Database, chat_ids: Sequence[UUID]) -> list[ChangedChat]:
    rows = await db.fetch(
        "SELECT id, owner_id, title, status, archived, created_at FROM chats"
        " WHERE id = ANY($1::uuid[])",
        list(chat_ids),
    )
    return [_changed_chat(row) for row in rows]


async def notifications_by_id(db: Database, ids: Sequence[UUID]) -> list[InboxNotification]:
    """The notifications named, oldest first (missing ones: absent)."""
    if not ids:
        return []
    rows = await db.fetch(
        "SELECT * FROM inbox_notifications WHERE id = ANY($1::uuid[]) ORDER BY created_at, id",
        list(ids),
    )
    return [inbox_notification_from_row(row) for row in rows]


async def notifications_since(
    db: Database, users: Sequence[UUID], since: datetime
) -> list[InboxNotification]:
    """The notifications of ``users`` created at ``since`` or later, oldest first."""
    if not users:
        return []
    rows = await db.fetch(
        "SELECT * FROM inbox_notifications WHERE user_id = ANY($1::uuid[]) AND created_at >= $2"
        " ORDER BY created_at, id",
        list(users),
        since,
    )
    return [inbox_notification_from_row(row) for row in rows]
