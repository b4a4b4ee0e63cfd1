"""Each user's custom prompt, added to the system prompt of their chats."""

from __future__ import annotations

from uuid import UUID

import asyncpg

from chatd.store.database import Database
from chatd.store.errors import NotFound
from chatd.store.records import UserPrompt, user_prompt_from_row


async def get_user_prompt(db: Database, user_id: UUID) -> UserPrompt | None:
    row = await db.fetchrow("SELECT * FROM user_prompts WHERE user_id = $1", user_id)
    return None if row is None else user_prompt_from_row(row)


async def put_user_prompt(db: Database, user_id: UUID, prompt: str) -> UserPrompt:
    """Set (create or replace) the user's prompt."""
    try:
        row = await db.fetchrow(
            """
            INSERT INTO user_prompts (user_id, prompt) VALUES ($1, $2)
            ON CONFLICT (user_id) DO UPDATE SET prompt = EXCLUDED.prompt
            RETURNING *
            """,
            user_id,
            prompt,
        )
    except asyncpg.ForeignKeyViolationError as exc:
        raise NotFound("user", user_id) from exc
    assert row is not None
    return user_prompt_from_row(row)


async def delete_user_prompt(db: Database, user_id: UUID) -> bool:
    """Remove the user's prompt; ``False`` when there was none."""
    found = await db.fetchval("DELETE FROM user_prompts WHERE user_id = $1 RETURNING true", user_id)
    return found is not None
