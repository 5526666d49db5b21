"""Trace records of stack runs, scrubbed: what a run hands over, and what of it is stored.

A source hands over a `TraceRecord` (references only: nothing is copied or serialised on
its side); `build_artifacts` turns it into the parts of `requests/<rid>/trace.jsonl` and the
message bytes stored beside it (`txcl.trace_store` is the on-disk form, `txcl.trace_writer`
the background writer).

Scrubbing: the `WITH omit` / `WITH redact` hints of every rule of the stack (fired or not)
apply to every part when it is written; the run never sees them (nothing here mutates
what it is given). Beyond the paths themselves, a value found at a scrubbed path is also
scrubbed where it reappears (an op argument, a SET value, a regex group, a reply line, the
stored message bytes), because a secret copied elsewhere is still the secret.

This module knows nothing of mail: a source's replies are (recipient, reply line) pairs,
and its message sits at `_txc.<src>.msg` of the envelope.
"""

from __future__ import annotations

import base64
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from types import NoneType
from typing import Any, Final, Literal

from txcl.envelope import parse_path, path_text, result_of, source_of
from txcl.errors import Pos, Problem
from txcl.records import ExecRecord, ScrubHints, SetRecord, fired_json, step_json
from txcl.trace_raw import plan_for, scrub_message
from txcl.trace_store import MESSAGE_FILE, MessageBytes, StoredApart
from txcl.values import MISSING

REDACTED: Final = "[REDACTED]"
TRACE_MODES: Final = ("all", "errors", "off")
TraceMode = Literal["all", "errors", "off"]

# Below these lengths a string is too common to treat as a copy of a secret.
_MIN_TAINT_SUBSTRING: Final = 8
# A scrubbed string longer than this (a whole raw message) is matched by equality only:
# substring scans of megabytes per trace leaf would cost more than they protect.
_MAX_TAINT_SCAN: Final = 1 << 20


# --- scrub hints -------------------------------------------------------------------------

Action = Literal["omit", "redact"]
PathSegs = tuple[str | int, ...]


@lru_cache(maxsize=1024)
def _cached_hints(hints: object) -> ScrubHints:
    return ScrubHints.of(hints)


def hints_of(hints: object) -> ScrubHints:
    """ScrubHints.of, once per distinct (hashable) hints object: called on every delivery,
    on the event loop, mostly with a stack's ScrubHints (which it gives back as they are)."""
    if hints.__class__ is ScrubHints:
        return hints
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


_PROBE: Final = object()  # no value: what a lookup gives when it finds nothing


class Taint:
    """Values that were scrubbed, so copies of them are scrubbed too."""

    def __init__(self) -> None:
        self.exact: dict[str, Action] = {}
        self.containers: list[tuple[Any, Action]] = []
        self.scan: list[tuple[str, Action]] = []
        self.inside: list[str] = []  # the secrets of `scan` long enough to look for in a string
        # Each string as cleaned, once per taint: a trace repeats many (rule files, values).
        self._strings: dict[str, Any] = {}

    def add(self, value: Any, action: Action) -> None:
        if isinstance(value, str):
            if value and self.exact.get(value) != "omit":
                self.exact[value] = action
                self._strings.clear()
                if len(value) <= _MAX_TAINT_SCAN:
                    self.scan.append((value, action))
                    if len(value) >= _MIN_TAINT_SUBSTRING:
                        self.inside.append(value)
        elif isinstance(value, dict | list):
            self.containers.append((value, action))
            for leaf in value.values() if isinstance(value, dict) else value:
                self.add(leaf, action)

    def __bool__(self) -> bool:
        return bool(self.exact or self.containers)

    def _clean_string(self, value: str) -> Any:
        action = self.exact.get(value)
        if action:
            return _act(value, action)
        if len(value) < _MIN_TAINT_SUBSTRING:  # no secret it may hold is looked for
            return value
        for secret, secret_action in self.scan:
            if value in secret:
                return _act(value, secret_action)
        for secret in self.inside:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value

    def clean(self, value: Any) -> Any:
        """`value` with every copy of a scrubbed value scrubbed; `_OMITTED` if it goes."""
        if not (self.exact or self.containers):
            return value
        return self._clean(value)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            done = self._strings.get(value, _PROBE)
            if done is _PROBE:
                done = self._strings[value] = self._clean_string(value)
            return done
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


