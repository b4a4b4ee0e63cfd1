"""The fault matrix: chatd as a real process, PostgreSQL behind a proxy the test breaks.

Each case runs one turn of a chat through one fault: the database down before the turn, down
or stalled mid-stream, gone at the commit of the answer or of tool results (the commit lost, or
done with its acknowledgement lost), and chatd killed with SIGKILL mid-stream or at the commit
of a message. The client behaves as a careful one does: it retries a failed request with the
same ``Idempotency-Key`` and keeps its stream open, reconnecting from its cursor. After the
fault ends, each case checks the three promises:

- every acknowledged (2xx) write is present exactly once (and nothing refused is present);
- the chat is not left running: it waits on someone again within ``RECOVERY_S``;
- the stream the client resumed delivered every message and part exactly once, in order
  (``tests/faults/checker.py``), and holds the whole final history.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal
from uuid import uuid4

import pytest
import trio

from chatd.providers.fake import knobs_marker
from tests.faults.checker import check, read_chats
from tests.faults.client import ApiClient, ChatStream, Event, Op, settle, text_of
from tests.faults.world import LEASE_TTL_S, FaultWorld, open_fault_world

pytestmark = pytest.mark.slow

# After a fault ends, the chat must wait on someone again within this bound.
RECOVERY_S = 20.0
# How long each outage lasts: longer than the statement timeout (2 s), so chatd sees
# statements fail, and shorter than the lease TTL, so it keeps its shards (see FAST_SETTINGS).
OUTAGE_S = 2.5
# A chatd restarted on the same home is the same worker: it takes its shards back at once
# rather than after its old leases expire, so a killed chat's turn ends well within the TTL.
RESTART_RECOVERY_S = 4.0
assert RESTART_RECOVERY_S < LEASE_TTL_S - 3
# A client gives up retrying a request after this long (it is acknowledged within a few
# seconds of the fault's end, or never).
OP_DEADLINE_S = 20.0
# Bounds on waits for things the test set in motion.
DEADLINE_S = 20.0
TOOLS = [{"name": "lookup", "description": "look something up"}]


def reply(chunks: int) -> str:
    """The fake model's answer with ``chunks`` chunks."""
    return "".join(f"w{i} " for i in range(1, chunks + 1))


def answer_marker(chunks: int) -> bytes:
    """Bytes only the commit of that answer sends: its last word, then the JSON string's end."""
    return f'w{chunks} "'.encode()


@dataclass
class Case:
    world: FaultWorld
    api: ApiClient
    stream: ChatStream
    chat_id: str
    ops: list[Op]
    nursery: trio.Nursery

    def text(self, label: str, **knobs: Any) -> str:
        """A unique message text, with fake-model knobs."""
        return f"{label}-{uuid4().hex} {knobs_marker(**knobs)}"

    async def wait_for_event(self, predicate: Callable[[Event], bool], after: int) -> None:
        """Until the stream delivers, past its first ``after`` events, one that matches."""
        with trio.fail_after(DEADLINE_S):
            await self.stream.changes.wait_until(
                lambda: any(predicate(e) for e in self.stream.all_events()[after:])
            )

    async def wait_for_part(self, text: str, after: int) -> None:
        await self.wait_for_event(
            lambda e: e.get("type") == "message_part" and e["part"].get("text") == text, after
        )

    async def background(self, start: Callable[[], Any]) -> Op:
        """Run an op in the background; returns the op as soon as it is issued."""
        issued = len(self.ops)
        self.nursery.start_soon(start)
        with trio.fail_after(DEADLINE_S):
            await self.api.changes.wait_until(lambda: len(self.ops) > issued)
        return self.ops[issued]

    async def done(self, op: Op) -> None:
        with trio.fail_after(self.api.op_deadline_s + DEADLINE_S):
            await self.api.changes.wait_until(lambda: op.done_at is not None)
        assert op.acked, f"never acknowledged: {op.describe()}\n{self.tail()}"

    async def outage(self, kind: Literal["cut", "pause"]) -> None:
        """The database is gone (cut) or stalled (pause) for OUTAGE_S; the client's stream
        drops at its start and resumes from its cursor."""
        proxy = self.world.proxy
        proxy.cut() if kind == "cut" else proxy.pause()
        self.stream.drop()
        await trio.sleep(OUTAGE_S)  # the outage's length, not a wait for a condition
        proxy.restore()
        proxy.resume()

    async def verify(self, recovery_s: float = RECOVERY_S) -> list[dict[str, Any]]:
        """The three promises (see the module docstring); returns the final history."""
        try:
            await settle(self.api, self.stream, deadline_s=recovery_s)
        except trio.TooSlowError:
            chat = await self.api.chat(self.chat_id)
            raise AssertionError(
                f"chat {chat['status']!r} {recovery_s:g} s after the fault ended, its stream"
                f" {self.stream.status!r} at seq {self.stream.last_seq}"
                f" (chat last_message_seq {chat['last_message_seq']})\n{self.tail()}"
            ) from None
        records = await read_chats(self.api, [self.chat_id])
        report = check(self.ops, records, [self.stream], complete=[self.stream])
        assert report.ok, f"{report.summary()}\n{self.tail()}"
        return records[self.chat_id].history

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.world.output().splitlines()[-lines:])


