"""The Quart-Trio application: routes and limits, built once per process."""

from __future__ import annotations

from quart_trio import QuartTrio

from chatd.actors.engine import Engine
from chatd.config import Settings
from chatd.store.database import Database
from chatd.web import (
    admin,
    chats,
    cors,
    docs,
    errors,
    health,
    inbox,
    me,
    metrics,
    page,
    streams,
    users,
)
from chatd.web.context import Services, attach
from chatd.web.routing import ApiRoutes

API: tuple[ApiRoutes, ...] = (
    chats.routes,
    streams.routes,
    inbox.routes,
    me.routes,
    admin.routes,
    users.routes,
    metrics.routes,
)


def create_app(settings: Settings, db: Database, engine: Engine) -> QuartTrio:
    app = QuartTrio("chatd")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        JSON_SORT_KEYS=False,
        PROVIDE_AUTOMATIC_OPTIONS=False,
    )
    routes = tuple(spec for area in API for spec in area.specs)
    attach(app, Services(settings=settings, db=db, engine=engine, routes=routes))
    errors.install(app)
    cors.install(app, allowed=settings.ws_allowed_origins, max_age_s=settings.cors_max_age_s)
    app.register_blueprint(health.blueprint)
    app.register_blueprint(page.blueprint)
    app.register_blueprint(docs.blueprint)
    for area in API:
        app.register_blueprint(area.blueprint)
    return app
