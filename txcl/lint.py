"""`txcl lint`: what can be known about rules without an envelope.

Every finding is a Problem with code "txcl_lint_error" (an error) or "txcl_lint_warning", a severity ("error" or "warning")
and a stable `check` id:

| check            | severity | finds                                                          |
|------------------|----------|----------------------------------------------------------------|
| syntax           | error    | text that does not parse (the parser's own messages)           |
| compile          | error    | rules that do not compile: RE2-refused regexes, bad paths, ... |
| layout           | error    | an OPS tree the loader refuses: names, stray files, escapes     |
| unknown-op       | error    | EXEC of an op the registry does not know                       |
| read-only-write  | error    | SET to _txc.src, _txc.rid, _txc.route.*, _txc.<src>.* but res  |
| verdict-code     | error    | a verdict code never valid: a literal outside 200-299 and      |
|                  |          | 400-599, a list, a path of known type that is never a number   |
| verdict-form     | error    | res, res.recipients or a slot SET to a kind the verdict rules  |
|                  |          | refuse (a code where a slot or a list of slots belongs, ...)   |
| unknown-path     | error    | a path under _txc.<src> its source's schema does not have      |
| type-mismatch    | error    | a path of known type compared with a literal of another type   |
| in-not-list      | error    | IN / NOT IN whose right side can never be a list               |
| match-not-string | error    | =~ / !=~ on a path that can never hold a string                |
| schema           | error    | a source schema that cannot be loaded                          |
| unwritten-path   | warning  | a stack path read but written by no SET of the stack (no EXEC) |
| recipient-gap    | warning  | recipients.N.code set in a stack that never sets a slot below N |
| never-fires      | warning  | a WHEN that can never be true                                  |
| verdict-msg      | warning  | a verdict msg SET to a value that is never a string            |
| unknown-with-key | warning  | a WITH key that looks like a misspelt reserved key             |
| unused-with      | warning  | an op argument in a rule that EXECs no op                      |
| empty-file       | warning  | a rule file without rules                                      |

The schema checks (txcl.schema) know `_txc.<src>` from the schema its source registers; open
maps (message headers, `res` extras) take any key. They run at load, never per delivery.
Rendering (text, JSON, GitHub annotations) belongs to the CLI.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast

from txcl import ast, inputs
from txcl.envelope import (
    RESULT_KEY,
    TXC,
    path_text,
    read_only_reason,
    valid_code,
)
from txcl.errors import Pos, Problem, TxclError, TxclLoadError, TxclSyntaxError
from txcl.parser import caret_context, parse

if TYPE_CHECKING:
    import multiprocessing.pool

    from txcl.compile_cache import CachedFile, CompileCache
    from txcl.loader import ReadFile, StackSignature, Tree
    from txcl.ops import OpRegistry
    from txcl.schema import Lookup

__all__ = ["CHECKS", "LINT_CODE", "gate_problems", "lint_file", "lint_source", "lint_target", "lint_tree"]

LINT_CODE: Final = "txcl_lint_error"
LINT_WARNING_CODE: Final = "txcl_lint_warning"

CHECKS: Final[dict[str, str]] = {
    "syntax": "error",
    "compile": "error",
    "layout": "error",
    "unknown-op": "error",
    "read-only-write": "error",
    "verdict-code": "error",
    "verdict-form": "error",
    "unknown-path": "error",
    "type-mismatch": "error",
    "in-not-list": "error",
    "match-not-string": "error",
    "schema": "error",
    "unwritten-path": "warning",
    "recipient-gap": "warning",
    "never-fires": "warning",
    "verdict-msg": "warning",
    "unknown-with-key": "warning",
    "unused-with": "warning",
    "empty-file": "warning",
}

# One line a reader can act on per check; docs/txcl.md "Lint checks" has a bad and a fixed
# example of each.
CHECK_HELP: Final[dict[str, str]] = {
    "syntax": "The line does not parse: fix the statement the message names.",
    "compile": "The rule parses but cannot be compiled (a regex RE2 refuses, an unknown function, a bad WITH value).",
    "layout": "The OPS tree holds something the loader refuses: names, stray files, links that leave the tree.",
    "unknown-op": "EXEC names an op the registry does not know: check the spelling and the `ops:` of txco.yaml.",
    "read-only-write": "SET writes a path the source stamps; only _txc.<src>.res is writable.",
    "verdict-code": "A verdict code is an integer in 200-299 or 400-599.",
    "verdict-form": "res is an object (code, msg or recipients); recipients a list of slots; a slot an object {code, msg} or null.",
    "verdict-msg": "A verdict message is a string; anything else is shown as its text.",
    "recipient-gap": "A recipient slot is set while a lower one never is: that recipient would be refused.",
    "never-fires": "A WHEN that reads nothing from the envelope and is not true: the rule never fires.",
    "unknown-with-key": "A WITH key that looks like a misspelt reserved key (timeout, omit, redact).",
    "unused-with": "An op argument in a rule that EXECs no op: nothing reads it.",
    "empty-file": "A rule file without rules.",
    "unknown-path": "A path under _txc.<src> that the source's envelope schema does not have: it is always missing.",
    "type-mismatch": "A path of known type compared with a literal of another type: never true.",
    "in-not-list": "IN needs a list on its right: write [..] around the values, or == to compare.",
    "match-not-string": "=~ on a path that never holds a string: never true.",
    "schema": "A source's envelope schema cannot be loaded: reinstall the package that ships it.",
    "unwritten-path": "A stack path read but SET by no rule of the stack: it is always missing.",
}

# The phase a problem of another module came from -> the lint check it is reported under.
_CHECK_OF_CODE: Final = {
    "txcl_parse_error": "syntax",
    "txcl_compile_error": "compile",
    "txcl_load_error": "layout",
}

_OP_SCHEME: Final = "op://"
_NOWHERE: Final = Pos("", 0, 0)

log = logging.getLogger("txcl.lint")


def code_of(check: str) -> str:
    """A finding's code: warnings carry their own, so a reader of the code alone can tell."""
    return LINT_CODE if CHECKS[check] == "error" else LINT_WARNING_CODE


