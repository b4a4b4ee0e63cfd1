"""Tools chatd runs itself, in the generation task, between two model steps."""

from __future__ import annotations

import ast
import json
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from chatd.domain.conversation import ToolCallPart, ToolSpec
from chatd.domain.mailbox import ToolResult


@dataclass(frozen=True, slots=True)
class BuiltinTool:
    spec: ToolSpec
    # Takes the parsed arguments, returns a JSON-serialisable result; raises ToolFailed.
    run: Callable[[Mapping[str, Any]], object]


class ToolFailed(Exception):
    """The call cannot be answered; the message goes back to the model as the result."""


def _current_time(_args: Mapping[str, Any]) -> object:
    return {"utc": datetime.now(UTC).isoformat(timespec="seconds")}


_OPERATORS: dict[type, Callable[..., float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_MAX_EXPRESSION_CHARS = 500
_MAX_EXPONENT = 1000


def _evaluate(node: ast.AST) -> float:
    """Arithmetic only: numbers and + - * / // % ** with parentheses; nothing is executed."""
    match node:
        case ast.Expression(body=body):
            return _evaluate(body)
        case ast.Constant(value=bool()):
            raise ToolFailed("booleans are not numbers")
        case ast.Constant(value=int() | float() as value):
            return value
        case ast.UnaryOp(op=op, operand=operand) if type(op) in _OPERATORS:
            return _OPERATORS[type(op)](_evaluate(operand))
        case ast.BinOp(left=left, op=op, right=right) if type(op) in _OPERATORS:
            a, b = _evaluate(left), _evaluate(right)
            if isinstance(op, ast.Pow) and abs(b) > _MAX_EXPONENT:
                raise ToolFailed(f"exponents above {_MAX_EXPONENT} are not supported")
            try:
                return _OPERATORS[type(op)](a, b)
            except ZeroDivisionError:
                raise ToolFailed("division by zero") from None
        case _:
            raise ToolFailed("only numbers, + - * / // % ** and parentheses are allowed")


def _calculate(args: Mapping[str, Any]) -> object:
    expression = args.get("expression")
    if not isinstance(expression, str) or not expression.strip():
        raise ToolFailed("'expression' must be a non-empty string")
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise ToolFailed(f"'expression' must be at most {_MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolFailed("'expression' is not an arithmetic expression") from None
    return {"result": _evaluate(tree)}


BUILTINS: dict[str, BuiltinTool] = {
    tool.spec.name: tool
    for tool in (
        BuiltinTool(
            ToolSpec(
                "current_time",
                "The current date and time in UTC.",
                {"type": "object", "properties": {}},
            ),
            _current_time,
        ),
        BuiltinTool(
            ToolSpec(
                "calculate",
                "Evaluate an arithmetic expression exactly (numbers, + - * / // % **).",
                {
                    "type": "object",
                    "properties": {"expression": {"type": "string"}},
                    "required": ["expression"],
                },
            ),
            _calculate,
        ),
    )
}


def run_builtin(call: ToolCallPart) -> ToolResult:
    """Answer one built-in call; a failure is a result the model can read, never a crash."""
    tool = BUILTINS.get(call.name)
    try:
        if tool is None:
            raise ToolFailed(f"there is no tool named {call.name!r}")
        try:
            args = json.loads(call.arguments) if call.arguments.strip() else {}
        except ValueError:
            raise ToolFailed("the arguments are not valid JSON") from None
        if not isinstance(args, dict):
            raise ToolFailed("the arguments must be a JSON object")
        output = json.dumps(tool.run(args))
    except ToolFailed as exc:
        output = json.dumps({"error": str(exc)})
    return ToolResult(call.id, output)
