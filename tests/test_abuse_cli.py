"""Hostile files given to `txcl` and `txco` (issue 13, item 10; terminals: item 8).

Each case runs the real command as a subprocess: the answer is one clear line on stderr
naming the file and what is wrong, the usual error exit code, never a traceback, never a hang.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import txco_argv

pytestmark = pytest.mark.abuse

RULE = 'WHEN @lmtp.rcpt.0 =~ /^support@/\nSET @lmtp.res.code = 250\n'
ENVELOPE = {"_txc": {"src": "lmtp", "lmtp": {"rcpt": ["support@acme.example"]}}}
# A hang is the failure these tests look for: a command that has not answered by then hangs.
HANG = 30


def txcl(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "txcl.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=HANG)


def txco(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*txco_argv(), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=HANG)


def refused(done: subprocess.CompletedProcess[str], *says: str, code: int = 2) -> None:
    """Exit `code`, no traceback, and stderr's first line says every one of `says`."""
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    first = done.stderr.strip().splitlines()[0] if done.stderr.strip() else ""
    for text in says:
        assert text in first, (text, done.stderr)


@pytest.fixture
def rule(tmp_path: Path) -> Path:
    path = tmp_path / "rule.txcl"
    path.write_text(RULE)
    return path


# --- envelopes: deep, cyclic, enormous -------------------------------------------------------


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_a_3000_deep_envelope_is_refused_naming_the_file(tmp_path: Path, rule: Path,
                                                         opening: str) -> None:
    closing = "]" if opening == "[" else "}"
    envelope = tmp_path / "deep.json"
    envelope.write_text(opening * 3000 + "1" + closing * 3000)
    refused(txcl("test", rule, envelope), str(envelope), "nested more than")


def test_an_envelope_nested_within_the_recursion_limit_is_refused_too(tmp_path: Path,
                                                                      rule: Path) -> None:
    envelope = tmp_path / "deep.json"
    inner = '{"a":' * 500 + "1" + "}" * 500
    envelope.write_text(json.dumps(ENVELOPE)[:-1] + ', "deep": ' + inner + "}")
    refused(txcl("test", rule, envelope), str(envelope), "nested more than 100 levels")


def test_a_deep_envelope_on_stdin_is_refused(rule: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "txcl.cli", "test", str(rule), "-"],
                          input="[" * 3000 + "]" * 3000, capture_output=True, text=True,
                          timeout=HANG)
    refused(done, "-: nested more than")


def test_a_cyclic_or_enormous_case_envelope_is_a_clear_case_failure(tmp_path: Path) -> None:
    # YAML aliases build shared and cyclic data: what a program could also pass in.
    stack = tmp_path / "OPS" / "acme" / "_mail"
    (stack / "0").mkdir(parents=True)
    (stack / "0" / "r.txcl").write_text(RULE)
    (stack / "tests").mkdir()
    (stack / "tests" / "cyclic.yaml").write_text(
        "name: cyclic\ninput:\n  envelope: &e {_txc: {src: lmtp, loop: *e}}\n")
    laughs = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 8))
    (stack / "tests" / "laughs.yaml").write_text(
        "name: laughs\ninput:\n  envelope:\n    _txc: {src: lmtp}\n    x:\n"
        + "".join("      " + line + "\n" for line in laughs.splitlines()))
    done = txcl("test", tmp_path / "OPS")
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "cyclic.yaml" in done.stdout and "nested more than 100 levels deep (or cyclic)" in done.stdout
    assert "laughs.yaml" in done.stdout and "too large: more than" in done.stdout
