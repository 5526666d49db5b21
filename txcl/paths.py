"""Paths into an envelope, compiled once into closures.

- `compile_getter(ast.Path)`: reads one value, or MISSING. An int segment indexes a list,
  a str segment looks a key up in an object; any other step yields MISSING.
- `compile_jsonpath(ast.JsonPath)`: a `$`-rooted JSONPath (jsonpath-ng, extended syntax),
  parsed at load time; evaluation yields a tuple (a Multi) of every value found.
- `compile_setter(ast.Path)`: writes one value *without mutating* the document it is given:
  it copies only the containers along the written path (shallow path copying) and returns
  the new root. Missing objects and list slots are created on the way; a list is padded
  with null up to the written index.
- `merge_patch(target, patch)`: RFC 7386 JSON merge patch, with the same path copying.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final, Protocol, cast

from jsonpath_ng.ext.parser import ExtendedJsonPathParser
from jsonpath_ng.jsonpath import JSONPath

from txcl import ast, jsonpath_fast
from txcl.envelope import path_text
from txcl.errors import Problem, TxclCompileError
from txcl.values import MISSING, Multi, kind_of


class Getter(Protocol):
    """Reads a document; takes (and ignores) a second argument, so the compiler can use it
    as an expression `(envelope, match) -> value`."""

    def __call__(self, doc: Any, _match: Any = None, /) -> Any: ...



MultiGetter = Callable[[Any], Multi]
Setter = Callable[[dict[str, Any], Any], dict[str, Any]]

# A SET may pad a list up to this index; beyond it the rule is refused at load time, so a
# typo such as `recipients.1000000` cannot make one delivery allocate a huge list.
MAX_LIST_INDEX: Final = 9_999


class PathWriteError(Exception):
    """A SET or a merge patch cannot write where it was told to (e.g. a key into a string)."""


# What a getter steps into where a key is absent: an empty object that is never written to.
# A dict's own `get` then carries the walk on: rules often read what is not there, and a
# raised KeyError makes a missing value dear.
_NO_OBJECT: Final[dict[str, Any]] = {}


def compile_getter(path: ast.Path) -> Getter:
    """A closure reading `path` from a document: the value, or MISSING.

    The closure takes an optional second argument it ignores, so the compiler can use it
    directly as an expression `(envelope, match) -> value`.
    """
    segments = path.segments
    if all(seg.__class__ is str for seg in segments) and 1 <= len(segments) <= 5:
        return _key_getter(segments)

    def get(doc: Any, _match: Any = None) -> Any:
        try:
            for seg in segments:
                if seg.__class__ is int:
                    # An int indexes only a list (a string would give a character).
                    if not isinstance(doc, list):
                        return MISSING
                    doc = doc[seg]
                else:
                    # Only an object has `get`: anything else has no keys (AttributeError).
                    doc = doc.get(seg, _NO_OBJECT)
        except (AttributeError, IndexError):
            return MISSING
        return MISSING if doc is _NO_OBJECT else doc

    return get


def _key_getter(keys: tuple[ast.Segment, ...]) -> Getter:
    """`compile_getter` of a path of one to five keys, each step written out, without the
    loop's overhead: most paths rules read are this short. Only an object has `get`:
    anything else on the way has no keys (AttributeError)."""
    a, b, c, d, e = keys + (None,) * (5 - len(keys))
    no = _NO_OBJECT
    if len(keys) == 1:
        def get1(doc: Any, _match: Any = None) -> Any:
            try:
                return doc.get(a, MISSING)
            except AttributeError:
                return MISSING
        return get1
    if len(keys) == 2:
        def get2(doc: Any, _match: Any = None) -> Any:
            try:
                return doc.get(a, no).get(b, MISSING)
            except AttributeError:
                return MISSING
        return get2
    if len(keys) == 3:
        def get3(doc: Any, _match: Any = None) -> Any:
            try:
                return doc.get(a, no).get(b, no).get(c, MISSING)
            except AttributeError:
                return MISSING
        return get3
    if len(keys) == 4:
        def get4(doc: Any, _match: Any = None) -> Any:
            try:
                return doc.get(a, no).get(b, no).get(c, no).get(d, MISSING)
            except AttributeError:
                return MISSING
        return get4

    def get5(doc: Any, _match: Any = None) -> Any:
        try:
            return doc.get(a, no).get(b, no).get(c, no).get(d, no).get(e, MISSING)
        except AttributeError:
            return MISSING
    return get5


@functools.cache
def _jsonpath_parser() -> ExtendedJsonPathParser:
    # Building the PLY tables is slow: build them once and reuse the parser.
    return ExtendedJsonPathParser()


@functools.lru_cache(maxsize=4096)
def _parse_jsonpath(text: str) -> JSONPath:
    return _jsonpath_parser().parse(text)


def compile_jsonpath(path: ast.JsonPath) -> MultiGetter:
    """A closure yielding every value `path` finds, as a tuple; raises TxclCompileError."""
    try:
        parsed = _parse_jsonpath(path.text)
    except Exception as err:  # jsonpath-ng raises JSONPathError and, from its lexer, bare ones
        raise TxclCompileError(
            Problem("txcl_compile_error", f"invalid JSONPath {path.text!r}: {err}", path.pos)
        ) from None
    if jsonpath_fast.uses_python_regex(parsed, path.text):
        raise TxclCompileError(
            Problem(
                "txcl_compile_error",
                f"JSONPath {path.text!r} uses a =~ filter, which would run Python's "
                "backtracking regex engine; select the values with the JSONPath and "
                "match them with TXCL's =~ instead",
                path.pos,
            )
        )
    find = parsed.find

    def get_all(doc: Any) -> Multi:
        try:
            return tuple(match.value for match in find(doc))
        except Exception:  # a filter comparing unrelated types inside jsonpath-ng
            return ()

    return jsonpath_fast.plain_getter(parsed, get_all)


_KIND_NAMES: Final = {
    "bool": "a boolean",
    "string": "a string",
    "number": "a number",
    "list": "a list",
    "object": "an object",
}


def _kind_name(value: Any) -> str:
    return _KIND_NAMES.get(kind_of(value), "not JSON")


def compile_setter(path: ast.Path) -> Setter:
    """A closure `(root, value) -> new root` writing `value` at `path` by path copying.

    Raises TxclCompileError at load time for an index above MAX_LIST_INDEX; the closure
    raises PathWriteError when a container on the way has the wrong kind (a key into a
    list or a string), never silently replacing it.
    """
    segments = path.segments
    for seg in segments:
        if isinstance(seg, int) and seg > MAX_LIST_INDEX:
            raise TxclCompileError(
                Problem(
                    "txcl_compile_error",
                    f"list index {seg} in SET {path_text(segments)} is above {MAX_LIST_INDEX}",
                    path.pos,
                )
            )
    last = len(segments) - 1

    def copy_for(node: Any, i: int) -> Any:
        """A copy of the container at segments[:i] to write segments[i] into; a new one
        where there is none."""
        if segments[i].__class__ is str:
            if node.__class__ is dict:
                return node.copy()
            if node is MISSING or node is None:
                return {}
            if isinstance(node, dict):
                return node.copy()
            raise PathWriteError(
                f"cannot write {path_text(segments)}: "
                f"{path_text(segments[:i]) or 'the envelope'} is {_kind_name(node)}, "
                "not an object"
            )
        if node is MISSING or node is None:
            new: list[Any] = []
        elif isinstance(node, list):
            new = node.copy()
        else:
            raise PathWriteError(
                f"cannot write {path_text(segments)}: {path_text(segments[:i])} is "
                f"{_kind_name(node)}, not a list"
            )
        index = cast(int, segments[i])
        if len(new) <= index:
            new.extend([None] * (index + 1 - len(new)))
        return new

    if segments and all(seg.__class__ is str for seg in segments):
        keys = cast(tuple[str, ...], segments)
        inner, leaf = tuple(enumerate(keys[:-1], 1)), keys[-1]

        def set_keys(root: dict[str, Any], value: Any) -> dict[str, Any]:
            # Objects all the way (the common case) are copied here, anything else by copy_for.
            new_root: dict[str, Any]
            new_root = node = root.copy() if root.__class__ is dict else copy_for(root, 0)
            for i, seg in inner:
                child = node.get(seg, MISSING)
                node[seg] = node = child.copy() if child.__class__ is dict else copy_for(child, i)
            node[leaf] = value
            return new_root

        return set_keys

    def set_value(root: dict[str, Any], value: Any) -> dict[str, Any]:
        new_root = node = copy_for(root, 0)
        for i in range(last):
            seg = segments[i]
            child = node.get(seg, MISSING) if seg.__class__ is str else node[seg]
            node[seg] = node = copy_for(child, i + 1)
        node[segments[last]] = value
        result: dict[str, Any] = new_root
        return result

    return set_value


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null removes a key, anything else replaces.

    Neither argument is mutated; only objects on the patched paths are copied.
    """
    if not isinstance(patch, dict):
        return patch
    result = target.copy() if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key, MISSING), value)
    return result
