"""Run a chat load: create the chats, follow their streams, run the turns, sample the server.

Every simulated client is one chat: created over HTTP with a short setup turn, followed on its
stream WebSocket for the whole run, then given ``turns`` turns. All of it goes through chatd's
SDK (``chatd.client.AsyncClient``): one client shares a few HTTP connections among the chats,
and each chat's ``stream()`` is a lean WebSocket read by one task. A turn is timed from the
moment its message is sent: acceptance (the HTTP answer), first output (the first
``message_part`` on the stream) and end (the chat back to ``waiting``, or ``error``). All chats
finish setup before the first turn starts, so the server's figures for the turn phase hold
turns only.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, get_args

import msgspec
import trio

from chatd.client import (
    AsyncClient,
    ChatdError,
    ChatStream,
    MessagePartEvent,
    NotFound,
    RetryEvent,
    StatusEvent,
    StreamEvent,
    UnknownEvent,
    User,
)
from chatd.client.events import KnownEvent
from chatd.providers.fake import Scenario, knobs_marker, open_fake_llm
from chatd.scaletest.prometheus import ServerMetrics, parse_metrics
from chatd.scaletest.run import ChatLoad, Recorder
from chatd.tuning import freeze_startup_objects

log = logging.getLogger(__name__)

_PROGRESS_INTERVAL_S = 0.5
_CLEANUP_TIMEOUT_S = 30.0
_ADMIN_CONNECTIONS = 2  # setup and cleanup, a request at a time
_RETRY_MAX_DELAY_S = 2.0  # a loaded server's 429/503 is tried again soon, not after 10 s
_ENDED = frozenset({"waiting", "error", "requires_action"})
_EVENT_TYPES: dict[type, str] = {cls: cls.__struct_config__.tag for cls in get_args(KnownEvent)}


class SetupFailed(Exception):
    """A step the run needed before any load failed: nothing was measured."""


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    try:
        yield
    except ChatdError as exc:
        raise SetupFailed(f"{what}: {exc}") from None


def load_client(load: ChatLoad, token: str, *, connections: int) -> AsyncClient:
    """A client for the run: ``http_max_attempts`` tries per request; thousands of simulated
    clients share its ``connections``, so waiting for a free one is the driver's own queue,
    not the server's slowness, and is bounded by the run's timeout (no pool timeout)."""
    return AsyncClient(
        load.url,
        token,
        timeout_s=load.http_timeout_s,
        max_retries=load.http_max_attempts - 1,
        max_connections=connections,
        pool_timeout_s=None,
        retry_max_delay_s=_RETRY_MAX_DELAY_S,
        reconnect_give_up_s=load.turn_timeout_s,
    )


async def add_fake_model(
    client: AsyncClient, *, name: str, llm_url: str, kind: Literal["openai", "anthropic"]
) -> tuple[str, str]:
    """A provider pointing at the fake LLM and a model config on it (not the default): their
    ids, provider first (to remove them afterwards)."""
    base_url = llm_url.rstrip("/") + ("/v1" if kind == "openai" else "")
    provider_kind = "openai-compatible" if kind == "openai" else "anthropic"
    provider = await client.create_provider(
        name, provider_kind, base_url=base_url, api_key="scaletest"
    )
    config = await client.create_model_config(
        provider.id, name, "fake-model", context_limit=1_000_000
    )
    return provider.id, config.id


@dataclass(slots=True)
class _Turn:
    started: float
    setup: bool = False
    running_seen: bool = False
    first_output: float | None = None
    status: str = ""
    ended: trio.Event = field(default_factory=trio.Event)


@dataclass(slots=True)
class ServerSample:
    """One read of the server's ``/metrics`` (empty when it had none) and when it was read."""

    at: float
    metrics: dict[str, float]


@dataclass(slots=True)
class RunResult:
    load: ChatLoad
    recorder: Recorder
    started_at: float  # wall clock (epoch s)
    setup_s: float
    turns_s: float
    timed_out: bool
    before: ServerSample | None
    after_setup: ServerSample | None
    after: ServerSample | None
    peak_rss_bytes: float | None
    http_retries: int
    user: User  # who ran the chats: a user of the run's own