def _finding(check: str, message: str, pos: Pos | None, lines: list[str] | None) -> Problem:
    context = ""
    if pos is not None and lines is not None and 0 < pos.line <= len(lines):
        context = caret_context(lines[pos.line - 1], pos.column)
    return Problem(code_of(check), message, pos, CHECKS[check], check, context)


def _as_lint(problem: Problem, lines: list[str] | None = None) -> Problem:
    """A parse, compile or load problem, reported as a lint finding (same words, same place)."""
    check = _CHECK_OF_CODE.get(problem.code, "compile")
    context = problem.context or _finding(check, "", problem.pos, lines).context
    return replace(problem, code=code_of(check), severity=CHECKS[check], check=check, context=context)


def _sorted(problems: Iterable[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.pos or _NOWHERE, p.check, p.message))


# --- one file -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Verdict:
    """A SET of `_txc.<src>.res.recipients.<index>.code`, for the stack-wide gap check; its
    source line gives the finding's context, made only if there is a finding."""

    index: int
    pos: Pos
    line: str

    @property
    def context(self) -> str:
        return caret_context(self.line, self.pos.column)


@dataclass(frozen=True)
class _LocalRead:
    """A read of a stack path (not under `_txc`, not a regex group), for the stack-wide
    check; its source line as for _Verdict."""

    segments: tuple[ast.Segment, ...]
    pos: Pos
    line: str

    @property
    def context(self) -> str:
        return caret_context(self.line, self.pos.column)


@dataclass(frozen=True)
class _FileLint:
    problems: tuple[Problem, ...]
    verdicts: tuple[_Verdict, ...]
    local_reads: tuple[_LocalRead, ...] = ()
    local_writes: frozenset[tuple[ast.Segment, ...]] = frozenset()
    execs: bool = False


def _lines(source: str) -> list[str]:
    return [line.removesuffix("\r") for line in source.split("\n")]


def _lint_text(source: str, name: str, registry: OpRegistry | None) -> _FileLint:
    return _check_text(source, name, registry)[2]


def _check_text(
    source: str, name: str, registry: OpRegistry | None
) -> tuple[ast.File | None, tuple[Problem, ...], _FileLint]:
    """Parse, compile and lint one file's text: its tree (None: it does not parse), its
    parse or compile problems, and its findings."""
    try:
        tree = parse(source, name)
    except TxclSyntaxError as err:
        return None, err.problems, _lint_parsed(source, name, None, err.problems, registry)
    from txcl.compiler import check_file  # the compiler pulls in RE2 and the ops' helpers

    try:
        check_file(tree)
    except TxclError as err:
        return tree, err.problems, _lint_parsed(source, name, tree, err.problems, registry)
    return tree, (), _lint_parsed(source, name, tree, (), registry)


def _lint_parsed(
    source: str,
    name: str,
    tree: ast.File | None,
    found: tuple[Problem, ...],
    registry: OpRegistry | None,
) -> _FileLint:
    """The findings of a file already parsed (tree None: it did not) and compiled, with the
    problems that found."""
    lines = _lines(source)
    problems = [_as_lint(p, lines) for p in found]
    if tree is None:
        return _FileLint(tuple(problems), ())
    checker = _RuleChecks(lines, registry)
    if not tree.rules:
        problems.append(_finding("empty-file", "this file holds no rules", Pos(name, 1, 1), None))
    for rule in tree.rules:
        checker.rule(rule)
    problems.extend(checker.problems)
    return _FileLint(
        tuple(problems),
        tuple(checker.verdicts),
        tuple(checker.local_reads),
        frozenset(checker.local_writes),
        checker.execs,
    )


def gate_problems(tree: ast.File, source: str) -> list[Problem]:
    """The error-level findings of one parsed and compiled file that lint alone finds (the
    per-file checks: read-only writes, verdict codes and forms, the schema checks): what
    keeps its stack from going live. Unknown ops are the loader's own check."""
    checker = _RuleChecks(_lines(source), None)
    for rule in tree.rules:
        checker.rule(rule)
    return [p for p in checker.problems if p.severity == "error"]


def lint_source(source: str, name: str, registry: OpRegistry | None = None) -> list[Problem]:
    """Lint the text of one rule file; the file is taken as a stack of its own."""
    found = _lint_text(source, name, registry)
    return _sorted([*found.problems, *_stack_findings([found])])


def lint_file(path: str | Path, registry: OpRegistry | None = None) -> list[Problem]:
    """Lint one `.txcl` file; the file is taken as a stack of its own."""
    found = _lint_path(Path(path), registry)
    return _sorted([*found.problems, *_stack_findings([found])])


def _lint_path(path: Path, registry: OpRegistry | None) -> _FileLint:
    from txcl.loader import read_rule_source

    try:
        source = read_rule_source(str(path))
    except TxclLoadError as err:
        return _FileLint(tuple(_as_lint(p) for p in err.problems), ())
    return _lint_text(source, str(path), registry)


