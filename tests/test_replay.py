"""`txcl replay` over traces a live `txco serve` wrote: recorded verdict -> new verdict, ops
answered from the trace, and what the trace's scrubbing hides from the replay."""

from __future__ import annotations

import json
import shutil
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from conftest import Server, txco_argv

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "inbound-support-mailbox"
STACK = Path("acme/support")
# Scrubs the sender, and reads it: every replay of its traces must say so.
REDACTS_SENDER = """\
WITH redact = "_txc.lmtp.mail.from"
WHEN @lmtp.mail.from == "nobody@nowhere.example"
SET seen.nobody = true
"""


def _deliver(server: Server, rcpts: tuple[str, ...], message: bytes) -> list[str]:
    with server.lmtp() as client:
        client.ehlo_or_helo_if_needed()
        client.mail("maria.keller@kellerbau.example")
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(smtplib.quotedata(message.decode()).encode() + b"\r\n.\r\n")
        return [f"{code} {text.decode()}" for code, text in (client.getreply() for _ in rcpts)]


def _replay(ops: Path, *traces: Path, fmt: str = "json") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "txcl.cli", "replay", str(ops), *map(str, traces), "--format", fmt, "--no-cache"],
        capture_output=True, text=True, timeout=60,
    )


def _wait_for_traces(root: Path, count: int) -> list[Path]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError("no traces written")


