"""`txcl test` as a place to live in: one file, one case, stable rule names, cases that did
not run, JUnit XML, JSON, --watch, and coverage (table, JSON, LCOV, --fail-under)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

EXAMPLE_OPS = Path(__file__).resolve().parent.parent / "examples" / "inbound-support-mailbox" / "OPS"
SUPPORT_TESTS = EXAMPLE_OPS / "acme" / "support" / "tests"

RULES = """\
WHEN @lmtp.rcpt.0 =~ /^support@/
SET @lmtp.res.code = 250

WHEN @lmtp.rcpt.0 =~ /^sales@/
SET @lmtp.res.code = 550
"""
CASES = """\
cases:
  - name: support is accepted
    input: {envelope: {_txc: {src: lmtp, lmtp: {rcpt: [support@acme.example]}}}}
    expect:
      fired: [0/10-route.txcl#1]
      verdicts: ["250 2.0.0 OK"]
  - name: sales is refused
    input: {envelope: {_txc: {src: lmtp, lmtp: {rcpt: [sales@acme.example]}}}}
    expect:
      fired: [0/10-route.txcl#2]
"""


def txcl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "txcl.cli", *args, "--no-cache"],
        capture_output=True, text=True, timeout=120, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )


def _stack(tmp_path: Path) -> Path:
    stack = tmp_path / "OPS" / "acme" / "s"
    (stack / "0").mkdir(parents=True)
    (stack / "tests").mkdir()
    (stack / "0" / "10-route.txcl").write_text(RULES)
    (stack / "tests" / "route.yaml").write_text(CASES)
    return stack


def test_one_file_and_one_case() -> None:
    one_file = txcl("test", str(SUPPORT_TESTS / "billing.yaml"), "--format", "json")
    assert one_file.returncode == 0, one_file.stdout + one_file.stderr
    doc = json.loads(one_file.stdout)
    assert {Path(c["file"]).name for c in doc["cases"]} == {"billing.yaml"}
    assert doc["passed"] == len(doc["cases"]) >= 2 and doc["not_run"] == 0
    one_case = txcl("test", str(EXAMPLE_OPS), "-k", "retried delivery")
    assert one_case.returncode == 0
    assert one_case.stdout.splitlines()[-1] == "1 passed, 0 failed"
    none = txcl("test", str(EXAMPLE_OPS), "-k", "no such case")
    assert none.returncode == 1 and "no case under" in none.stdout


def test_rule_ordinals_survive_comment_and_blank_line_edits(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    assert txcl("test", str(stack)).returncode == 0
    rules = stack / "0" / "10-route.txcl"
    rules.write_text("# routing\n\n# by the first recipient\n" + RULES.replace("\n\n", "\n\n\n# sales\n"))
    after = txcl("test", str(stack))
    assert after.returncode == 0, after.stdout
    assert after.stdout.splitlines()[-1] == "2 passed, 0 failed"


def test_a_load_error_says_how_many_cases_did_not_run(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    (stack / "0" / "10-route.txcl").write_text("WHN @lmtp.rcpt.0 =~ /^support@/\nSET x.y = 1\n")
    run = txcl("test", str(tmp_path / "OPS"))
    assert run.returncode == 1
    assert run.stdout.splitlines()[-1] == "0 passed, 0 failed, 2 not run (they could not load)"


def test_junit_xml_has_the_structure_ci_reads(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    (stack / "tests" / "route.yaml").write_text(CASES.replace("550", "550").replace("#2]", "#1]"))
    report = tmp_path / "junit.xml"
    run = txcl("test", str(stack), "--junit", str(report))
    assert run.returncode == 1
    root = ET.parse(report).getroot()
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("2", "1", "0")
    [suite] = root.findall("testsuite")
    assert suite.get("name") == "acme/s" and suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["support is accepted", "sales is refused"]
    assert all(c.get("classname") == "acme/s.route" and float(c.get("time") or "x") >= 0 for c in cases)
    assert cases[0].find("failure") is None
    failure = cases[1].find("failure")
    assert failure is not None and failure.get("message") == "mismatch: fired"
    assert "0/10-route.txcl#1" in (failure.text or "")


def test_watch_runs_again_when_a_rule_file_changes(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "txcl.cli", "test", str(stack), "--watch", "--no-cache"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert proc.stdout is not None
        lines = iter(proc.stdout.readline, "")
        assert next(line for line in lines if "passed" in line).strip() == "2 passed, 0 failed"
        assert "watching" in next(lines)
        time.sleep(0.05)  # a later mtime than the first run saw
        (stack / "0" / "10-route.txcl").write_text(RULES.replace("550", "551"))
        assert "running again" in next(line for line in lines if line.startswith("---"))
        assert next(line for line in lines if "passed" in line).strip() == "2 passed, 0 failed"
    finally:
        proc.kill()
        proc.wait()


def test_coverage_table_json_lcov_and_fail_under(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    cases = stack / "tests" / "route.yaml"
    cases.write_text(CASES.split("  - name: sales")[0])
    table = txcl("test", str(stack), "--coverage")
    assert table.returncode == 0
    assert "coverage acme/s: 1/2 rules fired (50 %), 0/2 WHENs both true and false" in table.stdout
    assert "NEVER x0   0/10-route.txcl:4" in table.stdout
    under = txcl("test", str(stack), "--coverage", "json", "--fail-under", "80", "--format", "json")
    assert under.returncode == 1
    doc = json.loads(under.stdout)["coverage"]
    assert doc["rule_percent"] == 50.0
    [s] = doc["stacks"]
    assert [r["fired"] for r in s["detail"]] == [1, 0]
    assert s["detail"][0]["whens"] == [{"text": "@lmtp.rcpt.0 =~ /^support@/", "line": 1, "true": 1, "false": 0}]
    lcov_file = tmp_path / "cov.info"
    assert txcl("test", str(stack), "--coverage", "lcov", "--coverage-file", str(lcov_file)).returncode == 0
    lcov = lcov_file.read_text()
    assert lcov.startswith("TN:\nSF:") and "FNF:2\nFNH:1\n" in lcov and lcov.endswith("end_of_record\n")
    assert "DA:1,1\nDA:4,0\n" in lcov


def test_the_example_reaches_full_rule_coverage() -> None:
    run = txcl("test", str(EXAMPLE_OPS), "--coverage", "json", "--fail-under", "100", "--format", "json")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr
    assert json.loads(run.stdout)["coverage"]["rule_percent"] == 100.0
