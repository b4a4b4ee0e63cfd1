"""``GET /healthz``: is this process serving, and can it reach its database?"""

from __future__ import annotations

import logging

import trio
from quart import Blueprint, Response, current_app, jsonify

from chatd.web.context import services

log = logging.getLogger(__name__)

blueprint = Blueprint("health", __name__)

_DB_CHECK_TIMEOUT_S = 2.0


@blueprint.get("/healthz")
async def healthz() -> tuple[Response, int]:
    """Unauthenticated on purpose: load balancers and ``make run`` poll it."""
    db = services(current_app).db
    try:
        with trio.fail_after(_DB_CHECK_TIMEOUT_S):
            await db.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "not healthy", and is logged
        log.warning("health check: database unavailable: %s", exc)
        return jsonify(status="degraded", database="unavailable"), 503
    return jsonify(status="ok", database="ok"), 200
