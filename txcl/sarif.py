"""Lint findings as SARIF 2.1.0 (what GitHub code scanning and other CI services read):
one run, the tool `txcl` with a reporting rule per lint check (id, help text, a link to its
section of docs/txcl.md), a result per finding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from txcl.errors import Problem
from txcl.lint import CHECKS

SCHEMA: Final = "https://json.schemastore.org/sarif-2.1.0.json"
DOCS: Final = "https://github.com/txcl/txcl/blob/main/docs/txcl.md#lint-checks"

# One line a reader can act on per check; docs/txcl.md "Lint checks" has a bad and a fixed
# example of each.
CHECK_HELP: Final[dict[str, str]] = {
    "syntax": "The line does not parse: fix the statement the message names.",
    "compile": "The rule parses but cannot be compiled (a regex RE2 refuses, an unknown function, a bad WITH value).",
    "layout": "The OPS tree holds something the loader refuses: names, stray files, links that leave the tree.",
    "unknown-op": "EXEC names an op the registry does not know: check the spelling and the `ops:` of txco.yaml.",
    "read-only-write": "SET writes a path the source stamps; only _txc.<src>.res is writable.",
    "verdict-code": "A verdict code is an integer in 200-299 or 400-599.",
    "recipient-gap": "A recipient slot is set while a lower one never is: that recipient would be refused.",
    "never-fires": "A WHEN that reads nothing from the envelope and is not true: the rule never fires.",
    "unknown-with-key": "A WITH key that looks like a misspelt reserved key (timeout, omit, redact).",
    "unused-with": "An op argument in a rule that EXECs no op: nothing reads it.",
    "empty-file": "A rule file without rules.",
}
_LEVEL: Final = {"error": "error", "warning": "warning"}


def sarif_doc(problems: Sequence[Problem], version: str = "") -> dict[str, Any]:
    checks = sorted(CHECKS)
    rules = [
        {
            "id": check,
            "name": check,
            "shortDescription": {"text": CHECK_HELP.get(check, f"txcl lint check {check}")},
            "help": {"text": CHECK_HELP.get(check, f"See docs/txcl.md, check {check}.")},
            "helpUri": f"{DOCS}-{check}",
            "defaultConfiguration": {"level": _LEVEL.get(CHECKS[check], "warning")},
        }
        for check in checks
    ]
    results = []
    for p in problems:
        check = p.check or "compile"
        result: dict[str, Any] = {
            "ruleId": check,
            "ruleIndex": checks.index(check) if check in checks else 0,
            "level": _LEVEL.get(p.severity, "warning"),
            "message": {"text": p.message},
        }
        if p.pos is not None and p.pos.file:
            result["locations"] = [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": p.pos.file},
                        "region": {"startLine": max(1, p.pos.line), "startColumn": max(1, p.pos.column)},
                    }
                }
            ]
        results.append(result)
    driver: dict[str, Any] = {"name": "txcl", "informationUri": DOCS, "rules": rules}
    if version:
        driver["version"] = version
    return {"$schema": SCHEMA, "version": "2.1.0", "runs": [{"tool": {"driver": driver}, "results": results}]}
