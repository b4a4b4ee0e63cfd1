"""The Quart-Trio application: routes and limits, built once per process."""

from __future__ import annotations

from quart_trio import QuartTrio

from chatd.actors.engine import Engine
from chatd.config import Settings
from chatd.store.database import Database
from chatd.web import health
from chatd.web.context import Services, attach


def create_app(settings: Settings, db: Database, engine: Engine) -> QuartTrio:
    app = QuartTrio("chatd")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        JSON_SORT_KEYS=False,
        PROVIDE_AUTOMATIC_OPTIONS=False,
    )
    attach(app, Services(settings=settings, db=db, engine=engine))
    app.register_blueprint(health.blueprint)
    return app
