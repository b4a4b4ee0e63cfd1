"""Run a chat load: create the chats, follow their streams, run the turns, sample the server.

Every simulated client is one chat: created over HTTP with a short setup turn, followed on its
stream WebSocket for the whole run, then given ``turns`` turns. A turn is timed from the moment
its message is sent: acceptance (the HTTP answer), first output (the first ``message_part``
on the stream) and end (the chat back to ``waiting``, or ``error``). All chats finish setup
before the first turn starts, so the server's figures for the turn phase hold turns only.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import trio

from chatd.providers.fake import Scenario, knobs_marker, open_fake_llm
from chatd.scaletest.api import ChatdApi, RequestFailed
from chatd.scaletest.prometheus import parse_metrics
from chatd.scaletest.run import ChatLoad, Recorder
from chatd.scaletest.websocket import HandshakeRefused, connect
from chatd.tuning import freeze_startup_objects

log = logging.getLogger(__name__)

_PROGRESS_INTERVAL_S = 0.5
_CLEANUP_TIMEOUT_S = 30.0
_ENDED = frozenset({"waiting", "error", "requires_action"})


class _Event(msgspec.Struct):
    """The fields of a stream event the driver reads; the rest is skipped by the decoder."""

    type: str
    status: str | None = None


_decode_frame = msgspec.json.Decoder(_Event | list[_Event]).decode


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


class _Chat:
    """One simulated client: its chat, its stream reader, and the turn in flight."""

    def __init__(self, index: int, recorder: Recorder) -> None:
        self.index = index
        self.id = ""
        self.turn: _Turn | None = None
        self.done = trio.Event()
        self.setup_reported = False
        self._recorder = recorder

    def on_frame(self, text: str) -> None:
        try:
            decoded = _decode_frame(text)
        except msgspec.DecodeError as exc:
            self._recorder.error("stream", f"undecodable frame: {exc}")
            return
        for event in decoded if isinstance(decoded, list) else (decoded,):
            self._on_event(event)

    def _on_event(self, event: _Event) -> None:
        recorder, turn = self._recorder, self.turn
        recorder.events[event.type] += 1
        if event.type == "retry":
            recorder.provider_retries += 1
        if turn is None or turn.ended.is_set():
            return
        if event.type == "message_part":
            if turn.first_output is None:
                turn.first_output = time.perf_counter()
        elif event.type == "status" and event.status is not None:
            if event.status == "running":
                turn.running_seen = True
            elif event.status in _ENDED and (turn.running_seen or turn.setup):
                turn.status = event.status
                turn.ended.set()


class ChatLoadRun:
    def __init__(self, load: ChatLoad, api: ChatdApi, model_config_id: str) -> None:
        self.load = load
        self.api = api
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
        address = urlsplit(load.url)
        scheme = "wss" if address.scheme == "https" else "ws"
        self._ws_base = urlunsplit((scheme, address.netloc, "/api/v1/chats", "", ""))
        self._headers = [(b"authorization", f"Bearer {load.token}".encode())]
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
        except RequestFailed as exc:
            self.recorder.error("create", str(exc))
            self._setup_finished(chat, ready=False)
            return
        try:
            await self._follow(chat, offset)
        except* (HandshakeRefused, OSError, trio.BrokenResourceError) as group:
            first = group.exceptions[0]
            self.recorder.error("stream", f"chat {chat.id}: {type(first).__name__}: {first}")
        finally:
            self._setup_finished(chat, ready=False)  # nothing if it was already reported

    async def _follow(self, chat: _Chat, offset: float) -> None:
        """Hold the chat's stream open from its setup turn to its last turn."""
        url = f"{self._ws_base}/{chat.id}/stream"
        connection = connect(url, self._headers, timeout_s=self.load.http_timeout_s)
        async with connection as ws, trio.open_nursery() as inner:
            inner.start_soon(self._read, chat, ws.read)
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

    async def _read(self, chat: _Chat, read: Callable[[Callable[[str], None]], Any]) -> None:
        closed = await read(chat.on_frame)
        reason = f"{closed.code} {closed.reason}"
        self.recorder.error("stream", f"chat {chat.id}: the server closed the stream: {reason}")
        if chat.turn is not None:
            chat.turn.status = "stream_closed"
            chat.turn.ended.set()

    async def _create(self, chat: _Chat) -> None:
        chat.turn = _Turn(time.perf_counter(), setup=True)
        started = time.perf_counter()
        created = await self.api.create_chat(
            f"{self.load.prompt} (setup)\n{self._setup_marker}",
            title=f"{self.load.run_id} #{chat.index}",
            model_config_id=self.model_config_id,
        )
        self.recorder.create_ms.append((time.perf_counter() - started) * 1000)
        chat.id = str(created["id"])

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
            await self.api.send_message(chat.id, f"{load.prompt} #{number + 1}\n{self._marker}")
        except RequestFailed as exc:
            recorder.error("accept", str(exc))
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
    """The whole run, bounded by ``load.timeout_s``: setup, turns, server samples."""
    async with contextlib.AsyncExitStack() as stack:
        llm_url = load.llm_url
        if llm_url is None:
            llm = await stack.enter_async_context(open_fake_llm(Scenario(), record=False))
            llm_url = llm.url
        api = ChatdApi(
            load.url,
            load.token,
            connections=load.http_connections,
            timeout_s=load.http_timeout_s,
            max_attempts=load.http_max_attempts,
        )
        stack.push_async_callback(api.aclose)
        await api.check_admin()
        name = f"scaletest-{load.run_id}"[:100]
        provider_id, model_config_id = await api.add_provider_and_model(
            name=name, llm_url=llm_url, kind=load.llm_kind
        )
        if load.keep:
            log.info("the provider and model config %s stay (--keep)", name)
        else:
            stack.push_async_callback(_remove_model, api, name, provider_id, model_config_id)
        return await _measure(load, api, model_config_id, on_progress)
    raise AssertionError("unreachable")  # pragma: no cover - the stack never swallows


