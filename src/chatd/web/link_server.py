"""The internal link's server: what a worker answers to its peers.

Two routes under ``/internal/v1``, on their own listener (``link_host:link_port``), served by
chatd's own ``chatd.web.server.serve`` loop:

- ``POST /ask?chat_id=&timeout_s=``: a command forwarded by a peer whose client sent it to a chat
  of a shard held here. The body is ``chatd.web.link_codec.encode_command``; the answer (200)
  is the outcome of this worker's ``supervisor.ask``, as it is (a reply, a refusal, an actor
  error such as ``NotOwner`` while the shard is being handed over), so that the peer answers its
  client exactly as this worker would.
- ``GET /stream/<chat_id>?message_seq=...`` (WebSocket): this worker's hub subscription from the
  peer's cursor, one ``LinkFrame`` per batch, ended by a ``LinkEnd`` (the shard left this
  worker, or the peer fell behind as a slow consumer).

Why a WebSocket for streams rather than a chunked response: the hub drops a slow consumer by
cancelling the body of its subscription, which must then hold the send that is stuck; a view
that sends from inside ``async with hub.subscribe(...)`` does (as the public stream view does),
a streaming response's body generator would yield outside it. Back-pressure is TCP's: a relay
that stops reading (its own client is slow) fills the socket, the send here blocks, and the hub
drops this subscriber after ``slow_consumer_timeout_s``, as it would drop a local client.

Every request carries the cluster secret (``chatd.store.cluster.link_secret``) in the
``X-Chatd-Link-Secret`` header, compared in constant time: 401 without it, 403 when wrong.
The listener starts before the engine (its URL is part of the worker's row in ``workers``);
until the engine is attached every ask is answered ``NotOwner`` and every stream 503.
"""

from __future__ import annotations

import hmac
import logging
import math
from dataclasses import dataclass, field
from uuid import UUID

import msgspec
import trio
from quart import Response, request, websocket
from quart_trio import QuartTrio

from chatd.actors.engine import Engine
from chatd.actors.errors import ActorError, NotOwner
from chatd.actors.hub import OwnerMoved, SlowConsumer, StreamCursor
from chatd.actors.stream_cursor import CursorError
from chatd.config import Settings
from chatd.domain.effects import Refusal
from chatd.domain.sharding import shard_of
from chatd.store.database import DatabaseUnavailable
from chatd.store.errors import NotFound
from chatd.web.frames import encode_stream_batch
from chatd.web.link_codec import (
    CursorWire,
    LinkCodecError,
    LinkEnd,
    LinkFrame,
    decode_command,
    encode_error,
    encode_reply,
    encode_stream_item,
)
from chatd.web.server import serve

log = logging.getLogger(__name__)

LINK_PREFIX = "/internal/v1"
SECRET_HEADER = "X-Chatd-Link-Secret"  # noqa: S105 - the header's name, not a secret
_OUTCOME = "application/json"


@dataclass
class _LinkState:
    """What the link's views need; ``closing`` is what ``serve`` sets when it shuts down (it
    reads it from the app's ``chatd`` extension, as for the public app)."""

    settings: Settings
    secret: str
    engine: Engine | None = None
    closing: trio.Event = field(default_factory=trio.Event)