class _RuleChecks:
    """The checks that look at one rule's syntax tree."""

    def __init__(self, lines: list[str], registry: OpRegistry | None) -> None:
        self.lines = lines
        self.registry = registry
        self.problems: list[Problem] = []
        self.verdicts: list[_Verdict] = []
        self.local_reads: list[_LocalRead] = []
        self.local_writes: set[tuple[ast.Segment, ...]] = set()
        self.execs = False
        self.schema_failed = False

    def report(self, check: str, message: str, pos: Pos) -> None:
        self.problems.append(_finding(check, message, pos, self.lines))

    def rule(self, rule: ast.Rule) -> None:
        for when in rule.whens:
            self.expr(when.expr)
            reason = _never_true(when.expr)
            if reason:
                self.report(
                    "never-fires",
                    f"this WHEN is never true ({reason}): the rule never fires",
                    when.pos,
                )
        execs = [s for s in rule.body if isinstance(s, ast.Exec)]
        for stmt in rule.body:
            if isinstance(stmt, ast.Set):
                self.expr(stmt.value)
                self.set(stmt)
            elif isinstance(stmt, ast.Exec):
                self.execs = True
                self.exec(stmt)
            elif isinstance(stmt, ast.With):
                self.with_(stmt, bool(execs))

    def set(self, stmt: ast.Set) -> None:
        segments = stmt.target.segments
        if segments and segments[0] != TXC:
            self.local_writes.add(segments)
        reason = _read_only(segments)
        if reason:
            self.report("read-only-write", f"SET {_dotted(segments)}: {reason}", stmt.target.pos)
            return
        part = _verdict_part(segments)
        if part is not None:
            self.verdict_value(segments, part, stmt.value)
        slot = _verdict_slot(segments)
        if slot is None:
            return
        if isinstance(slot, int):
            pos = stmt.target.pos
            self.verdicts.append(_Verdict(slot, pos, self.lines[pos.line - 1]))

    # -- what a SET under res can never be ---------------------------------------------------

    def verdict_value(self, segments: tuple[ast.Segment, ...], part: str, value: ast.Expr) -> None:
        """A SET of a verdict's part (`_verdict_part`) whose value is of a kind the verdict
        rules (txcl.envelope.verdict_problem, the inlet's resolution) can never accept."""
        if part == "code" and isinstance(value, ast.Literal):
            if not valid_code(value.value):
                self.report(
                    "verdict-code",
                    f"SET {_dotted(segments)} = {_expr_text(value)}: a verdict code is an "
                    "integer in 200-299 or 400-599; anything else fails the run (451)",
                    value.pos,
                )
            return
        kinds, items = self.set_value_kinds(value)
        if not kinds:
            return
        if part == "code" and kinds.isdisjoint(_NUMBERS):
            target, shown, what = _verdict_texts(segments, value, kinds)
            hint = (f"; to answer each recipient, SET {_dotted(segments[:3])}.recipients.N.code"
                    if "array" in kinds else "")
            self.report(
                "verdict-code",
                f"SET {target} = {shown}: {what}, never a verdict code (an integer in "
                f"200-299 or 400-599): the run fails (451){hint}",
                value.pos,
            )
        elif part == "msg" and "string" not in kinds and kinds != {"null"}:
            target, shown, what = _verdict_texts(segments, value, kinds)
            self.report(
                "verdict-msg",
                f"SET {target} = {shown}: {what}, not a string: the reply shows it as text",
                value.pos,
            )
        elif part == "recipients":
            self.verdict_slots(segments, kinds, items, value)
        elif part in ("res", "slot") and kinds.isdisjoint(_SLOT_KINDS):
            target, shown, what = _verdict_texts(segments, value, kinds)
            rule = (f"{target} is an object (code and msg, or recipients): the run fails (451)"
                    if part == "res" else
                    "a recipient slot is an object {code, msg} or null: every recipient gets 451")
            self.report(
                "verdict-form",
                f"SET {target} = {shown}: {what}, but {rule}; write SET {target}.code = ...",
                value.pos,
            )

    def verdict_slots(self, segments: tuple[ast.Segment, ...], kinds: frozenset[str],
                      items: frozenset[str], value: ast.Expr) -> None:
        """`res.recipients` is a list of slots, each an object {code, msg} or null."""
        target, shown, what = _verdict_texts(segments, value, kinds)
        if kinds.isdisjoint({"array", "null"}):
            hint = (f"; to answer every recipient alike, SET {target.removesuffix('.recipients')}"
                    ".code" if kinds & _NUMBERS else "")
            self.report(
                "verdict-form",
                f"SET {target} = {shown}: {what}, but {target} is a list of slots (each "
                f"{{code, msg}} or null), one per recipient: the run fails (451){hint}",
                value.pos,
            )
            return
        if isinstance(value, ast.ListLit):
            for index, item in enumerate(value.items):
                found, _ = self.set_value_kinds(item)
                if found and found.isdisjoint(_SLOT_KINDS):
                    self.report(
                        "verdict-form",
                        f"SET {target}: slot {index} is {_expr_text(item)} "
                        f"({_kinds_text(found)}), but a slot is an object {{code, msg}} or "
                        f"null: every recipient gets 451; write SET {target}.{index}.code = ...",
                        item.pos,
                    )
        elif items and items.isdisjoint(_SLOT_KINDS):
            self.report(
                "verdict-form",
                f"SET {target} = {shown}: each of its items is {_kinds_text(items)}, but a slot "
                "is an object {code, msg} or null: every recipient gets 451",
                value.pos,
            )

    def set_value_kinds(self, value: ast.Expr) -> tuple[frozenset[str], frozenset[str]]:
        """The JSON types a SET's value can have, and if a list its items' (empty: not known)."""
        if isinstance(value, ast.Literal):
            return frozenset({_literal_type(value.value)}), frozenset()
        if isinstance(value, ast.ListLit):
            return frozenset({"array"}), frozenset()
        if not isinstance(value, ast.Path) or not value.segments or value.segments[0] != TXC:
            return frozenset(), frozenset()
        found = self.lookup(value)
        if found is None or found.unknown is not None or found.node is None:
            return frozenset(), frozenset()
        kinds = found.types
        if "array" not in kinds:
            return kinds, frozenset()
        from txcl.schema import item_types

        return kinds, item_types(found.node)

    # -- the schema checks ----------------------------------------------------------------

    def expr(self, node: ast.Expr) -> None:
        """The schema checks of every path an expression reads, and of how it compares them."""
        stack = [node]
        while stack:
            current = stack.pop()
            if isinstance(current, ast.Path):
                self.path(current)
            elif isinstance(current, ast.Compare):
                self.compare(current)
                stack += current.left, current.right
            elif isinstance(current, ast.Match):
                self.match(current)
                stack.append(current.left)
            elif not isinstance(current, ast.Literal):
                stack.extend(_children(current))

    def lookup(self, path: ast.Path) -> Lookup | None:
        from txcl.schema import SchemaError

        try:
            return _schema_lookup(path.segments)
        except SchemaError as err:
            if not self.schema_failed:
                self.schema_failed = True
                self.report("schema", f"{err}; the paths under it are not checked", path.pos)
            return None

    def path(self, path: ast.Path) -> None:
        segments = path.segments
        if segments and segments[0] != TXC and segments[0] != _MATCH_ROOT:
            line = self.lines[path.pos.line - 1] if 0 < path.pos.line <= len(self.lines) else ""
            self.local_reads.append(_LocalRead(segments, path.pos, line))
            return
        found = self.lookup(path)
        if found is None or found.unknown is None:
            return
        hint = f"; did you mean {found.suggestion}?" if found.suggestion else ""
        where = _dotted(segments[: found.unknown + 1])
        below = "" if where == _dotted(segments) else f" (there is no {where})"
        self.report(
            "unknown-path",
            f"{_dotted(segments)} is not in the {segments[1]} envelope{below}: it is always "
            f"missing{hint}",
            path.pos,
        )

    def compare(self, node: ast.Compare) -> None:
        if node.op in ("IN", "NOT IN"):
            self.membership(node)
            return
        for path, other in ((node.left, node.right), (node.right, node.left)):
            if not isinstance(path, ast.Path) or not isinstance(other, ast.Literal):
                continue
            kinds = self.value_types(path)
            literal = _literal_type(other.value)
            if not kinds or literal == "null" or literal in kinds:
                continue
            self.report(
                "type-mismatch",
                f"{_dotted(path.segments)} is {_kinds_text(kinds)}, never equal to or ordered "
                f"with {_literal_text(other.value)} ({literal}): this comparison is never true"
                if node.op != "!=" else
                f"{_dotted(path.segments)} is {_kinds_text(kinds)}, so != "
                f"{_literal_text(other.value)} ({literal}) is always true",
                node.pos,
            )

    def membership(self, node: ast.Compare) -> None:
        right = node.right
        if isinstance(right, ast.Literal):
            kind = _kinds_text(frozenset({_literal_type(right.value)}))
        elif isinstance(right, ast.Path):
            found = self.lookup(right)
            kinds = found.types if found is not None and found.unknown is None else frozenset()
            if not kinds or "array" in kinds:
                return
            kind = _kinds_text(kinds)
        else:
            return
        self.report(
            "in-not-list",
            f"{node.op} needs a list on its right, and this is {kind}: the membership is "
            f"never true; write [..] around the values, or == to compare",
            right.pos,
        )

    def match(self, node: ast.Match) -> None:
        if not isinstance(node.left, ast.Path):
            return
        kinds = self.value_types(node.left)
        if not kinds or "string" in kinds:
            return
        op = "!=~" if node.negated else "=~"
        outcome = "always true" if node.negated else "never true"
        self.report(
            "match-not-string",
            f"{_dotted(node.left.segments)} is {_kinds_text(kinds)}, never a string: "
            f"{op} is {outcome}",
            node.pos,
        )

    def value_types(self, path: ast.Path) -> frozenset[str]:
        """The types a comparison meets at `path`: its own, and its items' (comparisons are
        existential over a list); empty when not known."""
        found = self.lookup(path)
        if found is None or found.unknown is not None or found.node is None:
            return frozenset()
        kinds = found.types
        if "array" in kinds:
            from txcl.schema import item_types

            items = item_types(found.node)
            if not items:
                return frozenset()
            kinds = kinds | items
        return kinds

    def exec(self, stmt: ast.Exec) -> None:
        if self.registry is None or not stmt.uri.startswith(_OP_SCHEME):
            return  # without a registry nothing is known; a bad URI is a compile problem
        name = stmt.uri[len(_OP_SCHEME) :]
        if name in self.registry:
            return
        op_names = sorted(self.registry.names())
        close = difflib.get_close_matches(name, op_names, n=1)
        hint = f'; did you mean "op://{close[0]}"?' if close else ""
        known = ", ".join(op_names) or "none"
        self.report("unknown-op", f"unknown op {name!r} (known: {known}){hint}", stmt.pos)

    def with_(self, stmt: ast.With, rule_execs: bool) -> None:
        if stmt.key in ast.RESERVED_WITH_KEYS:
            return
        close = difflib.get_close_matches(
            stmt.key.lower(), sorted(ast.RESERVED_WITH_KEYS), n=1, cutoff=0.7
        )
        if close:
            self.report(
                "unknown-with-key",
                f'WITH key "{stmt.key}" is not reserved, so it is passed to the ops as an '
                f'argument; did you mean "{close[0]}"?',
                stmt.pos,
            )
        elif not rule_execs:
            self.report(
                "unused-with",
                f"WITH {stmt.key} is an op argument, but this rule EXECs no op",
                stmt.pos,
            )


