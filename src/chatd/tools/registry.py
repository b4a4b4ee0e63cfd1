"""The built-in tools chatd runs itself, by name, and the allow-lists that enable them.

A model config or a chat enables tools by name (``validate_tool_names``); the chat actor offers
the model ``enabled_specs`` and answers its calls with ``run_builtin``, in the chat's workspace
(``workspace_for``; what that sandbox is and is not: chatd.tools.workspace).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import trio

from chatd.domain.conversation import ToolCallPart, ToolSpec
from chatd.domain.effects import InvalidCommand
from chatd.domain.mailbox import ToolResult
from chatd.tools import files
from chatd.tools.arguments import reject_unknown
from chatd.tools.builtin import (
    CALCULATE_SPEC,
    CURRENT_TIME_SPEC,
    ToolFailed,
    calculate,
    current_time,
)
from chatd.tools.execute import execute
from chatd.tools.workspace import Workspace, WorkspaceLimits

# Every built-in tool's name; a model config or a chat enables some of them by name.
TOOL_NAMES: tuple[str, ...] = (
    "current_time",
    "calculate",
    "list_files",
    "read_file",
    "write_file",
    "edit_file",
    "search_files",
    "execute",
)
# What a model config enables when it names nothing: the tools without a workspace.
DEFAULT_TOOLS: tuple[str, ...] = ("current_time", "calculate")


def validate_tool_names(names: Sequence[object], field: str) -> tuple[str, ...]:
    """The allow-list as given (duplicates dropped, order kept); raises ``InvalidCommand``
    naming ``field[i]`` for a name that is not a built-in tool."""
    seen: dict[str, None] = {}
    for index, name in enumerate(names):
        if not isinstance(name, str) or name not in TOOL_NAMES:
            raise InvalidCommand(
                f"{field}[{index}]", f"must be a built-in tool: one of {', '.join(TOOL_NAMES)}"
            )
        seen[name] = None
    return tuple(seen)


# What follows is appended below the seam above, which the web layer already uses.


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a built-in tool may touch while answering one chat's call."""

    workspace: Workspace  # lazily created directory for this chat
    limits: WorkspaceLimits


@dataclass(frozen=True, slots=True)
class BuiltinTool:
    spec: ToolSpec
    side_effects: bool  # it changes the workspace (or may: execute)
    # Takes the parsed arguments; returns a JSON-serialisable result; raises ToolFailed.
    run: Callable[[Mapping[str, Any], ToolContext], Awaitable[object]]


def _without_workspace(
    tool: Callable[[Mapping[str, Any]], object],
) -> Callable[[Mapping[str, Any], ToolContext], Awaitable[object]]:
    async def run(args: Mapping[str, Any], _ctx: ToolContext) -> object:
        return tool(args)

    return run


def _in_workspace(
    tool: Callable[[Mapping[str, Any], Workspace, WorkspaceLimits], Awaitable[object]],
) -> Callable[[Mapping[str, Any], ToolContext], Awaitable[object]]:
    async def run(args: Mapping[str, Any], ctx: ToolContext) -> object:
        return await tool(args, ctx.workspace, ctx.limits)

    return run


def _schema(properties: Mapping[str, Any], *required: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": dict(properties),
        "required": list(required),
        "additionalProperties": False,
    }


_PATH_NOTE = "relative to the workspace root"

