"""The TXCL syntax tree: frozen dataclasses, each with the position it came from.

Nothing after parser.py sees a lark.Tree. fmt.py prints these back; compiler.py turns
them into closures. Equality ignores nothing, so tests compare trees with strip_pos().
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from txcl.errors import Pos

Segment = str | int  # an int segment indexes a list; a str one (quoted or not) is a key


# --- paths -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Path:
    """A single-valued path, from the envelope root.

    `@lmtp.rcpt.0`      -> segments ("_txc", "lmtp", "rcpt", 0)
    `ticket.id`         -> segments ("ticket", "id")
    `headers."x.y"`     -> segments ("headers", "x.y")
    `match.num`         -> segments ("match", "num"): a named regex group of the rule's WHENs
    """

    segments: tuple[Segment, ...]
    pos: Pos


@dataclass(frozen=True, slots=True)
class JsonPath:
    """A `$`-rooted JSONPath (jsonpath-ng extended syntax); may yield several values."""

    text: str  # exactly as written, starting with "$"
    pos: Pos


# --- expressions -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Literal:
    """A JSON scalar: str, int, float, bool or None (null)."""

    value: str | int | float | bool | None
    pos: Pos


@dataclass(frozen=True, slots=True)
class ListLit:
    items: tuple[Expr, ...]
    pos: Pos


@dataclass(frozen=True, slots=True)
class Regex:
    """`/pattern/flags`; flags is a subset of "ims", in source order. Compiled with RE2."""

    pattern: str  # as written between the slashes, with `\/` unescaped to `/`
    flags: str
    pos: Pos


@dataclass(frozen=True, slots=True)
class Call:
    """A function call: exists, len, lower, upper, domain, localpart, count."""

    name: str  # lower-cased
    args: tuple[Expr, ...]
    pos: Pos


@dataclass(frozen=True, slots=True)
class Compare:
    """`left op right`, op one of == != < <= > >= IN."""

    op: str
    left: Expr
    right: Expr
    pos: Pos


@dataclass(frozen=True, slots=True)
class Match:
    """`left =~ /re/` (negated=False) or `left !=~ /re/` (negated=True)."""

    left: Expr
    regex: Regex
    negated: bool
    pos: Pos


@dataclass(frozen=True, slots=True)
class And:
    left: Expr
    right: Expr
    pos: Pos


@dataclass(frozen=True, slots=True)
class Or:
    left: Expr
    right: Expr
    pos: Pos


@dataclass(frozen=True, slots=True)
class Not:
    operand: Expr
    pos: Pos


@dataclass(frozen=True, slots=True)
class Add:
    """`left + right`: numbers add, strings join; anything else is missing."""

    left: Expr
    right: Expr
    pos: Pos


Expr = Path | JsonPath | Literal | ListLit | Regex | Call | Compare | Match | And | Or | Not | Add


# --- statements and files ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class When:
    expr: Expr
    pos: Pos


@dataclass(frozen=True, slots=True)
class Set:
    target: Path
    value: Expr
    pos: Pos


@dataclass(frozen=True, slots=True)
class Exec:
    uri: str  # e.g. "op://ARCHIVE"
    pos: Pos


@dataclass(frozen=True, slots=True)
class With:
    key: str
    value: Expr
    pos: Pos


Stmt = When | Set | Exec | With
BodyStmt = Set | Exec | With


@dataclass(frozen=True, slots=True)
class Rule:
    """Zero or more WHENs (all must hold) and a body, in source order."""

    whens: tuple[When, ...]
    body: tuple[BodyStmt, ...]
    pos: Pos  # of its first statement


@dataclass(frozen=True, slots=True)
class Comment:
    """`# text` to end of line, kept for fmt. text excludes the '#' and the newline."""

    text: str
    pos: Pos


@dataclass(frozen=True, slots=True)
class File:
    name: str
    rules: tuple[Rule, ...]
    comments: tuple[Comment, ...] = ()


RESERVED_WITH_KEYS = frozenset({"omit", "redact", "timeout"})

_T = TypeVar("_T")
_NOWHERE = Pos("", 0, 0)


def strip_pos(node: _T) -> _T:
    """The same tree with every position blanked: for comparing trees in tests and fmt."""
    if isinstance(node, tuple):
        return tuple(strip_pos(n) for n in node)  # type: ignore[return-value]
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            changes[f.name] = _NOWHERE if isinstance(value, Pos) else strip_pos(value)
        return dataclasses.replace(node, **changes)
    return node