# --- what the checks know about paths and values ---------------------------------------------

# segments -> (the schema of their source when looked up, what it says): the same envelope
# paths recur in every file of a tree.
_LOOKUPS: dict[tuple[ast.Segment, ...], tuple[object, Lookup | None]] = {}
_MAX_LOOKUPS: Final = 10_000


def _schema_lookup(segments: tuple[ast.Segment, ...]) -> Lookup | None:
    """schema.lookup(segments), remembered while their source's schema stays the same."""
    from txcl.schema import lookup, section_schema

    if len(segments) < 2 or segments[0] != TXC or not isinstance(segments[1], str):
        return lookup(segments)
    known = _LOOKUPS.get(segments)
    if known is not None and section_schema(segments[1]) is known[0]:
        return known[1]
    found = lookup(segments)  # a SchemaError passes through, and is not remembered
    if len(_LOOKUPS) >= _MAX_LOOKUPS:
        _LOOKUPS.clear()
    _LOOKUPS[segments] = (section_schema(segments[1]), found)
    return found


def _read_only(segments: tuple[ast.Segment, ...]) -> str | None:
    """Why a rule may not write there. The envelope's source is not known before a run, so
    every `_txc.<x>` other than src, rid and route is taken as some source's namespace."""
    source = segments[1] if len(segments) > 1 and isinstance(segments[1], str) else None
    return read_only_reason(segments, source)


_NUMBERS: Final = frozenset({"integer", "number"})
_SLOT_KINDS: Final = frozenset({"object", "null"})


