"""The LMTP protocol server: the DATA decoder as a pure object, then a real server (in this
process, on real sockets) talking to real clients: smtplib.LMTP and raw sockets.

The deliverer here is a small real object that answers by tenant; the end-to-end tests
through `txco serve` and the real deliverer are in test_serve_cli.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from aiosmtpd.lmtp import LMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtp import wire
from lmtp.config import IngressConfig, Settings, Target, parse_listen_addrs
from lmtp.delivery import Transaction
from lmtp.listeners import ListenError, bind_listeners, close_listeners
from lmtp.routing import Router
from lmtp.server import LMTPHead
from lmtp.session import DeliveryHandler
from lmtp.wire import DataDecoder

HOSTNAME = "lmtp.test.example"
INGRESS = IngressConfig(
    recipients={"@acme.example": Target("acme", "acme/_mail"),
                "@beta.example": Target("beta", "beta/_mail")},
)
QUEUED = (250, b"2.0.0 queued")
REFUSED = (550, b"5.7.1 refused by rule")


# --- the DATA decoder, as a pure object ---------------------------------------------------


def stuff(message: bytes) -> bytes:
    """What an LMTP client sends for `message` (which ends with CRLF): dots doubled, end."""
    return (b"\r\n" + message).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


def decode_data(stream: bytes) -> tuple[bytes, bytes] | None:
    """(message, rest of stream) for a whole DATA stream fed at once; None when it does not end."""
    decoder = DataDecoder(1 << 62)
    used = decoder.feed(stream)
    if used < 0:
        return None
    return decoder.message(), stream[used:]


def feed_in_chunks(stream: bytes, sizes: list[int], max_bytes: int = 1 << 30,
                   size_hint: int | None = None) -> tuple[DataDecoder, bytes]:
    """Fed as a session may feed it: views of a buffer overwritten after each feed (the
    decoder must keep none of it)."""
    decoder = DataDecoder(max_bytes, size_hint)
    received = bytearray(max(len(stream), 1))
    pos = 0
    for size in [*sizes, len(stream)]:
        chunk = stream[pos:pos + max(size, 1)]
        if not chunk:
            break
        received[:len(chunk)] = chunk
        used = decoder.feed(memoryview(received)[:len(chunk)])
        received[:len(chunk)] = b"#" * len(chunk)
        if used >= 0:
            return decoder, chunk[used:] + stream[pos + len(chunk):]
        pos += len(chunk)
    return decoder, b""


@pytest.mark.parametrize(("stream", "message", "rest"), [
    pytest.param(b".\r\n", b"", b"", id="empty message"),
    pytest.param(b"a\r\n.\r\n", b"a\r\n", b"", id="one line"),
    pytest.param(b"..\r\n.\r\n", b".\r\n", b"", id="a line that is one dot"),
    pytest.param(b"..a\r\n...b\r\n.\r\n", b".a\r\n..b\r\n", b"", id="leading dots unstuffed"),
    pytest.param(b"a.\r\n.b\r\n.\r\n", b"a.\r\nb\r\n", b"", id="dots elsewhere kept"),
    pytest.param(b"a\r\n.\r\nQUIT\r\n", b"a\r\n", b"QUIT\r\n", id="pipelined command after"),
    pytest.param(b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n", b"", id="bare LF dot LF is data"),
    pytest.param(b"a\r.\rb\r\n.\r\n", b"a\r.\rb\r\n", b"", id="bare CR dot CR is data"),
    pytest.param(b"a\r.\r\nb\r\n.\r\n", b"a\r.\r\nb\r\n", b"", id="CR dot CRLF is data"),
    pytest.param(b"a\n.\r\nb\r\n.\r\n", b"a\n.\r\nb\r\n", b"", id="LF dot CRLF is data"),
    pytest.param(b"\xff\x00\x80\r\n.\r\n", b"\xff\x00\x80\r\n", b"", id="binary"),
])
def test_decoder_ends_only_at_crlf_dot_crlf_and_unstuffs(stream: bytes, message: bytes,
                                                         rest: bytes) -> None:
    assert decode_data(stream) == (message, rest)
    # Byte by byte: the terminator and every "\r\n." found across chunk borders.
    decoder, leftover = feed_in_chunks(stream, [1] * len(stream))
    assert decoder.done and decoder.message() == message and leftover == rest


def test_decoder_waits_for_the_end() -> None:
    assert decode_data(b"a\r\n.") is None
    assert decode_data(b"a\n.\n") is None


def test_decoder_over_the_limit_drops_the_message_and_keeps_counting() -> None:
    decoder = DataDecoder(max_bytes=1000)
    line = b"x" * 1022 + b"\r\n"
    tracemalloc.start()
    try:
        for _ in range(100):
            assert decoder.feed(line) == -1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoder.too_large
    assert peak < 20_000  # nothing kept past the limit: memory stays bounded
    assert decoder.feed(b".\r\nNOOP\r\n") == 3
    assert decoder.done and decoder.size == 102400 and decoder.message() == b""


def test_decoder_at_exactly_the_limit_keeps_the_message() -> None:
    decoder = DataDecoder(max_bytes=5)
    assert decoder.feed(b"abc\r\n.\r\n") == 8
    assert not decoder.too_large and decoder.message() == b"abc\r\n"


_PIECES = st.sampled_from([b".", b"..", b"\r\n", b"\r", b"\n", b"\r\n.", b".\r\n", b"x", b"\x00",
                           b"\xff", b"\r\n.\r\n"])
_BODIES = st.one_of(st.binary(max_size=300),
                    st.lists(_PIECES, max_size=60).map(b"".join))


@settings(max_examples=200, deadline=None)
@given(body=_BODIES, sizes=st.lists(st.integers(1, 40), max_size=30), rest=st.binary(max_size=8))
def test_decoder_returns_what_the_client_meant_for_any_body_and_chunking(
        body: bytes, sizes: list[int], rest: bytes) -> None:
    message = body if body.endswith(b"\r\n") else body + b"\r\n"
    decoder, leftover = feed_in_chunks(stuff(message) + rest, sizes)
    assert decoder.done
    assert decoder.message() == message
    assert leftover == rest
    assert decoder.size == len(message)


def read_as_the_rfc_says(stream: bytes) -> tuple[bytes, bytes] | None:
    """(message, rest) of a whole DATA stream, or None: the first CRLF "." CRLF (the
    stream starting as if after a CRLF) ends it, and a line's leading dot is dropped."""
    framed = b"\r\n" + stream
    end = framed.find(b"\r\n.\r\n")
    if end < 0:
        return None
    stuffed = framed[:end + 2]  # with the CRLF in front and the message's last CRLF
    return stuffed.replace(b"\r\n.", b"\r\n")[2:], framed[end + 5:]