def test_replay_of_live_traces_diffs_verdicts_after_an_edit(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    ops = tmp_path / "OPS"
    shutil.copytree(EXAMPLE / "OPS", ops)
    shutil.rmtree(ops / STACK / "tests")
    shutil.copytree(EXAMPLE / "ops", tmp_path / "ops")
    (ops / STACK / "0" / "90-redact.txcl").write_text(REDACTS_SENDER)
    server = serve(tmp_path, ops, (EXAMPLE / "txco.yaml").read_text())
    sent = _deliver(
        server, ("support@acme.example", "sales@acme.example"), (EXAMPLE / "samples" / "billing.eml").read_bytes()
    )
    assert sent[0].startswith("250 2.0.0 ticket #1") and sent[1].startswith("550 ")
    [folder] = _wait_for_traces(server.state_dir / "requests", 1)
    server.stop()

    same = _replay(ops, server.state_dir / "requests")
    assert same.returncode == 0, same.stdout + same.stderr
    doc = json.loads(same.stdout)
    assert (doc["traces"], doc["verdicts"], doc["changed"]) == (1, 2, 0)
    [one] = doc["replays"]
    assert one["rid"] == folder.name and one["unanswered_ops"] == []
    assert [v["replayed"] for v in one["verdicts"]] == [line.split(" (rid")[0] for line in sent]
    assert any("_txc.lmtp.mail.from, which this trace redacted" in n for n in one["fidelity"])

    # txco trace --explain: every rule, fired or not, from the recorded envelope and answers
    explained = subprocess.run(
        [*txco_argv(), "trace", folder.name, "--explain",
         "--state-dir", str(server.state_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert explained.returncode == 0, explained.stderr
    assert "40-verdicts.txcl:9:1  fired" in explained.stdout
    assert "✓ WHEN @lmtp.rcpt.* =~ /^(support|help" in explained.stdout
    assert '@lmtp.rcpt.* = ["support@acme.example", "sales@acme.example"]' in explained.stdout
    assert "40-verdicts.txcl:14:1  fired" in explained.stdout
    assert '@lmtp.mail.from = "[REDACTED]"' in explained.stdout
    assert "maria.keller" not in explained.stdout

    # the edit: a new text for accepted mail, a rule reading the omitted attachments, a new op
    verdicts = ops / STACK / "1" / "40-verdicts.txcl"
    verdicts.write_text(verdicts.read_text().replace('"ticket " + ticket.ref', '"case " + ticket.ref'))
    (ops / STACK / "1" / "90-new.txcl").write_text(
        'WHEN @lmtp.msg.attachments.0.type =~ /pdf/\nEXEC "op://NOTIFY"\n'
        'WHEN len(@lmtp.rcpt) > 0\nEXEC "op://NOTIFY"\n'
    )
    changed = _replay(ops, folder)
    assert changed.returncode == 1, changed.stdout + changed.stderr
    doc = json.loads(changed.stdout)
    assert (doc["verdicts"], doc["changed"]) == (2, 1)
    first = doc["replays"][0]["verdicts"][0]
    assert first["changed"] and first["replayed"] == "250 2.0.0 case #1"
    assert first["recorded"].startswith("250 2.0.0 ticket #1")
    assert doc["replays"][0]["unanswered_ops"] == ["NOTIFY"]
    assert any("_txc.lmtp.msg.attachments" in n and "omitted" in n for n in doc["replays"][0]["fidelity"])

    text = _replay(ops, folder, fmt="text")
    assert text.returncode == 1
    assert "≠  250 2.0.0 case #1" in text.stdout
    assert "1 of 2 verdicts changed (1 traces replayed)" in text.stdout
    assert "op NOTIFY: the trace holds no answer" in text.stdout


def test_omit_through_a_list_drops_the_content_and_keeps_the_rest(tmp_path: Path) -> None:
    from txcl.loader import load_target
    from txcl.trace import scrubber_for

    rule = tmp_path / "OPS" / "acme" / "s" / "0" / "10.txcl"
    rule.parent.mkdir(parents=True)
    rule.write_text('WITH omit = "_txc.lmtp.msg.attachments[*].content"\nSET x.y = 1\n')
    stack = load_target(tmp_path / "OPS").stacks["acme/s"]
    attachment = {"name": "a.pdf", "type": "application/pdf", "size": 3, "sha256": "ab", "content": "b64:eHh4"}
    doc = {"_txc": {"lmtp": {"msg": {"attachments": [attachment, dict(attachment, name="b.pdf")]}}}}
    kept = scrubber_for(stack.hints).document(doc)["_txc"]["lmtp"]["msg"]["attachments"]
    assert kept == [{k: v for k, v in a.items() if k != "content"} for a in doc["_txc"]["lmtp"]["msg"]["attachments"]]


def test_reply_rid_leads_to_the_trace_and_a_refused_rcpt_is_logged(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    # reads the raw message: the replay must put it back from message.eml to agree
    ops = {
        "acme/_mail/0/10-accept.txcl": (
            'WHEN @lmtp.rcpt.0 =~ /^support@/\nWHEN @lmtp.msg.raw =~ /^b64:/\nSET @lmtp.res.code = 250\n'
        )
    }
    config = "ingress:\n  lmtp:\n    verified_domains:\n      acme.example: {tenant: acme}\n"
    server = serve(tmp_path, ops, config)  # the request id in replies is on by default
    message = b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n"
    with server.lmtp() as client:
        client.ehlo_or_helo_if_needed()
        client.mail("a@example.com")
        assert client.rcpt("nobody@elsewhere.example")[0] == 550
        assert client.rcpt("support@acme.example")[0] == 250
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(message + b".\r\n")
        code, text = client.getreply()
    assert code == 250
    line = text.decode()
    assert line.startswith("2.0.0 OK (rid ") and line.endswith(")")
    rid = line.removeprefix("2.0.0 OK (rid ").removesuffix(")")
    [folder] = _wait_for_traces(server.state_dir / "requests", 1)
    assert folder.name == rid and (folder / "message.eml").is_file()
    shown = subprocess.run(
        [*txco_argv(), "trace", rid, "--state-dir", str(server.state_dir)],
        capture_output=True, text=True, timeout=30,
    )
    assert shown.returncode == 0 and f"250 2.0.0 OK (rid {rid})" in shown.stdout
    deadline = time.monotonic() + 10
    while not any("rcpt refused at RCPT: <nobody@elsewhere.example>" in x for x in server.log):
        assert time.monotonic() < deadline, server.stderr()
        time.sleep(0.05)
    server.stop()
    same = _replay(tmp_path / "OPS", folder)
    assert same.returncode == 0, same.stdout
    assert json.loads(same.stdout)["changed"] == 0


def test_with_redact_also_scrubs_what_the_server_logs(serve: Callable[..., Server], tmp_path: Path) -> None:
    secret = "Bearer sk-live-log-0123456789"
    ops = {
        "acme/_mail/0/10-bad.txcl": (
            'WITH redact = "_txc.lmtp.msg.headers.authorization"\n'
            # through a stack path: lint refuses a code read straight from a header list
            "SET tag.auth = @lmtp.msg.headers.authorization\n"
            "SET @lmtp.res.code = tag.auth\n"
        )
    }
    config = "ingress:\n  lmtp:\n    verified_domains:\n      acme.example: {tenant: acme}\n"
    server = serve(tmp_path, ops, config)
    message = f"From: a@example.com\r\nAuthorization: {secret}\r\n\r\nhello\r\n".encode()
    with server.lmtp() as client:
        client.ehlo_or_helo_if_needed()
        client.mail("a@example.com")
        assert client.rcpt("support@acme.example")[0] == 250
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(message + b".\r\n")
        assert client.getreply()[0] == 451
    deadline = time.monotonic() + 10
    while not any("lmtp group rid=" in line and "error=" in line for line in server.log):
        assert time.monotonic() < deadline, server.stderr()
        time.sleep(0.05)
    server.stop()
    logged = "\n".join(server.log)
    assert "[REDACTED]" in logged
    assert "sk-live-log" not in logged


READS_THE_BODY = 'WHEN @lmtp.msg.text =~ /refund/\nSET @lmtp.res.code = 250\nSET @lmtp.res.msg = "refund"\n'


def test_a_long_body_is_stored_once_and_replays_from_the_message(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    """A text body over INLINE_BODY_CHARS is not repeated in trace.jsonl: the envelope names
    message.eml for it, as for attachments, and a replay decodes it from there."""
    ops = tmp_path / "OPS"
    (ops / STACK / "0").mkdir(parents=True)
    (ops / STACK / "0" / "10-refund.txcl").write_text(READS_THE_BODY)
    server = serve(tmp_path, ops, (EXAMPLE / "txco.yaml").read_text().split("\nops:")[0])
    long_body = "Hello,\n" + "the printer jams again. " * 800 + "\nI want a refund.\n"
    short_body = "Hello,\nI want a refund.\n"
    for body in (long_body, short_body):
        message = f"From: a@client.example\nSubject: jam\n\n{body}".replace("\n", "\r\n").encode()
        assert _deliver(server, ("support@acme.example",), message)[0].startswith("250 2.0.0 refund")
    long_trace, short_trace = _wait_for_traces(server.state_dir / "requests", 2)
    server.stop()

    def text_of(folder: Path) -> object:
        lines = [json.loads(line) for line in (folder / "trace.jsonl").read_bytes().splitlines()]
        return next(p for p in lines if "envelope" in p)["envelope"]["_txc"]["lmtp"]["msg"]["text"]

    assert text_of(long_trace) == {"file": "message.eml", "size": None}  # as attachments' content
    assert (long_trace / "trace.jsonl").stat().st_size < len(long_body)
    assert long_body.replace("\n", "\r\n").encode() in (long_trace / "message.eml").read_bytes()
    assert str(text_of(short_trace)).strip() == short_body.strip()  # short: kept inline
    replayed = _replay(ops, server.state_dir / "requests")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    doc = json.loads(replayed.stdout)
    assert (doc["traces"], doc["verdicts"], doc["changed"]) == (2, 2, 0)
    assert all(r["fidelity"] == [] for r in doc["replays"])
