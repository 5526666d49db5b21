"""What txcl/paths.py learns from inside jsonpath-ng's parsed JSONPaths.

jsonpath-ng documents parsing a JSONPath and `find()` on the result. This is the one module
that also reads the parsed tree (its Child, Fields, Slice and Root nodes and the extended
filter Expression's operator), for two things:

- plain_getter(): a path made only of `$`, `.name` and `[*]` (the common ones) is evaluated
  here, without building jsonpath-ng's match objects, giving the values `find()` gives;
- uses_python_regex(): a `=~` filter (jsonpath-ng runs it with Python's backtracking `re`)
  is found so that the path can be refused.

For a jsonpath-ng outside VERIFIED_JSONPATH, or a tree of a shape this module does not
know, plain_getter() hands back the general `find()`-based getter, and uses_python_regex()
answers from the path's text (any `=~` in it), which refuses at least what the tree would.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Callable
from typing import Any, Final

__all__ = ["VERIFIED_JSONPATH", "plain_getter", "uses_python_regex"]

# The jsonpath-ng releases this module was checked against, [lowest, first unverified): the
# same range as the jsonpath-ng dependency in pyproject.toml.
VERIFIED_JSONPATH: Final[tuple[tuple[int, int], tuple[int, int]]] = ((1, 6), (1, 17))

Multi = tuple[Any, ...]
MultiGetter = Callable[[Any], Multi]

_ALL: Final = None  # `[*]` among the steps of a plain JSONPath
_ABSENT: Final = object()


@functools.cache
def _internals() -> Any | None:
    """jsonpath-ng's node classes, or None where this module does not know the release."""
    try:
        major, minor = importlib.metadata.version("jsonpath-ng").split(".")[:2]
        if not VERIFIED_JSONPATH[0] <= (int(major), int(minor)) < VERIFIED_JSONPATH[1]:
            return None
        jsonpath = importlib.import_module("jsonpath_ng.jsonpath")
        ext_filter = importlib.import_module("jsonpath_ng.ext.filter")
        jsonpath.Child, jsonpath.Fields, jsonpath.Slice, jsonpath.Root  # noqa: B018
        ext_filter.Expression  # noqa: B018
    except (importlib.metadata.PackageNotFoundError, ValueError, ImportError, AttributeError):
        return None
    return jsonpath, ext_filter


def uses_python_regex(parsed: object, text: str) -> bool:
    """Whether a JSONPath holds a `=~` filter."""
    found = _internals()
    if found is None:
        return "=~" in text
    try:
        return _regex_filter_in(parsed, found[0].JSONPath, found[1].Expression, 0)
    except AttributeError:
        return "=~" in text


def _regex_filter_in(node: object, path_node: type, expression: type, depth: int) -> bool:
    if depth > 64:
        return False
    if isinstance(node, expression) and getattr(node, "op", None) == "=~":
        return True
    for child in getattr(node, "__dict__", {}).values():
        items = child if isinstance(child, list | tuple) else (child,)
        for item in items:
            if isinstance(item, path_node | expression) and _regex_filter_in(
                item, path_node, expression, depth + 1
            ):
                return True
    return False


def plain_getter(parsed: object, general: MultiGetter) -> MultiGetter:
    """A getter for a plain path giving what `general` (jsonpath-ng's find()) gives, or
    `general` itself for any other path."""
    steps = _plain_steps(parsed)
    return general if steps is None else _steps_getter(steps, general)


def _plain_steps(parsed: object) -> tuple[str | None, ...] | None:
    """The steps of a JSONPath made only of `$`, `.name` and `[*]` (_ALL), else None."""
    found = _internals()
    if found is None:
        return None
    jsonpath = found[0]
    try:
        if jsonpath.auto_id_field is not None:
            return None
        steps: list[str | None] = []
        node: Any = parsed
        while type(node) is jsonpath.Child:
            right = node.right
            if type(right) is jsonpath.Fields and len(right.fields) == 1 and right.fields[0] != "*":
                steps.append(right.fields[0])
            elif type(right) is jsonpath.Slice and right.start is right.end is right.step is None:
                steps.append(_ALL)
            else:
                return None
            node = node.left
    except AttributeError:
        return None
    if type(node) is not jsonpath.Root:
        return None
    return tuple(reversed(steps))


def _steps_getter(steps: tuple[str | None, ...], general: MultiGetter) -> MultiGetter:
    """jsonpath-ng's results for a plain path. `.name` finds the key of an object (nothing
    on anything else); `[*]` finds the items of a list, the value itself for an object, a
    string, a number or a boolean (jsonpath-ng's "slice of one"), nothing for null. Data
    that is not JSON goes to jsonpath-ng itself (`general`)."""

    def get_all(doc: Any) -> Multi:
        values = [doc]
        for step in steps:
            found: list[Any] = []
            if step is _ALL:
                for value in values:
                    if value.__class__ is list:
                        found.extend(value)
                    elif isinstance(value, dict | str | int | float):  # bool is an int
                        found.append(value)
                    elif value is not None:
                        return general(doc)
            else:
                for value in values:
                    if isinstance(value, dict):
                        item = value.get(step, _ABSENT)
                        if item is not _ABSENT:
                            found.append(item)
                    elif not isinstance(value, list | str | int | float) and value is not None:
                        return general(doc)
            values = found
        return tuple(values)

    return get_all