@settings(max_examples=300, deadline=None)
@given(stream=st.lists(_PIECES, max_size=40).map(b"".join) | st.binary(max_size=200),
       sizes=st.lists(st.integers(1, 12), max_size=30))
def test_decoder_reads_any_stream_in_any_chunking_as_the_rfc_says(
        stream: bytes, sizes: list[int]) -> None:
    """Streams that end, and streams that do not (yet), cut anywhere."""
    expected = read_as_the_rfc_says(stream)
    decoder, leftover = feed_in_chunks(stream, sizes)
    assert decoder.done == (expected is not None)
    if expected is not None:
        assert (decoder.message(), leftover) == expected
        assert decoder.size == len(expected[0])


@settings(max_examples=200, deadline=None)
@given(body=_BODIES, sizes=st.lists(st.integers(1, 40), max_size=30),
       hint=st.integers(0, 700), max_bytes=st.integers(1, 700))
def test_a_size_hint_changes_nothing_but_the_allocation(
        body: bytes, sizes: list[int], hint: int, max_bytes: int) -> None:
    """Whatever SIZE= says (too small, too large, over the limit), the decoder gives what it
    gives without one."""
    message = body if body.endswith(b"\r\n") else body + b"\r\n"
    stream = stuff(message) + b"NOOP\r\n"
    plain, plain_rest = feed_in_chunks(stream, sizes, max_bytes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wire, "PREALLOCATE_FROM_BYTES", 0)  # small hints count too
        hinted, hinted_rest = feed_in_chunks(stream, sizes, max_bytes, size_hint=hint)
    assert (hinted.done, hinted.too_large, hinted.size) == (plain.done, plain.too_large, plain.size)
    assert hinted.message() == plain.message()
    assert hinted_rest == plain_rest


