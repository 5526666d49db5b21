"""Against a real `txco serve`: traces with scrubbing, `txco trace`, `txco status`, and live
reload on a file edit, on SIGHUP, and of a broken edit that must not replace working rules."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import Server, rid_of, txco_argv, unrid

CONFIG = "ingress:\n  lmtp:\n    verified_domains:\n      acme.example: {tenant: acme}\n"
SECRET = "Bearer sk-live-e2e-0123456789"

ACCEPT = """\
WHEN @lmtp.rcpt.0 =~ /^support@/
SET @lmtp.res.code = 250
SET @lmtp.res.msg = "v1"
"""
ACCEPT_V2 = ACCEPT.replace('"v1"', '"v2"')
NEVER_FIRES_BUT_SCRUBS = """\
WHEN @lmtp.rcpt.0 =~ /^nobody-ever@/
WITH omit = "_txc.lmtp.msg.raw, _txc.lmtp.msg.attachments"
WITH redact = "_txc.lmtp.msg.headers.authorization"
SET @lmtp.res.code = 550
"""
BROKEN = 'WHEN @lmtp.rcpt.0 =~ /^support@/\nSET @lmtp.res.code = 250\nSET @lmtp.res.msg = "v3\n'

MESSAGE = (
    "From: Alice <alice@example.com>\r\n"
    "To: support@acme.example\r\n"
    "Subject: wifi keeps dropping\r\n"
    f"Authorization: {SECRET}\r\n"
    "\r\n"
    "Hi support\r\n"
)

OPS = {
    "acme/_mail/0/10-accept.txcl": ACCEPT,
    "acme/_mail/0/90-scrub.txcl": NEVER_FIRES_BUT_SCRUBS,
}


def deliver(
    server: Server, rcpts: tuple[str, ...] = ("support@acme.example",), message: str = MESSAGE
) -> list[str]:
    """One LMTP transaction; the reply line of every recipient, in RCPT order, without the
    request id each ends with."""
    return unrid(deliver_raw(server, rcpts, message))


def deliver_raw(
    server: Server, rcpts: tuple[str, ...] = ("support@acme.example",), message: str = MESSAGE
) -> list[str]:
    """One LMTP transaction; the reply line of every recipient, in RCPT order."""
    with server.lmtp() as client:
        client.ehlo_or_helo_if_needed()
        client.mail("alice@example.com")
        for rcpt in rcpts:
            code, _ = client.rcpt(rcpt)
            assert code == 250, code
        client.putcmd("data")
        code, _ = client.getreply()
        assert code == 354
        client.send(smtplib.quotedata(message).encode() + b"\r\n.\r\n")
        replies = [client.getreply() for _ in rcpts]
        return [f"{code} {text.decode()}" for code, text in replies]


def txco(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*txco_argv(), *args], capture_output=True, text=True, timeout=30)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


def traces(server: Server) -> list[Path]:
    root = server.state_dir / "requests"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


def stored_part(folder: Path, name: str) -> Any:
    """One part of a trace, read from its file as jq would (`jq -s add trace.jsonl`)."""
    lines = (folder / "trace.jsonl").read_text().splitlines()
    merged = {k: v for line in lines for k, v in json.loads(line).items()}
    return merged[name]


def test_a_delivery_leaves_a_scrubbed_trace_that_txco_trace_shows(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    old_umask = os.umask(0o022)  # the server inherits it: traces must stay private anyway
    try:
        server = serve(tmp_path, OPS, CONFIG)
    finally:
        os.umask(old_umask)
    (line,) = deliver_raw(server)
    assert unrid(line) == "250 2.0.0 v1"
    folder = wait_for(lambda: traces(server))[0]
    assert folder.name == rid_of(line)  # the reply Postfix logs leads to the trace
    files = {p.name for p in folder.iterdir()}
    assert files == {"trace.jsonl"}  # raw omitted: no message stored beside it
    assert folder.parent.stat().st_mode & 0o777 == 0o700
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / "trace.jsonl").stat().st_mode & 0o777 == 0o600
    on_disk = "".join(p.read_text() for p in folder.iterdir())
    assert SECRET not in on_disk
    envelope = stored_part(folder, "envelope")
    assert "raw" not in envelope["_txc"]["lmtp"]["msg"]
    assert envelope["_txc"]["lmtp"]["msg"]["headers"]["authorization"] == "[REDACTED]"
    assert envelope["_txc"]["lmtp"]["msg"]["subject"] == "wifi keeps dropping"
    response = stored_part(folder, "response")
    assert response["replies"] == [
        {"rcpt": "support@acme.example", "code": 250, "line": line}
    ]

    state = ["--state-dir", str(server.state_dir)]
    shown = txco("trace", *state)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(folder.name)
    assert "route    tenant=acme  stack=acme/_mail  ingress=domain:acme.example" in shown.stdout
    assert "support@acme.example  250 2.0.0 v1" in shown.stdout
    assert "0/10-accept.txcl:1:1" in shown.stdout
    assert 'SET _txc.lmtp.res.msg: (missing) -> "v1"' in shown.stdout
    assert SECRET not in shown.stdout

    by_prefix = txco("trace", folder.name[:12], *state)
    assert by_prefix.stdout == shown.stdout

    listed = txco("trace", "--list", *state)
    assert listed.returncode == 0
    row = listed.stdout.splitlines()[1].split()
    assert row[0] == folder.name and row[2:5] == ["lmtp", "acme/_mail/0", "250"]

    as_json = json.loads(txco("trace", "--json", *state).stdout)
    assert as_json["summary"]["rid"] == folder.name
    assert as_json["steps"]["fired"][0]["pos"].endswith("10-accept.txcl:1:1")
    assert "raw" not in as_json["envelope"]["_txc"]["lmtp"]["msg"]

    missing = txco("trace", "NOPE", *state)
    assert missing.returncode == 1 and "no trace 'NOPE'" in missing.stderr


def test_trace_errors_mode_skips_good_runs_and_keep_prunes(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    invalid_verdict = "WHEN @lmtp.rcpt.0 =~ /^fail@/\nSET @lmtp.res.code = 990 + 9\n"  # run error: 451
    ops = {**OPS, "acme/_mail/0/20-fail.txcl": invalid_verdict}
    server = serve(tmp_path, ops, CONFIG, "--trace=errors", "--trace-keep=2")
    assert deliver(server) == ["250 2.0.0 v1"]
    for _ in range(3):
        assert deliver(server, ("fail@acme.example",))[0].startswith("451 ")
    wait_for(lambda: len(traces(server)) == 2)
    time.sleep(0.2)
    kept = traces(server)
    assert len(kept) == 2
    for folder in kept:
        summary = stored_part(folder, "summary")
        assert summary["recipients"][0]["code"] == 451 and summary["error"]


def test_trace_off_writes_nothing(serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(tmp_path, OPS, CONFIG, "--trace=off")
    assert deliver(server) == ["250 2.0.0 v1"]
    time.sleep(0.3)
    assert traces(server) == []


def test_an_edit_is_served_without_a_restart(serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(tmp_path, OPS, CONFIG, "--watch-interval=0.1")
    assert deliver(server) == ["250 2.0.0 v1"]
    (tmp_path / "OPS/acme/_mail/0/10-accept.txcl").write_text(ACCEPT_V2)
    server.wait_for_log(r"reload \(watch\): now serving version 2")
    assert deliver(server) == ["250 2.0.0 v2"]
    status = txco("status", "--state-dir", str(server.state_dir))
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("serving version 2 since ")
    assert server.stop(signal.SIGTERM) == 0
    stopped = txco("status", "--state-dir", str(server.state_dir))
    assert stopped.returncode == 2
    assert stopped.stdout.startswith("serving version 2 since ")  # its last status
    assert "txco status: not running: the txco serve that wrote this status" in stopped.stderr


def test_sighup_reloads(serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(tmp_path, OPS, CONFIG, "--no-watch")
    (tmp_path / "OPS/acme/_mail/0/10-accept.txcl").write_text(ACCEPT_V2)
    time.sleep(0.3)
    assert deliver(server) == ["250 2.0.0 v1"]  # no watcher: nothing changes on its own
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log(r"reload \(sighup\): now serving version 2")
    assert deliver(server) == ["250 2.0.0 v2"]


def test_a_broken_edit_keeps_the_old_rules_and_is_reported(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    server = serve(tmp_path, OPS, CONFIG, "--watch-interval=0.1")
    rule = tmp_path / "OPS/acme/_mail/0/10-accept.txcl"
    rule.write_text(BROKEN)
    server.wait_for_log(r"reload \(watch\): stack acme/_mail FAILED; still serving its last good")
    problem_line = server.wait_for_log(rf"{rule}:3:\d+: txcl_parse_error")
    assert "txcl_parse_error" in problem_line
    assert deliver(server) == ["250 2.0.0 v1"]  # still the last good rules

    status = txco("status", "--state-dir", str(server.state_dir))
    assert status.returncode == 1
    assert "last reload: FAILED for 1 stack(s)" in status.stdout
    assert "stack acme/_mail: FAILED, still serving its last good version" in status.stdout
    assert f"{rule}:3:" in status.stdout
    as_json = json.loads(txco("status", "--json", "--state-dir", str(server.state_dir)).stdout)
    assert as_json["version"] == 2 and as_json["last_reload"]["ok"] is False
    assert as_json["last_reload"]["failed_stacks"][0]["stack"] == "acme/_mail"

    rule.write_text(ACCEPT_V2)
    server.wait_for_log(r"now serving version 3")
    assert deliver(server) == ["250 2.0.0 v2"]


def test_a_config_edit_changes_routing_without_a_restart(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    ops = {**OPS, "beta/_mail/0/10-accept.txcl": ACCEPT.replace('"v1"', '"beta"')}
    server = serve(tmp_path, ops, CONFIG, "--watch-interval=0.1")
    with server.lmtp() as client:
        client.ehlo_or_helo_if_needed()
        client.mail("alice@example.com")
        assert client.rcpt("support@beta.example")[0] == 550  # beta.example is not routed
    (tmp_path / "txco.yaml").write_text(CONFIG + "      beta.example: {tenant: beta}\n")
    server.wait_for_log(r"reload \(watch\): now serving version 2")
    assert deliver(server, ("support@beta.example",)) == ["250 2.0.0 beta"]


def test_trace_list_filters_find_a_request_from_the_outside(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    config = CONFIG + "      beta.example: {tenant: beta}\n"
    ops = {**OPS, "beta/_mail/0/10-accept.txcl": ACCEPT.replace('"v1"', '"beta"')}
    server = serve(tmp_path, ops, config)

    def mail(message_id: str, subject: str) -> str:
        return MESSAGE.replace(
            "Subject: wifi keeps dropping", f"Subject: {subject}\r\nMessage-ID: <{message_id}>"
        )

    assert deliver(server, ("support@acme.example",), mail("one@x", "first")) == ["250 2.0.0 v1"]
    assert deliver(server, ("other@acme.example",), mail("two@x", "second"))[0].startswith("550")
    assert deliver(server, ("support@beta.example",), mail("three@x", "third")) == [
        "250 2.0.0 beta"]
    wait_for(lambda: len(traces(server)) == 3)
    state = ["--state-dir", str(server.state_dir)]

    def listed(*filters: str) -> list[str]:
        """The Message-IDs of the traces `txco trace --list --json` keeps, oldest first."""
        done = txco("trace", "--list", "--json", *filters, *state)
        assert done.returncode == 0, done.stderr
        return [s["message_id"] for s in json.loads(done.stdout)]

    assert listed() == ["<one@x>", "<two@x>", "<three@x>"]
    assert listed("--rcpt", "SUPPORT@acme.example") == ["<one@x>"]
    assert listed("--rcpt", "*@beta.example") == ["<three@x>"]
    assert listed("--message-id", "two@x") == ["<two@x>"]
    assert listed("--message-id", "<three@x>") == ["<three@x>"]
    assert listed("--tenant", "beta") == ["<three@x>"]
    assert listed("--stack", "acme/_mail") == ["<one@x>", "<two@x>"]
    assert listed("--stack", "_mail") == ["<one@x>", "<two@x>", "<three@x>"]
    assert listed("--verdict", "rejected") == listed("--verdict", "5xx") == ["<two@x>"]
    assert listed("--verdict", "250") == ["<one@x>", "<three@x>"]
    assert listed("--tenant", "acme", "--verdict", "accepted") == ["<one@x>"]
    assert listed("--tenant", "acme", "-n", "1") == ["<two@x>"]  # the newest after filtering
    assert listed("--tenant", "nobody") == []

    text = txco("trace", "--list", "--rcpt", "other@acme.example", *state)
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 2
    bad = txco("trace", "--list", "--verdict", "bogus", *state)
    assert bad.returncode == 2 and "--verdict 'bogus'" in bad.stderr

    summary = json.loads(txco("trace", "--list", "--json", "--message-id", "one@x", *state).stdout)
    assert (summary[0]["sender"], summary[0]["subject"]) == ("alice@example.com", "first")
    shown = txco("trace", summary[0]["name"], *state)
    assert 'message  id="<one@x>"  sender="alice@example.com"  subject="first"' in shown.stdout

    # beta's stack scrubs nothing: its trace keeps the message as received, acme's does not
    (beta,) = json.loads(txco("trace", "--list", "--json", "--tenant", "beta", *state).stdout)
    raw = subprocess.run([*txco_argv(), "trace", beta["name"], "--message", *state],
                         capture_output=True, timeout=30)
    received = mail("three@x", "third").encode() + b"\r\n"  # deliver() adds a line before "."
    assert raw.returncode == 0 and raw.stdout == received
    none = txco("trace", summary[0]["name"], "--message", *state)
    assert none.returncode == 1 and "no message stored" in none.stderr


def test_the_trace_byte_limits_are_served_flags(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    ops = {"acme/_mail/0/10-accept.txcl": ACCEPT}  # no hints: the message would be stored
    server = serve(tmp_path, ops, CONFIG, "--trace-max-bytes=1K", "--trace-keep-bytes=4K")
    for _ in range(4):
        assert deliver(server) == ["250 2.0.0 v1"]
    wait_for(lambda: len(traces(server)) >= 1)
    server.stop(signal.SIGTERM)  # the writer finishes what is queued before the process ends
    kept = traces(server)
    assert kept and sum(p.stat().st_size for f in kept for p in f.iterdir()) <= 4096
    for folder in kept:
        assert {p.name for p in folder.iterdir()} == {"trace.jsonl"}
        summary = stored_part(folder, "summary")
        assert summary["cut"][0].startswith("message (") and summary["recipients"][0]["code"] == 250


def test_with_redact_of_the_sender_scrubs_the_servers_log_lines_as_the_trace(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    sender = "hidden.sender@example.org"
    ops = {
        "acme/_mail/0/10-accept.txcl": ACCEPT,
        "acme/_mail/0/90-scrub.txcl": 'WHEN @lmtp.rcpt.0 =~ /^nobody-ever@/\n'
                                      'WITH redact = "_txc.lmtp.mail.from"\n'
                                      'SET @lmtp.res.code = 550\n',
        "beta/_mail/0/10-accept.txcl": ACCEPT,  # scrubs nothing
    }
    config = CONFIG + "      beta.example: {tenant: beta}\n"
    server = serve(tmp_path, ops, config)
    with server.lmtp() as client:
        client.ehlo_or_helo_if_needed()
        assert client.mail(sender)[0] == 250
        assert client.rcpt("support@acme.example")[0] == 250
        assert client.rcpt("support@beta.example")[0] == 250
        replies = [client.data(MESSAGE.encode())] + [client.getreply()]
    assert [code for code, _ in replies] == [250, 250]
    acme_rid, beta_rid = (rid_of(reply) for reply in replies)
    server.wait_for_log(rf"lmtp group rid={acme_rid} stack=acme/_mail ingress=\S+ "
                        r"from=<\[REDACTED\]> rcpts=1 codes=250")
    server.wait_for_log(rf"lmtp group rid={beta_rid} stack=beta/_mail ingress=\S+ "
                        rf"from=<{sender}> rcpts=1 codes=250")
    server.wait_for_log(r"lmtp delivery client=\S+ rcpts=2 size=\d+ replies=250,250")
    assert [line for line in server.log if sender in line] == [
        line for line in server.log if f"rid={beta_rid}" in line]  # beta's line, nothing else
    state = ["--state-dir", str(server.state_dir)]
    def both_traced() -> list[dict[str, Any]]:
        listed = json.loads(txco("trace", "--list", "--json", *state).stdout or "[]")
        return listed if len(listed) == 2 else []

    listed = wait_for(both_traced, timeout=30)
    assert {t["name"]: t["sender"] for t in listed} == {acme_rid: "[REDACTED]",
                                                        beta_rid: sender}
