"""The inbox over a real server: a finished turn shows up in the list and on the watch socket,
read status, mark all read, paging and filters, and each user seeing only their own."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import httpx2
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    open_websocket_url,
)

from chatd.store.database import Database
from chatd.store.records import InboxNotification
from tests.e2e.api_world import DEADLINE_S, ApiWorld, Client, frames, serve_api

INBOX = "/api/v1/notifications/inbox"
WATCH = "/api/v1/notifications/inbox/watch"
MARK_ALL = f"{INBOX}/mark-all-as-read"


def read_status(notification_id: str) -> str:
    return f"{INBOX}/{notification_id}/read-status"


def assert_invalid(response: httpx2.Response, field: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_request", field), error


async def next_events(ws: WebSocketConnection) -> list[dict[str, Any]]:
    with trio.fail_after(DEADLINE_S):
        return frames(await ws.get_message())


async def finish_turn(client: Client, chat_id: str | None = None) -> str:
    """Start a turn of a new chat (or of the waiting chat ``chat_id``); returns the chat's id."""
    if chat_id is None:
        chat_id = str((await client.create_chat("hello", title="greeting"))["id"])
    else:
        sent = await client.http.post(f"/api/v1/chats/{chat_id}/messages", json={"text": "more"})
        assert sent.status_code == 202, sent.text
    return chat_id


async def inbox(client: Client, **query: str) -> dict[str, Any]:
    response = await client.http.get(INBOX, params=query)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


async def test_a_finished_turn_is_listed_and_watched(api: ApiWorld) -> None:
    alice = await api.client("alice")
    assert await inbox(alice) == {"notifications": [], "next_cursor": None, "unread_count": 0}
    async with alice.ws(WATCH) as ws:
        chat_id = await finish_turn(alice)
        [event] = await next_events(ws)
    assert event["type"] == "notification"
    assert event["chat_id"] == chat_id
    assert event["kind"] == "turn_finished"
    assert event["title"] == "Reply ready"
    assert event["body"] == "w1 w2 w3 w4 w5 w6 w7 w8"  # the fake LLM's reply
    assert (event["read"], event["read_at"]) == (False, None)

    page = await inbox(alice)
    assert page["unread_count"] == 1
    assert page["next_cursor"] is None
    [listed] = page["notifications"]
    assert listed == {k: v for k, v in event.items() if k != "type"}

    # Read, then unread again.
    marked = await alice.http.put(read_status(event["id"]), json={"read": True})
    assert marked.status_code == 200, marked.text
    assert marked.json()["read"] is True
    read_at = marked.json()["read_at"]
    assert read_at is not None
    assert (await inbox(alice))["unread_count"] == 0
    assert [n["id"] for n in (await inbox(alice, read="true"))["notifications"]] == [event["id"]]
    assert (await inbox(alice, read="false"))["notifications"] == []
    again = await alice.http.put(read_status(event["id"]), json={"read": True})
    assert again.json()["read_at"] == read_at  # the first read time is kept
    unread = await alice.http.put(read_status(event["id"]), json={"read": False})
    assert (unread.json()["read"], unread.json()["read_at"]) == (False, None)
    assert (await inbox(alice))["unread_count"] == 1


async def test_mark_all_read_and_paging(api: ApiWorld) -> None:
    alice = await api.client("alice")
    async with alice.ws(WATCH) as ws:
        chat_id = await finish_turn(alice)
        received = await next_events(ws)
        while len(received) < 3:
            await alice.wait_status(chat_id, "waiting")
            await finish_turn(alice, chat_id)
            received += await next_events(ws)
    assert len(received) == 3
    newest_first = [e["id"] for e in reversed(received)]

    first = await inbox(alice, limit="2")
    assert [n["id"] for n in first["notifications"]] == newest_first[:2]
    assert first["unread_count"] == 3
    assert first["next_cursor"] is not None
    second = await inbox(alice, limit="2", cursor=first["next_cursor"])
    assert [n["id"] for n in second["notifications"]] == newest_first[2:]
    assert second["next_cursor"] is None

    await alice.http.put(read_status(newest_first[0]), json={"read": True})
    assert [n["id"] for n in (await inbox(alice, read="false"))["notifications"]] == (
        newest_first[1:]
    )
    marked = await alice.http.put(MARK_ALL)
    assert (marked.status_code, marked.json()) == (200, {"changed": 2})
    page = await inbox(alice)
    assert page["unread_count"] == 0
    assert all(n["read"] for n in page["notifications"])
    assert (await alice.http.put(MARK_ALL)).json() == {"changed": 0}


