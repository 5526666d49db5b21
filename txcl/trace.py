"""Trace records of stack runs: `<state-dir>/requests/<rid>/`, scrubbed, written in the background.

One folder per run, JSON files a person can read and jq can query:

    summary.json    rid, time, src, route, stack, error, per-recipient codes (for `--list`)
    envelope.json   the inbound envelope
    steps.json      the rules that fired and why, then every SET and EXEC in order
    result.json     error, timings, the final `_txc.<src>.res`
    response.json   the exact reply lines sent, one per recipient

Scrubbing: the `WITH omit` / `WITH redact` hints of every rule of the stack (fired or not)
apply to every artifact when it is written; the run never sees them (nothing here mutates
what it is given). Beyond the paths themselves, a value found at a scrubbed path is also
scrubbed where it reappears (an op argument, a SET value, a regex group, a reply line),
because a secret copied elsewhere is still the secret.

Writing never slows or fails the caller: `TraceWriter.__call__` only enqueues (a full queue
drops the trace and counts it); a worker thread serialises, writes into a temporary folder,
renames it into place, and prunes by count and age. An I/O error loses that trace, is
counted, and is logged at most once per interval.

This module knows nothing of mail: a source's replies are (recipient, reply line) pairs.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Final, Literal

from txcl import inputs
from txcl.envelope import parse_path, path_text, result_of, route_of, source_of
from txcl.errors import Pos, Problem
from txcl.records import ExecRecord, ScrubHints, SetRecord, fired_json, step_json
from txcl.values import MISSING

log = logging.getLogger("txcl.trace")

REDACTED: Final = "[REDACTED]"
TRACE_MODES: Final = ("all", "errors", "off")
TraceMode = Literal["all", "errors", "off"]

ENVELOPE_FILE: Final = "envelope.json"
STEPS_FILE: Final = "steps.json"
RESULT_FILE: Final = "result.json"
RESPONSE_FILE: Final = "response.json"
SUMMARY_FILE: Final = "summary.json"
ARTIFACTS: Final = (SUMMARY_FILE, ENVELOPE_FILE, STEPS_FILE, RESULT_FILE, RESPONSE_FILE)

# Below these lengths a string is too common to treat as a copy of a secret.
_MIN_TAINT_SUBSTRING: Final = 8
# A scrubbed string longer than this (a whole raw message) is matched by equality only:
# substring scans of megabytes per trace leaf would cost more than they protect.
_MAX_TAINT_SCAN: Final = 1 << 20

_SAFE_RID = re.compile(r"[^A-Za-z0-9._-]")


# --- scrub hints -------------------------------------------------------------------------

Action = Literal["omit", "redact"]
PathSegs = tuple[str | int, ...]


@lru_cache(maxsize=1024)
def _cached_hints(hints: object) -> ScrubHints:
    return ScrubHints.of(hints)


def _hints_of(hints: object) -> ScrubHints:
    """ScrubHints.of, once per distinct (hashable) hints object: called on every delivery."""
    try:
        return _cached_hints(hints)
    except TypeError:  # unhashable, e.g. a plain dict
        return ScrubHints.of(hints)


def parse_hint_path(text: str) -> PathSegs:
    """`_txc.lmtp.msg.raw` -> ("_txc", "lmtp", "msg", "raw"). `@x` is `_txc.x`; digits index
    lists; `"a.b"` quotes a key with dots; `*` matches any key or index. ValueError if
    `text` is not a path (txcl.envelope.parse_path)."""
    segments = parse_path(text, wildcards=True)
    if segments is None:
        raise ValueError(f"not a path: {text!r}")
    return segments


def _seg_matches(pattern: str | int, actual: str | int) -> bool:
    return pattern == "*" or str(pattern) == str(actual)


class _Omitted:
    """Marks a value that scrubbing removed; its container drops the key."""


_OMITTED: Final = _Omitted()


def _apply(node: Any, segs: PathSegs, action: Action) -> Any:
    """`node` with the path `segs` (non-empty) omitted or redacted; copies only what changes."""
    head, rest = segs[0], segs[1:]
    keys: list[Any]
    if isinstance(node, dict):
        keys = list(node) if head == "*" else [k for k in (str(head),) if k in node]
    elif isinstance(node, list):
        if head == "*":
            keys = list(range(len(node)))
        elif isinstance(head, int) or head.isdigit():
            keys = [i for i in (int(head),) if i < len(node)]
        else:
            keys = []
    else:
        return node
    if not keys:
        return node
    out = node.copy()
    for key in reversed(keys):  # deleting list items from the end keeps the indexes valid
        new = _act(node[key], action) if not rest else _apply(node[key], rest, action)
        if new is _OMITTED:
            del out[key]
        else:
            out[key] = new
    return out


def _act(_value: Any, action: Action) -> Any:
    return _OMITTED if action == "omit" else REDACTED


def _collect(node: Any, segs: PathSegs) -> Iterator[Any]:
    """Every value at `segs` in `node` (wildcards expand)."""
    if not segs:
        yield node
        return
    head, rest = segs[0], segs[1:]
    if isinstance(node, dict):
        if head == "*":
            for value in node.values():
                yield from _collect(value, rest)
        elif str(head) in node:
            yield from _collect(node[str(head)], rest)
    elif isinstance(node, list):
        if head == "*":
            for value in node:
                yield from _collect(value, rest)
        elif (isinstance(head, int) or str(head).isdigit()) and int(head) < len(node):
            yield from _collect(node[int(head)], rest)


class Scrubber:
    """Compiled hints: apply them to whole documents, to values found at a path, and to
    loose data that may hold copies of scrubbed values."""

    def __init__(self, hints: ScrubHints) -> None:
        # Redactions first, omissions last: an omitted path never survives as "[REDACTED]".
        self.rules: tuple[tuple[PathSegs, Action], ...] = tuple(
            [(parse_hint_path(p), "redact") for p in hints.redact]
            + [(parse_hint_path(p), "omit") for p in hints.omit]
        )

    def __bool__(self) -> bool:
        return bool(self.rules)

    def document(self, doc: Any) -> Any:
        """A document rooted at the envelope root (an envelope, a merge patch)."""
        for segs, action in self.rules:
            doc = _apply(doc, segs, action)
        return doc

    def at(self, where: PathSegs, value: Any) -> Any:
        """`value` found at path `where` of the envelope; `_OMITTED` if it goes entirely."""
        for segs, action in self.rules:
            common = min(len(where), len(segs))
            if not all(_seg_matches(segs[k], where[k]) for k in range(common)):
                continue
            if len(segs) <= len(where):
                return _act(value, action)
            value = _apply(value, segs[len(where) :], action)
        return value

    def taint(self, *docs: Any) -> Taint:
        """The values at scrubbed paths of these envelopes, to find their copies elsewhere."""
        taint = Taint()
        for doc in docs:
            for segs, action in self.rules:
                for value in _collect(doc, segs):
                    taint.add(value, action)
        return taint


class Taint:
    """Values that were scrubbed, so copies of them are scrubbed too."""

    def __init__(self) -> None:
        self.exact: dict[str, Action] = {}
        self.containers: list[tuple[Any, Action]] = []
        self.scan: list[tuple[str, Action]] = []

    def add(self, value: Any, action: Action) -> None:
        if isinstance(value, str):
            if value and self.exact.get(value) != "omit":
                self.exact[value] = action
                if len(value) <= _MAX_TAINT_SCAN:
                    self.scan.append((value, action))
        elif isinstance(value, dict | list):
            self.containers.append((value, action))
            for leaf in value.values() if isinstance(value, dict) else value:
                self.add(leaf, action)

    def __bool__(self) -> bool:
        return bool(self.exact or self.containers)

    def clean(self, value: Any) -> Any:
        """`value` with every copy of a scrubbed value scrubbed; `_OMITTED` if it goes."""
        if not self:
            return value
        return self._clean(value)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            action = self.exact.get(value)
            if action:
                return _act(value, action)
            if len(value) >= _MIN_TAINT_SUBSTRING:
                for secret, secret_action in self.scan:
                    if value in secret:
                        return _act(value, secret_action)
            for secret, _ in self.scan:
                if len(secret) >= _MIN_TAINT_SUBSTRING and secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict | list):
            for container, action in self.containers:
                if type(container) is type(value) and container == value:
                    return _act(value, action)
            if isinstance(value, dict):
                out = {}
                for key, item in value.items():
                    new = self._clean(item)
                    if new is not _OMITTED:
                        out[key] = new
                return out
            return [new for new in map(self._clean, value) if new is not _OMITTED]
        return value


@lru_cache(maxsize=256)
def scrubber_for(hints: ScrubHints) -> Scrubber:
    """One compiled Scrubber per distinct set of hints (a stack's hints rarely change)."""
    return Scrubber(hints)


# --- turning results into plain JSON -----------------------------------------------------


def plain(value: Any) -> Any:
    """JSON-ready data from run results: dataclasses become objects, positions become
    `file:line:col`, MISSING becomes an absent key, tuples become lists."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if value is MISSING:
        return _OMITTED
    if isinstance(value, Pos):
        return str(value)
    if isinstance(value, Problem):
        return {**value.to_json(), "text": str(value)}
    if isinstance(value, Mapping):
        return {
            str(k): v for k, v in ((k, plain(v)) for k, v in value.items()) if v is not _OMITTED
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [v for v in map(plain, value) if v is not _OMITTED]
    if isinstance(value, bytes):
        return "b64:" + base64.b64encode(value).decode("ascii")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = plain(getattr(value, f.name))
            if item is not _OMITTED:
                out[f.name] = item
        return out
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def path_segments(value: Any) -> PathSegs | None:
    """The envelope path a step names, whatever form the runner gives it in."""
    segments = getattr(value, "segments", None)
    if segments is not None:
        value = segments
    if isinstance(value, str):
        return parse_hint_path(value) if value and not value.startswith("$") else None
    if isinstance(value, list | tuple) and all(isinstance(s, str | int) for s in value):
        return tuple(value)
    return None


def dotted(segs: PathSegs) -> str:
    return path_text(segs)


# Field names of a step, by how scrubbing treats them.
_STEP_PATH_FIELDS: Final = ("path", "target")
_STEP_VALUE_FIELDS: Final = ("before", "after", "value", "old", "new")
_STEP_ROOTED_FIELDS: Final = ("patch", "merge_patch")
# Fields a kind of step never uses: left out so each step reads as what it did.
_UNUSED_BY_KIND: Final = {
    "set": frozenset({"op", "args", "patch", "executed", "elapsed_s"}),
    "exec": frozenset({"path", "target", "before", "after"}),
}


def scrub_step(step: Any, scrubber: Scrubber, taint: Taint) -> dict[str, Any]:
    """One SET or EXEC step: values at its path are scrubbed by path, a patch by the
    envelope's paths, and everything else (op args, results) for copies of secrets."""
    raw = step if isinstance(step, Mapping) else None
    doc = step_json(step) if isinstance(step, SetRecord | ExecRecord) else plain(step)
    if not isinstance(doc, dict):
        return {"value": taint.clean(doc)}
    segs = None
    for name in _STEP_PATH_FIELDS:
        source = raw.get(name) if raw is not None else getattr(step, name, None)
        segs = path_segments(source)
        if segs is not None:
            doc[name] = dotted(segs)
            break
    unused = _UNUSED_BY_KIND.get(str(doc.get("kind")), ())
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key in unused or (key == "note" and not value):
            continue
        if segs is not None and key in _STEP_VALUE_FIELDS:
            value = scrubber.at(segs, value)
        elif key in _STEP_ROOTED_FIELDS:
            value = scrubber.document(value)
        if value is _OMITTED:
            continue
        value = taint.clean(value)
        if value is not _OMITTED:
            out[key] = value
    return out


# --- one trace record --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """What a source hands over after a run; nothing is copied or serialised yet."""

    rid: str
    time: float  # wall clock, seconds since the epoch
    envelope: Mapping[str, Any]  # inbound
    result: Any  # a StackResult, or None when the run never finished
    replies: tuple[tuple[str, str], ...]  # (recipient, reply line), as sent
    stack: str  # "tenant/stack", "" when none
    hints: ScrubHints
    error: str = ""  # an error outside the run (e.g. the response deadline passed)


def reply_code(line: str) -> int | None:
    head = line[:3]
    return int(head) if head.isdigit() else None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_artifacts(record: TraceRecord) -> dict[str, Any]:
    """The five JSON documents of a record, scrubbed. Pure: the record is not changed."""
    scrubber = scrubber_for(record.hints)
    result = record.result
    final = getattr(result, "envelope", None)
    taint = scrubber.taint(record.envelope, final) if scrubber else Taint()
    src = source_of(record.envelope) or ""

    envelope = taint.clean(scrubber.document(plain(record.envelope)))
    res_path: PathSegs = ("_txc", str(src), "res")
    res = result_of(final, src) if final is not None and src else MISSING
    res = None if res is MISSING else res
    res_clean = taint.clean(scrubber.at(res_path, plain(res))) if res is not None else None

    run_error = getattr(result, "error", None)
    error_doc = plain(run_error) if run_error is not None else None
    if error_doc is None and record.error:
        error_doc = {"code": "trace_error", "message": record.error, "text": record.error}
    error_doc = taint.clean(error_doc)

    fired = [taint.clean(fired_json(f)) for f in getattr(result, "fired", ()) or ()]
    steps = [scrub_step(s, scrubber, taint) for s in getattr(result, "steps", ()) or ()]

    responses = []
    for rcpt, line in record.replies:
        responses.append(
            {"rcpt": taint.clean(rcpt), "code": reply_code(line), "line": taint.clean(line)}
        )
    responses = [r for r in responses if r["rcpt"] is not _OMITTED]
    for r in responses:
        if r["line"] is _OMITTED:
            r["line"] = REDACTED

    elapsed = getattr(result, "elapsed_s", None)
    route = scrubber.at(("_txc", "route"), plain(route_of(record.envelope)))
    summary = {
        "rid": record.rid,
        "time": _iso(record.time),
        "src": src,
        "stack": record.stack,
        "route": None if route is _OMITTED else taint.clean(route),
        "error": error_doc.get("message") if isinstance(error_doc, dict) else None,
        "elapsed_s": elapsed,
        "fired": len(fired),
        "steps": len(steps),
        "recipients": [{"rcpt": r["rcpt"], "code": r["code"]} for r in responses],
    }
    return {
        SUMMARY_FILE: summary,
        ENVELOPE_FILE: envelope if envelope is not _OMITTED else {},
        STEPS_FILE: {"fired": fired, "steps": steps},
        RESULT_FILE: {
            "rid": record.rid,
            "stack": record.stack,
            "error": error_doc,
            "elapsed_s": elapsed,
            "res": None if res_clean is _OMITTED else res_clean,
            "scrubbed": {"omit": list(record.hints.omit), "redact": list(record.hints.redact)},
        },
        RESPONSE_FILE: {"replies": responses},
    }


# --- the writer --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceStats:
    written: int
    dropped: int  # the queue was full
    skipped: int  # mode "errors" and the run was fine, or mode "off"
    failed: int  # I/O errors: the trace was lost
    pruned: int


def is_error(result: Any, replies: Sequence[tuple[str, str]], error: str = "") -> bool:
    """What `--trace=errors` keeps: a failed run, or any tempfail (4xx) reply. No result
    and no error is a routed stack that does not exist: default-deny, not an error."""
    if error or getattr(result, "error", None) is not None:
        return True
    return any((code := reply_code(line)) is not None and 400 <= code < 500 for _, line in replies)


def safe_rid(rid: str) -> str:
    """A folder name that stays inside requests/, whatever the rid holds."""
    name = _SAFE_RID.sub("_", rid)[:128].lstrip(".")
    return name or "_"


class TraceWriter:
    """Writes trace records under `<state_dir>/requests/` from a background thread.

    Call it as a trace sink: `writer(rid, envelope_in, result, replies, stack)`. It returns at
    once; a full queue drops the record (counted in `stats().dropped`).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        mode: TraceMode = "all",
        keep_count: int = 1000,
        keep_age_s: float = 7 * 86400.0,
        queue_size: int = 1024,
        prune_interval_s: float = 60.0,
        log_interval_s: float = 60.0,
    ) -> None:
        if mode not in TRACE_MODES:
            raise ValueError(f"trace mode must be one of {', '.join(TRACE_MODES)}, not {mode!r}")
        self.root = Path(state_dir) / "requests"
        self.mode: TraceMode = mode
        self.keep_count = max(1, int(keep_count))
        self.keep_age_s = float(keep_age_s)
        self.prune_interval_s = prune_interval_s
        self.log_interval_s = log_interval_s
        self._queue: queue.Queue[TraceRecord | threading.Event | None] = queue.Queue(queue_size)
        self._counts = {"written": 0, "dropped": 0, "skipped": 0, "failed": 0, "pruned": 0}
        self._lock = threading.Lock()
        self._known: deque[str] | None = None  # folder names, oldest first; loaded lazily
        self._last_prune = 0.0
        self._last_log = -1e18
        self._thread: threading.Thread | None = None
        if mode != "off":
            self._thread = threading.Thread(target=self._work, name="txcl-trace", daemon=True)
            self._thread.start()

    # -- the caller's side: cheap, never raises, never blocks ---------------------------

    def __call__(
        self,
        rid: str,
        envelope_in: Mapping[str, Any],
        result: Any,
        replies: Sequence[tuple[str, str]],
        stack: Any = None,
        error: str = "",
    ) -> bool:
        """Queue one run for writing. True if queued."""
        try:
            if self.mode == "off" or (
                self.mode == "errors" and not is_error(result, replies, error)
            ):
                self._count("skipped")
                return False
            record = TraceRecord(
                rid=rid,
                time=time.time(),
                envelope=envelope_in,
                result=result,
                replies=tuple((str(r), str(line)) for r, line in replies),
                stack=str(getattr(stack, "name", "") or (stack if isinstance(stack, str) else "")),
                hints=_hints_of(getattr(stack, "hints", None)),
                error=error,
            )
            self._queue.put_nowait(record)
            return True
        except queue.Full:
            self._count("dropped")
            self._log_loss("trace queue full; dropping traces")
            return False
        except Exception:  # a trace must never fail a delivery
            self._count("failed")
            log.exception("trace: could not queue %s", rid)
            return False

    def stats(self) -> TraceStats:
        with self._lock:
            return TraceStats(**self._counts)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written. True if it was in time."""
        if self._thread is None:
            return True
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)
        self._thread = None

    # -- the worker's side ----------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _log_loss(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_log < self.log_interval_s:
                return
            self._last_log = now
            counts = dict(self._counts)
        log.warning(
            "trace: " + message + " (so far: %d dropped, %d failed)",
            *args,
            counts["dropped"],
            counts["failed"],
        )

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.prune_interval_s)
            except queue.Empty:
                self._prune_safely()
                continue
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self.write(item)
            except OSError as err:
                self._count("failed")
                self._log_loss("cannot write %s under %s: %s", item.rid, self.root, err)
            except Exception:
                self._count("failed")
                log.exception("trace: cannot build the trace of %s", item.rid)
            if time.monotonic() - self._last_prune >= self.prune_interval_s:
                self._prune_safely()

    def write(self, record: TraceRecord) -> Path:
        """Serialise and write one record now (the worker calls this; so may tests)."""
        artifacts = build_artifacts(record)
        self.root.mkdir(parents=True, exist_ok=True)
        name = safe_rid(record.rid)
        tmp = self.root / f".tmp-{name}-{os.getpid()}-{threading.get_ident()}"
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for filename, doc in artifacts.items():
                with open(tmp / filename, "w", encoding="utf-8") as fh:
                    json.dump(doc, fh, indent=2, ensure_ascii=False, default=str)
                    fh.write("\n")
            self._known_folders()  # before the rename, so the scan does not count it twice
            final = self._free_name(name)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._count("written")
        self._remember(final.name)
        return final

    def _free_name(self, name: str) -> Path:
        """`<rid>`, or `<rid>.1`, `<rid>.2`... when one rid has several runs (several groups)."""
        candidate, n = self.root / name, 0
        while candidate.exists():
            n += 1
            candidate = self.root / f"{name}.{n}"
        return candidate

    def _remember(self, name: str) -> None:
        known = self._known_folders()
        known.append(name)
        while len(known) > self.keep_count:
            self._remove(known.popleft())

    def _known_folders(self) -> deque[str]:
        if self._known is None:
            self._known = deque(entry.name for entry in _scan(self.root))
        return self._known

    def _remove(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)
        self._count("pruned")

    def _prune_safely(self) -> None:
        try:
            self.prune()
        except OSError as err:
            self._log_loss("cannot prune %s: %s", self.root, err)

    def prune(self, now: float | None = None) -> int:
        """Remove records beyond `keep_count` and older than `keep_age_s`, and leftovers of
        interrupted writes. Returns how many records went."""
        self._last_prune = time.monotonic()
        now = time.time() if now is None else now
        if not self.root.is_dir():
            return 0
        for entry in os.scandir(self.root):
            if entry.name.startswith(".tmp-") and _mtime(entry) < now - 3600:
                shutil.rmtree(entry.path, ignore_errors=True)
        entries = _scan(self.root)
        cutoff = now - self.keep_age_s
        keep = [e for e in entries if e.mtime >= cutoff]
        keep = keep[-self.keep_count :]
        gone = {e.name for e in entries} - {e.name for e in keep}
        for name in gone:
            self._remove(name)
        self._known = deque(e.name for e in keep)
        return len(gone)


