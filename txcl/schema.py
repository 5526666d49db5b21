"""The envelope schema: a JSON Schema (draft 2020-12) per source, and what it says of a path.

Each source describes its own section `_txc.<src>`: the object it registers under the
`txcl.sources` entry points (txcl.sources) has a `schema()` method returning that schema
(the LMTP head ships `lmtp/schemas/lmtp.schema.json`). Here it is wrapped in the part every
envelope shares (`_txc.src`, `_txc.rid`, `_txc.route`), validated with `jsonschema`, and
walked for `txcl lint`: which paths exist, which are read-only, which maps are open
(`"x-txcl-open": true`: any key below is fine), and what type a path's value has.

`register_schema` adds a source's schema by hand (a head not installed as a package, tests).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from txcl.ast import Segment
from txcl.envelope import TXC, path_text

OPEN: Final = "x-txcl-open"
VERDICT_CODE: Final = "x-txcl-verdict-code"
DRAFT: Final = "https://json-schema.org/draft/2020-12/schema"

_registered: dict[str, Mapping[str, Any]] = {}


class SchemaError(Exception):
    """A source's schema that cannot be loaded or is not a valid JSON Schema."""


def register_schema(src: str, schema: Mapping[str, Any]) -> None:
    """Use `schema` for `_txc.<src>` (it wins over the source's own); checked now."""
    _checked(src, schema)
    _registered[src] = schema
    section_schema.cache_clear()
    envelope_validator.cache_clear()
    schemas_digest.cache_clear()


def _checked(src: str, schema: object) -> Mapping[str, Any]:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError as BadSchema

    if not isinstance(schema, Mapping):
        raise SchemaError(f"the schema of source {src!r} is not a JSON object")
    try:
        Draft202012Validator.check_schema(schema)
    except BadSchema as err:
        raise SchemaError(f"the schema of source {src!r} is not valid: {err.message}") from None
    return schema


@functools.cache
def section_schema(src: str) -> Mapping[str, Any] | None:
    """The schema of `_txc.<src>`, or None when no installed source describes `src`.
    SchemaError if the source's schema cannot be loaded."""
    if src in _registered:
        return _registered[src]
    schema = _unchecked_schema(src)
    return None if schema is None else _checked(src, schema)


def _unchecked_schema(src: str) -> Any:
    """What the source of `src` gives as its schema, not yet checked (None: no schema).
    SchemaError if it cannot be loaded."""
    from txcl.sources import sources

    source = sources().get(src)
    load = getattr(source, "schema", None)
    if load is None:
        return None
    try:
        return load()
    except SchemaError:
        raise
    except Exception as err:
        raise SchemaError(
            f"the schema of source {src!r} cannot be loaded: {type(err).__name__}: {err}"
        ) from None


def envelope_schema(src: str) -> dict[str, Any] | None:
    """The whole envelope's schema for source `src` (None: no schema for it)."""
    section = section_schema(src)
    if section is None:
        return None
    section = {k: v for k, v in section.items() if k != "$schema"}  # its $id scopes its $refs
    return {
        "$schema": DRAFT,
        "type": "object",
        "required": [TXC],
        "properties": {
            TXC: {
                "type": "object",
                "readOnly": True,
                "required": ["src", "rid", "route", src],
                "properties": {
                    "src": {"const": src, "readOnly": True},
                    "rid": {"type": "string", "readOnly": True},
                    "route": {
                        "type": "object",
                        "readOnly": True,
                        "required": ["to"],
                        "additionalProperties": {"type": "string"},
                        "properties": {"to": {"type": "string"}},
                    },
                    src: section,
                },
            }
        },
    }


@functools.cache
def envelope_validator(src: str) -> Any:
    from jsonschema import Draft202012Validator

    schema = envelope_schema(src)
    return None if schema is None else Draft202012Validator(schema)


def envelope_problems(envelope: object, src: str, *, partial: bool = False) -> list[str]:
    """What is wrong with `envelope` for source `src`, one line per problem ("where: what"),
    in path order; [] when it is valid or `src` has no schema. `partial`: a missing field is
    fine (a hand-written fixture), a field of the wrong type or an unknown one is not."""
    validator = envelope_validator(src)
    if validator is None:
        return []
    found = []
    for err in validator.iter_errors(envelope):
        if partial and err.validator == "required":
            continue
        where = path_text(tuple(err.absolute_path)) or "(the envelope)"
        found.append((tuple(map(str, err.absolute_path)), f"{where}: {err.message}"))
    return [text for _, text in sorted(found)]


# --- walking the schema along a path -------------------------------------------------------


