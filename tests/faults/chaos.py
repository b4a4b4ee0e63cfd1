"""A randomised workload under injected faults, then an independent check of what survived.

Several clients, each owning a few chats, do at random what users do: send messages (some
answered slowly, some calling the dynamic tool ``lookup``), edit earlier messages, interrupt,
answer tool calls, drop and resume their streams. Meanwhile a nemesis injects one fault at a
time: the database paused, cut or slowed (through the proxy), or chatd killed with SIGKILL and
restarted. After each fault it measures the recovery: the seconds from the fault's end until a
probe chat completes a turn again.

Every client logs each request (acknowledged or not, with ids) and what its streams delivered;
afterwards every chat's history is read through the API and ``tests.faults.checker`` reports
what was lost, duplicated or reordered. Zero is the only passing figure.

Used by ``tests/e2e/test_chaos.py`` (short) and ``python -m benchmarks.chaos`` (long).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from chatd.providers.fake import knobs_marker
from tests.faults.checker import Report, check, read_chats
from tests.faults.client import ApiClient, ChatStream, Op, settle
from tests.faults.world import FaultWorld

TOOLS = [{"name": "lookup", "description": "look something up"}]
FAULT_KINDS = ("pause", "cut", "delay", "kill", "commit", "kill_at_commit")
# Bytes that only the commits of chat writes send (see Trigger): a user message (its text
# "c<n>-m<k>-..."), an answer (the fake model's first word), tool results (their output).
COMMIT_MARKERS = (b"-m", b"w1 ", b"tool-output")
# How often each kind is picked: faults at a commit point hit the narrowest windows, so they
# come most often.
FAULT_WEIGHTS = {
    "pause": 1.0,
    "cut": 1.0,
    "delay": 0.5,
    "kill": 0.5,
    "commit": 2.0,
    "kill_at_commit": 1.0,
}
# How long an armed commit fault waits for its commit before it is withdrawn.
ARMED_S = 3.0


@dataclass(frozen=True)
class ChaosConfig:
    duration_s: float = 15.0
    clients: int = 3
    chats_per_client: int = 2
    # Mean faults per second of quiet time (a fault starts only after the last one was
    # recovered from); each lasts a random time in fault_length_s.
    fault_rate_per_s: float = 0.3
    fault_length_s: tuple[float, float] = (0.5, 2.5)
    fault_kinds: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    # Bounds: a request is retried this long; every chat must settle, and the probe recover,
    # within this long after the faults ended.
    op_deadline_s: float = 20.0
    settle_s: float = 30.0
    recovery_bound_s: float = 30.0
    think_s: float = 0.2  # the longest pause between a client's requests


@dataclass
class FaultRecord:
    kind: str
    started: float
    ended: float
    recovered_s: float | None = None  # None: not recovered within the bound


@dataclass
class ChaosResult:
    config: ChaosConfig
    report: Report
    faults: list[FaultRecord]
    ops: list[Op]
    elapsed_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def unrecovered(self) -> int:
        return sum(1 for f in self.faults if f.recovered_s is None)

    def figures(self) -> dict[str, Any]:
        recoveries = sorted(f.recovered_s for f in self.faults if f.recovered_s is not None)
        by_kind = {k: sum(1 for f in self.faults if f.kind.split(":")[0] == k) for k in FAULT_KINDS}
        return {
            **self.report.figures(),
            # Requests that needed more than one attempt: faults struck them in flight.
            "retried": sum(1 for op in self.ops if len(op.attempts) > 1),
            "faults": len(self.faults),
            **{f"faults_{k}": n for k, n in by_kind.items()},
            "unrecovered": self.unrecovered,
            "recovery_p50_s": round(statistics.median(recoveries), 2) if recoveries else None,
            "recovery_max_s": round(max(recoveries), 2) if recoveries else None,
            "elapsed_s": round(self.elapsed_s, 1),
            "seed": self.config.seed,
        }

    @property
    def ok(self) -> bool:
        return self.report.ok and self.unrecovered == 0

    def summary(self) -> str:
        lines = [", ".join(f"{k} {v}" for k, v in self.figures().items())]
        lines.extend(
            f"{f.kind} {f.ended - f.started:.1f} s: recovered {f.recovered_s}" for f in self.faults
        )
        lines.append(self.report.summary())
        lines.extend(self.notes)
        return "\n".join(lines)


async def run_chaos(world: FaultWorld, config: ChaosConfig) -> ChaosResult:
    """Run the workload and the nemesis on ``world`` (chatd started), then check."""
    rng = random.Random(config.seed)
    ops: list[Op] = []
    started = trio.current_time()
    clients = [
        _Client(
            ApiClient(f"c{n}", world.url, world.token, ops, op_deadline_s=config.op_deadline_s),
            random.Random(rng.random()),
            config,
        )
        for n in range(config.clients)
    ]
    probe_api = ApiClient("probe", world.url, world.token, [], op_deadline_s=config.op_deadline_s)
    checker_api = ApiClient("checker", world.url, world.token, [], op_deadline_s=30)
    faults: list[FaultRecord] = []
    notes: list[str] = []
    try:
        async with trio.open_nursery() as streams:
            for client in clients:
                await client.setup(streams)
            probe = await _Probe.open(probe_api, world, streams)
            stop_at = trio.current_time() + config.duration_s
            async with trio.open_nursery() as workload:
                for client in clients:
                    workload.start_soon(client.work, stop_at)
                workload.start_soon(
                    _nemesis, world, probe, random.Random(rng.random()), config, stop_at, faults
                )
            # The faults are over: every chat settles, every stream catches up.
            settled: list[ChatStream] = []
            for client in clients:
                for stream in client.streams.values():
                    try:
                        await settle(client.api, stream, deadline_s=config.settle_s)
                        settled.append(stream)
                    except trio.TooSlowError:
                        notes.append(
                            f"chat {stream.chat_id} not settled {config.settle_s:g} s after the"
                            f" end: stream status {stream.status!r} at seq {stream.last_seq}"
                        )
            chat_ids = [s.chat_id for c in clients for s in c.streams.values()]
            records = await read_chats(checker_api, chat_ids)
            all_streams = [s for c in clients for s in c.streams.values()]
            report = check(ops, records, all_streams, complete=settled)
            for stream in all_streams:
                stream.stop()
            probe.stream.stop()
    finally:
        for api in [*(c.api for c in clients), probe_api, checker_api]:
            await api.aclose()
    return ChaosResult(config, report, faults, ops, trio.current_time() - started, notes)


# -- the clients -------------------------------------------------------------------------------


class _Client:
    def __init__(self, api: ApiClient, rng: random.Random, config: ChaosConfig) -> None:
        self.api = api
        self.rng = rng
        self.config = config
        self.streams: dict[str, ChatStream] = {}
        self.counter = 0

    def text(self, **knobs: Any) -> str:
        self.counter += 1
        tag = f"{self.api.name}-m{self.counter}-{self.rng.getrandbits(32):08x}"
        return f"{tag} {knobs_marker(**knobs)}"

    def reply_knobs(self) -> dict[str, Any]:
        if self.rng.random() < 0.2:
            return {"tool_calls": [{"name": "lookup", "arguments": {"q": self.counter}}]}
        # Answers of up to a second or two, so that faults often strike turns in flight.
        return {
            "chunks": self.rng.randint(2, 30),
            "chunk_interval_ms": self.rng.choice([0, 20, 60]),
        }

    async def setup(self, nursery: trio.Nursery) -> None:
        for _ in range(self.config.chats_per_client):
            op = await self.api.create_chat(self.text(chunks=2), dynamic_tools=TOOLS)
            assert op.acked, f"setup failed: {op.describe()}"
            assert op.chat_id is not None
            stream = ChatStream(self.api.name, self.api.base_url, self.api.token, op.chat_id)
            self.streams[op.chat_id] = stream
            nursery.start_soon(stream.run)

    async def work(self, stop_at: float) -> None:
        actions: list[tuple[float, Callable[[str], Any]]] = [
            (0.40, self.send),
            (0.15, self.edit),
            (0.10, self.interrupt),
            (0.20, self.answer_tools),
            (0.15, self.reconnect),
        ]
        weights = [w for w, _ in actions]
        while trio.current_time() < stop_at:
            chat_id = self.rng.choice(list(self.streams))
            [action] = self.rng.choices([a for _, a in actions], weights)
            await action(chat_id)
            await trio.sleep(self.rng.uniform(0, self.config.think_s))  # a user's think time

    async def send(self, chat_id: str) -> None:
        await self.api.send(chat_id, self.text(**self.reply_knobs()))

    async def edit(self, chat_id: str) -> None:
        # An acknowledged user message of this chat that the client's stream still shows.
        held = set(self.streams[chat_id].held.values())
        mine = [
            op.message_id
            for op in self.api.log
            if op.chat_id == chat_id and op.acked and op.message_id in held
        ]
        if mine:
            target = self.rng.choice(mine)
            assert target is not None
            await self.api.edit(chat_id, target, self.text(**self.reply_knobs()))

    async def interrupt(self, chat_id: str) -> None:
        await self.api.interrupt(chat_id)

    async def answer_tools(self, chat_id: str) -> None:
        if self.streams[chat_id].status != "requires_action":
            return
        try:
            chat = await self.api.chat(chat_id)
        except trio.TooSlowError:
            return
        calls = [c["id"] for c in chat["pending_tool_calls"]]
        if calls:
            await self.api.tool_results(chat_id, calls)

    async def reconnect(self, chat_id: str) -> None:
        self.streams[chat_id].drop()


# -- the nemesis and the probe -----------------------------------------------------------------


@dataclass
class _Probe:
    """A chat of its own whose turns tell when chatd works again after a fault."""

    api: ApiClient
    stream: ChatStream

    @classmethod
    async def open(cls, api: ApiClient, world: FaultWorld, nursery: trio.Nursery) -> _Probe:
        op = await api.create_chat(f"probe {knobs_marker(chunks=1)}")
        assert op.acked, f"probe failed: {op.describe()}"
        assert op.chat_id is not None
        stream = ChatStream("probe", world.url, world.token, op.chat_id)
        nursery.start_soon(stream.run)
        await settle(api, stream, deadline_s=30)
        return cls(api, stream)

    async def turn(self, bound_s: float) -> bool:
        """One acknowledged message and its answer committed, within ``bound_s``."""
        with trio.move_on_after(bound_s):
            op = await self.api.send(self.stream.chat_id, f"probe {knobs_marker(chunks=1)}")
            if not op.acked:
                return False
            await settle(self.api, self.stream, deadline_s=bound_s)
            return True
        return False


async def _nemesis(
    world: FaultWorld,
    probe: _Probe,
    rng: random.Random,
    config: ChaosConfig,
    stop_at: float,
    faults: list[FaultRecord],
) -> None:
    proxy = world.proxy
    while True:
        # Quiet time before the next fault (exponential: faults arrive at random).
        await trio.sleep(rng.expovariate(config.fault_rate_per_s))
        if trio.current_time() >= stop_at:
            return
        [kind] = rng.choices(config.fault_kinds, [FAULT_WEIGHTS[k] for k in config.fault_kinds])
        length = rng.uniform(*config.fault_length_s)
        record = FaultRecord(kind, trio.current_time(), 0.0)
        if kind in ("commit", "kill_at_commit"):
            # At the commit of the next chat write of some kind: lost on its way
            # ("request") or done with its acknowledgement lost ("reply").
            at: Literal["request", "reply"] = rng.choice(("request", "reply"))
            marker = rng.choice(COMMIT_MARKERS)
            action: Literal["cut", "pause"] = "cut" if kind == "commit" else "pause"
            trigger = proxy.arm(marker, action=action, at=at)
            with trio.move_on_after(ARMED_S):
                await trigger.fired.wait()
            proxy.disarm(trigger)
            if not trigger.fired.is_set():
                continue  # no such commit came: no fault
            record.kind = f"{kind}:{at}"
            record.started = trio.current_time()
        if kind == "kill":
            await world.kill()
            await trio.sleep(length)  # chatd stays down this long
            await world.start()
        elif kind == "kill_at_commit":
            await world.kill()
            if at == "request":
                proxy.cut()  # the held commit dies with the process's connections
                proxy.restore()
            proxy.resume()
            await trio.sleep(length)  # chatd stays down this long
            await world.start()
        else:
            if kind == "pause":
                proxy.pause()
            elif kind == "cut":
                proxy.cut()
            elif kind == "delay":
                proxy.delay_s = rng.uniform(0.05, 0.3)
            await trio.sleep(length)  # the fault's length
            proxy.resume()
            proxy.restore()
            proxy.delay_s = 0.0
        record.ended = trio.current_time()
        faults.append(record)
        if await probe.turn(config.recovery_bound_s):
            record.recovered_s = trio.current_time() - record.ended
