"""Providers and model configs: the admin's configuration of which models answer chats.

Every write is checked here first, so a database CHECK never answers a request, and is followed
at once by the config cache's invalidation, announced to every worker before the answer, so the
next turn of any chat, on any worker, sees it (not after the cache's TTL). A provider's API key
goes in but never comes out: views carry ``has_api_key``.

The default model config answers chats created without one. While any model config exists,
exactly one is the default: the first one created becomes it, making another the default clears
the old one, the default cannot be un-defaulted (make another the default instead), and it
cannot be deleted while other model configs exist.

A model config names the built-in tools its model may call (``tools``, names from
``chatd.tools.registry``; a chat may name its own at creation) and when a chat's history is
summarised: ``compression_threshold`` is a fraction of ``context_limit`` (0.7: once a prompt
would pass 70% of the context). Both default to the database's defaults (migration 0005).

Everything here is admin-only except ``GET /model-configs``: every user needs the ids to create
chats with a chosen model.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, TypeVar
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg
import msgspec
from msgspec import UNSET, UnsetType

from chatd.store import providers
from chatd.store.errors import NotFound
from chatd.store.records import UNSET as KEEP
from chatd.store.records import ModelConfig, Provider, ProviderKind, Unset
from chatd.tools.registry import TOOL_NAMES, validate_tool_names
from chatd.web.decode import check_length, parse_uuid
from chatd.web.errors import ApiError
from chatd.web.routing import ApiRoutes, Call

routes = ApiRoutes("admin", tag="admin")

T = TypeVar("T")

# The limits of the schema's CHECKs (0001_initial.sql), enforced here first.
MAX_NAME_CHARS: Final = 100
MAX_MODEL_CHARS: Final = 200
MAX_API_KEY_CHARS: Final = 4096
MAX_BASE_URL_CHARS: Final = 2000  # no CHECK: a sane bound for a URL
MAX_CONTEXT_LIMIT: Final = 2**31 - 1  # an integer column
MAX_OPTIONS_BYTES: Final = 32_768
# Request fields chatd sets itself: an option of the same name would break every request.
RESERVED_OPTIONS: Final = frozenset(
    {"model", "messages", "system", "stream", "stream_options", "tools"}
)
# The CHECK on model_configs.tools and chats.tools (0005_agent.sql): names in one allow-list.
MAX_TOOL_NAMES: Final = 64

# -- documented field types ------------------------------------------------------------------

# A request's allow-list of built-in tools: the schema lists the names this chatd knows; a name
# outside them is refused by ``validate_tool_names`` naming ``tools[i]``.
ToolNames = Annotated[
    list[Annotated[str, msgspec.Meta(extra_json_schema={"enum": list(TOOL_NAMES)})]],
    msgspec.Meta(
        max_length=MAX_TOOL_NAMES,
        description="Built-in tools the model may call, by name (duplicates are dropped).",
    ),
]
# Documented only: ``_check_threshold`` enforces the bounds with its own rule.
CompressionThreshold = Annotated[
    float,
    msgspec.Meta(
        description=(
            "When a chat's history is summarised, as a fraction of context_limit: 0.7 summarises"
            " once a prompt would pass 70% of the context."
        ),
        extra_json_schema={"exclusiveMinimum": 0, "maximum": 1},
    ),
]

# -- payloads ------------------------------------------------------------------------------


class CreateProvider(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    kind: ProviderKind
    base_url: str | None = None
    api_key: str | None = None
    enabled: bool = True


class UpdateProvider(msgspec.Struct, forbid_unknown_fields=True):
    """Absent fields are kept; ``null`` clears ``base_url`` or ``api_key``."""

    name: str | UnsetType = UNSET
    kind: ProviderKind | UnsetType = UNSET
    base_url: str | UnsetType | None = UNSET
    api_key: str | UnsetType | None = UNSET
    enabled: bool | UnsetType = UNSET


class CreateModelConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Absent ``compression_threshold`` and ``tools`` take the database's defaults (0.7, and
    ``current_time`` with ``calculate``)."""

    provider_id: UUID
    name: str
    model: str
    context_limit: int
    compression_threshold: CompressionThreshold | UnsetType = UNSET
    options: dict[str, Any] = {}
    is_default: bool = False
    tools: ToolNames | UnsetType = UNSET


class UpdateModelConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Absent fields are kept; ``is_default: true`` makes this config the one default."""

    provider_id: UUID | UnsetType = UNSET
    name: str | UnsetType = UNSET
    model: str | UnsetType = UNSET
    context_limit: int | UnsetType = UNSET
    compression_threshold: CompressionThreshold | UnsetType = UNSET
    options: dict[str, Any] | UnsetType = UNSET
    is_default: bool | UnsetType = UNSET
    tools: ToolNames | UnsetType = UNSET


# -- views ---------------------------------------------------------------------------------


class ProviderView(msgspec.Struct):
    """A provider without its API key: ``has_api_key`` says whether one is set."""

    id: UUID
    name: str
    kind: ProviderKind
    base_url: str | None
    has_api_key: bool
    enabled: bool
    created_at: datetime
    updated_at: datetime


class ProviderList(msgspec.Struct):
    providers: list[ProviderView]


class ModelConfigView(msgspec.Struct):
    id: UUID
    provider_id: UUID
    name: str
    model: str
    context_limit: int
    compression_threshold: CompressionThreshold
    options: dict[str, Any]
    is_default: bool
    created_at: datetime
    updated_at: datetime
    # As stored: a name a later chatd no longer knows stays listed (and is ignored).
    tools: list[str]


class ModelConfigList(msgspec.Struct):
    model_configs: list[ModelConfigView]


def provider_view(row: Provider) -> ProviderView:
    return ProviderView(
        row.id,
        row.name,
        row.kind,
        row.base_url,
        row.has_api_key,
        row.enabled,
        row.created_at,
        row.updated_at,
    )


def model_config_view(row: ModelConfig) -> ModelConfigView:
    return ModelConfigView(
        row.id,
        row.provider_id,
        row.name,
        row.model,
        row.context_limit,
        row.compression_threshold,
        row.options,
        row.is_default,
        row.created_at,
        row.updated_at,
        list(row.tools),
    )


# -- checks --------------------------------------------------------------------------------


def _check_name(field: str, value: str, max_chars: int) -> None:
    if not value.strip():
        raise ApiError.invalid(field, f"1 to {max_chars} characters, not blank")
    check_length(field, value, max_chars)


def _check_base_url(value: str | None) -> None:
    if value is None:
        return
    check_length("base_url", value, MAX_BASE_URL_CHARS)
    if (
        not value.startswith(("http://", "https://"))
        or any(c.isspace() or not c.isprintable() for c in value)
        or not urlsplit(value).netloc
    ):
        raise ApiError.invalid("base_url", "an http(s) URL with a host and no spaces")


def _check_api_key(value: str | None) -> None:
    if value is None:
        return
    if not value:
        raise ApiError.invalid("api_key", "1 to 4096 characters; null for no key")
    check_length("api_key", value, MAX_API_KEY_CHARS)
    if any(c.isspace() or not c.isprintable() for c in value):
        # It goes into an HTTP header: a newline would break every request of the provider.
        raise ApiError.invalid("api_key", "printable characters without spaces")


def _check_provider_target(kind: ProviderKind, base_url: str | None) -> None:
    """An OpenAI-compatible server has no well-known address (a CHECK of the schema)."""
    if kind == "openai-compatible" and base_url is None:
        raise ApiError.invalid("base_url", "required for an openai-compatible provider")


def _check_context_limit(value: int) -> None:
    if not 1 <= value <= MAX_CONTEXT_LIMIT:
        raise ApiError.invalid("context_limit", f"an integer from 1 to {MAX_CONTEXT_LIMIT}")


def _check_threshold(value: float) -> None:
    if not 0 < value <= 1:
        raise ApiError.invalid("compression_threshold", "a number above 0 and at most 1")


def _check_options(value: dict[str, Any]) -> None:
    for key in value:
        if key in RESERVED_OPTIONS:
            raise ApiError.invalid(f"options.{key}", "is set by chatd and cannot be an option")
    if len(msgspec.json.encode(value)) > MAX_OPTIONS_BYTES:
        raise ApiError.invalid("options", f"at most {MAX_OPTIONS_BYTES} bytes as JSON")


def _tool_names(names: list[str]) -> tuple[str, ...]:
    """The allow-list as stored: checked, duplicates dropped (order kept)."""
    return validate_tool_names(names, "tools")


def _or_none(value: T | UnsetType) -> T | None:
    """msgspec's "absent" as the store's "the column's default"."""
    return None if isinstance(value, UnsetType) else value


def _keep(value: T | UnsetType) -> T | Unset:
    """msgspec's "absent" as the store's "leave the column as it is"."""
    return KEEP if isinstance(value, UnsetType) else value


def _unknown_provider(exc: NotFound) -> ApiError:
    """A body naming a missing provider is a bad field, not a missing resource."""
    if exc.kind == "provider":
        return ApiError.invalid("provider_id", "must name an existing provider")
    return ApiError.not_found(exc.kind)


# -- providers -----------------------------------------------------------------------------


@routes.http(
    "POST",
    "/providers",
    summary="Add a model provider (its API key is stored, never shown again)",
    body=CreateProvider,
    response=ProviderView,
    status=201,
    admin=True,
    errors=(409,),
)
async def create_provider(call: Call[CreateProvider]) -> ProviderView:
    body = call.body
    _check_name("name", body.name, MAX_NAME_CHARS)
    _check_base_url(body.base_url)
    _check_api_key(body.api_key)
    _check_provider_target(body.kind, body.base_url)
    row = await providers.create_provider(
        call.services.db,
        name=body.name,
        kind=body.kind,
        base_url=body.base_url,
        api_key=body.api_key,
        enabled=body.enabled,
    )
    call.services.engine.config.invalidate_provider(row.id)
    await call.services.engine.config.announce()
    return provider_view(row)


@routes.http(
    "GET",
    "/providers",
    summary="Every provider, by name",
    response=ProviderList,
    admin=True,
)
async def list_providers(call: Call[None]) -> ProviderList:
    rows = await providers.list_providers(call.services.db)
    return ProviderList([provider_view(row) for row in rows])


@routes.http(
    "GET",
    "/providers/<provider_id>",
    summary="One provider",
    response=ProviderView,
    admin=True,
    errors=(404,),
)
async def get_provider(call: Call[None], provider_id: str) -> ProviderView:
    row = await providers.get_provider(call.services.db, parse_uuid("provider_id", provider_id))
    if row is None:
        raise ApiError.not_found("provider")
    return provider_view(row)


@routes.http(
    "PATCH",
    "/providers/<provider_id>",
    summary="Change some of a provider's fields; api_key null removes the key",
    body=UpdateProvider,
    response=ProviderView,
    admin=True,
    errors=(404, 409),
)
async def update_provider(call: Call[UpdateProvider], provider_id: str) -> ProviderView:
    body, db = call.body, call.services.db
    target = parse_uuid("provider_id", provider_id)
    if all(isinstance(getattr(body, f), UnsetType) for f in body.__struct_fields__):
        raise ApiError.invalid("body", "give at least one field to change")
    if not isinstance(body.name, UnsetType):
        _check_name("name", body.name, MAX_NAME_CHARS)
    if not isinstance(body.base_url, UnsetType):
        _check_base_url(body.base_url)
    if not isinstance(body.api_key, UnsetType):
        _check_api_key(body.api_key)
    current = await providers.get_provider(db, target)
    if current is None:
        raise ApiError.not_found("provider")
    _check_provider_target(
        current.kind if isinstance(body.kind, UnsetType) else body.kind,
        current.base_url if isinstance(body.base_url, UnsetType) else body.base_url,
    )
    try:
        row = await providers.update_provider(
            db,
            target,
            name=_keep(body.name),
            kind=_keep(body.kind),
            base_url=_keep(body.base_url),
            api_key=_keep(body.api_key),
            enabled=_keep(body.enabled),
        )
    except asyncpg.CheckViolationError:
        # Only a concurrent change of kind or base_url gets here (both were checked above).
        raise ApiError(409, "conflict", "the provider changed meanwhile; retry") from None
    finally:
        call.services.engine.config.invalidate_provider(target)
        await call.services.engine.config.announce()
    return provider_view(row)


@routes.http(
    "DELETE",
    "/providers/<provider_id>",
    summary="Delete a provider that no model config uses",
    admin=True,
    errors=(404, 409),
)
async def delete_provider(call: Call[None], provider_id: str) -> None:
    target = parse_uuid("provider_id", provider_id)
    await providers.delete_provider(call.services.db, target)
    call.services.engine.config.invalidate_provider(target)
    await call.services.engine.config.announce()


# -- model configs -------------------------------------------------------------------------


def _check_model_fields(
    *,
    name: str | UnsetType = UNSET,
    model: str | UnsetType = UNSET,
    context_limit: int | UnsetType = UNSET,
    compression_threshold: float | UnsetType = UNSET,
    options: dict[str, Any] | UnsetType = UNSET,
    tools: list[str] | UnsetType = UNSET,
) -> None:
    if not isinstance(name, UnsetType):
        _check_name("name", name, MAX_NAME_CHARS)
    if not isinstance(model, UnsetType):
        _check_name("model", model, MAX_MODEL_CHARS)
    if not isinstance(context_limit, UnsetType):
        _check_context_limit(context_limit)
    if not isinstance(compression_threshold, UnsetType):
        _check_threshold(compression_threshold)
    if not isinstance(options, UnsetType):
        _check_options(options)
    if not isinstance(tools, UnsetType):
        validate_tool_names(tools, "tools")


@routes.http(
    "POST",
    "/model-configs",
    summary="Add a model config; the first one, or one with is_default, becomes the default",
    body=CreateModelConfig,
    response=ModelConfigView,
    status=201,
    admin=True,
    errors=(409,),
)
async def create_model_config(call: Call[CreateModelConfig]) -> ModelConfigView:
    body, db, cache = call.body, call.services.db, call.services.engine.config
    _check_model_fields(
        name=body.name,
        model=body.model,
        context_limit=body.context_limit,
        compression_threshold=body.compression_threshold,
        options=body.options,
        tools=body.tools,
    )
    is_default = body.is_default or await providers.get_default_model_config(db) is None
    try:
        row = await providers.create_model_config(
            db,
            provider_id=body.provider_id,
            name=body.name,
            model=body.model,
            context_limit=body.context_limit,
            compression_threshold=_or_none(body.compression_threshold),
            options=body.options,
            is_default=is_default,
            tools=None if isinstance(body.tools, UnsetType) else _tool_names(body.tools),
        )
    except NotFound as exc:
        raise _unknown_provider(exc) from None
    if row.is_default:
        cache.invalidate_model_configs()  # the old default's cached row is stale too
    else:
        cache.invalidate_model_config(row.id)
    await cache.announce()
    return model_config_view(row)


@routes.http(
    "GET",
    "/model-configs",
    summary="Every model config, by name (any user: chats are created with their ids)",
    response=ModelConfigList,
)
async def list_model_configs(call: Call[None]) -> ModelConfigList:
    rows = await providers.list_model_configs(call.services.db)
    return ModelConfigList([model_config_view(row) for row in rows])


@routes.http(
    "GET",
    "/model-configs/<config_id>",
    summary="One model config",
    response=ModelConfigView,
    admin=True,
    errors=(404,),
)
async def get_model_config(call: Call[None], config_id: str) -> ModelConfigView:
    row = await providers.get_model_config(call.services.db, parse_uuid("config_id", config_id))
    if row is None:
        raise ApiError.not_found("model config")
    return model_config_view(row)


@routes.http(
    "PATCH",
    "/model-configs/<config_id>",
    summary="Change some of a model config's fields, or make it the default",
    body=UpdateModelConfig,
    response=ModelConfigView,
    admin=True,
    errors=(404, 409),
)
async def update_model_config(call: Call[UpdateModelConfig], config_id: str) -> ModelConfigView:
    body, db, cache = call.body, call.services.db, call.services.engine.config
    target = parse_uuid("config_id", config_id)
    fields = {
        name: getattr(body, name)
        for name in body.__struct_fields__
        if name != "is_default" and not isinstance(getattr(body, name), UnsetType)
    }
    if not fields and isinstance(body.is_default, UnsetType):
        raise ApiError.invalid("body", "give at least one field to change")
    _check_model_fields(**{k: v for k, v in fields.items() if k != "provider_id"})
    row = await providers.get_model_config(db, target)
    if row is None:
        raise ApiError.not_found("model config")
    if body.is_default is False and row.is_default:
        raise ApiError.invalid(
            "is_default", "cannot be cleared: make another model config the default instead"
        )
    if "tools" in fields:
        fields["tools"] = _tool_names(fields["tools"])
    if fields:
        try:
            row = await providers.update_model_config(db, target, **fields)
        except NotFound as exc:
            raise _unknown_provider(exc) from None
        finally:
            cache.invalidate_model_config(target)
            await cache.announce()
    if body.is_default is True and not row.is_default:
        try:
            row = await providers.set_default_model_config(db, target)
        finally:
            cache.invalidate_model_configs()
            await cache.announce()
    return model_config_view(row)


@routes.http(
    "DELETE",
    "/model-configs/<config_id>",
    summary="Delete a model config; not the default while other model configs exist",
    admin=True,
    errors=(404, 409),
)
async def delete_model_config(call: Call[None], config_id: str) -> None:
    db = call.services.db
    target = parse_uuid("config_id", config_id)
    row = await providers.get_model_config(db, target)
    if row is None:
        raise ApiError.not_found("model config")
    if row.is_default and len(await providers.list_model_configs(db)) > 1:
        raise ApiError(
            409, "conflict", "this is the default model config: make another the default first"
        )
    try:
        await providers.delete_model_config(db, target)
    finally:
        call.services.engine.config.invalidate_model_config(target)
        await call.services.engine.config.announce()
