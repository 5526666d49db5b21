"""Why each rule fired or not: every WHEN of every rule of every stage a run reached, its
result and the values it compared, from the stage starts of a run made with
`RunPolicy(explain=True)` (the runner keeps a reference to each stage's rules and starting
envelope, and notes where each rule's test stopped). A WHEN's result comes from that note
where it says (no regex runs twice); only the WHENs the run did not reach, and those of a
rule whose WHENs read captures, are evaluated here.

One home for the data and its text: `txcl test --explain` explains a run it just made;
the trace writer explains each traced run off the event loop and stores the JSON form in
the trace (`steps.explain`), which `txco trace RID --explain` renders with the same
`render_explain`, so a trace shows the rules and values of the run as it happened.

Values are scrubbed as the trace scrubs (the stack's `WITH omit` / `WITH redact` by path,
a value computed from a scrubbed path as a whole, and copies of scrubbed values wherever
they appear), then shortened. The runner stops a rule at its first WHEN that does not hold;
the WHENs after it are shown as not reached, with what they would have given.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TextIO

import orjson

from txcl import ast
from txcl.compiler import MATCH_ROOT, WILDCARD, CompiledRule, _RuleCompiler, expr_text
from txcl.errors import Pos, TxclError
from txcl.parser import parse_expression
from txcl.records import ScrubHints, StackResult, StageStart
from txcl.trace import REDACTED, Scrubber, Taint, scrubber_for
from txcl.values import MISSING

if TYPE_CHECKING:
    from txcl.runner import Stack

SHOWN_CHARS: Final = 80
OMITTED_TEXT: Final = "[OMITTED]"
MISSING_TEXT: Final = "missing"
_OMITTED_JSON: Final = json.dumps(OMITTED_TEXT)
RESULTS: Final = ("true", "false", "missing")  # a WHEN's result: held, did not, read nothing


@dataclass(frozen=True, slots=True)
class Operand:
    text: str  # the operand in canonical form (`@lmtp.mail.from`, `domain(@lmtp.mail.from)`)
    value: str  # shown: JSON, scrubbed and shortened; "missing" when there is none


@dataclass(frozen=True, slots=True)
class WhenExplain:
    text: str
    pos: Pos
    held: bool
    operands: tuple[Operand, ...]
    result: str = "true"  # one of RESULTS: "missing" when it did not hold and read nothing
    reached: bool = True  # False after the rule's first WHEN that did not hold


@dataclass(frozen=True, slots=True)
class RuleExplain:
    stage: int
    file: str
    pos: Pos
    fired: bool
    whens: tuple[WhenExplain, ...]
    first_false: int | None  # index into whens of the first that did not hold


def explain(stack: Stack, result: StackResult) -> list[RuleExplain]:
    """Every rule of each stage the run reached, in order, scrubbed by the stack's hints.
    Empty when the run was not made with RunPolicy(explain=True)."""
    return explain_run(result, stack.hints)


def explain_run(
    result: StackResult, hints: ScrubHints, taint: Taint | None = None
) -> list[RuleExplain]:
    """`explain` from the run alone: the rules are those that ran (kept with each stage
    start). `taint`: the copies of scrubbed values to scrub too (built here when None)."""
    starts = result.snapshots or ()
    shown = _shown_for(result, hints, taint)
    out = []
    for start in starts:
        for rule, doc in zip(start.rules, _stage_json(start, shown), strict=True):
            whens = tuple(
                WhenExplain(
                    when.text,
                    when.pos,
                    w["held"],
                    tuple(Operand(text, value) for text, value in w["values"].items()),
                    w["result"],
                    w["reached"],
                )
                for when, w in zip(rule.whens, doc["whens"], strict=True)
            )
            out.append(
                RuleExplain(start.stage, rule.file, rule.pos, doc["fired"], whens, doc["first_false"])
            )
    return out


def explain_record(
    result: Any, hints: ScrubHints, taint: Taint | None = None
) -> list[dict[str, Any]] | None:
    """What a trace stores of a run (`steps.explain`): the `explain_json` form, scrubbed as
    the rest of the trace; None when the run kept no stage starts (recording off, no run)."""
    if getattr(result, "snapshots", None) is None:
        return None
    shown = _shown_for(result, hints, taint)
    return explain_scrubbed(result, shown.scrubber, shown.taint)


def explain_scrubbed(result: Any, scrubber: Scrubber, taint: Taint) -> list[dict[str, Any]] | None:
    """`explain_record` with the trace's Scrubber (of the stack's hints) and Taint (of the
    run's envelopes) already made, as the trace writer has them."""
    starts = getattr(result, "snapshots", None)
    if starts is None:
        return None
    shown = _Shown(scrubber, taint)
    doc = []
    for start in starts:
        doc += _stage_json(start, shown)
    return taint.clean(doc) if shown.tainted else doc  # a WHEN may quote a scrubbed value


def _shown_for(result: StackResult, hints: ScrubHints, taint: Taint | None) -> _Shown:
    scrubber = scrubber_for(hints)
    if taint is None:
        envelopes = [s.envelope for s in result.snapshots or ()]
        taint = scrubber.taint(*envelopes, result.envelope) if scrubber else Taint()
    return _Shown(scrubber, taint)


# What a stage start says of a rule the run did not get to (or a start kept without notes).
_UNNOTED: Final = -1


def _stage_json(start: StageStart, shown: _Shown) -> list[dict[str, Any]]:
    """Each rule of a stage start in the JSON form: each WHEN's result on the stage's
    starting envelope and its operands' values. A rule the run noted (StageStart.first_false:
    None when all its WHENs held, else the index of the first that did not) is explained
    from that note (`_rule_json`); the others are evaluated again (`_rule_json_evaluated`)."""
    stage, snapshot = start.stage, start.envelope
    noted = start.first_false or ()
    # Each operand's value as shown on the snapshot, by its text, filled as they come: rules
    # of a stage compare the same fields, and an operand that reads no capture has one value
    # per snapshot.
    seen: dict[str, str] = {}
    out = []
    for index, plan in enumerate(_plans_of(start.rules)):
        first_false = noted[index] if index < len(noted) else _UNNOTED
        if first_false == _UNNOTED or plan.replays:
            out.append(_rule_json_evaluated(plan, stage, snapshot, shown))
        else:
            out.append(_rule_json(plan, stage, snapshot, shown, first_false, seen))
    return out


def _rule_json(
    plan: _Plan, stage: int, snapshot: Any, shown: _Shown, noted: int | None,
    seen: dict[str, str],
) -> dict[str, Any]:
    """One rule explained from what the run noted of it (`noted`: StageStart.first_false of
    the rule): the WHENs before `noted` held, the one at `noted` did not, and those after it
    were not reached, so only they are evaluated here (in order; their captures are read by
    none of these WHENs, the rule does not replay). Operand values come from `seen`.

    The JSON is then fixed by the stage, `noted`, each operand's value as shown and each
    WHEN's outcome: when those are what the rule's last explain found (a rule comparing
    fields that rarely change), its JSON is that explain's, shared (never changed)."""
    captures: dict[str, Any] = {}
    found: list[Any] = [stage, noted]  # then per WHEN: its operands' values, its outcome
    for index, evaluate_when, operands, _ in plan.whens:
        if noted is None or index < noted:
            state = _HELD
        elif index == noted:
            state = _DID_NOT_HOLD
        else:
            state = _NOT_REACHED + _outcome_state(evaluate_when(snapshot, captures))
        for operand, evaluate, scrub in operands:
            value = seen.get(operand)
            if value is None:
                value = evaluate(snapshot, captures)
                value = MISSING_TEXT if value is MISSING else shown.show(value, scrub)
                seen[operand] = value
            if value is MISSING_TEXT and state % _NOT_REACHED == _DID_NOT_HOLD:
                state += _MISSING - _DID_NOT_HOLD  # a value it reads is missing
            found.append(value)
        found.append(state)
    key = tuple(found)
    last = plan.last[0]
    if last is not None and last[0] == key:
        return last[1]
    whens = []
    at = 2
    for _, _, operands, docs in plan.whens:
        values = {}
        for operand, _, _ in operands:
            values[operand] = key[at]
            at += 1
        doc = docs[key[at]].copy()
        at += 1
        doc["values"] = values
        whens.append(doc)
    rule = _rule_doc(plan, stage, noted, whens)
    plan.last[0] = (key, rule)
    return rule


def _rule_json_evaluated(plan: _Plan, stage: int, snapshot: Any, shown: _Shown) -> dict[str, Any]:
    """One rule explained with every WHEN evaluated in order, the captures accumulating as
    the runner's test does: a rule the run did not note, or one whose WHENs read captures
    or bind `*` (each depends on those before it)."""
    captures: dict[str, Any] = {}
    whens = []
    first_false: int | None = None
    for index, evaluate_when, operands, docs in plan.whens:
        state = _outcome_state(evaluate_when(snapshot, captures))
        values, missing = _values(operands, snapshot, captures, shown, None)
        if missing and state == _DID_NOT_HOLD:
            state = _MISSING
        if first_false is not None:
            state += _NOT_REACHED
        elif state != _HELD:
            first_false = index
        doc = docs[state].copy()
        doc["values"] = values
        whens.append(doc)
    return _rule_doc(plan, stage, first_false, whens)


# How a WHEN came out, as an index into its JSON templates (_when_docs): its result (held,
# did not, did not and read something missing), plus _NOT_REACHED after the rule's first
# WHEN that did not hold.
_HELD: Final = 0
_DID_NOT_HOLD: Final = 1
_MISSING: Final = 2
_NOT_REACHED: Final = 3


def _outcome_state(outcome: Any) -> int:
    return _HELD if outcome is True else _MISSING if outcome is MISSING else _DID_NOT_HOLD


def _when_docs(text: str, pos: str) -> tuple[dict[str, Any], ...]:
    """A WHEN's JSON for each way it can come out (indexed as _HELD etc. say), with its
    values to fill in: each run copies one (a copy costs less than building the object)."""
    return tuple(
        {"text": text, "pos": pos, "held": result == "true", "result": result,
         "reached": reached, "values": None}
        for reached in (True, False)
        for result in RESULTS
    )


def _values(
    operands: tuple[tuple[str, Any, Any], ...], snapshot: Any, captures: dict[str, Any],
    shown: _Shown, seen: dict[str, str] | None,
) -> tuple[dict[str, str], bool]:
    """A WHEN's operands' values on `snapshot` as shown, by their texts, and whether any is
    missing (which makes a result that did not hold "missing"); taken from `seen` and kept
    there when it is given."""
    values: dict[str, str] = {}
    missing = False
    for operand, evaluate, scrub in operands:
        value = None if seen is None else seen.get(operand)
        if value is None:
            found = evaluate(snapshot, captures)
            value = MISSING_TEXT if found is MISSING else shown.show(found, scrub)
            if seen is not None:
                seen[operand] = value
        if value is MISSING_TEXT:
            missing = True
        values[operand] = value
    return values, missing


def _rule_doc(
    plan: _Plan, stage: int, first_false: int | None, whens: list[dict[str, Any]]
) -> dict[str, Any]:
    """The rule's JSON: its template for this stage and outcome (made on first use), copied,
    with `whens`."""
    key = (stage, first_false)
    template = plan.docs.get(key)
    if template is None:
        template = plan.docs[key] = {
            "stage": stage,
            "file": plan.file,
            "pos": plan.pos,
            "fired": first_false is None,
            "first_false": first_false,  # index into whens, None when the rule fired
            "whens": None,
        }
    doc = template.copy()
    doc["whens"] = whens
    return doc


@dataclass(frozen=True, slots=True)
class _Plan:
    """What explaining a rule needs that does not depend on the envelope, built once."""

    file: str
    pos: str
    # Per WHEN: its index (counted once here, not by an enumerate per rule and run), its
    # evaluator, its operands (text, evaluator, how to scrub) and its JSON templates
    # (_when_docs).
    whens: tuple[
        tuple[int, Any, tuple[tuple[str, Any, Any], ...], tuple[dict[str, Any], ...]], ...
    ]
    replays: bool  # its WHENs are evaluated again, all in order (see _rule_json)
    # The rule's JSON without its WHENs, by (stage, first_false), made on first use
    # (_rule_doc); never changed once made (each run changes a copy).
    docs: dict[tuple[int, int | None], dict[str, Any]]
    # What _rule_json last found of the rule, and the JSON it made of that (shared).
    last: list[tuple[tuple[Any, ...], dict[str, Any]] | None]


# id(a stage's rules) -> (those rules, their plans), the least recently explained first;
# the rules are kept so their id is not reused while cached, and the bound lets the stages
# of old reloads go.
_PLANS: OrderedDict[int, tuple[tuple[CompiledRule, ...], tuple[_Plan, ...]]] = OrderedDict()
_MAX_STAGES: Final = 1024
_PLANS_LOCK: Final = threading.Lock()  # trace writer threads and the caller's may explain


def _plans_of(rules: tuple[CompiledRule, ...]) -> tuple[_Plan, ...]:
    with _PLANS_LOCK:
        cached = _PLANS.get(id(rules))
        if cached is not None and cached[0] is rules:
            _PLANS.move_to_end(id(rules))
            return cached[1]
    plans = tuple(
        _Plan(
            rule.file,
            str(rule.pos),
            tuple(
                (index, w.evaluate, _operands(w.text), _when_docs(w.text, str(w.pos)))
                for index, w in enumerate(rule.whens)
            ),
            any(_depends_on_captures(w.text) for w in rule.whens),
            {},
            [None],
        )
        for rule in rules
    )
    with _PLANS_LOCK:
        _PLANS[id(rules)] = (rules, plans)
        while len(_PLANS) > _MAX_STAGES:
            _PLANS.popitem(last=False)
    return plans


# --- the operands of a WHEN, compiled once per WHEN text ---------------------------------

# How an operand's value is scrubbed: by its path (a plain path: exactly as the trace
# scrubs that path), or by the paths it reads (a function, a sum, a JSONPath: the value as
# a whole when any of them is scrubbed); None for a capture (`match.x`: copies only).
_Scrub = tuple[str, Any]  # ("path", segments) or ("reads", (plain reads, jsonpath prefixes))


@functools.lru_cache(maxsize=4096)
def _operands(text: str) -> tuple[tuple[str, Any, _Scrub | None], ...]:
    """(text, evaluator, how to scrub) of each value a WHEN compares."""
    try:
        expr = parse_expression(text)
    except TxclError:
        return ()
    found: list[ast.Expr] = []
    _collect(expr, found)
    out = []
    for node in found:
        shown_text = expr_text(node)
        scrub: _Scrub | None = None
        if isinstance(node, ast.Path):
            path = node.segments
            if "*" in path:  # `@lmtp.rcpt.*`: show the list whose items it binds
                path = path[: path.index("*")]
                node = ast.Path(path, node.pos)
            scrub = None if path[0] == MATCH_ROOT else ("path", path)
        compiler = _RuleCompiler([])
        evaluate = compiler.expr(node)
        if scrub is None and not isinstance(node, ast.Path):
            prefixes = tuple(_jsonpath_prefix(p) for p in compiler.jsonpaths)
            scrub = ("reads", (tuple(compiler.reads), prefixes))
        out.append((shown_text, evaluate, scrub))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _depends_on_captures(text: str) -> bool:
    """A WHEN whose result or operands depend on the WHENs before it: it reads `match.*`
    or binds `*` (or its text does not parse back, so its operands are unknown)."""
    try:
        return _reads_captures(parse_expression(text))
    except TxclError:
        return True


def _reads_captures(node: Any) -> bool:
    if isinstance(node, ast.Path):
        return node.segments[:1] == (MATCH_ROOT,) or WILDCARD in node.segments
    if isinstance(node, tuple):
        return any(map(_reads_captures, node))
    if dataclasses.is_dataclass(node):
        return any(_reads_captures(getattr(node, f.name)) for f in dataclasses.fields(node))
    return False


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


_JSONPATH_STEP = re.compile(r"\.([A-Za-z_][\w-]*|\*)|\[(\d+|\*)\]|\[['\"]([^'\"]*)['\"]\]")


def _jsonpath_prefix(text: str) -> tuple[str | int, ...]:
    """The plain steps a JSONPath begins with (`$._txc.lmtp.msg.attachments[*].type` ->
    _txc, lmtp, msg, attachments, *, type), up to the first it cannot name (`..`, a filter)."""
    out: list[str | int] = []
    at = 1 if text.startswith("$") else 0
    while at < len(text):
        step = _JSONPATH_STEP.match(text, at)
        if step is None:
            break
        name, index, quoted = step.groups()
        out.append(int(index) if index and index.isdigit() else (name or index or quoted or ""))
        at = step.end()
    return tuple(out)


# --- values as shown -----------------------------------------------------------------------


class _Shown:
    """Values as explain shows them: scrubbed as the trace scrubs, then shortened."""

    __slots__ = ("scrubber", "taint", "scrubs", "tainted", "keep")

    def __init__(self, scrubber: Scrubber, taint: Taint) -> None:
        self.scrubber = scrubber
        self.taint = taint
        self.scrubs = bool(scrubber.rules)  # asked once, not for every value
        self.tainted = bool(taint.exact or taint.containers)  # bool(taint), without a call
        # A string is cut only after this many characters, so that a secret starting within
        # what is shown is still whole when its copies are scrubbed.
        self.keep = SHOWN_CHARS + (max([len(s) for s, _ in taint.scan]) if taint.scan else 0)

    def show(self, value: Any, scrub: _Scrub | None) -> str:
        """`value` (not MISSING) as shown: JSON text of at most SHOWN_CHARS characters."""
        if self.scrubs and scrub is not None:
            value = self._scrubbed(value, scrub)
        if self.tainted:
            value = self.taint.clean(_trimmed(value, self.keep))
        kind = value.__class__
        if kind is str:
            try:
                text = orjson.dumps(value[:SHOWN_CHARS]).decode()
            except TypeError:  # a lone surrogate: orjson refuses it, json escapes it
                text = json.dumps(value[:SHOWN_CHARS], ensure_ascii=False)
        elif kind is bool:
            return "true" if value else "false"
        elif kind is int:
            text = str(value)
        elif value is None:
            return "null"
        elif not isinstance(value, _JSON_TYPES):  # the scrubber's mark of a value omitted
            return _OMITTED_JSON
        else:
            text = _spaced_json(_trimmed(value, SHOWN_CHARS))
        return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"

    __call__ = show  # a method call costs less than calling the object: explain calls show

    def _scrubbed(self, value: Any, scrub: _Scrub) -> Any:
        kind, what = scrub
        if kind == "path":
            return self.scrubber.at(what, value)
        reads, prefixes = what
        action = None
        for segs, hint_action in self.scrubber.rules:
            if any(_within(read, segs) for read in reads) or any(
                _overlaps(prefix, segs) for prefix in prefixes
            ):
                action = "omit" if "omit" in (action, hint_action) else "redact"
        if action is None:
            return value
        return OMITTED_TEXT if action == "omit" else REDACTED


def _within(read: tuple[Any, ...], hint: tuple[Any, ...]) -> bool:
    """`read` lies at or below the scrubbed path `hint`."""
    return len(hint) <= len(read) and all(
        h == "*" or str(h) == str(r) for h, r in zip(hint, read, strict=False)
    )


def _overlaps(prefix: tuple[Any, ...], hint: tuple[Any, ...]) -> bool:
    """A JSONPath starting with `prefix` may reach what `hint` scrubs (either lies within
    the other)."""
    return all(h == "*" or r == "*" or str(h) == str(r) for h, r in zip(hint, prefix, strict=False))


_JSON_TYPES: Final = (str, int, float, bool, list, dict)
_SEQUENCES: Final = (list, tuple)


def _trimmed(value: Any, keep: int) -> Any:
    """`value` with each string cut after `keep` characters and each list or object after
    `keep` items: enough to show `keep` characters, without encoding a whole message."""
    if isinstance(value, str):
        return value[:keep]
    if isinstance(value, _SEQUENCES):
        return [
            item[:keep] if item.__class__ is str else _trimmed(item, keep)
            for item in value[:keep]
        ]
    if isinstance(value, Mapping):
        return {key: _trimmed(item, keep) for key, item in itertools.islice(value.items(), keep)}
    return value


def _spaced_json(value: Any) -> str:
    """`json.dumps(value, ensure_ascii=False, default=repr)`, as it has always been shown
    (", " and ": " between items), from orjson's text of each string: the standard
    library's encoder only for what that does not cover (floats, keys that are no string,
    lone surrogates, other types)."""
    try:
        return _spaced(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, default=repr)


def _spaced(value: Any) -> str:
    kind = value.__class__
    if kind is str:
        return orjson.dumps(value).decode()  # TypeError for a lone surrogate
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    if kind is list:
        return "[" + ", ".join(map(_spaced, value)) + "]"
    if kind is dict:
        items = []
        for key, item in value.items():
            if key.__class__ is not str:
                raise TypeError("a key that is no string")
            items.append(f"{_spaced(key)}: {_spaced(item)}")
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"not encoded here: {kind.__name__}")


# --- the JSON form and its text --------------------------------------------------------------


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
                    "result": w.result,
                    "reached": w.reached,
                    "values": {o.text: o.value for o in w.operands},
                }
                for w in r.whens
            ],
        }
        for r in rules
    ]


def render_explain(rules: list[dict[str, Any]], out: TextIO) -> None:
    """The JSON form (from `explain_json`, or as a trace stored it) as text, one block per
    rule: ✓ a WHEN that held, ✗ one that did not (the first is marked), · one not reached."""
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
            result = w.get("result") or ("true" if w["held"] else "false")
            if not w.get("reached", True):
                out.write(f"      · WHEN {w['text']}   (not reached; {result} on this envelope)\n")
            else:
                tick = "✓" if w["held"] else "✗"
                first = "   <- first WHEN that did not hold" if i == r["first_false"] else ""
                if first and result == "missing":
                    first += " (a value it reads is missing)"
                out.write(f"      {tick} WHEN {w['text']}{first}\n")
            for text, value in w["values"].items():
                out.write(f"          {text} = {value}\n")
