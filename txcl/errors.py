"""One problem shape for every phase (parse, lint, run), and the exceptions that carry it.

Modelled on OPA's ast/errors.go: a code naming the phase, a message, a location.
Text and JSON output are two renderings of the same record.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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


class TxclRunError(TxclError):
    """A stack run failed: an op raised or timed out, a read-only write, a bad verdict."""
