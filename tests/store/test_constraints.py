"""Every constraint of the schema, violated once (or more) in raw SQL.

Each case names the constraint it targets; the test checks that PostgreSQL refused the write with
the right asyncpg error class, for that very constraint, and that nothing was written. A catalog
test makes sure the cases cover every constraint, NOT NULL column and immutable column there is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from uuid import UUID, uuid4

import asyncpg
import pytest

from chatd.domain.chat_status import RESUMABLE_STATUSES, ChatStatus
from chatd.store.database import Database

T0 = datetime(2030, 1, 1, tzinfo=UTC)
EARLIER = T0 - timedelta(seconds=1)
PAST = datetime(2000, 1, 1, tzinfo=UTC)
WORLD_HASH = bytes(range(32))
IDEMPOTENCY_SEED = UUID(int=1)


@dataclass(frozen=True)
class World:
    """One valid row in every table (two users and two chats), for cases to collide with."""

    user: UUID
    other_user: UUID
    token: UUID
    provider: UUID
    model_config: UUID
    chat: UUID
    other_chat: UUID
    message: UUID
    queued: UUID
    notification: UUID


async def build_world(db: Database) -> World:
    w = World(*(uuid4() for _ in range(10)))

    async def insert(conn: Any) -> None:
        await conn.execute(
            "INSERT INTO users (id, name) VALUES ($1, 'alice'), ($2, 'bob')", w.user, w.other_user
        )
        await conn.execute(
            "INSERT INTO api_tokens (id, user_id, token_hash) VALUES ($1, $2, $3)",
            w.token,
            w.user,
            WORLD_HASH,
        )
        await conn.execute(
            "INSERT INTO providers (id, name, kind) VALUES ($1, 'p1', 'openai')", w.provider
        )
        await conn.execute(
            "INSERT INTO model_configs (id, provider_id, name, model, context_limit, is_default)"
            " VALUES ($1, $2, 'm1', 'gpt-x', 1000, true)",
            w.model_config,
            w.provider,
        )
        await conn.execute(
            "INSERT INTO user_prompts (user_id, prompt) VALUES ($1, 'be brief')", w.user
        )
        await conn.execute(
            "INSERT INTO shard_leases (shard, worker_id, epoch, expires_at)"
            " VALUES (0, 'w1', 1, now() + interval '1 hour')"
        )
        await conn.execute(
            "INSERT INTO chats (id, owner_id, shard, model_config_id, history_version,"
            " generation_attempt, last_message_seq) VALUES ($1, $2, 0, $3, 5, 5, 5)",
            w.chat,
            w.user,
            w.model_config,
        )
        await conn.execute(
            "INSERT INTO chats (id, owner_id, shard) VALUES ($1, $2, 1)", w.other_chat, w.other_user
        )
        await conn.execute(
            "INSERT INTO chat_messages (id, chat_id, seq, role, content, history_version)"
            " VALUES ($1, $2, 1, 'user', '[]', 0)",
            w.message,
            w.chat,
        )
        await conn.execute(
            "INSERT INTO queued_messages (id, chat_id, position, content) VALUES ($1, $2, 1, '[]')",
            w.queued,
            w.chat,
        )
        await conn.execute(
            "INSERT INTO inbox_notifications (id, user_id, chat_id, kind, title)"
            " VALUES ($1, $2, $3, 'failed', 'oops')",
            w.notification,
            w.user,
            w.chat,
        )
        await conn.execute("INSERT INTO chat_diff_statuses (chat_id) VALUES ($1)", w.chat)
        await conn.execute("INSERT INTO user_usage (user_id) VALUES ($1)", w.user)
        await conn.execute(
            "INSERT INTO tool_effects (chat_id, message_seq, call_id, tool)"
            " VALUES ($1, 1, 'c1', 'execute')",
            w.chat,
        )
        await conn.execute(
            "INSERT INTO workers (worker_id, link_url, expires_at)"
            " VALUES ('w1', 'http://127.0.0.1:1', now() + interval '1 hour')"
        )
        # cluster_secret's one row is the migration's.
        await conn.execute(
            "INSERT INTO idempotency_keys (user_id, key, fingerprint, seed, expires_at,"
            " locked_until, claimed_by, attempt) VALUES ($1, 'k1', $2, $3, $4, $4, 'w1', $3)",
            w.user,
            WORLD_HASH,
            IDEMPOTENCY_SEED,
            T0,
        )

    await db.transaction(insert)
    return w


def fresh_row(table: str, w: World) -> dict[str, Any]:
    """A valid new row for ``table`` that collides with nothing in the world."""
    rows: dict[str, dict[str, Any]] = {
        "users": {"id": uuid4(), "name": "carol"},
        "api_tokens": {"id": uuid4(), "user_id": w.user, "token_hash": os.urandom(32)},
        "providers": {"id": uuid4(), "name": "p2", "kind": "anthropic"},
        "model_configs": {
            "id": uuid4(),
            "provider_id": w.provider,
            "name": "m2",
            "model": "claude-x",
            "context_limit": 2000,
        },
        "user_prompts": {"user_id": w.other_user, "prompt": "be kind"},
        "shard_leases": {
            "shard": 1,
            "worker_id": "w2",
            "epoch": 1,
            "expires_at": T0,
        },
        "chats": {"id": uuid4(), "owner_id": w.user, "shard": 0},
        "chat_messages": {
            "id": uuid4(),
            "chat_id": w.chat,
            "seq": 2,
            "role": "assistant",
            "content": "[]",
            "history_version": 0,
        },
        "queued_messages": {"id": uuid4(), "chat_id": w.chat, "position": 2, "content": "[]"},
        "inbox_notifications": {
            "id": uuid4(),
            "user_id": w.user,
            "kind": "turn_finished",
            "title": "done",
        },
        "chat_diff_statuses": {"chat_id": w.other_chat},
        "user_usage": {"user_id": w.other_user},
        "tool_effects": {"chat_id": w.chat, "message_seq": 2, "call_id": "c2", "tool": "edit_file"},
        "idempotency_keys": {
            "user_id": w.user,
            "key": "k2",
            "fingerprint": WORLD_HASH,
            "seed": uuid4(),
            "expires_at": T0,
            "locked_until": T0,
            "claimed_by": "w1",
            "attempt": uuid4(),
        },
        "workers": {"worker_id": "w2", "expires_at": T0},
        # The one row there may be: its cases break a rule before they could collide.
        "cluster_secret": {"id": True, "secret": "s" * 32},
    }
    return rows[table]


# The world's row of each table, for update cases.
WORLD_KEYS: dict[str, tuple[str, Callable[[World], object]]] = {
    "users": ("id", lambda w: w.user),
    "api_tokens": ("id", lambda w: w.token),
    "providers": ("id", lambda w: w.provider),
    "model_configs": ("id", lambda w: w.model_config),
    "user_prompts": ("user_id", lambda w: w.user),
    "shard_leases": ("shard", lambda _w: 0),
    "chats": ("id", lambda w: w.chat),
    "chat_messages": ("id", lambda w: w.message),
    "queued_messages": ("id", lambda w: w.queued),
    "inbox_notifications": ("id", lambda w: w.notification),
    "chat_diff_statuses": ("chat_id", lambda w: w.chat),
    "user_usage": ("user_id", lambda w: w.user),
    "tool_effects": ("chat_id", lambda w: w.chat),
    "idempotency_keys": ("seed", lambda _w: IDEMPOTENCY_SEED),
    "workers": ("worker_id", lambda _w: "w1"),
    "cluster_secret": ("id", lambda _w: True),
}
# Tables of one row at most: no fresh row can be valid beside the world's.
SINGLETONS = {"cluster_secret"}

Values = Callable[[World], dict[str, Any]]
Op = Literal["insert", "update", "delete"]


@dataclass(frozen=True)
class Case:
    """``op`` on ``table``: insert a fresh row with ``values`` over it, update the world's row to
    ``values``, or delete the world's row. ``target`` is the constraint's name, or
    ``table.column NOT NULL``, or ``table.column immutable``."""

    target: str
    error: type[asyncpg.PostgresError]
    table: str
    values: Values
    op: Op = "insert"
    label: str = ""

    @property
    def id(self) -> str:
        return f"{self.target}-{self.label}" if self.label else self.target


def _const(values: dict[str, Any]) -> Values:
    return lambda _w: values


def check(table: str, name: str, label: str = "", /, *, op: Op = "insert", **values: Any) -> Case:
    return Case(name, asyncpg.CheckViolationError, table, _const(values), op, label)


def unique(table: str, name: str, values: Values) -> Case:
    return Case(name, asyncpg.UniqueViolationError, table, values)


def fk(table: str, name: str, column: str) -> Case:
    return Case(name, asyncpg.ForeignKeyViolationError, table, lambda _w: {column: uuid4()})


def not_null(table: str, *columns: str) -> list[Case]:
    return [
        Case(
            f"{table}.{column} NOT NULL",
            asyncpg.NotNullViolationError,
            table,
            _const({column: None}),
        )
        for column in columns
    ]


def immutable(table: str, **new_values: Any) -> list[Case]:
    """Each column changed alone to a value that nothing but the trigger would refuse."""

    def values(column: str, value: Any) -> Values:
        return lambda w: {column: value(w) if callable(value) else value}

    return [
        Case(
            f"{table}.{column} immutable",
            asyncpg.IntegrityConstraintViolationError,
            table,
            values(column, value),
            "update",
        )
        for column, value in new_values.items()
    ]


def monotonic(table: str, *columns: str) -> list[Case]:
    """Each counter set below its current value (the world's rows start them at 5)."""
    return [
        Case(
            f"{table}.{column} decreasing",
            asyncpg.IntegrityConstraintViolationError,
            table,
            _const({column: 4}),
            "update",
        )
        for column in columns
    ]


def long(n: int) -> str:
    return "x" * n


CASES: list[Case] = [
    # users
    unique("users", "users_pkey", lambda w: {"id": w.user}),
    unique("users", "users_name_key", _const({"name": "alice"})),
    check("users", "users_name_check", "empty", name=""),
    check("users", "users_name_check", "space", name="al ice"),
    check("users", "users_name_check", "leading-dot", name=".alice"),
    check("users", "users_name_check", "too-long", name=long(129)),
    *not_null("users", "id", "name", "is_admin", "created_at"),
    *immutable("users", id=lambda _w: uuid4(), created_at=PAST),
    # api_tokens
    unique("api_tokens", "api_tokens_pkey", lambda w: {"id": w.token}),
    fk("api_tokens", "api_tokens_user_id_fkey", "user_id"),
    unique("api_tokens", "api_tokens_token_hash_key", _const({"token_hash": WORLD_HASH})),
    check("api_tokens", "api_tokens_token_hash_check", "short", token_hash=b"x" * 31),
    check("api_tokens", "api_tokens_token_hash_check", "long", token_hash=b"x" * 33),
    check("api_tokens", "api_tokens_label_check", label=long(201)),
    check("api_tokens", "api_tokens_check", created_at=T0, revoked_at=EARLIER),
    *not_null("api_tokens", "id", "user_id", "token_hash", "label", "created_at"),
    *immutable(
        "api_tokens",
        id=lambda _w: uuid4(),
        user_id=lambda w: w.other_user,
        token_hash=lambda _w: os.urandom(32),
        created_at=PAST,
    ),
    # providers
    unique("providers", "providers_pkey", lambda w: {"id": w.provider}),
    unique("providers", "providers_name_key", _const({"name": "p1"})),
    check("providers", "providers_name_check", "empty", name=""),
    check("providers", "providers_name_check", "too-long", name=long(101)),
    check("providers", "providers_kind_check", kind="gemini"),
    check("providers", "providers_base_url_check", "scheme", base_url="ftp://example.com"),
    check("providers", "providers_base_url_check", "space", base_url="http://exa mple.com"),
    check("providers", "providers_base_url_check", "no-host", base_url="https://"),
    check("providers", "providers_api_key_check", api_key=long(4097)),
    check("providers", "providers_check", kind="openai-compatible"),
    *not_null("providers", "id", "name", "kind", "enabled", "created_at", "updated_at"),
    # model_configs
    unique("model_configs", "model_configs_pkey", lambda w: {"id": w.model_config}),
    fk("model_configs", "model_configs_provider_id_fkey", "provider_id"),
    Case(
        "model_configs_provider_id_fkey",
        asyncpg.ForeignKeyViolationError,
        "providers",
        _const({}),
        "delete",
        "restrict",
    ),
    unique("model_configs", "model_configs_name_key", _const({"name": "m1"})),
    unique("model_configs", "model_configs_one_default", _const({"is_default": True})),
    check("model_configs", "model_configs_name_check", "empty", name=""),
    check("model_configs", "model_configs_name_check", "too-long", name=long(101)),
    check("model_configs", "model_configs_model_check", "empty", model=""),
    check("model_configs", "model_configs_model_check", "too-long", model=long(201)),
    check("model_configs", "model_configs_context_limit_check", context_limit=0),
    check(
        "model_configs",
        "model_configs_compression_threshold_check",
        "zero",
        compression_threshold=0.0,
    ),
    check(
        "model_configs",
        "model_configs_compression_threshold_check",
        "above-one",
        compression_threshold=1.01,
    ),
    check("model_configs", "model_configs_options_check", "array", options="[]"),
    check("model_configs", "model_configs_options_check", "null", options="null"),
    check("model_configs", "model_configs_tools_check", tools=["current_time"] * 65),
    *not_null(
        "model_configs",
        "id",
        "provider_id",
        "name",
        "model",
        "context_limit",
        "compression_threshold",
        "options",
        "is_default",
        "tools",
        "created_at",
        "updated_at",
    ),
    # user_prompts
    unique("user_prompts", "user_prompts_pkey", lambda w: {"user_id": w.user}),
    fk("user_prompts", "user_prompts_user_id_fkey", "user_id"),
    check("user_prompts", "user_prompts_prompt_check", prompt=long(100_001)),
    *not_null("user_prompts", "user_id", "prompt", "updated_at"),
    # shard_leases
    unique("shard_leases", "shard_leases_pkey", _const({"shard": 0})),
    check("shard_leases", "shard_leases_shard_check", shard=-1),
    check("shard_leases", "shard_leases_worker_id_check", "empty", worker_id=""),
    check("shard_leases", "shard_leases_worker_id_check", "too-long", worker_id=long(201)),
    check("shard_leases", "shard_leases_epoch_check", epoch=0),
    *not_null("shard_leases", "shard", "worker_id", "epoch", "expires_at", "updated_at"),
    # workers
    unique("workers", "workers_pkey", _const({"worker_id": "w1"})),
    check("workers", "workers_worker_id_check", "empty", worker_id=""),
    check("workers", "workers_worker_id_check", "too-long", worker_id=long(201)),
    check("workers", "workers_link_url_check", link_url=long(501)),
    *not_null("workers", "worker_id", "link_url", "started_at", "expires_at"),
    # cluster_secret
    unique("cluster_secret", "cluster_secret_pkey", _const({})),
    check("cluster_secret", "cluster_secret_id_check", id=False),
    check("cluster_secret", "cluster_secret_secret_check", secret=long(31)),
    *not_null("cluster_secret", "id", "secret"),
    # chats
    unique("chats", "chats_pkey", lambda w: {"id": w.chat}),
    fk("chats", "chats_owner_id_fkey", "owner_id"),
    fk("chats", "chats_model_config_id_fkey", "model_config_id"),
    check("chats", "chats_shard_check", shard=-1),
    check("chats", "chats_title_check", title=long(501)),
    check("chats", "chats_status_check", status="done"),
    check("chats", "chats_history_version_check", history_version=-1),
    check("chats", "chats_generation_attempt_check", generation_attempt=-1),
    check("chats", "chats_retry_count_check", retry_count=-1),
    check("chats", "chats_last_error_check", last_error='"boom"'),
    check("chats", "chats_dynamic_tools_check", dynamic_tools="{}"),
    check("chats", "chats_system_prompt_check", system_prompt=long(200_001)),
    check("chats", "chats_last_message_seq_check", last_message_seq=-1),
    check("chats", "chats_tools_check", tools=["current_time"] * 65),
    check("chats", "chats_input_tokens_check", input_tokens=-1),
    check("chats", "chats_output_tokens_check", output_tokens=-1),
    # compacting only while running
    check("chats", "chats_compacting_only_running", "insert", compacting=True),
    check("chats", "chats_compacting_only_running", "update", op="update", compacting=True),
    # error needs last_error
    check("chats", "chats_check", "insert", status="error"),
    check("chats", "chats_check", "update", op="update", status="error"),
    # requires_action <=> action_deadline
    check("chats", "chats_check1", "no-deadline", status="requires_action"),
    check("chats", "chats_check1", "deadline-while-waiting", action_deadline=T0),
    check("chats", "chats_check1", "update", op="update", status="requires_action"),
    # retry_at only while running
    check("chats", "chats_check2", "insert", retry_at=T0),
    check("chats", "chats_check2", "update", op="update", retry_at=T0),
    *not_null(
        "chats",
        "id",
        "owner_id",
        "shard",
        "title",
        "status",
        "archived",
        "history_version",
        "generation_attempt",
        "retry_count",
        "dynamic_tools",
        "system_prompt",
        "last_message_seq",
        "input_tokens",
        "output_tokens",
        "compacting",
        "created_at",
        "updated_at",
    ),
    *immutable(
        "chats",
        id=lambda _w: uuid4(),
        owner_id=lambda w: w.other_user,
        shard=5,
        created_at=PAST,
    ),
    *monotonic("chats", "history_version", "generation_attempt", "last_message_seq"),
    # chat_messages
    unique("chat_messages", "chat_messages_pkey", lambda w: {"id": w.message}),
    fk("chat_messages", "chat_messages_chat_id_fkey", "chat_id"),
    unique("chat_messages", "chat_messages_chat_id_seq_key", _const({"seq": 1})),
    check("chat_messages", "chat_messages_seq_check", seq=0),
    check("chat_messages", "chat_messages_role_check", role="system"),
    check("chat_messages", "chat_messages_content_check", content="{}"),
    check("chat_messages", "chat_messages_usage_check", usage="[]"),
    check("chat_messages", "chat_messages_history_version_check", history_version=-1),
    *not_null(
        "chat_messages", "id", "chat_id", "seq", "role", "content", "history_version", "created_at"
    ),
    *immutable(
        "chat_messages",
        id=lambda _w: uuid4(),
        chat_id=lambda w: w.other_chat,
        seq=99,
        role="assistant",
        created_at=PAST,
    ),
    # queued_messages
    unique("queued_messages", "queued_messages_pkey", lambda w: {"id": w.queued}),
    fk("queued_messages", "queued_messages_chat_id_fkey", "chat_id"),
    unique("queued_messages", "queued_messages_chat_id_position_key", _const({"position": 1})),
    check("queued_messages", "queued_messages_content_check", content='{"type": "text"}'),
    *not_null("queued_messages", "id", "chat_id", "position", "content", "created_at"),
    *immutable(
        "queued_messages",
        id=lambda _w: uuid4(),
        chat_id=lambda w: w.other_chat,
        created_at=PAST,
    ),
    # inbox_notifications
    unique("inbox_notifications", "inbox_notifications_pkey", lambda w: {"id": w.notification}),
    fk("inbox_notifications", "inbox_notifications_user_id_fkey", "user_id"),
    fk("inbox_notifications", "inbox_notifications_chat_id_fkey", "chat_id"),
    check("inbox_notifications", "inbox_notifications_kind_check", kind="info"),
    check("inbox_notifications", "inbox_notifications_title_check", title=long(501)),
    check("inbox_notifications", "inbox_notifications_body_check", body=long(10_001)),
    check("inbox_notifications", "inbox_notifications_check", created_at=T0, read_at=EARLIER),
    *not_null("inbox_notifications", "id", "user_id", "kind", "title", "body", "created_at"),
    *immutable(
        "inbox_notifications",
        id=lambda _w: uuid4(),
        user_id=lambda w: w.other_user,
        chat_id=lambda w: w.other_chat,
        kind="turn_finished",
        created_at=PAST,
    ),
    # chat_diff_statuses
    unique("chat_diff_statuses", "chat_diff_statuses_pkey", lambda w: {"chat_id": w.chat}),
    fk("chat_diff_statuses", "chat_diff_statuses_chat_id_fkey", "chat_id"),
    check("chat_diff_statuses", "chat_diff_statuses_branch_check", branch=long(501)),
    check("chat_diff_statuses", "chat_diff_statuses_remote_check", remote=long(2001)),
    check(
        "chat_diff_statuses",
        "chat_diff_statuses_pull_request_url_check",
        pull_request_url="github.com/o/r/pull/1",
    ),
    check(
        "chat_diff_statuses",
        "chat_diff_statuses_pull_request_state_check",
        pull_request_state="abandoned",
    ),
    check("chat_diff_statuses", "chat_diff_statuses_additions_check", additions=-1),
    check("chat_diff_statuses", "chat_diff_statuses_deletions_check", deletions=-1),
    check("chat_diff_statuses", "chat_diff_statuses_changed_files_check", changed_files=-1),
    *not_null(
        "chat_diff_statuses", "chat_id", "additions", "deletions", "changed_files", "updated_at"
    ),
    # user_usage
    unique("user_usage", "user_usage_pkey", lambda w: {"user_id": w.user}),
    fk("user_usage", "user_usage_user_id_fkey", "user_id"),
    check("user_usage", "user_usage_input_tokens_check", input_tokens=-1),
    check("user_usage", "user_usage_output_tokens_check", output_tokens=-1),
    *not_null("user_usage", "user_id", "input_tokens", "output_tokens", "updated_at"),
    # tool_effects
    unique("tool_effects", "tool_effects_pkey", _const({"message_seq": 1, "call_id": "c1"})),
    fk("tool_effects", "tool_effects_chat_id_fkey", "chat_id"),
    check("tool_effects", "tool_effects_message_seq_check", message_seq=0),
    check("tool_effects", "tool_effects_call_id_check", "empty", call_id=""),
    check("tool_effects", "tool_effects_call_id_check", "too-long", call_id=long(201)),
    check("tool_effects", "tool_effects_tool_check", "empty", tool=""),
    check("tool_effects", "tool_effects_tool_check", "too-long", tool=long(65)),
    # a result and its finishing time come together
    check("tool_effects", "tool_effects_check", result='{"ok": true}'),
    *not_null("tool_effects", "chat_id", "message_seq", "call_id", "tool", "started_at"),
    # idempotency_keys
    unique("idempotency_keys", "idempotency_keys_pkey", _const({"key": "k1"})),
    fk("idempotency_keys", "idempotency_keys_user_id_fkey", "user_id"),
    check("idempotency_keys", "idempotency_keys_key_check", "empty", key=""),
    check("idempotency_keys", "idempotency_keys_key_check", "too-long", key=long(1025)),
    check("idempotency_keys", "idempotency_keys_fingerprint_check", fingerprint=b"x" * 31),
    check("idempotency_keys", "idempotency_keys_status_check", status=500, body=b"{}"),
    check("idempotency_keys", "idempotency_keys_claimed_by_check", "empty", claimed_by=""),
    check("idempotency_keys", "idempotency_keys_claimed_by_check", "long", claimed_by=long(201)),
    # a recorded answer has both its status and its body
    check("idempotency_keys", "idempotency_keys_check", "no-body", status=200),
    check("idempotency_keys", "idempotency_keys_check", "no-status", body=b"{}"),
    *not_null(
        "idempotency_keys",
        "user_id",
        "key",
        "fingerprint",
        "seed",
        "created_at",
        "expires_at",
        "locked_until",
        "claimed_by",
        "attempt",
        "committed",
    ),
]

TABLES = list(WORLD_KEYS)


def insert_sql(table: str, row: dict[str, Any]) -> str:
    columns = ", ".join(row)
    params = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    return f"INSERT INTO {table} ({columns}) VALUES ({params})"


async def snapshot(db: Database, table: str) -> list[dict[str, Any]]:
    return [dict(r) for r in await db.fetch(f"SELECT * FROM {table} ORDER BY 1")]


@pytest.mark.parametrize("table", [t for t in TABLES if t not in SINGLETONS])
async def test_a_fresh_row_is_valid(db: Database, table: str) -> None:
    """The base of every insert case is valid, so a refusal is the override's doing."""
    world = await build_world(db)
    row = fresh_row(table, world)
    before = await snapshot(db, table)
    await db.execute(insert_sql(table, row), *row.values())
    assert len(await snapshot(db, table)) == len(before) + 1


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_violation_is_refused_and_writes_nothing(db: Database, case: Case) -> None:
    world = await build_world(db)
    before = {table: await snapshot(db, table) for table in TABLES}
    key_column, key = WORLD_KEYS[case.table]
    values = case.values(world)

    match case.op:
        case "insert":
            row = fresh_row(case.table, world) | values
            sql, args = insert_sql(case.table, row), list(row.values())
        case "update":
            assignments = ", ".join(f"{col} = ${i}" for i, col in enumerate(values, start=2))
            sql = f"UPDATE {case.table} SET {assignments} WHERE {key_column} = $1"
            args = [key(world), *values.values()]
        case "delete":
            sql, args = f"DELETE FROM {case.table} WHERE {key_column} = $1", [key(world)]

    with pytest.raises(asyncpg.PostgresError) as caught:
        await db.execute(sql, *args)

    error = caught.value
    assert type(error) is case.error, f"{type(error).__name__}: {error}"
    if case.target.endswith(" NOT NULL"):
        table, column = case.target.removesuffix(" NOT NULL").split(".")
        assert (error.table_name, error.column_name) == (table, column)
    elif case.target.endswith(" immutable"):
        assert f"{case.target.removesuffix(' immutable')} cannot be changed" in str(error)
    elif case.target.endswith(" decreasing"):
        assert f"{case.target.removesuffix(' decreasing')} cannot decrease" in str(error)
    else:
        assert error.constraint_name == case.target
    assert {table: await snapshot(db, table) for table in TABLES} == before


async def test_cases_cover_every_constraint_in_the_schema(db: Database) -> None:
    """Adding a constraint, NOT NULL column or immutable column without a case here fails."""
    ours = "c.relnamespace = 'public'::regnamespace AND c.relname <> 'schema_migrations'"
    named = await db.fetch(
        f"SELECT conname FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid"
        f" WHERE {ours} AND contype IN ('c', 'f', 'p', 'u')"
    )
    unique_indexes = await db.fetch(
        f"SELECT ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid"
        f" JOIN pg_class c ON c.oid = i.indrelid WHERE {ours} AND i.indisunique"
        f" AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)"
    )
    not_nulls = await db.fetch(
        f"SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        f" WHERE {ours} AND c.relkind = 'r' AND a.attnum > 0 AND a.attnotnull"
        f" AND NOT a.attisdropped"
    )
    triggers = await db.fetch(
        f"SELECT c.relname, t.tgargs FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        f" JOIN pg_proc p ON p.oid = t.tgfoid WHERE {ours} AND p.proname = 'chatd_forbid_change'"
    )
    monotonic_triggers = await db.fetch(
        f"SELECT c.relname, t.tgargs FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        f" JOIN pg_proc p ON p.oid = t.tgfoid"
        f" WHERE {ours} AND p.proname = 'chatd_forbid_decrease'"
    )
    in_schema = (
        {r["conname"] for r in named}
        | {r["relname"] for r in unique_indexes}
        | {f"{r['relname']}.{r['attname']} NOT NULL" for r in not_nulls}
        | {
            f"{r['relname']}.{column} immutable"
            for r in triggers
            for column in r["tgargs"].decode().split("\0")
            if column
        }
        | {
            f"{r['relname']}.{column} decreasing"
            for r in monotonic_triggers
            for column in r["tgargs"].decode().split("\0")
            if column
        }
    )
    assert len(in_schema) > 150
    assert {c.target for c in CASES} == in_schema


async def test_schema_statuses_match_the_domain(db: Database) -> None:
    definition = await db.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'chats_status_check'"
    )
    assert set(re.findall(r"'(\w+)'::text", definition)) == {s.value for s in ChatStatus}
    predicate = await db.fetchval(
        "SELECT pg_get_expr(indpred, indrelid) FROM pg_index"
        " WHERE indexrelid = 'chats_runnable'::regclass"
    )
    assert set(re.findall(r"'(\w+)'::text", predicate)) == {s.value for s in RESUMABLE_STATUSES}


