"""ChatActor: the one writer of a chat's execution state.

For each message: ``decide`` (pure), commit what the decision writes in one fenced
transaction (inbox notifications included), then publish (the chat's events to the hub, the
owner's watch events and notifications to the user feeds), reply and start or stop work. The
generation of a model step runs as a child task in the actor's nursery: its parts go straight
to the hub, and its outcome comes back to the actor as a mailbox message (``StepCompleted``,
``GenerationFailed``).

A database outage ends the actor (``DatabaseUnavailable`` propagates; the Supervisor restarts it
after a backoff, see ``chatd.actors.supervisor``). When it cut the commit of the model's finished
work (a step, or the partial answer kept by an interrupt), that outcome is left in
``ActorContext.carried`` and the next incarnation, once it has reloaded the chat, commits it
instead of resuming: the answer is not generated again, and its stream's subscribers simply see
it committed. Whether the failed commit went through is unknown, so the outcome is applied only
if the reloaded chat still waits for it (running, or interrupting, in the same episode);
otherwise it was committed, or the chat moved on, and the chat resumes as usual. A commit that
went through although the outage reported it failed was never published: the restart publishes
what takes a subscriber from the state the previous incarnation had published to the reloaded
one (a history reset, new messages, error, status, queue, preview reset, pending calls, retry;
see ``ChatActor._catch_up``), and the hub drops them for a subscriber that already read it.

A user's command whose commit an outage cut while an answer streams does not end the actor (that
would throw the answer away): the command is refused (``CommandNotCommitted``, a 503 at the
edge) and the actor goes on *unsure* whether the commit went through. Before it handles anything
else it compares the stored chat with its own state: the same, and it is sure again; changed
(the commit went through), or still unreachable, and commands are refused at once while the
answer streams on, and any other message ends the actor as an outage, its restart reloading the
chat (and committing the finished answer it carries).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from uuid import UUID

import trio

from chatd.actors.behavior import ActorContext
from chatd.actors.chat_loader import ChatSetup, load_chat, read_stored_key, state_key
from chatd.actors.clock import WallClock
from chatd.actors.feeds import UserFeed
from chatd.actors.hub import ChatHub
from chatd.actors.models import ModelCatalog, ModelUnavailable
from chatd.actors.persist import writes_for
from chatd.domain import compaction
from chatd.domain.agent_prompts import SUMMARY_SYSTEM, TITLE_SYSTEM
from chatd.domain.chat_state import ChatPolicy, ChatState
from chatd.domain.chat_status import ChatStatus
from chatd.domain.content_json import parts_from_json, tool_spec_to_json
from chatd.domain.conversation import (
    Message,
    ModelRequest,
    SummaryPart,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    ToolSpec,
)
from chatd.domain.decide import decide
from chatd.domain.effects import (
    ArmActionDeadline,
    ArmRetryTimer,
    CancelGeneration,
    Decision,
    DisarmTimers,
    Effect,
    MessageAccepted,
    Notify,
    Publish,
    Refusal,
    Reply,
    RunTools,
    StartGeneration,
    TransitionNotAllowed,
    UnknownTarget,
)
from chatd.domain.events import (
    ActionRequired,
    ChatEvent,
    CommittedMessage,
    Episode,
    ErrorRaised,
    HistoryReset,
    MessagePart,
    PreviewReset,
    QueueUpdated,
    RetryScheduled,
    StatusChanged,
)
from chatd.domain.mailbox import (
    ActionDeadlineFired,
    EditMessage,
    GenerationFailed,
    GenerationStopped,
    IdempotencyMark,
    Keyed,
    MailboxMessage,
    Resumed,
    RetryTimerFired,
    SendMessage,
    StepCompleted,
    Summarized,
    ToolResult,
    ToolsCompleted,
)
from chatd.domain.provider_failure import ErrorKind, ProviderFailure
from chatd.domain.step_assembler import StepAssembler
from chatd.domain.stream_parts import Usage
from chatd.domain.watch_events import (
    ChatActionRequired,
    ChatCreated,
    ChatDeleted,
    ChatStatusChanged,
    ChatTitleChanged,
    WatchEvent,
)
from chatd.histogram import Histogram
from chatd.providers.base import ModelProvider
from chatd.providers.errors import ProviderError
from chatd.store import chats, tool_journal
from chatd.store.chats import ClaimRun, CreateChat, MarkIdempotencyKey
from chatd.store.config_cache import ConfigCache
from chatd.store.database import Database, DatabaseUnavailable
from chatd.store.records import Chat, InboxNotification
from chatd.tools.dynamic import ToolLimits, validate_dynamic_tools
from chatd.tools.registry import (
    DEFAULT_TOOLS,
    ToolContext,
    enabled_specs,
    has_side_effects,
    remove_workspace,
    run_builtin,
    workspace_for,
)
from chatd.tools.workspace import WorkspaceLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CreateChatRequest:
    """Create the chat with its first user message (the edge made both ids)."""

    owner_id: UUID
    message_id: UUID
    text: str
    title: str = ""
    system_prompt: str = ""
    model_config_id: UUID | None = None
    dynamic_tools: tuple[ToolSpec, ...] = ()
    # The chat's own allow-list of built-in tools (validated names); None: its model config's.
    tools: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ChatCreatedReply(MessageAccepted):
    """The reply to ``CreateChatRequest``: the first message accepted, and the chat as its
    creation committed it (so the edge answers without reading it back)."""

    chat: Chat


def _zero_per_kind() -> dict[ErrorKind, int]:
    return dict.fromkeys(ErrorKind, 0)


@dataclass(slots=True)
class ChatCounters:
    """What the chats of this process did, for ``/metrics``: plain ints bumped on the trio
    thread where each thing happens, so counting costs nothing next to a turn.

    ``turns``: model turns ended by the model's outcome (see ``ends_turn``). ``retries``:
    provider retries scheduled. ``errors``: chats stopped in ``error``, by the kind of the
    failure (every kind present from the start, so a series exists before its first error).
    ``input_tokens``/``output_tokens``: the usage providers reported, counted when committed
    (a title's when it is made).
    """

    turns: int = 0
    retries: int = 0
    errors: dict[ErrorKind, int] = field(default_factory=_zero_per_kind)
    # Tokens the provider reported for every model call (answers, summaries, titles).
    input_tokens: int = 0
    output_tokens: int = 0
    # Seconds from a model step's start to its first streamed part, and from a turn's first
    # step to the outcome that ended it (``ends_turn``).
    first_token: Histogram = field(default_factory=Histogram)
    turn_duration: Histogram = field(default_factory=Histogram)


@dataclass(frozen=True, slots=True)
class ChatDeps:
    """What every chat actor of the process shares."""

    db: Database
    hub: ChatHub
    models: ModelCatalog
    config: ConfigCache
    watch: UserFeed[WatchEvent]
    inbox: UserFeed[InboxNotification]
    policy: ChatPolicy = field(default_factory=ChatPolicy)
    clock: WallClock = field(default_factory=WallClock)
    tool_limits: ToolLimits = field(default_factory=ToolLimits)
    counters: ChatCounters = field(default_factory=ChatCounters)
    # How long stopping a generation may take before the actor gives up waiting for it.
    cancel_grace_s: float = 10.0
    # A user command that would start a run is refused while its owner has this many chats
    # running (checked in the run's commit, exact across workers), admins included; 0:
    # no limit, and no check at all (no ClaimRun: no lock, no statement in the commit).
    max_running_chats_per_user: int = 0
    # Workspaces of the built-in file and command tools: <workspace_root>/<chat id>.
    workspace_root: Path = field(default_factory=lambda: Path(".chatd/workspaces"))
    workspace_limits: WorkspaceLimits = field(default_factory=WorkspaceLimits)
    # A chat without a title gets one made by a model after its first answer (with the
    # model config ``title_model_config_id``, or the chat's own when None), within
    # ``title_timeout_s``.
    titles: bool = False
    title_model_config_id: UUID | None = None
    title_timeout_s: float = 60.0
    title_max_chars: int = 80


@dataclass
class _Generation:
    """The chat's work in progress between two commits: a model step (its parts in
    ``assembler``), a summary call, or the built-in tools of a committed step (the results of
    the calls done so far in ``tool_results``)."""

    episode: Episode
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    assembler: StepAssembler = field(default_factory=StepAssembler)
    tool_results: list[ToolResultPart] = field(default_factory=list)


# A summary call that answered nothing: retried like a failed step.
EMPTY_SUMMARY = ProviderFailure(
    kind=ErrorKind.GENERIC,
    provider="chatd",
    status_code=None,
    retryable=True,
    retry_after_s=None,
    message="The model returned an empty summary of the conversation.",
    detail="the summary call answered no text",
)

# What a side-effecting call gets when a restart finds it started but not finished.
OUTCOME_UNKNOWN = json.dumps(
    {
        "error": "outcome unknown",
        "detail": "this call started before chatd restarted and whether it finished is not"
        " known; it was not run again. Check its effect before repeating it.",
    }
)


class ChatActor:
    # One per active chat, kept while it hibernates: slotted, with no per-actor timer dict
    # until a timer is armed.
    __slots__ = (
        "_ctx",
        "_deps",
        "_generation",
        "_history",
        "_seqs",
        "_setup",
        "_state",
        "_summary",
        "_timers",
        "_title_wanted",
        "_turn_started",
        "_unsure",
        "_usages",
    )

    def __init__(self, ctx: ActorContext, deps: ChatDeps) -> None:
        self._ctx = ctx
        self._deps = deps
        self._state: ChatState | None = None
        self._setup: ChatSetup | None = None
        # What the next prompt needs: the messages after the newest summary boundary (their
        # seqs, the usage reported for each answer) and that summary's text.
        self._history: list[Message] = []
        self._seqs: list[int] = []
        self._usages: list[Usage | None] = []
        self._summary = ""
        self._title_wanted = False
        self._generation: _Generation | None = None
        self._timers: dict[str, trio.CancelScope] = {}
        # A commit of ours failed on an outage: whether it went through is not known yet.
        self._unsure = False
        # When the turn in progress started its first model step (trio clock), for metrics.
        self._turn_started: float | None = None

    # -- the behavior the runtime drives -----------------------------------------------------

    async def start(self) -> None:
        loaded = await load_chat(self._deps.db, self._ctx.chat_id)
        if loaded is None:
            return  # a chat about to be created
        self._state = loaded.state
        self._setup = loaded.setup
        self._history = list(loaded.history)
        self._seqs = list(loaded.message_seqs)
        self._usages = list(loaded.usages)
        self._summary = loaded.summary
        self._title_wanted = loaded.untitled and self._deps.titles
        published = self._ctx.carried.get(_PUBLISHED)
        if isinstance(published, ChatState):
            await self._catch_up(published)
            del self._ctx.carried[_PUBLISHED]  # only once published (the read may fail too)
        outcome = self._ctx.carried.pop(_CUT_SHORT, None)
        if isinstance(outcome, StepCompleted | GenerationStopped) and awaits(self._state, outcome):
            log.info("chat %s commits the outcome a database outage cut short", self._ctx.chat_id)
            await self._decide(outcome)
            return
        await self._decide(Resumed())

    async def handle(self, message: object) -> object:
        mark: IdempotencyMark | None = None
        if isinstance(message, Keyed):
            # Handled as without the key; its mark rides on the commit that records it.
            mark = message.mark
            message = message.command
        if isinstance(message, CreateChatRequest):
            return await self._create(message, mark)
        if not isinstance(message, MailboxMessage):
            raise TypeError(f"a chat actor cannot handle {message!r}")
        if self._state is None:
            raise UnknownTarget("chat", self._ctx.chat_id)
        return await self._decide(message, mark)

    def passivatable(self) -> bool:
        if self._state is None:
            return True
        idle = self._state.status in (ChatStatus.WAITING, ChatStatus.ERROR)
        generating = self._generation is not None and not self._generation.done.is_set()
        return idle and not generating and not self._timers

    def turn_in_progress(self) -> bool:
        # The model's answer streams: stopping now would throw it away (the next owner would
        # generate it again). Its outcome, once queued, is the host's business (in_turn).
        return self._streaming()

    @property
    def state(self) -> ChatState | None:
        return self._state

    # -- deciding and committing -------------------------------------------------------------

    async def _decide(self, message: MailboxMessage, mark: IdempotencyMark | None = None) -> object:
        assert self._state is not None
        if self._unsure:
            await self._settle(message)
        before = self._state
        decision = decide(before, message, now=self._deps.clock.now(), policy=self._deps.policy)
        claim = self._run_claim(message, before, decision.state)
        try:
            return await self._apply(
                decision,
                ended_turn=ends_turn(message, before, decision.state),
                claim=claim,
                mark=mark,
            )
        except DatabaseUnavailable as exc:
            # What subscribers were told last; the commit may still have gone through.
            self._ctx.carried[_PUBLISHED] = before
            self._unsure = True
            self._end_or_refuse(message, exc)

    async def _settle(self, message: MailboxMessage) -> None:
        """After a commit whose outcome is unknown: return once the stored chat is the one in
        memory (the commit did not go through); otherwise refuse ``message`` or end the actor
        (``_end_or_refuse``)."""
        assert self._state is not None
        try:
            stored = await read_stored_key(self._deps.db, self._ctx.chat_id)
        except DatabaseUnavailable as exc:
            self._end_or_refuse(message, exc)
        if stored == state_key(self._state):
            self._unsure = False
            self._ctx.carried.pop(_PUBLISHED, None)
            return
        self._end_or_refuse(
            message, DatabaseUnavailable("a commit reported failed went through: reloading")
        )

    def _end_or_refuse(self, message: MailboxMessage, cause: DatabaseUnavailable) -> NoReturn:
        """Unsure of the stored chat: refuse a user's command while an answer streams (ending
        the actor would throw the answer away); else end the actor, leaving a finished outcome
        for its restart to commit after reloading."""
        if self._streaming() and not isinstance(message, _INTERNAL):
            raise CommandNotCommitted(str(cause)) from cause
        if isinstance(message, StepCompleted | GenerationStopped):
            # The model's work is done, only its commit failed: the restart commits it.
            self._ctx.carried[_CUT_SHORT] = message
        raise cause

    def _streaming(self) -> bool:
        generation = self._generation
        return generation is not None and not generation.done.is_set()

    async def _catch_up(self, published: ChatState) -> None:
        """Publish what takes a subscriber from ``published`` to the reloaded state.

        ``published`` is the state the previous incarnation had published before a database
        outage ended it, on a commit whose outcome was unknown: if that commit went through,
        nobody told the chat's subscribers or its owner's list. Whatever that commit was (an
        edit, a step, a retry, a queued message...), the events are derived from the two
        states, not from the lost decision, in the order ``_events`` publishes them live:

        - ``HistoryReset`` when messages that were live are gone (an edit truncated the
          history): a subscriber that stayed connected must drop them, and its cursor only
          moves forward, so no reconnect could repair it later;
        - the messages committed after ``published``'s last one;
        - ``ErrorRaised`` for a chat now in ``error`` (before the status it explains);
        - ``StatusChanged`` and ``QueueUpdated`` when they moved;
        - ``PreviewReset`` when a new generation episode is to stream, ``ActionRequired``
          when tool calls now wait on the owner, ``RetryScheduled`` for a newly armed retry.

        This is the snapshot a reconnecting client gets (``stream_snapshot``), taken from the
        last published state rather than from each subscriber's cursor: the actor knows what
        it published, which is what every live subscriber holds. The lost commit's
        transaction id is unknown, so the exactly-once cut cannot use it: the events go out
        with the key of the stored state (``ChatHub.publish_recovered``), and a subscriber
        whose own snapshot read that state (it subscribed between the database's return and
        this restart) skips them.
        """
        assert self._state is not None
        assert self._setup is not None
        state = self._state
        events: list[ChatEvent] = []
        # The last message the subscribers hold that is still live: the edited turn's
        # messages after it are gone (the new ones have higher seqs, and come below).
        kept = max((s for s in self._seqs if s <= published.last_message_seq), default=0)
        if kept < published.last_message_seq:
            events.append(HistoryReset(state.history_version, kept))
        if state.last_message_seq > published.last_message_seq:
            rows = await chats.list_messages(
                self._deps.db, self._ctx.chat_id, after_seq=published.last_message_seq, limit=100
            )
            events += [
                CommittedMessage(m.id, m.seq, m.role, parts_from_json(m.content), m.history_version)
                for m in rows
            ]
        events += hidden_state_events(published, state, now=self._deps.clock.now())
        if events:
            log.info("chat %s publishes a commit an outage hid from it", self._ctx.chat_id)
            stored = state_key(state)
            if stored != state_key(published):
                # Skipped by a subscriber whose own snapshot read the commit.
                self._deps.hub.publish_recovered(self._ctx.chat_id, events, state=stored)
            else:  # cannot happen (every event comes with a key change): rather twice than never
                self._deps.hub.publish(self._ctx.chat_id, events)
        owner = self._setup.owner_id
        if (published.status, published.archived) != (state.status, state.archived):
            self._deps.watch.publish(
                owner, ChatStatusChanged(self._ctx.chat_id, state.status, state.archived)
            )
        for event in events:
            if isinstance(event, ActionRequired):
                self._deps.watch.publish(
                    owner, ChatActionRequired(self._ctx.chat_id, event.calls, event.deadline)
                )

    def _run_claim(
        self, message: MailboxMessage, before: ChatState, after: ChatState
    ) -> ClaimRun | None:
        """The limit check of a user's command that starts a new run (from waiting, error or
        requires_action). A message queued behind a run, a queued message started when a run
        ends, tool results, retries and resumes continue a run: never refused."""
        limit = self._deps.max_running_chats_per_user
        if not limit or not isinstance(message, SendMessage | EditMessage):
            return None
        if before.status in _RUN_STATUSES or after.status is not ChatStatus.RUNNING:
            return None
        assert self._setup is not None
        return ClaimRun(owner_id=self._setup.owner_id, limit=limit)

    async def _create(self, request: CreateChatRequest, mark: IdempotencyMark | None) -> object:
        if self._state is not None:
            raise TransitionNotAllowed("existing", "creating the chat again")
        chat_id = self._ctx.chat_id
        declared = [tool_spec_to_json(t) for t in request.dynamic_tools]
        tools = validate_dynamic_tools(declared, self._deps.tool_limits)
        setup = ChatSetup(
            request.owner_id, request.system_prompt, request.model_config_id, tools, request.tools
        )
        empty = ChatState(chat_id)
        decision = decide(
            empty,
            SendMessage(request.message_id, request.text),
            now=self._deps.clock.now(),
            policy=self._deps.policy,
        )
        create = CreateChat(
            id=chat_id,
            owner_id=request.owner_id,
            shard=self._ctx.fence.shard,
            title=request.title,
            system_prompt=request.system_prompt,
            model_config_id=request.model_config_id,
            dynamic_tools=declared,
            tools=request.tools,
        )
        self._state = empty
        self._setup = setup
        self._title_wanted = not request.title and self._deps.titles
        claim = self._run_claim(
            SendMessage(request.message_id, request.text), empty, decision.state
        )
        try:
            return await self._apply(decision, create=create, claim=claim, mark=mark)
        except BaseException:
            self._state = None
            self._setup = None
            raise

    async def _apply(
        self,
        decision: Decision,
        *,
        create: CreateChat | None = None,
        ended_turn: bool = False,
        claim: ClaimRun | None = None,
        mark: IdempotencyMark | None = None,
    ) -> object:
        assert self._state is not None
        assert self._setup is not None
        if decision.delete:
            return await self._delete(decision, mark)
        before = self._state
        owner = self._setup.owner_id
        writes = writes_for(before, decision, owner_id=owner)
        if claim is not None:
            writes.insert(0, claim)  # before the run's UpdateChat; after the chat's creation
        if mark is not None:
            # The key is marked done by the command's own commit (a command that changes
            # nothing commits the mark alone): a retry after a lost answer then knows it was
            # done. First, so that a superseded attempt is refused before anything else.
            writes.insert(0, MarkIdempotencyKey(mark))
        if create is not None:
            writes.insert(0, create)
        notifications: tuple[InboxNotification, ...] = ()
        stored: Chat | None = None
        xid: int | None = None
        if writes:
            committed = await chats.commit(
                self._deps.db, self._ctx.fence, self._ctx.chat_id, writes
            )
            notifications = committed.notifications
            stored = committed.chat
            xid = committed.xid
        self._state = decision.state
        self._count(decision, ended_turn=ended_turn)
        self._remember(decision)
        # With the commit's id: a subscriber whose snapshot read this commit skips its events.
        self._deps.hub.publish(self._ctx.chat_id, self._events(before, decision), commit=xid)
        for event in self._watch_events(before, decision, create):
            self._deps.watch.publish(owner, event)
        for notification in notifications:
            self._deps.inbox.publish(owner, notification)
        reply: object = None
        for effect in decision.effects:
            reply = await self._run(effect, reply)
        if ended_turn and self._title_wanted:
            self._title_wanted = False
            self._ctx.nursery.start_soon(self._make_title)
        if create is not None:
            assert stored is not None
            assert isinstance(reply, MessageAccepted)
            return ChatCreatedReply(reply.message_id, reply.queued, stored)
        return reply

    async def _delete(self, decision: Decision, mark: IdempotencyMark | None) -> object:
        """Stop what runs, delete the chat (one fenced commit), then its workspace; the actor
        then knows the chat no more (every later command: unknown chat)."""
        assert self._setup is not None
        await self._stop_generation()
        for scope in self._timers.values():
            scope.cancel()
        self._timers.clear()
        chat_id = self._ctx.chat_id
        await chats.delete_chat(self._deps.db, self._ctx.fence, chat_id, mark=mark)
        self._state = None
        self._history, self._seqs, self._usages = [], [], []
        self._deps.watch.publish(self._setup.owner_id, ChatDeleted(chat_id))
        await remove_workspace(self._deps.workspace_root, chat_id)
        return next((e.value for e in decision.effects if isinstance(e, Reply)), None)

    def _count(self, decision: Decision, *, ended_turn: bool) -> None:
        """Count what the committed decision did (for metrics)."""
        counters = self._deps.counters
        if ended_turn:
            counters.turns += 1
            if self._turn_started is not None:
                counters.turn_duration.observe(trio.current_time() - self._turn_started)
        if ended_turn or decision.state.status is not ChatStatus.RUNNING:
            self._turn_started = None  # ended, or stopped (interrupted, edited, deleted)
        for message in decision.messages:
            if message.usage is not None:
                counters.input_tokens += message.usage.input_tokens
                counters.output_tokens += message.usage.output_tokens
        for effect in decision.effects:
            if isinstance(effect, Publish):
                for event in effect.events:
                    if isinstance(event, RetryScheduled):
                        counters.retries += 1
                        self._log_failure(event.failure, retry_in_s=event.delay_s)
                    elif isinstance(event, ErrorRaised):
                        counters.errors[event.failure.kind] += 1
                        self._log_failure(event.failure, retry_in_s=None)

    def _log_failure(self, failure: ProviderFailure, *, retry_in_s: float | None) -> None:
        """One warning per failed model step: retried in so many seconds, or given up."""
        outcome = "gave up" if retry_in_s is None else f"retry in {retry_in_s:.1f} s"
        log.warning(
            "chat %s: provider %s failed (%s, status %s): %s; %s",
            self._ctx.chat_id,
            failure.provider,
            failure.kind.value,
            failure.status_code,
            failure.detail or failure.message,
            outcome,
            extra={
                "chat_id": str(self._ctx.chat_id),
                "provider": failure.provider,
                "kind": failure.kind.value,
                "status": failure.status_code,
                "retry_in_s": retry_in_s,
            },
        )

    def _remember(self, decision: Decision) -> None:
        """Keep the history the next model request needs, without reading it back: from the
        newest summary boundary on, so memory is bounded by the context, not the history."""
        if decision.truncate_after_seq is not None:
            keep = sum(1 for s in self._seqs if s <= decision.truncate_after_seq)
            del self._history[keep:], self._seqs[keep:], self._usages[keep:]
        for m in decision.messages:
            summary = m.parts[0] if m.role == "summary" and m.parts else None
            if isinstance(summary, SummaryPart):
                cut = sum(1 for s in self._seqs if s <= summary.through_seq)
                del self._history[:cut], self._seqs[:cut], self._usages[:cut]
                # What was reported for the kept answers measured the old, longer prompt.
                self._usages = [None] * len(self._usages)
                self._summary = summary.text
                continue
            self._history.append(Message(m.role, m.parts))
            self._seqs.append(m.seq)
            self._usages.append(m.usage)

    def _events(self, before: ChatState, decision: Decision) -> list[ChatEvent]:
        """Resets first, then the new messages, then an error (before the status it explains,
        so that a client never sees ``error`` without its details), then status and queue, then
        the rest."""
        after = decision.state
        explicit = [
            e for effect in decision.effects if isinstance(effect, Publish) for e in effect.events
        ]
        events: list[ChatEvent] = [e for e in explicit if isinstance(e, HistoryReset)]
        events += [
            CommittedMessage(m.id, m.seq, m.role, m.parts, m.history_version)
            for m in decision.messages
        ]
        events += [e for e in explicit if isinstance(e, ErrorRaised)]
        if (before.status, before.archived, before.episode) != (
            after.status,
            after.archived,
            after.episode,
        ):
            events.append(
                StatusChanged(
                    after.status, after.archived, after.history_version, after.generation_attempt
                )
            )
        if before.queue != after.queue:
            events.append(QueueUpdated(after.queue))
        events += [e for e in explicit if not isinstance(e, HistoryReset | ErrorRaised)]
        return events

    def _watch_events(
        self, before: ChatState, decision: Decision, create: CreateChat | None
    ) -> list[WatchEvent]:
        """What the owner's chat list must learn: creation (with the status the decision left),
        a status or archived change, and calls waiting for the owner's tool results."""
        chat_id = self._ctx.chat_id
        after = decision.state
        events: list[WatchEvent] = []
        if create is not None:
            events.append(ChatCreated(chat_id, create.title, after.status, after.archived))
        elif (before.status, before.archived) != (after.status, after.archived):
            events.append(ChatStatusChanged(chat_id, after.status, after.archived))
        events += [
            ChatActionRequired(chat_id, event.calls, event.deadline)
            for effect in decision.effects
            if isinstance(effect, Publish)
            for event in effect.events
            if isinstance(event, ActionRequired)
        ]
        return events

    # -- effects -----------------------------------------------------------------------------

    async def _run(self, effect: Effect, reply: object) -> object:
        match effect:
            case Reply(value=value):
                return value
            case Publish():
                pass  # published with the commit's other events
            case StartGeneration(episode=episode):
                if self._turn_started is None:
                    self._turn_started = trio.current_time()
                await self._stop_generation()
                self._start_generation(episode)
            case RunTools():
                await self._stop_generation()
                generation = _Generation(effect.episode)
                self._generation = generation
                self._ctx.nursery.start_soon(self._run_tools, generation, effect)
            case CancelGeneration(keep_partial=keep):
                running = self._generation
                parts = await self._stop_generation()
                if keep and running is not None:
                    self._ctx.tell_self(GenerationStopped(running.episode, parts))
            case ArmRetryTimer(episode=episode, at=at):
                self._arm("retry", at, RetryTimerFired(episode))
            case ArmActionDeadline(history_version=version, at=at):
                self._arm("action", at, ActionDeadlineFired(version))
            case DisarmTimers():
                for scope in self._timers.values():
                    scope.cancel()
                self._timers.clear()
            case Notify():
                pass  # written with the commit (persist.writes_for) and published after it
        return reply

    def _arm(self, name: str, at: float, message: MailboxMessage) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        scope = trio.CancelScope()
        self._timers[name] = scope

        async def fire() -> None:
            with scope:
                await self._deps.clock.sleep_until(at)
                if self._timers.get(name) is scope:
                    del self._timers[name]
                self._ctx.tell_self(message)

        self._ctx.nursery.start_soon(fire)

    # -- generation --------------------------------------------------------------------------

    def _start_generation(self, episode: Episode) -> None:
        generation = _Generation(episode)
        self._generation = generation
        self._ctx.nursery.start_soon(self._generate, generation)

    async def _stop_generation(self) -> tuple[Any, ...]:
        """Cancel the running generation and wait for it; return its complete parts so far."""
        generation, self._generation = self._generation, None
        if generation is None:
            return ()
        generation.scope.cancel()
        with trio.move_on_after(self._deps.cancel_grace_s):
            await generation.done.wait()
        # A model step's complete parts, or (while tools ran) the results of finished calls.
        return (*generation.assembler.content(complete_calls_only=True), *generation.tool_results)

    async def _generate(self, generation: _Generation) -> None:
        assert self._setup is not None
        assert self._state is not None
        setup = self._setup
        episode = generation.episode
        chat_id = self._ctx.chat_id
        compacting = self._state.compacting
        started = trio.current_time()
        try:
            with generation.scope:
                try:
                    model = await self._deps.models.resolve(setup.model_config_id)
                except ModelUnavailable as exc:
                    self._finished(GenerationFailed(episode, exc.failure))
                    return
                user_prompt = await self._deps.config.user_prompt(setup.owner_id)
                system = compaction.system_with_summary(
                    system_text(setup.system_prompt, user_prompt), self._summary
                )
                tokens = compaction.prompt_tokens(system, self._history, self._usages)
                too_big = compaction.over_threshold(
                    tokens, model.context_limit, model.compression_threshold
                )
                if (compacting or too_big) and await self._summarize(
                    generation, model.provider, model.model, whole=compacting
                ):
                    return
                request = ModelRequest(
                    model=model.model,
                    messages=tuple(self._history),
                    system=system,
                    tools=(
                        *enabled_specs(self._enabled_tools(model.tools)),
                        *setup.dynamic_tools,
                    ),
                    options=model.options,
                )
                seq = 0
                try:
                    async with model.provider.stream(request) as parts:
                        async for part in parts:
                            generation.assembler.add(part)
                            seq += 1
                            if seq == 1:
                                first = trio.current_time() - started
                                self._deps.counters.first_token.observe(first)
                            self._deps.hub.publish(chat_id, (MessagePart(episode, seq, part),))
                except ProviderError as exc:
                    self._finished(GenerationFailed(episode, exc.failure))
                    return
                self._finished(self._step(generation, setup))
        finally:
            generation.done.set()

    async def _summarize(
        self, generation: _Generation, provider: ModelProvider, model: str, *, whole: bool
    ) -> bool:
        """Make the summary the prompt needs first and report it (``Summarized``, or a
        ``GenerationFailed`` retried like any step); False when there is nothing to summarize
        (the prompt goes as it is, and a provider that finds it too long says so)."""
        cut = compaction.summary_cut(self._history, whole=whole)
        if cut is None:
            if whole:  # asked for by hand, with nothing new: the boundary stays where it is
                seq = self._seqs[-1] if self._seqs else 0
                self._finished(Summarized(generation.episode, self._summary, seq, None))
            return whole
        request = ModelRequest(
            model=model,
            messages=(
                Message(
                    "user",
                    (
                        TextPart(
                            compaction.summary_request_text(self._summary, self._history[:cut])
                        ),
                    ),
                ),
            ),
            system=SUMMARY_SYSTEM,
        )
        try:
            text, usage = await _complete(provider, request)
        except ProviderError as exc:
            self._finished(GenerationFailed(generation.episode, exc.failure))
            return True
        if not text.strip():  # a boundary with nothing in it would lose the history: retry
            self._finished(GenerationFailed(generation.episode, EMPTY_SUMMARY))
            return True
        self._finished(Summarized(generation.episode, text.strip(), self._seqs[cut - 1], usage))
        return True

    def _enabled_tools(self, model_tools: tuple[str, ...]) -> tuple[str, ...]:
        assert self._setup is not None
        return self._setup.tools if self._setup.tools is not None else model_tools

    async def _run_tools(self, generation: _Generation, run: RunTools) -> None:
        """Answer the built-in calls of a committed step, one after the other. A call with side
        effects is journalled: its intent committed before it runs, its result after; a call
        found started by an earlier run is not run again (its stored result, or "outcome
        unknown")."""
        assert self._setup is not None
        chat_id = self._ctx.chat_id
        db, fence = self._deps.db, self._ctx.fence
        try:
            with generation.scope:
                try:
                    model_tools = (
                        await self._deps.models.resolve(self._setup.model_config_id)
                    ).tools
                except ModelUnavailable:
                    model_tools = DEFAULT_TOOLS
                enabled = self._enabled_tools(model_tools)
                context = ToolContext(
                    workspace_for(self._deps.workspace_root, chat_id), self._deps.workspace_limits
                )
                journalled = [
                    c for c in run.calls if c.name in enabled and has_side_effects(c.name)
                ]
                found = (
                    await tool_journal.entries(db, chat_id, run.message_seq) if journalled else {}
                )
                results: list[ToolResult] = []
                for call in run.calls:
                    part = ToolCallPart(call.id, call.name, call.arguments)
                    if call in journalled:
                        earlier = found.get(call.id) or await tool_journal.record_intent(
                            db,
                            fence,
                            chat_id,
                            message_seq=run.message_seq,
                            call_id=call.id,
                            tool=call.name,
                        )
                        if earlier is not None:
                            result = ToolResult(call.id, earlier.result or OUTCOME_UNKNOWN)
                        else:
                            result = await run_builtin(part, context, enabled)
                            await tool_journal.record_result(
                                db,
                                fence,
                                chat_id,
                                message_seq=run.message_seq,
                                call_id=call.id,
                                result=result.output,
                            )
                    else:
                        result = await run_builtin(part, context, enabled)
                    results.append(result)
                    generation.tool_results.append(ToolResultPart(call.id, result.output))
                self._finished(ToolsCompleted(run.episode, tuple(results)))
        finally:
            generation.done.set()

    async def _make_title(self) -> None:
        """Name the chat after its first answer, unless it has a name by then. Best effort: a
        failure is logged, and the chat stays untitled."""
        assert self._setup is not None
        setup, chat_id = self._setup, self._ctx.chat_id
        first = next((m for m in self._history if m.role == "user"), None)
        if first is None:
            return
        text = "".join(p.text for p in first.parts if isinstance(p, TextPart))[:2000]
        with trio.move_on_after(self._deps.title_timeout_s):
            try:
                model = await self._deps.models.resolve(
                    self._deps.title_model_config_id or setup.model_config_id
                )
                request = ModelRequest(
                    model=model.model,
                    messages=(Message("user", (TextPart(text),)),),
                    system=TITLE_SYSTEM,
                    max_output_tokens=64,
                )
                answer, usage = await _complete(model.provider, request)
                title = " ".join(answer.split()).strip("\"'")[: self._deps.title_max_chars]
                if title and await chats.set_generated_title(self._deps.db, chat_id, title):
                    self._deps.watch.publish(setup.owner_id, ChatTitleChanged(chat_id, title))
                if usage is not None:
                    await chats.add_usage(
                        self._deps.db, chat_id, usage.input_tokens, usage.output_tokens
                    )
                    self._deps.counters.input_tokens += usage.input_tokens
                    self._deps.counters.output_tokens += usage.output_tokens
            except (ProviderError, ModelUnavailable, DatabaseUnavailable) as exc:
                log.warning("chat %s got no title: %s", chat_id, exc)

    def _step(self, generation: _Generation, setup: ChatSetup) -> StepCompleted:
        dynamic_names = {t.name for t in setup.dynamic_tools}
        calls = generation.assembler.tool_calls()
        return StepCompleted(
            generation.episode,
            generation.assembler.content(),
            generation.assembler.usage,
            builtin_calls=tuple(c for c in calls if c.name not in dynamic_names),
            dynamic_calls=tuple(c for c in calls if c.name in dynamic_names),
        )

    def _finished(self, outcome: MailboxMessage) -> None:
        # ``self._generation`` stays set until the next start or stop: an interrupt that
        # arrives before this outcome is processed still finds the parts it must keep.
        self._ctx.tell_self(outcome)


