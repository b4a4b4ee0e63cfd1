"""The effect journal of built-in tools with side effects (table ``tool_effects``).

Before such a call runs, its intent is committed; after it, its result. Both writes are fenced
by the shard lease, like every write of a chat: a deposed worker cannot record an intent, so
it never starts a call the new owner does not know about. A call is one row for ever: it is
keyed by the assistant message that made it (``message_seq``, never reused in a chat) and its
call id.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from uuid import UUID

from chatd.store.database import Connection, Database
from chatd.store.errors import Fenced
from chatd.store.leases import Fence, fence_args, fence_subquery


@dataclass(frozen=True, slots=True)
class Effect:
    """A journalled call: ``result`` is None while it runs, or for ever if it died running."""

    call_id: str
    tool: str
    result: str | None


async def entries(db: Database, chat_id: UUID, message_seq: int) -> dict[str, Effect]:
    """The journalled calls of one assistant message, by call id."""
    rows = await db.fetch(
        "SELECT call_id, tool, result FROM tool_effects WHERE chat_id = $1 AND message_seq = $2",
        chat_id,
        message_seq,
    )
    return {row["call_id"]: Effect(row["call_id"], row["tool"], row["result"]) for row in rows}


async def record_intent(
    db: Database, fence: Fence, chat_id: UUID, *, message_seq: int, call_id: str, tool: str
) -> Effect | None:
    """Commit the intent to run a call; None when it is new (run it), else the entry found
    (someone started it before: never run it again). Raises ``Fenced`` when the lease moved."""
    return await db.transaction(
        partial(
            _record_intent,
            fence=fence,
            chat_id=chat_id,
            message_seq=message_seq,
            call_id=call_id,
            tool=tool,
        )
    )


async def _record_intent(
    conn: Connection, *, fence: Fence, chat_id: UUID, message_seq: int, call_id: str, tool: str
) -> Effect | None:
    inserted = await conn.fetchval(
        f"""
        INSERT INTO tool_effects (chat_id, message_seq, call_id, tool)
        SELECT $4, $5, $6, $7 WHERE EXISTS ({fence_subquery(1)})
        ON CONFLICT DO NOTHING
        RETURNING true
        """,
        *fence_args(fence),
        chat_id,
        message_seq,
        call_id,
        tool,
    )
    if inserted:
        return None
    row = await conn.fetchrow(
        "SELECT call_id, tool, result FROM tool_effects"
        " WHERE chat_id = $1 AND message_seq = $2 AND call_id = $3",
        chat_id,
        message_seq,
        call_id,
    )
    if row is None:  # nothing inserted and nothing there: the fence refused
        raise Fenced(fence.shard, fence.epoch)
    return Effect(row["call_id"], row["tool"], row["result"])


async def record_result(
    db: Database, fence: Fence, chat_id: UUID, *, message_seq: int, call_id: str, result: str
) -> None:
    """Commit a started call's result (JSON text). Raises ``Fenced`` when the lease moved."""
    done = await db.fetchval(
        f"""
        UPDATE tool_effects SET result = $7, finished_at = now()
        WHERE chat_id = $4 AND message_seq = $5 AND call_id = $6 AND result IS NULL
          AND EXISTS ({fence_subquery(1)})
        RETURNING true
        """,  # noqa: S608 - no user input
        *fence_args(fence),
        chat_id,
        message_seq,
        call_id,
        result,
    )
    if not done:
        raise Fenced(fence.shard, fence.epoch)
