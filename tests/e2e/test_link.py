"""The internal link between workers: forwarded commands and relayed streams.

Two real ``chatd serve`` processes on one PostgreSQL, each with its own home, once the shards
are split evenly between them: a chat created through the first is placed in a shard it serves,
so everything done on it through the second crosses the link. The fake provider runs in the
test process; clients use real sockets.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import httpx2
import pytest
import trio
import trio_websocket
from trio_websocket import wrap_client_stream

from chatd.domain.sharding import shard_of
from chatd.providers.fake import FakeLLM, knobs_marker
from chatd.store import cluster, users
from chatd.store.database import Database
from tests.e2e.chatd_process import ServerProcess, chatd_server

pytestmark = pytest.mark.slow

DEADLINE_S = 30.0
SHARDS = 8
LEASE_TTL_S = 3.0

Event = dict[str, Any]


@pytest.fixture
def homes() -> Iterator[tuple[Path, Path]]:
    paths = tuple(Path(tempfile.mkdtemp(prefix="chatd-home-")) for _ in range(2))
    yield paths[0], paths[1]
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def token(db: Database) -> str:
    user = await users.create_user(db, "alice")
    _token, secret = await users.create_api_token(db, user.id)
    return secret


@dataclass
class Worker:
    server: ServerProcess
    worker_id: str
    link_url: str


@dataclass
class Pair:
    owner: Worker  # started first: creates the chats, in shards it serves
    other: Worker  # started second: handed the other half of the shards
    token: str

    def http(self, worker: Worker) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(
            base_url=worker.server.url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=DEADLINE_S,
        )


async def _worker(server: ServerProcess) -> Worker:
    worker_id = (await server.wait_for_line(r"worker (\S+) owns \d+ shards")).group(1)
    link_url = (await server.wait_for_line(r"internal link listening on (\S+)")).group(1)
    return Worker(server, worker_id, link_url)


def _serve(database_url: str, home: Path) -> AbstractAsyncContextManager[ServerProcess]:
    args = ["--database-url", database_url, "--port", "0"]
    env = {
        "CHATD_HOME": str(home),
        "CHATD_LEASE_TTL_S": str(LEASE_TTL_S),
        "CHATD_SHARD_COUNT": str(SHARDS),
        "CHATD_LINK_TIMEOUT_S": "2",
    }
    return chatd_server(args, env=env)


@asynccontextmanager
async def two_workers(
    db: Database, database_url: str, homes: tuple[Path, Path], token: str
) -> AsyncIterator[Pair]:
    async with _serve(database_url, homes[0]) as first:
        owner = await _worker(first)
        async with _serve(database_url, homes[1]) as second:
            pair = Pair(owner, await _worker(second), token)
            await _settled(db, pair)
            yield pair


async def _settled(db: Database, pair: Pair) -> None:
    """Until the shards are split evenly between the two (the joining worker was handed its
    half), so that no shard moves during the test."""
    with trio.fail_after(DEADLINE_S):
        while True:
            owners = await cluster.shard_owners(db)
            held = [o.worker_id for o in owners.values()]
            if len(owners) == SHARDS and all(
                held.count(w.worker_id) == SHARDS // 2 for w in (pair.owner, pair.other)
            ):
                return
            await trio.sleep(0.1)


async def _owned_by(db: Database, worker: Worker, chat_id: str) -> bool:
    owners = await cluster.shard_owners(db)
    owner = owners.get(shard_of(UUID(chat_id), SHARDS))
    return owner is not None and owner.worker_id == worker.worker_id


class Stream:
    """A client's stream WebSocket: every event received, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.closed: trio_websocket.CloseReason | None = None
        self._changed = trio.Event()

    async def run(
        self,
        worker: Worker,
        token: str,
        chat_id: str,
        query: str = "",
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        address = urlsplit(worker.server.url)
        assert address.hostname is not None
        assert address.port is not None
        auth = [(b"authorization", f"Bearer {token}".encode())]
        path = f"/api/v1/chats/{chat_id}/stream" + (f"?{query}" if query else "")
        async with (
            await trio.open_tcp_stream(address.hostname, address.port) as tcp,
            trio.open_nursery() as nursery,
        ):
            with trio.fail_after(DEADLINE_S):
                conn = await wrap_client_stream(
                    nursery, tcp, address.netloc, path, extra_headers=auth
                )
            task_status.started()
            try:
                while True:
                    value = json.loads(await conn.get_message())
                    self.events.extend(value if isinstance(value, list) else [value])
                    self._changed.set()
                    self._changed = trio.Event()
            except trio_websocket.ConnectionClosed as closed:
                self.closed = closed.reason
                self._changed.set()
            # Cancelled by the test: the socket is closed as the TCP stream is left (a close
            # handshake could not complete, its reader task being cancelled with us).

    async def wait_for(self, predicate: Any, timeout_s: float = DEADLINE_S) -> None:
        with trio.fail_after(timeout_s):
            while not predicate(self.events):
                assert self.closed is None, f"the stream closed: {self.closed}"
                await self._changed.wait()


def _status(status: str) -> Any:
    return lambda events: any(e["type"] == "status" and e["status"] == status for e in events)


def _messages(events: list[Event]) -> list[tuple[int, str]]:
    return [(e["seq"], e["role"]) for e in events if e["type"] == "message"]


def _parts_after_seq(events: list[Event], seq: int) -> list[Event]:
    """The ``message_part`` events received after message ``seq``."""
    after = [i for i, e in enumerate(events) if e["type"] == "message" and e["seq"] == seq]
    return [e for e in events[after[0] :] if e["type"] == "message_part"] if after else []


def _answer_done(count: int) -> Any:
    """``count`` assistant messages received, and the chat waiting again (its last status
    event, live or in the snapshot a stream opens with, which comes before the messages)."""

    def done(events: list[Event]) -> bool:
        answers = [m for m in _messages(events) if m[1] == "assistant"]
        statuses = [e["status"] for e in events if e["type"] == "status"]
        return len(answers) >= count and statuses[-1:] == ["waiting"]

    return done


async def test_every_command_route_works_through_a_worker_that_serves_none_of_the_chats(
    db: Database, database_url: str, homes: tuple[Path, Path], token: str, llm: FakeLLM
) -> None:
    async with two_workers(db, database_url, homes, token) as pair:
        owner, other = pair.owner, pair.other
        async with pair.http(owner) as via_owner, pair.http(other) as via_other:
            created = await via_owner.post("/api/v1/chats", json={"text": "hello"})
            assert created.status_code == 201, created.text
            chat_id = created.json()["id"]
            assert await _owned_by(db, owner, chat_id)
            assert not await _owned_by(db, other, chat_id)
            stream = Stream()
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run, other, token, chat_id)
                await stream.wait_for(_answer_done(1))

                # Send, queue behind a slow answer, promote, delete, interrupt: all forwarded.
                slow = knobs_marker(chunks=30, chunk_interval_ms=100)
                sent = await via_other.post(
                    f"/api/v1/chats/{chat_id}/messages", json={"text": f"long {slow}"}
                )
                assert (sent.status_code, sent.json()["queued"]) == (202, False), sent.text
                queued = [
                    await via_other.post(f"/api/v1/chats/{chat_id}/messages", json={"text": t})
                    for t in ("q1", "q2")
                ]
                assert [q.json()["queued"] for q in queued] == [True, True]
                q1, q2 = (q.json()["message_id"] for q in queued)
                promoted = await via_other.post(f"/api/v1/chats/{chat_id}/queue/{q2}/promote")
                assert promoted.status_code == 204, promoted.text
                deleted = await via_other.delete(f"/api/v1/chats/{chat_id}/queue/{q1}")
                assert deleted.status_code == 204, deleted.text
                # A refusal crosses the link unchanged: the same answer on either worker.
                missing = "00000000-0000-4000-8000-000000000000"
                answers = [
                    await http.delete(f"/api/v1/chats/{chat_id}/queue/{missing}")
                    for http in (via_other, via_owner)
                ]
                assert [a.status_code for a in answers] == [404, 404]
                assert answers[0].json() == answers[1].json()
                interrupted = await via_other.post(f"/api/v1/chats/{chat_id}/interrupt")
                assert interrupted.status_code == 204, interrupted.text
                # q2 runs after the interrupted answer.
                await stream.wait_for(_answer_done(3))
                detail = (await via_other.get(f"/api/v1/chats/{chat_id}")).json()
                assert (detail["status"], detail["queue"]) == ("waiting", [])
                conflict = [
                    await http.post(
                        f"/api/v1/chats/{chat_id}/tool-results",
                        json={"results": [{"call_id": "x", "output": "{}"}]},
                    )
                    for http in (via_other, via_owner)
                ]
                assert [c.status_code for c in conflict] == [409, 409]
                assert conflict[0].json() == conflict[1].json()

                # Edit the first message (regenerates), then archive: forwarded too.
                history = (await via_other.get(f"/api/v1/chats/{chat_id}/messages")).json()
                first = history["messages"][0]
                edited = await via_other.patch(
                    f"/api/v1/chats/{chat_id}/messages/{first['id']}", json={"text": "hi again"}
                )
                assert edited.status_code == 202, edited.text
                await stream.wait_for(
                    lambda events: any(e["type"] == "history_reset" for e in events)
                )
                await stream.wait_for(_status("waiting"))
                archived = await via_other.patch(
                    f"/api/v1/chats/{chat_id}", json={"archived": True}
                )
                assert (archived.status_code, archived.json()["archived"]) == (200, True)
                nursery.cancel_scope.cancel()
            history = (await via_owner.get(f"/api/v1/chats/{chat_id}/messages")).json()
            assert [m["role"] for m in history["messages"]] == ["user", "assistant"]
            assert history["messages"][0]["content"][0]["text"] == "hi again"

            # Creating through the other worker, with or without a key (the key's retry is the
            # same chat, wherever it lands).
            for headers in ({}, {"Idempotency-Key": "create-through-the-other"}):
                made = await via_other.post("/api/v1/chats", json={"text": "x"}, headers=headers)
                assert made.status_code == 201, made.text
                again = await via_other.post("/api/v1/chats", json={"text": "x"}, headers=headers)
                if headers:  # the key's retry is the same chat, created once
                    assert again.json()["id"] == made.json()["id"]


