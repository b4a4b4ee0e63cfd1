"""Two real ``chatd serve`` workers on one database: what one worker does is seen on the other
at once, through LISTEN/NOTIFY.

A chat runs on one worker (the one placement gave its shard); clients watch their chats and
their inbox on the other, and make admin changes through the other that the next turn must use. The
config and token caches' TTLs are an hour, so only the notifications can explain what is seen.
Real processes, a real PostgreSQL, the fake provider in the test process, clients over real
sockets.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from chatd.providers.fake import FakeLLM, knobs_marker, open_fake_llm
from chatd.store import providers, users
from chatd.store.database import Database
from tests.e2e.chatd_process import ServerProcess, chatd_server

pytestmark = pytest.mark.slow

DEADLINE_S = 30.0
QUICK = knobs_marker(chunks=1)
HOUR_S = "3600"


@contextlib.asynccontextmanager
async def worker(database_url: str, home: Path, worker_id: str) -> AsyncIterator[ServerProcess]:
    env = {
        "CHATD_HOME": str(home),
        "CHATD_WORKER_ID": worker_id,
        "CHATD_SHARD_COUNT": "4",
        "CHATD_CONFIG_CACHE_TTL_S": HOUR_S,
        "CHATD_AUTH_CACHE_TTL_S": HOUR_S,
    }
    args = ["--database-url", database_url, "--port", "0"]
    async with chatd_server(args, env=env) as server:
        yield server


@contextlib.asynccontextmanager
async def two_workers(database_url: str, home: Path) -> AsyncIterator[tuple[ServerProcess, ...]]:
    async with worker(database_url, home, "worker-a") as a:
        await a.wait_for_line(r"worker worker-a owns 4 shards")
        async with worker(database_url, home, "worker-b") as b:
            yield a, b


async def token_of(db: Database, name: str, *, is_admin: bool = False) -> str:
    user = await users.create_user(db, name, is_admin=is_admin)
    return (await users.create_api_token(db, user.id))[1]


def client(server: ServerProcess, token: str) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=DEADLINE_S
    )


@contextlib.asynccontextmanager
async def websocket(
    server: ServerProcess, path: str, token: str
) -> AsyncIterator[WebSocketConnection]:
    url = server.url.replace("http://", "ws://") + path
    headers = [(b"authorization", f"Bearer {token}".encode())]
    async with open_websocket_url(url, extra_headers=headers) as ws:
        yield ws


async def frames_until(
    ws: WebSocketConnection, done: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    with trio.fail_after(DEADLINE_S):
        while not done(seen):
            value = json.loads(await ws.get_message())
            seen += value if isinstance(value, list) else [value]
    return seen


def status_of(chat_id: str, status: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda seen: any(
        f.get("kind") == "status_change" and f["chat_id"] == chat_id and f["status"] == status
        for f in seen
    )


async def post(http: httpx2.AsyncClient, path: str, body: dict[str, Any]) -> httpx2.Response:
    """POST, again (same Idempotency-Key: done once) while the answer is a retryable 503: a
    shard moving between the two workers."""
    key = str(uuid.uuid4())
    with trio.fail_after(DEADLINE_S):
        while True:
            response = await http.post(path, json=body, headers={"Idempotency-Key": key})
            if response.status_code != 503:
                return response
            await trio.sleep(float(response.headers.get("Retry-After", "1")))


async def owner_of(db: Database, chat_id: str) -> str:
    owner: str = await db.fetchval(
        "SELECT l.worker_id FROM chats c JOIN shard_leases l ON l.shard = c.shard WHERE c.id = $1",
        uuid.UUID(chat_id),
    )
    return owner


async def test_watch_and_inbox_on_one_worker_see_chats_running_on_the_other(
    db: Database, database_url: str, home: Path, llm: FakeLLM
) -> None:
    """Sockets on both workers; the assertions read those of the worker not running the chat
    (whichever placement chose)."""
    token = await token_of(db, "alice")
    async with (
        two_workers(database_url, home) as (a, b),
        client(a, token) as on_a,
        websocket(a, "/api/v1/chats/watch", token) as watch_a,
        websocket(b, "/api/v1/chats/watch", token) as watch_b,
        websocket(a, "/api/v1/notifications/inbox/watch", token) as inbox_a,
        websocket(b, "/api/v1/notifications/inbox/watch", token) as inbox_b,
    ):
        created = await post(on_a, "/api/v1/chats", {"text": f"hi {QUICK}", "title": "t"})
        assert created.status_code == 201, created.text
        chat_id = created.json()["id"]
        runs_on_a = await owner_of(db, chat_id) == "worker-a"
        watch, inbox = (watch_b, inbox_b) if runs_on_a else (watch_a, inbox_a)
        seen = await frames_until(watch, status_of(chat_id, "waiting"))
        assert seen[0] == {
            "kind": "created",
            "chat_id": chat_id,
            "title": "t",
            "status": "running",
            "archived": False,
        }
        notes = await frames_until(inbox, lambda got: len(got) >= 1)
        assert [(n["type"], n["chat_id"]) for n in notes] == [("notification", chat_id)]
        # The next turn too: running, then waiting, and its notification.
        sent = await post(on_a, f"/api/v1/chats/{chat_id}/messages", {"text": f"{QUICK} 2"})
        assert sent.status_code == 202, sent.text
        seen = await frames_until(watch, status_of(chat_id, "waiting"))
        assert [f["status"] for f in seen if f["kind"] == "status_change"] == [
            "running",
            "waiting",
        ]
        notes = await frames_until(inbox, lambda got: len(got) >= 1)
        assert [n["chat_id"] for n in notes] == [chat_id]


async def test_a_provider_change_made_through_one_worker_is_used_by_the_others_next_turn(
    db: Database, database_url: str, home: Path, llm: FakeLLM
) -> None:
    """The change is made through the worker that does not run the chat."""
    token = await token_of(db, "alice")
    admin = await token_of(db, "root", is_admin=True)
    (provider,) = await providers.list_providers(db)
    async with (
        open_fake_llm() as moved_to,
        two_workers(database_url, home) as (a, b),
        client(a, token) as on_a,
        client(a, admin) as admin_on_a,
        client(b, admin) as admin_on_b,
        websocket(a, "/api/v1/chats/watch", token) as watch,
    ):
        created = await post(on_a, "/api/v1/chats", {"text": f"hi {QUICK}"})
        assert created.status_code == 201, created.text
        chat_id = created.json()["id"]
        await frames_until(watch, status_of(chat_id, "waiting"))
        assert llm.request_count == 1  # its worker caches the provider now, for an hour
        elsewhere = admin_on_b if await owner_of(db, chat_id) == "worker-a" else admin_on_a
        changed = await elsewhere.patch(
            f"/api/v1/providers/{provider.id}", json={"base_url": f"{moved_to.url}/v1"}
        )
        assert changed.status_code == 200, changed.text
        sent = await post(on_a, f"/api/v1/chats/{chat_id}/messages", {"text": f"{QUICK} 2"})
        assert sent.status_code == 202, sent.text
        await frames_until(watch, status_of(chat_id, "waiting"))
        assert (llm.request_count, moved_to.request_count) == (1, 1)


async def test_a_token_revoked_through_worker_b_is_refused_by_worker_a_at_once(
    db: Database, database_url: str, home: Path, llm: FakeLLM
) -> None:
    user = await users.create_user(db, "alice")
    _, keeper = await users.create_api_token(db, user.id)
    doomed, secret = await users.create_api_token(db, user.id)
    async with (
        two_workers(database_url, home) as (a, b),
        client(a, secret) as on_a,
        client(b, keeper) as on_b,
    ):
        assert (await on_a.get("/api/v1/users/me")).status_code == 200  # cached on A
        revoked = await on_b.delete(f"/api/v1/users/me/tokens/{doomed.id}")
        assert revoked.status_code == 204, revoked.text
        refused = await on_a.get("/api/v1/users/me")
        assert refused.status_code == 401, refused.text