@contextlib.asynccontextmanager
async def fault_case(database_url: str) -> AsyncIterator[Case]:
    """chatd behind the proxy, one chat (dynamic tool ``lookup``) after a first quick turn,
    and its stream open."""
    async with open_fault_world(database_url) as world, trio.open_nursery() as nursery:
        ops: list[Op] = []
        api = ApiClient("client", world.url, world.token, ops, op_deadline_s=OP_DEADLINE_S)
        try:
            created = await api.create_chat(
                f"first-{uuid4().hex} {knobs_marker(chunks=2)}", dynamic_tools=TOOLS
            )
            assert created.acked, created.describe()
            assert created.chat_id is not None
            stream = ChatStream("client", world.url, world.token, created.chat_id)
            nursery.start_soon(stream.run)
            await settle(api, stream, deadline_s=DEADLINE_S)
            yield Case(world, api, stream, created.chat_id, ops, nursery)
            stream.stop()
        finally:
            await api.aclose()


def assert_answered(history: list[dict[str, Any]], after_text: str, answer: str) -> None:
    """Exactly one answer follows the user message ``after_text`` (and its tool steps)."""
    [start] = [
        i
        for i, m in enumerate(history)
        if m["role"] == "user" and text_of(m["content"]) == after_text
    ]
    turn = history[start + 1 :]
    finals = [m for m in turn if m["role"] == "assistant" and text_of(m["content"])]
    assert [text_of(m["content"]) for m in finals] == [answer], json.dumps(turn, indent=1)


# -- the database -----------------------------------------------------------------------------


async def test_database_down_before_a_turn(database_url: str) -> None:
    async with fault_case(database_url) as case:
        text = case.text("before", chunks=4)
        case.world.proxy.cut()
        case.stream.drop()
        op = await case.background(lambda: case.api.send(case.chat_id, text))
        with trio.fail_after(DEADLINE_S):
            await case.api.changes.wait_until(lambda: len(op.attempts) >= 2)
        await trio.sleep(OUTAGE_S)  # the outage's length, not a wait for a condition
        case.world.proxy.restore()
        await case.done(op)
        assert_answered(await case.verify(), text, reply(4))


@pytest.mark.parametrize("kind", ["cut", "pause"])
async def test_database_down_mid_stream(database_url: str, kind: Literal["cut", "pause"]) -> None:
    async with fault_case(database_url) as case:
        text = case.text("mid", chunks=30, chunk_interval_ms=40)
        seen = case.stream.events
        op = await case.api.send(case.chat_id, text)
        assert op.acked, op.describe()
        await case.wait_for_part("w3 ", after=seen)
        await case.outage(kind)
        assert_answered(await case.verify(), text, reply(30))


@pytest.mark.parametrize("at", ["request", "reply"])
async def test_database_down_at_the_answers_commit(
    database_url: str, at: Literal["request", "reply"]
) -> None:
    """The client's stream stays connected through the fault: whatever the commit did (or did
    not do) must reach it live, as it would have without the fault."""
    async with fault_case(database_url) as case:
        trigger = case.world.proxy.arm(answer_marker(12), action="cut", at=at)
        text = case.text("commit", chunks=12, chunk_interval_ms=10)
        op = await case.api.send(case.chat_id, text)
        assert op.acked, op.describe()
        with trio.fail_after(DEADLINE_S):
            await trigger.fired.wait()
        await trio.sleep(OUTAGE_S)  # the outage's length, not a wait for a condition
        case.world.proxy.restore()
        assert_answered(await case.verify(), text, reply(12))


