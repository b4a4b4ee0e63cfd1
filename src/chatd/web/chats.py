"""Chats, their messages, and the commands that steer a chat's run.

Every command goes through the Router to the chat's actor and is answered after its commit;
reads go to the store. Another user's chat is a 404, like a missing one.

Ownership is checked against the process's ``ChatOwners`` (``chatd.store.chat_owners``): an
owner never changes, so once the edge has seen a chat (created it, read it, or checked it
once), its commands and stream handshakes reach the actor without a query. A chat deleted here
is forgotten there; one deleted through another worker may still pass the check here, and its
actor then answers the command with the same 404.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID, uuid4

import msgspec

from chatd.actors.chat_actor import ChatCreatedReply, CreateChatRequest
from chatd.actors.chat_loader import current_queue, pending_calls
from chatd.domain.chat_status import ChatStatus
from chatd.domain.conversation import ToolSpec
from chatd.domain.effects import MessageAccepted
from chatd.domain.mailbox import (
    Compact,
    DeleteChat,
    DeleteQueued,
    EditMessage,
    Interrupt,
    PromoteQueued,
    SendMessage,
    SetArchived,
    SubmitToolResults,
    ToolResult,
)
from chatd.domain.watch_events import ChatDiffStatusChanged, ChatTitleChanged
from chatd.store import chats, diff_status, idempotency
from chatd.store.records import Chat, ChatMessage, DiffStatus, PullRequestState
from chatd.tools.registry import validate_tool_names
from chatd.web.admin import ToolNames
from chatd.web.decode import check_length, parse_uuid
from chatd.web.errors import ApiError
from chatd.web.routing import ApiRoutes, Call, QueryParam
from chatd.web.views import PendingCallView, QueuedView, pending_call_view

routes = ApiRoutes("chats", tag="chats")

_EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}

# -- payloads ------------------------------------------------------------------------------


class ToolDeclaration(msgspec.Struct, forbid_unknown_fields=True):
    """A tool the client runs itself: the model may call it, the client answers."""

    name: str
    description: str = ""
    input_schema: dict[str, Any] = msgspec.field(default_factory=lambda: dict(_EMPTY_SCHEMA))


class CreateChat(msgspec.Struct, forbid_unknown_fields=True):
    text: str
    title: str = ""
    system_prompt: str = ""
    model_config_id: UUID | None = None
    dynamic_tools: list[ToolDeclaration] = []
    # The chat's own allow-list of built-in tools; absent or null: its model config's.
    tools: ToolNames | None = None


class UpdateChat(msgspec.Struct, forbid_unknown_fields=True):
    title: str | None = None
    archived: bool | None = None


class SendMessageBody(msgspec.Struct, forbid_unknown_fields=True):
    text: str
    busy_behavior: Literal["queue", "interrupt"] = "queue"


class EditMessageBody(msgspec.Struct, forbid_unknown_fields=True):
    text: str


class ToolResultBody(msgspec.Struct, forbid_unknown_fields=True):
    call_id: str
    output: str  # JSON text


class ToolResultsBody(msgspec.Struct, forbid_unknown_fields=True):
    results: list[ToolResultBody]


class DiffStatusBody(msgspec.Struct, forbid_unknown_fields=True):
    branch: str | None = None
    remote: str | None = None
    pull_request_url: str | None = None
    pull_request_state: PullRequestState | None = None
    additions: int = 0
    deletions: int = 0
    changed_files: int = 0


# -- views ---------------------------------------------------------------------------------


class ChatView(msgspec.Struct):
    id: UUID
    title: str
    status: ChatStatus
    archived: bool
    history_version: int
    generation_attempt: int
    last_message_seq: int
    retry_count: int
    retry_at: datetime | None
    last_error: dict[str, Any] | None
    action_deadline: datetime | None
    # The chat's own model config; null: it follows the default model config, whichever that
    # is at each turn.
    model_config_id: UUID | None
    # The model config that answers the chat now: its own, or the current default; null when
    # there is none (the chat's next turn would fail with a config error).
    effective_model_config_id: UUID | None
    system_prompt: str
    dynamic_tools: list[dict[str, Any]]
    # The chat's own allow-list of built-in tools; null: its model config's.
    tools: list[str] | None
    # Tokens the provider reported for every model call made for the chat.
    input_tokens: int
    output_tokens: int
    created_at: datetime
    updated_at: datetime


class ChatDetail(ChatView):
    """One chat with what a client needs to act on it: its queue and the calls it waits on."""

    queue: list[QueuedView] = []
    pending_tool_calls: list[PendingCallView] = []
    # What the caller should know about the chat just created (only in create's answer):
    # today, that no model config exists, so its answer will fail until one is added.
    warnings: list[str] = []


NO_MODEL_CONFIG = (
    "no model config exists: this chat's answer fails (a config error) until an admin adds a"
    " provider (POST /api/v1/providers) and a model config (POST /api/v1/model-configs), or"
    " runs `chatd serve --demo` for the fake model; then send the message again"
)


class ChatPage(msgspec.Struct):
    chats: list[ChatView]
    next_cursor: str | None


class MessageView(msgspec.Struct):
    id: UUID
    seq: int
    role: str
    content: list[dict[str, Any]]
    usage: dict[str, Any] | None
    history_version: int
    created_at: datetime


class MessagePage(msgspec.Struct):
    messages: list[MessageView]
    next_after_seq: int | None


class Accepted(msgspec.Struct):
    """``queued``: the chat was busy, the message waits in its queue under ``message_id``."""

    message_id: UUID
    queued: bool


class Compacting(msgspec.Struct):
    """A summary is being made: the chat is ``running`` until it is committed."""

    compacting: bool


class DiffStatusView(msgspec.Struct):
    chat_id: UUID
    branch: str | None
    remote: str | None
    pull_request_url: str | None
    pull_request_state: PullRequestState | None
    additions: int
    deletions: int
    changed_files: int
    updated_at: datetime | None


def chat_view(chat: Chat, default_config: UUID | None) -> ChatView:
    return ChatView(**_chat_fields(chat, default_config))


async def default_config_id(call: Call[Any]) -> UUID | None:
    """The default model config's id now (from the process's config cache: no query while
    cached), or None when there is no model config."""
    config = await call.services.engine.config.model_config(None)
    return None if config is None else config.id


def _chat_fields(chat: Chat, default_config: UUID | None) -> dict[str, Any]:
    return {
        "id": chat.id,
        "title": chat.title,
        "status": chat.status,
        "archived": chat.archived,
        "history_version": chat.history_version,
        "generation_attempt": chat.generation_attempt,
        "last_message_seq": chat.last_message_seq,
        "retry_count": chat.retry_count,
        "retry_at": chat.retry_at,
        "last_error": chat.last_error,
        "action_deadline": chat.action_deadline,
        "model_config_id": chat.model_config_id,
        "effective_model_config_id": chat.model_config_id or default_config,
        "system_prompt": chat.system_prompt,
        "dynamic_tools": chat.dynamic_tools,
        "tools": None if chat.tools is None else list(chat.tools),
        "input_tokens": chat.input_tokens,
        "output_tokens": chat.output_tokens,
        "created_at": chat.created_at,
        "updated_at": chat.updated_at,
    }


def message_view(message: ChatMessage) -> MessageView:
    return MessageView(
        message.id,
        message.seq,
        message.role,
        message.content,
        message.usage,
        message.history_version,
        message.created_at,
    )


def diff_status_view(chat_id: UUID, status: DiffStatus | None) -> DiffStatusView:
    if status is None:
        return DiffStatusView(chat_id, None, None, None, None, 0, 0, 0, None)
    return DiffStatusView(
        chat_id,
        status.branch,
        status.remote,
        status.pull_request_url,
        status.pull_request_state,
        status.additions,
        status.deletions,
        status.changed_files,
        status.updated_at,
    )


# -- helpers -------------------------------------------------------------------------------


async def owned_chat(call: Call[Any], chat_id: str) -> Chat:
    """The caller's chat as stored now, or the 404 a missing chat gets (for the reads)."""
    chat = await chats.get_chat(call.services.db, parse_uuid("chat_id", chat_id), call.user.id)
    if chat is None:
        raise ApiError.not_found("chat")
    call.services.chat_owners.remember(chat.id, chat.owner_id)
    return chat