@pytest.mark.parametrize(
    ("table", "change"),
    [
        ("providers", "enabled = false"),
        ("model_configs", "context_limit = 5"),
        ("user_prompts", "prompt = 'x'"),
        ("chats", "title = 'x'"),
        ("chat_diff_statuses", "additions = 3"),
    ],
)
async def test_updated_at_is_set_by_the_database(db: Database, table: str, change: str) -> None:
    """A touch trigger overrides whatever updated_at the writer says."""
    world = await build_world(db)
    key_column, key = WORLD_KEYS[table]
    row = await db.fetchrow(
        f"UPDATE {table} SET {change}, updated_at = $2 WHERE {key_column} = $1"
        f" RETURNING updated_at, now()",
        key(world),
        PAST,
    )
    assert row is not None
    assert row["updated_at"] == row["now"]


async def test_mutable_columns_can_change(db: Database) -> None:
    """The immutability triggers refuse only their own columns."""
    world = await build_world(db)
    await db.execute("UPDATE users SET is_admin = true, name = 'alicia' WHERE id = $1", world.user)
    await db.execute(
        'UPDATE chat_messages SET content = \'[{"type": "text"}]\', deleted_at = now()'
        " WHERE id = $1",
        world.message,
    )
    await db.execute("UPDATE queued_messages SET position = 7 WHERE id = $1", world.queued)
    await db.execute(
        "UPDATE inbox_notifications SET read_at = now(), title = 't' WHERE id = $1",
        world.notification,
    )
    await db.execute("UPDATE api_tokens SET revoked_at = now() WHERE id = $1", world.token)
    assert await db.fetchval("SELECT name FROM users WHERE id = $1", world.user) == "alicia"


async def test_deletes_cascade_or_clear_as_declared(db: Database) -> None:
    world = await build_world(db)
    await db.execute("DELETE FROM model_configs WHERE id = $1", world.model_config)
    assert await db.fetchval("SELECT model_config_id FROM chats WHERE id = $1", world.chat) is None

    await db.execute("DELETE FROM chats WHERE id = $1", world.chat)
    for table in ("chat_messages", "queued_messages", "inbox_notifications", "chat_diff_statuses"):
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == 0, table

    await db.execute("DELETE FROM users WHERE id = $1", world.other_user)
    assert await db.fetchval("SELECT count(*) FROM chats") == 0
    await db.execute("DELETE FROM users WHERE id = $1", world.user)
    for table in ("api_tokens", "user_prompts", "users"):
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == 0, table