class _Chat:
    """One simulated client: its chat, its stream reader, and the turn in flight."""

    def __init__(self, index: int, recorder: Recorder) -> None:
        self.index = index
        self.id = ""
        self.turn: _Turn | None = None
        self.done = trio.Event()
        self.setup_reported = False
        self.reconnects = 0  # the stream's, as last seen
        self._recorder = recorder

    def on_event(self, event: StreamEvent) -> None:
        recorder, turn = self._recorder, self.turn
        kind = event.type if isinstance(event, UnknownEvent) else _EVENT_TYPES[type(event)]
        recorder.events[kind] += 1
        if isinstance(event, RetryEvent):
            recorder.provider_retries += 1
        if turn is None or turn.ended.is_set():
            return
        if isinstance(event, MessagePartEvent):
            if turn.first_output is None:
                turn.first_output = time.perf_counter()
        elif isinstance(event, StatusEvent):
            if event.status == "running":
                turn.running_seen = True
            elif event.status in _ENDED and (turn.running_seen or turn.setup):
                turn.status = event.status
                turn.ended.set()


class ChatLoadRun:
    def __init__(self, load: ChatLoad, client: AsyncClient, model_config_id: str) -> None:
        self.load = load
        self.client = client
        self.model_config_id = model_config_id
        self.recorder = Recorder()
        self._setup_left = load.chats
        self._all_set = trio.Event()
        self._go = trio.Event()
        self._idle: deque[_Chat] = deque()
        self._marker = knobs_marker(
            chunks=load.chunks,
            first_chunk_delay_ms=load.first_chunk_delay_ms,
            chunk_interval_ms=load.chunk_interval_ms,
        )
        self._setup_marker = knobs_marker(chunks=1)
        self.phase = "setup"
        self.turns_started_at: float | None = None

    async def run(self, on_all_set: Callable[[], Awaitable[None]]) -> None:
        """Set every chat up, call ``on_all_set`` (it samples the server), then run the turns."""
        load = self.load
        chats = [_Chat(i, self.recorder) for i in range(load.chats)]
        async with trio.open_nursery() as clients:
            for chat in chats:
                clients.start_soon(self._client, chat)
            await self._all_set.wait()
            await on_all_set()
            self.phase = "turns"
            self.turns_started_at = time.perf_counter()
            self._go.set()
            if load.rate is not None:
                await self._open_loop()
                for chat in chats:
                    chat.done.set()

    async def _client(self, chat: _Chat) -> None:
        offset = chat.index * self.load.ramp_s / self.load.chats
        await trio.sleep(offset)
        try:
            await self._create(chat)
        except ChatdError as exc:
            self.recorder.error("create", f"create a chat: {exc}")
            self._setup_finished(chat, ready=False)
            return
        try:
            await self._follow(chat, offset)
        except* ChatdError as group:  # the stream's handshake refused, or no connection
            first = group.exceptions[0]
            self.recorder.error("stream", f"chat {chat.id}: {type(first).__name__}: {first}")
        finally:
            self._setup_finished(chat, ready=False)  # nothing if it was already reported

    async def _follow(self, chat: _Chat, offset: float) -> None:
        """Hold the chat's stream open from its setup turn to its last turn."""
        async with self.client.stream(chat.id) as events, trio.open_nursery() as inner:
            inner.start_soon(self._read, chat, events)
            ready = await self._await_turn(chat, "setup")
            self._setup_finished(chat, ready=ready)
            if ready and self.load.rate is None:
                await self._go.wait()
                await trio.sleep(offset)
                await self._closed_loop(chat)
            elif ready:
                self._idle.append(chat)  # before the first arrival
                await chat.done.wait()
            inner.cancel_scope.cancel()

    def _setup_finished(self, chat: _Chat, *, ready: bool) -> None:
        if chat.setup_reported:
            return
        chat.setup_reported = True
        if ready:
            self.recorder.chats_ready += 1
        self._setup_left -= 1
        if self._setup_left == 0:
            self._all_set.set()

    async def _read(self, chat: _Chat, events: ChatStream) -> None:
        """Hand each event to the chat. A stream the server closed is resumed from its cursor
        by the SDK (nothing lost or repeated) but still counted as a stream error; one that
        cannot be resumed ends the turn in flight."""
        failure = "no more events"
        try:
            async for event in events:
                if events.reconnects != chat.reconnects:
                    chat.reconnects = events.reconnects
                    self.recorder.error(
                        "stream", f"chat {chat.id}: the server closed the stream (resumed)"
                    )
                chat.on_event(event)
        except (ChatdError, msgspec.DecodeError) as exc:
            failure = f"{type(exc).__name__}: {exc}"
        self.recorder.error("stream", f"chat {chat.id}: the stream ended: {failure}")
        if chat.turn is not None:
            chat.turn.status = "stream_closed"
            chat.turn.ended.set()

    async def _create(self, chat: _Chat) -> None:
        chat.turn = _Turn(time.perf_counter(), setup=True)
        started = time.perf_counter()
        created = await self.client.create_chat(
            f"{self.load.prompt} (setup)\n{self._setup_marker}",
            title=f"{self.load.run_id} #{chat.index}",
            model_config_id=self.model_config_id,
        )
        self.recorder.create_ms.append((time.perf_counter() - started) * 1000)
        chat.id = created.id

    async def _await_turn(self, chat: _Chat, stage: str) -> bool:
        turn = chat.turn
        assert turn is not None
        with trio.move_on_after(self.load.turn_timeout_s):
            await turn.ended.wait()
            if turn.status == "waiting":
                return True
            self.recorder.error(stage, f"chat {chat.id} ended the turn in {turn.status}")
            return False
        self.recorder.error(
            f"{stage}_timeout", f"chat {chat.id}: no end of turn in {self.load.turn_timeout_s} s"
        )
        return False

    async def _closed_loop(self, chat: _Chat) -> None:
        for number in range(self.load.turns):
            if not await self._turn(chat, number):
                return

    async def _open_loop(self) -> None:
        """Start turns at ``rate`` per second on idle chats, whatever the server's pace."""
        assert self.load.rate is not None
        interval = 1 / self.load.rate
        planned = self.load.planned_turns
        async with trio.open_nursery() as turns:
            start = trio.current_time()
            for arrival in range(planned):
                await trio.sleep_until(start + arrival * interval)
                if not self._idle:  # every chat is busy: the server is behind the rate
                    self.recorder.arrivals_missed += 1
                    continue
                chat = self._idle.popleft()
                turns.start_soon(self._open_loop_turn, chat, arrival)

    async def _open_loop_turn(self, chat: _Chat, number: int) -> None:
        if await self._turn(chat, number):
            self._idle.append(chat)

    async def _turn(self, chat: _Chat, number: int) -> bool:
        load, recorder = self.load, self.recorder
        started = time.perf_counter()
        chat.turn = turn = _Turn(started)
        try:
            await self.client.send_message(chat.id, f"{load.prompt} #{number + 1}\n{self._marker}")
        except ChatdError as exc:
            recorder.error("accept", f"send a message: {exc}")
            return False
        recorder.accept_ms.append((time.perf_counter() - started) * 1000)
        if not await self._await_turn(chat, "turn"):
            return False
        ended = time.perf_counter()
        if turn.first_output is None:
            recorder.error("turn", f"chat {chat.id}: the turn ended without a message_part")
            return False
        recorder.first_output_ms.append((turn.first_output - started) * 1000)
        recorder.turn_ms.append((ended - started) * 1000)
        recorder.turns_completed += 1
        return True


