"""The watch and inbox feeds across worker processes, through PostgreSQL LISTEN/NOTIFY.

A watch or inbox subscriber is connected to one worker, while the chat whose events it wants
may run on any. Each worker's ``FeedBridge`` is its feeds' ``relay``: what is published here is
delivered to local subscribers at once (``UserFeed.publish``) and also queued for the others,
and what the others send is delivered to local subscribers (``UserFeed.deliver``).

Sending. A sender task drains the queue: everything queued since its last send goes in one
statement (``SELECT pg_notify(...) FROM unnest(...)``), packed into as few payloads as the
8000-byte NOTIFY limit allows. So a burst (the events of one commit, or of every actor that
committed meanwhile) costs one statement, never one per event: at one turn at a time that is
one statement per commit that changed what a watcher sees, and fewer per turn under load. Why
not NOTIFY inside the commit's own transaction? That needs the chat commit (``store.chats``)
and the actor to carry the encoded events, for no fewer statements (a ``pg_notify`` in the
transaction is one more statement too), while the bridge keeps them untouched.

Payload: ``{"w": origin worker, "s": sequence, "i": [items]}``, an item being ``{"u": user,
"t": kind, "e": event}`` (a watch event), ``{"u": user, "c": chat}`` (a watch event too large
for a payload: the receiver reads the chat and publishes its status) or ``{"u": user, "n":
notification id}`` (inbox: a notification's body can be large, the receiver reads the row).
A receiver skips its own payloads, and reads rows only for users watched on it.

Lost notifications. NOTIFY is a hint. When the listener reports ``NotificationsLost``
(reconnected, or this worker fell behind), when a sender says it dropped a send (``"lost"``,
with the time of the oldest event it dropped), or when LISTEN could not be (re)made, the
backstop re-reads, for the users watched here, the chats changed and the inbox notifications
created since shortly before the last thing heard (``backstop_margin_s`` earlier: commits are
stamped with their transaction's start, and hosts' clocks differ a little), and publishes them
locally: status (and creation, title) events for the chats, the notifications not delivered
yet. While notifications flow nothing is polled. The watch feed stays at-least-once (its events
are states: a repeat is harmless); inbox notifications are delivered once per worker (the ids
delivered lately are remembered).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from uuid import UUID

import msgspec
import trio

from chatd.actors.feeds import UserFeed
from chatd.domain.watch_events import (
    ChatActionRequired,
    ChatCreated,
    ChatDeleted,
    ChatDiffStatusChanged,
    ChatStatusChanged,
    ChatTitleChanged,
    WatchEvent,
)
from chatd.store import feeds
from chatd.store.database import (
    Database,
    DatabaseUnavailable,
    Notification,
    NotificationsLost,
    is_unavailable,
)
from chatd.store.records import InboxNotification

log = logging.getLogger(__name__)

_KINDS: Final[dict[str, type[WatchEvent]]] = {
    "created": ChatCreated,
    "status_change": ChatStatusChanged,
    "title_change": ChatTitleChanged,
    "action_required": ChatActionRequired,
    "diff_status_change": ChatDiffStatusChanged,
    "deleted": ChatDeleted,
}
_KIND_OF: Final[dict[type[WatchEvent], str]] = {cls: kind for kind, cls in _KINDS.items()}
# Inbox ids remembered as delivered, so that a backstop does not deliver them again.
_RECENT_INBOX_IDS: Final = 4096
# Room for the envelope (origin worker id, sequence) around the items of a payload.
_ENVELOPE_BYTES: Final = 400


@dataclass(slots=True)
class BridgeStats:
    statements: int = 0  # NOTIFY statements sent
    payloads: int = 0  # NOTIFY payloads sent
    items_sent: int = 0
    payloads_received: int = 0  # other workers' payloads
    backstops: int = 0
    send_failures: int = 0


class FeedBridge:
    """Relays a worker's watch and inbox feeds to the other workers and back (module doc).

    Owned by the engine: ``await nursery.start(bridge.run)`` returns once this worker listens,
    so nothing another worker publishes after that is missed.
    """

    def __init__(
        self,
        db: Database,
        worker_id: str,
        watch: UserFeed[WatchEvent],
        inbox: UserFeed[InboxNotification],
        *,
        retry_delay_s: float = 1.0,
        backstop_margin_s: float = 10.0,
        listen_buffer: int = 1024,
    ) -> None:
        if not worker_id or len(worker_id.encode()) > 200:
            raise ValueError("worker_id must be 1 to 200 bytes")
        self._db = db
        self._worker_id = worker_id
        self._watch = watch
        self._inbox = inbox
        self._retry_delay_s = retry_delay_s
        self._margin_s = backstop_margin_s
        self._listen_buffer = listen_buffer
        self._outbox: list[bytes] = []
        self._outbox_since: float | None = None  # wall-clock time of the oldest queued item
        self._lost_since: float | None = None  # a send failed: what it held dates from then
        self._wakeup = trio.Event()
        self._sending = False
        self._idle = trio.Event()  # set when nothing is queued or being sent
        self._idle.set()
        self._seq = 0
        # Wall-clock time up to which what other workers sent is known to have been received.
        self._heard_until = time.time()
        self._delivered: OrderedDict[UUID, None] = OrderedDict()
        self.stats = BridgeStats()
        watch.relay = self._relay_watch
        inbox.relay = self._relay_inbox

    # -- sending ----------------------------------------------------------------------------

    def _relay_watch(self, user_id: UUID, event: WatchEvent) -> None:
        item = msgspec.json.encode(
            {"u": user_id, "t": _KIND_OF[type(event)], "e": msgspec.to_builtins(event)}
        )
        if len(item) > feeds.NOTIFY_PAYLOAD_MAX_BYTES - _ENVELOPE_BYTES:
            item = msgspec.json.encode({"u": user_id, "c": event.chat_id})
        self._queue(item)

    def _relay_inbox(self, user_id: UUID, notification: InboxNotification) -> None:
        self._remember(notification.id)
        self._queue(msgspec.json.encode({"u": user_id, "n": notification.id}))

    def _queue(self, item: bytes) -> None:
        if not self._outbox:
            self._outbox_since = time.time()
        self._outbox.append(item)
        self._wakeup.set()
        if self._idle.is_set():
            self._idle = trio.Event()

    def _pack(self, items: list[bytes]) -> list[str]:
        """Items in as few payloads under the NOTIFY limit as their order allows."""
        payloads: list[str] = []
        group: list[bytes] = []
        size = 0
        limit = feeds.NOTIFY_PAYLOAD_MAX_BYTES - _ENVELOPE_BYTES
        for item in items:
            if group and size + len(item) + 1 > limit:
                payloads.append(self._envelope(group))
                group, size = [], 0
            group.append(item)
            size += len(item) + 1
        if group:
            payloads.append(self._envelope(group))
        return payloads

    def _envelope(self, items: Iterable[bytes]) -> str:
        # The sequence also keeps two equal payloads of one statement apart: PostgreSQL folds
        # identical notifications of one transaction into one.
        self._seq += 1
        head = msgspec.json.encode({"w": self._worker_id, "s": self._seq})
        return (head[:-1] + b',"i":[' + b",".join(items) + b"]}").decode()

    async def drained(self) -> None:
        """Return once everything published so far was sent (or its send failed)."""
        await self._idle.wait()

    async def _send_loop(self) -> None:
        while True:
            if not self._outbox and self._lost_since is None:
                self._idle.set()
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            items, self._outbox = self._outbox, []
            since, self._outbox_since = self._outbox_since, None
            payloads = self._pack(items)
            if self._lost_since is not None:
                lost = {"w": self._worker_id, "lost": self._lost_since, "s": self._seq}
                payloads.insert(0, msgspec.json.encode(lost).decode())
                self._seq += 1
            if not payloads:
                continue
            try:
                await feeds.notify_many(self._db, feeds.FEEDS_CHANNEL, payloads)
            except Exception as exc:
                # What this send held is dropped; the next send tells the other workers to
                # re-read from then (their backstop), after a pause (the database is away).
                # Whatever failed, a hint that could not be sent never stops the worker.
                self.stats.send_failures += 1
                oldest = since if since is not None else time.time()
                first = self._lost_since is None  # of this outage: said once, not every retry
                self._lost_since = min(oldest, self._lost_since or oldest)
                if not isinstance(exc, DatabaseUnavailable):
                    log.exception("could not relay feed events to other workers")
                elif first:
                    log.warning("could not relay feed events to other workers: %s", exc)
                await trio.sleep(self._retry_delay_s)
                self._wakeup.set()
                continue
            self._lost_since = None
            self.stats.statements += 1
            self.stats.payloads += len(payloads)
            self.stats.items_sent += len(items)

    # -- receiving --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_loop)
            await nursery.start(self._listen_loop)
            task_status.started()

    async def _listen_loop(self, *, task_status: trio.TaskStatus[None]) -> None:
        started = False
        while True:
            try:
                async with self._db.listen(
                    feeds.FEEDS_CHANNEL, buffer=self._listen_buffer
                ) as events:
                    if started:  # listening again after a failure: catch up first
                        await self._backstop(None)
                    else:
                        task_status.started()
                        started = True
                    async for event in events:
                        if isinstance(event, NotificationsLost):
                            await self._backstop(None)
                        else:
                            await self._receive(event)
            except Exception as exc:
                if not (isinstance(exc, DatabaseUnavailable) or is_unavailable(exc)):
                    raise
                log.warning(
                    "feed listener lost the database (%s); again in %.1f s",
                    exc,
                    self._retry_delay_s,
                )
            if not started:
                # Serve anyway: a database outage at start is waited out, and the backstop
                # catches up once listening.
                task_status.started()
                started = True
            await trio.sleep(self._retry_delay_s)

    async def _receive(self, notification: Notification) -> None:
        try:
            message: dict[str, Any] = msgspec.json.decode(notification.payload)
            origin = message["w"]
        except (msgspec.DecodeError, KeyError, TypeError):
            log.warning("ignored a malformed feed notification: %.200r", notification.payload)
            return
        # Our own payloads come back too: each proves the listener heard everything until now.
        self._heard_until = time.time()
        if origin == self._worker_id:
            return
        self.stats.payloads_received += 1
        lost = message.get("lost")
        if isinstance(lost, int | float):
            await self._backstop(float(lost))
            return
        refs, inbox_ids = self._deliver_watch(message.get("i", ()))
        if refs:
            for chat in await feeds.chats_by_id(self._db, refs):
                self._watch.deliver(
                    chat.owner_id, ChatStatusChanged(chat.id, chat.status, chat.archived)
                )
        if inbox_ids:
            for found in await feeds.notifications_by_id(self._db, inbox_ids):
                self._deliver_inbox(found)

    def _deliver_watch(self, items: Iterable[Any]) -> tuple[list[UUID], list[UUID]]:
        """Deliver the watch events of a payload; returns what must be read first: the chats
        of oversized watch events and the inbox notifications, of the users watched here."""
        refs: list[UUID] = []
        inbox_ids: list[UUID] = []
        for item in items:
            try:
                user_id = UUID(item["u"])
                if "n" in item:
                    if self._inbox.is_watched(user_id):
                        inbox_ids.append(UUID(item["n"]))
                elif not self._watch.is_watched(user_id):
                    pass  # nobody here to tell: not even decoded
                elif "e" in item:
                    self._watch.deliver(user_id, msgspec.convert(item["e"], _KINDS[item["t"]]))
                elif "c" in item:
                    refs.append(UUID(item["c"]))
            except (KeyError, ValueError, TypeError, msgspec.ValidationError):
                log.warning("ignored a malformed feed item: %.200r", item)
        return refs, inbox_ids

    def _deliver_inbox(self, notification: InboxNotification) -> None:
        if notification.id in self._delivered:
            return
        self._remember(notification.id)
        self._inbox.deliver(notification.user_id, notification)

    def _remember(self, notification_id: UUID) -> None:
        self._delivered[notification_id] = None
        if len(self._delivered) > _RECENT_INBOX_IDS:
            self._delivered.popitem(last=False)

    async def _backstop(self, lost_since: float | None) -> None:
        """Publish here what other workers may have sent while we did not hear (module doc)."""
        self.stats.backstops += 1
        from_ = self._heard_until if lost_since is None else min(lost_since, self._heard_until)
        since = datetime.fromtimestamp(from_ - self._margin_s, tz=UTC)
        started = time.time()
        watching = self._watch.watched()
        reading = self._inbox.watched()
        log.info(
            "feed notifications may have been lost: re-reading %d watched users' chats and "
            "%d users' inboxes since %s",
            len(watching),
            len(reading),
            since.isoformat(),
        )
        for chat in await feeds.chats_changed_since(self._db, watching, since):
            # A chat maybe created meanwhile is announced as created; every chat's title and
            # status are sent as they are now (a watcher keeps the last one it gets).
            if chat.created_at >= since:
                self._watch.deliver(
                    chat.owner_id, ChatCreated(chat.id, chat.title, chat.status, chat.archived)
                )
            self._watch.deliver(chat.owner_id, ChatTitleChanged(chat.id, chat.title))
            self._watch.deliver(
                chat.owner_id, ChatStatusChanged(chat.id, chat.status, chat.archived)
            )
        for notification in await feeds.notifications_since(self._db, reading, since):
            self._deliver_inbox(notification)
        self._heard_until = max(self._heard_until, started)
