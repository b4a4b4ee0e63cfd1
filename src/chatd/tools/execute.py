"""``execute``: one shell command in a chat's workspace, bounded in time, output and reach.

The command runs under ``/bin/sh -c`` with the workspace as its directory and its home, an
environment built from nothing (none of chatd's own: no CHATD_* settings, no database URL, no
API keys), stdin from /dev/null, stdout and stderr merged into one pipe. It leads a session and
process group of its own, and the whole group is killed (SIGKILL) when the command ends, times
out, or the calling task is cancelled (an interrupt): background children die with it. Where
``unshare`` can give it an empty network namespace, it runs without a network, and the result
says whether that was so. It is still the server's user: see chatd.tools.workspace.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from chatd.tools.arguments import number_arg, text_arg
from chatd.tools.builtin import ToolFailed
from chatd.tools.truncate import Clipped, OutputBuffer
from chatd.tools.workspace import Workspace, WorkspaceLimits

_PATH = "/usr/local/bin:/usr/bin:/bin"
_PROBE_TIMEOUT_S = 5.0
# After SIGKILL a process is gone at once unless stuck in the kernel; the wait for it is
# shielded from cancellation, so it is bounded.
_REAP_TIMEOUT_S = 5.0
_READ_CHUNK_BYTES = 65_536


async def execute(args: Mapping[str, Any], workspace: Workspace, limits: WorkspaceLimits) -> object:
    command = text_arg(args, "command")
    if not command.strip():
        raise ToolFailed("'command' must not be empty")
    timeout_s = number_arg(args, "timeout_s", maximum=limits.execute_timeout_s)
    directory = await trio.to_thread.run_sync(workspace.create)
    prefix = await network_cut_prefix()
    exit_code, output, timed_out = await run_in_group(
        [*prefix, "/bin/sh", "-c", command],
        cwd=directory,
        env=scrubbed_environment(directory),
        timeout_s=timeout_s or limits.execute_timeout_s,
        max_output_bytes=limits.execute_max_output_bytes,
        output_grace_s=limits.execute_output_grace_s,
    )
    killed_by = signal.Signals(-exit_code).name if exit_code is not None and exit_code < 0 else None
    return {
        "exit_code": exit_code,
        "killed_by_signal": killed_by,
        "timed_out": timed_out,
        "output": output.text,
        "output_truncated": output.cut_bytes > 0,
        "network_cut": bool(prefix),
    }


def scrubbed_environment(home: Path) -> dict[str, str]:
    """Built from nothing, never from os.environ, so no secret of the server's can leak."""
    return {"PATH": _PATH, "HOME": str(home), "LANG": "C.UTF-8", "TERM": "dumb"}


async def network_cut_prefix() -> tuple[str, ...]:
    """The ``unshare`` command line that runs a command in an empty network namespace, or
    ``()`` where this platform does not allow it; probed once per process."""
    return await trio.to_thread.run_sync(_probe_network_cut)


@functools.cache
def _probe_network_cut() -> tuple[str, ...]:
    unshare = shutil.which("unshare", path=_PATH)
    if unshare is None:
        return ()
    # Root can make a network namespace directly; anyone else needs a user namespace too,
    # which kernels and containers may forbid (hence the probe).
    candidates = [[unshare, "--net"]] if os.geteuid() == 0 else []
    candidates.append([unshare, "--net", "--map-root-user"])
    for prefix in candidates:
        try:
            probe = subprocess.run(
                [*prefix, "true"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={"PATH": _PATH},
                timeout=_PROBE_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return tuple(prefix)
    return ()


async def run_in_group(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout_s: float,
    max_output_bytes: int,
    output_grace_s: float,
) -> tuple[int | None, Clipped, bool]:
    """(exit code, output, timed out) of ``argv`` run as the leader of a new process group.

    The exit code is negative for a signal (-9 after a timeout), None if the process could
    not be reaped. Cancellation kills the group, reaps the leader, and propagates.
    """
    output = OutputBuffer(max_output_bytes)
    process = await trio.lowlevel.open_process(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=str(cwd),
        env=dict(env),
        start_new_session=True,
    )
    assert process.stdout is not None
    stdout = process.stdout
    timed_out = False
    try:
        async with trio.open_nursery() as nursery:
            drained = trio.Event()
            nursery.start_soon(_drain, stdout, output, drained)
            with trio.move_on_after(timeout_s) as waiting:
                await process.wait()
            timed_out = waiting.cancelled_caught
            # Children left in the background hold the pipe open; they die with the group.
            _kill_group(process.pid)
            # A child that left the group (setsid) may hold the pipe forever: give up on it.
            with trio.move_on_after(output_grace_s):
                await drained.wait()
            nursery.cancel_scope.cancel()
    finally:
        _kill_group(process.pid)
        with trio.CancelScope(shield=True):
            await stdout.aclose()
            with trio.move_on_after(_REAP_TIMEOUT_S):
                await process.wait()
    return process.returncode, output.clipped(), timed_out


async def _drain(stream: trio.abc.ReceiveStream, output: OutputBuffer, drained: trio.Event) -> None:
    while chunk := await stream.receive_some(_READ_CHUNK_BYTES):
        output.feed(chunk)
    drained.set()


def _kill_group(pgid: int) -> None:
    # The group's id is the leader's pid, which the kernel does not hand out again while the
    # group has a member or the leader is unreaped; an empty group gives ProcessLookupError.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
