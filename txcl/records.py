"""What a run leaves behind, one record shape each, and its one JSON rendering.

`StackResult` holds the envelope after the run, the rules that `Fired`, and the steps as
they ran: a `SetRecord` per SET, an `ExecRecord` per EXEC. `ScrubHints` are a stack's
`WITH omit` / `WITH redact` paths. `txcl test --json` and the trace writer both render a
run with `fired_json` / `step_json`; the trace scrubs what they give.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from txcl.ast import Segment
from txcl.envelope import path_text
from txcl.errors import Pos, Problem
from txcl.values import MISSING


@dataclass(frozen=True, slots=True)
class WhenOutcome:
    text: str
    pos: Pos
    held: bool


@dataclass(frozen=True, slots=True)
class Fired:
    """A rule whose WHENs all held, and the regex groups they captured."""

    stage: int
    pos: Pos
    file: str
    whens: tuple[WhenOutcome, ...]
    captures: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class SetRecord:
    """A SET as it ran: `before` is MISSING where the place was empty; `after` is the value
    written, MISSING when the expression was missing and nothing was written (`note`)."""

    kind: ClassVar[str] = "set"
    stage: int
    pos: Pos
    path: tuple[Segment, ...]
    before: Any = MISSING
    after: Any = MISSING
    note: str = ""


@dataclass(frozen=True, slots=True)
class ExecRecord:
    """An EXEC as it ran: the merge patch applied; `executed` False for a stub or an op not
    run (`note`: "stub", "not executed")."""

    kind: ClassVar[str] = "exec"
    stage: int
    pos: Pos
    op: str
    args: Mapping[str, Any] = field(default_factory=dict)
    patch: Any = None
    executed: bool = False
    note: str = ""
    elapsed_s: float = 0.0


Step = SetRecord | ExecRecord


@dataclass(frozen=True, slots=True)
class StageStart:
    """A stage as it began, kept for txcl.explain: the rules that ran (compiled, with their
    source positions and WHEN texts), the envelope their WHENs read, and how each fared."""

    stage: int
    rules: tuple[Any, ...]  # txcl.compiler.CompiledRule
    envelope: Any
    # Per rule, as the run tested it, filled while the stage runs (shorter when the run
    # stopped within it): None when all its WHENs held, else the index of the first that
    # did not. explain evaluates again only what this does not say.
    first_false: list[int | None] | None = None


@dataclass(frozen=True, slots=True)
class StackResult:
    envelope: Any  # the envelope after the run (or where it failed)
    fired: tuple[Fired, ...]
    steps: tuple[Step, ...]
    error: Problem | None = None  # a failed run never yields an accept
    elapsed_s: float = 0.0
    # Each stage run, as it began; None unless run under RunPolicy(explain=True)
    snapshots: tuple[StageStart, ...] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class ScrubHints:
    """The union of a stack's `WITH omit` and `WITH redact` paths (full path texts), sorted."""

    omit: tuple[str, ...] = ()
    redact: tuple[str, ...] = ()

    @classmethod
    def of(cls, hints: object) -> ScrubHints:
        """From ScrubHints, an object or mapping with omit/redact (comma lists or iterables
        of paths), or None."""
        if hints is None:
            return cls()
        if isinstance(hints, ScrubHints):
            return hints
        if isinstance(hints, Mapping):
            omit, redact = hints.get("omit", ()), hints.get("redact", ())
        else:
            omit, redact = getattr(hints, "omit", ()), getattr(hints, "redact", ())
        return cls(omit=_path_list(omit), redact=_path_list(redact))

    def __bool__(self) -> bool:
        return bool(self.omit or self.redact)


def _path_list(value: object) -> tuple[str, ...]:
    """A comma list string or any iterable of them -> sorted, unique, stripped."""
    items: Iterable[object] = [value] if isinstance(value, str) else _iterable(value)
    out = {part.strip() for item in items for part in str(item).split(",") if part.strip()}
    return tuple(sorted(out))


def _iterable(value: object) -> Iterable[object]:
    return value if isinstance(value, Iterable) else ()


# --- the one JSON rendering ------------------------------------------------------------------


def fired_json(fired: Fired) -> dict[str, Any]:
    return {
        "stage": fired.stage,
        "pos": str(fired.pos),
        "file": fired.file,
        "whens": [{"text": w.text, "pos": str(w.pos), "held": w.held} for w in fired.whens],
        "captures": dict(fired.captures),
    }


def step_json(step: Step) -> dict[str, Any]:
    """A step as JSON: its kind, stage and position (`file:line:col`) and its own fields; a
    path as its full text, values that are MISSING and empty notes left out."""
    out: dict[str, Any] = {"kind": step.kind, "stage": step.stage, "pos": str(step.pos)}
    if isinstance(step, SetRecord):
        out["path"] = path_text(step.path)
        if step.before is not MISSING:
            out["before"] = step.before
        if step.after is not MISSING:
            out["after"] = step.after
    else:
        out.update(
            op=step.op,
            args=dict(step.args),
            patch=step.patch,
            executed=step.executed,
            elapsed_s=step.elapsed_s,
        )
    if step.note:
        out["note"] = step.note
    return out


def run_json(result: StackResult) -> dict[str, Any]:
    """The rules that fired and the steps that ran, as JSON."""
    return {
        "fired": [fired_json(f) for f in result.fired],
        "steps": [step_json(s) for s in result.steps],
    }
