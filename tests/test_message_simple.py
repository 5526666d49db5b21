"""lmtp.message's simple path (one text/plain part, read without the email parser) against
the full parse: wherever it answers, every field and every defect is the full parse's."""

from __future__ import annotations

import base64
import quopri
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtp.message import (
    EVERYTHING,
    MSG_FIELDS,
    MessageNeeds,
    _parse_all,
    _parse_simple,
    parse_message,
)
from lmtp.mime import DEFAULT_LIMITS, MimeLimits


def both(data: bytes, needs: MessageNeeds = EVERYTHING, limits: MimeLimits = DEFAULT_LIMITS):
    """(simple path's result or None, the full parse's result)."""
    return _parse_simple(data, needs, limits), _parse_all(data, needs, limits, None)


def bench_message(size: int) -> bytes:
    """What bench/lmtp's `smtp-source -l SIZE` sends."""
    head = (b"From: <alice@client.example>\r\nTo: <user@acme.example>\r\n"
            b"Date: Wed,  2 Dec 2026 10:23:45 +0000 (UTC)\r\n"
            b"Message-Id: <4ba8.0006.04f5@bench.example>\r\n"
            b"Subject: Re: [#1234] wifi keeps dropping\r\n\r\n")
    lines = b"".join(str(n % 10).encode() + b"X" * 77 + b"\r\n" for n in range(size // 80))
    return head + lines


TAKEN = {
    "bench 1 KiB": bench_message(1024),
    "bench 100 KiB": bench_message(102400),
    "no body": b"Subject: hi\r\n",
    "empty body": b"Subject: hi\r\n\r\n",
    "empty message": b"",
    "only an empty line": b"\r\n",
    "utf-8 body, 8-bit": "Content-Type: text/plain; charset=utf-8\r\n"
                         "Content-Transfer-Encoding: 8bit\r\n\r\ncafé\r\n".encode(),
    "latin-1 body": b"Content-Type: TEXT/Plain; Charset=\"ISO-8859-1\"; format=flowed\r\n\r\n"
                    b"caf\xe9\r\n",
    "8-bit bytes, no charset": b"Subject: x\r\n\r\ncaf\xc3\xa9 and \xff\r\n",
    "quoted-printable": b"Content-Type: text/plain; charset=utf-8\r\n"
                        b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9 =\r\nsoft\r\n",
    "base64": b"Content-Transfer-Encoding: Base64\r\n\r\n"
              + base64.encodebytes(b"line one\r\nline two\r\n").replace(b"\n", b"\r\n"),
    "base64, bad padding": b"Content-Transfer-Encoding: base64\r\n\r\nY2Fmw6k\r\n",
    "base64, junk": b"Content-Transfer-Encoding: base64\r\n\r\nY2F*mw6k=\r\n",
    "koi8-r": b"Content-Type: text/plain; charset=koi8-r\r\n\r\n\xf0\xd2\xc9\xd7\xc5\xd4\r\n",
    "utf-16": b"Content-Type: text/plain; charset=utf-16\r\n\r\n\xff\xfeh\x00i\x00\r",
    "inline": b"Content-Disposition: inline\r\nSubject: s\r\n\r\nbody\r\n",
    "encoded words": b"Subject: =?utf-8?q?caf=C3=A9?= =?iso-8859-1?b?6Q==?=\r\n"
                     b"From: =?utf-8?q?Zo=C3=AB?= <zoe@example.com>\r\n\r\nhi\r\n",
    "unknown charset in a header": b"Subject: =?x-nope?q?a=FF?=\r\n\r\nhi\r\n",
    "8-bit header": b"Subject: caf\xc3\xa9\r\nFrom: J\xe9r\xf4me <j@example.com>\r\n\r\nhi\r\n",
    "folded header": b"Subject: one\r\n two\r\nReceived: a\r\n\tb\r\n\r\nhi\r\n",
    "lone CR and LF in the body": b"Subject: s\r\n\r\na\rb\nc\r\n\r\r\n",
    "LF empty line": b"Subject: s\r\n\nbody\n",
    "CR empty line": b"Subject: s\r\n\rbody\r\n",
    "a signature": b"Subject: s\r\n\r\nhi\r\n-- \r\nme\r\n--\r\n",
}

FALLS_BACK = {
    "multipart": b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n",
    "html": b"Content-Type: text/html\r\n\r\n<p>x</p>\r\n",
    "attachment": b"Content-Disposition: attachment; filename=a.txt\r\n\r\nx\r\n",
    "LF header lines": b"Subject: s\nFrom: a@b\n\nbody\n",
    "no empty line before the body": b"Subject: s\r\nbody text\r\n",
    "From line": b"From a@b Mon May 25 2026\r\nSubject: s\r\n\r\nx\r\n",
    "two Content-Types": b"Content-Type: text/plain\r\nContent-Type: text/plain\r\n\r\nx\r\n",
    "unknown charset": b"Content-Type: text/plain; charset=x-nope\r\n\r\nx\r\n",
    "uuencode": b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 a\r\n",
    "RFC 2231 parameter": b"Content-Type: text/plain; charset*=utf-8''utf-8\r\n\r\nx\r\n",
    "folded Content-Type": b"Content-Type: text/plain;\r\n charset=utf-8\r\n\r\nx\r\n",
    "too many dash lines": b"Subject: s\r\n\r\n" + b"--\r\n" * 1001,
}


@pytest.mark.parametrize("data", list(TAKEN.values()), ids=list(TAKEN))
def test_plain_single_part_text_messages_take_the_simple_path_with_the_full_result(data):
    simple, full = both(data)
    assert simple is not None
    assert simple == full


@pytest.mark.parametrize("data", list(FALLS_BACK.values()), ids=list(FALLS_BACK))
def test_every_other_message_gets_the_full_parse(data):
    assert _parse_simple(data, EVERYTHING, DEFAULT_LIMITS) is None
    assert parse_message(data) == _parse_all(data, EVERYTHING, DEFAULT_LIMITS, None)


def test_the_bench_message_text_and_fields():
    msg, defects = parse_message(TAKEN["bench 1 KiB"])
    assert defects == []
    assert msg["from"] == [{"name": "", "addr": "alice@client.example"}]
    assert msg["text"].startswith("0" + "X" * 77 + "\n1X")
    assert msg["subject"] == "Re: [#1234] wifi keeps dropping"
    assert msg["attachments"] == [] and msg["html"] == "" and msg["truncated"] is False


# --- generated messages -------------------------------------------------------------------

HEADER = st.sampled_from([
    b"From: Alice <alice@example.com>\r\n", b"From: <a@b.example>, c@d.example\r\n",
    b"From: =?utf-8?q?Zo=C3=AB?= <zoe@example.com>\r\n", b"From: \"Q, Z\" <q@z>\r\n",
    b"To: undisclosed-recipients:;\r\n", b"Cc: J\xe9r\xf4me <j@example.com>\r\n",
    b"Subject: =?iso-8859-1?q?caf=E9?=\r\n", b"Subject: =?x-nope?b?/w==?=\r\n",
    b"Subject: caf\xc3\xa9\r\n", b"Subject:\r\n", b"Subject: folded\r\n\tline\r\n",
    b"Date: Mon, 25 May 2026 16:00:00 +0200\r\n", b"Date: yesterday\r\n",
    b"Message-ID: <m1@example.com>\r\n", b"Message-ID: not an id\r\n",
    b"MIME-Version: 1.0\r\n", b"X-Spam-Flag: YES\r\n", b"X-Odd:no space\r\n",
    b"--dashed-name: x\r\n", b"Received: from a\r\n by b\r\n",
    b"Content-Type: text/plain\r\n", b"Content-Type: text/plain; charset=utf-8\r\n",
    b"Content-Type: text/plain;charset=\"iso-8859-1\"\r\n",
    b"Content-Type: Text/Plain; format=flowed; charset=UTF-8; delsp=yes\r\n",
    b"Content-Type: text/plain ; charset=windows-1252\r\n",
    b"Content-Type: text/plain; charset=koi8-r\r\n", b"Content-Type: text/plain; charset=utf-16\r\n",
    b"Content-Type: text/plain; charset=shift_jis\r\n", b"Content-Type: text/plain; charset=\"\"\r\n",
    b"Content-Type: text/plain; charset=x-unknown\r\n", b"Content-Type: text/plain; charset=idna\r\n",
    b"Content-Type: text/plain; charset=base64\r\n", b"Content-Type: text/plain; name=\"a b\"\r\n",
    b"Content-Type: text/plain; charset = utf-8\r\n", b"Content-Type: text/plain \r\n",
    b"Content-Type: text/plain; name=\"a;b\"; charset=\"utf-8\"\r\n",
    b"Content-Type: text/plain; charset=utf-8 (comment)\r\n",
    b"Content-Type: text/plain; charset=\"<utf-8>\"\r\n", b"Content-Type: text/plain; x=\xe9\r\n",
    b"Content-Type: text/plain;\r\n\tcharset=utf-8\r\n",
    b"Content-Type: text/html\r\n", b"Content-Type: text\r\n", b"Content-Type: \r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n", b"Content-Type: message/rfc822\r\n",
    b"Content-Transfer-Encoding: 7bit\r\n", b"Content-Transfer-Encoding: 8BIT\r\n",
    b"Content-Transfer-Encoding: binary\r\n", b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Transfer-Encoding: base64\r\n", b"Content-Transfer-Encoding: base64 \r\n",
    b"Content-Transfer-Encoding: x-uuencode\r\n", b"Content-Transfer-Encoding: x-made-up\r\n",
    b"Content-Disposition: inline\r\n", b"Content-Disposition: INLINE\r\n",
    b"Content-Disposition: attachment\r\n", b"Content-Disposition: inline; filename=a\r\n",
    b"Bare: lf\n", b"Bare: cr\r", b"no colon\r\n", b": no name\r\n", b"From a@b Mon\r\n",
])
SEPARATOR = st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b"", b"\r\r\n"])
BODY_PIECE = st.sampled_from([
    b"plain line\r\n", b"\r\n", b"lf line\n", b"lone\rcr", b"caf\xc3\xa9\r\n", b"caf\xe9\r\n",
    b"=C3=A9=\r\n", b"=XY\r\n", b"Y2Fmw6k=\r\n", b"Y2Fmw6k\r\n", b"QUJD\r\n", b"QQ==QQ==\r\n",
    b"*\r\n", b"--\r\n", b"-- \r\n", b"--b--\r\n", b"\x00", b"\xff\xfe", b"Subject: in body\r\n",
    b"begin 644 a\r\n", b"\x1b$B$3\x1b(B\r\n", b"\r",
]) | st.binary(max_size=40)
MESSAGE = st.builds(
    lambda headers, separator, body: b"".join(headers) + separator + b"".join(body),
    st.lists(HEADER, max_size=10), SEPARATOR, st.lists(BODY_PIECE, max_size=12))