async def run_chat_load(
    load: ChatLoad, on_progress: Callable[[ChatLoadRun], None] | None = None
) -> RunResult:
    """The whole run, bounded by ``load.timeout_s``: setup, turns, server samples.

    The admin token adds the provider and model config and a user of the run's own
    (``scaletest-<8 hex>``) with a token; every chat is that user's, so none shows in the
    admin's chat list or inbox. At the end the token is revoked and the provider and model
    config removed, unless ``load.keep``. Raises ``SetupFailed`` when the run could not start
    (an unreachable server, a token that is not an admin's, a refused setup request)."""
    async with contextlib.AsyncExitStack() as stack:
        llm_url = load.llm_url
        if llm_url is None:
            llm = await stack.enter_async_context(open_fake_llm(Scenario(), record=False))
            llm_url = llm.url
        admin = await stack.enter_async_context(
            load_client(load, load.token, connections=_ADMIN_CONNECTIONS)
        )
        metrics = ServerMetrics(load.url, load.token, timeout_s=load.http_timeout_s)
        stack.push_async_callback(metrics.aclose)
        with _step("read the token's user"):
            me = await admin.me()
        if not me.is_admin:
            raise SetupFailed(
                "check the token: the load driver needs an admin token "
                "(chatd token create --user NAME --admin)"
            )
        name = f"scaletest-{load.run_id}"[:100]
        with _step("add the provider and model config"):
            provider_id, model_config_id = await add_fake_model(
                admin, name=name, llm_url=llm_url, kind=load.llm_kind
            )
        what = f"the provider and model config {name}"
        if load.keep:
            log.info("%s stay (--keep)", what)
        else:
            remove = partial(_remove_model, admin, provider_id, model_config_id)
            stack.push_async_callback(_undo, what, "removed", remove)
        with _step("add the run's user and its token"):
            user = await admin.create_user(f"scaletest-{secrets.token_hex(4)}")
            token = await admin.create_token(user.id, label=f"scaletest {load.run_id}"[:100])
        client = await stack.enter_async_context(
            load_client(load, token.token, connections=load.http_connections)
        )
        what = f"the token of user {user.name}"
        if load.keep:
            log.info("%s stays (--keep); the run's chats are that user's (id %s)", what, user.id)
        else:
            # Revoked as its user (DELETE /users/me/tokens/{id}): the admin does not own it.
            revoke = partial(client.revoke_token, token.id)
            stack.push_async_callback(_undo, what, "revoked", revoke)
        return await _measure(
            load,
            admin=admin,
            client=client,
            user=user,
            metrics=metrics,
            model_config_id=model_config_id,
            on_progress=on_progress,
        )
    raise AssertionError("unreachable")  # pragma: no cover - the stack never swallows


