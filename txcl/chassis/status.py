"""`<state-dir>/status.json`, which a serving process keeps current, and `txco status`,
which prints it: the serving version of the rules, the last reload and its problems."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from txcl import inputs
from txcl.errors import Problem

STATUS_FILE = "status.json"


def iso_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def problem_json(problem: Problem) -> dict[str, Any]:
    return {**problem.to_json(), "text": str(problem)}


def write_json_atomically(path: Path, doc: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_status(state_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The status.json a running `txco serve` keeps. FileNotFoundError if there is none,
    InputError (a ValueError) if it is not a bounded JSON object."""
    path = Path(state_dir) / STATUS_FILE
    if not os.path.lexists(path):
        raise FileNotFoundError(path)
    return inputs.load_json_object(path)


def format_status(status: Mapping[str, Any]) -> str:
    last = status.get("last_reload") or {}
    lines = [
        f"serving version {status.get('version')} since {status.get('loaded_at')}"
        f" (pid {status.get('pid')}, {status.get('stacks')} stacks)",
        f"ops: {status.get('ops_dir')}   config: {status.get('config_file') or '-'}",
    ]
    verdict = "ok" if last.get("ok") else "FAILED, still serving the version above"
    lines.append(
        f"last reload: {verdict} ({last.get('trigger')}, {last.get('at')}, "
        f"{last.get('duration_s')}s)"
    )
    for problem in last.get("problems") or ():
        text = problem.get("text") or problem.get("message", "")
        lines.extend("  " + line for line in str(text).splitlines())
    warnings = status.get("warnings") or ()
    if warnings and warnings != last.get("problems"):
        lines.append(f"warnings of version {status.get('version')}:")
        for problem in warnings:
            lines.append("  " + str(problem.get("text") or problem.get("message", "")))
    return "\n".join(lines)


# --- `txco status` ---------------------------------------------------------------------------


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    """`txco status [--json] [--state-dir DIR]`."""
    parser.add_argument("--json", action="store_true", help="print status.json as it is")
    parser.add_argument("--state-dir", metavar="DIR", default="var",
                        help="where txco serve writes status.json (default: ./var)")


def run_status(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """0 last reload fine · 1 last reload failed (an old version serves) · 2 no status, or
    the server that wrote it is no longer running (its last status is still printed)."""
    out = out or sys.stdout
    try:
        status = read_status(args.state_dir)
    except FileNotFoundError:
        print(
            f"txco status: no status.json under {args.state_dir} "
            "(is txco serve running with this --state-dir?)",
            file=sys.stderr,
        )
        return 2
    except (OSError, ValueError) as err:
        print(f"txco status: cannot read the status under {args.state_dir}: {err}", file=sys.stderr)
        return 2
    if args.json:
        out.write(inputs.terminal_json(status) + "\n")
    else:
        try:
            text = format_status(status)
        except (AttributeError, TypeError, ValueError) as err:
            print(f"txco: {Path(args.state_dir, STATUS_FILE)}: a value of an unexpected "
                  f"kind ({err})", file=sys.stderr)
            return 2
        out.write(inputs.terminal_text(text) + "\n")
    if not _is_running(status.get("pid")):
        print(
            f"txco status: not running: the txco serve that wrote this status "
            f"(pid {status.get('pid')}) has stopped; the status above is its last",
            file=sys.stderr,
        )
        return 2
    last = status.get("last_reload")
    return 1 if isinstance(last, dict) and not last.get("ok", True) else 0


def _is_running(pid: object) -> bool:
    """Whether process `pid` exists (signal 0 checks without sending anything)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
