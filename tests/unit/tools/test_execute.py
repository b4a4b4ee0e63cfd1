"""execute: real processes, whose whole group dies at the end, the timeout or an interrupt."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from chatd.domain.conversation import ToolCallPart
from chatd.tools.execute import network_cut_prefix, run_in_group, scrubbed_environment
from chatd.tools.registry import TOOL_NAMES, ToolContext, run_builtin
from chatd.tools.workspace import WorkspaceLimits

from .calls import call, context, error_of


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    return context(tmp_path, WorkspaceLimits(execute_timeout_s=10.0))


@pytest.fixture
def strays() -> Iterator[list[int]]:
    """Pids a test expects dead; any still alive at its end are killed, so a failure leaks none."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # Where PID 1 does not reap orphans (some containers), a killed orphan stays a zombie:
    # dead, only its exit status unread.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in {"Z", "X"}


async def _until(predicate: Callable[[], bool]) -> None:
    # Nothing announces a process's death or a file's writing to this test: poll, with a deadline.
    with trio.fail_after(5):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def _wait_dead(pid: int) -> None:
    await _until(lambda: _dead(pid))


async def test_exit_code_and_merged_output(ctx: ToolContext) -> None:
    result = await call(ctx, "execute", command="echo out; echo err >&2; exit 3")
    assert result == {
        "exit_code": 3,
        "killed_by_signal": None,
        "timed_out": False,
        "output": "out\nerr\n",
        "output_truncated": False,
        "network_cut": bool(await network_cut_prefix()),
    }


async def test_stdin_is_empty(ctx: ToolContext) -> None:
    with trio.fail_after(5):
        result = await call(ctx, "execute", command="cat; echo done")
    assert result["output"] == "done\n"


async def test_timeout_kills_the_whole_group(ctx: ToolContext, strays: list[int]) -> None:
    result = await call(ctx, "execute", command="sleep 1000 & echo $!; wait", timeout_s=0.3)
    child = int(result["output"])
    strays.append(child)
    assert (result["timed_out"], result["exit_code"]) == (True, -9)
    assert result["killed_by_signal"] == "SIGKILL"
    await _wait_dead(child)


async def test_background_children_die_when_the_command_ends(
    ctx: ToolContext, strays: list[int]
) -> None:
    # The child keeps the output pipe open: without the group kill this would run to the timeout.
    with trio.fail_after(5):
        result = await call(ctx, "execute", command="sleep 1000 & echo $!")
    child = int(result["output"])
    strays.append(child)
    assert (result["timed_out"], result["exit_code"]) == (False, 0)
    await _wait_dead(child)


async def test_interrupt_kills_the_whole_group(ctx: ToolContext, strays: list[int]) -> None:
    pid_file = ctx.workspace.directory / "pid"
    call_ = ToolCallPart("c1", "execute", '{"command": "sleep 1000 & echo $! > pid; wait"}')
    with trio.CancelScope() as interrupt:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_builtin, call_, ctx, TOOL_NAMES)
            await _until(lambda: pid_file.exists() and pid_file.read_text().endswith("\n"))
            child = int(pid_file.read_text())
            strays.append(child)
            assert not _dead(child)
            interrupt.cancel()
    assert interrupt.cancelled_caught
    await _wait_dead(child)


async def test_a_child_that_leaves_the_group_does_not_hold_the_call(
    tmp_path: Path, strays: list[int]
) -> None:
    ctx = context(tmp_path, WorkspaceLimits(execute_output_grace_s=0.2))
    with trio.fail_after(5):
        result = await call(ctx, "execute", command="setsid sleep 1000 & echo $!")
    strays.append(int(result["output"]))  # out of reach by design: the fixture kills it
    assert (result["timed_out"], result["exit_code"]) == (False, 0)


async def test_environment_is_scrubbed(ctx: ToolContext, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATD_SECRET", "hunter2")
    monkeypatch.setenv("CHATD_DATABASE_URL", "postgresql://u:p@db/chatd")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    result = await call(ctx, "execute", command="env")
    names = {line.split("=", 1)[0] for line in result["output"].splitlines()}
    assert names == {"PATH", "HOME", "LANG", "TERM", "PWD"}  # PWD: the shell's own
    assert "hunter2" not in result["output"]
    assert "sk-test" not in result["output"]
    assert "PATH=/usr/local/bin:/usr/bin:/bin\n" in result["output"]
    assert "LANG=C.UTF-8\n" in result["output"]


async def test_output_cap_keeps_head_and_tail(tmp_path: Path) -> None:
    ctx = context(tmp_path, WorkspaceLimits(execute_max_output_bytes=100))
    result = await call(ctx, "execute", command="echo START; yes | head -c 1000000; echo END")
    assert result["output"].startswith("START\n")
    assert result["output"].endswith("y\nEND\n")
    assert "[... 999910 bytes cut ...]" in result["output"]
    assert result["output_truncated"] is True


async def test_network_is_cut_when_the_platform_allows(ctx: ToolContext) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    connect = f"bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' && echo connected"
    async with listener:
        # The check itself works: the same command, outside a network namespace, connects.
        directory = await trio.to_thread.run_sync(ctx.workspace.create)
        _code, plain, _timed_out = await run_in_group(
            ["/bin/sh", "-c", connect],
            cwd=directory,
            env=scrubbed_environment(directory),
            timeout_s=5,
            max_output_bytes=1000,
            output_grace_s=1,
        )
        assert plain.text == "connected\n"
        result = await call(ctx, "execute", command=connect)
    devices = await call(ctx, "execute", command="cat /proc/net/dev")
    if not await network_cut_prefix():
        pytest.skip("unshare cannot make a network namespace here: the network is not cut")
    assert result["network_cut"] is True
    assert "connected" not in result["output"]
    assert result["exit_code"] != 0
    interfaces = [line.split(":")[0].strip() for line in devices["output"].splitlines()[2:]]
    assert interfaces == ["lo"]


async def test_timeout_argument_is_bounded(ctx: ToolContext) -> None:
    error = await error_of(ctx, "execute", command="true", timeout_s=11)
    assert "'timeout_s' must be above 0 and at most 10" in error
    assert "'command' must not be empty" in await error_of(ctx, "execute", command="  ")


def test_probe_matches_unshare() -> None:
    """The probe's answer is what running unshare says (so the skip above is honest)."""
    prefix = trio.run(network_cut_prefix)
    if prefix:
        done = subprocess.run([*prefix, "true"], check=False)
        assert done.returncode == 0
