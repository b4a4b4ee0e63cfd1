"""Validation of the tools a client declares for its chat (it runs them and answers)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chatd.domain.conversation import ToolSpec
from chatd.domain.effects import InvalidCommand
from chatd.tools.registry import BUILTINS

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class ToolLimits:
    max_tools: int = 250
    max_description_chars: int = 4096
    max_schema_bytes: int = 32_768
    max_schema_depth: int = 32


def validate_dynamic_tools(
    declared: Sequence[Mapping[str, Any]], limits: ToolLimits = ToolLimits()
) -> tuple[ToolSpec, ...]:
    """Raise ``InvalidCommand`` naming the field and the rule at the first problem."""
    if len(declared) > limits.max_tools:
        raise InvalidCommand("dynamic_tools", f"at most {limits.max_tools} tools per chat")
    seen: set[str] = set()
    specs: list[ToolSpec] = []
    for i, tool in enumerate(declared):
        where = f"dynamic_tools[{i}]"
        name = tool.get("name")
        if not isinstance(name, str) or _NAME.fullmatch(name) is None:
            raise InvalidCommand(f"{where}.name", "1-64 letters, digits, '_' or '-'")
        if name in BUILTINS:
            raise InvalidCommand(f"{where}.name", f"{name!r} is the name of a built-in tool")
        if name in seen:
            raise InvalidCommand(f"{where}.name", f"{name!r} is declared twice")
        seen.add(name)
        description = tool.get("description", "")
        if not isinstance(description, str) or len(description) > limits.max_description_chars:
            raise InvalidCommand(
                f"{where}.description",
                f"a string of at most {limits.max_description_chars} characters",
            )
        schema = tool.get("input_schema", {"type": "object", "properties": {}})
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise InvalidCommand(f"{where}.input_schema", 'a JSON schema with "type": "object"')
        if len(_compact(schema)) > limits.max_schema_bytes:
            raise InvalidCommand(
                f"{where}.input_schema", f"at most {limits.max_schema_bytes} bytes of JSON"
            )
        if _depth(schema) > limits.max_schema_depth:
            raise InvalidCommand(
                f"{where}.input_schema", f"nested at most {limits.max_schema_depth} levels deep"
            )
        specs.append(ToolSpec(name, description, schema))
    return tuple(specs)


def _compact(schema: Mapping[str, Any]) -> bytes:
    """The schema's size as the client would count it: compact UTF-8 JSON."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False).encode()


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0
