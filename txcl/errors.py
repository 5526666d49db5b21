"""One problem shape for every phase (parse, lint, run), and the exceptions that carry it.

Modelled on OPA's ast/errors.go: a code naming the phase, a message, a location.
Text and JSON output are two renderings of the same record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Final

_CONTEXT_WIDTH: Final = 100


@dataclass(frozen=True, slots=True, order=True)
class Pos:
    """A place in a source file. Lines and columns count from 1."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class Problem:
    """A finding or a failure.

    code:     the phase: txcl_parse_error | txcl_compile_error | txcl_lint_error |
              txcl_load_error | txcl_run_error | txcl_test_error | txcl_internal_error
    message:  one sentence a rule author can act on
    pos:      where, when known
    severity: "error" or "warning"
    check:    a stable identifier for lint findings (e.g. "unknown-op"), else ""
    context:  the source line and caret, when known (rendered under the first line)
    """

    code: str
    message: str
    pos: Pos | None = None
    severity: str = "error"
    check: str = ""
    context: str = field(default="", compare=False)

    def __str__(self) -> str:
        where = f"{self.pos}: " if self.pos else ""
        check = f" [{self.check}]" if self.check else ""
        head = f"{where}{self.code}: {self.message}{check}"
        return f"{head}\n{self.context}" if self.context else head

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "code": self.code,
            "message": self.message,
            "severity": self.severity,
        }
        if self.check:
            out["check"] = self.check
        if self.pos:
            out["location"] = {
                "file": self.pos.file,
                "line": self.pos.line,
                "column": self.pos.column,
            }
        return out


def caret_context(text: str, column: int) -> str:
    """The source line (clipped around the column when long) and a caret under the column."""
    start = 0
    if len(text) > _CONTEXT_WIDTH:
        start = max(0, min(column - 1 - _CONTEXT_WIDTH // 2, len(text) - _CONTEXT_WIDTH))
    shown = text[start : start + _CONTEXT_WIDTH]
    # Control characters would garble the terminal; keep one cell each so the caret lines up.
    shown = "".join(c if c == "\t" or c.isprintable() else "\ufffd" for c in shown)
    lead = "".join("\t" if c == "\t" else " " for c in shown[: max(0, column - 1 - start)])
    return f"    {shown}\n    {lead}^"


def source_lines(source: str) -> list[str]:
    """The lines of a rule file as positions count them: a leading byte order mark skipped
    (editors neither show nor count it), split at LF only, a CR before it dropped."""
    return [line.removesuffix("\r") for line in source.removeprefix("\ufeff").split("\n")]


def with_context(problem: Problem, lines: Sequence[str]) -> Problem:
    """The problem with the source line and caret of its position in `lines` (the lines of
    its file), unless it has them already or its position is not in them."""
    pos = problem.pos
    if problem.context or pos is None or not 0 < pos.line <= len(lines):
        return problem
    return replace(problem, context=caret_context(lines[pos.line - 1], pos.column))


class TxclError(Exception):
    """Base of every error this package raises on purpose. Carries one or more problems."""

    def __init__(self, problems: Problem | list[Problem] | tuple[Problem, ...]) -> None:
        self.problems: tuple[Problem, ...] = (
            (problems,) if isinstance(problems, Problem) else tuple(problems)
        )
        super().__init__("\n".join(str(p) for p in self.problems))

    @property
    def problem(self) -> Problem:
        return self.problems[0]


class TxclSyntaxError(TxclError):
    """The text is not TXCL (txcl_parse_error)."""


class TxclCompileError(TxclError):
    """The text parses but cannot be compiled: RE2 refuses a regex, a bad path, ... """


class TxclLoadError(TxclError):
    """An OPS tree or a file in it cannot be loaded (layout, I/O, encoding)."""
