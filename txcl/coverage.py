"""Which rules the test cases fired, and which WHENs were ever true and ever false.

Built from the explain records of each case's run (`RunPolicy(explain=True)`): a rule is
covered when some case fired it; a WHEN is covered when it held in one case and failed in
another. Rendered as a table, as JSON, and as LCOV (one record per rule file: a rule's first
line is a line hit when it fired; each WHEN is a branch pair, true and false).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from txcl.explain import explain
from txcl.records import StackResult
from txcl.runner import Stack


@dataclass
class WhenCoverage:
    text: str
    line: int
    true: int = 0
    false: int = 0


@dataclass
class RuleCoverage:
    stage: int
    file: str
    line: int
    fired: int = 0
    whens: list[WhenCoverage] = field(default_factory=list)


@dataclass
class StackCoverage:
    stack: str
    rules: list[RuleCoverage]

    @property
    def rules_fired(self) -> int:
        return sum(r.fired > 0 for r in self.rules)

    @property
    def whens_both(self) -> int:
        return sum(w.true > 0 and w.false > 0 for r in self.rules for w in r.whens)

    @property
    def whens_total(self) -> int:
        return sum(len(r.whens) for r in self.rules)

    @property
    def rule_percent(self) -> float:
        return 100.0 * self.rules_fired / len(self.rules) if self.rules else 100.0


def stack_coverage(stack: Stack, results: list[StackResult]) -> StackCoverage:
    rules = [
        RuleCoverage(stage.number, rule.file, rule.pos.line, 0, [WhenCoverage(w.text, w.pos.line) for w in rule.whens])
        for stage in stack.stages
        for rule in stage.rules
    ]
    index = {(r.stage, r.file, r.line): r for r in rules}
    for result in results:
        for seen in explain(stack, result):
            rule = index[(seen.stage, seen.file, seen.pos.line)]
            rule.fired += seen.fired
            for cov, when in zip(rule.whens, seen.whens, strict=True):
                if when.held:
                    cov.true += 1
                else:
                    cov.false += 1
    return StackCoverage(stack.name, rules)


def total_percent(stacks: list[StackCoverage]) -> float:
    rules = sum(len(s.rules) for s in stacks)
    return 100.0 * sum(s.rules_fired for s in stacks) / rules if rules else 100.0


def coverage_json(stacks: list[StackCoverage]) -> dict[str, Any]:
    return {
        "rule_percent": round(total_percent(stacks), 2),
        "stacks": [
            {
                "stack": s.stack,
                "rules": len(s.rules),
                "rules_fired": s.rules_fired,
                "rule_percent": round(s.rule_percent, 2),
                "whens": s.whens_total,
                "whens_true_and_false": s.whens_both,
                "detail": [
                    {
                        "stage": r.stage,
                        "rule": f"{r.stage}/{Path(r.file).name}:{r.line}",
                        "fired": r.fired,
                        "whens": [
                            {"text": w.text, "line": w.line, "true": w.true, "false": w.false}
                            for w in r.whens
                        ],
                    }
                    for r in s.rules
                ],
            }
            for s in stacks
        ],
    }


def render_table(stacks: list[StackCoverage], out: TextIO) -> None:
    for s in stacks:
        out.write(
            f"coverage {s.stack}: {s.rules_fired}/{len(s.rules)} rules fired "
            f"({s.rule_percent:.0f} %), {s.whens_both}/{s.whens_total} WHENs both true and false\n"
        )
        for r in s.rules:
            mark = "fired" if r.fired else "NEVER"
            out.write(f"  {mark:5} x{r.fired:<3} {r.stage}/{Path(r.file).name}:{r.line}\n")
            for w in r.whens:
                seen = ("T" if w.true else "-") + ("F" if w.false else "-")
                out.write(f"      {seen}  WHEN {w.text}\n")
    out.write(f"rule coverage: {total_percent(stacks):.1f} %\n")


def render_lcov(stacks: list[StackCoverage], out: TextIO) -> None:
    files: dict[str, list[RuleCoverage]] = {}
    for s in stacks:
        for r in s.rules:
            files.setdefault(r.file, []).append(r)
    for name, rules in files.items():
        out.write(f"TN:\nSF:{name}\n")
        for r in rules:
            out.write(f"FN:{r.line},rule@{r.line}\nFNDA:{r.fired},rule@{r.line}\n")
        out.write(f"FNF:{len(rules)}\nFNH:{sum(r.fired > 0 for r in rules)}\n")
        branches = 0
        hit = 0
        for r in rules:
            for i, w in enumerate(r.whens):
                for k, taken in enumerate((w.true, w.false)):
                    out.write(f"BRDA:{w.line},{i},{k},{taken if taken else '-'}\n")
                    branches += 1
                    hit += taken > 0
        out.write(f"BRF:{branches}\nBRH:{hit}\n")
        for r in rules:
            out.write(f"DA:{r.line},{r.fired}\n")
        out.write(f"LF:{len(rules)}\nLH:{sum(r.fired > 0 for r in rules)}\nend_of_record\n")
