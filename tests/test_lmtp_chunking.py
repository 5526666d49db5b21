"""CHUNKING (RFC 3030) with LMTP's one reply per recipient (RFC 2033), through a real
`txco serve` and a raw socket client: each BDAT but the last gets one 250, the LAST one a
reply per accepted recipient; size limits and out-of-order chunks get proper replies, and a
chunk's bytes are never taken for commands."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Server, unrid

OPS = {
    "acme/_mail/0/accept.txcl": 'SET @lmtp.res.code = 250\nSET @lmtp.res.msg = "queued"\n',
    "beta/_mail/0/refuse.txcl": 'SET @lmtp.res.code = 550\nSET @lmtp.res.msg = "refused"\n',
}
CONFIG = ("ingress: {lmtp: {verified_domains: {acme.example: {tenant: acme}, "
          "beta.example: {tenant: beta}}}}\n")
QUEUED, REFUSED = b"250 2.0.0 queued", b"550 5.1.1 refused"


class Client:
    def __init__(self, server: Server) -> None:
        assert server.host and server.port
        self.sock = socket.create_connection((server.host, server.port), timeout=10)
        self.reader = self.sock.makefile("rb")
        assert self.reply().startswith(b"220 ")

    def reply(self) -> bytes:
        lines = []
        while True:
            line = self.reader.readline()
            if not line:
                raise ConnectionError(f"closed after {lines}")
            lines.append(line.rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return b"\n".join(lines)

    def send(self, data: bytes, replies: int = 1) -> list[bytes]:
        self.sock.sendall(data)
        return [self.reply() for _ in range(replies)]


@pytest.fixture
def server(serve: Callable[..., Server], tmp_path: Path) -> Server:
    return serve(tmp_path, OPS, CONFIG, "--lmtp-max-msg-bytes=1000")


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    client = Client(server)
    assert b"\n250-CHUNKING\n" in client.send(b"LHLO c\r\n")[0]
    yield client
    client.sock.close()


def transaction(client: Client, rcpts: list[bytes]) -> None:
    assert client.send(b"MAIL FROM:<a@example.com>\r\n") == [b"250 2.1.0 OK"]
    for rcpt in rcpts:
        assert client.send(b"RCPT TO:<" + rcpt + b">\r\n")[0][:3] in (b"250", b"550")


def test_chunks_then_last_get_one_reply_each_then_one_per_recipient(client: Client) -> None:
    transaction(client, [b"x@acme.example", b"nobody@nowhere.example", b"y@beta.example"])
    assert client.send(b"BDAT 12\r\nSubject: a\r\n") == [b"250 2.0.0 12 octets received"]
    # a chunk's bytes are data, whatever they look like: a dot line, a command
    body = b"\r\n.\r\nQUIT\r\n"
    assert unrid(client.send(b"BDAT %d LAST\r\n" % len(body) + body, 2)) == [QUEUED, REFUSED]
    assert client.send(b"NOOP\r\n") == [b"250 2.0.0 OK"]  # the session goes on


def test_pipelined_chunks_in_one_write(client: Client) -> None:
    transaction(client, [b"x@acme.example"])
    replies = client.send(b"BDAT 3\r\nabcBDAT 0 LAST\r\nNOOP\r\n", 3)
    assert replies[0::2] == [b"250 2.0.0 3 octets received", b"250 2.0.0 OK"]
    assert unrid(replies[1]) == QUEUED


def test_a_message_over_the_limit_gets_552_and_nothing_is_delivered(
        client: Client, server: Server) -> None:
    transaction(client, [b"x@acme.example", b"y@beta.example"])
    assert client.send(b"BDAT 900\r\n" + b"x" * 900) == [b"250 2.0.0 900 octets received"]
    assert client.send(b"BDAT 200\r\n" + b"y" * 200) == [b"552 5.3.4 message too large"]
    assert client.send(b"BDAT 5 LAST\r\nzzzzz", 2) == [b"552 5.3.4 message too large"] * 2
    transaction(client, [b"x@acme.example"])  # a new transaction is fine
    assert unrid(client.send(b"BDAT 4 LAST\r\nok\r\n")) == [QUEUED]
    assert server.wait_for_log(r"lmtp delivery .* size=4 replies=250")


@pytest.mark.parametrize(("before", "reply"), [
    pytest.param(b"", b"503 5.5.1 need MAIL before BDAT", id="no MAIL"),
    pytest.param(b"MAIL FROM:<a@example.com>\r\n", b"503 5.5.1 no valid recipients",
                 id="no recipient"),
])
def test_out_of_order_chunks_are_read_and_refused(client: Client, before: bytes,
                                                  reply: bytes) -> None:
    if before:
        client.send(before)
    assert client.send(b"BDAT 6 LAST\r\nNOOP\r\n") == [reply]  # "NOOP" is chunk data
    assert client.send(b"NOOP\r\n") == [b"250 2.0.0 OK"]


@pytest.mark.parametrize("command", [b"BDAT", b"BDAT x", b"BDAT -1", b"BDAT 5 FIRST"])
def test_a_malformed_bdat_is_a_syntax_error(client: Client, command: bytes) -> None:
    assert client.send(command + b"\r\n") == [b"501 5.5.4 syntax: BDAT <size> [LAST]"]


def test_data_after_bdat_is_refused(client: Client) -> None:
    transaction(client, [b"x@acme.example"])
    client.send(b"BDAT 3\r\nabc")
    assert client.send(b"DATA\r\n") == [b"503 5.5.1 DATA after BDAT (RSET to start over)"]
    assert client.send(b"RSET\r\n") == [b"250 2.0.0 OK"]
