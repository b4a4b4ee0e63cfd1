"""A worker's identity in its home: a restarted process takes its own leases back at once.

Real ``chatd serve`` processes (killed with SIGKILL, restarted on the same home), a real
PostgreSQL, the fake provider in the test process, clients over real sockets.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import pytest
import trio
from trio_websocket import wrap_client_stream

from chatd.identity import IdentityError, claim_identity
from chatd.providers.fake import FakeLLM, knobs_marker
from chatd.store import users
from chatd.store.database import Database
from chatd.store.leases import list_leases
from tests.e2e.chatd_process import ServerProcess, chatd_server, run_chatd

pytestmark = pytest.mark.slow

DEADLINE_S = 30.0
# Long enough that waiting it out cannot pass for taking the leases back at once.
LEASE_TTL_S = 30.0
SHARDS = 4


async def _token(db: Database) -> str:
    user = await users.create_user(db, "alice")
    _token, secret = await users.create_api_token(db, user.id)
    return secret


def _args(database_url: str) -> list[str]:
    return ["--database-url", database_url, "--port", "0"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {
        "CHATD_HOME": str(home),
        "CHATD_LEASE_TTL_S": str(LEASE_TTL_S),
        "CHATD_SHARD_COUNT": str(SHARDS),
        **extra,
    }


def _client(server: ServerProcess, token: str) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=DEADLINE_S
    )


async def _worker_id(server: ServerProcess) -> str:
    return (await server.wait_for_line(r"worker (\S+) owns \d+ shards")).group(1)


async def _wait_until_waiting(server: ServerProcess, token: str, chat_id: str) -> None:
    """Until the chat's stream says it is ``waiting`` (its turn over)."""
    address = urlsplit(server.url)
    assert address.hostname is not None
    assert address.port is not None
    auth = [(b"authorization", f"Bearer {token}".encode())]
    with trio.fail_after(DEADLINE_S):
        async with (
            await trio.open_tcp_stream(address.hostname, address.port) as tcp,
            trio.open_nursery() as nursery,
        ):
            path = f"/api/v1/chats/{chat_id}/stream"
            conn = await wrap_client_stream(nursery, tcp, address.netloc, path, extra_headers=auth)
            try:
                while True:
                    value = json.loads(await conn.get_message())
                    events: list[dict[str, Any]] = value if isinstance(value, list) else [value]
                    if any(e["type"] == "status" and e["status"] == "waiting" for e in events):
                        return
            finally:
                with trio.CancelScope(shield=True):
                    await conn.aclose()


async def test_a_killed_worker_restarted_on_its_home_serves_at_once_and_resumes_its_chats(
    db: Database, database_url: str, home: Path, llm: FakeLLM
) -> None:
    token = await _token(db)
    slow = knobs_marker(chunks=40, chunk_interval_ms=100)  # a turn of about 4 s
    async with chatd_server(_args(database_url), env=_env(home)) as first:
        first_id = await _worker_id(first)
        async with _client(first, token) as http:
            created = await http.post("/api/v1/chats", json={"text": f"long {slow}"})
        assert created.status_code == 201, created.text
        chat_id = created.json()["id"]
        await llm.wait_for_requests(1)  # mid-turn
        before = {lease.shard: lease for lease in await list_leases(db)}
        first.process.kill()  # SIGKILL: no release, no goodbye
        with trio.fail_after(DEADLINE_S):
            await first.process.wait()
    assert {lease.worker_id for lease in before.values()} == {first_id}

    started_at = trio.current_time()
    async with chatd_server(_args(database_url), env=_env(home)) as second:
        ready_s = trio.current_time() - started_at
        async with _client(second, token) as http:
            # The very first request after readiness: served, no 503 window.
            response = await http.post("/api/v1/chats", json={"text": "hello again"})
            first_send_s = trio.current_time() - started_at
            assert response.status_code == 201, response.text
        assert await _worker_id(second) == first_id
        after = {lease.shard: lease for lease in await list_leases(db)}
        assert set(after) == set(before)
        for shard, lease in after.items():
            assert lease.worker_id == first_id
            assert lease.epoch == before[shard].epoch + 1, "the dead incarnation is not fenced"
        # The chat that was mid-turn is resumed and finishes, well within the lease ttl.
        await _wait_until_waiting(second, token, chat_id)
        resumed_s = trio.current_time() - started_at
        async with _client(second, token) as http:
            messages = (await http.get(f"/api/v1/chats/{chat_id}/messages")).json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
    assert second.process.returncode == 0
    assert resumed_s < LEASE_TTL_S / 2
    print(  # the figures for the report (pytest -s)
        f"restart: ready after {ready_s:.2f} s, first send 201 after {first_send_s:.2f} s,"
        f" killed chat finished after {resumed_s:.2f} s (lease ttl {LEASE_TTL_S:g} s)"
    )


async def test_processes_on_one_home_never_share_an_identity(
    database_url: str, home: Path, llm: FakeLLM
) -> None:
    async with (
        chatd_server(_args(database_url), env=_env(home)) as first,
        chatd_server(_args(database_url), env=_env(home)) as second,
    ):
        ids = [await _worker_id(first), await _worker_id(second)]
        assert ids[0] != ids[1]
        kept = {(home / "workers" / f"worker-{n}.id").read_text().strip() for n in (0, 1)}
        assert kept == set(ids)
        assert await first.stop(signal.SIGINT) == 0
        # The first one's identity is free again: a new process takes it, not the second's.
        async with chatd_server(_args(database_url), env=_env(home)) as third:
            assert await _worker_id(third) == ids[0]


async def test_a_clean_stop_releases_the_leases(
    db: Database, database_url: str, home: Path
) -> None:
    async with chatd_server(_args(database_url), env=_env(home)) as server:
        worker_id = await _worker_id(server)
        assert await server.stop(signal.SIGTERM) == 0
    leases = await list_leases(db)
    assert {lease.worker_id for lease in leases} == {worker_id}
    assert len(leases) == SHARDS
    assert not await db.fetchval("SELECT bool_or(expires_at > now()) FROM shard_leases")


async def test_an_explicit_worker_id_in_use_on_the_home_is_refused(
    database_url: str, home: Path
) -> None:
    env = _env(home, CHATD_WORKER_ID="worker-x")
    async with chatd_server(_args(database_url), env=env) as server:
        assert await _worker_id(server) == "worker-x"
        refused = await trio.to_thread.run_sync(
            lambda: run_chatd(["serve", *_args(database_url)], env=env)
        )
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert lines[-1].startswith("chatd: error: worker id 'worker-x' (CHATD_WORKER_ID) is in use")
    assert "Traceback" not in refused.stderr


def test_identity_slots_are_claimed_in_order_and_kept(home: Path) -> None:
    with claim_identity(home) as a, claim_identity(home) as b:
        assert (a.slot, b.slot) == (0, 1)
        assert a.worker_id != b.worker_id
        first_a = a.worker_id
    with claim_identity(home) as again:
        assert (again.slot, again.worker_id) == (0, first_a)
    with (
        claim_identity(home, explicit_id="w"),
        pytest.raises(IdentityError, match="in use"),
        claim_identity(home, explicit_id="w"),
    ):
        pass
    with (
        claim_identity(home, max_slots=1),
        pytest.raises(IdentityError, match="all 1 worker"),
        claim_identity(home, max_slots=1),
    ):
        pass
