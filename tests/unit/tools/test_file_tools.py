"""Each file tool's result, and each of its limits, on a real filesystem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from chatd.tools.registry import ToolContext, remove_workspace
from chatd.tools.workspace import WorkspaceLimits

from .calls import CHAT, call, context, error_of


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    return context(tmp_path)


async def _workspace(ctx: ToolContext) -> Path:
    await call(ctx, "list_files")
    return ctx.workspace.directory


async def test_write_then_read_with_folders_made(ctx: ToolContext) -> None:
    written = await call(ctx, "write_file", path="src/pkg/a.py", content="one\ntwo\nthree\n")
    assert written == {"path": "src/pkg/a.py", "bytes_written": 14, "created": True}
    assert await call(ctx, "read_file", path="src/pkg/a.py") == {
        "path": "src/pkg/a.py",
        "text": "one\ntwo\nthree\n",
        "total_lines": 3,
        "start_line": 1,
        "end_line": 3,
        "truncated": False,
    }
    again = await call(ctx, "write_file", path="src/pkg/a.py", content="")
    assert again == {"path": "src/pkg/a.py", "bytes_written": 0, "created": False}
    assert (ctx.workspace.directory / "src/pkg/a.py").read_bytes() == b""


@pytest.mark.parametrize(
    ("start", "end", "text", "last"),
    [
        (2, 3, "2\n3\n", 3),
        (4, None, "4\n5", 5),
        (None, 1, "1\n", 1),
        (5, 99, "5", 5),
        (3, 3, "3\n", 3),
    ],
)
async def test_read_line_ranges(
    ctx: ToolContext, start: int | None, end: int | None, text: str, last: int
) -> None:
    (await _workspace(ctx) / "n.txt").write_text("1\n2\n3\n4\n5")
    lines = {"start_line": start, "end_line": end}
    result = await call(
        ctx, "read_file", path="n.txt", **{k: v for k, v in lines.items() if v is not None}
    )
    assert (result["text"], result["total_lines"], result["end_line"]) == (text, 5, last)


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        ({"start_line": 6}, "'start_line' 6 is past the end of 'n.txt', which has 5 lines"),
        ({"start_line": 0}, "'start_line' must be at least 1"),
        ({"start_line": 3, "end_line": 2}, "'end_line' must be at least 'start_line'"),
        ({"end_line": "2"}, "'end_line' must be an integer"),
        ({"start_line": True}, "'start_line' must be an integer"),
    ],
)
async def test_bad_line_ranges(ctx: ToolContext, lines: dict[str, object], error: str) -> None:
    (await _workspace(ctx) / "n.txt").write_text("1\n2\n3\n4\n5\n")
    assert error in await error_of(ctx, "read_file", path="n.txt", **lines)


async def test_read_cap_keeps_head_and_tail(tmp_path: Path) -> None:
    ctx = context(tmp_path, WorkspaceLimits(max_read_bytes=100))
    (await _workspace(ctx) / "big.txt").write_text("h" * 50 + "m" * 1000 + "t" * 50)
    result = await call(ctx, "read_file", path="big.txt")
    assert result["text"] == "h" * 50 + "[... 1000 bytes cut ...]" + "t" * 50
    assert (result["truncated"], result["total_lines"]) == (True, 1)


async def test_files_above_the_open_limit_are_refused(tmp_path: Path) -> None:
    ctx = context(tmp_path, WorkspaceLimits(max_file_bytes=10))
    (await _workspace(ctx) / "ten.txt").write_text("0123456789")
    (ctx.workspace.directory / "eleven.txt").write_text("0123456789A")
    assert (await call(ctx, "read_file", path="ten.txt"))["text"] == "0123456789"
    error = await error_of(ctx, "read_file", path="eleven.txt")
    assert "'eleven.txt' is 11 bytes: read_file opens files up to 10 bytes" in error
    error = await error_of(ctx, "edit_file", path="eleven.txt", old_text="A", new_text="B")
    assert "'eleven.txt' is 11 bytes: edit_file opens files up to 10 bytes" in error


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"PK\x03\x04\x00\x00", "contains NUL bytes"), (b"caf\xe9\n", "byte 3 is invalid")],
)
async def test_binary_files_are_refused(ctx: ToolContext, content: bytes, reason: str) -> None:
    (await _workspace(ctx) / "blob").write_bytes(content)
    error = await error_of(ctx, "read_file", path="blob")
    assert "'blob' is" in error
    assert reason in error
    assert reason in await error_of(ctx, "edit_file", path="blob", old_text="c", new_text="d")


async def test_reading_what_is_not_a_file(ctx: ToolContext) -> None:
    workspace = await _workspace(ctx)
    (workspace / "dir").mkdir()
    os.mkfifo(workspace / "pipe")
    assert "'missing.txt' does not exist" in await error_of(ctx, "read_file", path="missing.txt")
    assert "'dir' is a folder" in await error_of(ctx, "read_file", path="dir")
    assert "'pipe' is not a regular file" in await error_of(ctx, "read_file", path="pipe")
    assert "'dir' is a folder" in await error_of(ctx, "write_file", path="dir", content="x")


async def test_write_cap(tmp_path: Path) -> None:
    ctx = context(tmp_path, WorkspaceLimits(max_write_bytes=4))
    assert (await call(ctx, "write_file", path="ok", content="ééé"[:2]))["bytes_written"] == 4
    error = await error_of(ctx, "write_file", path="big", content="ééé")
    assert "'content' is 6 bytes: write_file writes at most 4 bytes" in error
    assert not (ctx.workspace.directory / "big").exists()


async def test_write_through_a_file_as_folder(ctx: ToolContext) -> None:
    (await _workspace(ctx) / "plain").write_text("x")
    error = await error_of(ctx, "write_file", path="plain/inner.txt", content="y")
    assert "cannot make the folders of 'plain/inner.txt': a part of it is a file" in error


async def test_edit_replaces_one_exact_match(ctx: ToolContext) -> None:
    (await _workspace(ctx) / "a.py").write_text("x = 1\ny = 2\n")
    result = await call(ctx, "edit_file", path="a.py", old_text="y = 2", new_text="y = 3")
    assert result == {"path": "a.py", "replacements": 1}
    assert (ctx.workspace.directory / "a.py").read_text() == "x = 1\ny = 3\n"


async def test_edit_refuses_ambiguity_with_the_count(ctx: ToolContext) -> None:
    (await _workspace(ctx) / "a.py").write_text("pass\npass\npass\n")
    error = await error_of(ctx, "edit_file", path="a.py", old_text="pass", new_text="return")
    assert "'old_text' matches 3 times in 'a.py'" in error
    assert (ctx.workspace.directory / "a.py").read_text() == "pass\npass\npass\n"
    result = await call(
        ctx, "edit_file", path="a.py", old_text="pass", new_text="return", replace_all=True
    )
    assert result == {"path": "a.py", "replacements": 3}
    assert (ctx.workspace.directory / "a.py").read_text() == "return\nreturn\nreturn\n"


async def test_edit_refuses_missing_text(ctx: ToolContext) -> None:
    (await _workspace(ctx) / "a.py").write_text("x = 1\n")
    error = await error_of(ctx, "edit_file", path="a.py", old_text="x  = 1", new_text="")
    assert "'old_text' was not found in 'a.py'" in error
    assert "'old_text' must not be empty" in await error_of(
        ctx, "edit_file", path="a.py", old_text="", new_text="x"
    )
    assert "'missing' does not exist" in await error_of(
        ctx, "edit_file", path="missing", old_text="a", new_text="b"
    )


async def test_edit_result_over_the_write_cap_changes_nothing(tmp_path: Path) -> None:
    ctx = context(tmp_path, WorkspaceLimits(max_write_bytes=8))
    (await _workspace(ctx) / "a").write_text("abc")
    error = await error_of(ctx, "edit_file", path="a", old_text="b", new_text="bbbbbbb")
    assert "the edited 'a' would be 9 bytes: files are written up to 8 bytes" in error
    assert (ctx.workspace.directory / "a").read_text() == "abc"


async def test_list_entries_types_and_sizes(ctx: ToolContext) -> None:
    workspace = await _workspace(ctx)
    (workspace / "b.txt").write_text("hello")
    (workspace / "a").mkdir()
    (workspace / "a" / "inner.txt").write_text("xy")
    (workspace / "link").symlink_to("b.txt")
    shallow = await call(ctx, "list_files")
    assert shallow["entries"] == [
        {"path": "a", "type": "dir"},
        {"path": "b.txt", "type": "file", "size": 5},
        {"path": "link", "type": "symlink"},
    ]
    deep = await call(ctx, "list_files", recursive=True)
    assert [entry["path"] for entry in deep["entries"]] == ["a", "a/inner.txt", "b.txt", "link"]
    inside = await call(ctx, "list_files", path="a")
    assert inside == {
        "path": "a",
        "entries": [{"path": "a/inner.txt", "type": "file", "size": 2}],
        "truncated": False,
    }
    assert "'b.txt' is a file, not a folder" in await error_of(ctx, "list_files", path="b.txt")
    assert "'nope' does not exist" in await error_of(ctx, "list_files", path="nope")


async def test_list_cap(tmp_path: Path) -> None:
    ctx = context(tmp_path, WorkspaceLimits(max_list_entries=3))
    workspace = await _workspace(ctx)
    for name in "abcde":
        (workspace / name).write_text(name)
    result = await call(ctx, "list_files")
    assert [entry["path"] for entry in result["entries"]] == ["a", "b", "c"]
    assert result["truncated"] is True


async def test_list_deeply_nested(ctx: ToolContext, tmp_path: Path) -> None:
    folder = await _workspace(ctx)
    for _ in range(1200):  # deeper than Python's recursion limit
        folder /= "d"
        folder.mkdir()
    result = await call(ctx, "list_files", recursive=True)
    assert len(result["entries"]) == 1000  # the default cap, before the bottom
    assert result["truncated"] is True
    # Removal copes with the depth too (shutil.rmtree, pytest's included, would not).
    await remove_workspace(tmp_path, CHAT)
    assert not await trio.Path(ctx.workspace.directory).exists()


async def test_search_returns_path_line_text(ctx: ToolContext) -> None:
    workspace = await _workspace(ctx)
    (workspace / "src").mkdir()
    (workspace / "src" / "a.py").write_text("import os\ndef main():\n    return os.sep\n")
    (workspace / "notes.md").write_text("os is the module\n")
    (workspace / "data.bin").write_bytes(b"os\x00os")
    result = await call(ctx, "search_files", pattern=r"\bos\b")
    assert result["matches"].split("\n") == [
        "notes.md:1:os is the module",
        "src/a.py:1:import os",
        "src/a.py:3:    return os.sep",
    ]
    assert (result["match_count"], result["files_searched"]) == (3, 3)
    assert (result["binary_files_skipped"], result["truncated"]) == (1, False)
    only_py = await call(ctx, "search_files", pattern="OS", glob="*.py", ignore_case=True)
    assert only_py["matches"] == "src/a.py:1:import os\nsrc/a.py:3:    return os.sep"


async def test_search_match_cap(tmp_path: Path) -> None:
    ctx = context(tmp_path, WorkspaceLimits(max_search_matches=2))
    (await _workspace(ctx) / "a.txt").write_text("hit\nhit\nhit\n")
    result = await call(ctx, "search_files", pattern="hit")
    assert result["matches"] == "a.txt:1:hit\na.txt:2:hit"
    assert result["truncated"] is True


async def test_search_scans_a_capped_number_of_bytes_per_file(tmp_path: Path) -> None:
    ctx = context(tmp_path, WorkspaceLimits(max_search_file_bytes=10))
    (await _workspace(ctx) / "a.txt").write_text("needle\n" + "x" * 100 + "\nneedle\n")
    result = await call(ctx, "search_files", pattern="needle")
    assert result["matches"] == "a.txt:1:needle"
    assert result["files_partly_searched"] == 1


async def test_search_cuts_long_lines_and_long_output(tmp_path: Path) -> None:
    limits = WorkspaceLimits(max_search_line_bytes=10, max_output_bytes=60)
    ctx = context(tmp_path, limits)
    (await _workspace(ctx) / "a.txt").write_text("\n".join(["k" + "é" * 50] * 5))
    result = await call(ctx, "search_files", pattern="k")
    first = result["matches"].split("\n")[0]
    assert first.startswith("a.txt:1:kéé")
    assert "bytes cut ...]" in first
    assert result["truncated"] is True
    assert len(result["matches"].encode()) < 100


async def test_search_invalid_regex_is_a_clear_error(ctx: ToolContext) -> None:
    error = await error_of(ctx, "search_files", pattern="(unclosed")
    assert "'pattern' '(unclosed' is not a valid regular expression" in error
    assert "missing )" in error
