"""Chats, their messages and their queue of pending user messages.

Reads are open to any caller. Writes have one entry point, ``commit``: the chat's actor turns a
state transition into a list of ``ChatWrite`` descriptions and commits them in one transaction,
fenced by its shard lease, so a transition is all-or-nothing and a deposed worker writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, assert_never
from uuid import UUID

import asyncpg

from chatd.domain.chat_status import ChatStatus
from chatd.domain.effects import RunningChatsLimit
from chatd.domain.mailbox import IdempotencyMark
from chatd.store.database import Connection, Database, Record
from chatd.store.errors import Conflict, Fenced, NotFound
from chatd.store.idempotency import mark_committed
from chatd.store.inbox import insert_notification
from chatd.store.leases import Fence, check_fence, fence_args, fence_subquery
from chatd.store.records import (
    UNSET,
    Chat,
    ChatMessage,
    InboxNotification,
    MessageRole,
    NotificationKind,
    PageCursor,
    QueuedMessage,
    Unset,
    change,
    chat_from_row,
    chat_message_from_row,
    encode_json,
    queued_message_from_row,
)

# -- write descriptions --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateChat:
    """A new chat in ``waiting``; it must be the first write of its commit."""

    id: UUID
    owner_id: UUID
    shard: int
    title: str = ""
    system_prompt: str = ""
    model_config_id: UUID | None = None
    dynamic_tools: Sequence[Mapping[str, Any]] = ()
    tools: Sequence[str] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateChat:
    """Change the execution-state fields that are given; ``UNSET`` ones keep their value."""

    status: ChatStatus | Unset = UNSET
    history_version: int | Unset = UNSET
    generation_attempt: int | Unset = UNSET
    retry_count: int | Unset = UNSET
    retry_at: datetime | Unset | None = UNSET
    last_error: Mapping[str, Any] | Unset | None = UNSET
    action_deadline: datetime | Unset | None = UNSET
    title: str | Unset = UNSET
    archived: bool | Unset = UNSET
    compacting: bool | Unset = UNSET
    # Tokens to add to the chat's totals (the usage of the messages the commit appends).
    add_input_tokens: int = 0
    add_output_tokens: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendMessage:
    """Add a message at ``seq``, which must be above every seq the chat ever used."""

    id: UUID
    seq: int
    role: MessageRole
    content: Sequence[Mapping[str, Any]]
    usage: Mapping[str, Any] | None = None
    history_version: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SoftDeleteMessagesAfter:
    """Hide every live message with a seq above ``seq`` (history truncation on edit)."""

    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Enqueue:
    id: UUID
    position: int
    content: Sequence[Mapping[str, Any]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Dequeue:
    id: UUID


@dataclass(frozen=True, slots=True, kw_only=True)
class MoveQueued:
    id: UUID
    position: int


@dataclass(frozen=True, slots=True)
class ClearQueue:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class AddNotification:
    """An inbox notification about the chat for ``user_id``, written with the turn it reports
    (so a reported turn is never lost, and nothing is reported that did not happen)."""

    id: UUID
    user_id: UUID
    kind: NotificationKind
    title: str
    body: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimRun:
    """The commit starts a new run of the chat: refuse it (``RunningChatsLimit``, nothing
    written) when ``owner_id`` already has ``limit`` other chats running or interrupting; exact
    across workers (see migration 0003). Put it before the ``UpdateChat`` that starts the run.
    ``limit`` is at least 1: with the limit off, the commit has no ``ClaimRun`` at all."""

    owner_id: UUID
    limit: int


@dataclass(frozen=True, slots=True)
class MarkIdempotencyKey:
    """The commit handles a command sent under an ``Idempotency-Key``: mark the key committed
    in this transaction (``chatd.store.idempotency.mark_committed``), or refuse the whole
    commit (``AttemptSuperseded``) when the mark's attempt no longer holds the key. Put it
    first (after a ``CreateChat``), so that a superseded attempt writes nothing else."""

    mark: IdempotencyMark


ChatWrite = (
    CreateChat
    | MarkIdempotencyKey
    | ClaimRun
    | UpdateChat
    | AppendMessage
    | SoftDeleteMessagesAfter
    | Enqueue
    | Dequeue
    | MoveQueued
    | ClearQueue
    | AddNotification
)


@dataclass(frozen=True, slots=True)
class Committed:
    """What a commit left behind: the chat as stored, the messages it appended (in order),
    the whole queue when the commit touched it (``None`` when it did not), and the
    notifications it added (in order).

    ``xid`` is the commit's transaction id: a stream subscriber's read tells by it whether it
    saw this commit (``chatd.store.visibility``), so the events published for it reach the
    subscriber once."""

    chat: Chat
    appended: tuple[ChatMessage, ...]
    queue: tuple[QueuedMessage, ...] | None
    notifications: tuple[InboxNotification, ...] = ()
    xid: int = 0


@dataclass(frozen=True, slots=True)
class ChatPage:
    chats: list[Chat]
    next_cursor: PageCursor | None


# -- writes --------------------------------------------------------------------------------


async def commit(
    db: Database, fence: Fence, chat_id: UUID | None, writes: Sequence[ChatWrite]
) -> Committed:
    """Apply ``writes`` to one chat in one transaction, after checking the fence.

    ``chat_id`` is ``None`` only when the first write is the ``CreateChat``. Raises ``Fenced``
    when the lease moved on, ``NotFound`` for a missing chat, queued message, owner or model
    config, ``Conflict`` when an id, seq or queue position is taken, and ``ValueError`` for a
    malformed commit (the chat is on another shard, ``CreateChat`` out of place).
    """
    try:
        return await db.transaction(
            partial(apply_writes, fence=fence, chat_id=chat_id, writes=writes)
        )
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(f"chat write collides: {exc}", constraint=exc.constraint_name) from exc
    except asyncpg.ForeignKeyViolationError as exc:
        raise _missing_reference(exc, writes) from exc


def _missing_reference(
    exc: asyncpg.ForeignKeyViolationError, writes: Sequence[ChatWrite]
) -> NotFound:
    # Only a new chat and a notification refer to rows the commit does not hold: the chat's
    # owner and model config, the notification's user.
    create = next((w for w in writes if isinstance(w, CreateChat)), None)
    if create is not None and exc.constraint_name == "chats_owner_id_fkey":
        return NotFound("user", create.owner_id)
    if create is not None and exc.constraint_name == "chats_model_config_id_fkey":
        return NotFound("model config", create.model_config_id)
    notify = next((w for w in writes if isinstance(w, AddNotification)), None)
    if notify is not None and exc.constraint_name == "inbox_notifications_user_id_fkey":
        return NotFound("user", notify.user_id)
    return NotFound("row", exc.detail)


async def apply_writes(
    conn: Connection, *, fence: Fence, chat_id: UUID | None, writes: Sequence[ChatWrite]
) -> Committed:
    """The asyncio side of ``commit``: run it inside a transaction.

    Round trips are the cost of a commit (each one a wait on the database), so the fence check
    rides on the chat's lock, an appended message bumps the chat's seq in the same statement,
    and the chat row comes back from its update when there is one.
    """
    chat_id, xid, rest = await _open_chat(conn, fence, chat_id, writes)
    appended: list[ChatMessage] = []
    notifications: list[InboxNotification] = []
    row: Record | None = None
    for write in rest:
        added = await _apply(conn, chat_id, write)
        if isinstance(added, ChatMessage):
            appended.append(added)
            row = None
        elif isinstance(added, InboxNotification):
            notifications.append(added)
        elif added is not None:
            row = added
    if row is None:
        row = await conn.fetchrow("SELECT * FROM chats WHERE id = $1", chat_id)
        assert row is not None
    queue_changed = any(isinstance(w, Enqueue | Dequeue | MoveQueued | ClearQueue) for w in rest)
    queue = tuple(await _list_queue(conn, chat_id)) if queue_changed else None
    return Committed(chat_from_row(row), tuple(appended), queue, tuple(notifications), xid)


async def _open_chat(
    conn: Connection, fence: Fence, chat_id: UUID | None, writes: Sequence[ChatWrite]
) -> tuple[UUID, int, Sequence[ChatWrite]]:
    """Check the fence, then create or lock the commit's chat, on the fence's shard; returns
    it, the transaction's id and the other writes."""
    match writes:
        case [CreateChat() as create, *rest]:
            if chat_id is not None and chat_id != create.id:
                raise ValueError(f"CreateChat is for chat {create.id}, the commit for {chat_id}")
            if create.shard != fence.shard:
                raise ValueError(f"chat {create.id} is on shard {create.shard}, not {fence.shard}")
            await check_fence(conn, fence)
            return create.id, await _create_chat(conn, create), rest
        case _:
            if chat_id is None:
                raise ValueError("a commit without a chat id must start with CreateChat")
            # Locked so that the chat cannot be deleted under the commit; the lease row is
            # locked as check_fence does it.
            found = await conn.fetchrow(_LOCK_CHAT, chat_id, *fence_args(fence))
            if found is None:
                await check_fence(conn, fence)  # a lost lease says so before a missing chat
                raise NotFound("chat", chat_id)
            if not found["held"]:
                raise Fenced(fence.shard, fence.epoch)
            if found["shard"] != fence.shard:
                raise ValueError(f"chat {chat_id} is on shard {found['shard']}, not {fence.shard}")
            return chat_id, found["xid"], writes


