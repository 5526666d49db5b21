"""`txcl test | lint | fmt`: arguments and rendering only; the work lives in the package.

Exit codes: 0 ok · 1 failures or findings · 2 usage or I/O.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from txcl import fmt, inputs, lint, sarif, suppress
from txcl.compile_cache import CompileCache, file_signature, user_cache_dir
from txcl.envelope import path_text, result_of, route_of, source_of
from txcl.errors import Problem, TxclError, source_lines, with_context
from txcl.loader import Tree, load_target, read_rule_source
from txcl.ops import OpRegistry
from txcl.records import SetRecord, run_json
from txcl.runner import TEST_POLICY, RunPolicy, Stack, StackResult
from txcl.sources import source_for
from txcl.values import MISSING

if TYPE_CHECKING:  # the test runner, coverage and replay load only for their commands
    from txcl import cases, coverage, replay

OK, FAILED, USAGE = 0, 1, 2
CONFIG_NAME = "txco.yaml"
WATCH_INTERVAL_S = 0.3
NO_CACHE_HELP = "parse every file; leave the compile cache ($XDG_CACHE_HOME/txcl) alone"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="txcl", description="Test, lint and format TXCL rules (OPS/<tenant>/<stack>/<stage>/*.txcl)."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "test",
        help="run rules on an envelope, or run the stacks' test cases",
        description="With an ENVELOPE (a JSON file, - for stdin, or an .eml message with --rcpt): "
        "run TARGET's stack on it and show which rules fired and why, every step, the final "
        "result and the reply per recipient. Without: run the test cases in "
        "<stack>/tests/*.yaml of every stack under TARGET.",
    )
    t.add_argument("target", type=Path, help="a .txcl file, a stage folder, a stack folder or an OPS/ tree")
    t.add_argument("envelope", nargs="?", help="envelope JSON file, - for stdin, or a .eml message")
    t.add_argument("--rcpt", action="append", default=[], help="recipient of an .eml (repeatable)")
    t.add_argument("--from", dest="mail_from", default="", help="envelope sender of an .eml")
    t.add_argument("--stack", help="which stack of an OPS/ tree runs the envelope (default: its _txc.route.stack)")
    t.add_argument("--exec", action="store_true", help="execute ops for real (default: ops are not run)")
    t.add_argument("--state-dir", type=Path, help="where executed ops write (with --exec)")
    t.add_argument("--config", type=Path, help=f"the {CONFIG_NAME} whose `ops:` to load")
    t.add_argument("--json", action="store_true", help="print one JSON document (as --format json)")
    t.add_argument("--format", choices=("text", "json"), default="text", help="how to print the results")
    t.add_argument("-k", dest="keyword", default="", metavar="NAME", help="only the cases whose name holds NAME")
    t.add_argument("--junit", type=Path, metavar="FILE", help="also write the case results as JUnit XML")
    t.add_argument("--watch", action="store_true", help="run again whenever a rule or case file changes")
    t.add_argument(
        "--coverage",
        nargs="?",
        const="table",
        choices=("table", "json", "lcov"),
        help="which rules the cases fired and which WHENs were ever true and false (default: table)",
    )
    t.add_argument("--coverage-file", type=Path, metavar="FILE", help="write the coverage report here")
    t.add_argument(
        "--fail-under", type=float, metavar="PERCENT", help="fail when rule coverage is below PERCENT"
    )
    t.add_argument(
        "--explain",
        action="store_true",
        help="show every rule of every stage, fired or not, each WHEN's result and the values it compared",
    )
    t.add_argument("--no-cache", action="store_true", help=NO_CACHE_HELP)
    t.add_argument("--no-schema", action="store_true",
                   help="do not check hand-written envelopes against their source's schema")

    r = sub.add_parser(
        "replay",
        help="re-run recorded requests against the current rules and diff the verdicts",
        description="Re-run the envelopes of request traces (a trace folder, a requests/ folder "
        "or a state dir) against the rules under OPS. No op runs: each is answered with what "
        "the trace recorded. Prints, per recipient, the recorded verdict and the new one; "
        "exit 1 when any differ.",
    )
    r.add_argument("ops", type=Path, help="the OPS/ tree (or a stack folder) with the rules to try")
    r.add_argument("traces", nargs="+", type=Path, help="STATE_DIR/requests/ or STATE_DIR/requests/RID")
    r.add_argument("--format", choices=("text", "json"), default="text")
    r.add_argument("--no-cache", action="store_true", help=NO_CACHE_HELP)

    lt = sub.add_parser("lint", help="check a whole OPS tree (or files) without an envelope")
    lt.add_argument("targets", nargs="+", type=Path, help="files, folders, or - for standard input")
    lt.add_argument("--config", type=Path, help=f"the {CONFIG_NAME} whose `ops:` name the known ops")
    lt.add_argument("--format", choices=("text", "json", "github", "sarif"), default="text")
    lt.add_argument(
        "--stdin-name", default="<stdin>", metavar="NAME", help="the file name findings of `-` (stdin) carry"
    )
    lt.add_argument("--no-cache", action="store_true", help=NO_CACHE_HELP)

    f = sub.add_parser("fmt", help="print rules in canonical form")
    f.add_argument("paths", nargs="+", type=Path, help=".txcl files or folders, or - for standard input")
    mode = f.add_mutually_exclusive_group()
    mode.add_argument("-w", "--write", action="store_true", help="rewrite files in place")
    mode.add_argument("--check", action="store_true", help="exit 1 if a file is not formatted")
    mode.add_argument("-l", "--list", action="store_true", help="list files that are not formatted")
    mode.add_argument("-d", "--diff", action="store_true", help="show the changes as a diff")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TxclError as err:
        _print_problems(err.problems, sys.stderr)
        return USAGE
    except inputs.InputError as err:
        print(f"txcl {args.command}: {err}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `txcl lint --format json | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return FAILED


# --- txcl test ------------------------------------------------------------------------------


def cmd_test(args: argparse.Namespace) -> int:
    args.json = args.json or args.format == "json"
    if args.watch:
        return _watch(args)
    return _test_once(args)


def _test_once(args: argparse.Namespace) -> int:
    from txcl import cases, explain

    only: Path | None = None
    target = args.target
    if target.suffix in (".yaml", ".yml") and target.is_file():
        # one case file: its stack is the folder that holds tests/
        only, target = target, target.resolve().parent.parent
    registry = _registry(args.config, target)
    cache = _compile_cache(args)
    tree = load_target(target, cache=cache)
    if cache is not None:
        cache.flush()
    if tree.problems:
        _print_problems(tree.problems, sys.stderr)
    if args.envelope is None:
        return _run_cases(tree, args, only)
    is_message = Path(args.envelope).suffix == ".eml"
    envelope = None if is_message else cases.read_envelope(Path(args.envelope))
    stack = _pick_stack(tree, args, envelope)
    if stack is None:
        return FAILED if tree.problems else USAGE
    if is_message:
        envelope = _message_envelope(args, stack)
    elif not args.no_schema and (problem := cases.schema_problem(envelope, args.envelope)):
        _print_problems((problem,), sys.stderr)
        return FAILED
    policy = RunPolicy(
        run_ops=args.exec, registry=registry, state_dir=args.state_dir, explain=args.explain
    )
    result = stack.run(cases.aim_at(envelope, stack) if isinstance(envelope, dict) else envelope, policy)
    why = explain.explain_json(explain.explain(stack, result)) if args.explain else None
    if args.json:
        doc = result_json(stack, result)
        if why is not None:
            doc["explain"] = why
        json.dump(doc, sys.stdout, indent=2, default=_json_default)
        print()
    else:
        inputs.write_terminal(sys.stdout, lambda out: render_result(stack, result, out))
        if why is not None:
            inputs.write_terminal(sys.stdout, functools.partial(_render_explain, why))
    return FAILED if result.error else OK


def _pick_stack(tree: Tree, args: argparse.Namespace, envelope: Any) -> Stack | None:
    """--stack, else the only stack of the target, else the one the envelope is routed to."""
    if args.stack:
        stack = tree.stacks.get(args.stack)
        if stack is None:
            have = ", ".join(tree.stacks) or "none"
            print(f"txcl test: no stack {args.stack!r} under {args.target} (have: {have})", file=sys.stderr)
        return stack
    if len(tree.stacks) == 1:
        return next(iter(tree.stacks.values()))
    if not tree.stacks:
        print(f"txcl test: no stack to run under {args.target}", file=sys.stderr)
        return None
    route = route_of(envelope)
    name = route.get("stack") if route is not None else None
    if isinstance(name, str) and name in tree.stacks:
        return tree.stacks[name]
    print(
        f"txcl test: {args.target} holds {len(tree.stacks)} stacks and the envelope's "
        f"_txc.route.stack ({name!r}) names none of them: give --stack",
        file=sys.stderr,
    )
    return None


def _message_envelope(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    from txcl import cases

    path = Path(args.envelope)
    if not args.rcpt:
        raise TxclError(Problem("txcl_test_error", f"{path}: a message needs at least one --rcpt"))
    try:
        raw = inputs.read_bytes(path)
    except inputs.InputError as err:
        raise TxclError(err.problem("txcl_test_error")) from None
    return cases.message_envelope(raw, args.rcpt, args.mail_from, stack)


def _run_cases(tree: Tree, args: argparse.Namespace, only: Path | None = None) -> int:
    from txcl import cases, coverage, explain, junit

    measure = bool(args.coverage or args.fail_under is not None)
    policy = dataclasses.replace(TEST_POLICY, explain=measure or args.explain)
    results: list[cases.CaseResult] = []
    not_run: list[str] = []
    runs: dict[str, list[StackResult]] = {}
    for name, files in sorted(tree.case_files.items()):
        stack = tree.stacks.get(name)
        for path in files:
            if only is not None and Path(path).resolve() != only.resolve():
                continue
            if stack is None:  # its load problems are printed above and fail the run
                n = cases.count_cases(path)
                not_run.extend([f"{path}: stack {name} did not load"] * n)
                continue
            ran = cases.run_case_file(path, stack, policy, args.keyword,
                                       schema=not args.no_schema)
            for r in ran:
                if r.name == "(file)":
                    n = cases.count_cases(path)
                    not_run.extend([f"{path}: {r.problem}"] * max(0, n - 1))
                if r.result is not None:
                    runs.setdefault(name, []).append(r.result)
            results.extend(ran)
    passed = sum(r.passed for r in results)
    failed = len(results) - passed
    covered = (
        [coverage.stack_coverage(tree.stacks[n], runs.get(n, [])) for n in sorted(tree.stacks)]
        if measure
        else []
    )
    if args.json:
        doc = {
            "cases": [case_json(r) for r in results],
            "problems": [p.to_json() for p in tree.problems],
            "passed": passed,
            "failed": failed,
            "not_run": len(not_run),
        }
        if measure:
            doc["coverage"] = coverage.coverage_json(covered)
        json.dump(doc, sys.stdout, indent=2, default=_json_default)
        print()
    else:
        for r in results:
            inputs.write_terminal(sys.stdout, functools.partial(render_case, r))
            if args.explain and not r.passed and r.result is not None:  # why it failed
                why = explain.explain_json(explain.explain(tree.stacks[r.stack], r.result))
                inputs.write_terminal(sys.stdout, functools.partial(_render_explain, why))
        if not results and args.keyword and not not_run:
            print(f"no case under {args.target} has {args.keyword!r} in its name")
        elif not results and not tree.problems and not not_run:
            print(f"no test cases under {args.target} (they live in <stack>/tests/*.yaml)")
        tail = f", {len(not_run)} not run (they could not load)" if not_run else ""
        print(f"{passed} passed, {failed} failed{tail}")
    if args.junit is not None:
        args.junit.write_bytes(junit.junit_xml(results, _case_text, not_run))
    status = _coverage_status(args, covered) if measure else OK
    if not_run or (tree.problems and any(p.severity == "error" for p in tree.problems)):
        return FAILED
    if not results:
        return FAILED if args.keyword else status
    return FAILED if failed else status


def _coverage_status(args: argparse.Namespace, covered: list[coverage.StackCoverage]) -> int:
    from txcl import coverage

    render = {"json": None, "lcov": coverage.render_lcov, "table": coverage.render_table}
    kind = args.coverage or "table"
    out = io.StringIO()
    if kind == "json":
        out.write(json.dumps(coverage.coverage_json(covered), indent=2) + "\n")
    else:
        render[kind](covered, out)  # type: ignore[misc]
    if args.coverage_file is not None:
        args.coverage_file.write_text(out.getvalue(), encoding="utf-8")
    elif args.coverage and not (args.json and kind == "json"):
        sys.stderr.write(out.getvalue()) if args.json else sys.stdout.write(out.getvalue())
    percent = coverage.total_percent(covered)
    if args.fail_under is not None and percent < args.fail_under:
        print(f"txcl test: rule coverage {percent:.1f} % is under {args.fail_under:g} %", file=sys.stderr)
        return FAILED
    return OK


def _case_text(r: cases.CaseResult) -> str:
    out = io.StringIO()
    render_case(r, out)
    return out.getvalue()


def _watch(args: argparse.Namespace) -> int:
    """Run, then again whenever a file under the target changes; until interrupted."""
    root = args.target if args.target.is_dir() else args.target.resolve().parent.parent
    seen = _mtimes(root)
    status = _test_once(args)
    print("watching for changes (Ctrl-C to stop)", flush=True)
    while True:
        time.sleep(WATCH_INTERVAL_S)
        now = _mtimes(root)
        if now != seen:
            seen = now
            print(f"--- change under {root}: running again", flush=True)
            status = _test_once(args)
            sys.stdout.flush()
    return status  # pragma: no cover


def _mtimes(root: Path) -> dict[str, int]:
    out = {}
    for path in root.rglob("*"):
        if path.suffix in (".txcl", ".yaml", ".yml", ".json", ".eml"):
            try:
                out[str(path)] = path.stat().st_mtime_ns
            except OSError:
                continue
    return out


# --- rendering a run -------------------------------------------------------------------------


def _value(v: Any) -> str:
    if v is MISSING:
        return "missing"
    return json.dumps(v, ensure_ascii=False, default=_json_default)


def _short(v: Any, limit: int = 120) -> str:
    text = _value(v)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_result(stack: Stack, result: StackResult, out: TextIO) -> None:
    out.write(f"stack {stack.name}  ({result.elapsed_s * 1e3:.2f} ms)\n")
    out.write("fired:\n" if result.fired else "fired: no rule\n")
    for f in result.fired:
        out.write(f"  {f.pos}\n")
        for w in f.whens:
            out.write(f"      WHEN {w.text}   ✓\n")
        if not f.whens:
            out.write("      (no WHEN: always fires)\n")
        if f.captures:
            caps = ", ".join(f"match.{k} = {_value(v)}" for k, v in f.captures.items())
            out.write(f"      {caps}\n")
    out.write("steps:\n" if result.steps else "steps: none\n")
    for s in result.steps:
        if isinstance(s, SetRecord):
            note = f"   ({s.note})" if s.note else f"   (was {_short(s.before, 40)})"
            out.write(f"  {s.pos}  SET {path_text(s.path, at=True)} = {_short(s.after)}{note}\n")
        else:
            how = "executed" if s.executed else (s.note or "not executed")
            args = f" {_short(dict(s.args))}" if s.args else ""
            out.write(f"  {s.pos}  EXEC op://{s.op}{args}  [{how}]")
            out.write(f" -> {_short(s.patch)}\n" if s.patch else "\n")
    if result.error:
        out.write(f"error: {result.error}\n")
    res = _res(result.envelope)
    if res is not None:
        src, value = res
        out.write(f"_txc.{src}.res = {_short(value, 400)}\n")
    source = source_for(result.envelope)
    if source is not None:
        rows = source.replies(result.envelope, result.error)
        width = max((len(r) for r, _ in rows), default=0)
        out.write(f"replies ({source.name}):\n")
        for rcpt, line in rows:
            out.write(f"  {rcpt.ljust(width)}  {line}\n")


def _render_explain(why: list[dict[str, Any]], out: TextIO) -> None:
    from txcl import explain

    out.write("explain:\n")
    explain.render_explain(why, out)


def _res(envelope: Any) -> tuple[str, Any] | None:
    src = source_of(envelope)
    return None if src is None else (src, result_of(envelope, src))


def result_json(stack: Stack, result: StackResult) -> dict[str, Any]:
    source = source_for(result.envelope)
    res = _res(result.envelope)
    return {
        "stack": stack.name,
        **run_json(result),
        "res": None if res is None or res[1] is MISSING else res[1],
        "replies": [{"rcpt": r, "reply": line} for r, line in source.replies(result.envelope, result.error)]
        if source
        else None,
        "error": result.error.to_json() if result.error else None,
        "envelope": result.envelope,
        "elapsed_ms": round(result.elapsed_s * 1e3, 3),
    }


def _json_default(v: Any) -> Any:
    if v is MISSING:
        return None
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "items"):
        return dict(v.items())
    return repr(v)


# --- rendering test cases ---------------------------------------------------------------------


def render_case(r: cases.CaseResult, out: TextIO) -> None:
    where = f"{r.stack} · {Path(r.file).name} · {r.name}"
    if r.passed:
        out.write(f"PASS  {where}\n")
        return
    out.write(f"FAIL  {where}\n")
    if r.problem:
        out.write(_indent(str(r.problem), "      ") + "\n")
    for m in r.mismatches:
        out.write(f"      {m.what}:\n")
        out.write(_indent(_diff(m.expected, m.got), "        ") + "\n")
    if r.result is not None and r.result.error and not any(m.what == "error" for m in r.mismatches):
        out.write(f"      run error: {r.result.error}\n")


def _diff(expected: Any, got: Any) -> str:
    if not isinstance(expected, list | dict) and not isinstance(got, list | dict):
        return f"expected {_value(expected)}\n     got {_value(got)}"
    a = json.dumps(expected, indent=2, ensure_ascii=False, default=_json_default).splitlines()
    b = json.dumps(got, indent=2, ensure_ascii=False, default=_json_default).splitlines()
    return "\n".join(difflib.unified_diff(a, b, "expected", "got", lineterm="", n=2))


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def case_json(r: cases.CaseResult) -> dict[str, Any]:
    from txcl import cases

    return {
        "file": r.file,
        "name": r.name,
        "stack": r.stack,
        "passed": r.passed,
        "problem": r.problem.to_json() if r.problem else None,
        "mismatches": [{"what": m.what, "expected": m.expected, "got": m.got} for m in r.mismatches],
        "fired": cases.fired_labels(r.result) if r.result else [],
    }


# --- txcl replay -------------------------------------------------------------------------------


def cmd_replay(args: argparse.Namespace) -> int:
    from txcl import replay

    cache = _compile_cache(args)
    tree = load_target(args.ops, cache=cache)
    if cache is not None:
        cache.flush()
    if tree.problems:
        _print_problems(tree.problems, sys.stderr)
        if any(p.severity == "error" for p in tree.problems):
            return USAGE
    try:
        report = replay.replay(args.traces, tree)
    except FileNotFoundError as err:
        print(f"txcl replay: {err}", file=sys.stderr)
        return USAGE
    if args.format == "json":
        json.dump(replay.replay_json(report), sys.stdout, indent=2)
        print()
    else:
        inputs.write_terminal(sys.stdout, functools.partial(render_replay, report))
    return FAILED if report.changed else OK


def render_replay(report: replay.Report, out: TextIO) -> None:
    from txcl import replay

    for r in report.replays:
        out.write(f"{r.rid}  {r.stack or '-'}  {'CHANGED' if r.changed else 'same'}\n")
        if r.problem:
            out.write(f"    not replayed: {r.problem}\n")
        for v in r.verdicts:
            mark = "≠" if v.changed else "="
            recorded = replay.verdict_of(v.recorded) if v.recorded else "(none recorded)"
            out.write(f"    {v.rcpt}  {recorded}  {mark}  {v.replayed}\n")
        if r.error:
            out.write(f"    run error: {r.error}\n")
        for op in r.unanswered_ops:
            out.write(f"    op {op}: the trace holds no answer (not executed)\n")
        for note in r.fidelity:
            out.write(f"    fidelity: {note}\n")
    out.write(
        f"{report.changed} of {report.verdicts} verdicts changed "
        f"({len(report.replays)} traces replayed)\n"
    )


# --- txcl lint --------------------------------------------------------------------------------


def cmd_lint(args: argparse.Namespace) -> int:
    cache = _compile_cache(args)
    configured = _registry(args.config, args.targets[0], cache)
    # Without a config, ops are still checked: against the built-ins and installed plug-ins.
    registry = configured or OpRegistry.default()
    problems: list[Problem] = []
    stdin_text: str | None = None
    for target in args.targets:
        if str(target) == "-":  # an editor's buffer
            stdin_text = inputs.read_text("-")
            problems.extend(lint.lint_source(stdin_text, args.stdin_name, registry))
            continue
        if os.path.lexists(target) and not target.is_dir():
            inputs.require_regular(target)
        if not target.exists():
            print(f"txcl lint: {target}: no such file or folder", file=sys.stderr)
            return USAGE
        problems.extend(lint.lint_target(target, registry, cache=cache))
    if cache is not None:
        cache.flush()
    problems = suppress.unsuppressed(
        problems, lambda file: stdin_text if file == args.stdin_name else suppress.read_file(file)
    )
    RENDERERS[args.format](problems, sys.stdout)
    if configured is None and any(p.check == "unknown-op" for p in problems):
        print(
            f"txcl lint: no {CONFIG_NAME} found, so only built-in ops are known; "
            "give --config to check the ops it configures",
            file=sys.stderr,
        )
    return FAILED if any(p.severity == "error" for p in problems) else OK


def _compile_cache(args: argparse.Namespace) -> CompileCache | None:
    return None if args.no_cache else CompileCache(user_cache_dir())


def _render_text(problems: Sequence[Problem], out: TextIO) -> None:
    for p in problems:
        out.write(inputs.terminal_text(f"[{p.severity}] {p}\n"))
    errors = sum(p.severity == "error" for p in problems)
    out.write(f"{errors} error(s), {len(problems) - errors} warning(s)\n")


def _render_json(problems: Sequence[Problem], out: TextIO) -> None:
    errors = sum(p.severity == "error" for p in problems)
    doc = {"problems": [p.to_json() for p in problems], "errors": errors, "warnings": len(problems) - errors}
    json.dump(doc, out, indent=2)
    out.write("\n")


def _render_github(problems: Sequence[Problem], out: TextIO) -> None:
    # https://docs.github.com/actions/reference/workflow-commands-for-github-actions
    for p in problems:
        level = "error" if p.severity == "error" else "warning"
        where = f" file={p.pos.file},line={p.pos.line},col={p.pos.column}," if p.pos else " "
        title = p.check or p.code
        message = p.message.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
        out.write(f"::{level}{where}title={title}::{message}\n")


def _render_sarif(problems: Sequence[Problem], out: TextIO) -> None:
    json.dump(sarif.sarif_doc(problems), out, indent=2)
    out.write("\n")


RENDERERS: dict[str, Callable[[Sequence[Problem], TextIO], None]] = {
    "text": _render_text,
    "json": _render_json,
    "github": _render_github,
    "sarif": _render_sarif,
}


def _print_problems(problems: Sequence[Problem], out: TextIO) -> None:
    """Each problem with the line of its file and a caret under it, as lint shows them."""
    sources: dict[str, list[str]] = {}
    for p in problems:
        if p.pos is not None and p.pos.file not in sources:
            try:
                sources[p.pos.file] = source_lines(Path(p.pos.file).read_text("utf-8", "replace"))
            except OSError:
                sources[p.pos.file] = []
        shown = with_context(p, sources[p.pos.file]) if p.pos else str(p)
        out.write(inputs.terminal_text(f"{shown}\n"))


# --- txcl fmt ---------------------------------------------------------------------------------


def cmd_fmt(args: argparse.Namespace) -> int:
    if [str(p) for p in args.paths] == ["-"]:
        return _fmt_stdin(args)
    status = OK
    for path in _txcl_files(args.paths):
        try:
            source = read_rule_source(str(path))
        except TxclError as err:
            _print_problems(err.problems, sys.stderr)
            status = USAGE
            continue
        try:
            formatted = fmt.format_source(source, str(path))
        except TxclError as err:
            _print_problems(err.problems, sys.stderr)
            status = max(status, FAILED)
            continue
        changed = formatted != source
        if args.write:
            if changed:
                path.write_text(formatted, encoding="utf-8")
        elif args.check or args.list:
            if changed:
                print(path)
                status = max(status, FAILED)
        elif args.diff:
            if changed:
                sys.stdout.writelines(
                    difflib.unified_diff(
                        source.splitlines(keepends=True),
                        formatted.splitlines(keepends=True),
                        f"{path}",
                        f"{path} (formatted)",
                    )
                )
        else:
            sys.stdout.write(formatted)
    return status


def _fmt_stdin(args: argparse.Namespace) -> int:
    """`txcl fmt -`: standard input formatted to standard output (for editors)."""
    source = inputs.read_text("-")
    try:
        formatted = fmt.format_source(source, "<stdin>")
    except TxclError as err:
        _print_problems(err.problems, sys.stderr)
        return FAILED
    if args.check or args.list:
        if formatted != source:
            print("<stdin>")
            return FAILED
        return OK
    if args.diff:
        sys.stdout.writelines(
            difflib.unified_diff(
                source.splitlines(keepends=True), formatted.splitlines(keepends=True), "<stdin>", "<stdin> (formatted)"
            )
        )
        return OK
    sys.stdout.write(formatted)
    return OK


def _txcl_files(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            # not only regular files: a FIFO or a symlink loop is reported when read
            yield from sorted(p for p in path.rglob("*.txcl") if not p.is_dir())
        else:
            yield path


# --- shared -----------------------------------------------------------------------------------


def _registry(
    config: Path | None, target: Path, cache: CompileCache | None = None
) -> OpRegistry | None:
    """The ops a config names (with built-ins), or None when there is no config to read.
    With a cache, the `ops:` of a config file unchanged since it was read (its stat
    signature) are taken from the cache's stat index: a config routing thousands of
    tenants is not parsed again for its few ops."""
    path = config or _find_config(target)
    if path is None:
        return None
    index = signature = None
    if cache is not None:
        index = cache.stat_index(f"config\0{os.path.abspath(path)}", "")
        taken_ns = time.time_ns()
        signature = file_signature(path)
        kept = None if signature is None else index.get("ops", signature)
        if isinstance(kept, tuple) and len(kept) == 1:
            return OpRegistry.from_config(kept[0], path.parent)
    try:
        doc = inputs.load_yaml(path)
    except inputs.InputError as err:
        raise TxclError(err.problem("txcl_load_error")) from None
    ops = doc.get("ops") if isinstance(doc, dict) else None
    registry = OpRegistry.from_config(ops, path.parent)
    if index is not None and signature is not None:
        index.put("ops", signature, (ops,), taken_ns)
    return registry


def _find_config(target: Path) -> Path | None:
    """`./txco.yaml`, else the one beside the OPS tree the target lives in."""
    here = Path(CONFIG_NAME)
    if here.is_file():
        return here
    real = Path(os.path.realpath(target))  # resolve() raises on a symlink loop
    for folder in [real, *real.parents]:
        if folder.name == "OPS":
            candidate = folder.parent / CONFIG_NAME
            return candidate if candidate.is_file() else None
    return None


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "test": cmd_test,
    "lint": cmd_lint,
    "replay": cmd_replay,
    "fmt": cmd_fmt,
}


if __name__ == "__main__":
    sys.exit(main())
