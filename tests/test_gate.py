"""The activation gate (issue 15): what `txcl lint` calls an error never goes live. On a
reload the last good version keeps answering and the reload is reported FAILED with the
problem's file:line:col; at a cold start the stack is not served (451 4.3.0, never a bounce);
other stacks are unaffected and warnings never block."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Server, txco_argv
from tests.test_serve_cli import CONFIG, deliver

GOOD = 'SET @lmtp.res.code = 250\nSET @lmtp.res.msg = "v1"\n'
# (rule, the lint check that refuses it, its line:col in the file)
BAD = [
    ('WHEN @lmtp.msg.subjet =~ /invoice/i\nSET @lmtp.res.code = 250\n', "unknown-path", "1:6"),
    ('WHEN @lmtp.mail.size > "big"\nSET @lmtp.res.code = 250\n', "type-mismatch", "1:6"),
    ('WHEN @lmtp.rcpt.0 IN "a@acme.example"\nSET @lmtp.res.code = 250\n', "in-not-list", "1:22"),
    ('SET @lmtp.mail.from = "x"\n', "read-only-write", "1:5"),
    ("SET @lmtp.res.code = 999\n", "verdict-code", "1:22"),
]
IDS = [check for _, check, _ in BAD]
# The fourth silent-false rule of the issue: IN is existential over a list on its left now.
LIST_IN = 'WHEN @lmtp.rcpt IN ["a@acme.example"]\nSET @lmtp.res.code = 250\nSET @lmtp.res.msg = "in"\n'


def txcl_lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "txcl.cli", "lint", str(path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("rule", "check", "where"), BAD, ids=IDS)
def test_lint_refuses_each_with_its_check_and_position(tmp_path, rule, check, where):
    path = tmp_path / "r.txcl"
    path.write_text(rule)
    done = txcl_lint(path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{path}:{where}: txcl_lint_error:" in done.stdout
    assert f"[{check}]" in done.stdout


def test_in_over_a_list_on_the_left_passes_lint(tmp_path):
    path = tmp_path / "r.txcl"
    path.write_text(LIST_IN)
    done = txcl_lint(path)
    assert done.returncode == 0 and "0 error(s)" in done.stdout


def wait_for_count(server: Server, text: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while server.stderr().count(text) < count:
        assert time.monotonic() < deadline, server.stderr()
        time.sleep(0.02)


def status(tmp_path: Path) -> tuple[str, dict]:
    text = subprocess.run([*txco_argv(), "status", "--state-dir", str(tmp_path / "var")],
                          capture_output=True, text=True, timeout=60).stdout
    return text, json.loads((tmp_path / "var" / "status.json").read_text())


def test_a_reload_with_a_lint_error_keeps_the_last_good_version(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    ops = {"acme/_mail/0/10-accept.txcl": GOOD,
           "beta/_mail/0/reject.txcl": 'SET @lmtp.res.code = 550\n'}
    server = serve(tmp_path, ops, CONFIG, "--no-watch")
    bad_file = tmp_path / "OPS/acme/_mail/0/20-bad.txcl"
    for number, (rule, check, where) in enumerate(BAD, start=1):
        bad_file.write_text(rule)
        server.proc.send_signal(signal.SIGHUP)
        wait_for_count(server, "reload (sighup) failed; still serving version 1", number)
        with server.lmtp() as client:
            _, replies = deliver(client, ["a@acme.example", "b@beta.example"])
        assert replies == [(250, b"2.0.0 v1"), (550, b"5.1.1 rejected")], check
        text, data = status(tmp_path)
        assert "last reload: FAILED, still serving the version above" in text
        assert f"{bad_file}:{where}: txcl_lint_error:" in text and f"[{check}]" in text
        assert data["version"] == 1 and data["last_reload"]["ok"] is False
        assert f"{bad_file}:{where}" in json.dumps(data["last_reload"]["problems"])
    assert f"{bad_file}:1:22: txcl_lint_error" in server.stderr()  # logged, not only in status
    bad_file.write_text(LIST_IN)  # the fourth rule of the issue loads and fires
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log(r"reload \(sighup\): now serving version 2", timeout=30)
    with server.lmtp() as client:
        _, replies = deliver(client, ["a@acme.example"])
    assert replies == [(250, b"2.0.0 in")]
    assert "Traceback" not in server.stderr()


def test_at_a_cold_start_a_stack_with_a_lint_error_is_not_served_and_its_mail_waits(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    ops = {"acme/_mail/0/10-accept.txcl": GOOD,
           "beta/_mail/0/bad.txcl": "SET @lmtp.res.code = 999\n",
           # a warning (a stack path nobody writes) never blocks
           "gamma/_mail/0/warn.txcl": 'SET tag.seen = true\nSET @lmtp.res.code = 250\n\n'
                                      'WHEN tag.sen == true\nSET @lmtp.res.code = 550\n'}
    server = serve(tmp_path, ops, CONFIG, "--no-watch")
    bad = tmp_path / "OPS/beta/_mail/0/bad.txcl"
    server.wait_for_log(rf"not served: {bad}:1:22: txcl_lint_error: .*\[verdict-code\]")
    with server.lmtp() as client:
        _, replies = deliver(client, ["a@acme.example", "b@beta.example", "c@gamma.example"])
    assert [code for code, _ in replies] == [250, 451, 250]
    assert replies[1][1].startswith(b"4.3.0")
    text, data = status(tmp_path)
    assert f"{bad}:1:22" in text
    assert "Traceback" not in server.stderr()
