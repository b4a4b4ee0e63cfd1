"""The state of a chat's working branch and pull request, as last reported."""

from __future__ import annotations

from functools import partial
from uuid import UUID

import asyncpg

from chatd.store.database import Connection, Database
from chatd.store.errors import NotFound
from chatd.store.records import DiffStatus, PullRequestState, diff_status_from_row


async def upsert_diff_status(
    db: Database,
    chat_id: UUID,
    *,
    branch: str | None = None,
    remote: str | None = None,
    pull_request_url: str | None = None,
    pull_request_state: PullRequestState | None = None,
    additions: int = 0,
    deletions: int = 0,
    changed_files: int = 0,
) -> tuple[DiffStatus, bool]:
    """Replace the chat's diff status; also says whether it changed.

    A report equal to the stored one writes nothing (``updated_at`` stays), so watchers are
    told of a ``diff_status_change`` only when there is one.
    """
    args = (
        chat_id,
        branch,
        remote,
        pull_request_url,
        pull_request_state,
        additions,
        deletions,
        changed_files,
    )
    try:
        return await db.transaction(partial(_upsert, args=args))
    except asyncpg.ForeignKeyViolationError as exc:
        raise NotFound("chat", chat_id) from exc


async def _upsert(conn: Connection, *, args: tuple[object, ...]) -> tuple[DiffStatus, bool]:
    row = await conn.fetchrow(
        """
        INSERT INTO chat_diff_statuses AS d (chat_id, branch, remote, pull_request_url,
            pull_request_state, additions, deletions, changed_files)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        ON CONFLICT (chat_id) DO UPDATE SET
            branch = EXCLUDED.branch,
            remote = EXCLUDED.remote,
            pull_request_url = EXCLUDED.pull_request_url,
            pull_request_state = EXCLUDED.pull_request_state,
            additions = EXCLUDED.additions,
            deletions = EXCLUDED.deletions,
            changed_files = EXCLUDED.changed_files
        WHERE (d.branch, d.remote, d.pull_request_url, d.pull_request_state,
               d.additions, d.deletions, d.changed_files)
              IS DISTINCT FROM
              (EXCLUDED.branch, EXCLUDED.remote, EXCLUDED.pull_request_url,
               EXCLUDED.pull_request_state, EXCLUDED.additions, EXCLUDED.deletions,
               EXCLUDED.changed_files)
        RETURNING *
        """,
        *args,
    )
    if row is not None:
        return diff_status_from_row(row), True
    # Unchanged: the conflicting row is locked by the upsert, so it is still there.
    row = await conn.fetchrow("SELECT * FROM chat_diff_statuses WHERE chat_id = $1", args[0])
    assert row is not None
    return diff_status_from_row(row), False


async def get_diff_status(db: Database, chat_id: UUID) -> DiffStatus | None:
    row = await db.fetchrow("SELECT * FROM chat_diff_statuses WHERE chat_id = $1", chat_id)
    return None if row is None else diff_status_from_row(row)