# --- reading traces back -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceEntry:
    name: str
    mtime: float


def _mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def _scan(root: Path) -> list[TraceEntry]:
    """Trace folders, oldest first (by mtime, then by name: rids sort by time)."""
    try:
        entries = [
            TraceEntry(e.name, _mtime(e))
            for e in os.scandir(root)
            if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
        ]
    except FileNotFoundError:
        return []
    return sorted(entries, key=lambda e: (e.mtime, e.name))


def trace_names(state_dir: str | os.PathLike[str]) -> list[str]:
    """The stored traces' folder names, oldest first."""
    return [e.name for e in _scan(Path(state_dir) / "requests")]


def read_trace(state_dir: str | os.PathLike[str], name: str | None = None) -> dict[str, Any]:
    """The artifacts of one trace (the latest when name is None) as {file name: document}.
    Raises FileNotFoundError when there is none; a missing or broken artifact maps to None."""
    root = Path(state_dir) / "requests"
    if name is None:
        names = trace_names(state_dir)
        if not names:
            raise FileNotFoundError(f"no traces under {root}")
        name = names[-1]
    folder = root / safe_rid(name)
    if not folder.is_dir():
        raise FileNotFoundError(f"no trace {name!r} under {root}")
    out: dict[str, Any] = {"name": folder.name}
    for filename in ARTIFACTS:
        try:
            out[filename] = inputs.load_json_object(folder / filename)
        except (OSError, ValueError):
            out[filename] = None
    return out


def read_summaries(
    state_dir: str | os.PathLike[str], limit: int | None = None
) -> list[dict[str, Any]]:
    """The summary.json of the newest `limit` traces (all when None), oldest first."""
    root = Path(state_dir) / "requests"
    names = trace_names(state_dir)
    if limit is not None:
        names = names[-limit:] if limit > 0 else []
    out = []
    for name in names:
        try:
            summary = inputs.load_json_object(root / name / SUMMARY_FILE)
        except (OSError, ValueError):
            summary = {"rid": name, "error": "unreadable summary"}
        summary.setdefault("name", name)
        out.append(summary)
    return out