def _verdict_part(segments: tuple[ast.Segment, ...]) -> str | None:
    """Which part of a verdict `_txc.<src>.res...` a SET writes: "res", "code", "msg",
    "recipients" or "slot" (a slot's code and msg are "code" and "msg"); else None."""
    if len(segments) < 3 or segments[0] != TXC or segments[2] != RESULT_KEY:
        return None
    rest = segments[3:]
    if rest and rest[0] == "recipients" and len(rest) > 1:
        if not (isinstance(rest[1], int) or rest[1] == "*"):
            return None
        rest = rest[2:]
        if not rest:
            return "slot"
    elif rest == ("recipients",):
        return "recipients"
    if not rest:
        return "res"
    return rest[0] if len(rest) == 1 and rest[0] in ("code", "msg") else None


def _verdict_texts(
    segments: tuple[ast.Segment, ...], value: ast.Expr, kinds: frozenset[str]
) -> tuple[str, str, str]:
    """How a finding about a verdict SET names its target, its value and the value's kinds
    (made only for a finding: formatting the value is the costly part)."""
    shown = _expr_text(value)
    return _dotted(segments), shown, f"{shown} is {_kinds_text(kinds)}"


def _expr_text(node: ast.Expr) -> str:
    from txcl.fmt import format_expr

    text = format_expr(node)
    return text if len(text) <= 60 else text[:57] + "..."


def _verdict_slot(segments: tuple[ast.Segment, ...]) -> int | str | None:
    """ "all" for `_txc.<src>.res.code`, N for `_txc.<src>.res.recipients.N.code`, else None."""
    if len(segments) < 4 or segments[0] != TXC or segments[2] != RESULT_KEY:
        return None
    rest = segments[3:]
    if rest == ("code",):
        return "all"
    if (
        len(rest) == 3
        and rest[0] == "recipients"
        and isinstance(rest[1], int)
        and rest[2] == "code"
    ):
        return rest[1]
    return None


_MATCH_ROOT: Final = "match"  # `match.<name>`: a named group of the rule's regexes


def _literal_type(value: object) -> str:
    from txcl.schema import json_type

    return json_type(value)


def _kinds_text(kinds: frozenset[str]) -> str:
    shown = sorted(kinds - {"number"} if "integer" in kinds else kinds)
    text = " or ".join(shown) if len(shown) < 3 else "one of " + ", ".join(shown)
    return ("an " if text[0] in "aeiou" else "a ") + text if len(shown) < 3 else text


def _literal_text(value: str | int | float | bool | None) -> str:
    from txcl.fmt import format_expr

    return format_expr(ast.Literal(value, _NOWHERE))


def _dotted(segments: tuple[ast.Segment, ...]) -> str:
    return path_text(segments, at=True)


def _children(node: ast.Expr) -> tuple[ast.Expr, ...]:
    if isinstance(node, ast.And | ast.Or | ast.Compare | ast.Add):
        return node.left, node.right
    if isinstance(node, ast.Match):
        return (node.left,)
    if isinstance(node, ast.Not):
        return (node.operand,)
    if isinstance(node, ast.ListLit):
        return node.items
    if isinstance(node, ast.Call):
        return node.args
    return ()


def _reads_envelope(node: ast.Expr) -> bool:
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, ast.Path | ast.JsonPath):
            return True
        stack.extend(_children(current))
    return False


def _never_true(expr: ast.Expr) -> str | None:
    """Why `expr` can never be true, or None if it may be."""
    if isinstance(expr, ast.And):
        return _never_true(expr.left) or _never_true(expr.right)
    if isinstance(expr, ast.Or):
        left, right = _never_true(expr.left), _never_true(expr.right)
        return f"{left}, and {right}" if left and right else None
    if _reads_envelope(expr):
        return None
    from txcl.fmt import format_expr

    holds = _constant_holds(expr)
    if holds is False:
        if isinstance(expr, ast.Literal):
            return f"{format_expr(expr)} is a constant, and only true holds"
        return f"{format_expr(expr)} reads nothing from the envelope and is not true"
    return None


def _constant_holds(expr: ast.Expr) -> bool | None:
    """Whether an expression that reads no path holds; None if it does not compile."""
    from txcl.compiler import compile_rule

    problems: list[Problem] = []
    rule = ast.Rule((ast.When(expr, expr.pos),), (), expr.pos)
    compiled = compile_rule(rule, "<lint>", problems, texts=False)
    if problems:
        return None
    return compiled.test({}) is not None