async def owned_chat_id(call: Call[Any], chat_id: str) -> UUID:
    """The id of a chat of the caller, or the 404 a missing chat gets; no query once the
    chat's owner is known (for the commands, which the chat's actor reads from its state)."""
    ident = parse_uuid("chat_id", chat_id)
    if await call.services.chat_owners.owner(ident) != call.user.id:
        raise ApiError.not_found("chat")
    return ident


async def _ask(call: Call[Any], chat_id: UUID, command: object) -> object:
    return await call.services.engine.router.ask(chat_id, command)


def _accepted(reply: object) -> Accepted:
    assert isinstance(reply, MessageAccepted)
    return Accepted(reply.message_id, reply.queued)


def _check_text(call: Call[Any], text: str) -> None:
    check_length("text", text, call.services.settings.max_message_chars)


# -- chats ---------------------------------------------------------------------------------


async def _recover_create(call: Call[CreateChat]) -> object:
    """The answer to a retry whose key's creation committed: the chat as stored now (404 if
    it was deleted since)."""
    chat = await chats.get_chat(call.services.db, call.new_id("chat"), call.user.id)
    if chat is None:
        raise ApiError.not_found("chat")
    call.services.chat_owners.remember(chat.id, chat.owner_id)
    return await _detail(call, chat)


