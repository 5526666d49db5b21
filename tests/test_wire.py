"""lmtp.wire's line reader, chunk reader and reply sanitiser as pure objects, and the address
grammar MAIL and RCPT are parsed with (lmtp.session). The DATA decoder's own tests are in
test_server.py."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from lmtp.session import _path
from lmtp.wire import (
    MAX_MAIL_LINE,
    TOO_LONG,
    ChunkedMessage,
    ChunkReader,
    printable,
    take_line,
)


def test_take_line_cuts_lines_and_waits_for_the_rest() -> None:
    buf = bytearray(b"NOOP\r\nRSET\nQU")
    assert take_line(buf, False) == (b"NOOP", False)
    assert take_line(buf, False) == (b"RSET", False)
    assert take_line(buf, False) == (None, False)
    buf += b"IT\r\n"
    assert take_line(buf, False) == (b"QUIT", False)


def test_an_over_long_line_is_dropped_as_it_comes_and_reported_once() -> None:
    buf = bytearray(b"x" * (MAX_MAIL_LINE + 1))
    line, dropping = take_line(buf, False)
    assert (line, dropping, len(buf)) == (None, True, 0)  # nothing kept
    buf += b"more\r\nNOOP\r\n"
    assert take_line(buf, dropping) == (TOO_LONG, False)
    assert take_line(buf, False) == (b"NOOP", False)


@given(st.lists(st.binary(max_size=20).filter(lambda b: b"\n" not in b), max_size=10),
       st.lists(st.integers(1, 15), max_size=20))
def test_lines_come_out_whole_however_the_bytes_arrive(lines: list[bytes],
                                                       sizes: list[int]) -> None:
    stream = b"".join(line + b"\r\n" for line in lines)
    buf, got, pos, dropping = bytearray(), [], 0, False
    for size in [*sizes, len(stream)]:
        buf += stream[pos:pos + size]
        pos += size
        while True:
            line, dropping = take_line(buf, dropping)
            if line is None:
                break
            got.append(line)
    assert got == lines


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@given(st.text(max_size=80), st.integers(1, 100))
def test_printable_text_has_no_control_characters_and_keeps_the_rest(text: str,
                                                                     limit: int) -> None:
    shown = printable(text, limit)
    assert not _CONTROL.search(shown)
    assert shown == "".join(f"\\x{ord(c):02x}" if _CONTROL.match(c) else c for c in text[:limit])


def test_printable_escapes_are_readable() -> None:
    assert printable("a\x1b[31m\r\n\x00é") == "a\\x1b[31m\\x0d\\x0a\\x00é"


@given(st.binary(max_size=200), st.lists(st.integers(1, 30), max_size=20),
       st.binary(max_size=10), st.integers(1, 250))
def test_a_chunk_takes_exactly_its_size_however_the_bytes_arrive(
        data: bytes, sizes: list[int], rest: bytes, max_bytes: int) -> None:
    message = ChunkedMessage(max_bytes)
    reader = ChunkReader(len(data), message)
    stream = data + rest
    pos, leftover = 0, stream  # a chunk of 0 bytes takes nothing
    while not reader.done:
        size = sizes.pop(0) if sizes else len(stream)
        piece = stream[pos:pos + size]
        pos += len(piece)
        used = reader.feed(piece)
        if used >= 0:
            leftover = piece[used:] + stream[pos:]
    assert leftover == rest
    assert message.too_large == (len(data) > max_bytes)
    assert message.message() == (b"" if len(data) > max_bytes else data)


def test_chunks_add_up_and_the_limit_counts_them_all() -> None:
    message = ChunkedMessage(10)
    for part in (b"abcd", b"efgh"):
        assert ChunkReader(len(part), message).feed(part + b"NOOP") == 4
    assert not message.too_large and message.size == 8
    ChunkReader(3, message).feed(b"ijk")
    assert message.too_large and message.message() == b""


# --- the RFC 5321 path grammar of MAIL and RCPT (lmtp.session) -------------------------------

_ATOM = st.text(alphabet="abcXYZ019!#$%&'*+/=?^_`{|}~-é日", min_size=1, max_size=8)
_LABEL = st.from_regex(r"[a-z0-9ü](?:[a-z0-9ü-]{0,6}[a-z0-9ü])?", fullmatch=True)


@given(st.lists(_ATOM, min_size=1, max_size=3), st.lists(_LABEL, min_size=1, max_size=3))
def test_every_dot_atom_at_a_domain_is_an_address(atoms: list[str], labels: list[str]) -> None:
    address = ".".join(atoms) + "@" + ".".join(labels)
    assert _path(f"<{address}> SIZE=1", null_ok=False) == (address, ["SIZE=1"])


@given(st.text(max_size=40))
def test_no_address_the_grammar_accepts_holds_a_control_character(text: str) -> None:
    parsed = _path(f"<{text}>", null_ok=True)
    assert parsed is None or not _CONTROL.search(parsed[0])