# The transaction's id (xid8, as a bigint): free in a transaction that locks or writes a row,
# which has one already.
_XID = "pg_current_xact_id()::text::bigint"

_LOCK_CHAT = (
    f"SELECT c.shard, EXISTS ({fence_subquery(2)}) AS held,"  # noqa: S608 - no user input
    f" {_XID} AS xid FROM chats c WHERE c.id = $1 FOR NO KEY UPDATE OF c"
)


async def _apply(  # noqa: PLR0912 - one case per kind of write
    conn: Connection, chat_id: UUID, write: ChatWrite
) -> ChatMessage | InboxNotification | Record | None:
    """Apply one write; returns what an ``AppendMessage`` or ``AddNotification`` stored, or
    the chat's row an ``UpdateChat`` left."""
    match write:
        case CreateChat():
            raise ValueError("CreateChat must be the first write of its commit")
        case MarkIdempotencyKey(mark=mark):
            await mark_committed(conn, mark)
        case ClaimRun():
            await _claim_run(conn, chat_id, write)
        case UpdateChat():
            return await _update_chat(conn, chat_id, write)
        case AppendMessage():
            return await _append_message(conn, chat_id, write)
        case SoftDeleteMessagesAfter(seq=seq):
            await conn.execute(
                "UPDATE chat_messages SET deleted_at = now()"
                " WHERE chat_id = $1 AND seq > $2 AND deleted_at IS NULL",
                chat_id,
                seq,
            )
        case Enqueue(id=queued_id, position=position, content=content):
            await conn.execute(
                "INSERT INTO queued_messages (id, chat_id, position, content)"
                " VALUES ($1, $2, $3, $4::jsonb)",
                queued_id,
                chat_id,
                position,
                encode_json(content),
            )
        case Dequeue(id=queued_id):
            found = await conn.fetchval(
                "DELETE FROM queued_messages WHERE id = $1 AND chat_id = $2 RETURNING true",
                queued_id,
                chat_id,
            )
            if found is None:
                raise NotFound("queued message", queued_id)
        case MoveQueued(id=queued_id, position=position):
            found = await conn.fetchval(
                "UPDATE queued_messages SET position = $3"
                " WHERE id = $1 AND chat_id = $2 RETURNING true",
                queued_id,
                chat_id,
                position,
            )
            if found is None:
                raise NotFound("queued message", queued_id)
        case ClearQueue():
            await conn.execute("DELETE FROM queued_messages WHERE chat_id = $1", chat_id)
        case AddNotification():
            return await insert_notification(
                conn,
                notification_id=write.id,
                user_id=write.user_id,
                chat_id=chat_id,
                kind=write.kind,
                title=write.title,
                body=write.body,
            )
        case _:
            assert_never(write)
    return None