async def test_a_stream_relayed_by_a_non_owner_is_exactly_the_owners_stream(
    db: Database, database_url: str, homes: tuple[Path, Path], token: str, llm: FakeLLM
) -> None:
    async with two_workers(db, database_url, homes, token) as pair:
        async with pair.http(pair.owner) as via_owner:
            created = await via_owner.post("/api/v1/chats", json={"text": "first"})
            chat_id = created.json()["id"]
            # Both streams open once the first answer is committed, so they start from the same
            # snapshot (opened during it, the later one could miss parts the earlier one saw).
            opening = Stream()
            async with trio.open_nursery() as nursery:
                await nursery.start(opening.run, pair.owner, token, chat_id)
                await opening.wait_for(_answer_done(1))
                nursery.cancel_scope.cancel()
            direct, relayed, resumed = Stream(), Stream(), Stream()
            async with trio.open_nursery() as nursery:
                await nursery.start(direct.run, pair.owner, token, chat_id)
                await nursery.start(relayed.run, pair.other, token, chat_id)
                for stream in (direct, relayed):
                    await stream.wait_for(_answer_done(1))
                chunks = knobs_marker(chunks=20, chunk_interval_ms=20)
                await via_owner.post(
                    f"/api/v1/chats/{chat_id}/messages", json={"text": f"more {chunks}"}
                )
                # A client resuming mid-answer through the relay gets exactly the rest.
                await relayed.wait_for(lambda events: len(_parts_after_seq(events, 3)) >= 5)
                part = next(e for e in reversed(relayed.events) if e["type"] == "message_part")
                query = (
                    f"message_seq=3&history_version={part['history_version']}"
                    f"&generation_attempt={part['generation_attempt']}&part_seq={part['seq']}"
                )
                await nursery.start(resumed.run, pair.other, token, chat_id, query)
                for stream in (direct, relayed):
                    await stream.wait_for(_answer_done(2))
                await resumed.wait_for(_answer_done(1))  # it starts after the first answer
                nursery.cancel_scope.cancel()
        assert relayed.events == direct.events
        assert _messages(relayed.events) == [
            (1, "user"),
            (2, "assistant"),
            (3, "user"),
            (4, "assistant"),
        ]
        parts = [e for e in relayed.events if e["type"] == "message_part"]
        rest = [e for e in resumed.events if e["type"] == "message_part"]
        assert rest == [
            p
            for p in parts
            if p["seq"] > part["seq"] and p["history_version"] == part["history_version"]
        ]
        assert _messages(resumed.events) == [(4, "assistant")]


