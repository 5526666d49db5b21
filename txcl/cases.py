"""Stack test cases: `OPS/<tenant>/<stack>/tests/*.yaml`, run without side effects.

A case gives an input (an envelope, or a message the envelope's source builds into one),
stubbed op results, and what to expect: the rules that fired, values at paths, the reply
lines the source would send, a run error. Results are data; cli.py renders them.
The format is documented in docs/txcl.md, "Test cases".
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from txcl import ast, inputs
from txcl.envelope import SRC_KEY, TXC, parse_path, route_of, source_of, txc_of
from txcl.errors import Pos, Problem, TxclError
from txcl.paths import compile_getter
from txcl.runner import TEST_POLICY, RunPolicy, Stack, StackResult
from txcl.sources import Source, source_for
from txcl.values import MISSING

CASE_ERROR: Final = "txcl_test_error"
ABSENT: Final = "~missing"  # an expected path value meaning "not there"

_INPUT_KEYS: Final = ("envelope", "envelope_file", "eml")
_CASE_KEYS: Final = frozenset({"name", "input", "ops", "expect"})
_EXPECT_KEYS: Final = frozenset({"fired", "paths", "verdicts", "error"})


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One expectation that did not hold."""

    what: str  # "fired", "path @lmtp.res.code", "verdicts", "error"
    expected: Any
    got: Any


@dataclass(frozen=True, slots=True)
class CaseResult:
    file: str
    name: str
    stack: str
    mismatches: tuple[Mismatch, ...] = ()
    problem: Problem | None = None  # the case itself could not run (bad file, bad input)
    result: StackResult | None = None

    @property
    def passed(self) -> bool:
        return self.problem is None and not self.mismatches


@dataclass(frozen=True, slots=True)
class Case:
    file: Path
    name: str
    envelope: dict[str, Any]
    stubs: Mapping[str, Any]
    expect: Mapping[str, Any]
    pos: Pos


def case_files(stack_dir: Path) -> list[Path]:
    tests = stack_dir / "tests"
    if not tests.is_dir():
        return []
    return sorted(p for p in tests.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def run_case_file(
    path: Path, stack: Stack, policy: RunPolicy = TEST_POLICY, keyword: str = "", *,
    schema: bool = True,
) -> list[CaseResult]:
    """Every case of one file (those whose name holds `keyword`), against one compiled stack
    (`schema`: hand-written envelopes are checked against their source's schema first)."""
    try:
        cases = load_cases(path, stack, schema=schema)
    except TxclError as err:
        return [CaseResult(str(path), "(file)", stack.name, problem=err.problem)]
    return [run_case(case, stack, policy) for case in cases if keyword.lower() in case.name.lower()]


def count_cases(path: Path) -> int:
    """How many cases a file holds, without a stack to build them for (1 when unreadable)."""
    try:
        doc = inputs.load_yaml(path)
    except inputs.InputError:
        return 1
    entries = doc.get("cases") if isinstance(doc, dict) and "cases" in doc else [doc]
    return len(entries) if isinstance(entries, list) and entries else 1


def run_case(case: Case, stack: Stack, policy: RunPolicy = TEST_POLICY) -> CaseResult:
    try:  # a case built in code may hold any data: a cycle, a billion shared leaves
        inputs.check_tree(case.envelope, case.file)
    except inputs.InputError as err:
        return CaseResult(str(case.file), case.name, stack.name, problem=err.problem(CASE_ERROR))
    policy = dataclasses.replace(policy, op_stubs={**policy.op_stubs, **case.stubs})
    result = stack.run(case.envelope, policy)
    source = source_for(case.envelope)
    mismatches = check(case.expect, result, source, case.pos, stack)
    if isinstance(mismatches, Problem):
        return CaseResult(str(case.file), case.name, stack.name, problem=mismatches, result=result)
    return CaseResult(str(case.file), case.name, stack.name, tuple(mismatches), result=result)


def fired_labels(result: StackResult) -> list[str]:
    """`<stage>/<file name>:<line>` for each rule that fired, in firing order."""
    return [f"{f.stage}/{Path(f.file).name}:{f.pos.line}" for f in result.fired]


def rule_ordinals(stack: Stack) -> dict[tuple[str, int], int]:
    """(file, line) -> the rule's ordinal in its file, from 1: a name that survives comment
    and blank-line edits (`1/20-ticket.txcl#1`)."""
    out: dict[tuple[str, int], int] = {}
    for stage in stack.stages:
        counts: dict[str, int] = {}
        for rule in stage.rules:
            counts[rule.file] = counts.get(rule.file, 0) + 1
            out[(rule.file, rule.pos.line)] = counts[rule.file]
    return out


def stable_labels(result: StackResult, stack: Stack) -> list[str]:
    """`<stage>/<file name>#<ordinal>` for each rule that fired, in firing order."""
    ordinals = rule_ordinals(stack)
    return [
        f"{f.stage}/{Path(f.file).name}#{ordinals.get((f.file, f.pos.line), 0)}"
        for f in result.fired
    ]


def _fired_got(expected: list[Any], result: StackResult, stack: Stack | None) -> list[str]:
    """The fired rules in the form each expected item uses (`#ordinal` or `:line`)."""
    by_line = fired_labels(result)
    if stack is None or not any("#" in str(item) for item in expected):
        return by_line
    by_ordinal = stable_labels(result, stack)
    if len(expected) != len(by_line):
        return by_ordinal
    return [o if "#" in str(e) else line for e, o, line in zip(expected, by_ordinal, by_line, strict=True)]


def check(
    expect: Mapping[str, Any],
    result: StackResult,
    source: Source | None,
    pos: Pos,
    stack: Stack | None = None,
) -> list[Mismatch] | Problem:
    out: list[Mismatch] = []
    if "fired" in expect:
        got = _fired_got(list(expect["fired"]), result, stack)
        if list(expect["fired"]) != got:
            out.append(Mismatch("fired", list(expect["fired"]), got))
    for text, want in (expect.get("paths") or {}).items():
        try:
            getter = compile_getter(_path(str(text), pos))
        except TxclError as err:
            return err.problem
        got = getter(result.envelope)
        if want == ABSENT:
            if got is not MISSING:
                out.append(Mismatch(f"path {text}", ABSENT, got))
        elif got is MISSING or not _same_json(got, want):
            out.append(Mismatch(f"path {text}", want, ABSENT if got is MISSING else got))
    if "verdicts" in expect:
        if source is None:
            return Problem(CASE_ERROR, "expect.verdicts needs an envelope with a known _txc.src", pos)
        got_lines = [line for _, line in source.replies(result.envelope, result.error)]
        if list(expect["verdicts"]) != got_lines:
            out.append(Mismatch("verdicts", list(expect["verdicts"]), got_lines))
    if "error" in expect:
        want = expect["error"]
        got_error = result.error.message if result.error else None
        if want is None and got_error is not None:
            out.append(Mismatch("error", None, got_error))
        elif want is not None and (got_error is None or str(want) not in got_error):
            out.append(Mismatch("error", want, got_error))
    elif result.error is not None:
        out.append(Mismatch("error", None, result.error.message))
    return out


def _same_json(a: Any, b: Any) -> bool:
    # JSON equality: 1 and 1.0 are the same number, true is not 1.
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) or (
        _number(a) and _number(b) and a == b
    )


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _path(text: str, pos: Pos) -> ast.Path:
    segments = parse_path(text)
    if segments is None:
        raise TxclError(
            Problem(CASE_ERROR, f"expect.paths: {text!r} is not a path like @lmtp.res.code", pos)
        )
    return ast.Path(segments, pos)


