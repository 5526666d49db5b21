"""Lint findings as SARIF 2.1.0 (what GitHub code scanning and other CI services read):
one run, the tool `txcl` with a reporting rule per lint check (id, help text, a link to its
section of docs/txcl.md), a result per finding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from txcl.errors import Problem
from txcl.lint import CHECK_HELP, CHECKS

SCHEMA: Final = "https://json.schemastore.org/sarif-2.1.0.json"
DOCS: Final = "https://github.com/txcl/txcl/blob/main/docs/txcl.md#lint-checks"

_LEVEL: Final = {"error": "error", "warning": "warning"}


def sarif_doc(problems: Sequence[Problem], version: str = "") -> dict[str, Any]:
    checks = sorted(CHECKS)
    rules = [
        {
            "id": check,
            "name": check,
            "shortDescription": {"text": CHECK_HELP[check]},
            "help": {"text": CHECK_HELP[check]},
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
