"""Per-user limits: open WebSockets (refused at the handshake) and running chats (refused with
nothing written), over real sockets against a real server and PostgreSQL."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import pytest
import trio

from chatd.config import Settings, SettingsError
from chatd.domain.chat_status import ChatStatus
from chatd.domain.effects import RunningChatsLimit
from chatd.providers.fake import knobs_marker
from chatd.store.chats import ChatWrite, ClaimRun, UpdateChat, commit
from chatd.store.database import Database
from tests.e2e.api_world import DEADLINE_S, ApiWorld, Client, serve_api
from tests.e2e.test_hot_path import QUICK, Cost, cost_of_turn
from tests.store.helpers import lease, make_chat, make_user

WS_LIMIT = 3
RUN_LIMIT = 2
# A reply that outlasts the test unless interrupted.
ENDLESS = knobs_marker(chunks=1000, chunk_interval_ms=50)


@pytest.fixture
async def api(db: Database) -> AsyncIterator[ApiWorld]:
    limits = {"max_websockets_per_user": WS_LIMIT, "max_running_chats_per_user": RUN_LIMIT}
    async with serve_api(db, **limits) as world:
        yield world


def _bearer(client: Client) -> dict[str, str]:
    return {"Authorization": f"Bearer {client.token}"}


def _error(body: Any) -> dict[str, Any]:
    error: dict[str, Any] = body["error"]
    return error


# -- WebSockets --------------------------------------------------------------------------------


async def test_a_users_websocket_past_the_limit_is_refused_at_the_handshake(
    api: ApiWorld,
) -> None:
    alice, bob = await api.client("alice"), await api.client("bob")
    chat = await alice.create_chat("hi")
    sockets = api.services.websockets
    paths = [  # every kind counts against one budget
        "/api/v1/chats/watch",
        "/api/v1/notifications/inbox/watch",
        f"/api/v1/chats/{chat['id']}/stream",
    ]
    async with contextlib.AsyncExitStack() as stack:
        for path in paths:
            await stack.enter_async_context(alice.ws(path))
        assert sockets.count(alice.user.id) == WS_LIMIT

        for path in paths:
            refused = await api.refused(path, _bearer(alice))
            assert refused.status_code == 429
            error = _error(refused.json())
            assert error["code"] == "max_websockets_per_user"
            assert "max_websockets_per_user" in error["message"]
        assert sockets.count(alice.user.id) == WS_LIMIT

        # Another user is not affected.
        async with bob.ws("/api/v1/chats/watch") as conn:
            await conn.ping()
            assert sockets.count(bob.user.id) == 1

    with trio.fail_after(DEADLINE_S):
        await sockets.wait_until(lambda: sockets.count(alice.user.id) == 0)


async def test_closing_one_websocket_frees_its_place(api: ApiWorld) -> None:
    alice = await api.client("alice")
    sockets = api.services.websockets
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(WS_LIMIT - 1):
            await stack.enter_async_context(alice.ws("/api/v1/chats/watch"))
        async with alice.ws("/api/v1/notifications/inbox/watch") as last:
            await last.ping()
            refused = await api.refused("/api/v1/chats/watch", _bearer(alice))
            assert refused.status_code == 429
        with trio.fail_after(DEADLINE_S):
            await sockets.wait_until(lambda: sockets.count(alice.user.id) == WS_LIMIT - 1)
        async with alice.ws("/api/v1/chats/watch") as again:
            await again.ping()
            assert sockets.count(alice.user.id) == WS_LIMIT


async def test_an_admin_is_limited_like_anyone(api: ApiWorld) -> None:
    """``make run`` hands people an admin token: the limit must hold for it too."""
    admin = await api.client("root", admin=True)
    sockets = api.services.websockets
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(WS_LIMIT):
            conn = await stack.enter_async_context(admin.ws("/api/v1/chats/watch"))
            await conn.ping()
        assert sockets.count(admin.user.id) == WS_LIMIT
        refused = await api.refused("/api/v1/chats/watch", _bearer(admin))
        assert refused.status_code == 429
        assert _error(refused.json())["code"] == "max_websockets_per_user"


async def test_a_websocket_limit_of_0_is_no_limit(db: Database) -> None:
    beyond_default = Settings().max_websockets_per_user + 1
    async with serve_api(db, max_websockets_per_user=0) as api:
        alice = await api.client("alice")
        sockets = api.services.websockets
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(beyond_default):
                conn = await stack.enter_async_context(alice.ws("/api/v1/chats/watch"))
                await conn.ping()
            assert sockets.count(alice.user.id) == 0  # nothing is counted


@pytest.mark.parametrize("name", ["max_websockets_per_user", "max_running_chats_per_user"])
def test_a_negative_limit_is_refused_naming_the_setting_and_the_rule(name: str) -> None:
    with pytest.raises(
        SettingsError, match=rf"{name} \(CHATD_{name.upper()}\) must be 0 \(no limit\) or more"
    ):
        Settings().replace(**{name: -1})


# -- running chats -----------------------------------------------------------------------------


async def _counts(db: Database, owner: UUID) -> tuple[int, int]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM chats WHERE owner_id = $1) AS chats,"
        " (SELECT count(*) FROM chat_messages m JOIN chats c ON c.id = m.chat_id"
        "  WHERE c.owner_id = $1) AS messages",
        owner,
    )
    assert row is not None
    return row["chats"], row["messages"]


async def test_a_run_past_the_limit_is_refused_and_writes_nothing(api: ApiWorld) -> None:
    alice, bob = await api.client("alice"), await api.client("bob")
    idle = await alice.create_chat("quick")
    await alice.wait_status(idle["id"], "waiting")
    first = await alice.create_chat(f"long one {ENDLESS}")
    second = await alice.create_chat(f"long two {ENDLESS}")
    assert (first["status"], second["status"]) == ("running", "running")
    before = await _counts(api.db, alice.user.id)
    idle_before = (await alice.http.get(f"/api/v1/chats/{idle['id']}")).json()

    created = await alice.http.post("/api/v1/chats", json={"text": "one too many"})
    assert created.status_code == 429, created.text
    error = _error(created.json())
    assert error["code"] == "max_running_chats_per_user"
    assert f"{RUN_LIMIT} chats running" in error["message"]
    sent = await alice.http.post(f"/api/v1/chats/{idle['id']}/messages", json={"text": "again"})
    assert sent.status_code == 429, sent.text
    assert _error(sent.json())["code"] == "max_running_chats_per_user"
    history = await alice.http.get(f"/api/v1/chats/{idle['id']}/messages")
    first_message = history.json()["messages"][0]["id"]
    edited = await alice.http.patch(
        f"/api/v1/chats/{idle['id']}/messages/{first_message}", json={"text": "edited"}
    )
    assert edited.status_code == 429, edited.text  # an edit regenerates: a new run too
    assert _error(edited.json())["code"] == "max_running_chats_per_user"
    assert await _counts(api.db, alice.user.id) == before  # no chat, no message
    assert (await alice.http.get(f"/api/v1/chats/{idle['id']}")).json() == idle_before

    # A message queued behind a running turn starts no run: accepted.
    queued = await alice.http.post(f"/api/v1/chats/{first['id']}/messages", json={"text": "next"})
    assert queued.status_code == 202, queued.text
    assert queued.json()["queued"] is True
    # Another user is not affected.
    await bob.create_chat("bob's own")

    # A run that ends frees its place.
    stopped = await alice.http.post(f"/api/v1/chats/{second['id']}/interrupt")
    assert stopped.status_code == 204, stopped.text
    await alice.wait_status(second["id"], "waiting")
    sent = await alice.http.post(f"/api/v1/chats/{idle['id']}/messages", json={"text": "now"})
    assert sent.status_code == 202, sent.text
    assert sent.json()["queued"] is False


async def test_an_admins_runs_are_limited_like_anyones(api: ApiWorld) -> None:
    admin = await api.client("root", admin=True)
    for n in range(RUN_LIMIT):
        chat = await admin.create_chat(f"long {n} {ENDLESS}")
        assert chat["status"] == "running"
    refused = await admin.http.post("/api/v1/chats", json={"text": "one too many"})
    assert refused.status_code == 429, refused.text
    assert _error(refused.json())["code"] == "max_running_chats_per_user"


async def _warm_turn_cost(db: Database, **limits: int) -> Cost:
    """The SQL of one warm turn (a send that starts a run) on a server with ``limits``."""
    async with serve_api(db, lease_ttl_s=3600.0, **limits) as api:  # no lease renewal
        alice = await api.client(f"alice-{uuid.uuid4().hex[:8]}")
        chat = await alice.create_chat(f"{QUICK} one")
        await alice.wait_status(chat["id"], "waiting")
        chat_id = UUID(chat["id"])

        async def send() -> UUID:
            url = f"/api/v1/chats/{chat_id}/messages"
            response = await alice.http.post(url, json={"text": f"{QUICK} more"})
            assert response.status_code == 202, response.text
            assert response.json()["queued"] is False  # a run starts
            return chat_id

        await cost_of_turn(api, alice, send)  # warm every cache on the way
        return await cost_of_turn(api, alice, send)


async def test_a_running_chats_limit_of_0_makes_no_claim_at_all(db: Database) -> None:
    """Off, the limit costs nothing: no ClaimRun statement (no per-owner lock) in the commit
    that starts a run, so the hot path is what it was before the limit existed."""
    limited = await _warm_turn_cost(db, max_running_chats_per_user=RUN_LIMIT)
    unlimited = await _warm_turn_cost(db, max_running_chats_per_user=0)
    assert unlimited.transactions == limited.transactions
    assert unlimited.statements == limited.statements - 1


async def test_a_running_chats_limit_of_0_is_no_limit(db: Database) -> None:
    async with serve_api(db, max_running_chats_per_user=0) as api:
        admin = await api.client("root", admin=True)
        for n in range(RUN_LIMIT + 1):
            chat = await admin.create_chat(f"long {n} {ENDLESS}")
            assert chat["status"] == "running"


async def test_the_limit_is_exact_for_concurrent_run_starts_on_several_workers(
    db: Database,
) -> None:
    """Commits on different shards (as different workers make them) race to start runs for
    one owner: exactly ``limit`` of them win, whatever the interleaving."""
    owner = await make_user(db)
    chats = []
    for shard in range(6):
        fence = await lease(db, shard, f"worker-{shard}")
        chats.append((fence, await make_chat(db, fence, owner.id)))
    outcomes: list[bool] = []

    async def start(index: int) -> None:
        fence, chat = chats[index]
        writes: list[ChatWrite] = [
            ClaimRun(owner_id=owner.id, limit=RUN_LIMIT),
            UpdateChat(status=ChatStatus.RUNNING),
        ]
        try:
            await commit(db, fence, chat.id, writes)
        except RunningChatsLimit:
            outcomes.append(False)
        else:
            outcomes.append(True)

    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            for index in range(len(chats)):
                nursery.start_soon(start, index)
    assert sorted(outcomes) == [False] * (len(chats) - RUN_LIMIT) + [True] * RUN_LIMIT
    running = await db.fetchval(
        "SELECT count(*) FROM chats WHERE owner_id = $1 AND status = 'running'", owner.id
    )
    assert running == RUN_LIMIT
