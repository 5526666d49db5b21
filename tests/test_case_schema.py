"""`txcl test` checks hand-written envelopes against their source's schema before running
(issue 15.6); `--no-schema` skips it; messages built by the source are not re-checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from txcl.cases import envelope_schema_problems

STACK = {"0/accept.txcl": "SET @lmtp.res.code = 250\n"}


def make_stack(tmp_path: Path) -> Path:
    stack = tmp_path / "OPS/acme/inbound"
    for name, text in STACK.items():
        (stack / name).parent.mkdir(parents=True, exist_ok=True)
        (stack / name).write_text(text)
    return stack


def txcl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "txcl.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_a_forgotten_txc_wrapper_and_a_string_size_are_named():
    assert "has no `_txc`" in envelope_schema_problems({"src": "lmtp", "lmtp": {}})[0]
    (size,) = envelope_schema_problems(
        {"_txc": {"src": "lmtp", "lmtp": {"mail": {"size": "12"}}}})
    assert size.startswith("_txc.lmtp.mail.size: '12' is not of type 'integer'")
    (unknown,) = envelope_schema_problems(
        {"_txc": {"src": "lmtp", "lmtp": {"rcpts": ["a@b.example"]}}})
    assert "_txc.lmtp" in unknown and "'rcpts' was unexpected" in unknown


def test_a_partial_fixture_of_the_right_types_passes():
    assert envelope_schema_problems({"_txc": {"src": "lmtp"}}) == []
    assert envelope_schema_problems(
        {"_txc": {"src": "lmtp", "lmtp": {"rcpt": ["a@b.example"], "msg": {"subject": "x"}}}}
    ) == []
    assert envelope_schema_problems({"ticket": 1}) == []  # no source: nothing to check


def test_txcl_test_refuses_a_bad_envelope_and_no_schema_runs_it(tmp_path):
    stack = make_stack(tmp_path)
    envelope = tmp_path / "e.json"
    envelope.write_text(json.dumps({"_txc": {"src": "lmtp", "lmtp": {
        "rcpt": ["a@acme.example"], "mail": {"size": "big"}}}}))
    done = txcl("test", str(stack), str(envelope))
    assert done.returncode == 1
    assert f"{envelope}: the envelope does not fit" in done.stderr
    assert "_txc.lmtp.mail.size: 'big' is not of type 'integer'" in done.stderr
    assert "--no-schema" in done.stderr
    done = txcl("test", "--no-schema", str(stack), str(envelope))
    assert done.returncode == 0, done.stderr
    assert "250" in done.stdout


def test_a_case_file_with_a_bad_envelope_fails_with_what_is_wrong(tmp_path):
    stack = make_stack(tmp_path)
    (stack / "tests").mkdir()
    (stack / "tests/bad.yaml").write_text(
        "name: wrapper forgotten\n"
        "input: {envelope: {src: lmtp, lmtp: {rcpt: [a@acme.example]}}}\n"
        "expect: {verdicts: ['250 2.0.0 OK']}\n")
    done = txcl("test", str(stack))
    assert done.returncode == 1
    assert "has no `_txc`" in done.stdout + done.stderr
    done = txcl("test", "--no-schema", str(stack))
    assert "has no `_txc`" not in done.stdout + done.stderr


def test_a_cyclic_envelope_is_the_runs_clear_error_not_a_crash(tmp_path):
    cyclic: dict = {"_txc": {"src": "lmtp", "lmtp": {"rcpt": ["a@acme.example"]}}}
    cyclic["_txc"]["lmtp"]["msg"] = cyclic
    assert envelope_schema_problems(cyclic) == []  # left to run_case's input check
    stack = make_stack(tmp_path)
    (stack / "tests").mkdir()
    (stack / "tests/cycle.yaml").write_text(
        "name: cycle\ninput: {envelope: &e {_txc: {src: lmtp, lmtp: {rcpt: [a@acme.example],"
        " msg: {subject: x, headers: *e}}}}}\n")
    done = txcl("test", str(stack))
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
