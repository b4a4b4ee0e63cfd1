"""The two built-in tools that need no workspace (current_time, calculate) and ``ToolFailed``.

chatd.tools.registry is the catalogue of every built-in tool and how calls are answered;
``BUILTINS`` and ``run_builtin`` below are the former synchronous entry points, kept until
their callers (chatd.actors.chat_actor, chatd.tools.dynamic) import the registry instead.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from chatd.domain.conversation import ToolSpec


class ToolFailed(Exception):
    """The call cannot be answered; the message goes back to the model as the result."""


def current_time(_args: Mapping[str, Any]) -> object:
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


def calculate(args: Mapping[str, Any]) -> object:
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


CURRENT_TIME_SPEC = ToolSpec(
    "current_time", "The current date and time in UTC.", {"type": "object", "properties": {}}
)
CALCULATE_SPEC = ToolSpec(
    "calculate",
    "Evaluate an arithmetic expression exactly (numbers, + - * / // % **).",
    {
        "type": "object",
        "properties": {"expression": {"type": "string"}},
        "required": ["expression"],
    },
)
