"""Reading a tool call's arguments: each refusal names the argument and the rule, for the model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from chatd.tools.builtin import ToolFailed


def text_arg(args: Mapping[str, Any], name: str, *, default: str | None = None) -> str:
    """A string argument; required when there is no ``default``."""
    value = args.get(name, default)
    if value is None:
        raise ToolFailed(f"'{name}' is required")
    if not isinstance(value, str):
        raise ToolFailed(f"'{name}' must be a string")
    return value


def int_arg(args: Mapping[str, Any], name: str, *, minimum: int) -> int | None:
    """An optional integer argument of at least ``minimum``."""
    value = args.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ToolFailed(f"'{name}' must be an integer")
    if value < minimum:
        raise ToolFailed(f"'{name}' must be at least {minimum}")
    return value


def number_arg(args: Mapping[str, Any], name: str, *, maximum: float) -> float | None:
    """An optional number argument above 0 and at most ``maximum``."""
    value = args.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ToolFailed(f"'{name}' must be a number")
    if not 0 < value <= maximum:
        raise ToolFailed(f"'{name}' must be above 0 and at most {maximum:g}")
    return float(value)


def bool_arg(args: Mapping[str, Any], name: str) -> bool:
    """An optional boolean argument, false when absent."""
    value = args.get(name, False)
    if not isinstance(value, bool):
        raise ToolFailed(f"'{name}' must be true or false")
    return value


def reject_unknown(args: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    """A misspelt optional argument would otherwise be ignored without the model knowing."""
    known = schema.get("properties", {})
    unknown = sorted(key for key in args if key not in known)
    if unknown:
        takes = ", ".join(known) or "no arguments"
        raise ToolFailed(f"unknown argument '{unknown[0]}': this tool takes {takes}")