# The hints of the last record and their Scrubber: a stack's records share one hints object
# (hints_of), so most records find theirs by identity, without hashing the hints.
_last_scrubber: tuple[ScrubHints, Scrubber] = (ScrubHints(), scrubber_for(ScrubHints()))


def _scrubber_of(hints: ScrubHints) -> Scrubber:
    global _last_scrubber
    last = _last_scrubber
    if last[0] is hints:
        return last[1]
    scrubber = scrubber_for(hints)
    _last_scrubber = (hints, scrubber)
    return scrubber


# What scrubs nothing, shared by the records of stacks without hints: never changed (only
# Scrubber.taint fills a Taint, and its cache of cleaned strings is filled only when it
# holds something).
_NO_SCRUBBER: Final = scrubber_for(ScrubHints())
_NO_TAINT: Final = Taint()


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
    if value.__class__ is dict or isinstance(value, Mapping):
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
    is_record = step.__class__ is SetRecord or step.__class__ is ExecRecord
    raw = None if is_record or not isinstance(step, Mapping) else step
    doc = step_json(step) if is_record or isinstance(step, SetRecord | ExecRecord) else plain(step)
    if not isinstance(doc, dict):
        return {"value": taint.clean(doc)}
    segs = None
    if isinstance(step, SetRecord) and isinstance(step.path, tuple):
        segs = step.path  # step_json wrote its text already
    for name in () if segs is not None else _STEP_PATH_FIELDS:
        source = raw.get(name) if raw is not None else getattr(step, name, None)
        segs = path_segments(source)
        if segs is not None:
            doc[name] = dotted(segs)
            break
    if is_record and not scrubber and not taint:
        return doc  # step_json writes only the fields the kind uses
    unused = _UNUSED_BY_KIND.get(str(doc.get("kind")), ())
    if not scrubber and not taint:  # nothing to scrub: only the fields the kind uses
        return {key: value for key, value in doc.items()
                if key not in unused and (value or key != "note")}
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


# The JSON of the records that a stack's runs share (a rule's firing without captures, a
# constant SET to an empty place: built once per compiled rule by the runner), by identity;
# each record is kept with its JSON so that its id is not reused while cached. Shared with
# every trace that holds it: never changed.
_SHARED_JSON: dict[int, tuple[Any, Any]] = {}
_MAX_SHARED_JSON: Final = 4096


def _shared_json(record: Any, render: Any) -> Any:
    hit = _SHARED_JSON.get(id(record))
    if hit is not None and hit[0] is record:
        return hit[1]
    doc = render(record)
    if len(_SHARED_JSON) >= _MAX_SHARED_JSON:  # the records of stacks long reloaded
        _SHARED_JSON.clear()
    _SHARED_JSON[id(record)] = (record, doc)
    return doc


def _fired_doc(fired: Any, taint: Taint, tainted: bool) -> Any:
    if fired.captures:  # groups this run captured: its own
        return taint.clean(fired_json(fired))
    doc = _shared_json(fired, fired_json)
    return taint.clean(doc) if tainted else doc


_SCALAR_TYPES: Final = (str, int, bool, float, NoneType)