def _stack_findings(files: Iterable[_FileLint]) -> list[Problem]:
    """The checks taken over a whole stack: recipient gaps and unwritten stack paths."""
    files = list(files)
    found = _recipient_gaps(v for f in files for v in f.verdicts)
    if any(f.execs for f in files):
        return found  # an op may write any path: what is never SET may still be there
    writes = {w for f in files for w in f.local_writes}
    texts: list[str] | None = None
    for read in (r for f in files for r in f.local_reads):
        if any(_covers(w, read.segments) for w in writes):
            continue
        if texts is None:
            texts = sorted({_dotted(w) for w in writes})
        close = difflib.get_close_matches(_dotted(read.segments), texts, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        message = (
            f"{_dotted(read.segments)} is read, but no rule of this stack SETs it: it is "
            f"always missing{hint}"
        )
        finding = _finding("unwritten-path", message, read.pos, None)
        found.append(replace(finding, context=read.context))
    return found


def _covers(written: tuple[ast.Segment, ...], read: tuple[ast.Segment, ...]) -> bool:
    """Whether a SET of `written` can give `read` a value (one is a prefix of the other)."""
    depth = min(len(written), len(read))
    return written[:depth] == read[:depth]


def _recipient_gaps(verdicts: Iterable[_Verdict]) -> list[Problem]:
    """Stack-wide: a recipient slot that is set while a lower one never is in the stack."""
    first: dict[int, _Verdict] = {}
    for verdict in sorted(verdicts, key=lambda v: v.pos):
        first.setdefault(verdict.index, verdict)
    problems = []
    for index, verdict in sorted(first.items()):
        missing = next((i for i in range(index) if i not in first), None)
        if missing is None:
            continue
        message = (
            f"recipients.{index}.code is set, but no rule of this stack sets "
            f"recipients.{missing}.code: recipient {missing} would get 550 "
            "(a slot is never inherited from another)"
        )
        finding = _finding("recipient-gap", message, verdict.pos, None)
        problems.append(replace(finding, context=verdict.context))
    return problems


# --- trees ----------------------------------------------------------------------------------


def lint_tree(
    root: str | Path, registry: OpRegistry | None = None, *, cache: CompileCache | None = None
) -> list[Problem]:
    """Lint a whole OPS tree: the loader's layout problems, then every rule file, with the
    recipient-slot check taken over each stack."""
    from txcl.loader import no_cyclic_gc

    root = Path(root)
    salt = _findings_salt(registry)
    # Like the load, the checks keep what they build, and the load's trees stay alive until
    # the end: a collection would only scan them again and again.
    with no_cyclic_gc():
        return _sorted(_lint_stacks_of(root, registry, cache, salt))


def _lint_stacks_of(
    root: Path, registry: OpRegistry | None, cache: CompileCache | None, salt: str
) -> list[Problem]:
    """lint_tree()'s findings. The stacks are loaded one by one and handed to _StackChecks
    as they are, so that its pool parses while the walk goes on. With a cache, a stack
    whose folder has the signature the cache's stat index knows (nothing in it changed)
    gets the findings kept there, its files unread; the others' findings are kept in the
    index under the signature taken before their files were read."""
    from txcl.loader import LazyStacks, Scan, load_tree, stack_signature

    index = None if cache is None else cache.stat_index(
        f"lint\0{os.path.abspath(root)}\0{root}", salt)
    entries = _walk_cache(cache)
    problems: list[Problem] = []
    # (name, signature, when it was taken, the stack's layout problems)
    loaded: list[tuple[str, StackSignature, int, list[Problem]]] = []
    # the folders of the stack being loaded, as its signature read them (the load's scan)
    scanned: dict[str, list[os.DirEntry[str]]] = {}
    with entries.deferring() as deferred:
        tree = load_tree(root, keep_files=True, cache=entries, check_only=True, lazy=True,
                         scan=Scan(scanned, time.time_ns()))
        problems.extend(_layout(tree.problems))
        stacks, read = tree.stacks, tree.read  # read: filled as each stack loads
        if not isinstance(stacks, LazyStacks):  # the root is no folder
            return problems
        names = list(stacks)
        with _StackChecks(registry, cache, salt, len(names)) as checks:
            for name in names:
                folder = os.path.join(root, name)
                taken_ns, signature = time.time_ns(), cast("StackSignature", ())
                if index is not None:  # its folders read once, for the signature and the load
                    scanned.clear()
                    signature = stack_signature(folder, into=scanned)
                    kept = index.get(name, signature)
                    if isinstance(kept, tuple):
                        problems.extend(kept)
                        continue
                before, missed = len(read), len(deferred)
                layout = _layout(stacks.load(name).problems)
                loaded.append((name, signature, taken_ns, layout))
                checks.add(_added(read, before), read, frozenset(deferred[missed:]))
            found = checks.findings()
    for (name, signature, taken_ns, layout), stack_found in zip(loaded, found, strict=True):
        if index is not None:
            index.put(name, signature, (*layout, *stack_found), taken_ns)
        problems.extend(layout)
        problems.extend(stack_found)
    return problems


def _added(read: Mapping[str, ReadFile], before: int) -> list[str]:
    """The paths the loader put into `read` (a dict: in order) since it held `before`: the
    rule files of the stack it loaded since."""
    assert isinstance(read, dict)
    return list(itertools.islice(reversed(read), len(read) - before))[::-1]


def lint_target(
    path: str | Path, registry: OpRegistry | None = None, *, cache: CompileCache | None = None
) -> list[Problem]:
    """Lint what a person points `txcl lint` at: a file, a stage, a stack or an OPS root."""
    from txcl.loader import RULE_SUFFIX, STAGE_NAME, load_target, no_cyclic_gc

    path = Path(path)
    if path.is_file():
        if not path.name.endswith(RULE_SUFFIX):
            return [_finding("layout", f"{path}: not a {RULE_SUFFIX} file", None, None)]
        return lint_file(path, registry)
    if not path.is_dir():
        return [_finding("layout", f"{path}: no such file or folder", None, None)]
    if STAGE_NAME.fullmatch(path.name):
        files = [str(p) for p in _rule_files(path, path)]
    elif _holds_stages(path):
        files = [str(p) for p in _stage_files(path, path)]
    else:
        return lint_tree(path, registry, cache=cache)
    salt = _findings_salt(registry)
    with no_cyclic_gc():
        layout, read, deferred = _load(
            lambda c: load_target(path, keep_files=True, cache=c, check_only=True), cache
        )
        (found,) = _lint_stacks([files], registry, read, deferred, cache, salt)
        problems = [*layout, *found]
        del read
    return _sorted(problems)


def _load(
    load: Callable[[CompileCache | None], Tree], cache: CompileCache | None
) -> tuple[list[Problem], Mapping[str, ReadFile], frozenset[str]]:
    """The layout problems of a check_only load, the rule files it read, and which of them
    are not in the cache: the load's walk parses nothing, and their entries are empty
    (_lint_stacks checks them). Without a cache, that is every file."""
    entries = _walk_cache(cache)
    with entries.deferring() as deferred:
        loaded = load(entries)
    return _layout(loaded.problems), loaded.read, frozenset(deferred)


def _walk_cache(cache: CompileCache | None) -> CompileCache:
    """What a lint's load walks with: the cache, or without one a stand-in that holds
    nothing (every file is then deferred to the checks)."""
    return cast("CompileCache", _NothingCached()) if cache is None else cache


def _layout(problems: Iterable[Problem]) -> list[Problem]:
    """The load problems among a load's (its parse and compile problems are found again
    with each file's findings), as lint findings."""
    return [_as_lint(p) for p in problems if p.code == "txcl_load_error"]


class _NothingCached:
    """The compile cache of a lint without one (--no-cache): lint calls deferring() and its
    walk calls get(), nothing else. It holds nothing, so the walk parses no file, and lint
    checks them all (by a pool when there are many) as it checks what a cache misses."""

    def __init__(self) -> None:
        self.deferred: list[str] = []

    @contextlib.contextmanager
    def deferring(self) -> Iterator[list[str]]:
        yield self.deferred

    def get(self, path: str, text: str) -> CachedFile:
        from txcl.compile_cache import CachedFile

        self.deferred.append(path)
        return CachedFile(None, ())


def _lint_stacks(
    stacks: list[list[str]],
    registry: OpRegistry | None,
    read: Mapping[str, ReadFile],
    deferred: frozenset[str],
    cache: CompileCache | None,
    salt: str,
) -> list[tuple[Problem, ...]]:
    """The findings of each stack (its rule files, by path), stack by stack (_StackChecks)."""
    with _StackChecks(registry, cache, salt, len(stacks)) as checks:
        for files in stacks:
            checks.add(files, read, deferred)
        return checks.findings()


# (path, text, entry) of a file of a stack to check: text None if the loader could not read
# it (lint reports nothing more of it), entry None if it is not in the cache.
_FileJob = tuple[str, "str | None", "CachedFile | None"]


class _StackChecks:
    """The findings of stacks added one by one, in order. A file the loader has read (`read`)
    is not read again; a stack whose findings are in the cache is not looked at again, nor
    is a file whose own findings are; the files not in the cache (`deferred`) are parsed,
    compiled and linted: here while they are few, else by a pool of forked processes,
    started once POOL_MIN_FILES are waiting, so that it parses while the caller walks on.
    findings() waits for them; what is found is kept in the cache."""

    def __init__(
        self, registry: OpRegistry | None, cache: CompileCache | None, salt: str, stacks: int
    ) -> None:
        self._registry, self._cache, self._salt = registry, cache, salt
        self._stacks = stacks  # how many may be added, at most: the pool's chunks are sized by it
        self._found_of: list[tuple[Problem, ...] | None] = []  # None: a job finds them
        self._keys: list[bytes | None] = []  # of each job: its stack's key in the cache
        self._jobs: list[list[_FileJob]] = []  # each job's files
        self._waiting: list[list[_FileJob]] = []  # jobs not given to the pool yet
        self._to_parse = 0
        self._pool: multiprocessing.pool.Pool | None = None
        self._workers: int | None = None  # None: not decided yet; 0: no pool
        self._chunk = 1
        # each task sent, with its jobs: checked here instead if a worker dies
        self._sent: list[tuple[multiprocessing.pool.AsyncResult[list[_Done]],
                               list[list[_FileJob]]]] = []
        self._worker_pids: set[int | None] = set()

    def __enter__(self) -> _StackChecks:
        return self

    def __exit__(self, *exc: object) -> None:
        global _pool_job
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None
            _pool_job = (None, "", False)

    def add(self, files: list[str], read: Mapping[str, ReadFile], deferred: Container[str]) -> None:
        from txcl.compile_cache import stack_key

        cache = self._cache
        known = [read.get(file) for file in files]
        key = None
        if cache is not None and all(k is not None for k in known):
            key = stack_key(((k.path, k.source) for k in known if k is not None), self._salt)
            cached = cache.get_findings(key)
            if cached is not None:
                self._found_of.append(tuple(cached))
                return
        self._found_of.append(None)
        job: list[_FileJob] = []
        for file, k in zip(files, known, strict=True):
            if k is None:
                job.append((file, None, None))
            elif file in deferred:
                job.append((file, k.source, None))
                self._to_parse += 1
            else:
                job.append((file, k.source, k.checked))
        self._keys.append(key)
        self._jobs.append(job)
        self._waiting.append(job)
        if self._workers is None and self._to_parse >= POOL_MIN_FILES:
            self._start_pool()
            if self._pool is not None:
                self._send(spread=True)
        elif self._pool is not None and len(self._waiting) >= self._chunk:
            self._send()

    def findings(self) -> list[tuple[Problem, ...]]:
        """Each added stack's findings, in order; the new entries are put into the cache."""
        if self._pool is not None:
            self._send(spread=True)
            done: Iterator[_Done] = self._pooled_done()
        else:
            done = self._checked_here(self._waiting)
        found_by_job: list[tuple[Problem, ...]] = []
        cache = self._cache
        for key, job, (entries, found) in zip(self._keys, self._jobs, done, strict=True):
            if cache is not None:
                for (path, text, _), entry in zip(job, entries, strict=True):
                    if isinstance(entry, bytes):
                        cache.put_encoded(path, text or "", entry)
                    elif entry is not None:
                        cache.put(path, text or "", entry)
                if key is not None:
                    cache.put_findings(key, found)
            found_by_job.append(found)
        by_job = iter(found_by_job)
        return [next(by_job) if found is None else found for found in self._found_of]

    def _start_pool(self) -> None:
        global _pool_job
        import multiprocessing

        self._workers = workers = pool_workers(self._to_parse)
        if not workers:
            return
        _pool_job = (self._registry, self._salt, self._cache is not None)  # inherited
        for stream in (sys.stdout, sys.stderr):  # a child flushes its copy of what is pending
            stream.flush()
        try:
            before = {child.pid for child in multiprocessing.active_children()}
            self._pool = multiprocessing.get_context("fork").Pool(workers, _quiet_worker)
            self._worker_pids = {c.pid for c in multiprocessing.active_children()} - before
        except OSError:  # no fork now (EAGAIN, ENOMEM): this process checks them all
            self._workers, _pool_job = 0, (None, "", False)
            return
        self._chunk = max(1, self._stacks // (workers * 16))

    def _send(self, spread: bool = False) -> None:
        """The waiting jobs to the pool, `_chunk` stacks a task. `spread`: those waiting when
        the pool starts, or the last: in smaller tasks if need be, so that every worker gets
        some (`_chunk` counts the stacks the stat index keeps too, which never come)."""
        assert self._pool is not None and self._workers
        waiting, chunk = self._waiting, self._chunk
        if spread:
            chunk = max(1, min(chunk, len(waiting) // (self._workers * 16)))
        for start in range(0, len(waiting), chunk):
            jobs = waiting[start:start + chunk]
            self._sent.append((self._pool.apply_async(_pooled_stacks, (jobs,)), jobs))
        self._waiting = []

    def _pooled_done(self) -> Iterator[_Done]:
        """What the pool found, task by task. A worker that died (the OOM killer, a
        signal) took its task with it and the pool would wait for it for ever: from then
        on, what the pool has not answered is checked here."""
        import multiprocessing

        lost = False
        for result, jobs in self._sent:
            while not lost and not result.ready():
                result.wait(_WORKER_CHECK_S)
                alive = {child.pid for child in multiprocessing.active_children()}
                lost = not self._worker_pids <= alive
                if lost:
                    log.warning("txcl lint: a worker process ended early; "
                                "the stacks it had not answered are checked here")
            if result.ready() and result.successful():
                yield from result.get()
            else:
                yield from self._checked_here(jobs)

    def _checked_here(self, jobs: list[list[_FileJob]]) -> Iterator[_Done]:
        keep = self._cache is not None
        for job in jobs:
            entries, found = _check_stack(job, self._registry, self._salt, keep)
            new: list[CachedFile | bytes | None] = list(entries)
            yield new, found


def _check_stack(
    files: list[_FileJob], registry: OpRegistry | None, salt: str, keep: bool = True
) -> tuple[list[CachedFile | None], tuple[Problem, ...]]:
    """A stack's findings, and each file's new cache entry (None: as it was, or not `keep`:
    there is no cache), kept without its syntax tree: what lint needs again is the
    findings."""
    from txcl.compile_cache import CachedFile

    problems: list[Problem] = []
    linted: list[_FileLint] = []
    entries: list[CachedFile | None] = []
    for path, text, checked in files:
        entry = None
        if text is None:
            found = _lint_path(Path(path), registry)
        elif checked is None:
            tree, parse_problems, found = _check_text(text, path, registry)
            if keep:
                entry = CachedFile(tree, parse_problems).with_findings(salt, found).without_tree()
        elif (cached := checked.findings) and cached[0] == salt and isinstance(
            cached[1], _FileLint
        ):
            found = cached[1]
        else:
            found = _lint_parsed(text, path, checked.file, checked.problems, registry)
            if keep:
                entry = checked.with_findings(salt, found).without_tree()
        problems.extend(p for p in found.problems if p.check != "layout")
        linted.append(found)
        entries.append(entry)
    problems.extend(_stack_findings(linted))
    return entries, tuple(problems)


# --- checking many files at once ------------------------------------------------------------

# Fewer files to parse than this are parsed in this process: a pool costs its start.
POOL_MIN_FILES: Final = 200
# How often a wait for the pool looks whether its workers are all still there.
_WORKER_CHECK_S: Final = 0.5
_POOL_MAX_WORKERS: Final = 8
# what the workers check against, and whether they send entries back for a cache
_pool_job: tuple[OpRegistry | None, str, bool] = (None, "", False)

_Done = tuple[list["CachedFile | bytes | None"], tuple[Problem, ...]]


def _quiet_worker() -> None:
    """A worker leaves Ctrl-C to the parent, which stops the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pooled_stacks(jobs: list[list[_FileJob]]) -> list[_Done]:
    """In a pool worker: _check_stack() of each job, its new entries encoded for the trip
    back."""
    from txcl.compile_cache import encode_entry

    done: list[_Done] = []
    for files in jobs:
        entries, found = _check_stack(files, *_pool_job)
        done.append(([None if e is None else encode_entry(e) for e in entries], found))
    return done


def pool_workers(files: int) -> int:
    """How many processes parse `files` files: none (this one does) for a few files, on one
    core, or where forking is not safe (another thread runs, or no fork)."""
    import multiprocessing
    import threading

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    if (
        files < POOL_MIN_FILES
        or cores < 2
        or threading.active_count() > 1
        or "fork" not in multiprocessing.get_all_start_methods()
    ):
        return 0
    return min(cores, _POOL_MAX_WORKERS)


def _findings_salt(registry: OpRegistry | None) -> str:
    """What cached findings depend on besides the files and the engine: the ops known and
    the installed schemas (the engine key does not cover a source's schema file)."""
    from txcl.schema import schemas_digest

    ops = "" if registry is None else ",".join(sorted(registry.names()))
    return f"{ops}|{schemas_digest()}"


def _inside(root: Path, entry: os.DirEntry[str]) -> bool:
    """False for a symlink that loops or leads out of root (the loader reports those). The walk only
    descends into entries found inside, so an entry that is no symlink is inside too."""
    if not entry.is_symlink():
        return True
    return inputs.symlink_problem(entry.path, root, os.path.realpath(root)) is None


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    """The folder's entries in byte-wise name order (none if it cannot be read)."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: os.fsencode(e.name))
    except OSError:
        return []


def _subfolders(folder: Path, root: Path, pattern: re.Pattern[str]) -> list[Path]:
    return [
        Path(e.path)
        for e in _entries(folder)
        if pattern.fullmatch(e.name) and _inside(root, e) and e.is_dir()
    ]


def _rule_files(stage: Path, root: Path) -> Iterator[Path]:
    from txcl.loader import RULE_SUFFIX

    for entry in _entries(stage):
        if entry.name.endswith(RULE_SUFFIX) and _inside(root, entry) and entry.is_file():
            yield Path(entry.path)


def _stage_files(stack: Path, root: Path) -> Iterator[Path]:
    from txcl.loader import STAGE_NAME

    for stage in sorted(_subfolders(stack, root, STAGE_NAME), key=lambda p: int(p.name)):
        yield from _rule_files(stage, root)


def _holds_stages(folder: Path) -> bool:
    from txcl.loader import STAGE_NAME, TESTS_DIR

    try:
        with os.scandir(folder) as it:  # an entry knows if it is a folder: no stat per entry
            return any(
                (e.name == TESTS_DIR or STAGE_NAME.fullmatch(e.name)) and e.is_dir() for e in it
            )
    except OSError:
        return False
