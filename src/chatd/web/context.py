"""What the web layer needs from the rest of the process, attached to the app once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from quart import Quart

from chatd.actors.engine import Engine
from chatd.config import Settings
from chatd.store.database import Database

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


def attach(app: Quart, value: Services) -> None:
    app.extensions[_EXTENSION_KEY] = value


def services(app: Quart) -> Services:
    value: Services = app.extensions[_EXTENSION_KEY]
    return value
