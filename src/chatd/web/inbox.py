"""The caller's inbox: notifications written when a chat's turn finishes, fails or needs tool
results, read over HTTP and watched live over a WebSocket.

Another user's notification answers like a missing one (404). The watch socket carries only
notifications created while it is open: a client (re)connecting lists the inbox first.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from chatd.store import inbox
from chatd.store.records import InboxNotification, NotificationKind
from chatd.web.decode import parse_uuid
from chatd.web.routing import ApiRoutes, Call, QueryParam
from chatd.web.streams import send_batches

routes = ApiRoutes("inbox", tag="inbox")


class ReadStatusBody(msgspec.Struct, forbid_unknown_fields=True):
    read: bool


class NotificationView(msgspec.Struct):
    id: UUID
    chat_id: UUID | None
    kind: NotificationKind
    title: str
    body: str
    read: bool
    read_at: datetime | None
    created_at: datetime


class NotificationEvent(NotificationView, tag_field="type", tag="notification"):
    """A watch socket frame: the notification with ``"type": "notification"``."""


class InboxPage(msgspec.Struct):
    notifications: list[NotificationView]
    next_cursor: str | None
    unread_count: int
    """All the caller's unread notifications, whatever the filter and page."""


class MarkedRead(msgspec.Struct):
    changed: int
    """How many notifications were unread and are now read."""


def _fields(n: InboxNotification) -> dict[str, Any]:
    return {
        "id": n.id,
        "chat_id": n.chat_id,
        "kind": n.kind,
        "title": n.title,
        "body": n.body,
        "read": n.read,
        "read_at": n.read_at,
        "created_at": n.created_at,
    }


def notification_view(n: InboxNotification) -> NotificationView:
    return NotificationView(**_fields(n))


def notification_event(n: InboxNotification) -> NotificationEvent:
    return NotificationEvent(**_fields(n))


@routes.http(
    "GET",
    "/notifications/inbox",
    summary="The caller's notifications, newest first, with the count of unread ones",
    response=InboxPage,
    query=(
        QueryParam("read", "boolean", "only read (true) or unread (false) notifications"),
        QueryParam("limit", "integer", "page size (default_page_size, at most max_page_size)"),
        QueryParam("cursor", "string", "next_cursor of the previous page"),
    ),
)
async def list_inbox(call: Call[None]) -> InboxPage:
    settings = call.services.settings
    limit = call.query.integer(
        "limit", settings.default_page_size, minimum=1, maximum=settings.max_page_size
    )
    page = await inbox.list_notifications(
        call.services.db,
        call.user.id,
        read=call.query.boolean("read"),
        limit=limit,
        cursor=call.query.cursor(),
    )
    cursor = None if page.next_cursor is None else page.next_cursor.encode()
    return InboxPage([notification_view(n) for n in page.notifications], cursor, page.unread_count)


@routes.http(
    "PUT",
    "/notifications/inbox/<notification_id>/read-status",
    summary="Mark one notification read or unread",
    body=ReadStatusBody,
    response=NotificationView,
    errors=(404,),
)
async def put_read_status(call: Call[ReadStatusBody], notification_id: str) -> NotificationView:
    target = parse_uuid("notification_id", notification_id)
    found = await inbox.mark_read(call.services.db, call.user.id, target, read=call.body.read)
    return notification_view(found)


@routes.http(
    "PUT",
    "/notifications/inbox/mark-all-as-read",
    summary="Mark every unread notification of the caller read",
    response=MarkedRead,
)
async def mark_all_read(call: Call[None]) -> MarkedRead:
    return MarkedRead(await inbox.mark_all_read(call.services.db, call.user.id))


@routes.websocket(
    "/notifications/inbox/watch",
    summary="New notifications of the caller, live: one object per frame, or a batch array",
)
async def watch_inbox(call: Call[None]) -> None:
    # Subscribed before the accept: nothing created after the client is connected is lost.
    await send_batches(call.services.engine.inbox.subscribe(call.user.id), _encode)


def _encode(batch: Sequence[InboxNotification]) -> str:
    events = [notification_event(n) for n in batch]
    return msgspec.json.encode(events[0] if len(events) == 1 else events).decode()