def _unscrubbed_step(step: Any) -> Any:
    """A step's JSON when nothing is scrubbed (what scrub_step gives then)."""
    kind = step.__class__
    if kind is SetRecord and step.before is MISSING and step.after.__class__ in _SCALAR_TYPES:
        return _shared_json(step, step_json)  # maybe a constant: written once, if shared
    if kind is ExecRecord or (kind is SetRecord and step.path.__class__ is tuple):
        return step_json(step)  # its fields, its path as text: all scrub_step would do
    return scrub_step(step, _NO_SCRUBBER, _NO_TAINT)


# --- one trace record --------------------------------------------------------------------

# A text or HTML body longer than this is not repeated in the trace: the stored message
# holds it (`txco trace --message`; a replay decodes it again).
INLINE_BODY_CHARS: Final = 4096
_BODIES: Final = ("text", "html")


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
    message: MessageBytes | None = None  # the bytes the envelope was built from, by reference
    cut: tuple[str, ...] = ()  # what was left out before queueing (e.g. an oversize message)


def reply_code(line: str) -> int | None:
    head = line[:3]
    return int(head) if head.isdigit() else None


@lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _iso(ts: float) -> str:
    """`2026-05-25T14:00:02.123Z`: what `datetime.fromtimestamp(ts, UTC).isoformat(
    timespec="milliseconds")` gives (microseconds rounded half to even, then cut)."""
    fraction, whole = math.modf(ts)
    micros = round(fraction * 1e6)
    second = int(whole) + micros // 1_000_000
    return f"{_iso_second(second)}.{micros % 1_000_000 // 1000:03d}Z"


def _get(doc: Any, *segs: str) -> Any:
    """The value at a path of plain keys, or None."""
    for seg in segs:
        if not (doc.__class__ is dict or isinstance(doc, Mapping)) or seg not in doc:
            return None
        doc = doc[seg]
    return doc




@dataclass(frozen=True, slots=True)
class Artifacts:
    """A record made ready to store: the parts of `trace.jsonl`, and the message bytes to
    store beside them (scrubbed), or None when the stack's hints leave the message out."""

    parts: dict[str, Any]
    message: MessageBytes | None


def _message_apart(envelope: Mapping[str, Any], src: str, message: MessageBytes) -> Any:
    """`envelope` with the message (`_txc.<src>.msg.raw`) replaced by a reference to the
    stored bytes, and so each attachment's content and a long text or HTML body, which
    those bytes hold; copies only what changes. An envelope without a message object is
    returned as it is."""
    txc = envelope.get("_txc")
    section = txc.get(src) if isinstance(txc, Mapping) else None
    msg = section.get("msg") if isinstance(section, Mapping) else None
    if not isinstance(msg, Mapping):
        return envelope
    new_msg = {**msg, "raw": StoredApart(MESSAGE_FILE, len(message))}
    for body in _BODIES:
        text = msg.get(body)
        if isinstance(text, str) and len(text) > INLINE_BODY_CHARS:
            new_msg[body] = StoredApart(MESSAGE_FILE)
    attachments = msg.get("attachments")
    if isinstance(attachments, list):
        new_msg["attachments"] = [
            {**a, "content": StoredApart(MESSAGE_FILE)}
            if isinstance(a, Mapping) and "content" in a
            else a
            for a in attachments
        ]
    assert isinstance(txc, Mapping) and isinstance(section, Mapping)
    return {**envelope, "_txc": {**txc, src: {**section, "msg": new_msg}}}


def _summary_field(
    envelope: Mapping[str, Any], path: PathSegs, scrubber: Scrubber, taint: Taint
) -> Any:
    """A value of the envelope for the summary, scrubbed as it is everywhere else."""
    value = scrubber.at(path, _get(envelope, *map(str, path)))
    if value is not _OMITTED:
        value = taint.clean(value)  # a copy of an omitted value goes too
    return None if value is _OMITTED else value


def build_artifacts(record: TraceRecord) -> Artifacts:
    """The parts of a record, scrubbed. Pure: the record is not changed."""
    scrubber = _scrubber_of(record.hints)
    if not scrubber.rules:
        return _unscrubbed_artifacts(record)
    return _scrubbed_artifacts(record, scrubber)


