"""The stream and watch WebSockets over real sockets: frames, resume, isolation, refusals,
slow consumers and shutdown.

Waits are on frames the server sends (or on the subscription's own exit) under a deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode
from uuid import UUID, uuid4

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from chatd.domain.chat_status import ChatStatus
from chatd.domain.conversation import TextPart
from chatd.domain.events import (
    ActionRequired,
    ChatEvent,
    CommittedMessage,
    Episode,
    ErrorRaised,
    HistoryReset,
    MessagePart,
    PendingToolCall,
    PreviewReset,
    QueuedEntry,
    QueueUpdated,
    RetryScheduled,
    StatusChanged,
)
from chatd.domain.provider_failure import ErrorKind, ProviderFailure
from chatd.domain.stream_parts import (
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from chatd.domain.watch_events import (
    ChatActionRequired,
    ChatCreated,
    ChatDiffStatusChanged,
    ChatStatusChanged,
    ChatTitleChanged,
    WatchEvent,
)
from chatd.providers.fake import knobs_marker
from chatd.store.database import Database
from chatd.web.frames import encode_stream_batch, encode_watch_batch
from tests.e2e.api_world import DEADLINE_S, ApiWorld, Client, frames, serve_api

Event = dict[str, Any]


@dataclass
class Events:
    """The events of one socket, one at a time, whatever frames they came in."""

    conn: WebSocketConnection
    pending: deque[Event] = field(default_factory=deque)

    async def next(self) -> Event:
        while not self.pending:
            self.pending.extend(frames(await self.conn.get_message()))
        return self.pending.popleft()

    async def first(self) -> Event:
        """The next event, under the deadline."""
        return (await self.until(lambda _: True))[0]

    async def until(self, predicate: Callable[[Event], bool]) -> list[Event]:
        """Every event up to and including the first that matches."""
        seen: list[Event] = []
        with trio.fail_after(DEADLINE_S):
            while True:
                event = await self.next()
                seen.append(event)
                if predicate(event):
                    return seen


def is_status(status: str) -> Callable[[Event], bool]:
    return lambda e: e.get("type") == "status" and e["status"] == status


def is_watch(kind: str, chat_id: str, **fields: Any) -> Callable[[Event], bool]:
    return lambda e: (
        e.get("kind") == kind
        and e["chat_id"] == chat_id
        and all(e[k] == v for k, v in fields.items())
    )


def text_of(parts: list[Event]) -> str:
    return "".join(
        p["part"]["text"]
        for p in parts
        if p["type"] == "message_part" and p["part"]["type"] == "text"
    )


def message_text(message: Event) -> str:
    return "".join(c["text"] for c in message["content"] if c["type"] == "text")


@contextlib.asynccontextmanager
async def stream(client: Client, chat_id: str, **cursor: int) -> AsyncIterator[Events]:
    query = f"?{urlencode(cursor)}" if cursor else ""
    async with client.ws(f"/api/v1/chats/{chat_id}/stream{query}") as conn:
        yield Events(conn)


@contextlib.asynccontextmanager
async def watch(client: Client) -> AsyncIterator[Events]:
    async with client.ws("/api/v1/chats/watch") as conn:
        yield Events(conn)


def bearer(client: Client) -> dict[str, str]:
    return {"Authorization": f"Bearer {client.token}"}


# -- the wire form, event by event -----------------------------------------------------------


FAILURE = ProviderFailure(ErrorKind.RATE_LIMIT, "openai", 429, True, 2.0, "Slow down.", "429")
CHAT = UUID("00000000-0000-0000-0000-00000000000c")
ENTRY = UUID("00000000-0000-0000-0000-0000000000e1")
MESSAGE = UUID("00000000-0000-0000-0000-0000000000a1")
AT = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
AT_JSON = "2030-01-02T03:04:05Z"
CALL = PendingToolCall("call_1", "lookup", '{"q":"x"}')
CALL_JSON = {"id": "call_1", "name": "lookup", "arguments": '{"q":"x"}'}
EP = Episode(4, 2)


def part(seq: int, part: Event) -> Event:
    return {
        "type": "message_part",
        "history_version": 4,
        "generation_attempt": 2,
        "seq": seq,
        "part": part,
    }


STREAM_CASES: list[tuple[ChatEvent, Event]] = [
    (MessagePart(EP, 1, TextDelta("Hi")), part(1, {"type": "text", "text": "Hi"})),
    (
        MessagePart(EP, 2, ReasoningDelta("hm", "sig")),
        part(2, {"type": "reasoning", "text": "hm", "signature": "sig"}),
    ),
    (
        MessagePart(EP, 3, ToolCallStart(0, "call_1", "lookup")),
        part(3, {"type": "tool_call_start", "index": 0, "id": "call_1", "name": "lookup"}),
    ),
    (
        MessagePart(EP, 4, ToolCallDelta(0, '{"q"')),
        part(4, {"type": "tool_call_delta", "index": 0, "arguments": '{"q"'}),
    ),
    (MessagePart(EP, 5, ToolCallEnd(0)), part(5, {"type": "tool_call_end", "index": 0})),
    (
        MessagePart(EP, 6, Usage(10, 5, 3, 1)),
        part(
            6,
            {
                "type": "usage",
                "input_tokens": 10,
                "output_tokens": 5,
                "cache_read_tokens": 3,
                "cache_write_tokens": 1,
            },
        ),
    ),
    (MessagePart(EP, 7, Finish("stop")), part(7, {"type": "finish", "reason": "stop"})),
    (
        CommittedMessage(MESSAGE, 3, "assistant", (TextPart("Hi"),), 4),
        {
            "type": "message",
            "id": str(MESSAGE),
            "seq": 3,
            "role": "assistant",
            "content": [{"type": "text", "text": "Hi"}],
            "history_version": 4,
        },
    ),
    (
        StatusChanged(ChatStatus.RUNNING, False, 4, 2),
        {
            "type": "status",
            "status": "running",
            "archived": False,
            "history_version": 4,
            "generation_attempt": 2,
        },
    ),
    (ErrorRaised(FAILURE), {"type": "error", "error": FAILURE.to_json()}),
    (
        RetryScheduled(2, 2.0, FAILURE, AT.timestamp()),
        {
            "type": "retry",
            "attempt": 2,
            "delay_s": 2.0,
            "retrying_at": AT_JSON,
            "error": FAILURE.to_json(),
        },
    ),
    (
        QueueUpdated((QueuedEntry(ENTRY, "next"),)),
        {"type": "queue_update", "queue": [{"id": str(ENTRY), "text": "next"}]},
    ),
    (
        ActionRequired((CALL,), AT.timestamp()),
        {"type": "action_required", "calls": [CALL_JSON], "deadline": AT_JSON},
    ),
    (
        PreviewReset(EP),
        {"type": "preview_reset", "history_version": 4, "generation_attempt": 2},
    ),
    (
        HistoryReset(5, 2),
        {"type": "history_reset", "history_version": 5, "after_seq": 2},
    ),
]

WATCH_CASES: list[tuple[WatchEvent, Event]] = [
    (
        ChatCreated(CHAT, "t", ChatStatus.RUNNING, False),
        {
            "kind": "created",
            "chat_id": str(CHAT),
            "title": "t",
            "status": "running",
            "archived": False,
        },
    ),
    (
        ChatStatusChanged(CHAT, ChatStatus.WAITING, True),
        {"kind": "status_change", "chat_id": str(CHAT), "status": "waiting", "archived": True},
    ),
    (
        ChatTitleChanged(CHAT, "new"),
        {"kind": "title_change", "chat_id": str(CHAT), "title": "new"},
    ),
    (
        ChatActionRequired(CHAT, (CALL,), AT.timestamp()),
        {
            "kind": "action_required",
            "chat_id": str(CHAT),
            "calls": [CALL_JSON],
            "deadline": AT_JSON,
        },
    ),
    (
        ChatDiffStatusChanged(CHAT, "main", None, None, "open", 3, 1, 2),
        {
            "kind": "diff_status_change",
            "chat_id": str(CHAT),
            "branch": "main",
            "remote": None,
            "pull_request_url": None,
            "pull_request_state": "open",
            "additions": 3,
            "deletions": 1,
            "changed_files": 2,
        },
    ),
]


@pytest.mark.parametrize(("event", "wire"), STREAM_CASES)
def test_each_stream_event_has_its_wire_form(event: ChatEvent, wire: Event) -> None:
    assert json.loads(encode_stream_batch([event])) == wire


@pytest.mark.parametrize(("event", "wire"), WATCH_CASES)
def test_each_watch_event_has_its_wire_form(event: WatchEvent, wire: Event) -> None:
    assert json.loads(encode_watch_batch([event])) == wire


def test_a_batch_of_several_events_is_one_array() -> None:
    events = [e for e, _ in STREAM_CASES]
    assert json.loads(encode_stream_batch(events)) == [w for _, w in STREAM_CASES]
    watched = [e for e, _ in WATCH_CASES]
    assert json.loads(encode_watch_batch(watched)) == [w for _, w in WATCH_CASES]


# -- streaming ---------------------------------------------------------------------------------


async def test_an_answer_streams_token_by_token(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat("hello")
    chat_id = chat["id"]
    # Resume after the first turn: a stream from the start sends the snapshot's status before
    # the committed messages, so a "waiting" seen first says nothing of them.
    await alice.wait_status(chat_id, "waiting")
    first_turn = (await alice.http.get(f"/api/v1/chats/{chat_id}")).json()
    async with stream(alice, chat_id, message_seq=first_turn["last_message_seq"]) as events:
        await events.until(is_status("waiting"))
        marker = knobs_marker(chunks=5, chunk_interval_ms=20)
        response = await alice.http.post(
            f"/api/v1/chats/{chat_id}/messages", json={"text": f"count {marker}"}
        )
        assert response.status_code == 202, response.text
        seen = await events.until(is_status("running"))
        seen += await events.until(is_status("waiting"))

    # Each event once: the snapshot's "waiting", then the turn's.
    statuses = [e["status"] for e in seen if e["type"] == "status"]
    assert statuses == ["running", "waiting"]
    wire = [json.dumps(e, sort_keys=True) for e in seen]
    assert len(wire) == len(set(wire)), seen
    messages = [e for e in seen if e["type"] == "message"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["id"] == response.json()["message_id"]
    answer = messages[1]
    parts = [e for e in seen if e["type"] == "message_part"]
    texts = [p["part"]["text"] for p in parts if p["part"]["type"] == "text"]
    assert len(texts) == 5
    assert "".join(texts) == message_text(answer)
    assert [p["seq"] for p in parts] == list(range(1, len(parts) + 1))
    assert len({(p["history_version"], p["generation_attempt"]) for p in parts}) == 1
    assert parts[-1]["part"] == {"type": "finish", "reason": "stop"}
    # The parts precede their committed message, which precedes the status it leads to.
    assert seen.index(parts[-1]) < seen.index(answer) < len(seen) - 1

    # The stream and GET /messages agree on what was committed.
    listed = await alice.http.get(f"/api/v1/chats/{chat_id}/messages")
    stored = {m["id"]: m for m in listed.json()["messages"]}
    for message in messages:
        assert stored[message["id"]]["content"] == message["content"]
        assert stored[message["id"]]["seq"] == message["seq"]


async def test_a_reconnect_mid_answer_resumes_with_no_gap_and_no_repeat(api: ApiWorld) -> None:
    alice = await api.client("alice")
    marker = knobs_marker(chunks=8, chunk_interval_ms=150)
    chat = await alice.create_chat(f"count slowly {marker}")
    chat_id = chat["id"]

    async with stream(alice, chat_id) as events:
        first = await events.until(
            lambda e: e["type"] == "message_part" and e["part"] == {"type": "text", "text": "w3 "}
        )
    message_seq = max(e["seq"] for e in first if e["type"] == "message")
    last = first[-1]
    cursor = {
        "message_seq": message_seq,
        "history_version": last["history_version"],
        "generation_attempt": last["generation_attempt"],
        "part_seq": last["seq"],
    }
    async with stream(alice, chat_id, **cursor) as events:
        rest = await events.until(is_status("waiting"))

    parts = [e for e in rest if e["type"] == "message_part"]
    assert [p["seq"] for p in parts] == list(range(last["seq"] + 1, last["seq"] + 1 + len(parts)))
    assert all(p["history_version"] == last["history_version"] for p in parts)
    messages = [e for e in rest if e["type"] == "message"]
    assert [(m["role"], m["seq"] > message_seq) for m in messages] == [("assistant", True)]
    assert text_of(first) + text_of(rest) == message_text(messages[0])
    assert message_text(messages[0]) == "".join(f"w{i} " for i in range(1, 9))


async def test_a_stream_opened_during_a_retry_wait_gets_each_event_once(api: ApiWorld) -> None:
    """Issue 11: the retry of the attempt came twice (the snapshot's, then the live one)."""
    alice = await api.client("alice")
    marker = knobs_marker(fault="rate_limit", fault_times=1, retry_after_s=600)
    async with watch(alice) as watched:
        chat = await alice.create_chat(f"fail once {marker}")
        chat_id = chat["id"]
        async with stream(alice, chat_id) as early:
            before = await early.until(lambda e: e["type"] == "retry")
            # Opened during the wait: its snapshot tells of the retry, and nothing repeats it.
            async with stream(alice, chat_id) as late:
                during = await late.until(lambda e: e["type"] == "retry")
                stopped = await alice.http.post(f"/api/v1/chats/{chat_id}/interrupt")
                assert stopped.status_code in (200, 202, 204), stopped.text
                during += await late.until(is_status("waiting"))
            before += await early.until(is_status("waiting"))
        await watched.until(is_watch("status_change", chat_id, status="waiting"))

    for seen in (before, during):
        assert [e["attempt"] for e in seen if e["type"] == "retry"] == [2]
        assert [e["status"] for e in seen if e["type"] == "status"] == ["running", "waiting"]
        wire = [json.dumps(e, sort_keys=True) for e in seen]
        assert len(wire) == len(set(wire)), seen


def each_once(seen: list[Event]) -> None:
    """No event twice: those that name a moment of the chat (a message, a part, a status of an
    episode, a retry, a tool wait, a reset) never repeat; a queue or an error may come back to
    an earlier value, but never twice in a row."""
    wire = [
        json.dumps(e, sort_keys=True) for e in seen if e["type"] not in ("queue_update", "error")
    ]
    repeated = {w for w in wire if wire.count(w) > 1}
    assert not repeated, repeated
    for kind in ("queue_update", "error"):
        same = [e for e in seen if e["type"] == kind]
        assert all(a != b for a, b in itertools.pairwise(same)), same


def is_next_message(event: Event) -> bool:
    return (
        event["type"] == "message"
        and event["role"] == "user"
        and message_text(event).startswith("next")
    )


def statuses_of(seen: list[Event]) -> list[str]:
    return [e["status"] for e in seen if e["type"] == "status"]


async def test_streams_opened_at_each_phase_get_each_event_once(api: ApiWorld) -> None:
    """Streams opened while a chat waits on tool results, while it answers with a message
    queued, and while it is stopped: each sees its snapshot, then every later event once."""
    alice = await api.client("alice")
    tools = [{"name": "lookup", "description": "look something up"}]
    # The answer after the tool result streams for about 3 s: time to join it and stop it.
    lookup = [{"name": "lookup", "arguments": {"q": "x"}}]
    marker = knobs_marker(tool_calls=lookup, chunks=30, chunk_interval_ms=100)
    chat = await alice.create_chat(f"look it up {marker}", dynamic_tools=tools)
    chat_id = chat["id"]
    async with stream(alice, chat_id) as first:
        required = await first.until(lambda e: e["type"] == "action_required")
        async with stream(alice, chat_id) as waiting_on_tools:
            snapshot = await waiting_on_tools.until(lambda e: e["type"] == "action_required")
            assert [e["type"] for e in snapshot] == ["status", "queue_update", "action_required"]
            [call] = snapshot[-1]["calls"]
            answer = {"results": [{"call_id": call["id"], "output": '{"ok":true}'}]}
            submitted = await alice.http.post(f"/api/v1/chats/{chat_id}/tool-results", json=answer)
            assert submitted.status_code == 204, submitted.text
            # Mid-answer, a message is queued and a third stream joins; then the run stops.
            after_tools = snapshot + await waiting_on_tools.until(
                lambda e: e["type"] == "message_part"
            )
            queued = await alice.http.post(
                f"/api/v1/chats/{chat_id}/messages", json={"text": f"next {knobs_marker()}"}
            )
            assert queued.status_code == 202, queued.text
            after_tools += await waiting_on_tools.until(
                lambda e: e["type"] == "queue_update" and e["queue"]
            )
            async with stream(alice, chat_id) as mid_answer:
                joined = await mid_answer.until(lambda e: e["type"] == "message_part")
                stopped = await alice.http.post(f"/api/v1/chats/{chat_id}/interrupt")
                assert stopped.status_code == 204, stopped.text
                # The queued message goes next; its answer ends the chat's work.
                for events, seen in (
                    (first, required),
                    (waiting_on_tools, after_tools),
                    (mid_answer, joined),
                ):
                    seen.extend(await events.until(is_next_message))
                    seen.extend(await events.until(is_status("waiting")))

    for seen in (required, after_tools, joined):
        each_once(seen)
        parts = [e for e in seen if e["type"] == "message_part"]
        by_episode: dict[tuple[int, int], list[int]] = {}
        for p in parts:
            by_episode.setdefault((p["history_version"], p["generation_attempt"]), []).append(
                p["seq"]
            )
        for seqs in by_episode.values():
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    # Each status once, from the snapshot's on: the stop goes straight on to the queued message.
    life = ["running", "requires_action", "running", "interrupting", "running", "waiting"]
    assert statuses_of(required) == life
    assert statuses_of(after_tools) == life[1:]
    assert statuses_of(joined) == life[2:]
    for seen in (required, after_tools):
        assert [e["type"] for e in seen].count("action_required") == 1


async def test_a_failure_tells_its_error_before_its_status(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat("hello")
    chat_id = chat["id"]
    await alice.wait_status(chat_id, "waiting")
    async with stream(alice, chat_id, message_seq=2) as events:
        await events.until(is_status("waiting"))
        marker = knobs_marker(fault="auth")
        response = await alice.http.post(
            f"/api/v1/chats/{chat_id}/messages", json={"text": f"fail {marker}"}
        )
        assert response.status_code == 202, response.text
        live = await events.until(is_status("error"))
    async with stream(alice, chat_id, message_seq=3) as events:
        snapshot = await events.until(is_status("error"))
        snapshot += await events.until(lambda e: e["type"] == "queue_update")

    # The terminal status comes with (after) the error that explains it, live and on resume.
    assert [e["type"] for e in live][-2:] == ["error", "status"], live
    assert [e["type"] for e in snapshot] == ["error", "status", "queue_update"], snapshot
    for seen in (live, snapshot):
        error = next(e for e in seen if e["type"] == "error")
        assert error["error"]["kind"] == "auth"


# -- watch -------------------------------------------------------------------------------------


async def test_watch_reports_the_lifecycle_of_the_callers_chats(api: ApiWorld) -> None:
    alice = await api.client("alice")
    async with watch(alice) as events:
        chat = await alice.create_chat("hello", title="first")
        chat_id = chat["id"]
        created = (await events.until(is_watch("created", chat_id)))[-1]
        assert created == {
            "kind": "created",
            "chat_id": chat_id,
            "title": "first",
            "status": "running",
            "archived": False,
        }
        await events.until(is_watch("status_change", chat_id, status="waiting"))

        renamed = await alice.http.patch(f"/api/v1/chats/{chat_id}", json={"title": "renamed"})
        assert renamed.status_code == 200, renamed.text
        await events.until(is_watch("title_change", chat_id, title="renamed"))

        diff = await alice.http.put(
            f"/api/v1/chats/{chat_id}/diff-status", json={"branch": "main", "additions": 3}
        )
        assert diff.status_code == 200, diff.text
        changed = (await events.until(is_watch("diff_status_change", chat_id)))[-1]
        assert changed == {
            "kind": "diff_status_change",
            "chat_id": chat_id,
            "branch": "main",
            "remote": None,
            "pull_request_url": None,
            "pull_request_state": None,
            "additions": 3,
            "deletions": 0,
            "changed_files": 0,
        }

        marker = knobs_marker(tool_calls=[{"name": "lookup", "arguments": {"q": "x"}}])
        tools = [{"name": "lookup", "description": "look something up"}]
        tool_chat = await alice.create_chat(f"look it up {marker}", dynamic_tools=tools)
        tool_chat_id = tool_chat["id"]
        seen = await events.until(is_watch("action_required", tool_chat_id))
        statuses = [e["status"] for e in seen if e["kind"] == "status_change"]
        assert statuses[-1] == "requires_action"
        required = seen[-1]
        [call] = required["calls"]
        assert call["name"] == "lookup"
        assert json.loads(call["arguments"]) == {"q": "x"}
        assert datetime.fromisoformat(required["deadline"]) > datetime.now(UTC)

        # The chat's own stream tells the same (its snapshot of a chat waiting on calls).
        async with stream(alice, tool_chat_id) as chat_events:
            snapshot = await chat_events.until(lambda e: e["type"] == "action_required")
        assert snapshot[-1]["calls"] == required["calls"]
        assert snapshot[-1]["deadline"] == required["deadline"]

        answer = {"results": [{"call_id": call["id"], "output": '{"ok":true}'}]}
        submitted = await alice.http.post(f"/api/v1/chats/{tool_chat_id}/tool-results", json=answer)
        assert submitted.status_code == 204, submitted.text
        after = await events.until(is_watch("status_change", tool_chat_id, status="waiting"))
        assert [e["status"] for e in after if e["kind"] == "status_change"] == [
            "running",
            "waiting",
        ]
        assert all(e["chat_id"] in (chat_id, tool_chat_id) for e in [created, *seen, *after])


async def test_watch_is_a_route_of_its_own_not_a_chat_id(api: ApiWorld) -> None:
    alice = await api.client("alice")
    async with watch(alice) as events:
        chat = await alice.create_chat("hello")
        assert (await events.first())["kind"] == "created"
    refusal = await api.refused("/api/v1/chats/watch/stream", bearer(alice))
    assert refusal.status_code == 400
    assert refusal.json()["error"]["field"] == "chat_id"
    assert chat["id"] != "watch"


# -- who may connect ---------------------------------------------------------------------------


async def test_users_see_only_their_own_chats(api: ApiWorld) -> None:
    alice = await api.client("alice")
    bob = await api.client("bob")
    async with watch(bob) as bobs:
        alices_chat = await alice.create_chat("hello")
        await alice.wait_status(alices_chat["id"], "waiting")
        # Alice's events were published before her chat finished; bob's first is his own.
        bobs_chat = await bob.create_chat("mine")
        first = await bobs.first()
        assert (first["kind"], first["chat_id"]) == ("created", bobs_chat["id"])

    path = f"/api/v1/chats/{alices_chat['id']}/stream"
    refusal = await api.refused(path, bearer(bob))
    missing = await api.refused(f"/api/v1/chats/{uuid4()}/stream", bearer(bob))
    assert refusal.status_code == missing.status_code == 404
    assert refusal.content == missing.content
    assert refusal.json()["error"]["code"] == "not_found"

    # Bob reaches his own chat, here with the token in the query as browsers must.
    query = urlencode({"access_token": bob.token})
    async with open_websocket_url(
        f"{api.ws_url}/api/v1/chats/{bobs_chat['id']}/stream?{query}"
    ) as conn:
        await Events(conn).until(lambda e: e["type"] == "status")


async def test_refusals_are_http_answers_to_the_handshake(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat("hello")
    path = f"/api/v1/chats/{chat['id']}/stream"

    for no_token in (path, "/api/v1/chats/watch"):
        refusal = await api.refused(no_token)
        assert refusal.status_code == 401
        assert refusal.headers["www-authenticate"] == "Bearer"
    wrong = await api.refused(path, {"Authorization": "Bearer nope"})
    assert wrong.status_code == 401

    malformed = await api.refused("/api/v1/chats/not-a-uuid/stream", bearer(alice))
    assert (malformed.status_code, malformed.json()["error"]["field"]) == (400, "chat_id")

    for query, field_name in [
        ("message_seq=abc", "message_seq"),
        ("part_seq=-1", "part_seq"),
        ("history_version=1", "generation_attempt"),
        ("generation_attempt=1", "history_version"),
        ("part_seq=3", "part_seq"),
        ("colour=blue", "colour"),
        ("message_seq=1&message_seq=2", "message_seq"),
    ]:
        refusal = await api.refused(f"{path}?{query}", bearer(alice))
        assert refusal.status_code == 400, query
        assert refusal.json()["error"]["field"] == field_name, query


def origin(value: str) -> dict[str, str]:
    return {"Origin": value}


def ws_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in headers.items()]


async def test_a_foreign_origin_is_refused(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat("hello")
    path = f"/api/v1/chats/{chat['id']}/stream"
    for foreign in ("https://evil.example", "null"):
        refusal = await api.refused(path, bearer(alice) | origin(foreign))
        assert refusal.status_code == 403
        assert refusal.json()["error"]["code"] == "forbidden_origin"
    own = api.url.removesuffix("/")
    for headers in (ws_headers(origin(own)), []):
        async with alice.ws(path, headers=headers) as conn:
            await Events(conn).until(lambda e: e["type"] == "status")
        async with alice.ws("/api/v1/chats/watch", headers=headers):
            pass


async def test_allowed_origins_are_configurable(db: Database) -> None:
    async with serve_api(db, ws_allowed_origins="https://app.example") as world:
        alice = await world.client("alice")
        async with alice.ws(
            "/api/v1/chats/watch", headers=ws_headers(origin("https://app.example"))
        ):
            pass
        refusal = await world.refused(
            "/api/v1/chats/watch", bearer(alice) | origin("https://evil.example")
        )
        assert refusal.status_code == 403


# -- leaving, being dropped, shutting down -----------------------------------------------------


@contextlib.contextmanager
def exits_of(monkeypatch: pytest.MonkeyPatch, target: Any) -> Any:
    """An event set when a subscription of ``target`` (the hub or a feed) is left."""
    left = trio.Event()
    original = target.subscribe

    @contextlib.asynccontextmanager
    async def subscribe(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        try:
            async with original(*args, **kwargs) as sub:
                yield sub
        finally:
            left.set()

    monkeypatch.setattr(target, "subscribe", subscribe)
    yield left


async def test_a_client_that_leaves_is_unsubscribed_at_once(
    api: ApiWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat("hello")
    await alice.wait_status(chat["id"], "waiting")
    hub, feed = api.engine.hub, api.engine.watch
    with exits_of(monkeypatch, hub) as stream_left, exits_of(monkeypatch, feed) as watch_left:
        async with stream(alice, chat["id"]) as events, watch(alice) as watched:
            await events.until(is_status("waiting"))
            assert (hub.stats.subscribers, feed.stats.subscribers) == (1, 1)
            # More messages than the server queues for a view that does not read them.
            for i in range(30):
                await events.conn.send_message(f"ignored {i}")
                await watched.conn.send_message(f"ignored {i}")
        with trio.fail_after(DEADLINE_S):
            await stream_left.wait()
            await watch_left.wait()
    assert (hub.stats.subscribers, feed.stats.subscribers) == (0, 0)


async def closed_with(conn: WebSocketConnection) -> tuple[int, str | None]:
    """Read what is left until the close, and return its code and reason."""
    with trio.fail_after(DEADLINE_S):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await conn.get_message()
    assert conn.closed is not None
    return conn.closed.code, conn.closed.reason


async def test_a_slow_consumer_is_closed_with_4008(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat("hello")
    chat_id = UUID(chat["id"])
    await alice.wait_status(chat["id"], "waiting")
    hub, feed = api.engine.hub, api.engine.watch
    size = api.settings.subscriber_queue_size
    path = f"/api/v1/chats/{chat_id}/stream"
    async with alice.ws(path) as conn, alice.ws("/api/v1/chats/watch") as watching:
        await Events(conn).until(is_status("waiting"))
        # Published in one go, faster than any socket can take them: both subscribers overflow.
        hub.publish(chat_id, [QueueUpdated(())] * (2 * size + 1))
        for _ in range(size + 1):
            feed.publish(alice.user.id, ChatTitleChanged(chat_id, "x"))
        for socket in (conn, watching):
            code, reason = await closed_with(socket)
            assert code == 4008
            assert reason is not None
            assert reason.startswith("slow consumer")
    # The close is sent once the subscription was left.
    assert (hub.stats.subscribers, feed.stats.subscribers) == (0, 0)
    assert (hub.stats.slow_consumers_dropped, feed.stats.slow_consumers_dropped) == (1, 1)


async def held_open(
    client: Client, path: str, *, task_status: trio.TaskStatus[WebSocketConnection]
) -> None:
    """``client.ws(path)`` in a task of its own, open until that task is cancelled."""
    async with client.ws(path) as conn:
        task_status.started(conn)
        await trio.sleep_forever()


async def test_shutdown_closes_open_sockets_with_1001(db: Database) -> None:
    # The sockets are held by tasks of this nursery: they outlive the server's context.
    async with trio.open_nursery() as nursery:
        async with serve_api(db) as world:
            alice = await world.client("alice")
            chat = await alice.create_chat("hello")
            await alice.wait_status(chat["id"], "waiting")
            path = f"/api/v1/chats/{chat['id']}/stream"
            conn = await nursery.start(held_open, alice, path)
            watching = await nursery.start(held_open, alice, "/api/v1/chats/watch")
            await Events(conn).until(is_status("waiting"))
        # The server has stopped.
        for socket in (conn, watching):
            code, _reason = await closed_with(socket)
            assert code == 1001
        nursery.cancel_scope.cancel()