def test_buffers_allocated_ahead_of_their_data_stay_within_the_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that declares SIZE=<limit> and sends nothing cannot make a worker hold
    more than the budget: past it, buffers grow with the data as without a hint."""
    monkeypatch.setattr(wire, "PREALLOCATE_FROM_BYTES", 1000)
    monkeypatch.setattr(wire, "PREALLOCATE_BUDGET_BYTES", 250_000)
    budget = wire._preallocated
    before = budget.held
    first = DataDecoder(10**6, size_hint=50_000)  # a buffer of ~119,000 bytes each
    second = DataDecoder(10**6, size_hint=50_000)
    assert budget.held - before > 2 * 50_000
    third = DataDecoder(10**6, size_hint=50_000)  # over the budget: no buffer ahead
    assert third.feed(b"abc\r\n.\r\n") == 8 and third.message() == b"abc\r\n"
    assert budget.held - before < 250_000
    del first, second
    assert budget.held == before  # given back when the decoders are gone


# --- a real server in this process ---------------------------------------------------------


class TenantDeliverer:
    """Answers by tenant: acme 250, beta 550. Records what it got. Can be made to misbehave."""

    def __init__(self) -> None:
        self.transactions: list[Transaction] = []
        self.delay = 0.0
        self.stubborn = False  # a cancelled delay is ignored: the lines come anyway
        self.fail = False
        self.short = False

    async def deliver(self, tx: Transaction) -> list[str]:
        self.transactions.append(tx)
        if self.delay:
            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:
                if not self.stubborn:
                    raise
        if self.fail:
            raise RuntimeError("the rules engine fell over")
        lines = ["250 2.0.0 queued" if route.tenant == "acme" else "550 5.7.1 refused by rule"
                 for route in tx.routes]
        return lines[:-1] if self.short else lines


class RunningHead:
    """An LMTPHead on its own event loop in a thread, like aiosmtpd's Controller."""

    def __init__(self, settings: Settings, deliverer: TenantDeliverer) -> None:
        self.settings = settings
        self.deliverer = deliverer
        handler = DeliveryHandler(Router(INGRESS, settings), deliverer, Transaction)
        self.loop = asyncio.new_event_loop()
        self.head = LMTPHead(settings, handler)
        self.loop.run_until_complete(self.head.start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        tcp = [b for b in self.head.bound if not b.startswith("unix:")]
        host, _, port = tcp[0].rpartition(":") if tcp else ("", "", "0")
        self.host, self.port = host.strip("[]"), int(port)
        unix = [b for b in self.head.bound if b.startswith("unix:")]
        self.unix_path = unix[0][len("unix:"):] if unix else ""

    def client(self, timeout: float = 5.0) -> smtplib.LMTP:
        return smtplib.LMTP(self.host, self.port, timeout=timeout)

    def raw(self, timeout: float = 5.0) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        assert read_replies(sock, 1)[0].startswith(b"220 ")
        return sock

    def close(self, grace: float = 2.0) -> None:
        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.head.close(grace), self.loop).result(grace + 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def start_head(tmp_path: Path) -> Iterator[Callable[..., RunningHead]]:
    running: list[RunningHead] = []

    def start(**overrides: object) -> RunningHead:
        base = Settings(personalities=("lmtp",), lmtp_hostname=HOSTNAME,
                        lmtp_listen_addrs=parse_listen_addrs(
                            f"127.0.0.1:0,unix:{tmp_path}/lmtp.sock"))
        head = RunningHead(replace(base, **overrides), TenantDeliverer())
        running.append(head)
        return head

    yield start
    for head in running:
        head.close()


@pytest.fixture
def server(start_head: Callable[..., RunningHead]) -> RunningHead:
    return start_head()


def read_replies(sock: socket.socket, count: int) -> list[bytes]:
    """`count` complete replies (a multi-line reply counts once), each its lines joined."""
    data = b""
    replies: list[bytes] = []
    current: list[bytes] = []
    while len(replies) < count:
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {replies + current}")
            data += chunk
        line, data = data.split(b"\r\n", 1)
        current.append(line)
        if line[3:4] != b"-":
            replies.append(b"\n".join(current))
            current = []
    assert data == b"", f"unexpected extra reply data {data!r}"
    return replies


def send_transaction(client: smtplib.LMTP, rcpts: list[str], body: bytes,
                     sender: str = "alice@example.com") -> list[tuple[int, bytes]]:
    """MAIL, RCPTs, DATA; the DATA replies (smtplib reads only the first one itself)."""
    assert client.mail(sender)[0] == 250
    accepted = [r for r in rcpts if client.rcpt(r)[0] == 250]
    first = client.data(body)
    return [first] + [client.getreply() for _ in accepted[1:]]


def test_greeting_names_the_host_and_lmtp(server: RunningHead) -> None:
    sock = socket.create_connection((server.host, server.port), timeout=5)
    with sock:
        greeting = sock.recv(512)
    assert greeting == f"220 {HOSTNAME} LMTP txco ready\r\n".encode()


def test_lhlo_lists_exactly_the_extensions_we_implement(server: RunningHead) -> None:
    with server.client() as client:
        assert client.ehlo("client.example") == (
            250, f"{HOSTNAME}\nPIPELINING\nENHANCEDSTATUSCODES\n8BITMIME\nSMTPUTF8\nCHUNKING\n"
                 f"SIZE 26214400".encode())


@pytest.mark.parametrize("verb", ["HELO", "EHLO"])
def test_helo_and_ehlo_are_refused_with_a_hint(server: RunningHead, verb: str) -> None:
    with server.client() as client:
        code, text = client.docmd(f"{verb} client.example")
    assert (code, text) == (500, b"5.5.1 this is an LMTP server (RFC 2033): say LHLO instead")


def test_data_gets_one_reply_per_accepted_rcpt_in_rcpt_order(server: RunningHead) -> None:
    with server.client() as client:
        client.ehlo("client.example")
        assert client.mail("alice@example.com") == (250, b"2.1.0 OK")
        assert client.rcpt("one@acme.example") == (250, b"2.1.5 OK")
        assert client.rcpt("two@beta.example") == (250, b"2.1.5 OK")
        assert client.rcpt("nobody@nowhere.example") == (
            550, b"5.1.1 no rule accepted this recipient")
        assert client.rcpt("three@acme.example") == (250, b"2.1.5 OK")
        first = client.data(b"Subject: hi\r\n\r\nhello\r\n")
        replies = [first, client.getreply(), client.getreply()]
    assert replies == [QUEUED, REFUSED, QUEUED]
    [tx] = server.deliverer.transactions
    assert tx.rcpts == ("one@acme.example", "two@beta.example", "three@acme.example")
    assert [r.stack for r in tx.routes] == ["acme/_mail", "beta/_mail", "acme/_mail"]
    assert (tx.mail_from, tx.helo, tx.client_ip, tx.listener) == (
        "alice@example.com", "client.example", "127.0.0.1", "default")
    assert tx.data == b"Subject: hi\r\n\r\nhello\r\n"


def test_stock_aiosmtpd_lmtp_sends_one_data_reply_for_many_recipients(tmp_path: Path) -> None:
    """Why we replace aiosmtpd's DATA: its LMTP answers once, so a client waiting for the
    second recipient's status (as RFC 2033 requires) waits forever."""

    class AcceptAll:
        async def handle_DATA(self, server, session, envelope) -> str:
            return "250 OK"

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(
        loop.create_server(lambda: LMTP(AcceptAll(), loop=loop), "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        with smtplib.LMTP("127.0.0.1", port, timeout=1.0) as client:
            client.ehlo("client.example")
            client.mail("alice@example.com")
            client.rcpt("one@acme.example")
            client.rcpt("two@acme.example")
            assert client.data(b"hello\r\n")[0] == 250
            with pytest.raises((TimeoutError, socket.timeout, smtplib.SMTPServerDisconnected)):
                client.getreply()
    finally:
        loop.call_soon_threadsafe(server.close)
        time.sleep(0.2)  # the session sees the client go and ends
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_a_25_mib_message_streams_through_with_bounded_memory(server: RunningHead) -> None:
    size = 25 << 20
    line = b"x" * 998 + b"\r\n"
    message = line * (size // len(line))
    stream = stuff(message)
    with server.raw(timeout=30) as sock:
        sock.sendall(b"LHLO c\r\nMAIL FROM:<a@example.com> SIZE=%d\r\n"
                     b"RCPT TO:<a@acme.example>\r\nDATA\r\n" % len(message))
        read_replies(sock, 4)
        tracemalloc.start()
        try:
            started = time.monotonic()
            sock.sendall(stream)
            assert read_replies(sock, 1) == [b"250 2.0.0 queued"]
            elapsed = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert server.deliverer.transactions[0].data == message
    # the received chunks plus the joined message: about twice its size, never 4x
    assert peak < 3 * len(message), f"peak {peak / len(message):.1f}x the message"
    assert elapsed < 10


def test_dot_stuffing_round_trips_through_smtplib(server: RunningHead) -> None:
    body = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\nmiddle.\r\n...\r\n"
    with server.client() as client:
        client.ehlo("c")
        assert send_transaction(client, ["a@acme.example"], body) == [QUEUED]
    assert server.deliverer.transactions[0].data == body


def test_8bit_and_binary_bodies_arrive_unchanged(server: RunningHead) -> None:
    body = "Subject: ünïcode\r\n\r\nGrüße \u2603\r\n".encode() + bytes(range(256)).replace(
        b"\r", b"").replace(b"\n", b"") + b"\r\n"
    with server.raw() as sock:
        sock.sendall(b"LHLO c\r\nMAIL FROM:<a@example.com> BODY=8BITMIME\r\n"
                     b"RCPT TO:<a@acme.example>\r\nDATA\r\n")
        assert [r[:3] for r in read_replies(sock, 4)] == [b"250", b"250", b"250", b"354"]
        sock.sendall(stuff(body))
        assert read_replies(sock, 1) == [b"250 2.0.0 queued"]
    assert server.deliverer.transactions[0].data == body


def test_pipelined_commands_in_one_write_get_their_replies_in_order(server: RunningHead) -> None:
    with server.raw() as sock:
        sock.sendall(b"LHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<x@acme.example>\r\n"
                     b"RCPT TO:<nobody@nowhere.example>\r\nRCPT TO:<y@beta.example>\r\nDATA\r\n")
        replies = read_replies(sock, 6)
        assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"550", b"250", b"354"]
        # the message, the next transaction and QUIT in one write too
        sock.sendall(b"hello\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<z@acme.example>\r\nDATA\r\n")
        assert read_replies(sock, 5) == [b"250 2.0.0 queued", b"550 5.7.1 refused by rule",
                                         b"250 2.1.0 OK", b"250 2.1.5 OK",
                                         b"354 2.0.0 send the message, end with <CRLF>.<CRLF>"]
        sock.sendall(b"bounce\r\n.\r\nQUIT\r\n")
        assert read_replies(sock, 2) == [b"250 2.0.0 queued", f"221 2.0.0 {HOSTNAME} closing".encode()]
        assert sock.recv(10) == b""
    assert [tx.mail_from for tx in server.deliverer.transactions] == ["a@example.com", ""]


def test_messages_sent_with_their_commands_in_one_write_are_read_whole(
        server: RunningHead) -> None:
    """Message bytes that arrive with DATA (before the 354) are read from the command
    buffer; what follows each message there stays for the next commands."""
    with server.raw() as sock:
        sock.sendall(b"LHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<x@acme.example>\r\n"
                     b"DATA\r\none\r\n..dot\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<z@acme.example>\r\n"
                     b"DATA\r\ntwo\r\n.\r\nQUIT\r\n")
        replies = read_replies(sock, 10)
        assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354", b"250",
                                            b"250", b"250", b"354", b"250", b"221"]
    assert [tx.data for tx in server.deliverer.transactions] == [b"one\r\n.dot\r\n", b"two\r\n"]


def test_replies_owed_before_the_client_closes_its_side_are_still_sent(server: RunningHead) -> None:
    with server.raw() as sock:
        sock.sendall(b"LHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<x@acme.example>\r\nDATA\r\n")
        assert read_replies(sock, 4)[-1].startswith(b"354")
        sock.sendall(b"hi\r\n.\r\nQUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert read_replies(sock, 2)[0] == b"250 2.0.0 queued"


def test_several_transactions_and_rset_on_one_connection(server: RunningHead) -> None:
    with server.client() as client:
        client.ehlo("c")
        assert send_transaction(client, ["a@acme.example"], b"one\r\n") == [QUEUED]
        client.mail("b@example.com")
        client.rcpt("b@beta.example")
        assert client.rset() == (250, b"2.0.0 OK")
        assert client.rcpt("c@acme.example") == (503, b"5.5.1 need MAIL before RCPT")
        assert send_transaction(client, ["c@beta.example", "d@acme.example"], b"two\r\n") == [
            REFUSED, QUEUED]
    assert [tx.rcpts for tx in server.deliverer.transactions] == [
        ("a@acme.example",), ("c@beta.example", "d@acme.example")]


@pytest.mark.parametrize(("commands", "expected"), [
    pytest.param(["NOOP"], (250, b"2.0.0 OK"), id="noop"),
    pytest.param(["VRFY someone@acme.example"], (252, b"2.5.0 cannot VRFY, but will take the "
                                                 b"message and try delivery"), id="vrfy"),
    pytest.param(["FROB x"], (500, b"5.5.2 command not recognized: FROB"), id="unknown"),
    pytest.param(["STARTTLS"], (500, b"5.5.2 command not recognized: STARTTLS"), id="no tls"),
    pytest.param(["MAIL FROM:<a@example.com>"], (503, b"5.5.1 send LHLO first"), id="mail first"),
    pytest.param(["LHLO c", "RCPT TO:<a@acme.example>"], (503, b"5.5.1 need MAIL before RCPT"),
                 id="rcpt before mail"),
    pytest.param(["LHLO c", "MAIL FROM:<a@example.com>", "DATA"],
                 (503, b"5.5.1 no valid recipients"), id="data without rcpt"),
    pytest.param(["LHLO c", "MAIL FROM:<a@example.com>", "MAIL FROM:<b@example.com>"],
                 (503, b"5.5.1 sender already given (RSET to start over)"), id="nested mail"),
    pytest.param(["LHLO c", "MAIL FROM:a@"], (501, b"5.5.4 syntax: MAIL FROM:<address> "
                                                   b"[SIZE=n] [BODY=7BIT|8BITMIME] [SMTPUTF8]"),
                 id="bad address"),
    pytest.param(["LHLO c", "MAIL FROM:<a@example.com> RET=FULL"],
                 (555, b"5.5.4 MAIL FROM parameter not supported: RET=FULL"), id="unknown param"),
    pytest.param(["LHLO c", "MAIL FROM:<a@example.com>", "RCPT TO:<>"],
                 (501, b"5.5.4 syntax: RCPT TO:<address>"), id="null recipient"),
    pytest.param(["LHLO c", "MAIL FROM:<a@example.com> SIZE=999999999"],
                 (552, b"5.3.4 message too large (limit 26214400 bytes)"), id="size declared"),
    pytest.param(["RCPT TO:<" + "a" * 600 + "@acme.example>"],
                 (500, b"5.5.2 line too long (a command line is at most 512 octets)"),
                 id="over-long line"),
])
def test_command_replies(server: RunningHead, commands: list[str],
                         expected: tuple[int, bytes]) -> None:
    with server.client() as client:
        for command in commands[:-1]:
            assert client.docmd(command)[0] == 250
        assert client.docmd(commands[-1]) == expected
        assert client.noop() == (250, b"2.0.0 OK")  # the session goes on


def test_a_very_long_line_is_refused_without_buffering_it(server: RunningHead) -> None:
    with server.raw() as sock:
        sock.sendall(b"NOOP " + b"x" * 3_000_000 + b"\r\nNOOP\r\n")
        assert read_replies(sock, 2) == [
            b"500 5.5.2 line too long (a command line is at most 512 octets)", b"250 2.0.0 OK"]


def test_non_ascii_address_without_smtputf8_is_refused(server: RunningHead) -> None:
    refused = b"553 5.6.7 non-ASCII address: MAIL FROM must give SMTPUTF8"
    with server.raw() as sock:
        sock.sendall("LHLO c\r\nMAIL FROM:<jörg@example.com>\r\nMAIL FROM:<a@example.com>\r\n"
                     "RCPT TO:<jöse@acme.example>\r\nRCPT TO:<b@acme.example>\r\n".encode())
        assert read_replies(sock, 5)[1:] == [refused, b"250 2.1.0 OK", refused, b"250 2.1.5 OK"]


def test_utf8_addresses_with_smtputf8_are_accepted_and_delivered_as_text(
        server: RunningHead) -> None:
    with server.raw() as sock:
        sock.sendall("LHLO c\r\nMAIL FROM:<josé@example.com> SMTPUTF8\r\n"
                     "RCPT TO:<jöse@acme.example>\r\nRCPT TO:<\"jö se\"@acme.example>\r\n"
                     "DATA\r\n".encode())
        assert [r[:3] for r in read_replies(sock, 5)] == [b"250"] * 4 + [b"354"]
        sock.sendall("Subject: grüße\r\n\r\nhi\r\n.\r\n".encode())
        assert read_replies(sock, 2) == [b"250 2.0.0 queued"] * 2
    [tx] = server.deliverer.transactions
    assert (tx.mail_from, tx.rcpts) == ("josé@example.com",
                                        ("jöse@acme.example", '"jö se"@acme.example'))


def test_an_address_that_is_not_utf8_is_a_syntax_error(server: RunningHead) -> None:
    with server.raw() as sock:
        sock.sendall(b"LHLO c\r\nMAIL FROM:<j\xf6rg@example.com> SMTPUTF8\r\n")
        assert read_replies(sock, 2)[1] == b"501 5.5.4 syntax error: an address that is not UTF-8"


def test_too_many_recipients(start_head: Callable[..., RunningHead]) -> None:
    server = start_head(lmtp_max_recipients=2)
    with server.client() as client:
        client.ehlo("c")
        client.mail("a@example.com")
        assert client.rcpt("1@acme.example")[0] == 250
        assert client.rcpt("2@acme.example")[0] == 250
        assert client.rcpt("3@acme.example") == (452, b"4.5.3 too many recipients")
        assert [client.data(b"x\r\n"), client.getreply()] == [QUEUED, QUEUED]


def test_oversized_message_gets_552_per_rcpt_and_the_session_goes_on(
        start_head: Callable[..., RunningHead]) -> None:
    server = start_head(lmtp_max_msg_bytes=1000)
    with server.client() as client:
        client.ehlo("c")
        too_big = b"y" * 2000 + b"\r\n"
        assert send_transaction(client, ["a@acme.example", "b@beta.example"], too_big) == [
            (552, b"5.3.4 message too large")] * 2
        assert send_transaction(client, ["a@acme.example"], b"small\r\n") == [QUEUED]
    assert [tx.data for tx in server.deliverer.transactions] == [b"small\r\n"]


@pytest.mark.parametrize(("misbehave", "reply"), [
    pytest.param({"fail": True}, (451, b"4.3.0 delivery failed, try again later"), id="raises"),
    pytest.param({"short": True}, (451, b"4.3.0 delivery failed, try again later"),
                 id="too few lines"),
    pytest.param({"delay": 2.0}, (451, b"4.3.0 no verdict within 0.3s, try again later"),
                 id="resp timeout"),
    pytest.param({"delay": 2.0, "stubborn": True, "fail": True},
                 (451, b"4.3.0 delivery failed, try again later"),
                 id="resp timeout swallowed, then raises"),
])
def test_a_failing_deliverer_tempfails_every_rcpt(start_head: Callable[..., RunningHead],
                                                 misbehave: dict, reply: tuple[int, bytes]) -> None:
    server = start_head(lmtp_resp_timeout=0.3)
    for name, value in misbehave.items():
        setattr(server.deliverer, name, value)
    with server.client() as client:
        client.ehlo("c")
        assert send_transaction(client, ["a@acme.example", "b@beta.example"], b"x\r\n") == [
            reply] * 2
        assert client.noop() == (250, b"2.0.0 OK")


def test_a_deliverer_that_swallows_the_timeout_s_cancellation_is_answered_as_it_says(
        start_head: Callable[..., RunningHead]) -> None:
    """As under asyncio.timeout: the deadline cancels the delivery; lines that still come
    are the replies, and the session goes on."""
    server = start_head(lmtp_resp_timeout=0.3)
    server.deliverer.delay, server.deliverer.stubborn = 2.0, True
    with server.client() as client:
        client.ehlo("c")
        started = time.monotonic()
        assert send_transaction(client, ["a@acme.example", "b@beta.example"], b"x\r\n") == [
            QUEUED, REFUSED]
        assert time.monotonic() - started < 1.5
        assert client.noop() == (250, b"2.0.0 OK")


def test_after_a_late_verdict_an_idle_session_gets_the_read_timeout(
        start_head: Callable[..., RunningHead]) -> None:
    """The session's one timer serves the response deadline, then the read timeout again."""
    server = start_head(lmtp_resp_timeout=0.3, lmtp_read_timeout=0.6)
    server.deliverer.delay = 2.0
    with server.raw() as sock:
        sock.sendall(b"LHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<a@acme.example>\r\n"
                     b"DATA\r\n")
        read_replies(sock, 4)
        sock.sendall(b"x\r\n.\r\n")
        assert read_replies(sock, 1) == [b"451 4.3.0 no verdict within 0.3s, try again later"]
        started = time.monotonic()
        assert read_replies(sock, 1) == [
            f"421 4.4.2 {HOSTNAME} no command within 0.6s, closing".encode()]
        assert 0.4 < time.monotonic() - started < 3


def test_read_timeout_closes_with_421(start_head: Callable[..., RunningHead]) -> None:
    server = start_head(lmtp_read_timeout=0.3)
    with server.raw() as sock:
        sock.sendall(b"LHLO c\r\n")
        read_replies(sock, 1)
        started = time.monotonic()
        assert read_replies(sock, 1) == [
            f"421 4.4.2 {HOSTNAME} no command within 0.3s, closing".encode()]
        assert 0.2 < time.monotonic() - started < 3
        assert sock.recv(10) == b""


def test_data_timeout_closes_with_421_even_while_data_trickles(
        start_head: Callable[..., RunningHead]) -> None:
    server = start_head(lmtp_data_timeout=0.5, lmtp_read_timeout=5.0)
    with server.raw() as sock:
        sock.sendall(b"LHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<a@acme.example>\r\nDATA\r\n")
        read_replies(sock, 4)
        with contextlib.suppress(OSError):
            for _ in range(20):
                sock.sendall(b"still coming\r\n")
                time.sleep(0.05)
        assert read_replies(sock, 1) == [
            f"421 4.4.2 {HOSTNAME} message not received within 0.5s, closing".encode()]
    assert server.deliverer.transactions == []


def test_unix_socket_serves_and_is_removed_on_close(server: RunningHead) -> None:
    path = Path(server.unix_path)
    assert path.is_socket()
    with smtplib.LMTP(str(path), timeout=5) as client:
        client.ehlo("c")
        assert send_transaction(client, ["a@acme.example"], b"x\r\n") == [QUEUED]
    assert server.deliverer.transactions[0].client_ip == "unix"
    server.close()
    assert not path.exists()


def test_a_stale_socket_file_is_replaced(tmp_path: Path,
                                         start_head: Callable[..., RunningHead]) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "lmtp.sock"))
    stale.close()  # the file stays, nobody listens: what a crash leaves behind
    server = start_head()
    with smtplib.LMTP(server.unix_path, timeout=5) as client:
        assert client.noop() == (250, b"2.0.0 OK")


def test_a_live_socket_is_not_stolen(tmp_path: Path, server: RunningHead) -> None:
    settings = replace(server.settings, lmtp_listen_addrs=parse_listen_addrs(
        f"unix:{server.unix_path}"))
    head = LMTPHead(settings, None)
    with pytest.raises(ListenError, match="another server is listening there"):
        asyncio.run(head.start())
    with smtplib.LMTP(server.unix_path, timeout=5) as client:
        assert client.noop() == (250, b"2.0.0 OK")


def test_inherited_sockets_queue_connections_until_accepting_starts(tmp_path: Path) -> None:
    """A worker set up with accept=False leaves connections in the kernel's queue, so the
    workers a parent forks begin to accept together, not the first one ready alone."""
    settings = Settings(personalities=("lmtp",), lmtp_hostname=HOSTNAME,
                        lmtp_listen_addrs=parse_listen_addrs("127.0.0.1:0"))
    listeners = bind_listeners(settings)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    try:
        handler = DeliveryHandler(Router(INGRESS, settings), TenantDeliverer(), Transaction)
        head = LMTPHead(settings, handler, inherited=listeners)
        loop.run_until_complete(head.start(accept=False))
        thread.start()
        port = listeners[0].sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as early:
            early.settimeout(0.3)
            with pytest.raises(TimeoutError):
                early.recv(100)  # queued, not accepted: no greeting
            asyncio.run_coroutine_threadsafe(head.accept_connections(), loop).result(5)
            early.settimeout(5)
            assert read_replies(early, 1)[0].startswith(b"220 ")
        asyncio.run_coroutine_threadsafe(head.close(1.0), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        close_listeners(listeners)


def test_a_path_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    regular = tmp_path / "precious.txt"
    regular.write_text("keep me")
    settings = Settings(lmtp_listen_addrs=parse_listen_addrs(f"unix:{regular}"))
    with pytest.raises(ListenError, match="exists and is not a socket"):
        asyncio.run(LMTPHead(settings, None).start())
    assert regular.read_text() == "keep me"


def test_a_port_in_use_is_a_clear_error(server: RunningHead) -> None:
    settings = replace(server.settings, lmtp_listen_addrs=parse_listen_addrs(
        f"127.0.0.1:{server.port}"))
    with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        asyncio.run(LMTPHead(settings, None).start())


def test_ipv6_listener(start_head: Callable[..., RunningHead]) -> None:
    server = start_head(lmtp_listen_addrs=parse_listen_addrs("[::1]:0"))
    assert server.head.bound[0].startswith("[::1]:")
    with smtplib.LMTP("::1", server.port, timeout=5) as client:
        client.ehlo("c")
        assert send_transaction(client, ["a@acme.example"], b"x\r\n") == [QUEUED]


def test_shutdown_lets_an_inflight_delivery_finish_and_tells_idle_clients(
        server: RunningHead) -> None:
    server.deliverer.delay = 0.5
    idle = server.raw()
    busy = server.raw()
    busy.sendall(b"LHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<a@acme.example>\r\nDATA\r\n")
    read_replies(busy, 4)
    busy.sendall(b"x\r\n.\r\n")
    time.sleep(0.1)  # the delivery is running
    closer = threading.Thread(target=server.close, kwargs={"grace": 5.0})
    closer.start()
    assert read_replies(idle, 1) == [f"421 4.3.2 {HOSTNAME} shutting down".encode()]
    assert read_replies(busy, 2) == [b"250 2.0.0 queued",
                                     f"421 4.3.2 {HOSTNAME} shutting down".encode()]
    closer.join(10)
    assert not closer.is_alive()
    with pytest.raises(OSError):
        socket.create_connection((server.host, server.port), timeout=1)