NEEDS = st.one_of(st.just(EVERYTHING), st.builds(
    MessageNeeds,
    st.frozensets(st.sampled_from(MSG_FIELDS + ("attachments.content",))),
    st.one_of(st.none(), st.frozensets(st.sampled_from(
        ["subject", "from", "content-type", "x-spam-flag", "date", "received"])))))
LIMITS = st.one_of(st.just(DEFAULT_LIMITS), st.builds(
    MimeLimits, max_parts=st.integers(0, 3), max_depth=st.integers(-1, 2),
    max_header_lines=st.integers(0, 6), elide_min_bytes=st.sampled_from([None, 1, 4096])))


@settings(max_examples=1500, deadline=None)
@given(MESSAGE, NEEDS, LIMITS)
def test_where_the_simple_path_answers_it_answers_as_the_full_parse(data, needs, limits):
    simple, full = both(data, needs, limits)
    if simple is not None:
        assert simple == full


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
CHARSET = st.sampled_from(["us-ascii", "utf-8", "UTF-8", "iso-8859-1", "iso-8859-15",
                           "windows-1252", "koi8-r", "utf-16", "shift_jis", "gb2312", "latin1"])


def _encoded(text: str, charset: str, cte: str, eol: bytes) -> bytes:
    raw = text.encode(charset, "replace")
    if cte == "base64":
        return base64.encodebytes(raw).replace(b"\n", eol)
    if cte == "quoted-printable":
        return quopri.encodestring(raw).replace(b"\n", eol)
    return raw.replace(b"\n", eol)


