"""chatd.client over a real server: typed errors, a stream cut mid-answer by a TCP proxy and
resumed with each part once, dynamic tools answered by a handler, the sync client, asyncio."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit

import pytest
import trio

from chatd.client import (
    AsyncClient,
    ChatStream,
    Client,
    InvalidRequest,
    MessageEvent,
    MessagePartEvent,
    NotFound,
    PreviewResetEvent,
    StatusEvent,
    StreamEvent,
    TextPart,
    Unauthorized,
    WatchEvent,
)
from chatd.client.events import ChatCreated, ChatStatusChanged
from chatd.providers.fake.scenario import knobs_marker
from chatd.store.database import Database
from tests.e2e.api_world import DEADLINE_S, serve_api
from tests.faults.proxy import PgProxy, TcpTarget

REPLY = " ".join(f"word{i}" for i in range(40))


async def _until_idle(stream: ChatStream) -> list[StreamEvent]:
    seen: list[StreamEvent] = []
    async for event in stream:
        seen.append(event)
        if isinstance(event, StatusEvent) and event.status in ("waiting", "error"):
            return seen
    return seen


def _text(events: list[StreamEvent]) -> str:
    text = ""
    for event in events:
        if isinstance(event, PreviewResetEvent):
            text = ""
        if isinstance(event, MessagePartEvent) and isinstance(event.part, TextPart):
            text += event.part.text
    return text


async def test_errors_are_typed_with_the_field_and_rule(db: Database) -> None:
    async with serve_api(db) as world:
        alice = await world.client("alice")
        async with AsyncClient(world.url, alice.token) as chatd:
            with pytest.raises(NotFound, match="404 not_found"):
                await chatd.get_chat(str(uuid.uuid4()))
            with pytest.raises(InvalidRequest, match="dynamic_tools") as refused:
                await chatd.create_chat("hi", dynamic_tools=[{"name": "", "bogus": 1}])
            assert refused.value.status == 400
            assert refused.value.field is not None
            assert refused.value.field.startswith("dynamic_tools[0]")
            assert refused.value.rule
            with pytest.raises(NotFound, match="404"):
                async with chatd.stream(str(uuid.uuid4())) as events:
                    await events.__anext__()
        async with AsyncClient(world.url, "chatd_not-a-token") as stranger:
            with pytest.raises(Unauthorized, match="401"):
                await stranger.me()


async def test_a_stream_cut_mid_answer_resumes_with_every_part_once(db: Database) -> None:
    async with serve_api(db) as world, trio.open_nursery() as nursery:
        alice = await world.client("alice")
        address = urlsplit(world.url)
        assert address.hostname is not None
        assert address.port is not None
        proxy = PgProxy(TcpTarget(address.hostname, address.port))
        host, port = await nursery.start(proxy.serve)
        marker = knobs_marker(reply=REPLY, chunks=40, chunk_interval_ms=40)
        async with AsyncClient(f"http://{host}:{port}", alice.token) as chatd:
            chat = await chatd.create_chat(f"talk {marker}")
            seen: list[StreamEvent] = []
            parts = 0
            with trio.fail_after(DEADLINE_S):
                async with chatd.stream(chat.id) as events:
                    async for event in events:
                        seen.append(event)
                        if isinstance(event, MessagePartEvent):
                            parts += 1
                            if parts in (5, 15):  # twice, mid-answer
                                proxy.cut()
                                proxy.restore()
                        if isinstance(event, StatusEvent) and event.status == "waiting":
                            break
                    assert events.reconnects == 2
            nursery.cancel_scope.cancel()
        assert _text(seen) == REPLY
        part_keys = [
            (e.history_version, e.generation_attempt, e.seq)
            for e in seen
            if isinstance(e, MessagePartEvent)
        ]
        assert len(part_keys) == len(set(part_keys))
        messages = [e for e in seen if isinstance(e, MessageEvent)]
        assert [(m.role, m.seq) for m in messages] == [("user", 1), ("assistant", 2)]
        assert messages[1].text == REPLY
        statuses = [e.status for e in seen if isinstance(e, StatusEvent)]
        assert statuses == ["running", "waiting"]


async def test_answer_tools_runs_the_handler_and_posts_the_results(db: Database) -> None:
    async with serve_api(db) as world:
        alice = await world.client("alice")
        marker = knobs_marker(tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}])
        tool = {"name": "get_weather", "input_schema": {"type": "object"}}
        asked: list[object] = []

        def weather(call: object) -> dict[str, int]:
            asked.append(getattr(call, "args", None))
            return {"temperature_c": 21}

        async with AsyncClient(world.url, alice.token) as chatd:
            chat = await chatd.create_chat(f"weather? {marker}", dynamic_tools=[tool])
            with trio.fail_after(DEADLINE_S):
                assert await chatd.answer_tools(chat.id, weather) == "waiting"
            history = await chatd.history(chat.id)
        assert asked == [{"city": "Paris"}]
        outputs = [p["output"] for m in history if m.role == "tool" for p in m.content]
        assert outputs == ['{"temperature_c":21}']
        assert history[-1].role == "assistant"


async def test_the_sync_client_and_asyncio(db: Database) -> None:
    async with serve_api(db) as world:
        alice = await world.client("alice")
        marker = knobs_marker(reply=REPLY, chunks=10)

        def sync_session() -> str:
            # The answer may be committed before the stream opens: then it comes as the
            # message, without parts.
            with Client(world.url, alice.token) as chatd:
                chat = chatd.create_chat(f"hi {marker}")
                with chatd.stream(chat.id) as events:
                    for event in events:
                        if isinstance(event, MessageEvent) and event.role == "assistant":
                            return event.text
            raise AssertionError("the stream ended")

        async def asyncio_session() -> str:
            async with AsyncClient(world.url, alice.token) as chatd:
                chat = await chatd.create_chat(f"hi {marker}")
                async with chatd.stream(chat.id) as events:
                    seen = await _until_idle(events)
                return next(
                    e.text for e in seen if isinstance(e, MessageEvent) and e.role == "assistant"
                )

        with trio.fail_after(DEADLINE_S):
            assert await trio.to_thread.run_sync(sync_session) == REPLY
            assert await trio.to_thread.run_sync(asyncio.run, asyncio_session()) == REPLY


async def test_watch_sees_a_chat_created_and_its_turn_end(db: Database) -> None:
    async with serve_api(db) as world:
        alice = await world.client("alice")
        seen: list[WatchEvent] = []
        async with AsyncClient(world.url, alice.token) as chatd, chatd.watch() as feed:
            chat = await chatd.create_chat("hello")  # the feed is open: entering connected it
            with trio.fail_after(DEADLINE_S):
                async for event in feed:
                    seen.append(event)
                    if isinstance(event, ChatStatusChanged) and event.status == "waiting":
                        break
        assert seen[0] == ChatCreated(chat.id, chat.title, "running", archived=False)