async def _claim_run(conn: Connection, chat_id: UUID, claim: ClaimRun) -> None:
    """One round trip: the owner's lock, then the count of its other running chats."""
    running: int = await conn.fetchval(
        "SELECT chatd_running_chats_of($1, $2)", claim.owner_id, chat_id
    )
    if running >= claim.limit:
        raise RunningChatsLimit(claim.limit)


async def _create_chat(conn: Connection, create: CreateChat) -> int:
    """Insert the chat; returns the transaction's id."""
    xid: int = await conn.fetchval(
        f"""
        INSERT INTO chats (id, owner_id, shard, title, system_prompt, model_config_id,
                           dynamic_tools, tools)
        VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::text[])
        RETURNING {_XID}
        """,  # noqa: S608 - no user input
        create.id,
        create.owner_id,
        create.shard,
        create.title,
        create.system_prompt,
        create.model_config_id,
        encode_json(create.dynamic_tools),
        None if create.tools is None else list(create.tools),
    )
    return xid


# One static statement for every combination of changed fields: each column is a
# (changed, value) parameter pair.
_UPDATE_CHAT = """
UPDATE chats SET
    status = CASE WHEN $2 THEN $3::text ELSE status END,
    history_version = CASE WHEN $4 THEN $5::bigint ELSE history_version END,
    generation_attempt = CASE WHEN $6 THEN $7::bigint ELSE generation_attempt END,
    retry_count = CASE WHEN $8 THEN $9::integer ELSE retry_count END,
    retry_at = CASE WHEN $10 THEN $11::timestamptz ELSE retry_at END,
    last_error = CASE WHEN $12 THEN $13::jsonb ELSE last_error END,
    action_deadline = CASE WHEN $14 THEN $15::timestamptz ELSE action_deadline END,
    title = CASE WHEN $16 THEN $17::text ELSE title END,
    archived = CASE WHEN $18 THEN $19::boolean ELSE archived END,
    compacting = CASE WHEN $20 THEN $21::boolean ELSE compacting END,
    input_tokens = input_tokens + $22::bigint,
    output_tokens = output_tokens + $23::bigint
WHERE id = $1
RETURNING *
"""