@dataclass(frozen=True)
class Lookup:
    """What the schema says of a path: `node` is its schema (None below an open map);
    `unknown` the first segment the schema has no place for (then `suggestion`)."""

    node: Mapping[str, Any] | None
    read_only: bool = False
    unknown: int | None = None  # index of the first unknown segment
    suggestion: str | None = None

    @property
    def types(self) -> frozenset[str]:
        """The JSON types the value can have (empty: not known)."""
        return types_of(self.node) if self.node is not None else frozenset()


def _resolve(node: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    for _ in range(16):
        ref = node.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return node
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, Mapping) else {}
        node = target if isinstance(target, Mapping) else {}
    return node


def _branches(node: Mapping[str, Any], root: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    node = _resolve(node, root)
    subs = node.get("anyOf") or node.get("oneOf")
    if not subs:
        return [node]
    return [b for sub in subs for b in _branches(sub, root)]


def types_of(node: Mapping[str, Any], root: Mapping[str, Any] | None = None) -> frozenset[str]:
    found: set[str] = set()
    for branch in _branches(node, root or node):
        kind = branch.get("type")
        if isinstance(kind, str):
            found.add(kind)
        elif isinstance(kind, list):
            found.update(k for k in kind if isinstance(k, str))
        elif "const" in branch:
            found.add(json_type(branch["const"]))
        else:
            return frozenset()  # a branch of any type
    if "integer" in found:
        found.add("number")
    return frozenset(found)


def json_type(value: object) -> str:
    """A JSON value's type by JSON Schema's names (txcl.values.kind_of has the engine's)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def lookup(segments: tuple[Segment, ...]) -> Lookup | None:
    """What the schema of the path's source says of `_txc.<src>.<rest>`; None when the path
    is not under a source section, or the source has no schema. SchemaError passes through."""
    if len(segments) < 2 or segments[0] != TXC or not isinstance(segments[1], str):
        return None
    src = segments[1]
    if src in ("src", "rid", "route"):
        return None
    root = section_schema(src)
    if root is None:
        return None
    return _walk(root, segments, 2)


def _walk(root: Mapping[str, Any], segments: tuple[Segment, ...], start: int) -> Lookup:
    branches = _branches(root, root)
    read_only = any(b.get("readOnly") is True for b in branches)
    for index in range(start, len(segments)):
        segment = segments[index]
        following: list[Mapping[str, Any]] = []
        names: list[str] = []
        open_below = False
        for branch in branches:
            if branch.get(OPEN) is True:
                open_below = True
            if isinstance(segment, int) or segment == "*":  # `*`: any index a WHEN binds
                items = branch.get("items")
                if isinstance(items, Mapping):
                    following.extend(_branches(items, root))
                continue
            props = branch.get("properties") or {}
            names.extend(props)
            if segment in props:
                following.extend(_branches(props[segment], root))
            elif isinstance(branch.get("additionalProperties"), Mapping):
                following.extend(_branches(branch["additionalProperties"], root))
        if not following:
            if open_below:
                return Lookup(None, read_only)
            close = difflib.get_close_matches(str(segment), sorted(set(names)), n=1)
            suggestion = None
            if close:
                suggestion = path_text((*segments[:index], close[0]), at=True)
            return Lookup(None, read_only, index, suggestion)
        branches = following
        flags = [b.get("readOnly") for b in branches if "readOnly" in b]
        if flags:
            read_only = flags[0] is True
    node: Mapping[str, Any] = branches[0] if len(branches) == 1 else {"anyOf": branches}
    return Lookup(node, read_only)


def item_types(node: Mapping[str, Any]) -> frozenset[str]:
    """The types of a list's items (empty: not known)."""
    found: set[str] = set()
    for branch in _branches(node, node):
        items = branch.get("items")
        if not isinstance(items, Mapping):
            return frozenset()
        kinds = types_of(items, node)
        if not kinds:
            return frozenset()
        found |= kinds
    return frozenset(found)


@functools.cache
def schemas_digest() -> str:
    """A digest of every installed source's schema (a schema that cannot load counts as
    its error), for caches of what was checked against them. The schemas are hashed as
    loaded, not checked: their checks follow from their content, and a warm `txcl lint`
    then need not import the validator at all."""
    import hashlib
    import json

    from txcl.sources import sources

    digest = hashlib.sha256()
    for src in sorted({*sources(), *_registered}):
        try:
            schema = _registered[src] if src in _registered else _unchecked_schema(src)
            text = json.dumps(schema, sort_keys=True, default=str)
        except SchemaError as err:
            text = str(err)
        digest.update(f"{src}\0{text}\0".encode())
    return digest.hexdigest()[:16]


def is_open(node: Mapping[str, Any] | None) -> bool:
    return node is None or node.get(OPEN) is True
