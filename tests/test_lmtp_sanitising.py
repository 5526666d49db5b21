"""Client bytes never reach a reply, the log or a terminal raw (issue 13, item 8), through a
real `txco serve`: control characters a client sends are shown escaped (\\x1b) where a reply
echoes them, and addresses with control characters are refused before anything logs them."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Server

ACCEPT = {"acme/_mail/0/accept.txcl": "SET @lmtp.res.code = 250\n"}
CONFIG = "ingress: {lmtp: {verified_domains: {acme.example: {tenant: acme}}}}\n"
_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


def exchange(server: Server, commands: list[bytes]) -> list[bytes]:
    """The reply line to each command (sent one at a time), after LHLO."""
    assert server.host and server.port
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        replies = []
        for command in [b"LHLO c", *commands]:
            sock.sendall(command + b"\r\n")
            while (line := reader.readline())[3:4] == b"-":
                pass
            replies.append(line)
        return replies[1:]


@pytest.fixture
def server(serve: Callable[..., Server], tmp_path: Path) -> Server:
    return serve(tmp_path, ACCEPT, CONFIG)


def test_replies_that_echo_client_text_escape_control_bytes(server: Server) -> None:
    replies = exchange(server, [
        b"FROB\x1b[2J\x00\x07",
        b"MAIL FROM:<a@example.com> X=\x1b]0;owned\x07",
        b"MAIL FROM:<a@example.com>",
        b"RCPT TO:<b@acme.example> NOTIFY=\x1b[31m\x7f",
    ])
    assert replies == [
        b"500 5.5.2 command not recognized: FROB\\x1b[2J\\x00\\x07\r\n",
        b"555 5.5.4 MAIL FROM parameter not supported: X=\\x1b]0;owned\\x07\r\n",
        b"250 2.1.0 OK\r\n",
        b"555 5.5.4 RCPT TO parameter not supported: NOTIFY=\\x1b[31m\\x7f\r\n",
    ]


@pytest.mark.parametrize("local", [b'"a\rb"', b'"a\x00b"', b'"a\x1b[31mb"', b'"a\\\x1bb"',
                                   b"a\x1bb"])
def test_addresses_with_control_characters_are_refused_and_never_logged_raw(
        server: Server, local: bytes) -> None:
    replies = exchange(server, [b"MAIL FROM:<" + local + b"@example.com>",
                                b"MAIL FROM:<a@example.com>",
                                b"RCPT TO:<" + local + b"@acme.example>", b"QUIT"])
    assert [r[:9] for r in replies] == [b"501 5.5.4", b"250 2.1.0", b"501 5.5.4", b"221 2.0.0"]
    server.stop()
    assert not _CONTROL.search(server.stderr().encode())