async def _update_chat(conn: Connection, chat_id: UUID, update: UpdateChat) -> Record:
    """The chat's row as updated: the commit's answer without another read."""
    status_changed, status = change(update.status)
    error_changed, error = change(update.last_error)
    row = await conn.fetchrow(
        _UPDATE_CHAT,
        chat_id,
        status_changed,
        None if status is None else str(status),
        *change(update.history_version),
        *change(update.generation_attempt),
        *change(update.retry_count),
        *change(update.retry_at),
        error_changed,
        encode_json(error),
        *change(update.action_deadline),
        *change(update.title),
        *change(update.archived),
        *change(update.compacting),
        update.add_input_tokens,
        update.add_output_tokens,
    )
    assert row is not None  # the chat is locked by the commit
    return row


async def _append_message(conn: Connection, chat_id: UUID, append: AppendMessage) -> ChatMessage:
    # Seqs only grow: the stream resume cursor relies on it, and soft-deleted ones stay taken.
    row = await conn.fetchrow(
        """
        WITH bumped AS (
            UPDATE chats SET last_message_seq = $3
            WHERE id = $2 AND last_message_seq < $3
            RETURNING id
        )
        INSERT INTO chat_messages (id, chat_id, seq, role, content, usage, history_version)
        SELECT $1, bumped.id, $3, $4, $5::jsonb, $6::jsonb, $7 FROM bumped
        RETURNING *
        """,
        append.id,
        chat_id,
        append.seq,
        append.role,
        encode_json(append.content),
        encode_json(append.usage),
        append.history_version,
    )
    if row is None:
        raise ValueError(f"message seq {append.seq} of chat {chat_id} is not above the last one")
    return chat_message_from_row(row)


