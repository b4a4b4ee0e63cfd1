"""Built-in tools answer every call (errors included) and dynamic tools are validated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from chatd.domain.conversation import ToolCallPart
from chatd.domain.effects import InvalidCommand
from chatd.tools.dynamic import ToolLimits, validate_dynamic_tools
from chatd.tools.registry import BUILTINS, TOOL_NAMES, ToolContext, run_builtin, workspace_for
from chatd.tools.workspace import WorkspaceLimits


async def _run(name: str, arguments: str) -> Any:
    context = ToolContext(workspace_for(Path("/nonexistent"), uuid4()), WorkspaceLimits())
    result = await run_builtin(ToolCallPart("c1", name, arguments), context, TOOL_NAMES)
    assert result.call_id == "c1"
    return json.loads(result.output)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [("6*7", {"result": 42}), ("(1 + 2) ** 3 / 9", {"result": 3.0}), ("-7 // 2", {"result": -4})],
)
async def test_calculate(expression: str, expected: object) -> None:
    assert await _run("calculate", json.dumps({"expression": expression})) == expected


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ('{"expression": "1/0"}', "division by zero"),
        ('{"expression": "__import__(\'os\')"}', "only numbers"),
        ('{"expression": "2 ** 100000"}', "exponents above"),
        ('{"expression": "True + 1"}', "booleans"),
        ('{"expression": "1 +"}', "not an arithmetic expression"),
        ('{"expression": ""}', "non-empty string"),
        ("[1]", "JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
async def test_calculate_failures_are_results(arguments: str, error: str) -> None:
    assert error in (await _run("calculate", arguments))["error"]


async def test_current_time_and_unknown_tools() -> None:
    assert (await _run("current_time", ""))["utc"].endswith("+00:00")
    assert "no tool named" in (await _run("teleport", "{}"))["error"]


def _tool(**fields: Any) -> dict[str, Any]:
    return {"name": "lookup", "description": "d", "input_schema": {"type": "object"}} | fields


def test_valid_tools_become_specs() -> None:
    [spec] = validate_dynamic_tools([_tool()])
    assert (spec.name, spec.description, dict(spec.input_schema)) == (
        "lookup",
        "d",
        {"type": "object"},
    )


def _deep(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object"}
    node = schema
    for _ in range(levels):
        node["properties"] = {"x": {"type": "object"}}
        node = node["properties"]["x"]
    return schema


@pytest.mark.parametrize(
    ("tools", "field", "rule"),
    [
        ([_tool(name=f"t{i}") for i in range(4)], "dynamic_tools", "at most 3"),
        ([_tool(name="has space")], "dynamic_tools[0].name", "letters"),
        ([_tool(name="x" * 65)], "dynamic_tools[0].name", "1-64"),
        ([_tool(name=next(iter(BUILTINS)))], "dynamic_tools[0].name", "built-in"),
        ([_tool(), _tool()], "dynamic_tools[1].name", "declared twice"),
        ([_tool(description="x" * 101)], "dynamic_tools[0].description", "100 characters"),
        ([_tool(input_schema={"type": "string"})], "dynamic_tools[0].input_schema", "object"),
        (
            [_tool(input_schema={"type": "object", "description": "x" * 300})],
            "dynamic_tools[0].input_schema",
            "200 bytes",
        ),
        ([_tool(input_schema=_deep(3))], "dynamic_tools[0].input_schema", "5 levels"),
    ],
)
def test_each_rule_names_its_field(tools: list[dict[str, Any]], field: str, rule: str) -> None:
    limits = ToolLimits(
        max_tools=3, max_description_chars=100, max_schema_bytes=200, max_schema_depth=5
    )
    with pytest.raises(InvalidCommand) as refused:
        validate_dynamic_tools(tools, limits)
    assert refused.value.field == field
    assert rule in refused.value.rule


def test_limits_at_n_pass() -> None:
    limits = ToolLimits(max_tools=3, max_description_chars=100)
    tools = [_tool(name=f"t{i}", description="x" * 100) for i in range(3)]
    assert len(validate_dynamic_tools(tools, limits)) == 3