# A chat in these counts against its owner's running limit: the count of migration 0003.
_RUN_STATUSES = (ChatStatus.RUNNING, ChatStatus.INTERRUPTING)


class CommandNotCommitted(Refusal, DatabaseUnavailable):
    """The command was refused: the database became unreachable (its commit failed, or it may
    have gone through and the chat must be reloaded first). A 503 at the edge; the chat's
    answer in progress streams on."""


# Messages of the chat's own making (never refused back to a user).
_INTERNAL = (
    StepCompleted,
    ToolsCompleted,
    Summarized,
    GenerationFailed,
    GenerationStopped,
    RetryTimerFired,
    ActionDeadlineFired,
    Resumed,
)

# The keys of ``ActorContext.carried``: the outcome whose commit an outage cut, and the state
# that the incarnation it ended had published.
_CUT_SHORT = "outcome whose commit failed"
_PUBLISHED = "state published"


def hidden_state_events(published: ChatState, state: ChatState, *, now: float) -> list[ChatEvent]:
    """The events other than resets and messages that take a subscriber from ``published`` to
    ``state`` (see ``ChatActor._catch_up``), in the order they go out live: an error before
    the status it explains, status, queue, then a new episode's preview reset, the calls
    waiting on the owner and a newly armed retry (``now``: wall-clock epoch seconds)."""
    events: list[ChatEvent] = []
    failure = state.last_error
    failed_anew = (published.status, published.last_error) != (state.status, failure)
    if state.status is ChatStatus.ERROR and failure is not None and failed_anew:
        events.append(ErrorRaised(failure))
    moved = (published.status, published.archived) != (state.status, state.archived)
    if moved or published.episode != state.episode:
        events.append(
            StatusChanged(
                state.status, state.archived, state.history_version, state.generation_attempt
            )
        )
    if state.queue != published.queue:
        events.append(QueueUpdated(state.queue))
    running = state.status is ChatStatus.RUNNING
    if running and state.retry_at is None and published.episode != state.episode:
        events.append(PreviewReset(state.episode))
    waits = state.status is ChatStatus.REQUIRES_ACTION and state.pending_calls
    if waits and (published.status, published.pending_calls) != (state.status, state.pending_calls):
        events.append(ActionRequired(state.pending_calls, state.action_deadline or 0.0))
    at = state.retry_at
    if running and at is not None and failure is not None and at != published.retry_at:
        events.append(RetryScheduled(state.retry_count + 1, max(0.0, at - now), failure, at))
    return events