async def rename_chat(db: Database, chat_id: UUID, owner_id: UUID, title: str) -> Chat | None:
    """Set the chat's title; ``None`` when the chat is missing or someone else's.

    The title is not execution state, so this is neither fenced nor the actor's: its commits
    leave the title alone unless they set it. ``updated_at`` moves (the table's trigger).
    """
    row = await db.fetchrow(
        "UPDATE chats SET title = $3 WHERE id = $1 AND owner_id = $2 RETURNING *",
        chat_id,
        owner_id,
        title,
    )
    return None if row is None else chat_from_row(row)


async def set_generated_title(db: Database, chat_id: UUID, title: str) -> bool:
    """Give the chat a generated title unless it has one (the user's, or a rename that came
    first); whether it took. Like ``rename_chat``, not execution state: not fenced."""
    found = await db.fetchval(
        "UPDATE chats SET title = $2 WHERE id = $1 AND title = '' RETURNING true", chat_id, title
    )
    return found is not None


async def add_usage(db: Database, chat_id: UUID, input_tokens: int, output_tokens: int) -> None:
    """Add a model call's tokens that no commit of the chat carries (a title's) to its totals."""
    await db.execute(
        "UPDATE chats SET input_tokens = input_tokens + $2, output_tokens = output_tokens + $3"
        " WHERE id = $1",
        chat_id,
        input_tokens,
        output_tokens,
    )


async def delete_chat(
    db: Database, fence: Fence, chat_id: UUID, *, mark: IdempotencyMark | None = None
) -> bool:
    """Delete the chat with everything that hangs on it (messages, queue, notifications, the
    effect journal: ON DELETE CASCADE), fenced like every chat write, marking ``mark``'s key
    committed in the same transaction; whether it existed. Its token totals stay counted in
    its owner's ``user_usage``."""
    return await db.transaction(partial(_delete_chat, fence=fence, chat_id=chat_id, mark=mark))


async def _delete_chat(
    conn: Connection, *, fence: Fence, chat_id: UUID, mark: IdempotencyMark | None
) -> bool:
    found = await conn.fetchrow(_LOCK_CHAT, chat_id, *fence_args(fence))
    if found is None:
        await check_fence(conn, fence)
        return False
    if not found["held"]:
        raise Fenced(fence.shard, fence.epoch)
    if mark is not None:
        await mark_committed(conn, mark)
    await conn.execute(
        """
        WITH gone AS (DELETE FROM chats WHERE id = $1
                      RETURNING owner_id, input_tokens, output_tokens)
        INSERT INTO user_usage (user_id, input_tokens, output_tokens)
        SELECT owner_id, input_tokens, output_tokens FROM gone
        ON CONFLICT (user_id) DO UPDATE SET
            input_tokens = user_usage.input_tokens + EXCLUDED.input_tokens,
            output_tokens = user_usage.output_tokens + EXCLUDED.output_tokens,
            updated_at = now()
        """,
        chat_id,
    )
    return True


# -- reads ---------------------------------------------------------------------------------


async def get_chat(db: Database, chat_id: UUID, owner_id: UUID | None = None) -> Chat | None:
    """The chat, or ``None`` when missing or (with ``owner_id``) someone else's: callers answer
    both alike, so another user's chat cannot be told apart from a missing one."""
    row = await db.fetchrow(
        "SELECT * FROM chats WHERE id = $1 AND ($2::uuid IS NULL OR owner_id = $2)",
        chat_id,
        owner_id,
    )
    return None if row is None else chat_from_row(row)


