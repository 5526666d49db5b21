"""A long run (many rules over a large message) does not hold the event loop: another
client is greeted while it runs, through a real `txco serve`."""

from __future__ import annotations

import socket
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import Server

pytestmark = pytest.mark.abuse

RULES_PER_FILE = 250
FILES = 4
CONFIG = textwrap.dedent("""\
    ingress:
      lmtp:
        verified_domains:
          acme.example: {tenant: acme, stack: acme/_mail}
    """)


def slow_stack() -> dict[str, str]:
    tree = {}
    for f in range(FILES):
        rules = "".join(
            f"WHEN @lmtp.msg.text =~ /[b-z]{f}q{i}x/\nSET seen.r{f}_{i} = true\n\n"
            for i in range(RULES_PER_FILE)
        )
        tree[f"acme/_mail/0/r{f:02d}.txcl"] = rules
    tree["acme/_mail/1/accept.txcl"] = "SET @lmtp.res.code = 250\n"
    return tree


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def greeting_seconds(server: Server) -> float:
    started = time.monotonic()
    with socket.create_connection((server.host, server.port), timeout=60) as sock:
        assert read_reply(sock).startswith(b"220 ")
    return time.monotonic() - started


def test_a_long_run_does_not_hold_other_clients_greeting(serve, tmp_path: Path) -> None:
    server = serve(tmp_path, slow_stack(), CONFIG, "--lmtp-resp-timeout=120s")
    body = ("a " * 1_000_000 + "\r\n").encode()
    message = b"From: a@x.example\r\nSubject: big\r\n\r\n" + body
    replied_at: list[float] = []
    data_sent = threading.Event()

    def deliver() -> None:
        with socket.create_connection((server.host, server.port), timeout=120) as sock:
            read_reply(sock)
            for command in (b"LHLO t.example", b"MAIL FROM:<a@x.example>",
                            b"RCPT TO:<x@acme.example>", b"DATA"):
                sock.sendall(command + b"\r\n")
                read_reply(sock)
            sock.sendall(message + b".\r\n")
            data_sent.set()
            reply = read_reply(sock)
            replied_at.append(time.monotonic())
            assert reply.startswith(b"250"), reply

    client = threading.Thread(target=deliver)
    client.start()
    assert data_sent.wait(60)
    time.sleep(0.3)  # the run has begun
    waited = greeting_seconds(server)
    greeted_at = time.monotonic()
    client.join(120)
    assert replied_at, server.stderr()
    # The run was still going when the second client was greeted, and the greeting came
    # in a small part of the time it took.
    assert replied_at[0] - greeted_at > 0.5, (waited, replied_at[0] - greeted_at)
    assert waited < 0.5, waited
