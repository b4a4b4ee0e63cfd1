"""The caller themself: who the token belongs to, their API tokens, their custom prompt, and
the tokens their chats' model calls used.

A token revoked here is refused by this process from the next request on, the one revoking it
included (``TokenCache.revoke``); the other workers are told at once and forget the tokens
they cached (``ConfigCache.tokens_revoked``); within ``auth_cache_ttl_s`` at worst, should the
notification be lost.

The custom prompt is added to the system text of every chat of the user, from the next turn on:
each write invalidates the config cache's entry at once. ``PUT`` with an empty prompt and
``DELETE`` both remove it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final
from uuid import UUID

import msgspec

from chatd.store import prompts, users
from chatd.store.errors import NotFound
from chatd.store.records import ApiToken
from chatd.web.decode import check_length, parse_uuid
from chatd.web.routing import ApiRoutes, Call

routes = ApiRoutes("me", tag="me")

# The CHECK on user_prompts.prompt: a larger max_user_prompt_chars cannot be stored.
STORED_PROMPT_MAX_CHARS: Final = 100_000


class PromptBody(msgspec.Struct, forbid_unknown_fields=True):
    prompt: str


class MeView(msgspec.Struct):
    id: UUID
    name: str
    is_admin: bool


class TokenView(msgspec.Struct):
    """A token's metadata; its secret was shown once, when it was made."""

    id: UUID
    label: str
    created_at: datetime
    last_used_at: datetime | None  # recorded at most about once a minute
    revoked_at: datetime | None


class TokenList(msgspec.Struct):
    tokens: list[TokenView]


class UsageView(msgspec.Struct):
    """Tokens the providers reported for every model call of the caller's chats (answers,
    summaries, titles), deleted chats included."""

    input_tokens: int
    output_tokens: int


class PromptView(msgspec.Struct):
    """``prompt`` is empty and ``updated_at`` null when the user has no custom prompt."""

    prompt: str
    updated_at: datetime | None


@routes.http("GET", "/users/me", summary="The caller: id, name, admin flag", response=MeView)
async def get_me(call: Call[None]) -> MeView:
    return MeView(call.user.id, call.user.name, call.user.is_admin)


def token_view(token: ApiToken) -> TokenView:
    return TokenView(token.id, token.label, token.created_at, token.last_used_at, token.revoked_at)


@routes.http(
    "GET",
    "/users/me/tokens",
    summary="The caller's API tokens, revoked ones included (never their secrets)",
    response=TokenList,
)
async def list_tokens(call: Call[None]) -> TokenList:
    found = await users.list_api_tokens(call.services.db, call.user.id)
    return TokenList([token_view(t) for t in found])


@routes.http(
    "DELETE",
    "/users/me/tokens/<token_id>",
    summary="Revoke one of the caller's API tokens (it may be the one in use); it fails at once",
    errors=(404,),
)
async def revoke_token(call: Call[None], token_id: str) -> None:
    ident = parse_uuid("token_id", token_id)
    config = call.services.engine.config
    try:
        await call.services.tokens.revoke(ident, user_id=call.user.id)
    except NotFound:
        raise  # nothing was revoked: nothing to tell the other workers
    except BaseException:
        config.tokens_revoked()  # the revocation may have committed all the same
        await config.announce()
        raise
    config.tokens_revoked()
    await config.announce()


@routes.http(
    "GET",
    "/users/me/usage",
    summary="The caller's token usage over all their chats, deleted ones included",
    response=UsageView,
)
async def get_usage(call: Call[None]) -> UsageView:
    usage = await users.get_usage(call.services.db, call.user.id)
    return UsageView(usage.input_tokens, usage.output_tokens)


@routes.http(
    "GET",
    "/users/me/prompt",
    summary="The caller's custom prompt (empty when none)",
    response=PromptView,
)
async def get_prompt(call: Call[None]) -> PromptView:
    found = await prompts.get_user_prompt(call.services.db, call.user.id)
    return PromptView("", None) if found is None else PromptView(found.prompt, found.updated_at)


@routes.http(
    "PUT",
    "/users/me/prompt",
    summary="Set the caller's custom prompt, added to their chats' system text (empty removes)",
    body=PromptBody,
    response=PromptView,
)
async def put_prompt(call: Call[PromptBody]) -> PromptView:
    settings, db, user = call.services.settings, call.services.db, call.user
    text = call.body.prompt
    check_length("prompt", text, min(settings.max_user_prompt_chars, STORED_PROMPT_MAX_CHARS))
    try:
        if not text:
            await prompts.delete_user_prompt(db, user.id)
            return PromptView("", None)
        stored = await prompts.put_user_prompt(db, user.id, text)
    finally:
        call.services.engine.config.invalidate_user_prompt(user.id)
        await call.services.engine.config.announce()
    return PromptView(stored.prompt, stored.updated_at)


@routes.http("DELETE", "/users/me/prompt", summary="Remove the caller's custom prompt")
async def delete_prompt(call: Call[None]) -> None:
    try:
        await prompts.delete_user_prompt(call.services.db, call.user.id)
    finally:
        call.services.engine.config.invalidate_user_prompt(call.user.id)
        await call.services.engine.config.announce()
