"""Assemble the engine of one worker process: hub, user feeds, config cache, model catalog,
supervisor, router."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import trio

from chatd.actors.behavior import ActorBehavior, ActorContext
from chatd.actors.chat_actor import ChatActor, ChatCounters, ChatDeps
from chatd.actors.feed_bridge import FeedBridge
from chatd.actors.feeds import UserFeed
from chatd.actors.hub import ChatHub
from chatd.actors.models import ModelCatalog
from chatd.actors.router import PeerLink, Router
from chatd.actors.supervisor import Supervisor
from chatd.config import Settings
from chatd.domain.chat_state import ChatPolicy
from chatd.domain.chat_status import ChatStatus
from chatd.domain.failure_classifier import scrub_detail
from chatd.domain.provider_failure import ErrorKind, ProviderFailure
from chatd.domain.retry_policy import RetryPolicy
from chatd.domain.watch_events import ChatStatusChanged, WatchEvent
from chatd.providers.base import Timeouts
from chatd.store import chats
from chatd.store.chats import UpdateChat
from chatd.store.config_cache import ConfigCache
from chatd.store.database import Database
from chatd.store.leases import Fence
from chatd.store.records import Chat, InboxNotification
from chatd.tools.dynamic import ToolLimits
from chatd.tools.workspace import WorkspaceLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineOptions:
    worker_id: str
    shard_count: int = 64
    lease_ttl_s: float = 15.0
    mailbox_capacity: int = 256
    idle_timeout_s: float = 300.0
    restart_limit: int = 3
    restart_window_s: float = 60.0
    ask_timeout_s: float = 30.0
    # Database outages (see chatd.actors.supervisor): restart backoff and the resume sweep.
    db_retry_base_delay_s: float = 0.25
    db_retry_max_delay_s: float = 2.0
    resume_sweep_interval_s: float = 60.0
    # Several workers (chatd.actors.shard_keeper): where peers reach this worker's internal
    # link (kept in its `workers` row; "" until it listens), and how long a shard handed over
    # to another worker waits for its turns in progress.
    link_url: str = ""
    handover_timeout_s: float = 10.0
    policy: ChatPolicy = field(default_factory=ChatPolicy)
    timeouts: Timeouts = field(default_factory=Timeouts)
    subscriber_queue_size: int = 1024
    slow_consumer_timeout_s: float = 10.0
    config_cache_ttl_s: float = 30.0
    tool_limits: ToolLimits = field(default_factory=ToolLimits)
    max_running_chats_per_user: int = 0  # 0: no limit
    workspace_root: Path = field(default_factory=lambda: Path(".chatd/workspaces"))
    workspace_limits: WorkspaceLimits = field(default_factory=WorkspaceLimits)
    titles: bool = False
    title_model_config_id: UUID | None = None
    title_timeout_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings, *, worker_id: str) -> EngineOptions:
        return cls(
            worker_id=worker_id,
            shard_count=settings.shard_count,
            lease_ttl_s=settings.lease_ttl_s,
            mailbox_capacity=settings.mailbox_capacity,
            idle_timeout_s=settings.actor_idle_timeout_s,
            restart_limit=settings.restart_limit,
            restart_window_s=settings.restart_window_s,
            ask_timeout_s=settings.ask_timeout_s,
            db_retry_base_delay_s=settings.db_retry_base_delay_s,
            db_retry_max_delay_s=settings.db_retry_max_delay_s,
            resume_sweep_interval_s=settings.resume_sweep_interval_s,
            handover_timeout_s=settings.handover_timeout_s,
            policy=ChatPolicy(
                max_queue_length=settings.max_queue_length,
                action_timeout_s=settings.action_timeout_s,
                retry=RetryPolicy.from_settings(settings),
            ),
            timeouts=Timeouts(
                connect_s=settings.provider_connect_timeout_s,
                silence_s=settings.stream_silence_timeout_s,
            ),
            subscriber_queue_size=settings.subscriber_queue_size,
            slow_consumer_timeout_s=settings.slow_consumer_timeout_s,
            config_cache_ttl_s=settings.config_cache_ttl_s,
            tool_limits=ToolLimits(
                max_tools=settings.max_tools_per_chat,
                max_description_chars=settings.max_tool_description_chars,
                max_schema_bytes=settings.max_tool_schema_bytes,
                max_schema_depth=settings.max_tool_schema_depth,
            ),
            max_running_chats_per_user=settings.max_running_chats_per_user,
            workspace_root=settings.workspace_path,
            workspace_limits=WorkspaceLimits(
                max_read_bytes=settings.tool_output_max_bytes,
                max_output_bytes=settings.tool_output_max_bytes,
                execute_max_output_bytes=settings.tool_output_max_bytes,
                max_write_bytes=settings.tool_write_max_bytes,
                execute_timeout_s=settings.execute_timeout_s,
            ),
            titles=settings.titles,
            title_model_config_id=(
                UUID(settings.title_model_config_id) if settings.title_model_config_id else None
            ),
            title_timeout_s=settings.title_timeout_s,
        )


@dataclass(frozen=True, slots=True)
class Engine:
    router: Router
    hub: ChatHub
    supervisor: Supervisor
    models: ModelCatalog
    # The cache the models and the chats read through; call its invalidate_* after each write.
    config: ConfigCache
    # Lifecycle events of each user's chats (the watch WebSocket).
    watch: UserFeed[WatchEvent]
    # Each user's new inbox notifications, published once committed.
    inbox: UserFeed[InboxNotification]
    # Turns, retries and errors of the process's chats, counted by their actors (/metrics).
    counters: ChatCounters = field(default_factory=ChatCounters)
    # Relays watch and inbox to and from the other workers (None: an engine assembled by hand).
    feeds: FeedBridge | None = None


@contextlib.asynccontextmanager
async def open_engine(
    db: Database, options: EngineOptions, *, peers: PeerLink | None = None
) -> AsyncIterator[Engine]:
    """The engine of one worker; ``peers`` (the internal link's client) reaches the chats of
    shards held by other workers."""
    hub = ChatHub(
        db,
        subscriber_queue_size=options.subscriber_queue_size,
        slow_consumer_timeout_s=options.slow_consumer_timeout_s,
    )
    # The config cache and the feeds reach the other workers through LISTEN/NOTIFY (their
    # follow/run tasks below); an outage is waited out at the database retry pace.
    config = ConfigCache(
        db,
        ttl_s=options.config_cache_ttl_s,
        worker_id=options.worker_id,
        retry_delay_s=options.db_retry_max_delay_s,
    )
    models = ModelCatalog(config, timeouts=options.timeouts)
    watch: UserFeed[WatchEvent] = UserFeed(
        queue_size=options.subscriber_queue_size,
        slow_consumer_timeout_s=options.slow_consumer_timeout_s,
    )
    inbox: UserFeed[InboxNotification] = UserFeed(
        queue_size=options.subscriber_queue_size,
        slow_consumer_timeout_s=options.slow_consumer_timeout_s,
    )
    bridge = FeedBridge(
        db, options.worker_id, watch, inbox, retry_delay_s=options.db_retry_max_delay_s
    )
    counters = ChatCounters()
    deps = ChatDeps(
        db=db,
        hub=hub,
        models=models,
        config=config,
        watch=watch,
        inbox=inbox,
        policy=options.policy,
        tool_limits=options.tool_limits,
        counters=counters,
        max_running_chats_per_user=options.max_running_chats_per_user,
        workspace_root=options.workspace_root,
        workspace_limits=options.workspace_limits,
        titles=options.titles,
        title_model_config_id=options.title_model_config_id,
        title_timeout_s=options.title_timeout_s,
    )

    def factory(ctx: ActorContext) -> ActorBehavior:
        return ChatActor(ctx, deps)

    async def park(chat_id: UUID, fence: Fence, error: BaseException) -> None:
        chat = await park_chat(db, chat_id, fence, error)
        counters.errors[ErrorKind.GENERIC] += 1  # parked in error, as park_chat records it
        watch.publish(chat.owner_id, ChatStatusChanged(chat.id, chat.status, chat.archived))

    supervisor = Supervisor(
        db,
        options.worker_id,
        factory,
        park,
        shard_count=options.shard_count,
        lease_ttl_s=options.lease_ttl_s,
        mailbox_capacity=options.mailbox_capacity,
        idle_timeout_s=options.idle_timeout_s,
        restart_limit=options.restart_limit,
        restart_window_s=options.restart_window_s,
        ask_timeout_s=options.ask_timeout_s,
        db_retry_base_delay_s=options.db_retry_base_delay_s,
        db_retry_max_delay_s=options.db_retry_max_delay_s,
        resume_sweep_interval_s=options.resume_sweep_interval_s,
        link_url=options.link_url,
        handover_timeout_s=options.handover_timeout_s,
        # A stream of a chat that moved away ends with OwnerMoved; the web layer goes on
        # relaying it from the new owner at the client's cursor.
        # (Called once the supervisor runs, so the name below is bound by then.)
        on_shards_lost=lambda shards: hub.disown(shards, supervisor.shard_of),
    )
    try:
        # The cross-worker tasks listen before the first chat runs, and stop after the last
        # actor did, once what it published was sent (within db_retry_max_delay_s).
        async with trio.open_nursery() as relays:
            await relays.start(config.follow)
            await relays.start(bridge.run)
            async with trio.open_nursery() as nursery:
                await nursery.start(supervisor.run)
                yield Engine(
                    Router(supervisor, peers=peers),
                    hub,
                    supervisor,
                    models,
                    config,
                    watch,
                    inbox,
                    counters,
                    bridge,
                )
                supervisor.shutdown()
            with trio.move_on_after(options.db_retry_max_delay_s):
                await bridge.drained()
            relays.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await models.aclose()


async def park_chat(db: Database, chat_id: UUID, fence: Fence, error: BaseException) -> Chat:
    """A chat that keeps crashing its actor stops in ``error``, with the reason recorded;
    returns the chat as stored.

    Raises ``DatabaseUnavailable`` when the write cannot be made: the Supervisor retries it
    after a backoff, so the failure is logged once it is recorded, not at every attempt.
    """
    failure = ProviderFailure(
        kind=ErrorKind.GENERIC,
        provider="chatd",
        status_code=None,
        retryable=False,
        retry_after_s=None,
        message="This chat stopped after repeated internal errors.",
        detail=scrub_detail(f"{type(error).__name__}: {error}"),
    )
    committed = await chats.commit(
        db,
        fence,
        chat_id,
        [
            UpdateChat(
                status=ChatStatus.ERROR,
                last_error=failure.to_json(),
                retry_at=None,
                action_deadline=None,
            )
        ],
    )
    log.error("chat %s crashed too often; parked it in error", chat_id, exc_info=error)
    return committed.chat
