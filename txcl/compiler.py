"""ast.File -> CompiledRule closures: a predicate per WHEN, a step per SET and EXEC.

Everything that can be decided without an envelope is decided here, once, at load time:
paths, JSONPaths and regexes are compiled, functions and their arity checked, reserved
WITH keys validated. `compile_file` reports every problem of a file at once.

An expression compiles to `Eval = (envelope, match) -> value`. `match` holds the named
groups of the rule's WHEN matches: regexes with named groups write into it while the WHENs
are evaluated, and `match.<name>` reads it in the body.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final

from txcl import ast
from txcl.envelope import parse_duration, parse_path, path_text, split_path_list
from txcl.errors import Pos, Problem, TxclCompileError
from txcl.fmt import format_expr
from txcl.functions import FUNCTIONS
from txcl.paths import (
    Getter,
    MultiGetter,
    Setter,
    compile_getter,
    compile_jsonpath,
    compile_setter,
)
from txcl.regex import CompiledRegex, compile_regex
from txcl.values import COMPARISONS, MISSING, add, to_json

Eval = Callable[[Any, Any], Any]  # (envelope, match) -> value
Captures = Mapping[str, str]

NO_CAPTURES: Final[Captures] = MappingProxyType({})
MATCH_ROOT: Final = "match"
# `@lmtp.rcpt.*` in a WHEN binds the indices whose item holds; a SET target with `*` writes
# at each of them. The bound indices travel with the captures under this key.
WILDCARD: Final = "*"
BOUND: Final = "\0bound"
_ITEM: Final = "\0item"
OP_SCHEME: Final = "op://"
MAX_TIMEOUT_S: Final = 3600.0

_OP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_NOWHERE: Final = Pos("", 0, 0)


@dataclass(frozen=True, slots=True)
class CompiledWhen:
    text: str  # the expression in canonical form, for traces and `txcl test`
    pos: Pos
    evaluate: Eval = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class SetStep:
    pos: Pos
    target: tuple[ast.Segment, ...]
    target_text: str
    value: Eval = field(repr=False, compare=False)
    write: Setter = field(repr=False, compare=False)
    read: Getter = field(repr=False, compare=False)  # the target's current value
    # The value when it is a scalar literal (`SET flags.x = true`), else MISSING: the
    # runner builds the record of such a write once.
    constant: Any = MISSING
    wildcard: bool = False  # the target has a `*`: written at each index the WHENs bound
    # index -> this step at that index, built on first use (compiled once per index)
    bound: dict[int, SetStep] = field(default_factory=dict, repr=False, compare=False)

    def at(self, index: int) -> SetStep:
        """This wildcard step with its `*` replaced by `index`."""
        step = self.bound.get(index)
        if step is None:
            step = self.bound[index] = _bound_step(self, index)
        return step


@dataclass(frozen=True, slots=True)
class ExecStep:
    pos: Pos
    uri: str
    op: str


Step = SetStep | ExecStep


@dataclass(frozen=True, slots=True)
class CompiledRule:
    file: str
    pos: Pos
    whens: tuple[CompiledWhen, ...]
    steps: tuple[Step, ...]  # SET and EXEC lines in source order
    args: tuple[tuple[str, Eval], ...]  # WITH keys that are not reserved: op arguments
    omit: frozenset[str]  # full dotted paths, for the trace writer
    redact: frozenset[str]
    timeout_s: float | None  # WITH timeout, in seconds
    ops: tuple[str, ...]  # op names this rule EXECs, in order of first use
    reads: frozenset[tuple[ast.Segment, ...]]  # plain paths read (WHEN, SET values, WITH)
    jsonpaths: frozenset[str]  # JSONPaths read
    writes: frozenset[tuple[ast.Segment, ...]]  # SET targets
    captures: tuple[str, ...]  # named groups the WHENs can capture (match.<name>)
    test: Callable[[Any], Captures | None] = field(repr=False, compare=False)

    def evaluate_args(self, envelope: Any, match: Captures) -> dict[str, Any]:
        """The op arguments on the live envelope; an argument whose value is missing is left out."""
        out: dict[str, Any] = {}
        for key, value in self.args:
            result = value(envelope, match)
            if result is not MISSING:
                out[key] = to_json(result)
        return out


# --- canonical text of an expression ------------------------------------------------------


def segments_text(segments: tuple[ast.Segment, ...]) -> str:
    """A path as a rule author writes it: `@lmtp.rcpt.0` for `_txc.lmtp.rcpt.0` (fmt's form)."""
    return path_text(segments, at=True)


def expr_text(expr: ast.Expr) -> str:
    """The expression in canonical TXCL form (upper-case keywords, minimal parentheses):
    what `txcl fmt` prints."""
    return format_expr(expr)


# --- reserved WITH values -------------------------------------------------------------------


def parse_timeout(value: object) -> float | None:
    """Seconds from `5`, `2.5`, `"5s"`, `"500ms"`, `"1m"`, `"5"`; None if it is not a valid timeout."""
    seconds: float | None
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_duration(value)
    else:
        return None
    if seconds is None:
        return None
    if not 0 < seconds <= MAX_TIMEOUT_S:
        return None
    return seconds


_BRACKET_STEP: Final = re.compile(r"\[(\*|[0-9]+)\]")


def parse_path_list(text: str) -> tuple[str, ...] | None:
    """`"_txc.a.b, @c.d"` -> ("_txc.a.b", "_txc.c.d"), each in its full text form; None if
    an item is not a path (`*` stands for any key or index; `[*]` and `[0]` step into lists)."""
    out = []
    for item in split_path_list(text):
        # `attachments[*].content`, `rcpt[0]`: list steps written as in JSONPath
        segments = parse_path(_BRACKET_STEP.sub(r".\1", item), wildcards=True)
        if segments is None:
            return None
        out.append(path_text(segments))
    return tuple(out) if out else None


# --- the compiler ----------------------------------------------------------------------------


def _constant(value: Any) -> Eval:
    if isinstance(value, list):
        return lambda envelope, match: list(value)
    return lambda envelope, match: value


class _RuleCompiler:
    """Compiles the expressions of one rule, collecting problems instead of stopping."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        self.reads: set[tuple[ast.Segment, ...]] = set()
        self.jsonpaths: set[str] = set()
        self.captures: set[str] = set()
        self.binds = False  # a WHEN binds `*`

    def problem(self, message: str, pos: Pos) -> Eval:
        self.problems.append(Problem("txcl_compile_error", message, pos))
        return _constant(MISSING)

    def expr(self, node: ast.Expr) -> Eval:
        method = getattr(self, "_" + type(node).__name__.lower(), None)
        if method is None:
            return self.problem(f"not an expression: {type(node).__name__}", _pos_of(node))
        result: Eval = method(node)
        return result

    def _path(self, node: ast.Path) -> Eval:
        segments = node.segments
        if not segments:
            return self.problem("empty path", node.pos)
        if WILDCARD in segments:
            return self.problem(
                f"{segments_text(segments)}: a `*` segment binds list indices only on the left "
                "of a comparison or =~ in a WHEN (`WHEN @lmtp.rcpt.* =~ /^billing@/`), and is "
                "reused by a SET target (`SET @lmtp.res.recipients.*.code = 250`)",
                node.pos,
            )
        if segments[0] == MATCH_ROOT:
            return _capture_reader(segments)
        self.reads.add(segments)
        return compile_getter(node)

    def _jsonpath(self, node: ast.JsonPath) -> Eval:
        get_all = _jsonpath_getter(node.text)
        if isinstance(get_all, tuple):
            self.problems.extend(replace(p, pos=node.pos) for p in get_all)
            return _constant(MISSING)
        self.jsonpaths.add(node.text)
        return lambda envelope, match: get_all(envelope)

    def _literal(self, node: ast.Literal) -> Eval:
        return _constant(node.value)

    def _listlit(self, node: ast.ListLit) -> Eval:
        if all(isinstance(item, ast.Literal) for item in node.items):
            return _constant([item.value for item in node.items if isinstance(item, ast.Literal)])
        items = tuple(self.expr(item) for item in node.items)

        def build(envelope: Any, match: Any) -> list[Any]:
            values = (item(envelope, match) for item in items)
            return [to_json(v) for v in values if v is not MISSING]

        return build

    def _regex(self, node: ast.Regex) -> Eval:
        return self.problem(
            f"a regex ({expr_text(node)}) can only stand on the right of =~ or !=~", node.pos
        )

    def _call(self, node: ast.Call) -> Eval:
        function = FUNCTIONS.get(node.name.lower())
        if function is None:
            known = ", ".join(sorted(FUNCTIONS))
            return self.problem(f"unknown function {node.name}(); known: {known}", node.pos)
        if len(node.args) != 1:
            return self.problem(
                f"{function.name}() takes exactly one argument, {len(node.args)} given", node.pos
            )
        (arg,) = node.args
        if function.path_argument and not isinstance(arg, ast.Path | ast.JsonPath):
            return self.problem(
                f"{function.name}() takes a path (such as @lmtp.rcpt or $..type), "
                f"not {expr_text(arg)}",
                _pos_of(arg),
            )
        value = self.expr(arg)
        apply = function.apply
        return lambda envelope, match: apply(value(envelope, match))

    def _wildcard(self, node: ast.Compare | ast.Match) -> Eval | None:
        """`node` with a `*` path on its left: true when it holds for some index of the list,
        binding those indices (with those bound by the rule's other WHENs: both must hold)."""
        left = node.left
        if not isinstance(left, ast.Path) or WILDCARD not in left.segments:
            return None
        segments = left.segments
        if segments.count(WILDCARD) > 1:
            return self.problem(f"{segments_text(segments)}: one `*` per path", left.pos)
        cut = segments.index(WILDCARD)
        if cut == 0:
            return self.problem(f"{segments_text(segments)}: `*` needs a list before it", left.pos)
        prefix, suffix = segments[:cut], segments[cut + 1 :]
        self.reads.add(prefix)
        self.binds = True
        get_list = compile_getter(ast.Path(prefix, left.pos))
        get_item = compile_getter(ast.Path(suffix, left.pos)) if suffix else None
        inner = self.expr(replace(node, left=ast.Path((MATCH_ROOT, _ITEM), left.pos)))

        def bound(envelope: Any, match: Any) -> bool:
            items = get_list(envelope)
            if not isinstance(items, list):
                return False
            before = match.get(BOUND)
            hits = []
            for index, item in enumerate(items):
                if before is not None and index not in before:
                    continue
                value = item if get_item is None else get_item(item)
                if inner(envelope, {_ITEM: value}) is True:
                    hits.append(index)
            if not hits:
                return False
            if isinstance(match, dict):
                match[BOUND] = tuple(hits)
            return True

        return bound

    def _compare(self, node: ast.Compare) -> Eval:
        bound = self._wildcard(node)
        if bound is not None:
            return bound
        op = node.op.upper()
        compare = COMPARISONS.get(op)
        if compare is None:
            return self.problem(f"unknown comparison {node.op}", node.pos)
        left = self.expr(node.left)
        if isinstance(node.right, ast.Literal):
            return _compare_constant(op, compare, left, node.right.value)
        if (
            op in ("IN", "NOT IN")
            and isinstance(node.right, ast.ListLit)
            and all(isinstance(item, ast.Literal) for item in node.right.items)
        ):
            items = tuple(item.value for item in node.right.items if isinstance(item, ast.Literal))
            return _member_of_constants(compare, left, items, op == "NOT IN")
        right = self.expr(node.right)
        return lambda envelope, match: compare(left(envelope, match), right(envelope, match))

    def _match(self, node: ast.Match) -> Eval:
        bound = self._wildcard(node)
        if bound is not None:
            return bound
        left = self.expr(node.left)
        try:
            regex = compile_regex(node.regex)
        except TxclCompileError as err:
            self.problems.extend(err.problems)
            return _constant(False)
        if node.negated:
            found = _searcher(left, regex)
            return lambda envelope, match: not found(envelope, match)
        if regex.group_names:
            self.captures.update(regex.group_names)
            return _capturer(left, regex)
        return _searcher(left, regex)

    def _and(self, node: ast.And) -> Eval:
        left, right = self.expr(node.left), self.expr(node.right)
        return lambda envelope, match: (
            left(envelope, match) is True and right(envelope, match) is True
        )

    def _or(self, node: ast.Or) -> Eval:
        left, right = self.expr(node.left), self.expr(node.right)
        return lambda envelope, match: (
            left(envelope, match) is True or right(envelope, match) is True
        )

    def _not(self, node: ast.Not) -> Eval:
        operand = self.expr(node.operand)
        return lambda envelope, match: operand(envelope, match) is not True

    def _add(self, node: ast.Add) -> Eval:
        left, right = self.expr(node.left), self.expr(node.right)
        return lambda envelope, match: add(left(envelope, match), right(envelope, match))


@functools.lru_cache(maxsize=4096)
def _jsonpath_getter(text: str) -> MultiGetter | tuple[Problem, ...]:
    """compile_jsonpath of a JSONPath text, or its problems (positioned nowhere): the work
    (jsonpath-ng's parse, a walk of its tree) depends on the text alone, and the same paths
    recur across the files of a tree. The getter is pure, so rules may share it."""
    try:
        return compile_jsonpath(ast.JsonPath(text, _NOWHERE))
    except TxclCompileError as err:
        return err.problems


def _scalar_literal(node: ast.Expr) -> Any:
    """The value of a literal that is not a list (writing it needs no copy), else MISSING."""
    if isinstance(node, ast.Literal) and not isinstance(node.value, list):
        return node.value
    return MISSING


def _pos_of(node: object) -> Pos:
    pos = getattr(node, "pos", None)
    return pos if isinstance(pos, Pos) else Pos("", 0, 0)


_ORDERINGS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _compare_constant(
    op: str, compare: Callable[[Any, Any], bool], left: Eval, constant: Any
) -> Eval:
    """`left <op> constant`, with the common cases answered before the general rule:
    a string against a string constant, a number against a number constant (bool is
    neither: its class is not str, int or float)."""
    kind = constant.__class__
    if op in ("==", "!=") and kind in (str, int, float):
        equal_kinds = (int, float) if kind is not str else (str,)
        negate = op == "!="

        def equality(envelope: Any, match: Any) -> bool:
            value = left(envelope, match)
            if value.__class__ in equal_kinds:
                return (value == constant) is not negate
            return compare(value, constant)

        return equality
    order = _ORDERINGS.get(op)
    if order is not None and kind in (int, float):

        def ordering(envelope: Any, match: Any) -> bool:
            value = left(envelope, match)
            if value.__class__ is int or value.__class__ is float:
                return order(value, constant)
            return compare(value, constant)

        return ordering
    return lambda envelope, match: compare(left(envelope, match), constant)


def _member_of_constants(
    compare: Callable[[Any, Any], bool], left: Eval, items: tuple[Any, ...], negated: bool
) -> Eval:
    """`left IN [constants]` (or NOT IN): a string is looked up in a set of the list's strings
    (a string equals nothing else); anything else takes the general rule."""
    strings = frozenset(item for item in items if item.__class__ is str)
    as_list = list(items)

    def member(envelope: Any, match: Any) -> bool:
        value = left(envelope, match)
        if value.__class__ is str:
            return (value in strings) is not negated
        return compare(value, as_list)

    return member


def _capture_reader(segments: tuple[ast.Segment, ...]) -> Eval:
    if len(segments) == 1:
        return lambda envelope, match: dict(match)
    if len(segments) > 2:
        return lambda envelope, match: MISSING  # a capture is a string: nothing lies below it
    name = segments[1]
    return lambda envelope, match: match.get(name, MISSING)


def _searcher(left: Eval, regex: CompiledRegex) -> Eval:
    search = regex.search

    def found(envelope: Any, match: Any) -> bool:
        value = left(envelope, match)
        if value.__class__ is str:
            return search(value)
        if isinstance(value, list | tuple):
            for item in value:
                if item.__class__ is str and search(item):
                    return True
        return False

    return found


def _capturer(left: Eval, regex: CompiledRegex) -> Eval:
    groups = regex.groups

    def found(envelope: Any, match: Any) -> bool:
        value = left(envelope, match)
        items = value if isinstance(value, list | tuple) else (value,)
        for item in items:
            if item.__class__ is str:
                captured = groups(item)
                if captured is not None:
                    match.update(captured)
                    return True
        return False

    return found


def _rule_test(whens: tuple[CompiledWhen, ...], captures: bool) -> Callable[[Any], Captures | None]:
    evals = tuple(w.evaluate for w in whens)
    if not evals:
        return lambda envelope: NO_CAPTURES
    if captures:

        def test_capturing(envelope: Any) -> Captures | None:
            found: dict[str, str] = {}
            for evaluate in evals:
                if evaluate(envelope, found) is not True:
                    return None
            return found

        return test_capturing
    if len(evals) == 1:
        only = evals[0]
        return lambda envelope: NO_CAPTURES if only(envelope, NO_CAPTURES) is True else None

    def test(envelope: Any) -> Captures | None:
        for evaluate in evals:
            if evaluate(envelope, NO_CAPTURES) is not True:
                return None
        return NO_CAPTURES

    return test


def noting_test(
    whens: tuple[CompiledWhen, ...],
) -> Callable[[Any, list[int | None]], Captures | None] | None:
    """A rule's test (as `_rule_test` makes it) that also appends to a list where it stopped:
    the index of the first WHEN that did not hold, None when all held (for txcl.explain).
    None for one WHEN or none: the test's outcome says where it stopped."""
    if len(whens) <= 1:
        return None
    evals = tuple(enumerate(w.evaluate for w in whens))

    def test_each(envelope: Any, noted: list[int | None]) -> Captures | None:
        found: dict[str, Any] = {}
        for index, evaluate in evals:
            if evaluate(envelope, found) is not True:
                noted.append(index)
                return None
        noted.append(None)
        return found or NO_CAPTURES

    return test_each


def _exec_op(node: ast.Exec, problems: list[Problem]) -> str | None:
    if not node.uri.startswith(OP_SCHEME):
        problems.append(
            Problem(
                "txcl_compile_error",
                f'EXEC "{node.uri}": only op:// URIs are supported (e.g. "op://ARCHIVE")',
                node.pos,
            )
        )
        return None
    name = node.uri[len(OP_SCHEME) :]
    if not _OP_NAME.fullmatch(name):
        problems.append(
            Problem(
                "txcl_compile_error",
                f'EXEC "{node.uri}": an op name is letters, digits, "_", "." and "-"',
                node.pos,
            )
        )
        return None
    return name


def _no_text(_: object) -> str:
    return ""


def compile_rule(
    rule: ast.Rule, file: str, problems: list[Problem], *, texts: bool = True
) -> CompiledRule:
    """Compile one rule, appending its problems to `problems`. Without `texts`, the WHEN and
    SET texts (what traces and `txcl test` show) are left empty: for a caller that wants
    the problems only."""
    rc = _RuleCompiler(problems)
    when_text = expr_text if texts else _no_text
    whens = tuple(CompiledWhen(when_text(w.expr), w.pos, rc.expr(w.expr)) for w in rule.whens)
    body = _Body(rc, path_text if texts else _no_text)
    body.compile(rule)
    captures = tuple(sorted(rc.captures))
    return CompiledRule(
        file=file,
        pos=rule.pos,
        whens=whens,
        steps=tuple(body.steps),
        args=tuple(body.args),
        omit=frozenset(body.omit),
        redact=frozenset(body.redact),
        timeout_s=body.timeout_s,
        ops=tuple(body.ops),
        reads=frozenset(rc.reads),
        jsonpaths=frozenset(rc.jsonpaths),
        writes=frozenset(body.writes),
        captures=captures,
        test=_rule_test(whens, bool(captures) or rc.binds),
    )


def _check_rule(rule: ast.Rule, problems: list[Problem]) -> None:
    """compile_rule's problems, without building what only a run uses (the steps, the rule)."""
    rc = _RuleCompiler(problems)
    for when in rule.whens:
        rc.expr(when.expr)
    _Body(rc, None).compile(rule)


class _Body:
    """Compiles the SET, EXEC and WITH lines of one rule, collecting problems (through the
    rule's _RuleCompiler, whose WHENs are compiled first: a `*` SET needs a WHEN binding
    it). With no `target_text`, only the problems are wanted: no step is built."""

    def __init__(self, rc: _RuleCompiler, target_text: Callable[[Any], str] | None) -> None:
        self.rc = rc
        self.target_text = target_text
        self.steps: list[Step] = []
        self.args: list[tuple[str, Eval]] = []
        self.seen_keys: dict[str, Pos] = {}
        self.omit: tuple[str, ...] = ()
        self.redact: tuple[str, ...] = ()
        self.timeout_s: float | None = None
        self.ops: list[str] = []
        self.writes: set[tuple[ast.Segment, ...]] = set()
        self.wildcard_set = False  # a SET target with `*`

    def compile(self, rule: ast.Rule) -> None:
        rc = self.rc
        for stmt in rule.body:
            if isinstance(stmt, ast.Set):
                self.set(stmt)
            elif isinstance(stmt, ast.Exec):
                name = _exec_op(stmt, rc.problems)
                if name is not None:
                    self.steps.append(ExecStep(stmt.pos, stmt.uri, name))
                    if name not in self.ops:
                        self.ops.append(name)
            elif isinstance(stmt, ast.With):
                self.with_(stmt)
            else:
                rc.problem(f"not a body statement: {type(stmt).__name__}", _pos_of(stmt))
        if self.wildcard_set and not rc.binds:
            rc.problem("a SET target with `*` needs a WHEN that binds it (`WHEN @lmtp.rcpt.* ...`)",
                       rule.pos)

    def set(self, stmt: ast.Set) -> None:
        rc = self.rc
        target = stmt.target
        if not isinstance(target, ast.Path):
            rc.problem("SET needs a plain path (a JSONPath may name several places)", stmt.pos)
            return
        if not target.segments or target.segments[0] == MATCH_ROOT:
            rc.problem(
                f"SET {segments_text(target.segments)}: match.* holds the WHENs' regex "
                "groups and is read-only",
                target.pos,
            )
            return
        value = rc.expr(stmt.value)
        if WILDCARD in target.segments:
            step = _wildcard_step(stmt, target, value, rc)
            if step is not None:
                self.wildcard_set = True
                self.writes.add(target.segments)
                self.steps.append(step)
            return
        try:
            write = compile_setter(target)
        except TxclCompileError as err:
            rc.problems.extend(err.problems)
            return
        self.writes.add(target.segments)
        if self.target_text is None:
            return
        self.steps.append(
            SetStep(
                stmt.pos,
                target.segments,
                self.target_text(target.segments),
                value,
                write,
                compile_getter(target),
                _scalar_literal(stmt.value),
            )
        )

    def with_(self, stmt: ast.With) -> None:
        rc = self.rc
        key = stmt.key
        if key in self.seen_keys:
            rc.problem(
                f"WITH {key} is given twice in this rule (first at {self.seen_keys[key]})",
                stmt.pos,
            )
            return
        self.seen_keys[key] = stmt.pos
        if key == "timeout":
            literal = stmt.value.value if isinstance(stmt.value, ast.Literal) else None
            self.timeout_s = parse_timeout(literal)
            if self.timeout_s is None:
                rc.problem(
                    f'WITH timeout = {expr_text(stmt.value)}: give a duration such as "5s", '
                    f'"500ms" or a number of seconds, above 0 and at most {MAX_TIMEOUT_S:g}s',
                    stmt.pos,
                )
        elif key in ("omit", "redact"):
            literal = stmt.value.value if isinstance(stmt.value, ast.Literal) else None
            paths = parse_path_list(literal) if isinstance(literal, str) else None
            if paths is None:
                rc.problem(
                    f"WITH {key} = {expr_text(stmt.value)}: give a string with a comma "
                    'list of full paths, such as "_txc.lmtp.msg.raw, _txc.lmtp.msg.attachments"',
                    stmt.pos,
                )
            elif key == "omit":
                self.omit = paths
            else:
                self.redact = paths
        else:
            self.args.append((key, rc.expr(stmt.value)))


def _wildcard_step(
    stmt: ast.Set, target: ast.Path, value: Eval, rc: _RuleCompiler
) -> SetStep | None:
    if target.segments.count(WILDCARD) > 1:
        rc.problem(f"SET {segments_text(target.segments)}: one `*` per path", target.pos)
        return None
    return SetStep(
        stmt.pos,
        target.segments,
        path_text(target.segments),
        value,
        _no_write,
        _no_read,
        _scalar_literal(stmt.value),
        wildcard=True,
    )


def _no_write(envelope: Any, value: Any) -> Any:
    raise AssertionError("a wildcard SET writes through SetStep.at")


def _no_read(envelope: Any, default: Any = MISSING, /) -> Any:
    return default


def _bound_step(step: SetStep, index: int) -> SetStep:
    segments = tuple(index if s == WILDCARD else s for s in step.target)
    path = ast.Path(segments, step.pos)
    return replace(
        step,
        target=segments,
        target_text=path_text(segments),
        write=compile_setter(path),
        read=compile_getter(path),
        wildcard=False,
        bound={},
    )


def compile_file(file: ast.File) -> tuple[CompiledRule, ...]:
    """Compile every rule of a file; raise TxclCompileError listing all problems found."""
    problems: list[Problem] = []
    rules = tuple(compile_rule(rule, file.name, problems) for rule in file.rules)
    _raise_any(problems)
    return rules


def check_file(file: ast.File) -> None:
    """Raise what compile_file() raises, without building the rules only a run uses: for
    `txcl lint`, which wants the problems, not the compiled rules."""
    problems: list[Problem] = []
    for rule in file.rules:
        _check_rule(rule, problems)
    _raise_any(problems)


def _raise_any(problems: list[Problem]) -> None:
    if problems:
        raise TxclCompileError(sorted(problems, key=lambda p: p.pos or Pos("", 0, 0)))
