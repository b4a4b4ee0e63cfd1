"""chatd's Python client: ``AsyncClient`` (trio or asyncio) and ``Client`` (blocking).

Requests carry an ``Idempotency-Key`` and are retried safely; errors are typed
(``chatd.client.errors``); ``stream(chat_id)`` yields typed events
(``chatd.client.events``) and resumes by itself after a dropped connection, each event once.
"""

from chatd.client._async import AsyncClient, ChatStream, Feed
from chatd.client._sync import Client, SyncFeed
from chatd.client.errors import (
    ApiError,
    ChatdError,
    Conflict,
    ConnectionFailed,
    Forbidden,
    GatewayTimeout,
    IdempotencyKeyReused,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
)
from chatd.client.events import (
    ActionRequiredEvent,
    Cursor,
    ErrorEvent,
    HistoryResetEvent,
    MessageEvent,
    MessagePartEvent,
    PreviewResetEvent,
    QueueUpdateEvent,
    Reconnected,
    RetryEvent,
    StatusEvent,
    StreamEvent,
    TextPart,
    ToolCall,
    UnknownEvent,
    WatchEvent,
)
from chatd.client.models import NewToken, User

__all__ = [
    "ActionRequiredEvent",
    "ApiError",
    "AsyncClient",
    "ChatStream",
    "ChatdError",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "Cursor",
    "ErrorEvent",
    "Feed",
    "Forbidden",
    "GatewayTimeout",
    "HistoryResetEvent",
    "IdempotencyKeyReused",
    "InvalidRequest",
    "MessageEvent",
    "MessagePartEvent",
    "NewToken",
    "NotFound",
    "PayloadTooLarge",
    "PreviewResetEvent",
    "QueueUpdateEvent",
    "RateLimited",
    "Reconnected",
    "RetryEvent",
    "ServerError",
    "StatusEvent",
    "StreamEvent",
    "SyncFeed",
    "TextPart",
    "ToolCall",
    "Unauthorized",
    "Unavailable",
    "UnknownEvent",
    "User",
    "WatchEvent",
]
