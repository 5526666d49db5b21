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
| verdict-code     | error    | a literal verdict code outside 200-299 and 400-599             |
| recipient-gap    | warning  | recipients.N.code set in a stack that never sets a slot below N |
| never-fires      | warning  | a WHEN that can never be true                                  |
| unknown-with-key | warning  | a WITH key that looks like a misspelt reserved key             |
| unused-with      | warning  | an op argument in a rule that EXECs no op                      |
| empty-file       | warning  | a rule file without rules                                      |

Rendering (text, JSON, GitHub annotations) belongs to the CLI.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final

from txcl import ast, inputs
from txcl.envelope import (
    RESULT_KEY,
    STACK_NAME,
    TENANT_NAME,
    TXC,
    path_text,
    read_only_reason,
    valid_code,
)
from txcl.errors import Pos, Problem, TxclError, TxclLoadError, TxclSyntaxError
from txcl.parser import caret_context, parse

if TYPE_CHECKING:
    from txcl.compile_cache import CompileCache
    from txcl.loader import ReadFile
    from txcl.ops import OpRegistry

__all__ = ["CHECKS", "LINT_CODE", "lint_file", "lint_source", "lint_target", "lint_tree"]

LINT_CODE: Final = "txcl_lint_error"
LINT_WARNING_CODE: Final = "txcl_lint_warning"

CHECKS: Final[dict[str, str]] = {
    "syntax": "error",
    "compile": "error",
    "layout": "error",
    "unknown-op": "error",
    "read-only-write": "error",
    "verdict-code": "error",
    "recipient-gap": "warning",
    "never-fires": "warning",
    "unknown-with-key": "warning",
    "unused-with": "warning",
    "empty-file": "warning",
}

# The phase a problem of another module came from -> the lint check it is reported under.
_CHECK_OF_CODE: Final = {
    "txcl_parse_error": "syntax",
    "txcl_compile_error": "compile",
    "txcl_load_error": "layout",
}

_OP_SCHEME: Final = "op://"
_NOWHERE: Final = Pos("", 0, 0)


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
    """A SET of `_txc.<src>.res.recipients.<index>.code`, for the stack-wide gap check."""

    index: int
    pos: Pos
    context: str


@dataclass(frozen=True)
class _FileLint:
    problems: tuple[Problem, ...]
    verdicts: tuple[_Verdict, ...]


def _lines(source: str) -> list[str]:
    return [line.removesuffix("\r") for line in source.split("\n")]


def _lint_text(source: str, name: str, registry: OpRegistry | None) -> _FileLint:
    try:
        tree = parse(source, name)
    except TxclSyntaxError as err:
        return _lint_parsed(source, name, None, err.problems, registry)
    from txcl.compiler import compile_file  # the compiler pulls in RE2 and the ops' helpers

    try:
        compile_file(tree)
    except TxclError as err:
        return _lint_parsed(source, name, tree, err.problems, registry)
    return _lint_parsed(source, name, tree, (), registry)


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
    return _FileLint(tuple(problems), tuple(checker.verdicts))


def lint_source(source: str, name: str, registry: OpRegistry | None = None) -> list[Problem]:
    """Lint the text of one rule file; the file is taken as a stack of its own."""
    found = _lint_text(source, name, registry)
    return _sorted([*found.problems, *_recipient_gaps(found.verdicts)])


def lint_file(path: str | Path, registry: OpRegistry | None = None) -> list[Problem]:
    """Lint one `.txcl` file; the file is taken as a stack of its own."""
    found = _lint_path(Path(path), registry)
    return _sorted([*found.problems, *_recipient_gaps(found.verdicts)])


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
        self.op_names = registry.names() if registry is not None else None
        self.problems: list[Problem] = []
        self.verdicts: list[_Verdict] = []

    def report(self, check: str, message: str, pos: Pos) -> None:
        self.problems.append(_finding(check, message, pos, self.lines))

    def rule(self, rule: ast.Rule) -> None:
        for when in rule.whens:
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
                self.set(stmt)
            elif isinstance(stmt, ast.Exec):
                self.exec(stmt)
            elif isinstance(stmt, ast.With):
                self.with_(stmt, bool(execs))

    def set(self, stmt: ast.Set) -> None:
        segments = stmt.target.segments
        reason = _read_only(segments)
        if reason:
            self.report("read-only-write", f"SET {_dotted(segments)}: {reason}", stmt.target.pos)
            return
        slot = _verdict_slot(segments)
        if slot is None:
            return
        if isinstance(stmt.value, ast.Literal) and not valid_code(stmt.value.value):
            self.report(
                "verdict-code",
                f"SET {_dotted(segments)} = {_literal_text(stmt.value.value)}: a verdict code is "
                "an integer in 200-299 or 400-599; anything else fails the run (451)",
                stmt.value.pos,
            )
        if isinstance(slot, int):
            pos = stmt.target.pos
            context = caret_context(self.lines[pos.line - 1], pos.column)
            self.verdicts.append(_Verdict(slot, pos, context))

    def exec(self, stmt: ast.Exec) -> None:
        if self.op_names is None or not stmt.uri.startswith(_OP_SCHEME):
            return  # without a registry nothing is known; a bad URI is a compile problem
        name = stmt.uri[len(_OP_SCHEME) :]
        if name in self.op_names:
            return
        close = difflib.get_close_matches(name, sorted(self.op_names), n=1)
        hint = f'; did you mean "op://{close[0]}"?' if close else ""
        known = ", ".join(sorted(self.op_names)) or "none"
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