# Random ids tried for one that lands on a shard served here: with k of n shards held, the
# chance that none does is (1 - k/n)^tries, about 2e-7 for one shard in 64 after 1,000.
_LOCAL_ID_TRIES = 1000


def _new_chat_id(call: Call[Any]) -> UUID:
    """A new chat's id, on a shard this worker serves when it serves any, so that the chat's
    commands, starting with its creation, need no forwarding. With an Idempotency-Key the id
    is the key's (the same for every attempt) and goes wherever its shard is served."""
    if call.idempotency_seed is not None:
        return call.new_id("chat")
    supervisor = call.services.engine.supervisor
    if not supervisor.fences:
        return uuid4()
    for _ in range(_LOCAL_ID_TRIES):
        chat_id = uuid4()
        if supervisor.owns(chat_id):
            return chat_id
    return uuid4()


@routes.http(
    "POST",
    "/chats",
    summary="Create a chat with its first message; the answer starts at once",
    body=CreateChat,
    response=ChatDetail,
    status=201,
    errors=(429, 503),
    commits_key=True,
    recover=_recover_create,
)
async def create_chat(call: Call[CreateChat]) -> ChatDetail:
    body, settings = call.body, call.services.settings
    _check_text(call, body.text)
    check_length("title", body.title, settings.max_title_chars)
    check_length("system_prompt", body.system_prompt, settings.max_system_prompt_chars)
    # Without model_config_id the chat follows the default (the one answering it is in
    # effective_model_config_id); with none at all, the answer says so (warnings).
    config = await call.services.engine.config.model_config(body.model_config_id)
    if config is None and body.model_config_id is not None:
        raise ApiError.invalid("model_config_id", "must name an existing model config")
    tools = None if body.tools is None else validate_tool_names(body.tools, "tools")
    chat_id = _new_chat_id(call)
    request = CreateChatRequest(
        owner_id=call.user.id,
        message_id=call.new_id("message"),
        text=body.text,
        title=body.title,
        system_prompt=body.system_prompt,
        model_config_id=body.model_config_id,
        dynamic_tools=tuple(
            ToolSpec(t.name, t.description, t.input_schema) for t in body.dynamic_tools
        ),
        tools=tools,
    )
    reply = await _ask(call, chat_id, call.keyed(request))
    assert isinstance(reply, ChatCreatedReply)
    call.services.chat_owners.remember(chat_id, call.user.id)
    # A new chat has no queue and no pending calls yet.
    warnings = [NO_MODEL_CONFIG] if config is None else []
    fields = _chat_fields(reply.chat, None if config is None else config.id)
    return ChatDetail(**fields, warnings=warnings)


