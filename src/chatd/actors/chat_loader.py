"""Rebuild a chat's actor state from the database: what activation and restarts start from."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

from chatd.actors.clock import to_epoch
from chatd.domain.chat_state import ChatState, UserMessageRef
from chatd.domain.chat_status import ChatStatus
from chatd.domain.content_json import parts_from_json, tool_spec_from_json
from chatd.domain.conversation import (
    Message,
    SummaryPart,
    ToolCallPart,
    ToolResultPart,
    ToolSpec,
)
from chatd.domain.events import PendingToolCall, QueuedEntry
from chatd.domain.provider_failure import ProviderFailure
from chatd.domain.stream_parts import Usage
from chatd.store import chats
from chatd.store.database import Database
from chatd.store.records import Chat, QueuedMessage

_PAGE = 500


@dataclass(frozen=True, slots=True)
class ChatSetup:
    """What a chat was created with; it does not change while the chat lives."""

    owner_id: UUID
    system_prompt: str
    model_config_id: UUID | None
    dynamic_tools: tuple[ToolSpec, ...]
    # The chat's own allow-list of built-in tools; None: its model config's.
    tools: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class LoadedChat:
    """A chat as its actor keeps it: the history from the newest summary boundary on (what
    the next prompt needs), not the whole of it."""

    state: ChatState
    setup: ChatSetup
    history: tuple[Message, ...]
    message_seqs: tuple[int, ...]  # the seq of each history message, in order
    usages: tuple[Usage | None, ...] = ()  # what the provider reported for each (answers)
    summary: str = ""  # the newest summary's text
    untitled: bool = False


async def load_chat(db: Database, chat_id: UUID) -> LoadedChat | None:
    row = await chats.get_chat(db, chat_id)
    if row is None:
        return None
    rows = await chats.list_prompt_messages(db, chat_id, limit=_PAGE)
    page = rows
    while len(page) == _PAGE:
        page = await chats.list_messages(db, chat_id, after_seq=page[-1].seq, limit=_PAGE)
        rows.extend(page)
    # The newest boundary is among them (it comes after every message it covers).
    boundary = next((m for m in reversed(rows) if m.role == "summary"), None)
    summary = _summary_part(boundary.content) if boundary is not None else None
    summary_seq = 0 if boundary is None else boundary.seq
    history: list[Message] = []
    seqs: list[int] = []
    usages: list[Usage | None] = []
    users: list[UserMessageRef] = []
    for m in rows:
        if m.role == "summary":
            continue
        history.append(Message(m.role, parts_from_json(m.content)))
        seqs.append(m.seq)
        # Reported for a prompt that started at an older boundary: not this prompt's size.
        fresh = m.usage is not None and m.seq > summary_seq
        usages.append(_usage(m.usage) if fresh else None)
        if m.role == "user" and m.seq > summary_seq:
            users.append(UserMessageRef(m.id, m.seq))
    queue = tuple(queued_entry(q) for q in await chats.list_queue(db, chat_id))
    setup = ChatSetup(
        owner_id=row.owner_id,
        system_prompt=row.system_prompt,
        model_config_id=row.model_config_id,
        dynamic_tools=tuple(tool_spec_from_json(t) for t in row.dynamic_tools),
        tools=row.tools,
    )
    state = _state(row, users, queue, history, setup)
    if state.status in (ChatStatus.RUNNING, ChatStatus.INTERRUPTING):
        running, dynamic, seq = _tools_in_flight(history, seqs, setup)
        state = replace(state, running_tools=running, tools_message_seq=seq, pending_calls=dynamic)
    return LoadedChat(
        state=replace(state, summary_seq=summary_seq, compacting=row.compacting),
        setup=setup,
        history=tuple(history),
        message_seqs=tuple(seqs),
        usages=tuple(usages),
        summary="" if summary is None else summary.text,
        untitled=not row.title,
    )


def _summary_part(content: list[dict[str, object]]) -> SummaryPart | None:
    parts = parts_from_json(content)
    return parts[0] if parts and isinstance(parts[0], SummaryPart) else None


def _usage(data: Mapping[str, Any] | None) -> Usage | None:
    if not data:
        return None
    return Usage(
        int(data.get("input_tokens", 0)),
        int(data.get("output_tokens", 0)),
        int(data.get("cache_read_tokens", 0)),
        int(data.get("cache_write_tokens", 0)),
    )


def _tools_in_flight(
    history: list[Message], seqs: list[int], setup: ChatSetup
) -> tuple[tuple[PendingToolCall, ...], tuple[PendingToolCall, ...], int]:
    """A running chat whose last step's built-in calls have no results: chatd was running
    them. Returns those calls, the step's unanswered dynamic calls and the step's seq."""
    dynamic_names = {t.name for t in setup.dynamic_tools}
    every = unanswered_calls(history, None)
    builtin = tuple(c for c in every if c.name not in dynamic_names)
    if not builtin:
        return (), (), 0
    step = max(i for i, m in enumerate(history) if m.role == "assistant")
    return builtin, tuple(c for c in every if c.name in dynamic_names), seqs[step]


def _state(
    row: Chat,
    users: list[UserMessageRef],
    queue: tuple[QueuedEntry, ...],
    history: list[Message],
    setup: ChatSetup,
) -> ChatState:
    pending: tuple[PendingToolCall, ...] = ()
    if row.status is ChatStatus.REQUIRES_ACTION:
        pending = unanswered_calls(history, {t.name for t in setup.dynamic_tools})
    return ChatState(
        chat_id=row.id,
        status=row.status,
        archived=row.archived,
        history_version=row.history_version,
        generation_attempt=row.generation_attempt,
        retry_count=row.retry_count,
        retry_at=to_epoch(row.retry_at),
        last_error=None if row.last_error is None else ProviderFailure.from_json(row.last_error),
        action_deadline=to_epoch(row.action_deadline),
        pending_calls=pending,
        queue=queue,
        last_message_seq=row.last_message_seq,
        user_messages=tuple(users),
    )


def queued_entry(queued: QueuedMessage) -> QueuedEntry:
    text = "".join(str(p.get("text", "")) for p in queued.content if p.get("type") == "text")
    return QueuedEntry(queued.id, text)


def unanswered_calls(
    history: list[Message], dynamic: set[str] | None
) -> tuple[PendingToolCall, ...]:
    """The calls of the last assistant message that no later tool message answers: the
    dynamic ones (named in ``dynamic``), or all of them (``dynamic`` None)."""
    for index in range(len(history) - 1, -1, -1):
        if history[index].role == "assistant":
            answered = {
                p.call_id
                for later in history[index + 1 :]
                for p in later.parts
                if isinstance(p, ToolResultPart)
            }
            return tuple(
                PendingToolCall(p.id, p.name, p.arguments)
                for p in history[index].parts
                if isinstance(p, ToolCallPart)
                and (dynamic is None or p.name in dynamic)
                and p.id not in answered
            )
    return ()


async def current_queue(db: Database, chat: Chat) -> tuple[QueuedEntry, ...]:
    """The chat's queued messages. Only a busy chat (or one stopped in error) has any, so a
    waiting one costs no query."""
    if chat.status is ChatStatus.WAITING:
        return ()
    return tuple(queued_entry(q) for q in await chats.list_queue(db, chat.id))


async def pending_calls(db: Database, chat: Chat) -> tuple[PendingToolCall, ...]:
    """The dynamic calls the chat waits on (read from its last step); none, without a query,
    unless it is in requires_action."""
    if chat.status is not ChatStatus.REQUIRES_ACTION:
        return ()
    history = [
        Message(m.role, parts_from_json(m.content)) for m in await chats.list_last_step(db, chat.id)
    ]
    dynamic = {str(tool.get("name")) for tool in chat.dynamic_tools}
    return unanswered_calls(history, dynamic)


StateKey = tuple[ChatStatus, bool, int, int, int, int, tuple[UUID, ...]]
"""What tells two stored states of a chat apart: status, archived, history version, generation
attempt, retry count, last message seq and the ids of the queue. Every commit that publishes an
event changes one of them (a message its seq, a reset or a new episode the version or attempt,
a retry its count, an error or pending calls the status), so the actor compares it with the
stored one after a commit whose outcome is unknown, and a stream subscriber with its snapshot's."""


def state_key(state: ChatState) -> StateKey:
    """The key of a chat's state as its actor holds it."""
    return (
        state.status,
        state.archived,
        state.history_version,
        state.generation_attempt,
        state.retry_count,
        state.last_message_seq,
        tuple(entry.id for entry in state.queue),
    )


def stored_key(chat: Chat, queue: Iterable[QueuedMessage]) -> StateKey:
    """The key of a chat as read from the database (the same as ``state_key`` of the state an
    actor loads from that read)."""
    return (
        chat.status,
        chat.archived,
        chat.history_version,
        chat.generation_attempt,
        chat.retry_count,
        chat.last_message_seq,
        tuple(q.id for q in queue),
    )


async def read_stored_key(db: Database, chat_id: UUID) -> StateKey | None:
    """``stored_key`` of the chat now (None if it is gone): two reads, no transaction, enough
    to tell whether a commit whose outcome is unknown went through."""
    row = await chats.get_chat(db, chat_id)
    if row is None:
        return None
    return stored_key(row, await chats.list_queue(db, chat_id))
