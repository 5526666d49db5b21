"""The TXCL function table: exists, len, lower, upper, domain, localpart, count.

Each function takes one argument. `exists` and `count` need a path (`@a.b`, `name.x`,
`match.x` or a `$`-JSONPath) because they are about where a value is, not what it is;
the compiler checks that, and the arity, at load time. The others take any expression.
No function raises: what does not apply yields MISSING (so comparisons with it are false).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from txcl.values import MISSING


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    apply: Callable[[Any], Any]
    path_argument: bool  # the argument must be a path or a JSONPath
    summary: str


def _exists(value: Any) -> bool:
    if isinstance(value, tuple):
        return len(value) > 0
    return value is not MISSING


def _count(value: Any) -> int:
    if value is MISSING:
        return 0
    if isinstance(value, tuple | list):
        return len(value)
    return 1


def _len(value: Any) -> Any:
    if isinstance(value, tuple):
        if len(value) != 1:
            return MISSING
        value = value[0]
    if isinstance(value, str | list | dict):
        return len(value)
    return MISSING


def _each(one: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Apply to a value, or to every element of a list or multi-valued path."""

    def apply(value: Any) -> Any:
        if isinstance(value, list | tuple):
            results = [one(item) for item in value]
            return [r for r in results if r is not MISSING]
        return one(value)

    return apply


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else MISSING


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else MISSING


def split_address(value: Any) -> tuple[str, str] | None:
    """(local part, domain) of `a@b`, `Name <a@b>` or an `{"addr": ...}` object; else None."""
    if isinstance(value, dict):
        value = value.get("addr", MISSING)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith(">") and "<" in text:
        text = text[text.rfind("<") + 1 : -1].strip()
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        return None
    return local, domain


def _domain(value: Any) -> Any:
    parts = split_address(value)
    return parts[1].lower() if parts else MISSING


def _localpart(value: Any) -> Any:
    parts = split_address(value)
    return parts[0] if parts else MISSING


FUNCTIONS: Final[dict[str, Function]] = {
    f.name: f
    for f in (
        Function("exists", _exists, True, "true if the path is there (even when it holds null)"),
        Function("count", _count, True, "how many values a path holds: 0, 1, or a list's length"),
        Function("len", _len, False, "length of a string, list or object"),
        Function("lower", _each(_lower), False, "a string in lower case"),
        Function("upper", _each(_upper), False, "a string in upper case"),
        Function("domain", _each(_domain), False, "the lower-cased domain of an address"),
        Function("localpart", _each(_localpart), False, "the part of an address before the @"),
    )
}