async def test_the_link_refuses_requests_without_the_cluster_secret(
    db: Database, database_url: str, homes: tuple[Path, Path], token: str
) -> None:
    async with two_workers(db, database_url, homes, token) as pair:
        link = pair.owner.link_url
        chat = "00000000-0000-4000-8000-000000000000"
        async with httpx2.AsyncClient(timeout=DEADLINE_S) as http:
            missing = await http.post(f"{link}/internal/v1/ask?chat_id={chat}", content=b"{}")
            wrong = await http.post(
                f"{link}/internal/v1/ask?chat_id={chat}",
                content=b"{}",
                headers={"X-Chatd-Link-Secret": "not-the-secret"},
            )
            assert (missing.status_code, wrong.status_code) == (401, 403)
        for headers, status in (([], 401), ([(b"x-chatd-link-secret", b"nope")], 403)):
            with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                await _handshake(link, f"/internal/v1/stream/{chat}", headers)
            assert rejected.value.status_code == status


async def _handshake(base_url: str, path: str, headers: list[tuple[bytes, bytes]]) -> None:
    """A WebSocket handshake on a socket closed here (trio-websocket's own connect leaves it
    open when the handshake is refused)."""
    address = urlsplit(base_url)
    assert address.hostname is not None
    assert address.port is not None
    try:
        with trio.fail_after(DEADLINE_S):
            async with (
                await trio.open_tcp_stream(address.hostname, address.port) as tcp,
                trio.open_nursery() as nursery,
            ):
                conn = await wrap_client_stream(
                    nursery, tcp, address.netloc, path, extra_headers=headers
                )
                await conn.aclose()
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        raise leaf from None


