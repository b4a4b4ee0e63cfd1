"""A worker killed (SIGKILL) while a side-effecting tool call runs: after the restart, the call
is found in the effect journal and is not run again; the model gets "outcome unknown"."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx2
import trio

from chatd.providers.fake import knobs_marker, open_fake_llm
from chatd.runtime import register_default_model
from chatd.store import users
from chatd.store.database import Database
from tests.e2e.api_world import DEADLINE_S, file_text, until
from tests.e2e.chatd_process import chatd_server


async def _status(http: httpx2.AsyncClient, chat_id: str) -> str:
    status: str = (await http.get(f"/api/v1/chats/{chat_id}")).json()["status"]
    return status


async def test_a_call_cut_by_kill_9_is_not_run_again_after_the_restart(
    db: Database, database_url: str, home: Path
) -> None:
    user = await users.create_user(db, "alice")
    _token, secret = await users.create_api_token(db, user.id)
    env = {"CHATD_HOME": str(home), "CHATD_SHARD_COUNT": "4"}
    # The command records each run, then hangs until the worker is killed under it.
    command = "echo ran >> runs.txt; echo $$ > group; sleep 1000"
    steps = [
        {"tool_calls": [{"name": "execute", "arguments": {"command": command}}]},
        {"reply": "carried on"},
    ]
    auth = {"Authorization": f"Bearer {secret}"}
    async with open_fake_llm() as llm:
        await register_default_model(db, base_url=f"{llm.url}/v1")
        args = ["--database-url", database_url, "--port", "0"]
        async with (
            chatd_server(args, env=env) as first,
            httpx2.AsyncClient(base_url=first.url, headers=auth, timeout=DEADLINE_S) as http,
        ):
            created = await http.post(
                "/api/v1/chats",
                json={"text": f"run it {knobs_marker(steps=steps)}", "tools": ["execute"]},
            )
            assert created.status_code == 201, created.text
            chat_id = created.json()["id"]
            workspace = home / "workspaces" / chat_id
            await until(lambda: bool(file_text(workspace / "group").strip()))
            first.process.kill()
            await first.process.wait()
        # The command outlived the worker (its own session); it is not chatd's any more.
        os.killpg(int(file_text(workspace / "group")), signal.SIGKILL)
        async with (
            chatd_server(args, env=env) as second,
            httpx2.AsyncClient(base_url=second.url, headers=auth, timeout=DEADLINE_S) as http,
        ):
            with trio.fail_after(DEADLINE_S):
                while True:
                    if await _status(http, chat_id) == "waiting":
                        break
                    await trio.sleep(0.05)
            page = (await http.get(f"/api/v1/chats/{chat_id}/messages")).json()
    history = page["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    result = json.loads(history[2]["content"][0]["output"])
    assert result["error"] == "outcome unknown"
    assert history[3]["content"] == [{"type": "text", "text": "carried on"}]
    assert file_text(workspace / "runs.txt") == "ran"  # run once, never again
