"""`<state-dir>/status.json`, which a serving process keeps current, and `txco status`,
which prints it: the serving version of the rules, the last reload and its problems, and
what the loaded stacks weigh."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import mmap
import os
import sys
import threading
import types
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from txcl import inputs
from txcl.errors import Problem

STATUS_FILE = "status.json"
# How often a serving process rewrites status.json while its counters move (never when idle).
COUNTERS_REFRESH_S = 2.0


class Counters:
    """Named event counts of the server (`rcpt_refused` by reason, ...), for status.json.

    Counters are registered by name at import time, before `--workers` fork; `share(n)`
    (the parent, before forking) moves them into memory every worker shares, one row per
    worker written only by its owner (`use_row`), so status.json shows the sum over all
    workers whichever writes it, and a replaced worker goes on from its row. Counting is an
    add to a memoryview: cheap enough for the paths that count (refusals)."""

    CAPACITY = 64  # registered counters at most

    def __init__(self) -> None:
        self._index: dict[tuple[str, str], int] = {}
        self._rows = 1
        self._cells = memoryview(bytearray(8 * self.CAPACITY)).cast("q")
        self._mine = self._cells  # this process's row
        self._memory: mmap.mmap | None = None

    def counter(self, group: str, name: str) -> int:
        """The index of counter `group`/`name` (registered once, at import)."""
        key = (group, name)
        index = self._index.get(key)
        if index is None:
            if len(self._index) >= self.CAPACITY:
                raise ValueError(f"more than {self.CAPACITY} counters")
            index = self._index[key] = len(self._index)
        return index

    def add(self, index: int, amount: int = 1) -> None:
        self._mine[index] += amount

    def share(self, workers: int) -> None:
        """Counts from now on live in memory shared with processes forked later."""
        self._memory = mmap.mmap(-1, 8 * self.CAPACITY * workers)  # MAP_SHARED | ANONYMOUS
        self._cells = memoryview(self._memory).cast("q")
        self._rows = workers
        self._mine = self._cells[: self.CAPACITY]

    def use_row(self, row: int) -> None:
        """In a forked worker: count in row `row` (its worker slot)."""
        self._mine = self._cells[row * self.CAPACITY : (row + 1) * self.CAPACITY]

    def snapshot(self) -> dict[str, dict[str, int]]:
        """{group: {name: count}} summed over every worker, each registered counter shown."""
        out: dict[str, dict[str, int]] = {}
        for (group, name), index in self._index.items():
            total = sum(self._cells[row * self.CAPACITY + index] for row in range(self._rows))
            out.setdefault(group, {})[name] = total
        return out


COUNTERS = Counters()


async def keep_counters_current(write_status: Callable[[], None],
                                interval_s: float = COUNTERS_REFRESH_S) -> None:
    """Rewrite status.json (in a thread) every `interval_s` in which the counters moved."""
    written = COUNTERS.snapshot()
    while True:
        await asyncio.sleep(interval_s)
        now = COUNTERS.snapshot()
        if now != written:
            await asyncio.to_thread(write_status)
            written = now


def iso_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def problem_json(problem: Problem) -> dict[str, Any]:
    return {**problem.to_json(), "text": str(problem)}


def write_json_atomically(path: Path, doc: Mapping[str, Any]) -> None:
    """Replace `path` whole, private to the server's user whatever the umask (0600)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Per process and thread: a reload and the counters' refresh may write at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    data = (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover temp file keeps its old mode through O_CREAT
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# How many stacks, spread over the tree, are weighed for the memory figure of status.json.
MEMORY_SAMPLE = 32
_NOT_OWNED = (type, types.ModuleType, types.CodeType, types.BuiltinFunctionType)


def stack_memory(stacks: Mapping[str, object], sample: int = MEMORY_SAMPLE) -> dict[str, Any]:
    """What the loaded stacks weigh: the bytes of the Python objects each holds (its rules,
    compiled paths and regexes, plans), weighed on up to `sample` stacks spread over the
    tree, and that mean times the number of stacks. Modules, classes, code and functions
    that are not closures are shared by all stacks and not counted; the closures a compiled
    rule made are. Memory inside a C library (RE2's programs) is not seen."""
    names = sorted(stacks)
    if not names:
        return {"stacks": 0, "sampled": 0, "bytes_per_stack": 0, "max_bytes": 0,
                "estimated_bytes": 0}
    step = max(1, len(names) // sample)
    picked = names[::step][:sample]
    weights = [_weigh(stacks[name]) for name in picked]
    mean = sum(weights) // len(weights)
    return {"stacks": len(names), "sampled": len(weights), "bytes_per_stack": mean,
            "max_bytes": max(weights), "estimated_bytes": mean * len(names)}


def _weigh(root: object) -> int:
    """sys.getsizeof over everything reachable from `root`, each object once, but for what
    is shared with the rest of the process (see stack_memory). Module namespaces are not
    scanned for it: in a worker of --workers that would touch, and so copy, every page of
    every module the parent imported."""
    seen: set[int] = set()
    pending = [root]
    total = 0
    while pending:
        obj = pending.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, types.FunctionType):
            if obj.__closure__ is not None:  # made for this stack: it and its cells
                total += sys.getsizeof(obj)
                pending.extend(obj.__closure__)
                pending.extend(obj.__defaults__ or ())
            continue
        if isinstance(obj, _NOT_OWNED):
            continue
        total += sys.getsizeof(obj)
        pending.extend(gc.get_referents(obj))
    return total


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
    memory = status.get("memory")
    if isinstance(memory, dict) and memory.get("stacks") and all(
        isinstance(memory.get(key), int)
        for key in ("bytes_per_stack", "sampled", "stacks", "max_bytes", "estimated_bytes")
    ):
        lines.append(
            f"memory: about {memory['bytes_per_stack'] / 1024:,.0f} KiB per loaded stack "
            f"(weighed {memory['sampled']} of {memory['stacks']}; largest "
            f"{memory['max_bytes'] / 1024:,.0f} KiB), about "
            f"{memory['estimated_bytes'] / (1 << 20):,.1f} MiB for all"
        )
    counters = status.get("counters")
    if isinstance(counters, dict):
        for group, counts in sorted(counters.items()):
            if isinstance(counts, dict):
                shown = ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
                lines.append(f"{group.replace('_', ' ')}: {shown or '-'}")
    failed = [f for f in last.get("failed_stacks") or () if isinstance(f, dict)]
    if last.get("ok"):
        verdict = "ok"
    elif failed:
        verdict = f"FAILED for {len(failed)} stack(s); all else in the version above is live"
    else:
        verdict = "FAILED, still serving the version above"
    lines.append(
        f"last reload: {verdict} ({last.get('trigger')}, {last.get('at')}, "
        f"{last.get('duration_s')}s)"
    )
    for stack in failed:
        serving = ("FAILED, still serving its last good version"
                   if stack.get("serving") == "last good version"
                   else "FAILED, not served (its mail gets 451 4.3.0)")
        lines.append(f"  stack {stack.get('stack')}: {serving}")
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
