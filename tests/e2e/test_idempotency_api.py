"""Idempotency-Key over real sockets: a retried command is done once and answered the same."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from chatd.domain.effects import MessageAccepted
from chatd.domain.mailbox import AttemptSuperseded, IdempotencyMark, Keyed, SendMessage
from chatd.providers.fake import knobs_marker, open_fake_llm
from chatd.runtime import register_default_model
from chatd.store import idempotency, users
from chatd.store.database import Database
from chatd.store.idempotency import Claimed
from tests.e2e.api_world import DEADLINE_S, ApiWorld, Client, serve_api
from tests.e2e.chatd_process import chatd_server
from tests.e2e.test_hot_path import Cost, cost_of_turn
from tests.faults.proxy import open_pg_proxy

QUICK = knobs_marker(chunks=1)
SLOW = knobs_marker(first_chunk_delay_ms=600_000)
LOOKUP = {
    "name": "lookup",
    "description": "Look a word up",
    "input_schema": {"type": "object", "properties": {"word": {"type": "string"}}},
}
CALL_LOOKUP = knobs_marker(tool_calls=[{"name": "lookup", "arguments": {"word": "kiwi"}}])
HEADER = "Idempotency-Key"


def keyed(key: str) -> dict[str, str]:
    return {HEADER: key}


def error_of(response: httpx2.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    return body


async def user_texts(client: Client, chat_id: str) -> list[str]:
    """The texts of the chat's user messages, in history then in its queue."""
    base = f"/api/v1/chats/{chat_id}"
    history = (await client.http.get(f"{base}/messages")).json()["messages"]
    queue = (await client.http.get(base)).json()["queue"]
    texts = [m["content"][0]["text"] for m in history if m["role"] == "user"]
    return texts + [q["text"] for q in queue]


async def until_served(request: Callable[[], Awaitable[httpx2.Response]]) -> httpx2.Response:
    """``request`` retried as a client does while chatd answers 503 (a chat's actor restarting
    after an outage), after the ``Retry-After`` it names; at most DEADLINE_S in all."""
    with trio.fail_after(DEADLINE_S):
        for _attempt in itertools.count():
            response = await request()
            if response.status_code != 503:
                return response
            # The pause the server asked for between retries, not a wait for a condition.
            await trio.sleep(float(response.headers.get("Retry-After", "1")))
    raise AssertionError("unreachable")


async def idle_chat(client: Client) -> str:
    chat = await client.create_chat(f"{QUICK} hello")
    await client.wait_status(chat["id"], "waiting")
    chat_id: str = chat["id"]
    return chat_id