BUILTINS: dict[str, BuiltinTool] = {
    tool.spec.name: tool
    for tool in (
        BuiltinTool(CURRENT_TIME_SPEC, side_effects=False, run=_without_workspace(current_time)),
        BuiltinTool(CALCULATE_SPEC, side_effects=False, run=_without_workspace(calculate)),
        BuiltinTool(
            ToolSpec(
                "list_files",
                "List a folder of your workspace (default its root): each entry's path, type"
                " (file, dir, symlink, other) and size in bytes for files. Set recursive to"
                " list everything below it; long listings are cut and say so.",
                _schema(
                    {
                        "path": {"type": "string", "description": f"a folder, {_PATH_NOTE}"},
                        "recursive": {"type": "boolean"},
                    }
                ),
            ),
            side_effects=False,
            run=_in_workspace(files.list_files),
        ),
        BuiltinTool(
            ToolSpec(
                "read_file",
                "Read a UTF-8 text file of your workspace, whole or lines start_line to"
                " end_line (1-based, inclusive). Returns the text and the file's total line"
                " count; a long text keeps its beginning and end with a note of the bytes cut"
                " (read the rest by line range). Binary files are refused.",
                _schema(
                    {
                        "path": {"type": "string", "description": f"a file, {_PATH_NOTE}"},
                        "start_line": {"type": "integer", "minimum": 1},
                        "end_line": {"type": "integer", "minimum": 1},
                    },
                    "path",
                ),
            ),
            side_effects=False,
            run=_in_workspace(files.read_file),
        ),
        BuiltinTool(
            ToolSpec(
                "write_file",
                "Write a text file in your workspace, replacing it if it exists; missing"
                " folders are made.",
                _schema(
                    {
                        "path": {"type": "string", "description": f"a file, {_PATH_NOTE}"},
                        "content": {"type": "string"},
                    },
                    "path",
                    "content",
                ),
            ),
            side_effects=True,
            run=_in_workspace(files.write_file),
        ),
        BuiltinTool(
            ToolSpec(
                "edit_file",
                "Replace old_text with new_text in a file of your workspace. old_text must"
                " match exactly (whitespace included) and only once, unless replace_all is"
                " set; otherwise nothing is changed and the error says how many times it"
                " matched.",
                _schema(
                    {
                        "path": {"type": "string", "description": f"a file, {_PATH_NOTE}"},
                        "old_text": {"type": "string"},
                        "new_text": {"type": "string"},
                        "replace_all": {"type": "boolean"},
                    },
                    "path",
                    "old_text",
                    "new_text",
                ),
            ),
            side_effects=True,
            run=_in_workspace(files.edit_file),
        ),
        BuiltinTool(
            ToolSpec(
                "search_files",
                "Search the text files of your workspace for a regular expression (Python"
                " syntax), line by line. Returns path:line:text lines. glob limits the"
                " files by their path, shell-style ('*' also matches '/': '*.py', 'src/*').",
                _schema(
                    {
                        "pattern": {"type": "string"},
                        "glob": {"type": "string"},
                        "ignore_case": {"type": "boolean"},
                    },
                    "pattern",
                ),
            ),
            side_effects=False,
            run=_in_workspace(files.search_files),
        ),
        BuiltinTool(
            ToolSpec(
                "execute",
                "Run a shell command (/bin/sh -c) in your workspace folder, without network"
                " where possible and with nothing on stdin. Returns the exit code and stdout"
                " and stderr together (a long output keeps its beginning and end). The"
                " command and everything it started are killed at the timeout.",
                _schema(
                    {
                        "command": {"type": "string"},
                        "timeout_s": {
                            "type": "number",
                            "description": "seconds; at most the configured limit",
                        },
                    },
                    "command",
                ),
            ),
            side_effects=True,
            run=_in_workspace(execute),
        ),
    )
}
assert tuple(BUILTINS) == TOOL_NAMES


def enabled_specs(names: Iterable[str]) -> tuple[ToolSpec, ...]:
    """The specs of the named built-in tools, in TOOL_NAMES order; unknown names ignored."""
    wanted = set(names)
    return tuple(tool.spec for name, tool in BUILTINS.items() if name in wanted)


def has_side_effects(name: str) -> bool:
    """Whether the built-in tool can change the workspace (False for unknown names)."""
    tool = BUILTINS.get(name)
    return tool is not None and tool.side_effects


async def run_builtin(call: ToolCallPart, ctx: ToolContext, enabled: Collection[str]) -> ToolResult:
    """Answer one built-in call. Every failure (a tool not enabled or unknown, arguments that
    are not a JSON object, a refusal, a filesystem error) is an ``{"error": ...}`` result
    the model can read; only cancellation propagates."""
    try:
        tool = BUILTINS.get(call.name)
        if tool is None:
            raise ToolFailed(f"there is no tool named {call.name!r}")
        if call.name not in enabled:
            raise ToolFailed(f"the tool {call.name!r} is not enabled for this chat")
        args = _parse_arguments(call.arguments)
        if tool.spec.input_schema.get("additionalProperties") is False:
            reject_unknown(args, tool.spec.input_schema)
        output = json.dumps(await tool.run(args, ctx))
    except ToolFailed as exc:
        output = json.dumps({"error": str(exc)})
    except OSError as exc:
        # strerror alone: the exception's text would show the server's absolute paths.
        output = json.dumps({"error": f"the operating system refused: {exc.strerror or exc}"})
    return ToolResult(call.id, output)


def _parse_arguments(text: str) -> dict[str, Any]:
    try:
        args = json.loads(text) if text.strip() else {}
    except ValueError:
        raise ToolFailed("the arguments are not valid JSON") from None
    if not isinstance(args, dict):
        raise ToolFailed("the arguments must be a JSON object")
    return args


def workspace_for(root: Path, chat_id: UUID) -> Workspace:
    """The chat's workspace under ``root``; nothing is made until a tool uses it."""
    return Workspace(root / str(chat_id))


async def remove_workspace(root: Path, chat_id: UUID) -> None:
    """The chat's workspace is gone (it may never have existed)."""
    await trio.to_thread.run_sync(workspace_for(root, chat_id).remove)