async def test_database_down_after_an_edits_commit(database_url: str) -> None:
    """The edit committed, its acknowledgement lost; the client's stream stays connected and
    must still learn that the edited turn is gone (a history reset), then get the new one."""
    async with fault_case(database_url) as case:
        text = case.text("second", chunks=2)
        sent = await case.api.send(case.chat_id, text)
        assert sent.acked, sent.describe()
        assert sent.message_id is not None
        await settle(case.api, case.stream, deadline_s=DEADLINE_S)
        edited = case.text("edited", chunks=3)
        marker = edited.split()[0].encode()
        trigger = case.world.proxy.arm(marker, action="cut", at="reply")
        edit = await case.background(
            lambda: case.api.edit(case.chat_id, str(sent.message_id), edited)
        )
        with trio.fail_after(DEADLINE_S):
            await trigger.fired.wait()
        await trio.sleep(OUTAGE_S)  # the outage's length, not a wait for a condition
        case.world.proxy.restore()
        await case.done(edit)
        history = await case.verify()
        assert text not in [text_of(m["content"]) for m in history]
        assert_answered(history, edited, reply(3))


@pytest.mark.parametrize("at", ["request", "reply"])
async def test_database_down_at_a_tool_results_commit(
    database_url: str, at: Literal["request", "reply"]
) -> None:
    async with fault_case(database_url) as case:
        text = case.text("tool", tool_calls=[{"name": "lookup", "arguments": {"q": "x"}}])
        op = await case.api.send(case.chat_id, text)
        assert op.acked, op.describe()
        chat = await settle(case.api, case.stream, deadline_s=DEADLINE_S)
        assert chat["status"] == "requires_action", chat
        calls = [c["id"] for c in chat["pending_tool_calls"]]
        key = uuid4().hex
        trigger = case.world.proxy.arm(key.encode(), action="cut", at=at)
        answer = await case.background(lambda: case.api.tool_results(case.chat_id, calls, key=key))
        with trio.fail_after(DEADLINE_S):
            await trigger.fired.wait()
        case.stream.drop()
        await trio.sleep(OUTAGE_S)  # the outage's length, not a wait for a condition
        case.world.proxy.restore()
        await case.done(answer)
        history = await case.verify()
        assert_answered(history, text, reply(8))
        results = [p for m in history for p in m["content"] if p["type"] == "tool_result"]
        assert [(r["call_id"], json.loads(r["output"])["result"]) for r in results] == [
            (calls[0], key)
        ]


# -- chatd killed ----------------------------------------------------------------------------


async def test_chatd_killed_mid_stream_before_the_answers_commit(database_url: str) -> None:
    async with fault_case(database_url) as case:
        text = case.text("killed", chunks=30, chunk_interval_ms=40)
        seen = case.stream.events
        op = await case.api.send(case.chat_id, text)
        assert op.acked, op.describe()
        await case.wait_for_part("w3 ", after=seen)
        await case.world.kill()
        await case.world.start()
        assert_answered(await case.verify(RESTART_RECOVERY_S), text, reply(30))


@pytest.mark.parametrize("at", ["request", "reply"])
async def test_chatd_killed_at_a_messages_commit(
    database_url: str, at: Literal["request", "reply"]
) -> None:
    """``request``: killed while its commit was on the way: the commit is dropped with the
    connections (it never happened); ``reply``: killed after it committed, before the client
    heard: the client's retry with the same key must not send the message twice."""
    async with fault_case(database_url) as case:
        text = case.text("kill", chunks=4)
        trigger = case.world.proxy.arm(text.split()[0].encode(), action="pause", at=at)
        op = await case.background(lambda: case.api.send(case.chat_id, text))
        with trio.fail_after(DEADLINE_S):
            await trigger.fired.wait()
        await case.world.kill()
        if at == "request":
            # Bytes held by the pause would still reach PostgreSQL when it resumes (as data a
            # dead process had already sent can): drop them with the connections.
            case.world.proxy.cut()
            case.world.proxy.restore()
        case.world.proxy.resume()
        await case.world.start()
        await case.done(op)
        assert_answered(await case.verify(), text, reply(4))