def awaits(state: ChatState, outcome: StepCompleted | GenerationStopped) -> bool:
    """Whether the (reloaded) chat still waits for ``outcome``: the episode it belongs to is the
    current one, and the chat is generating it (a step) or stopping it (kept partial output)."""
    if outcome.episode != state.episode:
        return False
    if isinstance(outcome, StepCompleted):
        return state.generating
    return state.status is ChatStatus.INTERRUPTING


def ends_turn(message: MailboxMessage, before: ChatState, after: ChatState) -> bool:
    """Whether ``message`` ends a model turn: the model's outcome (a step, or a failure) ends
    the run, because the chat now waits, needs the client's tool results, failed for good, or
    goes on to its next queued message. A step whose built-in tool results the model goes on
    with, a retried failure, a stale outcome and a run the user interrupted or edited do not.
    """
    if not isinstance(message, StepCompleted | ToolsCompleted | GenerationFailed):
        return False
    if before.status is not ChatStatus.RUNNING:
        return False
    next_queued = len(after.user_messages) > len(before.user_messages)
    return after.status is not ChatStatus.RUNNING or next_queued


async def _complete(provider: ModelProvider, request: ModelRequest) -> tuple[str, Usage | None]:
    """One model call whose answer nobody watches stream (a summary, a title): its text and
    usage, collected from the provider's stream, so the same adapters, silence limits and
    failure classification apply."""
    assembler = StepAssembler()
    async with provider.stream(request) as parts:
        async for part in parts:
            assembler.add(part)
    text = "".join(p.text for p in assembler.content() if isinstance(p, TextPart))
    return text, assembler.usage


def system_text(system_prompt: str, user_prompt: str | None) -> str:
    """The model's system text: the chat's system prompt, then the user's custom prompt."""
    return "\n\n".join(p for p in (system_prompt, user_prompt or "") if p.strip())
