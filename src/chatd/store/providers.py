"""Provider credentials and the model configs that use them (admin-managed configuration)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any
from uuid import UUID, uuid4

import asyncpg

from chatd.store.database import Connection, Database
from chatd.store.errors import Conflict, NotFound
from chatd.store.records import (
    UNSET,
    ModelConfig,
    Provider,
    ProviderKind,
    Unset,
    change,
    encode_json,
    model_config_from_row,
    provider_from_row,
)

# Serialises changes of the default model config: two concurrent "make X the default" would
# otherwise both clear the old default and then collide on the one-default index.
_DEFAULT_LOCK_KEY = 0x63686174_64000002 - (1 << 63)

# -- providers -----------------------------------------------------------------------------


async def create_provider(
    db: Database,
    *,
    name: str,
    kind: ProviderKind,
    base_url: str | None = None,
    api_key: str | None = None,
    enabled: bool = True,
) -> Provider:
    try:
        row = await db.fetchrow(
            "INSERT INTO providers (id, name, kind, base_url, api_key, enabled)"
            " VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
            uuid4(),
            name,
            kind,
            base_url,
            api_key,
            enabled,
        )
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(f"provider name {name!r} is taken", constraint=exc.constraint_name) from exc
    assert row is not None
    return provider_from_row(row)


async def get_provider(db: Database, provider_id: UUID) -> Provider | None:
    row = await db.fetchrow("SELECT * FROM providers WHERE id = $1", provider_id)
    return None if row is None else provider_from_row(row)


async def list_providers(db: Database) -> list[Provider]:
    rows = await db.fetch("SELECT * FROM providers ORDER BY name")
    return [provider_from_row(row) for row in rows]


async def update_provider(
    db: Database,
    provider_id: UUID,
    *,
    name: str | Unset = UNSET,
    kind: ProviderKind | Unset = UNSET,
    base_url: str | Unset | None = UNSET,
    api_key: str | Unset | None = UNSET,
    enabled: bool | Unset = UNSET,
) -> Provider:
    """Change the given fields; ``UNSET`` ones keep their value, ``None`` clears a nullable one."""
    try:
        row = await db.fetchrow(
            """
            UPDATE providers SET
                name = CASE WHEN $2 THEN $3::text ELSE name END,
                kind = CASE WHEN $4 THEN $5::text ELSE kind END,
                base_url = CASE WHEN $6 THEN $7::text ELSE base_url END,
                api_key = CASE WHEN $8 THEN $9::text ELSE api_key END,
                enabled = CASE WHEN $10 THEN $11::boolean ELSE enabled END
            WHERE id = $1
            RETURNING *
            """,
            provider_id,
            *change(name),
            *change(kind),
            *change(base_url),
            *change(api_key),
            *change(enabled),
        )
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(f"provider name {name!r} is taken", constraint=exc.constraint_name) from exc
    if row is None:
        raise NotFound("provider", provider_id)
    return provider_from_row(row)


async def delete_provider(db: Database, provider_id: UUID) -> None:
    """Delete a provider; refused with ``Conflict`` while model configs still use it."""
    try:
        found = await db.fetchval("DELETE FROM providers WHERE id = $1 RETURNING true", provider_id)
    except asyncpg.ForeignKeyViolationError as exc:
        raise Conflict(
            f"provider {provider_id} is used by model configs", constraint=exc.constraint_name
        ) from exc
    if found is None:
        raise NotFound("provider", provider_id)


# -- model configs -------------------------------------------------------------------------


async def create_model_config(
    db: Database,
    *,
    provider_id: UUID,
    name: str,
    model: str,
    context_limit: int,
    compression_threshold: float | None = None,
    options: Mapping[str, Any] | None = None,
    is_default: bool = False,
    tools: Sequence[str] | None = None,
) -> ModelConfig:
    """A new model config; with ``is_default`` it replaces the old default atomically.

    ``compression_threshold`` is a fraction of ``context_limit`` (0.7: a prompt past 70% of the
    context is summarised first); ``tools`` names the built-in tools its model may call. Either
    left ``None`` takes the column's default (migration 0005), so the default lives in one place.
    """
    config_id = uuid4()
    # Optional columns are left out of the INSERT, not sent as NULL: their DEFAULT then applies.
    optional: list[tuple[str, str, object]] = []
    if compression_threshold is not None:
        optional.append(("compression_threshold", "double precision", compression_threshold))
    if tools is not None:
        optional.append(("tools", "text[]", list(tools)))
    columns = ", ".join(
        ["id", "provider_id", "name", "model", "context_limit", "options", "is_default"]
        + [column for column, _, _ in optional]
    )
    values = ", ".join(
        ["$1", "$2", "$3", "$4", "$5", "$6::jsonb", "$7"]
        + [f"${n}::{sql_type}" for n, (_, sql_type, _) in enumerate(optional, start=8)]
    )
    query = f"INSERT INTO model_configs ({columns}) VALUES ({values}) RETURNING *"  # noqa: S608 - fixed column names

    async def create(conn: Connection) -> ModelConfig:
        if is_default:
            await _clear_default(conn)
        row = await conn.fetchrow(
            query,
            config_id,
            provider_id,
            name,
            model,
            context_limit,
            encode_json({} if options is None else options),
            is_default,
            *(value for _, _, value in optional),
        )
        assert row is not None
        return model_config_from_row(row)

    try:
        return await db.transaction(create)
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(
            f"model config name {name!r} is taken", constraint=exc.constraint_name
        ) from exc
    except asyncpg.ForeignKeyViolationError as exc:
        raise NotFound("provider", provider_id) from exc


async def get_model_config(db: Database, config_id: UUID) -> ModelConfig | None:
    row = await db.fetchrow("SELECT * FROM model_configs WHERE id = $1", config_id)
    return None if row is None else model_config_from_row(row)


async def get_default_model_config(db: Database) -> ModelConfig | None:
    row = await db.fetchrow("SELECT * FROM model_configs WHERE is_default")
    return None if row is None else model_config_from_row(row)


async def list_model_configs(db: Database, *, provider_id: UUID | None = None) -> list[ModelConfig]:
    rows = await db.fetch(
        "SELECT * FROM model_configs WHERE $1::uuid IS NULL OR provider_id = $1 ORDER BY name",
        provider_id,
    )
    return [model_config_from_row(row) for row in rows]


async def update_model_config(
    db: Database,
    config_id: UUID,
    *,
    provider_id: UUID | Unset = UNSET,
    name: str | Unset = UNSET,
    model: str | Unset = UNSET,
    context_limit: int | Unset = UNSET,
    compression_threshold: float | Unset = UNSET,
    options: Mapping[str, Any] | Unset = UNSET,
    tools: Sequence[str] | Unset = UNSET,
) -> ModelConfig:
    """Change the given fields (the default is changed with ``set_default_model_config``)."""
    options_changed, options_value = change(options)
    tools_changed, tools_value = change(tools)
    try:
        row = await db.fetchrow(
            """
            UPDATE model_configs SET
                provider_id = CASE WHEN $2 THEN $3::uuid ELSE provider_id END,
                name = CASE WHEN $4 THEN $5::text ELSE name END,
                model = CASE WHEN $6 THEN $7::text ELSE model END,
                context_limit = CASE WHEN $8 THEN $9::integer ELSE context_limit END,
                compression_threshold = CASE WHEN $10 THEN $11::double precision
                                             ELSE compression_threshold END,
                options = CASE WHEN $12 THEN $13::jsonb ELSE options END,
                tools = CASE WHEN $14 THEN $15::text[] ELSE tools END
            WHERE id = $1
            RETURNING *
            """,
            config_id,
            *change(provider_id),
            *change(name),
            *change(model),
            *change(context_limit),
            *change(compression_threshold),
            options_changed,
            encode_json(options_value),
            tools_changed,
            None if tools_value is None else list(tools_value),
        )
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(
            f"model config name {name!r} is taken", constraint=exc.constraint_name
        ) from exc
    except asyncpg.ForeignKeyViolationError as exc:
        raise NotFound("provider", provider_id) from exc
    if row is None:
        raise NotFound("model config", config_id)
    return model_config_from_row(row)


async def set_default_model_config(db: Database, config_id: UUID) -> ModelConfig:
    """Make ``config_id`` the one default, clearing the old default in the same transaction."""
    return await db.transaction(partial(_set_default, config_id=config_id))


async def _set_default(conn: Connection, *, config_id: UUID) -> ModelConfig:
    await _clear_default(conn, keep=config_id)
    row = await conn.fetchrow(
        "UPDATE model_configs SET is_default = true WHERE id = $1 RETURNING *", config_id
    )
    if row is None:
        raise NotFound("model config", config_id)  # rolls the cleared default back
    return model_config_from_row(row)


async def _clear_default(conn: Connection, *, keep: UUID | None = None) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _DEFAULT_LOCK_KEY)
    await conn.execute(
        "UPDATE model_configs SET is_default = false"
        " WHERE is_default AND ($1::uuid IS NULL OR id <> $1)",
        keep,
    )


async def delete_model_config(db: Database, config_id: UUID) -> None:
    """Delete a model config; chats that used it are left without one (ON DELETE SET NULL)."""
    found = await db.fetchval("DELETE FROM model_configs WHERE id = $1 RETURNING true", config_id)
    if found is None:
        raise NotFound("model config", config_id)