async def test_each_user_sees_only_their_own(api: ApiWorld) -> None:
    alice = await api.client("alice")
    bob = await api.client("bob")
    async with alice.ws(WATCH) as alice_ws, bob.ws(WATCH) as bob_ws:
        alice_chat = await finish_turn(alice)
        [alice_event] = await next_events(alice_ws)
        assert alice_event["chat_id"] == alice_chat
        # Bob's socket gets his own notification first: Alice's never reached it.
        bob_chat = await finish_turn(bob)
        [bob_event] = await next_events(bob_ws)
        assert bob_event["chat_id"] == bob_chat

    assert [n["id"] for n in (await inbox(bob))["notifications"]] == [bob_event["id"]]
    assert (await inbox(bob))["unread_count"] == 1
    # Alice's notification is a 404 to Bob, and his mark-all leaves it alone.
    stolen = await bob.http.put(read_status(alice_event["id"]), json={"read": True})
    assert stolen.status_code == 404
    assert stolen.json()["error"]["code"] == "not_found"
    assert (await bob.http.put(MARK_ALL)).json() == {"changed": 1}
    assert (await inbox(alice))["unread_count"] == 1
    missing = await alice.http.put(read_status(str(uuid4())), json={"read": True})
    assert missing.status_code == 404


async def test_inputs_are_checked(api: ApiWorld) -> None:
    alice = await api.client("alice")
    limit = api.settings.max_page_size
    assert (await alice.http.get(INBOX, params={"limit": str(limit)})).status_code == 200
    for query, field in (
        ({"limit": "0"}, "limit"),
        ({"limit": str(limit + 1)}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"read": "maybe"}, "read"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"color": "red"}, "color"),
        ({"read": "a\x00"}, "read"),
    ):
        assert_invalid(await alice.http.get(INBOX, params=query), field)
    assert_invalid(await alice.http.get(INBOX, params=[("read", "true"), ("read", "true")]), "read")

    target = read_status(str(uuid4()))
    assert_invalid(await alice.http.put(target, json={"read": "yes"}), "read")
    assert_invalid(await alice.http.put(target, json={"read": None}), "read")
    assert_invalid(await alice.http.put(target, json={}), "read")
    assert_invalid(await alice.http.put(target, json={"read": True, "when": 1}), "when")
    assert_invalid(await alice.http.put(target, content=b""), "body")
    for bad in ("nope", str(uuid4())[1:], f"{uuid4()}x"):
        response = await alice.http.put(read_status(bad), json={"read": True})
        assert_invalid(response, "notification_id")


async def test_every_route_needs_a_token(api: ApiWorld) -> None:
    async with api.anonymous() as anonymous:
        for method, path in (
            ("GET", INBOX),
            ("PUT", read_status(str(uuid4()))),
            ("PUT", MARK_ALL),
        ):
            response = await anonymous.request(method, path, json={"read": True})
            assert response.status_code == 401, (method, path)
    alice = await api.client("alice")
    refused = await api.refused(WATCH)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"
    own_token = {"Authorization": f"Bearer {alice.token}"}
    foreign = await api.refused(WATCH, own_token | {"Origin": "https://evil.test"})
    assert foreign.status_code == 403
    # Browsers cannot set headers: the token may come as a query parameter.
    async with open_websocket_url(f"{api.ws_url}{WATCH}?access_token={alice.token}") as ws:
        chat_id = await finish_turn(alice)
        [event] = await next_events(ws)
        assert event["chat_id"] == chat_id


@pytest.fixture
async def tight_api(db: Database) -> AsyncIterator[ApiWorld]:
    """A server whose subscribers may have only one item waiting."""
    async with serve_api(db, subscriber_queue_size=1) as world:
        yield world


async def test_a_slow_watcher_is_closed_with_4008(tight_api: ApiWorld) -> None:
    alice = await tight_api.client("alice")
    now = datetime.now(UTC)

    def notification(title: str) -> InboxNotification:
        return InboxNotification(uuid4(), alice.user.id, None, "failed", title, "", None, now)

    async with alice.ws(WATCH) as ws:
        # Two at once, with the socket's task given no chance to take the first: dropped.
        feed = tight_api.engine.inbox
        feed.publish(alice.user.id, notification("one"))
        feed.publish(alice.user.id, notification("two"))
        # Dropped before it sent either: the socket closes with nothing on it.
        with trio.fail_after(DEADLINE_S), pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
    reason = closed.value.reason
    assert reason is not None
    assert reason.code == 4008
    assert feed.stats.slow_consumers_dropped == 1


async def test_a_batch_is_one_array_frame(api: ApiWorld) -> None:
    alice = await api.client("alice")
    now = datetime.now(UTC)
    sent = [
        InboxNotification(uuid4(), alice.user.id, None, "action_required", f"n{i}", "", None, now)
        for i in range(3)
    ]
    async with alice.ws(WATCH) as ws:
        # Published at once: the socket's task takes them as one batch.
        for n in sent:
            api.engine.inbox.publish(alice.user.id, n)
        with trio.fail_after(DEADLINE_S):
            frame = json.loads(await ws.get_message())
    assert isinstance(frame, list)
    assert [e["title"] for e in frame] == ["n0", "n1", "n2"]
    assert {e["type"] for e in frame} == {"notification"}
    assert [e["id"] for e in frame] == [str(n.id) for n in sent]