async def _remove_model(api: ChatdApi, name: str, provider_id: str, config_id: str) -> None:
    """The run's provider and model config go, whatever ended the run (a Ctrl-C included,
    within a bound): a server is not left with a config pointing at a fake LLM that is gone."""
    with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT_S) as bound:
        try:
            await api.remove_model(provider_id, config_id)
        except RequestFailed as exc:
            log.warning("the provider and model config %s were left on the server: %s", name, exc)
            return
        log.info("removed the provider and model config %s (--keep keeps them)", name)
    if bound.cancelled_caught:
        log.warning(
            "the provider and model config %s were left on the server: no answer in %g s",
            name,
            _CLEANUP_TIMEOUT_S,
        )


async def _measure(
    load: ChatLoad,
    api: ChatdApi,
    model_config_id: str,
    on_progress: Callable[[ChatLoadRun], None] | None,
) -> RunResult:
    run = ChatLoadRun(load, api, model_config_id)
    started_at = time.time()
    before = await _sample(api)
    samples: dict[str, ServerSample | None] = {}
    peak = _Peak()
    start = time.perf_counter()

    async def all_set() -> None:
        # The clients live until the end: out of the collector's sight, they cannot make
        # the driver pause (and distort what it measures) during the turns.
        freeze_startup_objects()
        samples["after_setup"] = await _sample(api)

    timed_out = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sample_rss, api, load.metrics_interval_s, peak)
        if on_progress is not None:
            nursery.start_soon(_report_progress, run, on_progress)
        with trio.move_on_after(load.timeout_s):
            await run.run(all_set)
            timed_out = False
        nursery.cancel_scope.cancel()
    end = time.perf_counter()
    after = await _sample(api)
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
        http_retries=api.retries.http,
    )


@dataclass(slots=True)
class _Peak:
    value: float | None = None

    def see(self, sample: ServerSample) -> None:
        rss = sample.metrics.get("process_resident_memory_bytes")
        if rss is not None and (self.value is None or rss > self.value):
            self.value = rss


async def _sample(api: ChatdApi) -> ServerSample | None:
    text = await api.metrics()
    return None if text is None else ServerSample(time.perf_counter(), parse_metrics(text))


async def _sample_rss(api: ChatdApi, interval_s: float, peak: _Peak) -> None:
    while True:
        await trio.sleep(interval_s)
        sample = await _sample(api)
        if sample is None:
            return
        peak.see(sample)


async def _report_progress(run: ChatLoadRun, on_progress: Callable[[ChatLoadRun], None]) -> None:
    while True:
        on_progress(run)
        await trio.sleep(_PROGRESS_INTERVAL_S)
