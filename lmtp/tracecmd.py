"""`txco trace`: arguments and rendering; the data comes from txcl.trace. Also the
`txco serve` trace flags and the writer they configure. (`txco status` is the chassis's:
txcl.chassis.status.)

    txco trace              the latest request, at a glance
    txco trace RID          one request (a unique prefix of its rid is enough)
    txco trace --list       rid, time, src, route, per-recipient codes; oldest first
    txco trace --json       the same data as JSON, for jq
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from txcl import inputs
from txcl.envelope import parse_duration
from txcl.trace import (
    ARTIFACTS,
    TRACE_MODES,
    TraceWriter,
    read_summaries,
    read_trace,
    trace_names,
)

DEFAULT_TRACE_KEEP = 1000
DEFAULT_TRACE_MAX_AGE = "7d"
VALUE_WIDTH = 72  # a value longer than this is cut in the terminal view (never in --json)


# --- flags ---------------------------------------------------------------------------------


def parse_age(text: str) -> float:
    """`7d`, `12h`, `30m`, `90s` or seconds -> seconds; for argparse (`type=parse_age`)."""
    seconds = parse_duration(text, days=True)
    if seconds is None or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age (examples: 7d, 12h, 30m)")
    return seconds


def parse_keep(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def add_serve_trace_arguments(parser: argparse.ArgumentParser) -> None:
    """The trace and reload flags of `txco serve`."""
    group = parser.add_argument_group("traces and reload")
    group.add_argument(
        "--trace",
        choices=TRACE_MODES,
        default="all",
        help="which requests leave a trace under STATE_DIR/requests/: all, "
        "errors (failed runs and tempfails) or off (default: all)",
    )
    group.add_argument(
        "--trace-keep",
        type=parse_keep,
        default=DEFAULT_TRACE_KEEP,
        metavar="N",
        help=f"keep the newest N traces (default: {DEFAULT_TRACE_KEEP})",
    )
    group.add_argument(
        "--trace-max-age",
        type=parse_age,
        default=parse_age(DEFAULT_TRACE_MAX_AGE),
        metavar="AGE",
        help=f"remove traces older than this: 7d, 12h, 30m (default: {DEFAULT_TRACE_MAX_AGE})",
    )
    group.add_argument(
        "--watch-interval",
        type=parse_age,
        default=1.0,
        metavar="SECONDS",
        help="how often the OPS tree and config file are checked for changes (default: 1s)",
    )
    group.add_argument(
        "--no-watch",
        dest="watch",
        action="store_false",
        help="reload only on SIGHUP, not when files change",
    )


def trace_writer_from_args(args: argparse.Namespace, state_dir: str | Path) -> TraceWriter:
    return TraceWriter(
        state_dir, mode=args.trace, keep_count=args.trace_keep, keep_age_s=args.trace_max_age
    )


def add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    """`txco trace [RID] [--list] [--json] [-n N]` (the caller adds `--state-dir`)."""
    parser.add_argument(
        "rid", nargs="?", help="the request id (or a unique prefix); default: the latest request"
    )
    parser.add_argument(
        "--list", action="store_true", help="list the stored traces: rid, time, src, route, codes"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "-n",
        "--limit",
        type=int,
        default=50,
        metavar="N",
        help="with --list, the newest N only (0: all; default: 50)",
    )


# --- commands --------------------------------------------------------------------------------


def run_trace(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """0 shown · 1 no such trace (or none yet) · 2 an ambiguous rid prefix, or a trace file
    that could not be read (the rest is shown, and why on stderr)."""
    out = out or sys.stdout
    state_dir = Path(args.state_dir)
    if args.list:
        limit = None if args.limit <= 0 else args.limit
        summaries = read_summaries(state_dir, limit)
        if args.json:
            out.write(inputs.terminal_json(summaries) + "\n")
        else:
            return _show(out, lambda: format_list(summaries), state_dir / "requests")
        return 0
    try:
        name = resolve_rid(state_dir, args.rid)
        trace = read_trace(state_dir, name)
    except LookupError as err:
        print(f"txco trace: {err.args[0]}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"txco trace: {err}", file=sys.stderr)
        return 1
    folder = state_dir / "requests" / trace["name"]
    if args.json:
        out.write(inputs.terminal_json(trace_json(trace)) + "\n")
    else:
        if _show(out, lambda: format_trace(trace, folder), folder):
            return 2
    return 2 if _report_unreadable(trace, folder) else 0


def _show(out: TextIO, render: Callable[[], str], where: Path) -> int:
    """Write what `render` makes, control characters from the data shown as escapes; 2 (and
    why, on stderr) when the files it shows hold values of the wrong kind (a list where a
    record belongs: written by hand, or by another version)."""
    try:
        text = render()
    except (AttributeError, TypeError, ValueError) as err:
        print(f"txco: {where}: a value of an unexpected kind ({err})", file=sys.stderr)
        return 2
    out.write(inputs.terminal_text(text))
    return 0


def _report_unreadable(trace: Mapping[str, Any], folder: Path) -> bool:
    """Say on stderr why each artifact that is there could not be shown (read_trace maps it
    to None); True if there was one."""
    found = False
    for filename in ARTIFACTS:
        if trace.get(filename) is None and os.path.lexists(folder / filename):
            try:
                inputs.load_json_object(folder / filename)
            except inputs.InputError as err:
                print(f"txco trace: {err}", file=sys.stderr)
                found = True
    return found


def resolve_rid(state_dir: Path, rid: str | None) -> str | None:
    """None (the latest), an exact folder name, or a unique prefix of one."""
    if rid is None:
        return None
    names = trace_names(state_dir)
    if rid in names:
        return rid
    matches = [n for n in names if n.startswith(rid)]
    if len(matches) > 1 and len({m.split(".")[0] for m in matches}) == 1:
        return matches[0]  # one rid, several groups: the first, the others are `<rid>.N`
    if len(matches) > 1:
        raise LookupError(f"{rid!r} matches {len(matches)} traces: {', '.join(matches[:5])}")
    if not matches:
        raise FileNotFoundError(f"no trace {rid!r} under {state_dir / 'requests'}")
    return matches[0]


def trace_json(trace: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": trace["name"], **{f.removesuffix(".json"): trace.get(f) for f in ARTIFACTS}}


# --- rendering -------------------------------------------------------------------------------


def short(value: Any, width: int = VALUE_WIDTH) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    return text if len(text) <= width else text[: width - 1] + "…"


def codes_of(summary: Mapping[str, Any]) -> str:
    return ",".join(str(r.get("code")) for r in summary.get("recipients") or ()) or "-"


def route_of(summary: Mapping[str, Any]) -> str:
    route = summary.get("route")
    if isinstance(route, Mapping) and route.get("to"):
        return str(route["to"])
    return str(summary.get("stack") or "-")


def format_list(summaries: Sequence[Mapping[str, Any]]) -> str:
    if not summaries:
        return "no traces yet\n"
    rows = [("RID", "TIME", "SRC", "ROUTE", "CODES", "")]
    for s in summaries:
        flag = "error: " + str(s["error"]) if s.get("error") else ""
        rows.append(
            (
                str(s.get("name") or s.get("rid")),
                str(s.get("time", "")),
                str(s.get("src") or "-"),
                route_of(s),
                codes_of(s),
                flag,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip()
        + ("  " + row[5] if row[5] else "")
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def _step_line(step: Mapping[str, Any]) -> str:
    where = _short_pos(step.get("pos"))
    kind = step.get("kind")
    if kind == "set":
        path = step.get("path", "?")
        before = short(step["before"], 30) if "before" in step else "(missing)"
        after = short(step["after"], 40) if "after" in step else "(nothing written)"
        note = f"  [{step['note']}]" if step.get("note") else ""
        return f"SET {path}: {before} -> {after}{note}   {where}"
    if kind == "exec":
        ran = "" if step.get("executed", True) else f"  [{step.get('note') or 'not executed'}]"
        ms = f"  {1000 * float(step.get('elapsed_s') or 0):.1f}ms" if step.get("executed") else ""
        args = f" args {short(step.get('args') or {}, 40)}"
        patch = f" -> {short(step.get('patch'), 40)}" if step.get("patch") else ""
        return f"EXEC {step.get('op')}{args}{patch}{ran}{ms}   {where}"
    return short(step)


def _short_pos(pos: object) -> str:
    """`OPS/acme/_mail/0/10-support.txcl:3:1` -> `0/10-support.txcl:3:1`: the stack is known."""
    text = str(pos or "")
    parts = text.split("/")
    return "/".join(parts[-2:]) if len(parts) > 2 else text


def format_trace(trace: Mapping[str, Any], folder: Path) -> str:
    summary = trace.get("summary.json") or {}
    steps_doc = trace.get("steps.json") or {}
    result = trace.get("result.json") or {}
    response = trace.get("response.json") or {}
    elapsed = summary.get("elapsed_s")
    took = f"  {1000 * float(elapsed):.1f}ms" if isinstance(elapsed, int | float) else ""
    lines = [
        f"{summary.get('rid', trace.get('name'))}  {summary.get('time', '')}  "
        f"src={summary.get('src') or '-'}  stack={summary.get('stack') or '-'}{took}"
    ]
    route = summary.get("route")
    if isinstance(route, Mapping):
        lines.append("route    " + "  ".join(f"{k}={v}" for k, v in route.items()))
    replies = response.get("replies") or []
    width = max((len(str(r.get("rcpt"))) for r in replies), default=0)
    for i, reply in enumerate(replies):
        label = "replies " if i == 0 else "        "
        lines.append(f"{label} {str(reply.get('rcpt')).ljust(width)}  {reply.get('line')}")
    fired = steps_doc.get("fired") or []
    if not fired:
        lines.append("fired    no rule fired")
    for i, f in enumerate(fired):
        label = "fired   " if i == 0 else "        "
        lines.append(f"{label} stage {f.get('stage')}  {_short_pos(f.get('pos'))}")
        for when in f.get("whens") or []:
            lines.append(f"           WHEN {when.get('text')}")
        if f.get("captures"):
            lines.append(f"           captures {short(f['captures'], 60)}")
    steps = steps_doc.get("steps") or []
    for i, step in enumerate(steps):
        label = "steps   " if i == 0 else "        "
        lines.append(f"{label} {i + 1:>2}. {_step_line(step)}")
    if result.get("res") is not None:
        lines.append(f"res      {short(result['res'])}")
    error = result.get("error")
    if error:
        lines.append(f"ERROR    {error.get('text') or error.get('message')}")
    scrubbed = result.get("scrubbed") or {}
    if scrubbed.get("omit") or scrubbed.get("redact"):
        lines.append(
            f"scrubbed omit: {', '.join(scrubbed.get('omit') or ()) or '-'};  "
            f"redact: {', '.join(scrubbed.get('redact') or ()) or '-'}"
        )
    lines.append(f"files    {folder}/")
    return "\n".join(lines) + "\n"