# --- reading case files -----------------------------------------------------------------


def load_cases(path: Path, stack: Stack, *, schema: bool = True) -> list[Case]:
    try:
        doc = inputs.load_yaml(path)
    except inputs.InputError as err:
        raise _bad(path, err.line or 1, err.message) from None
    entries = doc.get("cases") if isinstance(doc, dict) and "cases" in doc else [doc]
    if not isinstance(entries, list) or not entries:
        raise _bad(path, 1, "a case file holds one case (a mapping) or `cases:` with a list")
    names: set[str] = set()
    cases = []
    for index, entry in enumerate(entries):
        case = _case(path, index, entry, stack, schema)
        if case.name in names:
            raise _bad(path, 1, f"two cases are named {case.name!r}")
        names.add(case.name)
        cases.append(case)
    return cases


def _case(path: Path, index: int, entry: Any, stack: Stack, schema: bool = True) -> Case:
    where = f"case {index + 1}"
    if not isinstance(entry, dict):
        raise _bad(path, 1, f"{where}: a case is a mapping with name, input, ops, expect")
    unknown = sorted(set(entry) - _CASE_KEYS)
    if unknown:
        raise _bad(path, 1, f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_CASE_KEYS))})")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(path, 1, f"{where}: every case needs a `name`")
    where = f"case {name!r}"
    pos = Pos(str(path), 1, 1)
    envelope = _input(path, where, entry.get("input"), stack, schema)
    stubs = entry.get("ops") or {}
    if not isinstance(stubs, dict) or not all(isinstance(v, dict) for v in stubs.values()):
        raise _bad(path, 1, f"{where}: `ops` maps op names to the merge patch each returns")
    expect = entry.get("expect") or {}
    if not isinstance(expect, dict):
        raise _bad(path, 1, f"{where}: `expect` is a mapping")
    unknown = sorted(set(expect) - _EXPECT_KEYS)
    if unknown:
        raise _bad(path, 1, f"{where}: unknown expectation {unknown[0]!r} (known: {', '.join(sorted(_EXPECT_KEYS))})")
    for key in ("fired", "verdicts"):
        if key in expect and not isinstance(expect[key], list):
            raise _bad(path, 1, f"{where}: expect.{key} is a list")
    if "paths" in expect and not isinstance(expect["paths"], dict):
        raise _bad(path, 1, f"{where}: expect.paths maps paths to values")
    return Case(path, name, envelope, stubs, expect, pos)