async def list_chats(
    db: Database,
    owner_id: UUID,
    *,
    archived: bool | None = None,
    limit: int = 50,
    cursor: PageCursor | None = None,
) -> ChatPage:
    """The owner's chats, most recently updated first (ties by id), ``limit`` at a time.

    ``archived=None`` lists both. Keyset paging: pass the page's ``next_cursor`` for the next.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    rows = await db.fetch(
        """
        SELECT * FROM chats
        WHERE owner_id = $1
          AND ($2::boolean IS NULL OR archived = $2)
          AND ($3::timestamptz IS NULL
               OR updated_at < $3 OR (updated_at = $3 AND id > $4::uuid))
        ORDER BY updated_at DESC, id
        LIMIT $5
        """,
        owner_id,
        archived,
        None if cursor is None else cursor.at,
        None if cursor is None else cursor.id,
        limit + 1,
    )
    chats = [chat_from_row(row) for row in rows[:limit]]
    more = len(rows) > limit
    return ChatPage(chats, PageCursor(chats[-1].updated_at, chats[-1].id) if more else None)


async def list_messages(
    db: Database, chat_id: UUID, *, after_seq: int = 0, limit: int = 100
) -> list[ChatMessage]:
    """Live (not soft-deleted) messages with a seq above ``after_seq``, in seq order."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    rows = await db.fetch(
        """
        SELECT * FROM chat_messages
        WHERE chat_id = $1 AND deleted_at IS NULL AND seq > $2
        ORDER BY seq
        LIMIT $3
        """,
        chat_id,
        after_seq,
        limit,
    )
    return [chat_message_from_row(row) for row in rows]


# The live messages of chat $1 from its last assistant message on (where pending calls live).
LAST_STEP_SQL = """
    SELECT * FROM chat_messages
    WHERE chat_id = $1 AND deleted_at IS NULL
      AND seq >= (SELECT coalesce(max(seq), 0) FROM chat_messages
                  WHERE chat_id = $1 AND deleted_at IS NULL AND role = 'assistant')
    ORDER BY seq
"""


# The first page of what chat $1's next prompt needs: the live messages after what its newest
# summary covers (all of them without one), that summary included; one statement, so loading a
# chat costs no round trip more for compaction. Later pages: list_messages.
PROMPT_MESSAGES_SQL = """
    SELECT * FROM chat_messages
    WHERE chat_id = $1 AND deleted_at IS NULL
      AND seq > coalesce(
          (SELECT (content->0->>'through_seq')::bigint FROM chat_messages
           WHERE chat_id = $1 AND role = 'summary' AND deleted_at IS NULL
           ORDER BY seq DESC LIMIT 1),
          0)
    ORDER BY seq
    LIMIT $2
"""


async def list_prompt_messages(db: Database, chat_id: UUID, *, limit: int) -> list[ChatMessage]:
    """The first ``limit`` messages from the chat's newest summary boundary on (see
    ``PROMPT_MESSAGES_SQL``); page on with ``list_messages``."""
    rows = await db.fetch(PROMPT_MESSAGES_SQL, chat_id, limit)
    return [chat_message_from_row(row) for row in rows]


async def list_last_step(db: Database, chat_id: UUID) -> list[ChatMessage]:
    """The live messages from the last assistant message on (where pending calls live)."""
    return [chat_message_from_row(row) for row in await db.fetch(LAST_STEP_SQL, chat_id)]


async def list_queue(db: Database, chat_id: UUID) -> list[QueuedMessage]:
    """The chat's queued user messages, next first."""
    return await db.run(partial(_list_queue, chat_id=chat_id))


async def _list_queue(conn: Connection, chat_id: UUID) -> list[QueuedMessage]:
    rows = await conn.fetch(
        "SELECT * FROM queued_messages WHERE chat_id = $1 ORDER BY position", chat_id
    )
    return [queued_message_from_row(row) for row in rows]


async def list_resumable_chats_in(db: Database, shards: Sequence[int]) -> list[tuple[int, UUID]]:
    """``(shard, chat id)`` of every chat of ``shards`` with work left to do, in one query: the
    chats a new owner of those shards resumes, and the supervisor's sweeps of its held shards."""
    if not shards:
        return []
    # The literal list matches the partial index chats_runnable, so the planner can use it;
    # a test keeps it equal to RESUMABLE_STATUSES.
    rows = await db.fetch(
        "SELECT shard, id FROM chats WHERE shard = ANY($1::integer[])"
        " AND status IN ('running', 'interrupting', 'requires_action') ORDER BY shard, id",
        list(shards),
    )
    return [(row["shard"], row["id"]) for row in rows]
