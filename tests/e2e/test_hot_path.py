"""What the edge costs in SQL once warm: a chat turn (or a chat's creation) through the API
makes exactly the queries it makes when handed to the engine directly: no token read, no
ownership read, no read-back of the created chat."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import trio

from chatd.actors.chat_actor import CreateChatRequest
from chatd.domain.chat_status import ChatStatus
from chatd.domain.mailbox import SendMessage
from chatd.domain.watch_events import ChatStatusChanged
from chatd.providers.fake import knobs_marker
from chatd.store.database import Database
from tests.e2e.api_world import DEADLINE_S, ApiWorld, Client, serve_api

QUICK = knobs_marker(chunks=1)


@pytest.fixture
async def quiet_api(db: Database) -> AsyncIterator[ApiWorld]:
    """No lease renewal during a test: only the turn under measure touches the database."""
    async with serve_api(db, lease_ttl_s=3600.0) as world:
        yield world


@dataclass(frozen=True)
class Cost:
    statements: int
    transactions: int


async def cost_of_turn(
    api: ApiWorld, client: Client, start: Callable[[], Awaitable[uuid.UUID]]
) -> Cost:
    """The database work from ``start()`` until its chat (the id it returns) is back in
    ``waiting``; the end is seen on the owner's watch feed, which reads nothing. The NOTIFYs
    relaying the turn's watch events to other workers are counted, all of them: the relay
    sends after local delivery, so its last one is waited for (and the one before is not
    counted in the turn)."""
    stats = api.db.stats
    feeds = api.engine.feeds
    with trio.fail_after(DEADLINE_S):
        async with api.engine.watch.subscribe(client.user.id) as events:
            if feeds is not None:
                await feeds.drained()
            statements, transactions = stats.statements, stats.transactions
            chat_id = await start()
            async for batch in events:
                if any(
                    isinstance(e, ChatStatusChanged)
                    and e.chat_id == chat_id
                    and e.status is ChatStatus.WAITING
                    for e in batch
                ):
                    break
            if feeds is not None:
                await feeds.drained()
    return Cost(stats.statements - statements, stats.transactions - transactions)


async def test_a_warm_turn_through_the_api_costs_what_the_engine_costs(
    quiet_api: ApiWorld,
) -> None:
    api = quiet_api
    alice = await api.client("alice")
    chat = await alice.create_chat(f"{QUICK} one")
    chat_id = uuid.UUID(chat["id"])
    await alice.wait_status(chat["id"], "waiting")
    url = f"/api/v1/chats/{chat_id}/messages"

    async def through_api() -> uuid.UUID:
        response = await alice.http.post(url, json={"text": f"{QUICK} more"})
        assert response.status_code == 202, response.text
        return chat_id

    async def through_engine() -> uuid.UUID:
        await api.engine.router.ask(chat_id, SendMessage(uuid.uuid4(), f"{QUICK} more"))
        return chat_id

    await cost_of_turn(api, alice, through_api)  # warm every cache on the way
    direct = await cost_of_turn(api, alice, through_engine)
    edge = await cost_of_turn(api, alice, through_api)
    assert direct.transactions > 0
    assert edge == direct
    assert api.services.tokens.stats.loads == 1
    assert api.services.chat_owners.stats.loads == 0  # remembered when the chat was created


async def test_creating_a_chat_through_the_api_reads_nothing_back(quiet_api: ApiWorld) -> None:
    api = quiet_api
    alice = await api.client("alice")

    async def through_api() -> uuid.UUID:
        return uuid.UUID((await alice.create_chat(f"{QUICK} hi"))["id"])

    async def through_engine() -> uuid.UUID:
        chat_id = uuid.uuid4()
        request = CreateChatRequest(alice.user.id, uuid.uuid4(), f"{QUICK} hi")
        await api.engine.router.ask(chat_id, request)
        return chat_id

    await cost_of_turn(api, alice, through_api)  # warm every cache on the way
    direct = await cost_of_turn(api, alice, through_engine)
    edge = await cost_of_turn(api, alice, through_api)
    assert direct.transactions > 0
    assert edge == direct


async def test_a_stream_handshake_checks_a_known_chat_without_a_query(
    quiet_api: ApiWorld,
) -> None:
    """The owner check of a warm chat's stream costs nothing: only the hub's own snapshot of the
    chat is read, and another user's handshake is still refused like a missing chat's."""
    api = quiet_api
    alice = await api.client("alice")
    bob = await api.client("bob")
    chat = await alice.create_chat(f"{QUICK} hi")
    await alice.wait_status(chat["id"], "waiting")
    path = f"/api/v1/chats/{chat['id']}/stream"
    await bob.http.get("/api/v1/users/me")  # warm bob's token
    loads = api.services.chat_owners.stats.loads, api.services.tokens.stats.loads
    theirs = await api.refused(path, {"Authorization": f"Bearer {bob.token}"})
    missing = await api.refused(
        f"/api/v1/chats/{uuid.uuid4()}/stream", {"Authorization": f"Bearer {bob.token}"}
    )
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json() == missing.json()
    async with alice.ws(path) as ws:
        with trio.fail_after(DEADLINE_S):
            assert await ws.get_message()
    owners, tokens = api.services.chat_owners.stats, api.services.tokens.stats
    assert (owners.loads, tokens.loads) == (loads[0] + 1, loads[1])  # the missing chat's read
