"""The caller themself: who the token belongs to, and their custom prompt.

The custom prompt is added to the system text of every chat of the user, from the next turn on:
each write invalidates the config cache's entry at once. ``PUT`` with an empty prompt and
``DELETE`` both remove it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final
from uuid import UUID

import msgspec

from chatd.store import prompts
from chatd.web.decode import check_length
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


class PromptView(msgspec.Struct):
    """``prompt`` is empty and ``updated_at`` null when the user has no custom prompt."""

    prompt: str
    updated_at: datetime | None


@routes.http("GET", "/users/me", summary="The caller: id, name, admin flag", response=MeView)
async def get_me(call: Call[None]) -> MeView:
    return MeView(call.user.id, call.user.name, call.user.is_admin)


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
    return PromptView(stored.prompt, stored.updated_at)


@routes.http("DELETE", "/users/me/prompt", summary="Remove the caller's custom prompt")
async def delete_prompt(call: Call[None]) -> None:
    try:
        await prompts.delete_user_prompt(call.services.db, call.user.id)
    finally:
        call.services.engine.config.invalidate_user_prompt(call.user.id)
