"""The agent half end to end, over real sockets: built-in workspace tools in multi-step turns,
an interrupt that kills a running command's process group, compaction at the threshold and by
hand, titles and token usage, and deleting a chat with its workspace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from chatd.domain.agent_prompts import SUMMARY_SYSTEM, TITLE_SYSTEM
from chatd.providers.fake.scenario import knobs_marker
from chatd.store import providers
from chatd.store.database import Database
from chatd.tools.registry import TOOL_NAMES
from tests.e2e.api_world import DEADLINE_S, Client, file_text, frames, serve_api, until

EVERY_TOOL = list(TOOL_NAMES)


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


def _steps(*calls: list[dict[str, Any]], reply: str = "done") -> str:
    return knobs_marker(steps=[*({"tool_calls": c} for c in calls), {"reply": reply}])


async def _history(client: Client, chat_id: str) -> list[dict[str, Any]]:
    page = (await client.http.get(f"/api/v1/chats/{chat_id}/messages?limit=200")).json()
    messages: list[dict[str, Any]] = page["messages"]
    return messages


def _results(history: list[dict[str, Any]]) -> list[Any]:
    """Every tool result's output, parsed, in order."""
    return [
        json.loads(part["output"])
        for message in history
        if message["role"] == "tool"
        for part in message["content"]
    ]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody waited for yet does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_a_turn_writes_edits_reads_and_runs_a_command_and_never_leaves_its_workspace(
    db: Database, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    root = tmp_path / "workspaces"
    async with serve_api(db, workspace_root=str(root)) as world:
        alice = await world.client("alice")
        steps = _steps(
            [_call("write_file", path="notes/a.txt", content="hello world\n")],
            [_call("edit_file", path="notes/a.txt", old_text="world", new_text="chatd")],
            [_call("read_file", path="notes/a.txt")],
            [_call("execute", command="tr a-z A-Z < notes/a.txt; ln -s / root")],
            [
                _call("read_file", path="../outside.txt"),
                _call("read_file", path=str(outside)),
                _call("write_file", path="../../escape.txt", content="x"),
                _call("read_file", path="root/etc/hostname"),
                _call("write_file", path="root/tmp/escape.txt", content="x"),
            ],
        )
        chat = await alice.create_chat(f"work {steps}", tools=EVERY_TOOL)
        await alice.wait_status(chat["id"], "waiting")
        history = await _history(alice, chat["id"])
        results = _results(history)

    assert [m["role"] for m in history] == ["user", *["assistant", "tool"] * 5, "assistant"]
    workspace = root / chat["id"]
    assert (workspace / "notes" / "a.txt").read_text() == "hello chatd\n"
    assert "hello chatd" in json.dumps(results[2])
    assert "HELLO CHATD" in results[3]["output"]
    assert results[3]["exit_code"] == 0
    escapes = results[4:]
    assert len(escapes) == 5
    assert all("error" in r and "workspace" in r["error"] for r in escapes), escapes
    assert not (tmp_path / "escape.txt").exists()
    assert not file_text(Path("/tmp/escape.txt"))
    assert history[-1]["content"] == [{"type": "text", "text": "done"}]


async def test_an_interrupt_during_a_long_command_kills_its_process_group(
    db: Database, tmp_path: Path
) -> None:
    root = tmp_path / "workspaces"
    async with serve_api(db, workspace_root=str(root)) as world:
        alice = await world.client("alice")
        steps = _steps([_call("execute", command="sleep 1000 & echo $! > pid; wait")])
        chat = await alice.create_chat(f"long {steps}", tools=["execute"])
        await until(lambda: bool(file_text(root / chat["id"] / "pid")))
        pid = int(file_text(root / chat["id"] / "pid"))
        interrupted = await alice.http.post(f"/api/v1/chats/{chat['id']}/interrupt")
        assert interrupted.status_code == 204, interrupted.text
        await alice.wait_status(chat["id"], "waiting")
        await until(lambda: not _alive(pid))
        history = await _history(alice, chat["id"])
    assert [m["role"] for m in history] == ["user", "assistant", "tool"]
    assert _results(history) == [{"error": "cancelled", "reason": "the user interrupted"}]


async def test_compaction_starts_the_next_prompt_at_the_summary(db: Database) -> None:
    async with serve_api(db) as world:
        alice = await world.client("alice")
        admin = await world.client("root", admin=True)
        default = await providers.get_default_model_config(db)
        assert default is not None
        small = await admin.http.post(
            "/api/v1/model-configs",
            json={
                "provider_id": str(default.provider_id),
                "name": "small",
                "model": "fake-model",
                "context_limit": 300,
                "compression_threshold": 0.7,
            },
        )
        assert small.status_code == 201, small.text
        # About 100 tokens each: the first turn fits under 70% of 300, the second does not.
        words = " ".join(f"word{i}" for i in range(60))
        chat = await alice.create_chat(f"first {words}", model_config_id=small.json()["id"])
        await alice.wait_status(chat["id"], "waiting")
        before = len(world.llm.requests)
        sent = await alice.http.post(
            f"/api/v1/chats/{chat['id']}/messages", json={"text": f"second {words}"}
        )
        assert sent.status_code == 202, sent.text
        await alice.wait_status(chat["id"], "waiting")
        history = await _history(alice, chat["id"])
        asked = world.llm.requests[before:]

    # A summary call, then the answer, whose prompt starts at the summary.
    assert [r.system_text() == SUMMARY_SYSTEM for r in asked] == [True, False]
    summary = next(m for m in history if m["role"] == "summary")
    part = summary["content"][0]
    assert part["type"] == "chat_summarized"
    assert part["through_seq"] == 2  # the first turn; the new message stays word for word
    assert "first word0" in part["summary"]
    answer = asked[1]
    assert part["summary"] in answer.system_text()
    assert [role for role, _text in answer.messages()] == ["user"]
    assert answer.messages()[0][1].startswith("second word0")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "summary", "assistant"]


