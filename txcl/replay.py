"""Replay recorded requests against the current rules: per recipient, the verdict the trace
recorded and the verdict the rules give now.

Nothing is executed: every EXEC is answered with the merge patch its op returned in the
trace (`RunPolicy(run_ops=False)` with those patches as stubs); an op the current rules call
that the trace holds no answer for is reported. A trace is read through txcl.trace_store;
the message parts it stored apart (`message.eml`) are put back where the envelope names them.

Fidelity: a trace is scrubbed by the `WITH omit` / `WITH redact` of the rules that wrote it.
When a rule of the current stack reads a path that was omitted or redacted there, the
replay of that trace says so: its verdict was judged on what the trace kept, not on what
the server saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from txcl import trace_store
from txcl.envelope import SRC_KEY, TXC, path_text, without_rid
from txcl.loader import Tree
from txcl.records import ExecRecord
from txcl.runner import RunPolicy, Stack
from txcl.sources import source_for
from txcl.trace import REDACTED, parse_hint_path
from txcl.values import MISSING


@dataclass(frozen=True, slots=True)
class RecipientVerdict:
    rcpt: str
    recorded: str | None  # the reply line sent, None when the trace has none for it
    replayed: str

    @property
    def changed(self) -> bool:
        return self.recorded is None or verdict_of(self.recorded) != verdict_of(self.replayed)


@dataclass(frozen=True, slots=True)
class Replay:
    rid: str
    stack: str
    verdicts: tuple[RecipientVerdict, ...] = ()
    unanswered_ops: tuple[str, ...] = ()  # ops the rules called with no recorded answer
    fidelity: tuple[str, ...] = ()  # why this replay may differ from what the server saw
    problem: str = ""  # the trace could not be replayed at all
    error: str = ""  # the replayed run failed

    @property
    def changed(self) -> bool:
        return any(v.changed for v in self.verdicts)


@dataclass(frozen=True, slots=True)
class TraceRef:
    state_dir: Path
    name: str


@dataclass
class Report:
    replays: list[Replay] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return sum(v.changed for r in self.replays for v in r.verdicts)

    @property
    def verdicts(self) -> int:
        return sum(len(r.verdicts) for r in self.replays)


def verdict_of(line: str) -> str:
    """A reply line without the request id it carries: what a rule decided."""
    return without_rid(line)


def trace_refs(path: Path) -> list[TraceRef]:
    """A trace folder, a `requests/` folder (every trace in it, oldest first) or a state dir."""
    if (path / trace_store.TRACE_FILE).is_file() or (path / "summary.json").is_file():
        return [TraceRef(path.parent.parent, path.name)]
    state_dir = path.parent if path.name == "requests" else path
    if not trace_store.requests_root(state_dir).is_dir():
        raise FileNotFoundError(f"{path}: neither a trace folder nor a requests/ folder")
    return [TraceRef(state_dir, name) for name in trace_store.trace_names(state_dir)]


def replay_trace(ref: TraceRef, tree: Tree) -> Replay:
    try:
        trace = trace_store.read_trace(ref.state_dir, ref.name)
    except FileNotFoundError as err:
        return Replay(ref.name, "", problem=str(err))
    summary = trace.get("summary") or {}
    rid = str(summary.get("rid") or ref.name)
    name = str(summary.get("stack") or "")
    envelope = trace.get("envelope")
    if not isinstance(envelope, dict) or not envelope:
        return Replay(rid, name, problem="the trace holds no envelope")
    stack = tree.stacks.get(name)
    if stack is None:
        return Replay(rid, name, problem=f"no stack {name!r} in the current rules")
    fidelity: list[str] = []
    message = trace_store.read_message(ref.state_dir, ref.name)
    envelope = _with_message(envelope, message, stack, fidelity)
    stubs, repeated = _recorded_answers(trace.get("steps") or {})
    fidelity.extend(f"op {op} answered differently on its calls; each call gets the first" for op in repeated)
    fidelity.extend(_scrubbed_reads(stack, trace.get("result") or {}, envelope))
    run = stack.run(envelope, RunPolicy(run_ops=False, op_stubs=stubs))
    unanswered = sorted(
        {s.op for s in run.steps if isinstance(s, ExecRecord) and s.note == "not executed"}
    )
    source = source_for(envelope)
    recorded = {
        str(r.get("rcpt")): str(r.get("line"))
        for r in (trace.get("response") or {}).get("replies") or []
        if isinstance(r, dict)
    }
    verdicts: tuple[RecipientVerdict, ...] = ()
    if source is not None:
        verdicts = tuple(
            RecipientVerdict(rcpt, recorded.get(rcpt), line)
            for rcpt, line in source.replies(run.envelope, run.error)
        )
    return Replay(
        rid,
        name,
        verdicts,
        tuple(unanswered),
        tuple(fidelity),
        error=run.error.message if run.error else "",
    )


def replay(paths: list[Path], tree: Tree) -> Report:
    report = Report()
    for path in paths:
        for ref in trace_refs(path):
            report.replays.append(replay_trace(ref, tree))
    return report


# --- the envelope as the server built it, as far as the trace kept it ---------------------


def _with_message(
    envelope: dict[str, Any], message: bytes | None, stack: Stack, fidelity: list[str]
) -> dict[str, Any]:
    """The recorded envelope with the parts stored in message.eml put back."""
    txc = envelope.get(TXC) if isinstance(envelope.get(TXC), dict) else {}
    src = txc.get(SRC_KEY) if isinstance(txc, dict) else None
    if not _has_marker(envelope):
        return envelope
    source = source_for(envelope)
    if message is None or source is None or not hasattr(source, "envelope_from_message"):
        fidelity.append("the message the trace names (message.eml) is not stored")
        return envelope
    built = source.envelope_from_message(
        message, rcpts=["replay@invalid"], mail_from="", stack=stack.name, stage=0
    )
    rebuilt = built.get(TXC, {}).get(src, {}).get("msg") if isinstance(src, str) else None
    return _fill(envelope, rebuilt, (TXC, src, "msg"))


def _is_marker(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and value.get("file") == trace_store.MESSAGE_FILE
        and set(value) <= {"file", "size"}
    )


def _has_marker(node: Any) -> bool:
    if _is_marker(node):
        return True
    if isinstance(node, dict):
        return any(_has_marker(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_marker(v) for v in node)
    return False


def _fill(node: Any, rebuilt: Any, at: tuple[Any, ...], here: tuple[Any, ...] = ()) -> Any:
    """Each marker under `at` replaced by the value at the same place of `rebuilt` (the
    message section built again from the stored bytes)."""
    if _is_marker(node):
        value = _at(rebuilt, here[len(at) :])
        return node if value is MISSING else value
    if isinstance(node, dict):
        return {k: _fill(v, rebuilt, at, (*here, k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, rebuilt, at, (*here, i)) for i, v in enumerate(node)]
    return node


def _recorded_answers(steps: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """op name -> the patch it returned (its first call), and the ops whose calls differed."""
    stubs: dict[str, Any] = {}
    repeated: list[str] = []
    for step in steps.get("steps") or []:
        if not isinstance(step, dict) or step.get("kind") != "exec":
            continue
        op, patch = step.get("op"), step.get("patch")
        if not isinstance(op, str) or not isinstance(patch, dict):
            continue
        if op in stubs:
            if stubs[op] != patch and op not in repeated:
                repeated.append(op)
            continue
        stubs[op] = patch
    return stubs, repeated


def _scrubbed_reads(stack: Stack, result: dict[str, Any], envelope: Any) -> list[str]:
    """A line per path the current rules read that the trace omitted or redacted."""
    scrubbed = result.get("scrubbed") or {}
    hints = [
        (parse_hint_path(text), action)
        for action in ("omit", "redact")
        for text in scrubbed.get(action) or []
        if _parses(text)
    ]
    reads = sorted({r for rule in stack.rules for r in rule.reads}, key=lambda r: tuple(map(str, r)))
    out = []
    for read in reads:
        for segs, action in hints:
            if _overlap(read, segs):
                word = "omitted" if action == "omit" else "redacted"
                out.append(
                    f"the rules read {path_text(read)}, which this trace {word} "
                    f"({path_text(segs)}): judged on what the trace kept"
                )
                break
        else:
            if _reads_redacted(envelope, read):
                out.append(f"the rules read {path_text(read)}, which this trace holds as {REDACTED}")
    left_out = scrubbed.get("message_left_out")
    if left_out:
        out.append(f"the message was not stored ({left_out})")
    return out


def _parses(text: str) -> bool:
    try:
        parse_hint_path(text)
    except ValueError:
        return False
    return True


def _overlap(read: tuple[Any, ...], hint: tuple[Any, ...]) -> bool:
    """One path lies within the other (a read of a parent sees the scrubbed child too)."""
    return all(h == "*" or str(h) == str(r) for h, r in zip(hint, read, strict=False))


def _reads_redacted(envelope: Any, read: tuple[Any, ...]) -> bool:
    return _at(envelope, read) == REDACTED


def _at(node: Any, segments: tuple[Any, ...]) -> Any:
    """The value at `segments` under node, MISSING where there is none."""
    for seg in segments:
        inside = seg in node if isinstance(node, dict) else (
            isinstance(node, list) and isinstance(seg, int) and 0 <= seg < len(node)
        )
        if not inside:
            return MISSING
        node = node[seg]
    return node


def replay_json(report: Report) -> dict[str, Any]:
    return {
        "traces": len(report.replays),
        "verdicts": report.verdicts,
        "changed": report.changed,
        "replays": [
            {
                "rid": r.rid,
                "stack": r.stack,
                "changed": r.changed,
                "verdicts": [
                    {"rcpt": v.rcpt, "recorded": v.recorded, "replayed": v.replayed, "changed": v.changed}
                    for v in r.verdicts
                ],
                "unanswered_ops": list(r.unanswered_ops),
                "fidelity": list(r.fidelity),
                "problem": r.problem or None,
                "error": r.error or None,
            }
            for r in report.replays
        ],
    }
