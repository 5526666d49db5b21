"""`txco trace`: arguments and rendering; the data comes from txcl.trace. Also the
`txco serve` trace flags and the writer they configure. (`txco status` is the chassis's:
txcl.chassis.status.)

    txco trace              the latest request, at a glance
    txco trace RID          one request (a unique prefix of its rid is enough)
    txco trace --list       rid, time, src, route, per-recipient codes; oldest first
                            (--rcpt, --message-id, --tenant, --stack, --verdict filter it)
    txco trace --json       the same data as JSON, for jq
    txco trace --message    the message stored with it, as received (scrubbed)
    txco trace --explain    every rule of every stage, fired or not, as the run recorded it
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from txcl import inputs
from txcl.envelope import parse_duration
from txcl.trace import TRACE_MODES
from txcl.trace_store import PARTS, read_message, read_summaries, read_trace, trace_names
from txcl.trace_writer import TraceWriter

DEFAULT_TRACE_KEEP = 1000
DEFAULT_TRACE_MAX_AGE = "7d"
DEFAULT_TRACE_KEEP_BYTES = "1G"
DEFAULT_TRACE_MAX_BYTES = "32M"
VALUE_WIDTH = 72  # a value longer than this is cut in the terminal view (never in --json)

_SIZE = re.compile(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


# --- flags ---------------------------------------------------------------------------------


def parse_age(text: str) -> float:
    """`7d`, `12h`, `30m`, `90s` or seconds -> seconds; for argparse (`type=parse_age`)."""
    seconds = parse_duration(text, days=True)
    if seconds is None or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age (examples: 7d, 12h, 30m)")
    return seconds


def parse_size(text: str) -> int:
    """`64M`, `1G`, `512K`, `1GiB` or bytes -> bytes (binary units); for argparse."""
    match = _SIZE.match(text)
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 32M, 1G, 512K)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


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
        "--trace-keep-bytes",
        type=parse_size,
        default=DEFAULT_TRACE_KEEP_BYTES,
        metavar="SIZE",
        help="keep at most this many bytes of traces in all, the newest first: 512M, 1G "
        f"(default: {DEFAULT_TRACE_KEEP_BYTES})",
    )
    group.add_argument(
        "--trace-max-bytes",
        type=parse_size,
        default=DEFAULT_TRACE_MAX_BYTES,
        metavar="SIZE",
        help="one trace's limit: above it the message, then the envelope and steps are left "
        f"out; the summary, result and replies stay (default: {DEFAULT_TRACE_MAX_BYTES})",
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
        state_dir,
        mode=args.trace,
        keep_count=args.trace_keep,
        keep_age_s=args.trace_max_age,
        keep_bytes=args.trace_keep_bytes,
        max_trace_bytes=args.trace_max_bytes,
        file_process=True,
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
        "--message",
        action="store_true",
        help="write the message stored with the trace (scrubbed) to standard output, "
        "as it was received",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="every rule of every stage, fired or not, each WHEN's result and the values it "
        "compared, as the server recorded them when it ran (the rules as they were then)",
    )
    parser.add_argument(
        "-n",
        "--limit",
        type=int,
        default=50,
        metavar="N",
        help="with --list, the newest N only, after the filters (0: all; default: 50)",
    )
    filters = parser.add_argument_group("--list filters (all given must match)")
    filters.add_argument(
        "--rcpt", metavar="ADDR", help="a recipient (any case; * and ? match as in globs)"
    )
    filters.add_argument(
        "--message-id", metavar="ID", help="the Message-ID, with or without its <>"
    )
    filters.add_argument("--tenant", metavar="NAME", help="the routed tenant")
    filters.add_argument(
        "--stack", metavar="NAME", help="the stack: tenant/stack, or the stack's own name"
    )
    filters.add_argument(
        "--verdict",
        metavar="V",
        help="a recipient's reply: a code (550), a class (4xx), accepted (2xx), "
        "tempfailed (4xx) or rejected (5xx)",
    )


# --- commands --------------------------------------------------------------------------------


def run_trace(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """0 shown · 1 no such trace (or none yet) · 2 an ambiguous rid prefix, or a trace file
    that could not be read (the rest is shown, and why on stderr)."""
    out = out or sys.stdout
    state_dir = Path(args.state_dir)
    if args.list:
        limit = None if args.limit <= 0 else args.limit
        try:
            keep = list_filter(args)
        except ValueError as err:
            print(f"txco trace: {err}", file=sys.stderr)
            return 2
        if keep is None:
            summaries = read_summaries(state_dir, limit)
        else:
            summaries = [s for s in read_summaries(state_dir) if keep(s)]
            summaries = summaries[-limit:] if limit else summaries
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
    if args.message:
        return _write_message(state_dir, trace["name"], out)
    if args.explain:
        return _explain(trace, args.json, out)
    if args.json:
        out.write(inputs.terminal_json(trace_json(trace)) + "\n")
    else:
        if _show(out, lambda: format_trace(trace, folder), folder):
            return 2
    return 2 if _report_unreadable(trace, folder) else 0


def _explain(trace: Mapping[str, Any], as_json: bool, out: TextIO) -> int:
    """What the run recorded for explain (`steps.explain`), rendered as `txcl test --explain`
    renders a run; 1 (and why, on stderr) when the trace holds none."""
    # imported here: `txco serve` (which imports this module) starts without the rule engine
    from txcl.explain import render_explain

    summary = trace.get("summary") or {}
    rules = (trace.get("steps") or {}).get("explain")
    if not isinstance(rules, list):
        print(f"txco trace: {trace['name']}: {_no_explain_reason(summary)}", file=sys.stderr)
        return 1
    error = (trace.get("result") or {}).get("error") or {}
    error_text = error.get("text") or error.get("message") if isinstance(error, Mapping) else None
    if as_json:
        doc = {
            "rid": summary.get("rid", trace["name"]),
            "time": summary.get("time"),
            "stack": summary.get("stack"),
            "explain": rules,
            "error": error_text or None,
        }
        out.write(inputs.terminal_json(doc) + "\n")
        return 0

    def render() -> str:
        text = io.StringIO()
        text.write(
            f"{summary.get('rid', trace['name'])}  {summary.get('time', '')}  "
            f"stack={summary.get('stack') or '-'}  (as recorded: the rules and values of that run)\n"
        )
        if not rules:
            text.write("no stage ran\n")
        render_explain(rules, text)
        if error_text:
            text.write(f"ERROR    {error_text} (the run stopped there)\n")
        return text.getvalue()

    return _show(out, render, Path(trace["name"]))


def _no_explain_reason(summary: Mapping[str, Any]) -> str:
    if any(str(part).startswith("steps") for part in summary.get("cut") or ()):
        return "its steps, and what explain needs with them, were cut to fit --trace-max-bytes"
    if summary.get("error"):
        return f"no rules ran to explain ({summary['error']})"
    return (
        "the trace holds nothing to explain: it was written before txco recorded explain "
        "data, or no stack ran for it (an unrouted recipient or a stack it does not serve). "
        "`txcl replay` runs its envelope on the current rules"
    )


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
    for part in PARTS:  # a trace of the five-file layout: one <part>.json each
        filename = f"{part}.json"
        if trace.get(part) is None and os.path.lexists(folder / filename):
            try:
                inputs.load_json_object(folder / filename)
            except inputs.InputError as err:
                print(f"txco trace: {err}", file=sys.stderr)
                found = True
    return found


def _write_message(state_dir: Path, name: str, out: TextIO) -> int:
    message = read_message(state_dir, name)
    if message is None:
        print(
            f"txco trace: no message stored with {name} (WITH omit or a body hint left it "
            "out, or it was cut by --trace-max-bytes)",
            file=sys.stderr,
        )
        return 1
    out.flush()
    buffer = getattr(out, "buffer", None)
    if buffer is not None:
        buffer.write(message)
        buffer.flush()
    else:  # a text stream without bytes beneath (tests): the bytes as the parser reads them
        out.write(message.decode("utf-8", "surrogateescape"))
    return 0


_VERDICT_WORDS = {"accepted": "2xx", "tempfailed": "4xx", "rejected": "5xx"}
_VERDICT = re.compile(r"[245](?:\d\d|xx)\Z")


def _verdict_matches(wanted: str) -> Callable[[object], bool]:
    pattern = _VERDICT_WORDS.get(wanted.lower(), wanted.lower())
    if not _VERDICT.match(pattern):
        raise ValueError(
            f"--verdict {wanted!r}: give a code (550), a class (4xx), "
            "accepted, tempfailed or rejected"
        )
    return lambda code: isinstance(code, int) and (
        str(code) == pattern or (pattern.endswith("xx") and str(code)[0] == pattern[0])
    )


def _bare_message_id(text: object) -> str:
    return str(text or "").strip().removeprefix("<").removesuffix(">")


def list_filter(args: argparse.Namespace) -> Callable[[Mapping[str, Any]], bool] | None:
    """The `--list` filters given, as one predicate on a summary; None when none is given.
    Raises ValueError for a filter that cannot match anything as written."""
    tests: list[Callable[[Mapping[str, Any]], bool]] = []
    if args.rcpt:
        glob = args.rcpt.lower()
        tests.append(lambda s: any(
            fnmatch.fnmatchcase(str(r.get("rcpt", "")).lower(), glob)
            for r in s.get("recipients") or ()))
    if args.message_id:
        wanted_id = _bare_message_id(args.message_id)
        tests.append(lambda s: _bare_message_id(s.get("message_id")) == wanted_id)
    if args.tenant:
        tests.append(lambda s: (s.get("route") or {}).get("tenant") == args.tenant)
    if args.stack:
        whole = "/" in args.stack
        tests.append(lambda s: args.stack == (
            str(s.get("stack") or "") if whole else str(s.get("stack") or "").split("/")[-1]))
    if args.verdict:
        code_matches = _verdict_matches(args.verdict)
        tests.append(lambda s: any(
            code_matches(r.get("code")) for r in s.get("recipients") or ()))
    if not tests:
        return None
    return lambda summary: all(test(summary) for test in tests)


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
        raise FileNotFoundError(
            f"no trace {rid!r} under {state_dir / 'requests'} (pruned, or never kept: "
            "--trace=errors keeps only failed runs and tempfails, --trace=off none)"
        )
    return matches[0]


def trace_json(trace: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": trace["name"], **{part: trace.get(part) for part in PARTS}}


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
    return "\n".join(inputs.terminal_text(line, keep="") for line in lines) + "\n"


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
    summary = trace.get("summary") or {}
    steps_doc = trace.get("steps") or {}
    result = trace.get("result") or {}
    response = trace.get("response") or {}
    elapsed = summary.get("elapsed_s")
    took = f"  {1000 * float(elapsed):.1f}ms" if isinstance(elapsed, int | float) else ""
    lines = [
        f"{summary.get('rid', trace.get('name'))}  {summary.get('time', '')}  "
        f"src={summary.get('src') or '-'}  stack={summary.get('stack') or '-'}{took}"
    ]
    route = summary.get("route")
    if isinstance(route, Mapping):
        lines.append("route    " + "  ".join(f"{k}={v}" for k, v in route.items()))
    message = [
        f"{label}={short(summary[key], 60)}"
        for key, label in (("message_id", "id"), ("sender", "sender"), ("subject", "subject"))
        if summary.get(key) not in (None, "")
    ]
    if message:
        lines.append("message  " + "  ".join(message))
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
    return "\n".join(inputs.terminal_text(line, keep="") for line in lines) + "\n"
