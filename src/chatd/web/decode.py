"""Request input to typed values, or a 400 naming the field and the rule.

A body is parsed as JSON, walked once for the limits PostgreSQL or the engine would trip over
later (nesting depth, NUL characters), then converted to its msgspec type, which refuses
unknown fields and wrong types. So nothing reaches the engine half-checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, TypeVar
from uuid import UUID

import msgspec
from werkzeug.datastructures import MultiDict

from chatd.store.records import PageCursor
from chatd.web.errors import ApiError

T = TypeVar("T")

_AT = re.compile(r"^(?P<rule>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]*)`$")


def decode_body(raw: bytes, kind: type[T], *, max_depth: int) -> T:
    """The body as ``kind``; ``ApiError`` 400 at the first problem."""
    if not raw.strip():
        raise ApiError.invalid("body", "a JSON object is required")
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise ApiError.invalid("body", "must be valid JSON") from None
    except UnicodeDecodeError:
        raise ApiError.invalid("body", "must be valid UTF-8") from None
    except RecursionError:
        # msgspec parses recursively and gives up near Python's recursion limit (about 1,000
        # levels), far past max_depth: the same rule as a shallower excess, checked later.
        raise ApiError.invalid("body", f"nested at most {max_depth} levels") from None
    if not isinstance(value, dict):
        raise ApiError.invalid("body", "must be a JSON object")
    check_tree(value, max_depth=max_depth)
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        raise _invalid(str(exc)) from None


def check_tree(value: Any, *, max_depth: int, path: str = "") -> None:
    """Refuse nesting deeper than ``max_depth`` and NUL characters in strings (and keys).

    A number with no fraction written as a float (``3.0``) becomes an int in place: JSON (and
    JSON Schema, which calls it an integer) does not tell them apart, so neither do we."""
    stack: list[tuple[Any, str, int]] = [(value, path, 1)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise ApiError.invalid(where or "body", "must not contain NUL characters")
        elif isinstance(item, dict | list):
            if depth > max_depth:
                raise ApiError.invalid(where or "body", f"nested at most {max_depth} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    name = f"{where}.{key}" if where else str(key)
                    if "\x00" in key:
                        raise ApiError.invalid(where or "body", "keys must not contain NUL")
                    if _integral(child):
                        item[key] = int(child)
                    stack.append((child, name, depth + 1))
            else:
                for i, child in enumerate(item):
                    if _integral(child):
                        item[i] = int(child)
                    stack.append((child, f"{where}[{i}]", depth + 1))


def _integral(value: object) -> bool:
    return isinstance(value, float) and value.is_integer() and abs(value) <= 2**53


def _invalid(message: str) -> ApiError:
    m = _AT.match(message)
    assert m is not None  # the pattern matches any text
    rule, path = m["rule"], (m["path"] or "").removeprefix(".")
    if unknown := _UNKNOWN.match(rule):
        return ApiError.invalid(_join(path, unknown["name"]), "is not a known field")
    if missing := _MISSING.match(rule):
        return ApiError.invalid(_join(path, missing["name"]), "is required")
    rule = rule[0].lower() + rule[1:] if rule else "is invalid"
    return ApiError.invalid(path or "body", rule.replace("`", ""))


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def check_length(field: str, value: str, max_chars: int) -> None:
    if len(value) > max_chars:
        raise ApiError.invalid(field, f"at most {max_chars} characters")


def parse_uuid(field: str, text: str) -> UUID:
    """A path or query UUID: the canonical 36-character form, or a 400."""
    try:
        if len(text) != 36:
            raise ValueError(text)
        return UUID(text)
    except ValueError:
        raise ApiError.invalid(field, "must be a UUID") from None


class Query:
    """Query parameters, each read once; unknown or repeated ones are refused."""

    def __init__(self, args: MultiDict[str, str], allowed: Iterable[str]) -> None:
        known = set(allowed)
        for name in args:
            if name not in known:
                raise ApiError.invalid(name, "is not a known query parameter")
            values = args.getlist(name)
            if len(values) > 1:
                raise ApiError.invalid(name, "must be given at most once")
            if "\x00" in values[0]:
                raise ApiError.invalid(name, "must not contain NUL characters")
        self._args: dict[str, str] = {name: args[name] for name in args}

    def get(self, name: str) -> str | None:
        return self._args.get(name)

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        text = self._args.get(name)
        if text is None:
            return default
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise ApiError.invalid(name, f"an integer from {minimum} to {maximum}")
        value = int(text)
        if not minimum <= value <= maximum:
            raise ApiError.invalid(name, f"an integer from {minimum} to {maximum}")
        return value

    def boolean(self, name: str) -> bool | None:
        text = self._args.get(name)
        if text is None:
            return None
        if text not in ("true", "false"):
            raise ApiError.invalid(name, "true or false")
        return text == "true"

    def cursor(self, name: str = "cursor") -> PageCursor | None:
        text = self._args.get(name)
        if text is None:
            return None
        try:
            return PageCursor.decode(text)
        except ValueError:
            raise ApiError.invalid(name, "must be a cursor this API returned") from None