def _input(path: Path, where: str, spec: Any, stack: Stack, schema: bool = True) -> dict[str, Any]:
    if not isinstance(spec, dict) or sum(k in spec for k in _INPUT_KEYS) != 1:
        raise _bad(path, 1, f"{where}: `input` needs exactly one of {', '.join(_INPUT_KEYS)}")
    if "envelope" in spec:
        envelope = spec["envelope"]
    elif "envelope_file" in spec:
        envelope = read_envelope(path.parent / str(spec["envelope_file"]))
    else:
        rcpt = spec.get("rcpt")
        if isinstance(rcpt, str):
            rcpt = [rcpt]
        if not isinstance(rcpt, list) or not rcpt:
            raise _bad(path, 1, f"{where}: input.eml needs `rcpt`, the recipients")
        eml = path.parent / str(spec["eml"])
        try:
            raw = inputs.read_bytes(eml)
        except inputs.InputError as err:
            raise _bad(path, 1, f"{where}: {err}") from None
        envelope = message_envelope(
            raw, [str(r) for r in rcpt], str(spec.get("mail_from", "")), stack, spec.get("src", "lmtp")
        )
    if not isinstance(envelope, dict):
        raise _bad(path, 1, f"{where}: the envelope must be a JSON object")
    problems = envelope_schema_problems(envelope) if schema and "eml" not in spec else []
    if problems:
        raise _bad(path, 1, f"{where}: {_schema_text(problems)}")
    return aim_at(envelope, stack)


def message_envelope(
    raw: bytes, rcpts: Sequence[str], mail_from: str, stack: Stack, src: str = "lmtp"
) -> dict[str, Any]:
    """The envelope a message source builds for a message routed to `stack`."""
    source = source_for({TXC: {SRC_KEY: src}})
    if source is None or not hasattr(source, "envelope_from_message"):
        raise TxclError(Problem(CASE_ERROR, f"no installed source {src!r} can build an envelope from a message"))
    envelope: dict[str, Any] = source.envelope_from_message(
        raw, rcpts=list(rcpts), mail_from=mail_from, stack=stack.name, stage=first_stage(stack)
    )
    return envelope


def envelope_schema_problems(envelope: Any) -> list[str]:
    """What is wrong with a hand-written envelope, by its source's schema (txcl.schema):
    fields of the wrong type, unknown fields, a forgotten `_txc` wrapper. Missing fields are
    fine (a fixture gives what its rules read)."""
    from txcl.schema import SchemaError, envelope_problems, section_schema

    if not isinstance(envelope, dict):
        return []
    try:  # a cycle or an enormous tree is the run's to report (run_case), not the schema's
        inputs.check_tree(envelope, Path("<envelope>"))
    except inputs.InputError:
        return []
    src = source_of(envelope)
    if src is None:
        if TXC not in envelope and (SRC_KEY in envelope or "lmtp" in envelope):
            return ["it has no `_txc`: the source's fields go under `_txc` "
                    '(`{"_txc": {"src": "lmtp", "lmtp": {...}}}`)']
        return []
    try:
        if section_schema(src) is None:
            return []
        return envelope_problems(envelope, src, partial=True)
    except SchemaError as err:
        return [str(err)]


def _schema_text(problems: list[str]) -> str:
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    return f"the envelope does not fit its source's schema (--no-schema skips this): {shown}"


def schema_problem(envelope: Any, where: str) -> Problem | None:
    """The schema check of an envelope given to `txcl test` (from `where`), as one problem
    (None: fine)."""
    problems = envelope_schema_problems(envelope)
    return Problem(CASE_ERROR, f"{where}: {_schema_text(problems)}") if problems else None


def first_stage(stack: Stack) -> int:
    return stack.stages[0].number if stack.stages else 0


def aim_at(envelope: dict[str, Any], stack: Stack) -> dict[str, Any]:
    """The envelope with `_txc.route` naming `stack` when it names no stage of it.

    A test runs the stack it was given; an envelope captured elsewhere still runs there.
    Only the route is replaced (shallow copies), never the caller's data."""
    txc = txc_of(envelope) or {}
    route = route_of(envelope) or {}
    to = route.get("to")
    numbers = {s.number for s in stack.stages}
    if isinstance(to, str):
        name, _, stage = to.rpartition("/")
        if name == stack.name and stage.isdigit() and int(stage) in numbers:
            return envelope
    tenant = stack.name.partition("/")[0]
    new_route = {**route, "tenant": tenant, "stack": stack.name, "to": f"{stack.name}/{first_stage(stack)}"}
    return {**envelope, TXC: {**txc, "route": new_route}}


def read_envelope(path: Path) -> Any:
    """A JSON envelope file, or `-` for standard input (bounded: see txcl.inputs)."""
    try:
        return inputs.load_json(path)
    except inputs.InputError as err:
        raise TxclError(err.problem(CASE_ERROR)) from None


def _bad(path: Path, line: int, message: str) -> TxclError:
    return TxclError(Problem(CASE_ERROR, message, Pos(str(path), line, 1)))
