"""Serve the app with Hypercorn's trio worker, with chatd's limits instead of its defaults."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from quart_trio import QuartTrio

from chatd.config import Settings


def hypercorn_config(settings: Settings, *, host: str, port: int) -> Config:
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    config.graceful_timeout = settings.shutdown_grace_s
    # Hypercorn's defaults allow 16 MiB bodies and WebSocket messages.
    config.wsgi_max_body_size = settings.max_body_bytes
    config.websocket_max_message_size = settings.max_body_bytes
    return config


async def serve(
    app: QuartTrio,
    settings: Settings,
    *,
    host: str,
    port: int,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns; ``task_status`` gets the bound URLs."""
    config = hypercorn_config(settings, host=host, port=port)
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)
