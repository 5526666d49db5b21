"""Hostile MIME through a real `txco serve` (issue 13): a flood of tiny parts is parsed
within its bounds, and other mail is answered meanwhile."""

from __future__ import annotations

import threading
import time

from conftest import unrid

YAML = "ingress: {lmtp: {verified_domains: {acme.example: {tenant: acme}}}}\n"
# A stack that reads the text body (so every message gets its MIME walk) and the bound.
STACK = {
    "acme/_mail/0/10-text.txcl": (
        'WHEN @lmtp.msg.text =~ /hello/\nSET @lmtp.res.code = 250\n'
        'SET @lmtp.res.msg = "2.0.0 text read"\n'),
    "acme/_mail/0/20-truncated.txcl": (
        "WHEN @lmtp.msg.truncated == true\nSET @lmtp.res.code = 250\n"
        'SET @lmtp.res.msg = "2.0.0 truncated"\n'),
}
PART = b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
FLOOD = (b"From: a@client.example\r\nSubject: flood\r\n"
         b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + PART * 160_000 + b"--b--\r\n")
# Big enough that its MIME walk, too, needs a worker thread.
OTHER = (b"From: a@client.example\r\nSubject: hi\r\n\r\nhello there\r\n"
         + b"a line of an ordinary long message\r\n" * 3000)


def send(server, message: bytes, timeout: float) -> tuple[int, bytes]:
    with server.lmtp(timeout=timeout) as client:
        client.ehlo_or_helo_if_needed()
        assert client.mail("a@client.example")[0] == 250
        assert client.rcpt("support@acme.example")[0] == 250
        return unrid(client.data(message))


def test_tiny_part_floods_are_bounded_and_other_mail_is_answered_meanwhile(serve, tmp_path):
    server = serve(tmp_path, STACK, YAML)
    assert len(FLOOD) > 5_000_000
    flood_replies: list[tuple[int, bytes]] = []
    all_sent = threading.Barrier(9)

    def flood() -> None:
        with server.lmtp(timeout=120) as client:
            client.ehlo_or_helo_if_needed()
            assert client.mail("a@client.example")[0] == 250
            assert client.rcpt("support@acme.example")[0] == 250
            assert client.docmd("DATA")[0] == 354
            client.send(FLOOD + b".\r\n")  # no line starts with a dot: nothing to stuff
            all_sent.wait()
            flood_replies.append(unrid(client.getreply()))

    threads = [threading.Thread(target=flood) for _ in range(8)]
    for thread in threads:
        thread.start()
    all_sent.wait(120)  # every flood is in the server's hands: now another sender's mail
    started = time.monotonic()
    other = send(server, OTHER, timeout=60)
    other_took = time.monotonic() - started
    for thread in threads:
        thread.join(180)
    assert other == (250, b"2.0.0 text read")
    assert other_took < 20, other_took
    assert flood_replies == [(250, b"2.0.0 truncated")] * 8
    server.wait_for_log(r"truncated, more than 1000 parts")
    # answered, nothing left running: a last message comes back at once
    started = time.monotonic()
    assert send(server, OTHER, timeout=30) == (250, b"2.0.0 text read")
    assert time.monotonic() - started < 5


def vm_hwm_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def big_multipart(size: int) -> bytes:
    """A text part the stack reads and one big base64 attachment (as bench/lmtp sends)."""
    head = (b"From: a@client.example\r\nSubject: logs\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Type: text/plain\r\n\r\nhello, the log is attached\r\n--b\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b'Content-Disposition: attachment; filename="x.log"\r\n\r\n')
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"
    return head + line * ((size - len(head)) // len(line)) + b"--b--\r\n"


def test_a_25_mib_multipart_peaks_under_four_times_its_size_with_traces_off(serve, tmp_path):
    server = serve(tmp_path, STACK, YAML, "--trace=off")
    message = big_multipart(25 * 2**20 - 8192)
    assert send(server, message, timeout=120) == (250, b"2.0.0 text read")
    assert vm_hwm_bytes(server.proc.pid) < 4 * len(message)


def test_latin1_bytes_in_a_header_do_not_poison_the_support_example(serve, tmp_path):
    import json
    import shutil
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "inbound-support-mailbox"
    shutil.copytree(example / "OPS", tmp_path / "OPS")
    shutil.copytree(example / "ops", tmp_path / "ops")
    server = serve(tmp_path, tmp_path / "OPS", (example / "txco.yaml").read_text())
    poison = (b"From: J\xe9r\xf4me <jerome@client.example>\r\nTo: support@acme.example\r\n"
              b"Subject: caf\xe9 wifi keeps dropping\r\nMessage-ID: <p1@client.example>\r\n\r\n"
              b"the wifi drops every hour\r\n")
    code, reply = send(server, poison, timeout=60)
    assert code == 250, (code, reply, server.stderr())
    events = list(server.state_dir.rglob("events.jsonl"))
    assert events, server.stderr()
    event = json.loads(events[0].read_text("utf-8").splitlines()[-1])
    msg = event["_txc"]["lmtp"]["msg"]
    assert msg["from"] == [{"name": "J\u00e9r\u00f4me", "addr": "jerome@client.example"}]
    assert msg["subject"] == "caf\u00e9 wifi keeps dropping"
