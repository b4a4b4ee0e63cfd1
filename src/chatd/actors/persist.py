"""Turn a decision into the rows that record it: one list of writes, one transaction."""

from __future__ import annotations

import dataclasses
from typing import Any, Final, assert_never
from uuid import UUID, uuid4

from chatd.actors.clock import to_datetime
from chatd.domain.chat_state import ChatState
from chatd.domain.content_json import parts_to_json
from chatd.domain.conversation import TextPart
from chatd.domain.effects import Decision, NewMessage, NotificationKind, Notify
from chatd.domain.stream_parts import Usage
from chatd.store.chats import (
    AddNotification,
    AppendMessage,
    ChatWrite,
    ClearQueue,
    Enqueue,
    SoftDeleteMessagesAfter,
    UpdateChat,
)

NOTIFICATION_EXCERPT_CHARS: Final = 200


def writes_for(before: ChatState, decision: Decision, *, owner_id: UUID) -> list[ChatWrite]:
    """The writes that take the stored chat from ``before`` to ``decision.state``, and the
    owner's inbox notifications the decision asks for (written with it, in its transaction)."""
    after = decision.state
    writes: list[ChatWrite] = []
    if decision.truncate_after_seq is not None:
        writes.append(SoftDeleteMessagesAfter(seq=decision.truncate_after_seq))
    writes.extend(_append(m) for m in decision.messages)
    if after.queue != before.queue:
        # Queues are short and change rarely: rewriting one is simpler than diffing it.
        writes.append(ClearQueue())
        writes.extend(
            Enqueue(id=q.id, position=i, content=[{"type": "text", "text": q.text}])
            for i, q in enumerate(after.queue, start=1)
        )
    update = _update(before, after, decision.messages)
    if update is not None:
        writes.append(update)
    for effect in decision.effects:
        if isinstance(effect, Notify):
            title, body = notification_text(effect.kind, decision)
            writes.append(
                AddNotification(
                    id=uuid4(),
                    user_id=owner_id,
                    kind=effect.kind,
                    title=_without_nul(title),
                    body=_without_nul(body),
                )
            )
    return writes


def notification_text(kind: NotificationKind, decision: Decision) -> tuple[str, str]:
    """Title and body of an inbox notification: enough to know whether to open the chat."""
    after = decision.state
    match kind:
        case "turn_finished":
            return "Reply ready", _excerpt(_final_text(decision))
        case "failed":
            return "Chat failed", "" if after.last_error is None else after.last_error.message
        case "action_required":
            names = dict.fromkeys(call.name for call in after.pending_calls)
            return "Tool results needed", _excerpt(", ".join(names))
        case _:
            assert_never(kind)


def _final_text(decision: Decision) -> str:
    """The text of the decision's last assistant message (the answer that ends the turn)."""
    for message in reversed(decision.messages):
        if message.role == "assistant":
            return "".join(p.text for p in message.parts if isinstance(p, TextPart))
    return ""


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    if len(flat) <= NOTIFICATION_EXCERPT_CHARS:
        return flat
    return flat[: NOTIFICATION_EXCERPT_CHARS - 1].rstrip() + "\u2026"


def _append(message: NewMessage) -> AppendMessage:
    return AppendMessage(
        id=message.id,
        seq=message.seq,
        role=message.role,
        content=[_without_nul(part) for part in parts_to_json(message.parts)],
        usage=usage_json(message.usage),
        history_version=message.history_version,
    )


def usage_json(usage: Usage | None) -> dict[str, Any] | None:
    return None if usage is None else dataclasses.asdict(usage)


def _update(
    before: ChatState, after: ChatState, messages: tuple[NewMessage, ...]
) -> UpdateChat | None:
    changes: dict[str, Any] = {}
    used = [m.usage for m in messages if m.usage is not None]
    if used:
        changes["add_input_tokens"] = sum(u.input_tokens for u in used)
        changes["add_output_tokens"] = sum(u.output_tokens for u in used)
    for name in (
        "status",
        "archived",
        "history_version",
        "generation_attempt",
        "retry_count",
        "compacting",
    ):
        if getattr(before, name) != getattr(after, name):
            changes[name] = getattr(after, name)
    if before.retry_at != after.retry_at:
        changes["retry_at"] = to_datetime(after.retry_at)
    if before.action_deadline != after.action_deadline:
        changes["action_deadline"] = to_datetime(after.action_deadline)
    if before.last_error != after.last_error:
        changes["last_error"] = None if after.last_error is None else after.last_error.to_json()
    return UpdateChat(**changes) if changes else None


def _without_nul(value: Any) -> Any:
    """PostgreSQL's jsonb refuses NUL characters; a model or tool that emits one must not make
    the whole commit fail, so it becomes U+FFFD (the edge refuses NUL in what users send)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {k: _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value