def _scrubbed_artifacts(record: TraceRecord, scrubber: Scrubber) -> Artifacts:
    """`build_artifacts` under the stack's hints (with none, the same as
    `_unscrubbed_artifacts`, at more cost)."""
    result = record.result
    final = getattr(result, "envelope", None)
    taint = scrubber.taint(record.envelope, final)
    tainted = bool(taint)
    src = source_of(record.envelope) or ""

    envelope: Any = record.envelope
    raw_path: tuple[str, ...] = ("_txc", src, "msg", "raw")
    keeps_message = scrubber.at(raw_path, _PROBE) is _PROBE
    if record.message is not None and keeps_message:
        envelope = _message_apart(envelope, src, record.message)
    envelope = taint.clean(scrubber.document(envelope))
    message = None
    left_out = None
    if record.message is not None and isinstance(_get(envelope, *raw_path), StoredApart):
        plan = plan_for(scrubber.rules, src)
        left_out = plan.left_out
        if left_out is None:
            secrets = (value for value, _ in taint.scan)
            message = scrub_message(record.message, plan, secrets, REDACTED)
        else:  # the envelope says something was here, and the result says why it is not
            envelope = _apply(envelope, raw_path, "redact")
            envelope = _apply(envelope, (*raw_path[:-1], "attachments", "*", "content"), "redact")
            for body in _BODIES:
                if isinstance(_get(envelope, *raw_path[:-1], body), StoredApart):
                    envelope = _apply(envelope, (*raw_path[:-1], body), "redact")

    res_path: tuple[str, ...] = ("_txc", src, "res")
    res = result_of(final, src) if final is not None and src else MISSING
    res = None if res is MISSING else res
    res_clean = taint.clean(scrubber.at(res_path, plain(res))) if res is not None else None

    error_doc = taint.clean(_error_doc(record))

    fired = [_fired_doc(f, taint, tainted) for f in getattr(result, "fired", ()) or ()]
    steps = [scrub_step(s, scrubber, taint) for s in getattr(result, "steps", ()) or ()]
    why = _explain(result, scrubber, taint)

    responses = []
    for rcpt, line in record.replies:
        responses.append(
            {"rcpt": taint.clean(rcpt), "code": reply_code(line), "line": taint.clean(line)}
        )
    responses = [r for r in responses if r["rcpt"] is not _OMITTED]
    for r in responses:
        if r["line"] is _OMITTED:
            r["line"] = REDACTED

    inbound = record.envelope
    heads = (
        _summary_field(inbound, ("_txc", "route"), scrubber, taint),
        _summary_field(inbound, ("_txc", src, "msg", "id"), scrubber, taint),
        _summary_field(inbound, ("_txc", src, "mail", "from"), scrubber, taint),
        _summary_field(inbound, ("_txc", src, "msg", "subject"), scrubber, taint),
    )
    res_doc = None if res_clean is _OMITTED else res_clean
    parts = _parts(record, src, envelope if envelope is not _OMITTED else {}, fired, steps, why,
                   error_doc, res_doc, responses, heads, left_out)
    return Artifacts(parts, message)


