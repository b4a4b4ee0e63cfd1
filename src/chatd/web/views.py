"""JSON shapes shared by several areas of the API (HTTP bodies and WebSocket frames)."""

from __future__ import annotations

from uuid import UUID

import msgspec

from chatd.domain.events import PendingToolCall


class QueuedView(msgspec.Struct):
    id: UUID
    text: str


class PendingCallView(msgspec.Struct):
    """A dynamic tool call to answer: ``arguments`` is the JSON text the model wrote."""

    id: str
    name: str
    arguments: str


def pending_call_view(call: PendingToolCall) -> PendingCallView:
    return PendingCallView(call.id, call.name, call.arguments)