async def test_a_relayed_stream_goes_on_from_its_cursor_when_the_owner_is_killed(
    db: Database, database_url: str, homes: tuple[Path, Path], token: str, llm: FakeLLM
) -> None:
    async with two_workers(db, database_url, homes, token) as pair:
        async with pair.http(pair.owner) as via_owner:
            created = await via_owner.post("/api/v1/chats", json={"text": "first"})
            chat_id = created.json()["id"]
        relayed = Stream()
        async with trio.open_nursery() as nursery:
            await nursery.start(relayed.run, pair.other, token, chat_id)
            await relayed.wait_for(_answer_done(1))
            slow = knobs_marker(chunks=40, chunk_interval_ms=100)
            async with pair.http(pair.other) as via_other:
                sent = await via_other.post(
                    f"/api/v1/chats/{chat_id}/messages", json={"text": f"long {slow}"}
                )
                assert sent.status_code == 202, sent.text
            await relayed.wait_for(lambda events: len(_parts_after_seq(events, 3)) >= 5)
            pair.owner.server.process.kill()  # SIGKILL mid-answer
            killed_at = trio.current_time()
            # The other worker takes the shards after the lease ttl and regenerates the answer;
            # the stream goes on from its cursor.
            await relayed.wait_for(
                lambda events: any(e["type"] == "preview_reset" for e in events),
                timeout_s=LEASE_TTL_S + DEADLINE_S,
            )
            reset_s = trio.current_time() - killed_at
            await relayed.wait_for(_answer_done(2))
            nursery.cancel_scope.cancel()
        assert relayed.closed is None
        assert _messages(relayed.events) == [
            (1, "user"),
            (2, "assistant"),
            (3, "user"),
            (4, "assistant"),
        ]
        resets = [e for e in relayed.events if e["type"] == "preview_reset"]
        assert len(resets) == 1  # the killed answer's parts are dropped, once
        last_reset = max(i for i, e in enumerate(relayed.events) if e["type"] == "preview_reset")
        tail = [e for e in relayed.events[last_reset:] if e["type"] == "message_part"]
        assert [p["seq"] for p in tail] == list(range(1, len(tail) + 1))
        async with pair.http(pair.other) as via_other:
            history = (await via_other.get(f"/api/v1/chats/{chat_id}/messages")).json()
        assert [m["role"] for m in history["messages"]] == [
            "user",
            "assistant",
            "user",
            "assistant",
        ]
        print(f"relayed stream reset {reset_s:.2f} s after kill -9 (lease ttl {LEASE_TTL_S:g} s)")


