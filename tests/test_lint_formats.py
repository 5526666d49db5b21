"""`txcl lint` for CI and editors: SARIF 2.1.0, standard input, per-line suppression, and
every check documented with a bad and a fixed example that lint agrees with."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from txcl.lint import CHECKS, lint_source
from txcl.ops import OpRegistry
from txcl.suppress import unsuppressed

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "txcl.md"
LINT_CASES = REPO / "tests" / "lint"


def txcl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "txcl.cli", *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def test_sarif_is_a_2_1_0_log_with_rules_and_located_results() -> None:
    run = txcl("lint", str(LINT_CASES / "with_keys.txcl"), str(LINT_CASES / "verdict_codes.txcl"), "--format", "sarif", "--no-cache")
    assert run.returncode == 1, run.stderr
    log = json.loads(run.stdout)
    assert log["version"] == "2.1.0" and log["$schema"].endswith("sarif-2.1.0.json")
    [only] = log["runs"]
    driver = only["tool"]["driver"]
    assert driver["name"] == "txcl"
    ids = [r["id"] for r in driver["rules"]]
    assert sorted(ids) == sorted(CHECKS)
    for rule in driver["rules"]:
        assert rule["shortDescription"]["text"] and rule["help"]["text"]
        assert rule["helpUri"].endswith(rule["id"])
        assert rule["defaultConfiguration"]["level"] == CHECKS[rule["id"]]
    results = only["results"]
    assert {r["ruleId"] for r in results} == {"unknown-with-key", "unused-with", "verdict-code"}
    for r in results:
        assert ids[r["ruleIndex"]] == r["ruleId"]
        assert r["level"] in ("error", "warning") and r["message"]["text"]
        [loc] = r["locations"]
        region = loc["physicalLocation"]["region"]
        assert loc["physicalLocation"]["artifactLocation"]["uri"].endswith(".txcl")
        assert region["startLine"] >= 1 and region["startColumn"] >= 1


def test_lint_and_fmt_read_standard_input() -> None:
    text = 'WHEN 1 == "1"\nSET flags.x = true\n'
    run = txcl("lint", "-", "--stdin-name", "buffer.txcl", "--format", "json", stdin=text)
    assert run.returncode == 0
    [problem] = json.loads(run.stdout)["problems"]
    assert problem["check"] == "never-fires" and problem["code"] == "txcl_lint_warning"
    assert problem["location"]["file"] == "buffer.txcl"
    formatted = txcl("fmt", "-", stdin="when @lmtp.rcpt.0 =~ /a/\nset x.y=1\n")
    assert formatted.returncode == 0 and formatted.stdout == "WHEN @lmtp.rcpt.0 =~ /a/\nSET x.y = 1\n"
    assert txcl("fmt", "-", "--check", stdin=formatted.stdout).returncode == 0
    assert txcl("fmt", "-", "--check", stdin="set x.y=1\n").returncode == 1


def test_a_suppression_comment_silences_one_check_on_one_line() -> None:
    text = (
        'WHEN 1 == "1"  # txcl: ignore[never-fires]\nSET flags.a = true\n\n'
        "# txcl: ignore[unused-with, never-fires]\nWHEN 2 == \"2\"\nSET flags.b = true\n\n"
        '# txcl: ignore[unused-with]\nWHEN 3 == "3"\nSET flags.c = true\n'
    )
    found = lint_source(text, "r.txcl")
    assert [p.pos.line for p in found if p.pos] == [1, 5, 9]
    kept = unsuppressed(found, lambda _file: text)
    assert [(p.pos.line, p.check) for p in kept if p.pos] == [(9, "never-fires")]
    run = txcl("lint", "-", stdin=text)
    assert ":9:1:" in run.stdout and ":1:1:" not in run.stdout and ":5:1:" not in run.stdout


def _documented() -> dict[str, tuple[str, str, str, str]]:
    """check -> (bad lang, bad text, fixed lang, fixed text), from docs/txcl.md "Lint checks"."""
    section = DOCS.read_text("utf-8").split("### Lint checks", 1)[1].split("\n## ", 1)[0]
    out = {}
    for check, body in re.findall(r"#### `([a-z-]+)`\n(.*?)(?=\n#### |\Z)", section, re.S):
        blocks = re.findall(r"```([\w-]*)\n(.*?)```", body, re.S)
        assert len(blocks) == 2, check
        (bad_lang, bad), (good_lang, good) = blocks
        out[check] = (bad_lang, bad, good_lang, good)
    return out


def test_every_check_id_is_documented_with_a_bad_and_a_fixed_example() -> None:
    assert sorted(_documented()) == sorted(CHECKS)


@pytest.mark.parametrize("check", sorted(set(CHECKS) - {"layout", "schema"}))
def test_each_documented_bad_example_trips_its_check_and_the_fix_does_not(check: str) -> None:
    bad_lang, bad, good_lang, good = _documented()[check]
    assert bad_lang in ("txcl-bad", "txcl-error") and good_lang == "txcl"
    registry = OpRegistry.default()
    assert check in {p.check for p in lint_source(bad, "bad.txcl", registry)}
    assert check not in {p.check for p in lint_source(good, "fixed.txcl", registry)}


def test_every_check_has_its_sarif_help_text() -> None:
    from txcl.lint import CHECK_HELP

    assert sorted(CHECK_HELP) == sorted(CHECKS)
