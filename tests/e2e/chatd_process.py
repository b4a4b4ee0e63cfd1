"""Run ``chatd`` as a real subprocess and read what it prints, with deadlines."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import trio

_SERVING = re.compile(r"chatd is serving on (http://\S+)")
_TOKEN = re.compile(r"admin API token: (chatd_\S+)")
# A developer's real provider settings must not reach chatd under test (`serve --demo` uses them).
_PROVIDER_ENV = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL")


def chatd_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without any CHATD_* setting or provider key leaking in from the
    developer's."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("CHATD_") and k not in _PROVIDER_ENV
    }
    # A title call after each first answer would add a request to the fake provider that
    # the tests counting requests do not expect; the tests of titles turn them on.
    env["CHATD_TITLES"] = "false"
    env.update(extra or {})
    return env


def run_chatd(
    args: Sequence[str], env: Mapping[str, str] | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatd", *args],
        capture_output=True,
        text=True,
        env=chatd_env(env),
        timeout=timeout_s,
        check=False,
    )


@dataclass
class ServerProcess:
    process: trio.Process
    url: str = ""
    admin_token: str | None = None
    output: list[str] = field(default_factory=list)
    ready: trio.Event = field(default_factory=trio.Event)
    _new_line: trio.Event = field(default_factory=trio.Event)

    async def wait_for_line(self, pattern: str, timeout_s: float = 30) -> re.Match[str]:
        """The first line of output (so far or to come) that matches the regex ``pattern``."""
        regex = re.compile(pattern)
        seen = 0
        with trio.fail_after(timeout_s):
            while True:
                for line in self.output[seen:]:
                    if m := regex.search(line):
                        return m
                seen = len(self.output)
                await self._new_line.wait()

    async def stop(self, sig: int = signal.SIGINT, timeout_s: float = 30) -> int:
        """Signal the server and wait for it to exit; return its exit code."""
        if self.process.returncode is None:
            self.process.send_signal(sig)
        with trio.fail_after(timeout_s):
            return await self.process.wait()

    async def _read_output(self, wants_token: bool) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        buffer = b""
        while chunk := await stdout.receive_some(65536):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                self.output.append(line)
                self._new_line.set()
                self._new_line = trio.Event()
                if m := _SERVING.search(line):
                    self.url = m.group(1)
                if m := _TOKEN.search(line):
                    self.admin_token = m.group(1)
                if self.url and (self.admin_token or not wants_token):
                    self.ready.set()


@contextlib.asynccontextmanager
async def chatd_server(
    args: Sequence[str], env: Mapping[str, str] | None = None, timeout_s: float = 60
) -> AsyncIterator[ServerProcess]:
    """Run ``chatd serve ...``; enter once it printed its URL (and token, if asked for one).

    On exit the server gets SIGINT (if still running) and is waited for, killed if it hangs.
    """
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "chatd", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=chatd_env(env),
    )
    server = ServerProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._read_output, "--admin-token-file" in args)
            with trio.move_on_after(timeout_s):
                async with trio.open_nursery() as waiter:
                    waiter.start_soon(_cancel_when_exited, process, waiter.cancel_scope)
                    await server.ready.wait()
                    waiter.cancel_scope.cancel()
            if not server.ready.is_set():
                raise AssertionError("chatd serve did not start:\n" + "\n".join(server.output))
            yield server
            await server.stop()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def _cancel_when_exited(process: trio.Process, scope: trio.CancelScope) -> None:
    await process.wait()
    scope.cancel()