def _unscrubbed_artifacts(record: TraceRecord) -> Artifacts:
    """`build_artifacts` for a stack that scrubs nothing (no hints, so nothing tainted
    either): every part as the run left it, the message beside the envelope as it came."""
    result = record.result
    inbound = record.envelope
    src = source_of(inbound) or ""
    envelope: Any = inbound
    message = record.message
    if message is not None:
        envelope = _message_apart(inbound, src, message)
        if envelope is inbound:  # it has no message object to point at the stored bytes
            message = None

    final = getattr(result, "envelope", None)
    res = result_of(final, src) if final is not None and src else MISSING
    res_doc = None if res is MISSING or res is None else _plain_object(res)

    error_doc = _error_doc(record)

    fired = [
        fired_json(f) if f.captures else _shared_json(f, fired_json)
        for f in getattr(result, "fired", ()) or ()
    ]
    steps = [_unscrubbed_step(s) for s in getattr(result, "steps", ()) or ()]
    why = _explain(result, _NO_SCRUBBER, _NO_TAINT)
    responses = [
        {"rcpt": rcpt, "code": reply_code(line), "line": line} for rcpt, line in record.replies
    ]
    section = _get(inbound, "_txc", src)
    msg = _get(section, "msg")
    heads = (
        _get(inbound, "_txc", "route"),
        _get(msg, "id"),
        _get(section, "mail", "from"),
        _get(msg, "subject"),
    )
    parts = _parts(record, src, envelope, fired, steps, why, error_doc, res_doc, responses,
                   heads, None)
    return Artifacts(parts, message)


def _error_doc(record: TraceRecord) -> Any:
    """The run's error, or the error outside it (the response deadline passed), or None."""
    run_error = getattr(record.result, "error", None)
    if run_error is not None:
        return plain(run_error)
    if record.error:
        return {"code": "trace_error", "message": record.error, "text": record.error}
    return None


def _plain_object(value: Any) -> Any:
    """plain(value), without copying an object that is plain already: string keys, and
    values that are strings, numbers, booleans or null (a result such as code and msg)."""
    if value.__class__ is dict:
        for key, item in value.items():
            if key.__class__ is not str or item.__class__ not in _SCALAR_TYPES:
                return plain(value)
        return value
    return plain(value)


def _parts(
    record: TraceRecord,
    src: str,
    envelope: Any,
    fired: list[Any],
    steps: list[Any],
    why: list[dict[str, Any]] | None,
    error_doc: Any,
    res: Any,
    responses: list[dict[str, Any]],
    heads: tuple[Any, Any, Any, Any],
    left_out: str | None,
) -> dict[str, Any]:
    """The five parts of `trace.jsonl`, from what build_artifacts made of a record (each
    scrubbed); `heads`: the summary's route, message id, sender and subject."""
    elapsed = getattr(record.result, "elapsed_s", None)
    route, message_id, sender, subject = heads
    summary = {
        "rid": record.rid,
        "time": _iso(record.time),
        "src": src,
        "stack": record.stack,
        "route": route,
        "message_id": message_id,
        "sender": sender,
        "subject": subject,
        "error": error_doc.get("message") if isinstance(error_doc, dict) else None,
        "elapsed_s": elapsed,
        "fired": len(fired),
        "steps": len(steps),
        "recipients": [{"rcpt": r["rcpt"], "code": r["code"]} for r in responses],
    }
    steps_doc = {"fired": fired, "steps": steps}
    if why is not None:
        steps_doc["explain"] = why
    scrubbed: dict[str, Any] = {"omit": list(record.hints.omit), "redact": list(record.hints.redact)}
    if left_out:
        scrubbed["message_left_out"] = left_out
    return {
        "summary": summary,
        "envelope": envelope,
        "steps": steps_doc,
        "result": {
            "rid": record.rid,
            "stack": record.stack,
            "error": error_doc,
            "elapsed_s": elapsed,
            "res": res,
            "scrubbed": scrubbed,
        },
        "response": {"replies": responses},
    }


def _explain(result: Any, scrubber: Scrubber, taint: Taint) -> list[dict[str, Any]] | None:
    """`steps.explain` of a record (txcl.explain, which imports this module); None when the
    run kept no stage starts."""
    global _explain_scrubbed
    if _explain_scrubbed is None:
        from txcl.explain import explain_scrubbed

        _explain_scrubbed = explain_scrubbed
    return _explain_scrubbed(result, scrubber, taint)


_explain_scrubbed: Callable[[Any, Scrubber, Taint], list[dict[str, Any]] | None] | None = None
