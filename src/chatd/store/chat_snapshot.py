"""A chat as one consistent read sees it, for a new stream subscriber.

Everything a subscriber's snapshot tells (status, queue, pending calls, where the client's
history still holds) comes from one repeatable-read transaction, and the read says which
commits it saw (``ReadSnapshot``): the subscriber delivers the events of those commits from the
snapshot and the events of every later commit live, each once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from uuid import UUID

from chatd.domain.chat_status import ChatStatus
from chatd.store.chats import LAST_STEP_SQL
from chatd.store.database import Connection, Database
from chatd.store.records import (
    Chat,
    ChatMessage,
    QueuedMessage,
    chat_from_row,
    chat_message_from_row,
    queued_message_from_row,
)
from chatd.store.visibility import ReadSnapshot


@dataclass(frozen=True, slots=True)
class ChatSnapshot:
    """``queue``: the queued messages (none read for a waiting chat, which has none).
    ``last_step``: the live messages from the last assistant message on, read only when the
    chat waits on tool calls. ``kept_seq``: the highest live seq at or below the client's
    ``message_seq`` (the client's when it holds nothing). ``seen``: the commits the read saw."""

    chat: Chat
    queue: tuple[QueuedMessage, ...]
    last_step: tuple[ChatMessage, ...]
    kept_seq: int
    seen: ReadSnapshot


async def read_chat_snapshot(
    db: Database, chat_id: UUID, *, message_seq: int = 0
) -> ChatSnapshot | None:
    """The chat's snapshot for a client holding messages up to ``message_seq``; ``None``
    when the chat does not exist."""
    return await db.run(partial(_read, chat_id=chat_id, message_seq=message_seq))


async def _read(conn: Connection, *, chat_id: UUID, message_seq: int) -> ChatSnapshot | None:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(
            """
            SELECT c.*, pg_current_snapshot()::text AS seen,
                   (SELECT coalesce(max(seq), 0) FROM chat_messages
                    WHERE chat_id = $1 AND deleted_at IS NULL AND seq <= $2) AS kept_seq
            FROM chats c WHERE c.id = $1
            """,
            chat_id,
            message_seq,
        )
        if row is None:
            return None
        chat = chat_from_row(row)
        queue: tuple[QueuedMessage, ...] = ()
        if chat.status is not ChatStatus.WAITING:
            rows = await conn.fetch(
                "SELECT * FROM queued_messages WHERE chat_id = $1 ORDER BY position", chat_id
            )
            queue = tuple(queued_message_from_row(r) for r in rows)
        last_step: tuple[ChatMessage, ...] = ()
        if chat.status is ChatStatus.REQUIRES_ACTION:
            rows = await conn.fetch(LAST_STEP_SQL, chat_id)
            last_step = tuple(chat_message_from_row(r) for r in rows)
        kept = message_seq if message_seq == 0 else row["kept_seq"]
        return ChatSnapshot(chat, queue, last_step, kept, ReadSnapshot.parse(row["seen"]))
