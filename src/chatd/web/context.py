"""What the web layer needs from the rest of the process, attached to the app once."""

from __future__ import annotations

from dataclasses import dataclass

from quart import Quart

from chatd.actors.engine import Engine
from chatd.config import Settings
from chatd.store.database import Database

_EXTENSION_KEY = "chatd"


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    db: Database
    engine: Engine


def attach(app: Quart, value: Services) -> None:
    app.extensions[_EXTENSION_KEY] = value


def services(app: Quart) -> Services:
    value: Services = app.extensions[_EXTENSION_KEY]
    return value