async def test_streams_on_a_worker_that_hands_their_shards_over_go_on_from_the_new_owner(
    db: Database, database_url: str, homes: tuple[Path, Path], token: str, llm: FakeLLM
) -> None:
    async with _serve(database_url, homes[0]) as first_server:
        first = await _worker(first_server)
        pair = Pair(first, first, token)
        # A chat in every shard, each streamed through the first worker while it serves them
        # all; the second worker's arrival moves half of them away.
        by_shard: dict[int, str] = {}
        async with pair.http(first) as via_first:
            for _ in range(SHARDS * 16):
                if len(by_shard) == SHARDS:
                    break
                made = await via_first.post("/api/v1/chats", json={"text": "first"})
                assert made.status_code == 201, made.text
                by_shard.setdefault(shard_of(UUID(made.json()["id"]), SHARDS), made.json()["id"])
        assert len(by_shard) == SHARDS
        streams = {chat_id: Stream() for chat_id in by_shard.values()}
        async with trio.open_nursery() as nursery:
            for chat_id, stream in streams.items():
                await nursery.start(stream.run, first, token, chat_id)
                await stream.wait_for(lambda events: (2, "assistant") in _messages(events))
            async with _serve(database_url, homes[1]) as second_server:
                pair = Pair(first, await _worker(second_server), token)
                await _settled(db, pair)
                moved = [c for c in streams if await _owned_by(db, pair.other, c)]
                assert len(moved) == SHARDS // 2
                async with pair.http(first) as via_first:
                    for chat_id in streams:
                        sent = await via_first.post(
                            f"/api/v1/chats/{chat_id}/messages", json={"text": "again"}
                        )
                        assert sent.status_code == 202, sent.text
                for stream in streams.values():
                    await stream.wait_for(_answer_done(2))
                nursery.cancel_scope.cancel()
    for chat_id, stream in streams.items():
        assert stream.closed is None
        assert _messages(stream.events) == [
            (1, "user"),
            (2, "assistant"),
            (3, "user"),
            (4, "assistant"),
        ], chat_id
        assert not any(e["type"] in ("preview_reset", "history_reset") for e in stream.events)
