"""What the web layer needs from the rest of the process, attached to the app once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from quart import Quart

from chatd.actors.engine import Engine
from chatd.config import Settings
from chatd.store.chat_owners import ChatOwners
from chatd.store.database import Database
from chatd.store.token_cache import TokenCache
from chatd.web.limits import UserSockets

if TYPE_CHECKING:
    from chatd.web.routing import RouteSpec

_EXTENSION_KEY = "chatd"


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    db: Database
    engine: Engine
    # Every API route, for the OpenAPI document.
    routes: tuple[RouteSpec, ...] = ()
    # Set when the server begins to shut down: every WebSocket closes with 1001.
    closing: trio.Event = field(default_factory=trio.Event)
    # The edge's per-request reads, cached for the process: who a token is, who owns a chat.
    tokens: TokenCache = field(init=False, repr=False, compare=False)
    chat_owners: ChatOwners = field(init=False, repr=False, compare=False)
    # Each user's open WebSockets, against max_websockets_per_user.
    websockets: UserSockets = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tokens = TokenCache(self.db, ttl_s=self.settings.auth_cache_ttl_s)
        object.__setattr__(self, "tokens", tokens)  # frozen: set once, here
        # A token another worker revoked is forgotten here too (cross-worker invalidation).
        self.engine.config.on_tokens_revoked(tokens.invalidate_all)
        object.__setattr__(self, "chat_owners", ChatOwners(self.db))
        websockets = UserSockets(self.settings.max_websockets_per_user)
        object.__setattr__(self, "websockets", websockets)


def attach(app: Quart, value: Services) -> None:
    app.extensions[_EXTENSION_KEY] = value


def services(app: Quart) -> Services:
    value: Services = app.extensions[_EXTENSION_KEY]
    return value