async def _remove_model(admin: AsyncClient, provider_id: str, config_id: str) -> None:
    """Chats that used the config are left without one, and follow the default."""
    with contextlib.suppress(NotFound):
        await admin.delete_model_config(config_id)
    with contextlib.suppress(NotFound):
        await admin.delete_provider(provider_id)


async def _undo(what: str, done: str, undo: Callable[[], Awaitable[None]]) -> None:
    """Undo something the run made on the server (remove the provider and model config,
    revoke the token), whatever ended the run (a Ctrl-C included, within a bound): a server is
    not left with a config pointing at a fake LLM that is gone, nor with a live token nobody
    holds."""
    with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT_S) as bound:
        try:
            await undo()
        except ChatdError as exc:
            log.warning("%s: left on the server: %s", what, exc)
            return
        log.info("%s %s (--keep keeps it)", done, what)
    if bound.cancelled_caught:
        log.warning("%s: left on the server: no answer in %g s", what, _CLEANUP_TIMEOUT_S)


async def _measure(
    load: ChatLoad,
    *,
    admin: AsyncClient,
    client: AsyncClient,
    user: User,
    metrics: ServerMetrics,
    model_config_id: str,
    on_progress: Callable[[ChatLoadRun], None] | None,
) -> RunResult:
    """The run itself: ``client`` (``user``'s) runs the chats; ``admin`` made them possible,
    and both count toward the HTTP retries."""
    run = ChatLoadRun(load, client, model_config_id)
    started_at = time.time()
    before = await _sample(metrics)
    samples: dict[str, ServerSample | None] = {}
    peak = _Peak()
    start = time.perf_counter()

    async def all_set() -> None:
        # The clients live until the end: out of the collector's sight, they cannot make
        # the driver pause (and distort what it measures) during the turns.
        freeze_startup_objects()
        samples["after_setup"] = await _sample(metrics)

    timed_out = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sample_rss, metrics, load.metrics_interval_s, peak)
        if on_progress is not None:
            nursery.start_soon(_report_progress, run, on_progress)
        with trio.move_on_after(load.timeout_s):
            await run.run(all_set)
            timed_out = False
        nursery.cancel_scope.cancel()
    end = time.perf_counter()
    after = await _sample(metrics)
    recorder = run.recorder
    if timed_out:
        recorder.error("run_timeout", f"the run did not finish in {load.timeout_s} s")
    recorder.turns_failed = load.planned_turns - recorder.turns_completed - recorder.arrivals_missed
    turns_start = run.turns_started_at or end
    for sample in (before, samples.get("after_setup"), after):
        if sample is not None:
            peak.see(sample)
    return RunResult(
        load=load,
        recorder=run.recorder,
        started_at=started_at,
        setup_s=turns_start - start,
        turns_s=end - turns_start,
        timed_out=timed_out,
        before=before,
        after_setup=samples.get("after_setup"),
        after=after,
        peak_rss_bytes=peak.value,
        http_retries=admin.retries + client.retries,
        user=user,
    )


@dataclass(slots=True)
class _Peak:
    value: float | None = None

    def see(self, sample: ServerSample) -> None:
        rss = sample.metrics.get("process_resident_memory_bytes")
        if rss is not None and (self.value is None or rss > self.value):
            self.value = rss


async def _sample(metrics: ServerMetrics) -> ServerSample | None:
    text = await metrics.text()
    return None if text is None else ServerSample(time.perf_counter(), parse_metrics(text))


async def _sample_rss(metrics: ServerMetrics, interval_s: float, peak: _Peak) -> None:
    while True:
        await trio.sleep(interval_s)
        sample = await _sample(metrics)
        if sample is None:
            return
        peak.see(sample)


async def _report_progress(run: ChatLoadRun, on_progress: Callable[[ChatLoadRun], None]) -> None:
    while True:
        on_progress(run)
        await trio.sleep(_PROGRESS_INTERVAL_S)
