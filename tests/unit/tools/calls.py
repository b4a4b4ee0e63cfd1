"""Calling the built-in tools the way the chat actor does: through ``run_builtin``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from uuid import UUID

from chatd.domain.conversation import ToolCallPart
from chatd.tools.registry import TOOL_NAMES, ToolContext, run_builtin, workspace_for
from chatd.tools.workspace import WorkspaceLimits

CHAT = UUID(int=0x5EED)


def context(root: Path, limits: WorkspaceLimits | None = None) -> ToolContext:
    return ToolContext(workspace_for(root, CHAT), limits or WorkspaceLimits())


async def call(ctx: ToolContext, name: str, **args: Any) -> Any:
    """The parsed result of one call with every tool enabled."""
    result = await run_builtin(ToolCallPart("c1", name, json.dumps(args)), ctx, TOOL_NAMES)
    assert result.call_id == "c1"
    return json.loads(result.output)


async def error_of(ctx: ToolContext, name: str, **args: Any) -> str:
    """The error the model reads for a call that must fail."""
    result = await call(ctx, name, **args)
    assert set(result) == {"error"}, result
    message = result["error"]
    assert isinstance(message, str)
    return message