@routes.http(
    "GET",
    "/chats",
    summary="The caller's chats, most recently updated first",
    response=ChatPage,
    query=(
        QueryParam("limit", "integer", "page size (default_page_size, at most max_page_size)"),
        QueryParam("cursor", "string", "next_cursor of the previous page"),
        QueryParam("archived", "boolean", "only archived (true) or unarchived (false) chats"),
    ),
)
async def list_chats(call: Call[None]) -> ChatPage:
    settings = call.services.settings
    limit = call.query.integer(
        "limit", settings.default_page_size, minimum=1, maximum=settings.max_page_size
    )
    page = await chats.list_chats(
        call.services.db,
        call.user.id,
        archived=call.query.boolean("archived"),
        limit=limit,
        cursor=call.query.cursor(),
    )
    cursor = None if page.next_cursor is None else page.next_cursor.encode()
    default = await default_config_id(call)
    return ChatPage([chat_view(c, default) for c in page.chats], cursor)


@routes.http(
    "GET",
    "/chats/<chat_id>",
    summary="One chat, its queue and its pending tool calls",
    response=ChatDetail,
    errors=(404,),
)
async def get_chat(call: Call[None], chat_id: str) -> ChatDetail:
    chat = await owned_chat(call, chat_id)
    return await _detail(call, chat)


async def _detail(call: Call[Any], chat: Chat) -> ChatDetail:
    db = call.services.db
    queue = await current_queue(db, chat)
    calls = await pending_calls(db, chat)
    return ChatDetail(
        **_chat_fields(chat, await default_config_id(call)),
        queue=[QueuedView(e.id, e.text) for e in queue],
        pending_tool_calls=[pending_call_view(c) for c in calls],
    )


@routes.http(
    "PATCH",
    "/chats/<chat_id>",
    summary="Rename, archive or unarchive a chat",
    body=UpdateChat,
    response=ChatDetail,
    errors=(404,),
)
async def update_chat(call: Call[UpdateChat], chat_id: str) -> ChatDetail:
    body = call.body
    if body.title is None and body.archived is None:
        raise ApiError.invalid("body", "give title, archived or both")
    if body.title is not None:
        check_length("title", body.title, call.services.settings.max_title_chars)
    chat = await owned_chat(call, chat_id)
    if body.archived is not None and body.archived != chat.archived:
        await _ask(call, chat.id, SetArchived(body.archived))
    if body.title is not None and body.title != chat.title:
        renamed = await chats.rename_chat(call.services.db, chat.id, call.user.id, body.title)
        if renamed is None:
            raise ApiError.not_found("chat")
        call.services.engine.watch.publish(call.user.id, ChatTitleChanged(chat.id, body.title))
    updated = await chats.get_chat(call.services.db, chat.id)
    assert updated is not None
    return await _detail(call, updated)


@routes.http(
    "DELETE",
    "/chats/<chat_id>",
    summary="Delete a chat with its history; a run in progress is stopped first",
    errors=(404,),
    commits_key=True,
)
async def delete_chat(call: Call[None], chat_id: str) -> None:
    ident = await owned_chat_id(call, chat_id)
    await _ask(call, ident, call.keyed(DeleteChat()))
    # Else this edge would keep passing the chat's ownership check, and the routes that go to
    # the store directly (diff status) would answer for a chat that is gone.
    call.services.chat_owners.forget(ident)


