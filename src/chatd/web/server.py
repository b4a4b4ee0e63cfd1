"""Serve the app with Hypercorn's trio worker, with chatd's limits instead of its defaults."""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from quart_trio import QuartTrio

from chatd.config import Settings
from chatd.web.context import services


def hypercorn_config(settings: Settings, *, host: str, port: int) -> Config:
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    config.graceful_timeout = settings.shutdown_grace_s
    config.backlog = settings.listen_backlog
    # Hypercorn's defaults allow 16 MiB bodies and WebSocket messages.
    config.wsgi_max_body_size = settings.max_body_bytes
    config.websocket_max_message_size = settings.max_body_bytes
    config.websocket_ping_interval = settings.ws_ping_interval_s or None
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
    """Serve until ``shutdown_trigger`` returns; ``task_status`` gets the bound URLs.

    Hypercorn leaves open WebSockets to time out on shutdown (clients would see 1006), so the
    app is told first and closes each one with 1001.
    """
    config = hypercorn_config(settings, host=host, port=port)

    async def trigger() -> None:
        await shutdown_trigger()
        services(app).closing.set()

    await worker_serve(
        wrap_app(app, config.wsgi_max_body_size, "asgi"),
        config,
        sockets=listening_sockets(config, settings),
        shutdown_trigger=trigger,
        task_status=task_status,
    )


def listening_sockets(config: Config, settings: Settings) -> Sockets:
    """Hypercorn's sockets, with a bound on how long a client may refuse our data.

    Hypercorn shields each socket write from cancellation, so a client that stops reading would
    hold its connection's task (and the server's shutdown) forever. ``TCP_USER_TIMEOUT``,
    inherited by accepted connections, makes the kernel drop such a connection instead.
    """
    sockets = config.create_sockets()
    timeout_ms = round(settings.client_send_timeout_s * 1000)
    for sock in sockets.insecure_sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout_ms)
        sock.listen(config.backlog)
    return sockets