@settings(max_examples=500, deadline=None)
@given(st.lists(HEADER.filter(lambda h: h.endswith(b"\r\n") and b"Content-" not in h
                              and b":" in h and not h.startswith((b"From ", b":"))),
                max_size=6),
       TEXT, CHARSET, st.sampled_from(["", "7bit", "8bit", "quoted-printable", "base64"]),
       st.sampled_from([b"\r\n", b"\n"]), st.booleans())
def test_generated_plain_text_messages_take_the_simple_path(headers, text, charset, cte, eol,
                                                            declared):
    head = b"".join(headers)
    if declared:
        head += f"Content-Type: text/plain; charset={charset}\r\n".encode()
    if cte:
        head += f"Content-Transfer-Encoding: {cte}\r\n".encode()
    data = head + b"\r\n" + _encoded(text, charset if declared else "ascii", cte, eol)
    simple, full = both(data)
    assert simple is not None
    assert simple == full


SAMPLES = sorted((Path(__file__).parent.parent / "examples").rglob("*.eml"))


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_the_sample_messages_parse_as_the_full_parse_reads_them(path):
    data = path.read_bytes()
    crlf = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # as LMTP delivers them
    for variant in (data, crlf):
        assert parse_message(variant) == _parse_all(variant, EVERYTHING, DEFAULT_LIMITS, None)


def test_the_samples_include_simple_ones():
    crlf = [p.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for p in SAMPLES]
    assert len(SAMPLES) >= 5
    assert any(_parse_simple(data, EVERYTHING, DEFAULT_LIMITS) is not None for data in crlf)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(["\r", "\n", "\r\n", "a", "é", "\u2028", "\x85", "\udcff"]),
                max_size=20).map("".join))
def test_bodies_get_lf_line_ends_exactly_where_they_had_crlf(text):
    from lmtp.message import _lf

    assert _lf(text) == text.replace("\r\n", "\n")
