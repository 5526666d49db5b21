"""Values of TXCL expressions: the MISSING sentinel and the comparison rules.

A value is JSON data (dict, list, str, int, float, bool, None) or MISSING (the path is
not there). A `$`-JSONPath yields a `Multi`: a tuple of the values it found, so that it
can never be confused with a JSON list (JSON data has no tuples).

The rules, as docs/txcl.md states them:
- every comparison or match against MISSING is false; `!=` and `!=~` are the exact
  negations of `==` and `=~`, so they are true on MISSING;
- values of unrelated types are never equal and never ordered; nothing here raises.
  bool is not a number (`1 == true` is false), int and float are both numbers;
- a JSON list (or a Multi) on the left of `==` against a scalar is existential: true if
  any element is equal; a Multi is existential against anything;
- `a IN list` is `a == item` for some item of the list, so it is existential exactly where
  `==` is; `NOT IN` is its exact negation;
- ordering only holds between two numbers or two strings.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Final


class _Missing(enum.Enum):
    MISSING = "missing"

    def __repr__(self) -> str:
        return "MISSING"

    def __str__(self) -> str:
        return "missing"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing.MISSING

Multi = tuple  # the values a JSONPath yielded, in document order


def is_number(value: object) -> bool:
    """int or float, but never bool."""
    cls = value.__class__
    return cls is int or cls is float or (isinstance(value, int | float) and cls is not bool)


def kind_of(value: object) -> str:
    if value is None:
        return "null"
    if value is True or value is False:
        return "bool"
    if is_number(value):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "other"


def same(a: Any, b: Any) -> bool:
    """JSON equality, strict about kinds (True is not 1, [1] is not [true]); never raises."""
    ka, kb = kind_of(a), kind_of(b)
    if ka != kb or ka == "other":
        return False
    if ka == "list":
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if ka == "object":
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    return bool(a == b)


def _is_scalar(value: object) -> bool:
    return not isinstance(value, list | dict | tuple)


def equals(left: Any, right: Any) -> bool:
    """`left == right`."""
    if left is MISSING or right is MISSING:
        return False
    if isinstance(right, tuple):
        return any(equals(left, r) for r in right)
    if isinstance(left, tuple):
        return any(equals(item, right) for item in left)
    if isinstance(left, list) and _is_scalar(right):
        return any(same(item, right) for item in left)
    return same(left, right)


def not_equals(left: Any, right: Any) -> bool:
    """`left != right`: the exact negation of `==`, so true when either side is missing."""
    return not equals(left, right)


def _ordered(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def compare(left: Any, right: Any) -> bool:
        if left is MISSING or right is MISSING:
            return False
        if isinstance(left, tuple):
            return any(compare(item, right) for item in left)
        if isinstance(right, tuple):
            return any(compare(left, item) for item in right)
        if is_number(left) and is_number(right):
            return bool(op(left, right))
        if isinstance(left, str) and isinstance(right, str):
            return bool(op(left, right))
        return False

    return compare


less = _ordered(lambda a, b: a < b)
less_equal = _ordered(lambda a, b: a <= b)
greater = _ordered(lambda a, b: a > b)
greater_equal = _ordered(lambda a, b: a >= b)


def contained_in(left: Any, right: Any) -> bool:
    """`left IN right`: `left == item` for some item of the list (or Multi) right."""
    if not isinstance(right, list | tuple):
        return False
    return any(equals(left, item) for item in right)


def not_contained_in(left: Any, right: Any) -> bool:
    """`left NOT IN right`: the exact negation of IN, so true when either side is missing."""
    return not contained_in(left, right)


COMPARISONS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "==": equals,
    "!=": not_equals,
    "<": less,
    "<=": less_equal,
    ">": greater,
    ">=": greater_equal,
    "IN": contained_in,
    "NOT IN": not_contained_in,
}


def add(left: Any, right: Any) -> Any:
    """`left + right`: numbers add, strings join, anything else is MISSING."""
    if is_number(left) and is_number(right):
        return left + right
    if isinstance(left, str) and isinstance(right, str):
        return left + right
    return MISSING


def to_json(value: Any) -> Any:
    """A value as it is written into the envelope or passed to an op: a Multi becomes a list."""
    if isinstance(value, tuple):
        return list(value)
    return value


_MAX_JSON_DEPTH: Final = 200


def json_problem(value: Any, depth: int = 0) -> str | None:
    """None if value is JSON data (what an op may return), else what is wrong with it."""
    if value is None or value is True or value is False or isinstance(value, str):
        return None
    if isinstance(value, int):
        return None
    if isinstance(value, float):
        return (
            None
            if value == value and value not in (float("inf"), float("-inf"))
            else (f"{value!r} is not a JSON number")
        )
    if depth > _MAX_JSON_DEPTH:
        return f"nested deeper than {_MAX_JSON_DEPTH} levels"
    if isinstance(value, list):
        for item in value:
            problem = json_problem(item, depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"object key {key!r} is not a string"
            problem = json_problem(item, depth + 1)
            if problem:
                return problem
        return None
    return f"a {type(value).__name__} is not JSON"