async def _recover_compact(call: Call[None], chat_id: str) -> Compacting:
    """The answer to a retry whose key's compaction committed: it was started."""
    await owned_chat_id(call, chat_id)
    return Compacting(compacting=True)


@routes.http(
    "POST",
    "/chats/<chat_id>/compact",
    summary=(
        "Summarize the chat's history now: its next prompts start from the summary"
        " (409 while it is busy or when there is nothing to summarize)"
    ),
    response=Compacting,
    status=202,
    errors=(404, 409, 429),
    commits_key=True,
    recover=_recover_compact,
)
async def compact(call: Call[None], chat_id: str) -> Compacting:
    ident = await owned_chat_id(call, chat_id)
    await _ask(call, ident, call.keyed(Compact()))
    return Compacting(compacting=True)


# -- messages ------------------------------------------------------------------------------


@routes.http(
    "GET",
    "/chats/<chat_id>/messages",
    summary="Page through a chat's history in order",
    response=MessagePage,
    query=(
        QueryParam("after_seq", "integer", "only messages after this seq (default 0)"),
        QueryParam("limit", "integer", "page size (default_page_size, at most max_page_size)"),
    ),
    errors=(404,),
)
async def list_messages(call: Call[None], chat_id: str) -> MessagePage:
    chat = await owned_chat(call, chat_id)
    settings = call.services.settings
    after = call.query.integer("after_seq", 0, minimum=0, maximum=2**62)
    limit = call.query.integer(
        "limit", settings.default_page_size, minimum=1, maximum=settings.max_page_size
    )
    found = await chats.list_messages(call.services.db, chat.id, after_seq=after, limit=limit)
    more = len(found) == limit and found[-1].seq < chat.last_message_seq
    return MessagePage([message_view(m) for m in found], found[-1].seq if more else None)


async def _recover_message(call: Call[Any], chat_id: str, **_target: str) -> object:
    """The answer to a retry whose key's send (or edit) committed: its message as it stands
    now, queued or in the history (live or truncated since). Neither: it was queued and the
    entry dropped since (deleted, or cleared by an edit), so it was accepted as queued."""
    ident = await owned_chat_id(call, chat_id)
    message_id = call.new_id("message")
    db, owner = call.services.db, call.user.id
    queue = await chats.list_queue(db, ident)
    if any(q.id == message_id for q in queue):
        return Accepted(message_id, queued=True)
    in_history = await idempotency.effect_exists(db, owner_id=owner, ids=[message_id])
    return Accepted(message_id, queued=not in_history)


@routes.http(
    "POST",
    "/chats/<chat_id>/messages",
    summary="Send a message; a busy chat queues it or is interrupted for it (busy_behavior)",
    body=SendMessageBody,
    response=Accepted,
    status=202,
    errors=(404, 409, 429),
    commits_key=True,
    recover=_recover_message,
)
async def send_message(call: Call[SendMessageBody], chat_id: str) -> Accepted:
    _check_text(call, call.body.text)
    ident = await owned_chat_id(call, chat_id)
    command = SendMessage(call.new_id("message"), call.body.text, call.body.busy_behavior)
    return _accepted(await _ask(call, ident, call.keyed(command)))


@routes.http(
    "PATCH",
    "/chats/<chat_id>/messages/<message_id>",
    summary="Edit a user message: the history after it is dropped and the answer regenerated",
    body=EditMessageBody,
    response=Accepted,
    status=202,
    errors=(404, 409, 429),
    commits_key=True,
    recover=_recover_message,
)
async def edit_message(call: Call[EditMessageBody], chat_id: str, message_id: str) -> Accepted:
    _check_text(call, call.body.text)
    target = parse_uuid("message_id", message_id)
    ident = await owned_chat_id(call, chat_id)
    command = EditMessage(target, call.new_id("message"), call.body.text)
    return _accepted(await _ask(call, ident, call.keyed(command)))


# -- steering ------------------------------------------------------------------------------