class LinkServer:
    """``url = await nursery.start(server.run)``; ``attach(engine)`` once the engine runs;
    ``stop()`` to end (after the engine stopped: peers get ``NotOwner`` meanwhile, not
    connection errors)."""

    def __init__(self, settings: Settings, secret: str) -> None:
        self._state = _LinkState(settings, secret)
        self._stop = trio.Event()
        self.app = create_link_app(self._state)

    def attach(self, engine: Engine) -> None:
        self._state.engine = engine

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``stop()``; ``task_status`` gets the URL peers reach this worker at."""
        settings = self._state.settings

        async def started(urls: list[str]) -> None:
            port = urls[0].rsplit(":", 1)[1]
            url = f"http://{settings.link_url_host}:{port}"
            log.info("internal link listening on %s", url)
            task_status.started(url)

        async with trio.open_nursery() as nursery:
            urls: list[str] = await nursery.start(
                lambda task_status: serve(
                    self.app,
                    settings,
                    host=settings.link_host,
                    port=settings.link_port,
                    shutdown_trigger=self._stop.wait,
                    task_status=task_status,
                )
            )
            await started(urls)


def create_link_app(state: _LinkState) -> QuartTrio:
    app = QuartTrio("chatd-link")
    app.config.update(
        MAX_CONTENT_LENGTH=state.settings.max_body_bytes,
        PROVIDE_AUTOMATIC_OPTIONS=False,
        # A forwarded ask is bounded by the ask's own timeout; a stream lives as long as the
        # peer's client does.
        RESPONSE_TIMEOUT=None,
        BODY_TIMEOUT=state.settings.link_timeout_s,
    )
    # ``serve`` sets ``closing`` of this extension when it shuts down (see ``_LinkState``).
    app.extensions["chatd"] = state

    def refusal(headers_secret: str | None) -> Response | None:
        if headers_secret is None:
            return _plain(401, "the internal link needs the cluster secret")
        if not hmac.compare_digest(headers_secret.encode(), state.secret.encode()):
            return _plain(403, "wrong cluster secret")
        return None

    @app.post(f"{LINK_PREFIX}/ask")
    async def ask() -> Response:
        refused = refusal(request.headers.get(SECRET_HEADER))
        if refused is not None:
            return refused
        try:
            chat_id = UUID(request.args.get("chat_id", ""))
            timeout_text = request.args.get("timeout_s")
            timeout_s = None if timeout_text is None else float(timeout_text)
            if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s > 0):
                raise ValueError("timeout_s must be positive")
            body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
            assert isinstance(body, bytes)
            command = decode_command(body)
        except (ValueError, LinkCodecError) as exc:
            return _plain(400, f"bad forwarded command: {exc}")
        engine = state.engine
        try:
            if engine is None:
                raise NotOwner(chat_id, shard_of(chat_id, state.settings.shard_count))
            reply = await engine.supervisor.ask(chat_id, command, timeout_s=timeout_s)
        except Exception as exc:  # every outcome goes back to the asker
            if _unexpected(exc):
                log.exception("forwarded command for chat %s failed", chat_id)
            return Response(encode_error(exc), status=200, content_type=_OUTCOME)
        return Response(encode_reply(reply), status=200, content_type=_OUTCOME)

    @app.websocket(f"{LINK_PREFIX}/stream/<chat_id>")
    async def stream(chat_id: str) -> Response | None:
        refused = refusal(websocket.headers.get(SECRET_HEADER))
        if refused is not None:
            return refused
        try:
            ident = UUID(chat_id)
            cursor = StreamCursor.from_query(websocket.args)
        except (ValueError, CursorError) as exc:
            return _plain(400, f"bad stream request: {exc}")
        engine = state.engine
        if engine is None or not engine.supervisor.owns(ident):
            # 409: not here (any more, or not yet); the relay looks the owner up again.
            return _plain(409, "this worker does not serve that chat")
        await _send_stream(engine, ident, cursor, state)
        return None

    return app


async def _send_stream(
    engine: Engine, chat_id: UUID, cursor: StreamCursor, state: _LinkState
) -> None:
    """Subscribe, accept, send batches; the end marker says why it ended."""
    closing = state.closing
    end: LinkEnd | None = None
    accepted = False
    missing = False
    try:
        async with engine.hub.subscribe(chat_id, cursor) as batches:
            if not engine.supervisor.owns(chat_id):
                # The shard left between the check and the subscription: its disown missed us.
                raise OwnerMoved(chat_id)
            await websocket.accept()
            accepted = True
            async with trio.open_nursery() as nursery:

                async def watch_closing() -> None:
                    await closing.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_closing)
                async for batch in batches:
                    cursor = cursor.after(batch)
                    frame = msgspec.Raw(encode_stream_batch(batch).encode())
                    item = LinkFrame(CursorWire.of(cursor), frame)
                    await websocket.send(encode_stream_item(item))
                nursery.cancel_scope.cancel()
            if closing.is_set():
                end = LinkEnd("shutting_down")
    except* OwnerMoved:
        end = LinkEnd("owner_moved")
    except* SlowConsumer as dropped:
        exc = dropped.exceptions[0]
        assert isinstance(exc, SlowConsumer)
        end = LinkEnd("slow_consumer", exc.reason)
    except* NotFound:
        if accepted:
            raise
        missing = True
    if missing:
        await websocket.close(1008, "no such chat")  # before the accept: the handshake's 403
        return
    if end is None:
        return
    if not accepted:
        await websocket.accept()
    # Bounded: a peer that stopped reading gets no marker (it sees the close or its timeout).
    with trio.move_on_after(state.settings.link_timeout_s):
        await websocket.send(encode_stream_item(end))
    await websocket.close(1000)


def _unexpected(exc: Exception) -> bool:
    return not isinstance(exc, Refusal | ActorError | DatabaseUnavailable)


def _plain(status: int, message: str) -> Response:
    return Response(message, status=status, content_type="text/plain")
