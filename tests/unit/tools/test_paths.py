"""No path given to a file tool reaches outside the chat's workspace."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import trio

from chatd.tools.registry import ToolContext

from .calls import call, context, error_of


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the workspaces root, with a secret in it."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text("the server's secret\n")
    return folder


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    return context(tmp_path / "workspaces")


async def _made(ctx: ToolContext) -> Path:
    """The workspace, made by a first call as it is in a chat."""
    await call(ctx, "list_files")
    return ctx.workspace.directory


async def test_workspace_is_made_on_first_use_private(ctx: ToolContext) -> None:
    assert not ctx.workspace.directory.exists()
    assert await call(ctx, "list_files") == {"path": ".", "entries": [], "truncated": False}
    assert stat.S_IMODE(ctx.workspace.directory.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("tool", "extra"),
    [
        ("read_file", {}),
        ("write_file", {"content": "x"}),
        ("edit_file", {"old_text": "a", "new_text": "b"}),
        ("list_files", {}),
    ],
)
async def test_absolute_paths_are_refused(
    ctx: ToolContext, outside: Path, tool: str, extra: dict[str, str]
) -> None:
    path = str(outside / "secret.txt")
    error = await error_of(ctx, tool, path=path, **extra)
    assert f"path {path!r} is absolute" in error


@pytest.mark.parametrize("path", ["..", "../outside/secret.txt", "a/../../outside/secret.txt"])
@pytest.mark.parametrize(
    ("tool", "extra"),
    [
        ("read_file", {}),
        ("write_file", {"content": "x"}),
        ("edit_file", {"old_text": "a", "new_text": "b"}),
        ("list_files", {}),
    ],
)
async def test_dot_dot_is_refused(
    ctx: ToolContext, outside: Path, path: str, tool: str, extra: dict[str, str]
) -> None:
    assert f"path {path!r} uses '..'" in await error_of(ctx, tool, path=path, **extra)
    assert (outside / "secret.txt").read_text() == "the server's secret\n"


async def test_symlinked_folder_out_is_refused_for_every_tool(
    ctx: ToolContext, outside: Path
) -> None:
    (await _made(ctx) / "door").symlink_to(outside)
    refused = "leads outside the workspace through a symbolic link"
    assert refused in await error_of(ctx, "read_file", path="door/secret.txt")
    assert refused in await error_of(ctx, "list_files", path="door")
    assert refused in await error_of(ctx, "write_file", path="door/new.txt", content="x")
    assert refused in await error_of(ctx, "write_file", path="door/deeper/new.txt", content="x")
    assert refused in await error_of(
        ctx, "edit_file", path="door/secret.txt", old_text="secret", new_text="gone"
    )
    names = await trio.to_thread.run_sync(lambda: [path.name for path in outside.iterdir()])
    assert names == ["secret.txt"]
    assert (outside / "secret.txt").read_text() == "the server's secret\n"


async def test_symlinked_folder_deep_in_the_path_is_refused(
    ctx: ToolContext, outside: Path
) -> None:
    inner = await _made(ctx) / "a" / "b"
    inner.mkdir(parents=True)
    (inner / "door").symlink_to(outside)
    error = await error_of(ctx, "read_file", path="a/b/door/secret.txt")
    assert "path 'a/b/door/secret.txt' leads outside the workspace" in error


async def test_symlinked_file_out_is_refused(ctx: ToolContext, outside: Path) -> None:
    (await _made(ctx) / "secret.txt").symlink_to(outside / "secret.txt")
    error = await error_of(ctx, "read_file", path="secret.txt")
    assert "path 'secret.txt' leads outside the workspace through a symbolic link" in error


async def test_write_does_not_follow_a_link_in_the_last_component(
    ctx: ToolContext, outside: Path
) -> None:
    workspace = await _made(ctx)
    (workspace / "out.txt").symlink_to(outside / "secret.txt")
    (workspace / "real.txt").write_text("inside\n")
    (workspace / "in.txt").symlink_to(workspace / "real.txt")
    for path in ("out.txt", "in.txt"):
        error = await error_of(ctx, "write_file", path=path, content="overwritten")
        assert f"{path!r} is a symbolic link" in error
        error = await error_of(ctx, "edit_file", path=path, old_text="i", new_text="o")
        assert f"{path!r} is a symbolic link" in error
    assert (outside / "secret.txt").read_text() == "the server's secret\n"
    assert (workspace / "real.txt").read_text() == "inside\n"


async def test_links_that_stay_inside_can_be_read(ctx: ToolContext) -> None:
    workspace = await _made(ctx)
    (workspace / "docs").mkdir()
    (workspace / "docs" / "a.txt").write_text("A\n")
    (workspace / "alias").symlink_to(workspace / "docs")
    assert (await call(ctx, "read_file", path="alias/a.txt"))["text"] == "A\n"


async def test_search_does_not_follow_links_out(ctx: ToolContext, outside: Path) -> None:
    workspace = await _made(ctx)
    (workspace / "door").symlink_to(outside)
    (workspace / "file").symlink_to(outside / "secret.txt")
    result = await call(ctx, "search_files", pattern="secret")
    assert (result["matches"], result["files_searched"]) == ("", 0)


async def test_listing_shows_links_without_entering_them(ctx: ToolContext, outside: Path) -> None:
    (await _made(ctx) / "door").symlink_to(outside)
    result = await call(ctx, "list_files", recursive=True)
    assert result["entries"] == [{"path": "door", "type": "symlink"}]


async def test_root_is_not_a_file(ctx: ToolContext) -> None:
    for path in ("", ".", "./"):
        error = await error_of(ctx, "write_file", path=path, content="x")
        assert "names the workspace root, not a file" in error


async def test_execute_runs_in_the_workspace(ctx: ToolContext) -> None:
    result = await call(ctx, "execute", command="pwd; echo $HOME")
    real = await trio.to_thread.run_sync(ctx.workspace.create)
    assert result["output"] == f"{real}\n{real}\n"
