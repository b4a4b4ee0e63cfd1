from __future__ import annotations

from uuid import uuid4

import pytest

from chatd.store.database import Database
from chatd.store.diff_status import get_diff_status, upsert_diff_status
from chatd.store.errors import NotFound
from tests.store.helpers import lease, make_chat, make_user


async def test_diff_status_round_trip_and_change_detection(db: Database) -> None:
    user = await make_user(db)
    chat = await make_chat(db, await lease(db), user.id)
    assert await get_diff_status(db, chat.id) is None

    status, changed = await upsert_diff_status(
        db,
        chat.id,
        branch="fix/build",
        remote="git@github.com:o/r.git",
        pull_request_url="https://github.com/o/r/pull/7",
        pull_request_state="draft",
        additions=10,
        deletions=2,
        changed_files=3,
    )
    assert changed
    assert (status.chat_id, status.branch, status.remote) == (
        chat.id,
        "fix/build",
        "git@github.com:o/r.git",
    )
    assert (status.pull_request_url, status.pull_request_state) == (
        "https://github.com/o/r/pull/7",
        "draft",
    )
    assert (status.additions, status.deletions, status.changed_files) == (10, 2, 3)
    assert await get_diff_status(db, chat.id) == status

    same, changed = await upsert_diff_status(
        db,
        chat.id,
        branch="fix/build",
        remote="git@github.com:o/r.git",
        pull_request_url="https://github.com/o/r/pull/7",
        pull_request_state="draft",
        additions=10,
        deletions=2,
        changed_files=3,
    )
    assert not changed
    assert same == status  # updated_at too: nothing was written

    merged, changed = await upsert_diff_status(
        db, chat.id, branch="fix/build", pull_request_state="merged"
    )
    assert changed
    assert (merged.pull_request_state, merged.remote, merged.additions) == ("merged", None, 0)
    assert await get_diff_status(db, chat.id) == merged


async def test_diff_status_for_missing_chat_is_not_found(db: Database) -> None:
    with pytest.raises(NotFound):
        await upsert_diff_status(db, uuid4(), branch="x")
    assert await db.fetchval("SELECT count(*) FROM chat_diff_statuses") == 0