@routes.http(
    "POST",
    "/chats/<chat_id>/interrupt",
    summary="Stop the current run, keeping its output",
    errors=(404, 409),
    commits_key=True,
)
async def interrupt(call: Call[None], chat_id: str) -> None:
    await _ask(call, await owned_chat_id(call, chat_id), call.keyed(Interrupt()))


@routes.http(
    "POST",
    "/chats/<chat_id>/tool-results",
    summary="Answer the chat's pending dynamic tool calls, all at once",
    body=ToolResultsBody,
    errors=(404, 409),
    commits_key=True,
)
async def submit_tool_results(call: Call[ToolResultsBody], chat_id: str) -> None:
    ident = await owned_chat_id(call, chat_id)
    results = tuple(ToolResult(r.call_id, r.output) for r in call.body.results)
    await _ask(call, ident, call.keyed(SubmitToolResults(results)))


@routes.http(
    "DELETE",
    "/chats/<chat_id>/queue/<queued_id>",
    summary="Drop a queued message",
    errors=(404,),
    commits_key=True,
)
async def delete_queued(call: Call[None], chat_id: str, queued_id: str) -> None:
    target = parse_uuid("queued_id", queued_id)
    await _ask(call, await owned_chat_id(call, chat_id), call.keyed(DeleteQueued(target)))


@routes.http(
    "POST",
    "/chats/<chat_id>/queue/<queued_id>/promote",
    summary="Move a queued message to the front of the queue",
    errors=(404,),
    commits_key=True,
)
async def promote_queued(call: Call[None], chat_id: str, queued_id: str) -> None:
    target = parse_uuid("queued_id", queued_id)
    await _ask(call, await owned_chat_id(call, chat_id), call.keyed(PromoteQueued(target)))


# -- diff status ---------------------------------------------------------------------------


@routes.http(
    "PUT",
    "/chats/<chat_id>/diff-status",
    summary="Record the chat's branch, pull request and change counts (from an integration)",
    body=DiffStatusBody,
    response=DiffStatusView,
    errors=(404,),
)
async def put_diff_status(call: Call[DiffStatusBody], chat_id: str) -> DiffStatusView:
    body = call.body
    _check_diff(body)
    ident = await owned_chat_id(call, chat_id)
    status, changed = await diff_status.upsert_diff_status(
        call.services.db,
        ident,
        branch=body.branch,
        remote=body.remote,
        pull_request_url=body.pull_request_url,
        pull_request_state=body.pull_request_state,
        additions=body.additions,
        deletions=body.deletions,
        changed_files=body.changed_files,
    )
    if changed:
        event = ChatDiffStatusChanged(
            ident,
            status.branch,
            status.remote,
            status.pull_request_url,
            status.pull_request_state,
            status.additions,
            status.deletions,
            status.changed_files,
        )
        call.services.engine.watch.publish(call.user.id, event)
    return diff_status_view(ident, status)


def _check_diff(body: DiffStatusBody) -> None:
    for name, limit in (("branch", 500), ("remote", 2000), ("pull_request_url", 2000)):
        value = getattr(body, name)
        if value is not None:
            check_length(name, value, limit)
    url = body.pull_request_url
    if url is not None and (
        not url.startswith(("http://", "https://")) or any(c.isspace() for c in url)
    ):
        raise ApiError.invalid("pull_request_url", "an http(s) URL without spaces")
    for name in ("additions", "deletions", "changed_files"):
        if not 0 <= getattr(body, name) <= 2**31 - 1:
            raise ApiError.invalid(name, "an integer from 0 to 2147483647")


@routes.http(
    "GET",
    "/chats/<chat_id>/diff-status",
    summary="The chat's last reported diff status (empty until one is reported)",
    response=DiffStatusView,
    errors=(404,),
)
async def get_diff_status(call: Call[None], chat_id: str) -> DiffStatusView:
    ident = await owned_chat_id(call, chat_id)
    return diff_status_view(ident, await diff_status.get_diff_status(call.services.db, ident))
