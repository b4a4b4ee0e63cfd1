"""The registry: which tools are offered, and every call answered, failures included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from chatd.domain.conversation import ToolCallPart
from chatd.tools.registry import (
    BUILTINS,
    DEFAULT_TOOLS,
    TOOL_NAMES,
    ToolContext,
    enabled_specs,
    has_side_effects,
    remove_workspace,
    run_builtin,
    workspace_for,
)
from chatd.tools.workspace import WorkspaceLimits

from .calls import CHAT, context


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    return context(tmp_path)


async def _run(
    ctx: ToolContext, name: str, arguments: str, enabled: tuple[str, ...] = TOOL_NAMES
) -> Any:
    result = await run_builtin(ToolCallPart("c9", name, arguments), ctx, enabled)
    assert result.call_id == "c9"
    return json.loads(result.output)


def test_every_name_is_a_tool_with_a_spec() -> None:
    assert tuple(BUILTINS) == TOOL_NAMES
    for name, tool in BUILTINS.items():
        assert tool.spec.name == name
        assert tool.spec.input_schema["type"] == "object"
        assert tool.spec.description


def test_enabled_specs_keep_registry_order_and_ignore_unknown_names() -> None:
    specs = enabled_specs(["execute", "teleport", "read_file", "read_file"])
    assert [spec.name for spec in specs] == ["read_file", "execute"]
    assert [spec.name for spec in enabled_specs(DEFAULT_TOOLS)] == ["current_time", "calculate"]
    assert enabled_specs([]) == ()


def test_side_effects() -> None:
    changing = {name for name in TOOL_NAMES if has_side_effects(name)}
    assert changing == {"write_file", "edit_file", "execute"}
    assert has_side_effects("teleport") is False
    assert "execute" not in DEFAULT_TOOLS


async def test_current_time_and_calculate_as_before(ctx: ToolContext) -> None:
    assert (await _run(ctx, "calculate", '{"expression": "6*7"}')) == {"result": 42}
    assert "division by zero" in (await _run(ctx, "calculate", '{"expression": "1/0"}'))["error"]
    assert (await _run(ctx, "current_time", ""))["utc"].endswith("+00:00")
    # Neither needs the workspace: it is not made for them.
    assert not await trio.Path(ctx.workspace.directory).exists()


@pytest.mark.parametrize(
    ("name", "arguments", "enabled", "error"),
    [
        ("teleport", "{}", TOOL_NAMES, "there is no tool named 'teleport'"),
        ("execute", '{"command": "true"}', DEFAULT_TOOLS, "'execute' is not enabled"),
        ("read_file", "{not json", TOOL_NAMES, "the arguments are not valid JSON"),
        ("read_file", '["a"]', TOOL_NAMES, "the arguments must be a JSON object"),
        ("read_file", "{}", TOOL_NAMES, "'path' is required"),
        ("read_file", '{"path": 3}', TOOL_NAMES, "'path' must be a string"),
        ("list_files", '{"recursive": "yes"}', TOOL_NAMES, "'recursive' must be true or false"),
        (
            "read_file",
            '{"path": "a", "start": 2}',
            TOOL_NAMES,
            "unknown argument 'start': this tool takes path, start_line, end_line",
        ),
    ],
)
async def test_failures_are_results(
    ctx: ToolContext, name: str, arguments: str, enabled: tuple[str, ...], error: str
) -> None:
    result = await _run(ctx, name, arguments, enabled)
    assert set(result) == {"error"}
    assert error in result["error"]


async def test_filesystem_errors_are_results_without_server_paths(ctx: ToolContext) -> None:
    # A name longer than the filesystem allows: an OSError no tool anticipates.
    result = await _run(ctx, "write_file", json.dumps({"path": "n" * 300, "content": ""}))
    assert result == {"error": "the operating system refused: File name too long"}


async def test_remove_workspace(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    await trio.Path(outside).mkdir()
    await trio.Path(outside, "keep.txt").write_text("kept")
    ctx = ToolContext(workspace_for(tmp_path / "ws", CHAT), WorkspaceLimits())
    await _run(ctx, "write_file", '{"path": "a/b/c.txt", "content": "x"}')
    await trio.Path(ctx.workspace.directory, "door").symlink_to(outside)
    await trio.Path(ctx.workspace.directory, "a", "locked").mkdir(mode=0)
    await remove_workspace(tmp_path / "ws", CHAT)
    assert not await trio.Path(ctx.workspace.directory).exists()
    assert await trio.Path(outside, "keep.txt").read_text() == "kept"  # the link not followed
    await remove_workspace(tmp_path / "ws", CHAT)  # absent is fine


def test_limits_are_checked() -> None:
    with pytest.raises(
        ValueError, match=r"WorkspaceLimits\.max_read_bytes must be a number above 0"
    ):
        WorkspaceLimits(max_read_bytes=0)
    with pytest.raises(ValueError, match=r"WorkspaceLimits\.execute_timeout_s must be"):
        WorkspaceLimits(execute_timeout_s=-1.0)