async def test_a_resent_message_is_sent_once_and_answered_the_same(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat_id = await idle_chat(alice)
    url = f"/api/v1/chats/{chat_id}/messages"
    body = {"text": f"{QUICK} once"}
    first = await alice.http.post(url, json=body, headers=keyed("send-1"))
    await alice.wait_status(chat_id, "waiting")
    again = await alice.http.post(url, json=body, headers=keyed("send-1"))
    assert first.status_code == again.status_code == 202, again.text
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    texts = await user_texts(alice, chat_id)
    assert texts.count(body["text"]) == 1


async def test_the_same_key_for_another_request_is_a_422_naming_the_header(
    api: ApiWorld,
) -> None:
    alice = await api.client("alice")
    chat_id = await idle_chat(alice)
    url = f"/api/v1/chats/{chat_id}/messages"
    first = await alice.http.post(url, json={"text": f"{QUICK} a"}, headers=keyed("k"))
    assert first.status_code == 202
    await alice.wait_status(chat_id, "waiting")
    other_body = await alice.http.post(url, json={"text": f"{QUICK} b"}, headers=keyed("k"))
    assert error_of(other_body, 422)["field"] == HEADER
    assert error_of(other_body, 422)["code"] == "idempotency_key_reused"
    other_route = await alice.http.post(f"/api/v1/chats/{chat_id}/interrupt", headers=keyed("k"))
    assert error_of(other_route, 422)["field"] == HEADER
    # Field order is not a different request: the body is compared as decoded.
    reordered = await alice.http.post(
        url,
        content=json.dumps({"busy_behavior": "queue", "text": f"{QUICK} a"}),
        headers={**keyed("k"), "Content-Type": "application/json"},
    )
    assert reordered.status_code == 202
    assert reordered.content == first.content
    assert [t for t in await user_texts(alice, chat_id) if t.endswith((" a", " b"))] == [
        f"{QUICK} a"
    ]


async def test_resent_tool_results_are_204_both_times_not_409(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat(f"{CALL_LOOKUP} look it up", dynamic_tools=[LOOKUP])
    await alice.wait_status(chat["id"], "requires_action")
    base = f"/api/v1/chats/{chat['id']}"
    [call] = (await alice.http.get(base)).json()["pending_tool_calls"]
    answer = {"results": [{"call_id": call["id"], "output": '{"meaning": "a fruit"}'}]}
    done = await alice.http.post(f"{base}/tool-results", json=answer, headers=keyed("tools-1"))
    assert done.status_code == 204, done.text
    await alice.wait_status(chat["id"], "waiting")
    again = await alice.http.post(f"{base}/tool-results", json=answer, headers=keyed("tools-1"))
    assert again.status_code == 204, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    history = (await alice.http.get(f"{base}/messages")).json()["messages"]
    assert sum(1 for m in history if m["role"] == "tool") == 1


async def test_concurrent_duplicates_do_the_work_once(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat = await alice.create_chat(f"{SLOW} think slowly")
    url = f"/api/v1/chats/{chat['id']}/messages"
    responses: list[httpx2.Response] = []

    async def send() -> None:
        response = await alice.http.post(url, json={"text": "dup"}, headers=keyed("race"))
        responses.append(response)

    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(send)
    # One process: every duplicate waited for the first one's answer.
    assert [r.status_code for r in responses] == [202] * 6, [r.text for r in responses]
    assert len({r.content for r in responses}) == 1
    assert sum(1 for r in responses if "Idempotent-Replayed" not in r.headers) == 1
    assert (await user_texts(alice, chat["id"])).count("dup") == 1


async def test_a_duplicate_waits_for_the_first_at_most_the_wait_bound_then_gets_409(
    database_url: str,
) -> None:
    """The first request is stuck in its commit (a proxy holds the bytes of the commit): its
    duplicate waits idempotency_wait_s for the answer, then gets 409 with Retry-After; once
    the first is done, a retry gets its answer."""
    async with (
        open_pg_proxy(database_url) as proxy,
        Database.connect(proxy.url_for(database_url), min_size=1, max_size=4) as db,
        serve_api(db, idempotency_wait_s=0.5) as api,
    ):
        alice = await api.client("alice")
        chat_id = await idle_chat(alice)
        url = f"/api/v1/chats/{chat_id}/messages"
        marker = f"stuck-{uuid.uuid4().hex}"
        body = {"text": f"{QUICK} {marker}"}
        trigger = proxy.arm(marker.encode(), action="pause")
        first: list[httpx2.Response] = []

        async def send_first() -> None:
            first.append(await alice.http.post(url, json=body, headers=keyed("stuck")))

        with trio.fail_after(DEADLINE_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_first)
                await trigger.fired.wait()
                started = trio.current_time()
                duplicate = await alice.http.post(url, json=body, headers=keyed("stuck"))
                waited = trio.current_time() - started
                assert error_of(duplicate, 409)["code"] == "idempotency_key_in_progress"
                assert duplicate.headers["Retry-After"] == "1"
                assert 0.5 <= waited < 5.0
                proxy.resume()
        [done] = first
        assert done.status_code == 202, done.text
        again = await alice.http.post(url, json=body, headers=keyed("stuck"))
        assert again.content == done.content
        assert again.headers["Idempotent-Replayed"] == "true"


async def test_a_duplicate_on_another_process_gets_409_in_progress(api: ApiWorld) -> None:
    """A pending key this process is not working on (another worker's): 409 with
    Retry-After, and nothing is done."""
    alice = await api.client("alice")
    chat_id = await idle_chat(alice)
    url = f"/api/v1/chats/{chat_id}/messages"
    body = {"text": "elsewhere"}
    first = await alice.http.post(url, json=body, headers=keyed("remote"))
    assert first.status_code == 202
    # The state another worker leaves while it runs the command: pending, its lease ahead.
    await api.db.execute(
        "UPDATE idempotency_keys SET status = NULL, body = NULL, content_type = NULL,"
        " locked_until = now() + interval '1 hour', claimed_by = 'another-worker'"
        " WHERE key = 'remote'"
    )
    busy = await alice.http.post(url, json=body, headers=keyed("remote"))
    assert error_of(busy, 409)["code"] == "idempotency_key_in_progress"
    assert error_of(busy, 409)["field"] == HEADER
    assert busy.headers["Retry-After"] == "1"
    assert (await user_texts(alice, chat_id)).count("elsewhere") == 1


async def test_a_retry_after_a_crash_before_the_record_finds_the_sent_message(
    api: ApiWorld,
) -> None:
    """The database as a kill -9 between the send's commit and the record of its answer
    leaves it: the message committed, the key pending; once the pending timeout has passed
    (another worker's key), the retry answers from the message instead of sending it again."""
    alice = await api.client("alice")
    chat_id = await idle_chat(alice)
    url = f"/api/v1/chats/{chat_id}/messages"
    body = {"text": f"{QUICK} crash"}
    first = await alice.http.post(url, json=body, headers=keyed("crash"))
    assert first.status_code == 202
    await alice.wait_status(chat_id, "waiting")
    await api.db.execute(
        "UPDATE idempotency_keys SET status = NULL, body = NULL, content_type = NULL,"
        " locked_until = now() - interval '1 second', claimed_by = 'dead-worker'"
        " WHERE key = 'crash'"
    )
    retry = await alice.http.post(url, json=body, headers=keyed("crash"))
    assert retry.status_code == 202, retry.text
    assert retry.json()["message_id"] == first.json()["message_id"]
    assert (await user_texts(alice, chat_id)).count(body["text"]) == 1
    replay = await alice.http.post(url, json=body, headers=keyed("crash"))
    assert replay.content == retry.content
    assert replay.headers["Idempotent-Replayed"] == "true"


async def test_a_send_whose_commit_was_done_but_not_acknowledged_is_not_sent_twice(
    database_url: str,
) -> None:
    """PostgreSQL goes away right after committing the message, before chatd hears so (a TCP
    proxy cuts every connection once the commit's answer comes back): the client gets an
    error, and its retry with the same key, once the database is back, finds the message and
    answers with it instead of sending it again."""
    async with (
        open_pg_proxy(database_url) as proxy,
        Database.connect(proxy.url_for(database_url), min_size=1, max_size=4) as db,
        serve_api(db) as api,
    ):
        alice = await api.client("alice")
        chat_id = await idle_chat(alice)
        url = f"/api/v1/chats/{chat_id}/messages"
        marker = f"lost-ack-{uuid.uuid4().hex}"
        text = f"{QUICK} {marker}"
        trigger = proxy.arm(marker.encode(), at="reply")
        first = await alice.http.post(url, json={"text": text}, headers=keyed("lost"))
        assert trigger.fired.is_set()
        assert first.status_code == 503, first.text
        proxy.restore()
        with trio.fail_after(DEADLINE_S):
            retry = await alice.http.post(url, json={"text": text}, headers=keyed("lost"))
        assert retry.status_code == 202, retry.text
        await alice.wait_status(chat_id, "waiting")
        history = (await alice.http.get(f"{url}?limit=200")).json()["messages"]
        sent = [m for m in history if m["role"] == "user" and m["content"][0]["text"] == text]
        assert [m["id"] for m in sent] == [retry.json()["message_id"]]
        assert history[-1]["role"] == "assistant"


async def test_an_interrupt_done_but_not_acknowledged_is_not_done_again(database_url: str) -> None:
    """An interrupt of a chat that waits on tool results, with a message queued behind them:
    its commit ends the turn and starts the queued message, then PostgreSQL's answer is lost
    (the proxy cuts every connection once the commit's answer comes back; the key is in that
    transaction). The client gets 503; its retry, once the database is back, is answered 204
    as done, without interrupting again the queued message's run, which runs *now*."""
    async with (
        open_pg_proxy(database_url) as proxy,
        Database.connect(proxy.url_for(database_url), min_size=1, max_size=4) as db,
        serve_api(db, lease_ttl_s=3600.0) as api,  # no lease renewal to set the trigger off
    ):
        alice = await api.client("alice")
        chat = await alice.create_chat(f"{CALL_LOOKUP} look it up", dynamic_tools=[LOOKUP])
        await alice.wait_status(chat["id"], "requires_action")
        base = f"/api/v1/chats/{chat['id']}"
        queued = await alice.http.post(f"{base}/messages", json={"text": f"{SLOW} next"})
        assert queued.json()["queued"] is True, queued.text
        key = f"interrupt-{uuid.uuid4().hex}"
        trigger = proxy.arm(key.encode(), at="reply")
        first = await alice.http.post(f"{base}/interrupt", headers=keyed(key))
        assert trigger.fired.is_set()
        assert first.status_code == 503, first.text
        proxy.restore()
        retry = await until_served(lambda: alice.http.post(f"{base}/interrupt", headers=keyed(key)))
        assert retry.status_code == 204, retry.text
        detail = (await alice.http.get(base)).json()
        assert (detail["status"], detail["queue"], detail["pending_tool_calls"]) == (
            "running",
            [],
            [],
        )
        texts = await user_texts(alice, chat["id"])
        assert texts[-1] == f"{SLOW} next"
        again = await alice.http.post(f"{base}/interrupt", headers=keyed(key))
        assert again.status_code == 204, again.text
        assert again.headers["Idempotent-Replayed"] == "true"
        assert (await alice.http.get(base)).json()["status"] == "running"


async def test_a_send_done_but_not_acknowledged_is_not_sent_again_once_its_entry_is_dropped(
    database_url: str,
) -> None:
    """A message sent to a chat that waits on tool results is queued; PostgreSQL's answer to
    that commit is lost (503). The user drops the queued entry before the client retries: no
    row of the send is left, yet the retry is answered 202 as queued (what the send did) and
    does not queue the message a second time."""
    async with (
        open_pg_proxy(database_url) as proxy,
        Database.connect(proxy.url_for(database_url), min_size=1, max_size=4) as db,
        serve_api(db, lease_ttl_s=3600.0) as api,
    ):
        alice = await api.client("alice")
        chat = await alice.create_chat(f"{CALL_LOOKUP} look it up", dynamic_tools=[LOOKUP])
        await alice.wait_status(chat["id"], "requires_action")
        base = f"/api/v1/chats/{chat['id']}"
        marker = f"dropped-{uuid.uuid4().hex}"
        body = {"text": f"{QUICK} {marker}"}
        trigger = proxy.arm(marker.encode(), at="reply")
        first = await alice.http.post(f"{base}/messages", json=body, headers=keyed("dropped"))
        assert trigger.fired.is_set()
        assert first.status_code == 503, first.text
        proxy.restore()
        [entry] = (await alice.http.get(base)).json()["queue"]
        assert entry["text"] == body["text"]
        dropped = await until_served(lambda: alice.http.delete(f"{base}/queue/{entry['id']}"))
        assert dropped.status_code == 204, dropped.text
        retry = await alice.http.post(f"{base}/messages", json=body, headers=keyed("dropped"))
        assert retry.status_code == 202, retry.text
        assert retry.json() == {"message_id": entry["id"], "queued": True}
        detail = (await alice.http.get(base)).json()
        assert (detail["status"], detail["queue"]) == ("requires_action", [])
        assert body["text"] not in await user_texts(alice, chat["id"])


async def test_a_superseded_attempts_command_is_refused_whole_and_the_chat_goes_on(
    api: ApiWorld,
) -> None:
    """A command still on its way to the chat's actor when a retry took its key over (its
    request abandoned, say after the ask timed out) is refused at its commit: nothing of it is
    written, and the actor goes on with the command of the attempt that holds the key."""
    alice = await api.client("alice")
    chat_id = await idle_chat(alice)
    router, user_id = api.engine.router, alice.user.id

    async def claimed() -> Claimed:
        outcome = await idempotency.claim(
            api.db,
            user_id=user_id,
            key="late",
            fingerprint=bytes(32),
            ttl_s=api.settings.idempotency_key_ttl_s,
            pending_timeout_s=api.settings.idempotency_pending_timeout_s,
            worker_id="the-same-worker",
        )
        assert isinstance(outcome, Claimed)
        return outcome

    first = await claimed()
    second = await claimed()  # the same worker's key: taken over at once, by a new attempt
    late = SendMessage(uuid.uuid4(), f"{QUICK} late")
    stale = Keyed(late, IdempotencyMark(user_id, "late", first.attempt))
    with pytest.raises(AttemptSuperseded, match="another request holds it now"):
        await router.ask(uuid.UUID(chat_id), stale)
    on_time = SendMessage(uuid.uuid4(), f"{QUICK} on time")
    current = Keyed(on_time, IdempotencyMark(user_id, "late", second.attempt))
    reply = await router.ask(uuid.UUID(chat_id), current)
    assert isinstance(reply, MessageAccepted)
    assert reply.message_id == on_time.message_id
    assert [t for t in await user_texts(alice, chat_id) if t.startswith(QUICK)] == [
        f"{QUICK} hello",
        f"{QUICK} on time",
    ]
    committed = await api.db.fetchval("SELECT committed FROM idempotency_keys WHERE key = 'late'")
    assert committed is True


@pytest.mark.slow
async def test_a_worker_killed_between_the_commit_and_the_record_does_not_send_twice(
    db: Database, database_url: str, home: Path
) -> None:
    """``chatd serve`` is killed with SIGKILL right after the message's commit is done, before
    it can record the key's answer (a proxy holds every byte to PostgreSQL from the commit's
    reply on). Restarted on its home, it is the same worker: the client's retry takes the
    pending key over at once, finds the message and answers with it; it is stored once."""
    user = await users.create_user(db, "alice")
    _token, secret = await users.create_api_token(db, user.id)
    env = {"CHATD_HOME": str(home), "CHATD_SHARD_COUNT": "4"}
    marker = f"killed-{uuid.uuid4().hex}"
    body = {"text": f"{QUICK} {marker}"}
    async with open_fake_llm() as llm, open_pg_proxy(database_url) as proxy:
        await register_default_model(db, base_url=f"{llm.url}/v1")
        args = ["--database-url", proxy.url_for(database_url), "--port", "0"]
        async with (
            chatd_server(args, env=env) as first,
            httpx2.AsyncClient(
                base_url=first.url, headers={"Authorization": f"Bearer {secret}"}
            ) as http,
        ):
            created = await http.post("/api/v1/chats", json={"text": f"{QUICK} hi"})
            assert created.status_code == 201, created.text
            url = f"/api/v1/chats/{created.json()['id']}/messages"
            trigger = proxy.arm(marker.encode(), at="reply", action="pause")

            async def send() -> None:
                with pytest.raises(httpx2.TransportError):
                    await http.post(url, json=body, headers=keyed("killed"), timeout=None)

            with trio.fail_after(DEADLINE_S):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    await trigger.fired.wait()
                    first.process.kill()
                    await first.process.wait()
        proxy.resume()
        async with (
            chatd_server(args, env=env) as second,
            httpx2.AsyncClient(
                base_url=second.url,
                headers={"Authorization": f"Bearer {secret}"},
                timeout=DEADLINE_S,
            ) as http,
        ):
            retry = await http.post(url, json=body, headers=keyed("killed"))
            assert retry.status_code == 202, retry.text
            again = await http.post(url, json=body, headers=keyed("killed"))
            assert again.headers["Idempotent-Replayed"] == "true"
            assert again.content == retry.content
    stored = await db.fetch(
        "SELECT id FROM chat_messages WHERE content::text LIKE $1"
        " UNION ALL SELECT id FROM queued_messages WHERE content::text LIKE $1",
        f"%{marker}%",
    )
    assert [str(r["id"]) for r in stored] == [retry.json()["message_id"]]


async def test_a_retried_chat_creation_creates_one_chat(api: ApiWorld) -> None:
    alice = await api.client("alice")
    body = {"text": f"{QUICK} new chat", "title": "once"}
    first = await alice.http.post("/api/v1/chats", json=body, headers=keyed("create"))
    again = await alice.http.post("/api/v1/chats", json=body, headers=keyed("create"))
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    chats = (await alice.http.get("/api/v1/chats")).json()["chats"]
    assert [c["title"] for c in chats] == ["once"]


async def test_an_expired_key_is_free_again_and_expired_keys_are_deleted(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat_id = await idle_chat(alice)
    url = f"/api/v1/chats/{chat_id}/messages"
    first = await alice.http.post(url, json={"text": f"{QUICK} day one"}, headers=keyed("k"))
    assert first.status_code == 202
    await alice.wait_status(chat_id, "waiting")
    old = await alice.http.post(url, json={"text": f"{QUICK} old"}, headers=keyed("old"))
    assert old.status_code == 202
    await alice.wait_status(chat_id, "waiting")
    # A day later, by the database's clock: the keys' expiry is in the past.
    await api.db.execute(
        "UPDATE idempotency_keys SET expires_at = now() - interval '1 second',"
        " created_at = created_at - interval '1 day'"
    )
    reused = await alice.http.post(url, json={"text": f"{QUICK} day two"}, headers=keyed("k"))
    assert reused.status_code == 202, reused.text
    assert "Idempotent-Replayed" not in reused.headers
    assert reused.json()["message_id"] != first.json()["message_id"]
    keys = await api.db.fetch("SELECT key FROM idempotency_keys")
    assert [r["key"] for r in keys] == ["k"]  # "old" was deleted with the write


async def test_keys_are_per_user(api: ApiWorld) -> None:
    alice, bob = await api.client("alice"), await api.client("bob")
    alice_chat, bob_chat = await idle_chat(alice), await idle_chat(bob)
    mine = await alice.http.post(
        f"/api/v1/chats/{alice_chat}/messages", json={"text": "mine"}, headers=keyed("same")
    )
    theirs = await bob.http.post(
        f"/api/v1/chats/{bob_chat}/messages", json={"text": "theirs"}, headers=keyed("same")
    )
    assert mine.status_code == theirs.status_code == 202, theirs.text
    assert "Idempotent-Replayed" not in theirs.headers
    again = await alice.http.post(
        f"/api/v1/chats/{alice_chat}/messages", json={"text": "mine"}, headers=keyed("same")
    )
    assert again.content == mine.content
    assert again.headers["Idempotent-Replayed"] == "true"


async def test_bad_keys_are_400_naming_the_header_and_do_nothing(db: Database) -> None:
    async with serve_api(db, idempotency_key_max_chars=8) as api:
        alice = await api.client("alice")
        chat_id = await idle_chat(alice)
        url = f"/api/v1/chats/{chat_id}/messages"
        for bad, rule in (("", "empty"), ("123456789", "at most 8"), ("a b", "characters")):
            response = await alice.http.post(url, json={"text": "no"}, headers=keyed(bad))
            error = error_of(response, 400)
            assert error["field"] == HEADER
            assert rule in error["rule"]
        ok = await alice.http.post(url, json={"text": "yes"}, headers=keyed("12345678"))
        assert ok.status_code == 202
        assert "no" not in await user_texts(alice, chat_id)


async def test_a_refused_command_frees_its_key(api: ApiWorld) -> None:
    """A 4xx did nothing, so the corrected retry with the same key is done."""
    alice = await api.client("alice")
    chat_id = await idle_chat(alice)
    base = f"/api/v1/chats/{chat_id}"
    missing = f"{base}/messages/{uuid.uuid4()}"
    refused = await alice.http.patch(missing, json={"text": "x"}, headers=keyed("fix"))
    assert error_of(refused, 404)["code"] == "not_found"
    assert await api.db.fetchval("SELECT count(*) FROM idempotency_keys") == 0
    sent = await alice.http.post(f"{base}/messages", json={"text": "x"}, headers=keyed("fix"))
    assert sent.status_code == 202
    again = await alice.http.post(f"{base}/messages", json={"text": "x"}, headers=keyed("fix"))
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == sent.content


async def test_without_the_header_nothing_is_recorded(api: ApiWorld) -> None:
    alice = await api.client("alice")
    chat_id = await idle_chat(alice)
    url = f"/api/v1/chats/{chat_id}/messages"
    first = await alice.http.post(url, json={"text": f"{QUICK} twice"})
    await alice.wait_status(chat_id, "waiting")
    second = await alice.http.post(url, json={"text": f"{QUICK} twice"})
    assert first.status_code == second.status_code == 202
    assert first.json()["message_id"] != second.json()["message_id"]
    assert (await user_texts(alice, chat_id)).count(f"{QUICK} twice") == 2
    assert await api.db.fetchval("SELECT count(*) FROM idempotency_keys") == 0


async def test_a_key_costs_three_statements_and_no_key_costs_nothing(db: Database) -> None:
    """The claim and the record are one statement each (no transaction of their own), the
    mark one more inside the command's own commit; a request without the header costs
    exactly what it cost before."""
    async with serve_api(db, lease_ttl_s=3600.0) as api:  # no lease renewal while measuring
        alice = await api.client("alice")
        chat_id = await idle_chat(alice)
        url = f"/api/v1/chats/{chat_id}/messages"
        keys = iter(range(100))

        def sending(*, keyed_send: bool) -> Any:
            async def send() -> uuid.UUID:
                headers = keyed(f"cost-{next(keys)}") if keyed_send else {}
                response = await alice.http.post(url, json={"text": QUICK}, headers=headers)
                assert response.status_code == 202, response.text
                return uuid.UUID(chat_id)

            return send

        await cost_of_turn(api, alice, sending(keyed_send=True))  # warm every cache
        plain = await cost_of_turn(api, alice, sending(keyed_send=False))
        with_key = await cost_of_turn(api, alice, sending(keyed_send=True))
        assert with_key == Cost(plain.statements + 3, plain.transactions)


async def test_the_openapi_document_describes_the_header(api: ApiWorld) -> None:
    alice = await api.client("alice")
    doc = (await alice.http.get("/api/v1/openapi.json")).json()
    send = doc["paths"]["/api/v1/chats/{chat_id}/messages"]["post"]
    [param] = [p for p in send["parameters"] if p["name"] == HEADER]
    assert param["in"] == "header"
    assert param["schema"]["maxLength"] == api.settings.idempotency_key_max_chars
    assert {"409", "422"} <= set(send["responses"])
    listing = doc["paths"]["/api/v1/chats/{chat_id}/messages"]["get"]
    assert all(p["name"] != HEADER for p in listing["parameters"])
