"""Users, their API tokens and their token usage.

A token's secret is shown once, at creation; the store keeps only its SHA-256, so a leaked
database does not leak working credentials.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from functools import partial
from uuid import UUID, uuid4

import asyncpg

from chatd.store.database import Connection, Database
from chatd.store.errors import Conflict, NotFound
from chatd.store.records import ApiToken, User, UserUsage, api_token_from_row, user_from_row

TOKEN_PREFIX = "chatd_"  # noqa: S105 - a public marker on every secret, not a secret


def hash_token(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


async def create_user(
    db: Database, name: str, *, is_admin: bool = False, user_id: UUID | None = None
) -> User:
    """A new user (``user_id``: its id, random by default); ``Conflict`` when the name is
    taken."""
    try:
        row = await db.fetchrow(
            "INSERT INTO users (id, name, is_admin) VALUES ($1, $2, $3) RETURNING *",
            uuid4() if user_id is None else user_id,
            name,
            is_admin,
        )
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(f"user name {name!r} is taken", constraint=exc.constraint_name) from exc
    assert row is not None
    return user_from_row(row)


async def get_user(db: Database, user_id: UUID) -> User | None:
    row = await db.fetchrow("SELECT * FROM users WHERE id = $1", user_id)
    return None if row is None else user_from_row(row)


async def get_user_by_name(db: Database, name: str) -> User | None:
    row = await db.fetchrow("SELECT * FROM users WHERE name = $1", name)
    return None if row is None else user_from_row(row)


async def list_users(db: Database) -> list[User]:
    """Every user, in the order they were created (``GET /users``)."""
    rows = await db.fetch("SELECT * FROM users ORDER BY created_at, id")
    return [user_from_row(row) for row in rows]


async def create_api_token(db: Database, user_id: UUID, label: str = "") -> tuple[ApiToken, str]:
    """A new token for the user: its metadata and the secret, which is never retrievable again."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    try:
        row = await db.fetchrow(
            "INSERT INTO api_tokens (id, user_id, token_hash, label) VALUES ($1, $2, $3, $4)"
            " RETURNING *",
            uuid4(),
            user_id,
            hash_token(secret),
            label,
        )
    except asyncpg.ForeignKeyViolationError as exc:
        raise NotFound("user", user_id) from exc
    assert row is not None
    return api_token_from_row(row), secret


async def list_api_tokens(db: Database, user_id: UUID) -> list[ApiToken]:
    rows = await db.fetch(
        "SELECT * FROM api_tokens WHERE user_id = $1 ORDER BY created_at, id", user_id
    )
    return [api_token_from_row(row) for row in rows]


async def revoke_api_token(
    db: Database, token_id: UUID, *, user_id: UUID | None = None
) -> ApiToken:
    """Revoke a token (of ``user_id`` when given); revoking twice keeps the first time.

    A process that caches tokens must use ``TokenCache.revoke`` instead, which also forgets it.
    """
    token, _digest = await revoke_api_token_and_hash(db, token_id, user_id=user_id)
    return token


async def revoke_api_token_and_hash(
    db: Database, token_id: UUID, *, user_id: UUID | None = None
) -> tuple[ApiToken, bytes]:
    """``revoke_api_token``, plus the token's hash: the key a token cache must forget."""
    row = await db.fetchrow(
        "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now())"
        " WHERE id = $1 AND ($2::uuid IS NULL OR user_id = $2) RETURNING *",
        token_id,
        user_id,
    )
    if row is None:
        raise NotFound("api token", token_id)
    return api_token_from_row(row), bytes(row["token_hash"])


async def authenticate(db: Database, secret: str) -> User | None:
    """The user a live token belongs to, or ``None`` for an unknown or revoked secret."""
    if not is_token_shaped(secret):
        return None
    return await authenticate_hash(db, hash_token(secret))


def is_token_shaped(secret: str) -> bool:
    """Whether ``secret`` could be a chatd token at all (others are refused without a query)."""
    return secret.startswith(TOKEN_PREFIX)


async def authenticate_hash(db: Database, digest: bytes) -> User | None:
    """``authenticate`` for a token's hash (``hash_token``): the key of a token cache."""
    return await db.run(partial(_authenticate, digest=digest))


async def _authenticate(conn: Connection, *, digest: bytes) -> User | None:
    row = await conn.fetchrow(
        """
        SELECT t.id AS token_id, t.token_hash,
               t.last_used_at IS NULL OR t.last_used_at < now() - interval '1 minute' AS stale,
               u.*
        FROM api_tokens t JOIN users u ON u.id = t.user_id
        WHERE t.token_hash = $1 AND t.revoked_at IS NULL
        """,
        digest,
    )
    if row is None or not hmac.compare_digest(row["token_hash"], digest):
        return None
    # Recording every use would turn each authenticated request into a write.
    if row["stale"]:
        await conn.execute(
            "UPDATE api_tokens SET last_used_at = now() WHERE id = $1"
            " AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
            row["token_id"],
        )
    return user_from_row(row)


async def get_usage(db: Database, user_id: UUID) -> UserUsage:
    """The user's token totals over every chat it ever had; zeros for a user with none.

    A live chat keeps its own totals (``chats.input_tokens``/``output_tokens``); deleting it
    adds them to ``user_usage`` in the same transaction (``store.chats.delete_chat``). So the
    total is both, read in one statement: a chat deleted meanwhile is counted once.
    """
    row = await db.fetchrow(
        """
        SELECT coalesce(sum(c.input_tokens), 0)::bigint + coalesce(max(u.input_tokens), 0)
                   AS input_tokens,
               coalesce(sum(c.output_tokens), 0)::bigint + coalesce(max(u.output_tokens), 0)
                   AS output_tokens
        FROM (SELECT $1::uuid AS user_id) me
        LEFT JOIN user_usage u ON u.user_id = me.user_id
        LEFT JOIN chats c ON c.owner_id = me.user_id
        """,
        user_id,
    )
    assert row is not None  # an aggregate always has one row
    return UserUsage(user_id, row["input_tokens"], row["output_tokens"])


async def list_api_tokens_with_users(
    db: Database, *, user_name: str | None = None
) -> list[tuple[ApiToken, str]]:
    """Every token (of the user named ``user_name`` when given), revoked ones included, with
    its user's name, oldest first; never a secret or a hash (``chatd token list``)."""
    rows = await db.fetch(
        "SELECT t.*, u.name AS user_name FROM api_tokens t JOIN users u ON u.id = t.user_id"
        " WHERE $1::text IS NULL OR u.name = $1 ORDER BY t.created_at, t.id",
        user_name,
    )
    return [(api_token_from_row(row), row["user_name"]) for row in rows]