def _read_only(segments: tuple[ast.Segment, ...]) -> str | None:
    """Why a rule may not write there. The envelope's source is not known before a run, so
    every `_txc.<x>` other than src, rid and route is taken as some source's namespace."""
    source = segments[1] if len(segments) > 1 and isinstance(segments[1], str) else None
    return read_only_reason(segments, source)


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


def _literal_text(value: str | int | float | bool | None) -> str:
    from txcl.fmt import format_expr

    return format_expr(ast.Literal(value, _NOWHERE))


def _dotted(segments: tuple[ast.Segment, ...]) -> str:
    return path_text(segments, at=True)


def _children(node: ast.Expr) -> Iterator[ast.Expr]:
    if isinstance(node, ast.And | ast.Or | ast.Compare | ast.Add):
        yield node.left
        yield node.right
    elif isinstance(node, ast.Match):
        yield node.left
    elif isinstance(node, ast.Not):
        yield node.operand
    elif isinstance(node, ast.ListLit):
        yield from node.items
    elif isinstance(node, ast.Call):
        yield from node.args


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
    compiled = compile_rule(rule, "<lint>", problems)
    if problems:
        return None
    return compiled.test({}) is not None


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
    from txcl.loader import load_tree, no_cyclic_gc

    root = Path(root)
    # Like the load, the checks keep what they build, and the load's trees stay alive until
    # the end: a collection would only scan them again and again.
    with no_cyclic_gc():
        loaded = load_tree(root, keep_files=True, cache=cache, check_only=True)
        problems = [_as_lint(p) for p in loaded.problems if p.code == "txcl_load_error"]
        for stack_files in _stacks(root):
            problems.extend(_lint_stack(stack_files, registry, loaded.read, cache))
        del loaded  # freed before the collector is back, so it has nothing to scan
    return _sorted(problems)


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
        files = list(_rule_files(path, path))
    elif _holds_stages(path):
        files = list(_stage_files(path, path))
    else:
        return lint_tree(path, registry, cache=cache)
    with no_cyclic_gc():
        loaded = load_target(path, keep_files=True, cache=cache, check_only=True)
        layout = [_as_lint(p) for p in loaded.problems if p.code == "txcl_load_error"]
        problems = [*layout, *_lint_stack(files, registry, loaded.read, cache)]
        del loaded
    return _sorted(problems)


def _lint_stack(
    files: list[Path],
    registry: OpRegistry | None,
    read: Mapping[str, ReadFile],
    cache: CompileCache | None = None,
) -> list[Problem]:
    """The files' findings; a file the loader has read (`read`, by path) is not read again,
    and one whose findings are in the cache is not looked at again."""
    problems: list[Problem] = []
    verdicts: list[_Verdict] = []
    ops = "" if registry is None else ",".join(sorted(registry.names()))
    for file in files:
        known = read.get(str(file))
        if known is None:
            found = _lint_path(file, registry)
        elif (cached := known.checked.findings) and cached[0] == ops and isinstance(
            cached[1], _FileLint
        ):
            found = cached[1]
        else:
            found = _lint_parsed(known.source, known.path, known.file, known.problems, registry)
            if cache is not None:
                cache.put(known.path, known.source, known.checked.with_findings(ops, found))
        problems.extend(p for p in found.problems if p.check != "layout")
        verdicts.extend(found.verdicts)
    return [*problems, *_recipient_gaps(verdicts)]


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
        return any(
            e.is_dir() and (e.name == TESTS_DIR or STAGE_NAME.fullmatch(e.name))
            for e in folder.iterdir()
        )
    except OSError:
        return False


def _stacks(root: Path) -> Iterator[list[Path]]:
    """The rule files of every well-named stack of an OPS tree, one list per stack."""
    for tenant in _subfolders(root, root, TENANT_NAME):
        for stack in _subfolders(tenant, root, STACK_NAME):
            yield list(_stage_files(stack, root))
