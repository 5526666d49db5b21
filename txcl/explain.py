"""Why each rule fired or not: every WHEN of every rule of every stage that ran, its result
and the values it compared, from the stage-start snapshots of a run made with
`RunPolicy(explain=True)`.

Values are shown shortened and scrubbed by the stack's `WITH omit` / `WITH redact` as the
trace scrubs them. For a rule that did not fire, `first_false` is the first WHEN that did
not hold (false, or reading a missing value).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Final, TextIO

from txcl import ast
from txcl.compiler import MATCH_ROOT, CompiledRule, _RuleCompiler, expr_text
from txcl.errors import Pos, TxclError
from txcl.parser import parse_expression
from txcl.records import StackResult
from txcl.runner import Stack
from txcl.trace import REDACTED, Scrubber, scrubber_for
from txcl.values import MISSING

SHOWN_CHARS: Final = 80
OMITTED_TEXT: Final = "[OMITTED]"


@dataclass(frozen=True, slots=True)
class Operand:
    text: str  # the operand in canonical form (`@lmtp.mail.from`, `domain(@lmtp.mail.from)`)
    value: str  # shown: JSON, shortened and scrubbed; "missing" when there is none


@dataclass(frozen=True, slots=True)
class WhenExplain:
    text: str
    pos: Pos
    held: bool
    operands: tuple[Operand, ...]


@dataclass(frozen=True, slots=True)
class RuleExplain:
    stage: int
    file: str
    pos: Pos
    fired: bool
    whens: tuple[WhenExplain, ...]
    first_false: int | None  # index into whens of the first that did not hold


def explain(stack: Stack, result: StackResult) -> list[RuleExplain]:
    """Every rule of each stage the run reached, in order. Empty when the run was not made
    with RunPolicy(explain=True)."""
    scrubber = scrubber_for(stack.hints)
    by_number = {stage.number: stage for stage in stack.stages}
    out: list[RuleExplain] = []
    for number, snapshot in result.snapshots:
        for rule in by_number[number].rules:
            out.append(_rule(rule, number, snapshot, scrubber))
    return out


def _rule(rule: CompiledRule, stage: int, snapshot: Any, scrubber: Scrubber) -> RuleExplain:
    captures: dict[str, str] = {}
    whens = []
    for when in rule.whens:
        caught: dict[str, str] = {}
        held = when.evaluate(snapshot, caught) is True
        captures.update(caught)
        operands = tuple(
            Operand(text, _shown(path, evaluate(snapshot, captures), scrubber))
            for text, path, evaluate in _operands(when.text)
        )
        whens.append(WhenExplain(when.text, when.pos, held, operands))
    first_false = next((i for i, w in enumerate(whens) if not w.held), None)
    return RuleExplain(stage, rule.file, rule.pos, first_false is None, tuple(whens), first_false)


@functools.lru_cache(maxsize=4096)
def _operands(text: str) -> tuple[tuple[str, tuple[Any, ...] | None, Any], ...]:
    """(text, path segments or None, evaluator) of each value a WHEN compares, compiled once."""
    try:
        expr = parse_expression(text)
    except TxclError:
        return ()
    compiler = _RuleCompiler([])
    found: list[ast.Expr] = []
    _collect(expr, found)
    out = []
    for node in found:
        shown_text = expr_text(node)
        path = node.segments if isinstance(node, ast.Path) else None
        if path and "*" in path:  # `@lmtp.rcpt.*`: show the list whose items it binds
            path = path[: path.index("*")]
            node = ast.Path(path, node.pos)
        if path and path[0] == MATCH_ROOT:
            path = None
        out.append((shown_text, path, compiler.expr(node)))
    return tuple(out)


def _collect(node: ast.Expr, found: list[ast.Expr]) -> None:
    if isinstance(node, ast.And | ast.Or):
        _collect(node.left, found)
        _collect(node.right, found)
    elif isinstance(node, ast.Not):
        _collect(node.operand, found)
    elif isinstance(node, ast.Compare):
        for side in (node.left, node.right):
            if not isinstance(side, ast.Literal | ast.ListLit):
                found.append(side)
    elif isinstance(node, ast.Match):
        found.append(node.left)
    elif not isinstance(node, ast.Literal | ast.ListLit | ast.Regex):
        found.append(node)


def _shown(path: tuple[Any, ...] | None, value: Any, scrubber: Scrubber) -> str:
    if value is MISSING:
        return "missing"
    if path is not None and scrubber:
        value = scrubber.at(path, value)
        if value is not REDACTED and not _is_json(value):
            return OMITTED_TEXT
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


def _is_json(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool | list | dict)


def explain_json(rules: list[RuleExplain]) -> list[dict[str, Any]]:
    return [
        {
            "stage": r.stage,
            "file": r.file,
            "pos": str(r.pos),
            "fired": r.fired,
            "first_false": r.first_false,  # index into whens, None when the rule fired
            "whens": [
                {
                    "text": w.text,
                    "pos": str(w.pos),
                    "held": w.held,
                    "values": {o.text: o.value for o in w.operands},
                }
                for w in r.whens
            ],
        }
        for r in rules
    ]


def render_explain(rules: list[dict[str, Any]], out: TextIO) -> None:
    """The JSON form (from `explain_json` or a trace) as text, one block per rule."""
    stage = None
    for r in rules:
        if r["stage"] != stage:
            stage = r["stage"]
            out.write(f"stage {stage}\n")
        mark = "fired" if r["fired"] else "not fired"
        out.write(f"  {r['pos']}  {mark}\n")
        if not r["whens"]:
            out.write("      (no WHEN: always fires)\n")
        for i, w in enumerate(r["whens"]):
            tick = "✓" if w["held"] else "✗"
            first = "   <- first WHEN that did not hold" if i == r["first_false"] else ""
            out.write(f"      {tick} WHEN {w['text']}{first}\n")
            for text, value in w["values"].items():
                out.write(f"          {text} = {value}\n")
