"""Hostile MIME through a real `txco serve` (issue 13): a flood of tiny parts is parsed
within its bounds, and other mail is answered meanwhile."""

from __future__ import annotations

import smtplib
import threading
import time

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
        return client.data(message)


def test_tiny_part_floods_are_bounded_and_other_mail_is_answered_meanwhile(serve, tmp_path):
    server = serve(tmp_path, STACK, YAML)
    assert len(FLOOD) > 5_000_000
    flood_replies: list[tuple[int, bytes]] = []
    sending = threading.Barrier(9)

    def flood() -> None:
        sending.wait()
        flood_replies.append(send(server, FLOOD, timeout=120))

    threads = [threading.Thread(target=flood) for _ in range(8)]
    for thread in threads:
        thread.start()
    sending.wait()
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
