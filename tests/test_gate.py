"""The activation gate (issue 15): what `txcl lint` calls an error never goes live. On a
reload that stack's last good version keeps answering while the other stacks' changes go
live, and the reload is reported FAILED for that stack with the problem's file:line:col; at
a cold start (or new in a reload) the stack is not served (451 4.3.0, never a bounce); other
stacks are unaffected and warnings never block."""

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
    # a verdict no static value can satisfy: a code from a path that is never a number, a
    # code where a recipient slot belongs
    ("SET @lmtp.res.code = @lmtp.mail.from\n", "verdict-code", "1:22"),
    ("SET @lmtp.res.recipients.0 = 250\n", "verdict-form", "1:30"),
]
IDS = [f"{check}-{n}" for n, (_, check, _) in enumerate(BAD)]
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


def test_a_reload_with_a_lint_error_keeps_that_stacks_last_good_version_only(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    ops = {"acme/_mail/0/10-accept.txcl": GOOD,
           "beta/_mail/0/reject.txcl": 'SET @lmtp.res.code = 550\n'}
    server = serve(tmp_path, ops, CONFIG, "--no-watch")
    bad_file = tmp_path / "OPS/acme/_mail/0/20-bad.txcl"
    beta_file = tmp_path / "OPS/beta/_mail/0/reject.txcl"
    held = "reload (sighup): stack acme/_mail FAILED; still serving its last good version"
    for number, (rule, check, where) in enumerate(BAD, start=1):
        bad_file.write_text(rule)  # acme broken, and beta edited, in the same reload
        beta_file.write_text(f'SET @lmtp.res.code = 250\nSET @lmtp.res.msg = "beta {number}"\n')
        server.proc.send_signal(signal.SIGHUP)
        wait_for_count(server, held, number)
        with server.lmtp() as client:
            _, replies = deliver(client, ["a@acme.example", "b@beta.example"])
        assert replies == [(250, b"2.0.0 v1"), (250, f"2.0.0 beta {number}".encode())], check
        text, data = status(tmp_path)
        assert "last reload: FAILED for 1 stack(s); all else in the version above is live" in text
        assert "stack acme/_mail: FAILED, still serving its last good version" in text
        assert f"{bad_file}:{where}: txcl_lint_error:" in text and f"[{check}]" in text
        assert data["version"] == number + 1 and data["last_reload"]["ok"] is False
        [failed] = data["last_reload"]["failed_stacks"]
        assert failed["stack"] == "acme/_mail" and failed["serving"] == "last good version"
        assert f"{bad_file}:{where}" in json.dumps(failed["problems"])
    assert f"{bad_file}:1:22: txcl_lint_error" in server.stderr()  # logged, not only in status
    bad_file.write_text(LIST_IN)  # the fourth rule of the issue loads and fires
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log(rf"reload \(sighup\): now serving version {len(BAD) + 2}", timeout=30)
    with server.lmtp() as client:
        _, replies = deliver(client, ["a@acme.example", "b@beta.example"])
    assert replies == [(250, b"2.0.0 in"), (250, f"2.0.0 beta {len(BAD)}".encode())]
    text, data = status(tmp_path)
    assert "last reload: ok" in text and data["last_reload"]["failed_stacks"] == []
    assert "Traceback" not in server.stderr()


def test_a_stack_new_in_a_reload_with_a_lint_error_is_not_served_and_its_mail_waits(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(tmp_path, {"acme/_mail/0/10-accept.txcl": GOOD}, CONFIG, "--no-watch")
    new = tmp_path / "OPS/gamma/_mail/0/bad.txcl"
    new.parent.mkdir(parents=True)
    new.write_text("SET @lmtp.res.code = 999\n")
    (tmp_path / "OPS/acme/_mail/0/10-accept.txcl").write_text(GOOD.replace("v1", "v2"))
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log(r"reload \(sighup\): stack gamma/_mail FAILED; not served", timeout=30)
    with server.lmtp() as client:
        _, replies = deliver(client, ["a@acme.example", "c@gamma.example"])
    assert replies[0] == (250, b"2.0.0 v2") and replies[1][0] == 451
    assert replies[1][1].startswith(b"4.3.0")
    text, data = status(tmp_path)
    assert "stack gamma/_mail: FAILED, not served (its mail gets 451 4.3.0)" in text
    assert f"{new}:1:22: txcl_lint_error:" in text and "[verdict-code]" in text
    assert data["last_reload"]["failed_stacks"][0]["serving"] == "none"


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
