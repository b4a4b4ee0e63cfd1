"""The README's shell commands run as written from a clone: ``make`` does not put ``chatd`` on
the PATH, so every command to copy says ``.venv/bin/chatd`` (a newcomer's ``chatd: command not
found`` was one of the stumbles), and ``make help`` says where the command is."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[2]
# A chatd subcommand at the start of a command (a line, or after ; & | $( or a space).
_INVOCATION = re.compile(
    r"(?:^|[\s;&|(])((?:\S*/)?chatd) (?:serve|migrate|token|fake-llm|scaletest)\b"
)


def _shell_blocks(markdown: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"```sh\n(.*?)```", markdown, re.S)]


def test_every_chatd_command_to_copy_names_the_one_in_the_virtualenv() -> None:
    blocks = _shell_blocks((ROOT / "README.md").read_text())
    invoked = [m.group(1) for block in blocks for m in _INVOCATION.finditer(block)]
    assert invoked, "the README has no chatd command in a sh block: the test reads it wrong"
    assert set(invoked) == {".venv/bin/chatd"}, invoked


def test_the_finder_sees_a_bare_chatd() -> None:
    found = [m.group(1) for m in _INVOCATION.finditer("x=$(chatd token create --user a)")]
    assert found == ["chatd"]


def test_make_help_says_where_the_chatd_command_is() -> None:
    result = subprocess.run(
        ["make", "--no-print-directory", "help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "the chatd command itself is .venv/bin/chatd" in result.stdout
