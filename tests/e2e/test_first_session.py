"""The README's first session, examples/first_session.py, run as a user runs it: against
``chatd serve --demo`` (what ``make run`` starts), in a process of its own, twice in a row (the
inline script it replaced crashed on most reruns)."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx2
import pytest
import trio

from tests.e2e.chatd_process import chatd_env, chatd_server

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parents[2] / "examples" / "first_session.py"


async def test_the_first_session_runs_and_reruns_against_the_demo(
    database_url: str, tmp_path: Path
) -> None:
    args = ["--demo", "--database-url", database_url, "--port", "0"]
    args += ["--admin-token-file", str(tmp_path / "admin-token")]
    async with chatd_server(args) as server:
        assert server.admin_token is not None
        # What make run prints points at the page and the docs, which answer without a token.
        page = (await server.wait_for_line(r"^chat in a browser: (\S+) ")).group(1)
        docs = (await server.wait_for_line(r"^API docs: (\S+)$")).group(1)
        async with httpx2.AsyncClient() as http:
            for url, kind in ((page, "text/html"), (docs, "text/html")):
                response = await http.get(url)
                assert response.status_code == 200, url
                assert response.headers["content-type"].startswith(kind), url
        env = chatd_env({"CHATD": server.url, "TOKEN": server.admin_token})
        for _run in range(2):
            with trio.fail_after(60):
                result = await trio.run_process(
                    [sys.executable, str(SCRIPT)],
                    capture_stdout=True,
                    capture_stderr=True,
                    env=env,
                    check=False,
                )
            out = result.stdout.decode()
            assert result.returncode == 0, result.stderr.decode()
            lines = out.splitlines()
            assert lines[0].startswith("chat "), out
            assert "answered by model config " in lines[0], out
            assert "None" not in lines[0], out
            # Two turns streamed on one stream, each ending waiting, then the tool answered.
            markers = [line for line in lines if line.startswith("[")]
            assert markers[:4] == [
                "[assistant message 2 committed]",
                "[chat is waiting]",
                "[assistant message 4 committed]",
                "[chat is waiting]",
            ], out
            assert len(markers) == 5, out
            assert markers[4].startswith("[tool answered, chat is waiting] Hello!"), out
            assert lines[1].startswith("Hello! I am chatd's fake model"), out