async def test_compact_by_hand_then_a_restarted_chat_prompts_from_the_summary(
    db: Database,
) -> None:
    async with serve_api(db) as world:
        alice = await world.client("alice")
        chat = await alice.create_chat("remember the number 42")
        await alice.wait_status(chat["id"], "waiting")
        path = f"/api/v1/chats/{chat['id']}"
        compacted = await alice.http.post(f"{path}/compact")
        assert (compacted.status_code, compacted.json()) == (202, {"compacting": True})
        await alice.wait_status(chat["id"], "waiting")
        again = await alice.http.post(f"{path}/compact")
        assert again.status_code == 409, again.text
    # Another server on the same database loads the chat from its newest boundary.
    async with serve_api(db) as world:
        alice = world.rejoin(alice)
        before = len(world.llm.requests)
        await alice.http.post(f"{path}/messages", json={"text": "which number?"})
        await alice.wait_status(chat["id"], "waiting")
        history = await _history(alice, chat["id"])
        answer = world.llm.requests[before]
    assert [m["role"] for m in history] == ["user", "assistant", "summary", "user", "assistant"]
    assert "remember the number 42" in answer.system_text()
    assert answer.messages() == [("user", "which number?")]


async def test_a_chat_gets_a_title_and_its_usage_is_counted(db: Database) -> None:
    async with serve_api(db, titles=True) as world:
        alice = await world.client("alice")
        admin = await world.client("root", admin=True)
        async with alice.ws("/api/v1/chats/watch") as watch:
            chat = await alice.create_chat("plan a trip to Lisbon in May, please")
            with trio.fail_after(DEADLINE_S):
                while True:
                    events = frames(await watch.get_message())
                    titled = [e for e in events if e.get("kind") == "title_change"]
                    if titled:
                        break
        detail = (await alice.http.get(f"/api/v1/chats/{chat['id']}")).json()
        usage = (await alice.http.get("/api/v1/users/me/usage")).json()
        metrics = (await admin.http.get("/api/v1/metrics")).text
        asked = [r for r in world.llm.requests if r.system_text() == TITLE_SYSTEM]
    assert titled[0]["title"] == detail["title"] == "plan a trip to Lisbon in"
    assert len(asked) == 1
    answer_usage = detail["input_tokens"], detail["output_tokens"]
    assert all(n > 0 for n in answer_usage)
    assert (usage["input_tokens"], usage["output_tokens"]) == answer_usage
    assert 'chatd_tokens_total{direction="input"}' in metrics


async def test_a_user_title_is_kept(db: Database) -> None:
    async with serve_api(db, titles=True) as world:
        alice = await world.client("alice")
        chat = await alice.create_chat("hello", title="Mine")
        await alice.wait_status(chat["id"], "waiting")
        detail = (await alice.http.get(f"/api/v1/chats/{chat['id']}")).json()
    assert detail["title"] == "Mine"
    assert not [r for r in world.llm.requests if r.system_text() == TITLE_SYSTEM]


async def test_deleting_a_chat_removes_its_history_and_workspace_and_keeps_usage(
    db: Database, tmp_path: Path
) -> None:
    root = tmp_path / "workspaces"
    async with serve_api(db, workspace_root=str(root)) as world:
        alice = await world.client("alice")
        bob = await world.client("bob")
        steps = _steps([_call("write_file", path="a.txt", content="x")])
        chat = await alice.create_chat(f"write {steps}", tools=["write_file"])
        await alice.wait_status(chat["id"], "waiting")
        assert (root / chat["id"] / "a.txt").exists()
        path = f"/api/v1/chats/{chat['id']}"
        assert (await bob.http.delete(path)).status_code == 404
        used = (await alice.http.get("/api/v1/users/me/usage")).json()
        deleted = await alice.http.delete(path)
        assert deleted.status_code == 204, deleted.text
        assert (await alice.http.get(path)).status_code == 404
        assert (await alice.http.get(f"{path}/messages")).status_code == 404
        after = (await alice.http.get("/api/v1/users/me/usage")).json()
    assert not (root / chat["id"]).exists()
    assert used["input_tokens"] > 0
    assert after == used
    assert list(root.iterdir()) == []
