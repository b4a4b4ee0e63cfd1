"""The internal link's client: forwards commands to a chat's owner and opens relayed streams.

The Router (``chatd.actors.router``) hands it every command for a chat whose shard this worker
does not serve. The owner is looked up in ``chatd.store.cluster.shard_owners`` and cached; the
cache is read again when a NOTIFY on ``cluster.SHARDS_CHANNEL`` says shards moved (or the
notifications may have been lost), when a peer answers ``NotOwner``, when the link to a peer
fails, and at least every ``owners_max_age_s`` as a backstop.

Forwarding never loops and never doubles: when the lookup names this very worker (a handover
of the shard is in progress here) or nobody live, the command is refused with ``NotOwner``
(503 + Retry-After at the edge). A link failure before the request was sent (no connection)
is ``NotOwner``; after it (the owner may have done it) ``ActorDead``; no answer within the
ask's timeout + ``link_timeout_s`` is ``AskTimeout``. All are retryable, and a retry with the
same Idempotency-Key is done once. A ``NotOwner`` from the peer (the shard just moved) is tried
once more at the owner the fresh lookup names.

HTTP/1.1 with keep-alive through httpx2 (one pool per process, up to ``max_connections``
connections, which is also what a peer's link server accepts); streams are WebSockets
(trio-websocket), one per relayed client stream.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit
from uuid import UUID

import httpx2
import trio
import trio_websocket

from chatd.actors.errors import ActorDead, AskTimeout, NotOwner
from chatd.actors.stream_cursor import StreamCursor
from chatd.domain.sharding import shard_of
from chatd.store import cluster
from chatd.store.cluster import ShardOwner
from chatd.store.database import Database, DatabaseUnavailable, NotificationsLost
from chatd.web.link_codec import (
    LinkCodecError,
    LinkStreamItem,
    decode_outcome,
    decode_stream_item,
    encode_command,
)
from chatd.web.link_server import LINK_PREFIX, SECRET_HEADER

log = logging.getLogger(__name__)

# A relayed batch holds up to the hub's max_batch events (history catch-up: whole messages),
# bounded by the owner's limits on what a message may hold; the frame is passed on as it is.
_MAX_STREAM_MESSAGE_BYTES = 1 << 30
_STREAM_RECEIVE_BYTES = 65536


class LinkUnavailable(Exception):
    """No relayed stream could be opened: no live owner, the owner is this worker, the owner
    refused (the shard just moved) or could not be reached. Look the owner up again later."""


@dataclass(frozen=True, slots=True)
class LinkOptions:
    worker_id: str
    shard_count: int
    secret: str
    ask_timeout_s: float
    link_timeout_s: float
    owners_max_age_s: float
    max_connections: int


class RelaySource:
    """An open stream from the owner: ``receive()`` the next item, ``None`` once the owner
    closed it without a marker (it died or lost its connection)."""

    def __init__(self, owner: ShardOwner, connection: trio_websocket.WebSocketConnection) -> None:
        self.owner = owner
        self._ws = connection

    async def receive(self) -> LinkStreamItem | None:
        try:
            message = await self._ws.get_message()
        except trio_websocket.ConnectionClosed:
            return None
        data = message.encode() if isinstance(message, str) else message
        return decode_stream_item(data)


class LinkClient:
    """Use through ``open_link_client``."""

    def __init__(self, db: Database, options: LinkOptions) -> None:
        self._db = db
        self.options = options
        self._http = httpx2.AsyncClient(
            headers={SECRET_HEADER: options.secret},
            limits=httpx2.Limits(
                max_connections=options.max_connections,
                max_keepalive_connections=options.max_connections,
            ),
            timeout=httpx2.Timeout(options.link_timeout_s),
        )
        self._owners: dict[int, ShardOwner] = {}
        self._read_at = -math.inf
        self._forgotten = 0  # times the owners were forgotten (a read racing one is stale)
        self._reading: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self.forwarded = 0  # asks sent to a peer (metrics, benchmarks)

    # -- owners ------------------------------------------------------------------------------

    def shard_of(self, chat_id: UUID) -> int:
        return shard_of(chat_id, self.options.shard_count)

    def forget_owners(self) -> None:
        """The next lookup reads the owners again."""
        self._read_at = -math.inf
        self._forgotten += 1

    async def owner(self, chat_id: UUID) -> ShardOwner | None:
        """The live owner of the chat's shard as last read (``None``: nobody live)."""
        if trio.current_time() - self._read_at >= self.options.owners_max_age_s:
            await self._read_owners()
        return self._owners.get(self.shard_of(chat_id))

    def cached_owner(self, chat_id: UUID) -> ShardOwner | None:
        """The owner as last read, without reading (``None`` once the cache was invalidated)."""
        if trio.current_time() - self._read_at >= self.options.owners_max_age_s:
            return None
        return self._owners.get(self.shard_of(chat_id))

    async def _read_owners(self) -> None:
        """One read at a time; whoever comes meanwhile waits for it."""
        if self._reading is not None:
            await self._reading.wait()
            return
        self._reading = done = trio.Event()
        try:
            started, forgotten = trio.current_time(), self._forgotten
            self._owners = await cluster.shard_owners(self._db)
            if forgotten == self._forgotten:  # else a move was announced during the read
                self._read_at = started
        finally:
            self._reading = None
            done.set()

    def _target(self, chat_id: UUID, owner: ShardOwner | None) -> ShardOwner:
        if owner is None or owner.worker_id == self.options.worker_id or not owner.link_url:
            # Nobody live, a handover away from here in progress, or no link yet: retry soon.
            raise NotOwner(chat_id, self.shard_of(chat_id))
        return owner

    # -- forwarding ------------------------------------------------------------------------

    async def ask(self, chat_id: UUID, message: object, *, timeout_s: float | None) -> object:
        """The owner's reply to ``message`` (see the module docstring for the refusals)."""
        try:
            body = encode_command(message)
        except LinkCodecError as exc:
            raise TypeError(str(exc)) from exc
        ask_timeout = self.options.ask_timeout_s if timeout_s is None else timeout_s
        tried: ShardOwner | None = None
        while True:
            try:
                owner = self._target(chat_id, await self.owner(chat_id))
            except DatabaseUnavailable:
                raise NotOwner(chat_id, self.shard_of(chat_id)) from None
            if tried is not None and owner.worker_id == tried.worker_id:
                raise NotOwner(chat_id, self.shard_of(chat_id))
            outcome = await self._post(owner, chat_id, body, timeout_s, ask_timeout)
            try:
                return decode_outcome(outcome)
            except NotOwner:
                # The shard moved on from that peer: once more at whoever holds it now.
                self.forget_owners()
                if tried is not None:
                    raise
                tried = owner

    async def _post(
        self,
        owner: ShardOwner,
        chat_id: UUID,
        body: bytes,
        timeout_s: float | None,
        ask_timeout: float,
    ) -> bytes:
        params = {"chat_id": str(chat_id)}
        if timeout_s is not None:
            params["timeout_s"] = repr(timeout_s)
        total = ask_timeout + self.options.link_timeout_s
        self.forwarded += 1
        try:
            response = await self._http.post(
                f"{owner.link_url}{LINK_PREFIX}/ask",
                params=params,
                content=body,
                timeout=httpx2.Timeout(self.options.link_timeout_s, read=total),
            )
        except (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout) as exc:
            # Never sent: the command was not done.
            self.forget_owners()
            log.warning("link to %s (%s) failed: %s", owner.worker_id, owner.link_url, exc)
            raise NotOwner(chat_id, owner.shard) from exc
        except httpx2.ReadTimeout as exc:
            raise AskTimeout(chat_id, total) from exc
        except httpx2.TransportError as exc:
            # Sent, maybe done: the retry's Idempotency-Key tells.
            self.forget_owners()
            log.warning("link to %s (%s) failed: %s", owner.worker_id, owner.link_url, exc)
            raise ActorDead(chat_id, f"the link to its owner failed: {exc}") from exc
        if response.status_code != 200:
            self.forget_owners()
            log.error(
                "link to %s refused a command: %d %s",
                owner.worker_id,
                response.status_code,
                response.text[:200],
            )
            raise NotOwner(chat_id, owner.shard)
        return response.content

    def tell(self, chat_id: UUID, message: object) -> None:
        """Forward without waiting for the reply (in the background; failures are logged)."""
        if self._nursery is None:
            raise NotOwner(chat_id, self.shard_of(chat_id))
        self._nursery.start_soon(self._tell, chat_id, message)

    async def _tell(self, chat_id: UUID, message: object) -> None:
        try:
            await self.ask(chat_id, message, timeout_s=None)
        except Exception as exc:  # noqa: BLE001 - a tell has nobody to tell
            log.warning("forwarded tell to chat %s failed: %s", chat_id, exc)

    # -- relayed streams -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def open_stream(
        self, chat_id: UUID, cursor: StreamCursor, *, fresh: bool = False
    ) -> AsyncIterator[RelaySource]:
        """The owner's stream of the chat from ``cursor``; ``LinkUnavailable`` when there is
        none to open now (``fresh``: read the owners first)."""
        if fresh:
            self.forget_owners()
        try:
            owner = self._target(chat_id, await self.owner(chat_id))
        except (NotOwner, DatabaseUnavailable) as exc:
            raise LinkUnavailable(str(exc)) from exc
        address = urlsplit(owner.link_url)
        path = f"{LINK_PREFIX}/stream/{chat_id}"
        query = _cursor_query(cursor)
        if query:
            path += "?" + query
        timeout_s = self.options.link_timeout_s
        headers = [(SECRET_HEADER.lower().encode(), self.options.secret.encode())]
        failed: BaseException | None = None
        try:
            with trio.fail_after(timeout_s):
                tcp = await trio.open_tcp_stream(address.hostname or "", address.port or 80)
        except (OSError, trio.TooSlowError) as exc:
            self.forget_owners()
            raise LinkUnavailable(f"stream from {owner.worker_id}: {exc!r}") from exc
        # trio-websocket's own connect leaves the socket open when the handshake is refused:
        # the stream is opened and closed here.
        try:
            async with trio.open_nursery() as nursery:
                try:
                    with trio.fail_after(timeout_s):
                        connection = await trio_websocket.wrap_client_stream(
                            nursery,
                            tcp,
                            address.netloc,
                            path,
                            extra_headers=headers,
                            max_message_size=_MAX_STREAM_MESSAGE_BYTES,
                            receive_buffer_size=_STREAM_RECEIVE_BYTES,
                        )
                except (OSError, trio.TooSlowError, trio_websocket.HandshakeError) as exc:
                    failed = exc
                    nursery.cancel_scope.cancel()
                else:
                    try:
                        yield RelaySource(owner, connection)
                    finally:
                        with trio.CancelScope(shield=True), trio.move_on_after(timeout_s):
                            await connection.aclose()
                        nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await tcp.aclose()
        if failed is not None:
            self.forget_owners()
            if isinstance(failed, trio_websocket.ConnectionRejected) and failed.status_code != 409:
                log.error("link to %s refused a stream: %s", owner.worker_id, failed)
            raise LinkUnavailable(f"stream from {owner.worker_id}: {failed!r}") from failed

    # -- lifecycle -------------------------------------------------------------------------

    async def _follow_moves(self, task_status: trio.TaskStatus[None]) -> None:
        """Forget the owners whenever shards move (NOTIFY), or notifications were lost."""
        async with self._db.listen(cluster.SHARDS_CHANNEL) as events:
            task_status.started()
            async for event in events:
                self.forget_owners()
                if isinstance(event, NotificationsLost):
                    log.info("shard move notifications may have been lost: owners re-read")


def _cursor_query(cursor: StreamCursor) -> str:
    params: dict[str, int] = {}
    if cursor.message_seq:
        params["message_seq"] = cursor.message_seq
    if cursor.episode is not None:
        params["history_version"] = cursor.episode.history_version
        params["generation_attempt"] = cursor.episode.generation_attempt
        params["part_seq"] = cursor.part_seq
    return urlencode(params)


@contextlib.asynccontextmanager
async def open_link_client(db: Database, options: LinkOptions) -> AsyncIterator[LinkClient]:
    client = LinkClient(db, options)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._follow_moves)
            client._nursery = nursery
            yield client
            client._nursery = None
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await client._http.aclose()
