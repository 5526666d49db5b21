"""lmtp.message: bytes -> `_txc.lmtp.msg`, best effort, raw always exact."""

from __future__ import annotations

import base64
import hashlib
from email.message import EmailMessage
from email.utils import make_msgid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtp.message import b64, build_envelope, parse_message
from lmtp.routing import Route


def raw_of(msg: dict) -> bytes:
    assert msg["raw"].startswith("b64:")
    return base64.b64decode(msg["raw"][4:])


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


SIMPLE = crlf(
    "Received: from mx2.example by mx1.example; Mon, 25 May 2026 14:00:02 +0000\n"
    "Received: from client.example\n"
    "  by mx2.example; Mon, 25 May 2026 14:00:01 +0000\n"
    "Authentication-Results: mx1.example; spf=pass smtp.mailfrom=example.com\n"
    "From: Alice <alice@example.com>\n"
    "To: support@your.tenant\n"
    "Cc: Bob <bob@example.com>, carol@example.com\n"
    "Subject: wifi keeps dropping\n"
    "Date: Mon, 25 May 2026 16:00:00 +0200\n"
    "Message-ID: <m1@mail.example.com>\n"
    "\n"
    "Hi support,\n"
    "\n"
    "My wifi...\n"
)


def test_simple_message_fills_every_field():
    msg, defects = parse_message(SIMPLE)
    assert defects == []
    assert msg["id"] == "<m1@mail.example.com>"
    assert msg["date"] == "2026-05-25T14:00:00Z"
    assert msg["from"] == [{"name": "Alice", "addr": "alice@example.com"}]
    assert msg["to"] == [{"name": "", "addr": "support@your.tenant"}]
    assert msg["cc"] == [
        {"name": "Bob", "addr": "bob@example.com"},
        {"name": "", "addr": "carol@example.com"},
    ]
    assert msg["subject"] == "wifi keeps dropping"
    assert msg["text"] == "Hi support,\n\nMy wifi...\n"
    assert msg["html"] == ""
    assert msg["attachments"] == []
    assert raw_of(msg) == SIMPLE


def test_header_keys_are_lowercased_sorted_and_multi_values_keep_order_unfolded():
    headers = parse_message(SIMPLE)[0]["headers"]
    assert list(headers) == sorted(headers)
    assert all(key == key.lower() for key in headers)
    assert headers["received"] == [
        "from mx2.example by mx1.example; Mon, 25 May 2026 14:00:02 +0000",
        "from client.example  by mx2.example; Mon, 25 May 2026 14:00:01 +0000",
    ]
    assert headers["authentication-results"] == [
        "mx1.example; spf=pass smtp.mailfrom=example.com"
    ]


def test_rfc2047_subject_and_display_names_are_decoded():
    raw = crlf(
        "From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <j@example.de>\n"
        "Subject: =?utf-8?b?w6lsw6h2ZSBleGFtZW4=?=\n"
        "X-Note: =?iso-8859-1?q?caf=E9?=\n"
        "\n"
        "x\n"
    )
    msg, _ = parse_message(raw)
    assert msg["subject"] == "élève examen"
    assert msg["from"] == [{"name": "Jürgen Müller", "addr": "j@example.de"}]
    assert msg["headers"]["subject"] == ["élève examen"]
    assert msg["headers"]["x-note"] == ["café"]


def multipart_with_attachment() -> tuple[bytes, bytes]:
    pdf = b"%PDF-1.4 fake\x00\x01\x02" * 10
    em = EmailMessage()
    em["From"] = "alice@example.com"
    em["To"] = "support@your.tenant"
    em["Subject"] = "invoice"
    em["Message-ID"] = make_msgid(domain="example.com")
    em.set_content("plain body\n")
    em.add_alternative("<p>html body</p>\n", subtype="html")
    em.add_attachment(pdf, maintype="application", subtype="pdf", filename="invoice.pdf")
    return em.as_bytes(), pdf


def test_multipart_alternative_with_attachment():
    raw, pdf = multipart_with_attachment()
    msg, defects = parse_message(raw)
    assert defects == []
    assert msg["text"] == "plain body\n"
    assert msg["html"] == "<p>html body</p>\n"
    assert msg["attachments"] == [
        {
            "name": "invoice.pdf",
            "type": "application/pdf",
            "size": len(pdf),
            "sha256": hashlib.sha256(pdf).hexdigest(),
            "content": b64(pdf),
        }
    ]
    assert raw_of(msg) == raw


def test_attached_message_is_one_attachment_not_its_insides():
    inner = EmailMessage()
    inner["Subject"] = "forwarded"
    inner.set_content("inner body\n")
    outer = EmailMessage()
    outer["Subject"] = "fwd"
    outer.set_content("see attached\n")
    outer.add_attachment(inner)
    msg, _ = parse_message(outer.as_bytes())
    assert msg["text"] == "see attached\n"
    assert [a["type"] for a in msg["attachments"]] == ["message/rfc822"]
    assert b"inner body" in base64.b64decode(msg["attachments"][0]["content"][4:])


def test_single_part_non_text_message_is_an_attachment():
    raw = crlf(
        "Content-Type: application/pdf\n"
        "Content-Disposition: attachment; filename=scan.pdf\n"
        "Content-Transfer-Encoding: base64\n"
        "\n"
        "JVBERi0=\n"
    )
    msg, _ = parse_message(raw)
    assert msg["text"] == ""
    assert [(a["name"], a["type"], a["size"]) for a in msg["attachments"]] == [
        ("scan.pdf", "application/pdf", 5)
    ]


def test_single_part_text_message_has_no_attachments():
    msg, _ = parse_message(crlf("Content-Type: text/calendar\n\nBEGIN:VCALENDAR\n"))
    assert msg["attachments"] == []


def test_missing_headers_give_empty_fields():
    msg, _ = parse_message(b"\r\njust a body\r\n")
    assert (msg["id"], msg["date"], msg["subject"]) == ("", "", "")
    assert (msg["from"], msg["to"], msg["cc"]) == ([], [], [])
    assert msg["headers"] == {}
    assert msg["text"] == "just a body\n"


@pytest.mark.parametrize(
    ("date", "iso"),
    [
        pytest.param("Mon, 25 May 2026 16:00:00 +0200", "2026-05-25T14:00:00Z", id="offset"),
        pytest.param("25 May 2026 14:00:00 -0000", "2026-05-25T14:00:00Z", id="unknown zone=UTC"),
        pytest.param("Mon, 25 May 2026 09:00:00 EST", "2026-05-25T14:00:00Z", id="named zone"),
        pytest.param("yesterday at noon", "", id="unparseable"),
        pytest.param("Mon, 99 Foo 2026 99:99:99 +9999", "", id="out of range"),
    ],
)
def test_date_is_iso_utc_or_empty(date, iso):
    msg, _ = parse_message(crlf(f"Date: {date}\n\nx\n"))
    assert msg["date"] == iso


def test_broken_mime_keeps_raw_and_reports_defects():
    raw = crlf(
        "Subject: broken\n"
        "Content-Type: multipart/mixed; boundary=\"never-closed\"\n"
        "\n"
        "--never-closed\n"
        "Content-Type: text/plain; charset=no-such-charset\n"
        "Content-Transfer-Encoding: base64\n"
        "\n"
        "aGVsbG8gd29ybGQ=!!!\n"
    )
    msg, defects = parse_message(raw)
    assert raw_of(msg) == raw
    assert msg["subject"] == "broken"
    assert msg["text"].startswith("hello world")
    assert defects and all(isinstance(d, str) for d in defects)


def test_unknown_charset_in_a_single_part_body_still_decodes():
    raw = crlf("Content-Type: text/plain; charset=x-unknown\n\nplain ascii\n")
    assert parse_message(raw)[0]["text"] == "plain ascii\n"


def test_eight_bit_garbage_in_headers_is_replaced_not_raised():
    msg, _ = parse_message(b"Subject: \xff\xfe caf\xe9\r\nFrom: \xff@@\r\n\r\nbody\r\n")
    assert "caf" in msg["subject"]
    assert msg["text"] == "body\n"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_parse_without_exception_and_raw_round_trips(data):
    msg, defects = parse_message(data)
    assert raw_of(msg) == data
    assert isinstance(defects, list)
    assert set(msg) == {
        "id", "date", "from", "to", "cc", "subject", "text", "html", "headers",
        "attachments", "truncated", "raw",
    }


MIMEISH = st.lists(
    st.sampled_from(
        [
            b"Subject: =?utf-8?b?w6k=?=\r\n",
            b"Content-Type: multipart/mixed; boundary=b\r\n",
            b"Content-Type: text/html; charset=utf-16\r\n",
            b"Content-Transfer-Encoding: base64\r\n",
            b"Content-Disposition: attachment; filename*=utf-8''%E9.txt\r\n",
            b"From: \"a\" <b@c>, ;;; <@>\r\n",
            b"Date: Tue, 31 Feb 2026 25:61:61 +2500\r\n",
            b"\r\n",
            b"--b\r\n",
            b"--b--\r\n",
            b"=?x?q?=FF?=\r\n",
            b"AAAA====\r\n",
        ]
    ),
    max_size=30,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(MIMEISH)
def test_mime_shaped_garbage_never_raises(data):
    msg, _ = parse_message(data)
    assert raw_of(msg) == data


def test_build_envelope_has_the_documented_shape_and_shares_msg():
    msg, _ = parse_message(SIMPLE)
    route = Route("acme", "acme/_mail", "domain:acme.example", "acme/_mail/0", "")
    env = build_envelope(
        rid="01HXX",
        route=route,
        listener="default",
        client_ip="10.0.0.7",
        helo="mail.postfix.example",
        mail_from="alice@example.com",
        size=len(SIMPLE),
        rcpt=["alice@acme.example", "carol@acme.example"],
        transaction_rcpt=["alice@acme.example", "bob@beta.example", "carol@acme.example"],
        msg=msg,
    )
    assert env == {
        "_txc": {
            "src": "lmtp",
            "rid": "01HXX",
            "route": {
                "tenant": "acme",
                "stack": "acme/_mail",
                "ingress": "domain:acme.example",
                "to": "acme/_mail/0",
            },
            "lmtp": {
                "listener": "default",
                "client": {"ip": "10.0.0.7", "helo": "mail.postfix.example"},
                "mail": {"from": "alice@example.com", "size": len(SIMPLE)},
                "rcpt": ["alice@acme.example", "carol@acme.example"],
                "transaction_rcpt": [
                    "alice@acme.example", "bob@beta.example", "carol@acme.example"
                ],
                "msg": msg,
            },
        }
    }
    assert env["_txc"]["lmtp"]["msg"] is msg


# --- building only what a stack can observe ------------------------------------------------

from lmtp.message import (  # noqa: E402
    EVERYTHING,
    MSG_FIELDS,
    NOTHING,
    MessageNeeds,
    header_section_end,
    needs_of_path,
    needs_of_rules,
)


def test_needs_of_a_path_under_msg_the_whole_msg_or_elsewhere():
    assert needs_of_path(("_txc", "lmtp", "msg", "subject")) == MessageNeeds(
        frozenset({"subject"}), frozenset())
    assert needs_of_path(("_txc", "lmtp", "msg", "headers", "x-spam-flag", 0)) == MessageNeeds(
        frozenset({"headers"}), frozenset({"x-spam-flag"}))
    assert needs_of_path(("_txc", "lmtp", "msg", "headers")) == MessageNeeds(
        frozenset({"headers"}), None)
    for whole in (("_txc",), ("_txc", "lmtp"), ("_txc", "lmtp", "msg")):
        assert needs_of_path(whole) == EVERYTHING
    for elsewhere in (("class", "spam"), ("_txc", "lmtp", "rcpt", 0), ("_txc", "route", "to"),
                      ("_txc", "lmtp", "msg", "nonsense")):
        assert needs_of_path(elsewhere) == NOTHING


class Rule:
    def __init__(self, reads=(), jsonpaths=(), ops=()):
        self.reads, self.jsonpaths, self.ops = frozenset(reads), frozenset(jsonpaths), tuple(ops)


def test_needs_of_rules_unions_reads_and_known_ops_and_gives_up_on_the_unknown():
    from lmtp.delivery import op_needs

    BUILTIN_OP_NEEDS = op_needs(None)  # what the built-ins declare they read
    subject = ("_txc", "lmtp", "msg", "subject")
    # ARCHIVE takes the raw bytes from its OpContext: the envelope need not carry them
    assert needs_of_rules([Rule([subject]), Rule(ops=["ARCHIVE"])], BUILTIN_OP_NEEDS) == (
        MessageNeeds(frozenset({"subject"}), frozenset()))
    raw = ("_txc", "lmtp", "msg", "raw")
    assert needs_of_rules([Rule([raw]), Rule(ops=["FORWARD"])], BUILTIN_OP_NEEDS) == (
        MessageNeeds(frozenset({"raw"}), frozenset()))
    assert needs_of_rules([Rule([subject]), Rule(ops=["EMIT"])], BUILTIN_OP_NEEDS) == EVERYTHING
    assert needs_of_rules([Rule(ops=["ARCHIVE"])], {}) == EVERYTHING  # ARCHIVE overridden
    assert needs_of_rules([Rule(jsonpaths=["$.class"])], BUILTIN_OP_NEEDS) == EVERYTHING
    assert needs_of_rules([Rule([("class", "x")])], BUILTIN_OP_NEEDS) == NOTHING


@given(st.lists(st.sampled_from([b"\r", b"\n", b"a", b": "]), max_size=40).map(b"".join))
def test_header_section_end_is_the_earliest_of_the_three_empty_line_forms(data: bytes) -> None:
    if data[:1] in (b"\r", b"\n"):
        expected = 0
    else:
        ends = [pos for sep in (b"\n\n", b"\n\r", b"\r\r") if (pos := data.find(sep)) >= 0]
        expected = min(ends) + 1 if ends else len(data)
    assert header_section_end(data) == expected


def test_header_section_ends_at_the_first_empty_line_whatever_the_line_endings():
    assert header_section_end(b"A: b\r\nC: d\r\n\r\nbody\r\n\r\n") == len(b"A: b\r\nC: d\r\n")
    assert header_section_end(b"A: b\nC: d\n\nbody") == len(b"A: b\nC: d\n")
    assert header_section_end(b"A: b\rC: d\r\rbody") == len(b"A: b\rC: d\r")
    assert header_section_end(b"\r\nbody\r\n\r\n") == 0
    assert header_section_end(b"A: b\r\nC: d") == len(b"A: b\r\nC: d")


def test_only_the_needed_fields_are_built_with_their_full_parse_values():
    full, _ = parse_message(SIMPLE)
    needs = MessageNeeds(frozenset({"subject", "from", "headers"}),
                         frozenset({"authentication-results", "x-absent"}))
    msg, _ = parse_message(SIMPLE, needs)
    assert msg == {
        "subject": full["subject"],
        "from": full["from"],
        "headers": {"authentication-results": full["headers"]["authentication-results"]},
    }
    assert parse_message(SIMPLE, NOTHING)[0] == {}
    assert raw_of(parse_message(SIMPLE, MessageNeeds(frozenset({"raw"}), frozenset()))[0]) == SIMPLE
    with_body, _ = parse_message(SIMPLE, MessageNeeds(frozenset({"text"}), frozenset()))
    assert with_body == {"text": full["text"]}


PARTIAL_NEEDS = st.builds(
    MessageNeeds,
    st.frozensets(st.sampled_from(["id", "date", "from", "to", "cc", "subject", "headers",
                                   "raw", "text"])),
    st.one_of(st.none(), st.frozensets(st.sampled_from(
        ["subject", "from", "received", "content-type", "x-spam-flag", "date"]))),
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(MIMEISH, st.binary(max_size=600), st.builds(
    lambda head, body: head + body, MIMEISH, st.sampled_from([b"", b"\r\n", b"\n\n", b"\r\r"]))),
    PARTIAL_NEEDS)
def test_a_partial_parse_equals_the_full_parse_on_the_fields_it_builds(data, needs):
    full, _ = parse_message(data)
    msg, defects = parse_message(data, needs)
    assert isinstance(defects, list)
    assert set(msg) == set(needs.fields) & set(MSG_FIELDS)
    for name, value in msg.items():
        if name == "headers" and needs.header_names is not None:
            assert value == {k: v for k, v in full["headers"].items() if k in needs.header_names}
        else:
            assert value == full[name], name


@settings(max_examples=500, deadline=None)
@given(st.lists(st.characters(min_codepoint=9, max_codepoint=127) | st.sampled_from(
    ["=?", "=?utf-8?q?caf=C3=A9?=", "\udcff", "é", "\r\n "]), max_size=40).map("".join),
    st.sampled_from(["Subject", "X-Spam-Flag", "authentication-results", "From", "Date",
                     "Message-ID", "Content-Type", "Comments"]))
def test_a_header_decodes_as_the_email_policy_decodes_it(value, name):
    from email import policy

    from lmtp.message import _decoded_header, _eight_bit, _unfold

    try:  # 8-bit bytes (surrogates from the parser) are decoded first, as UTF-8 or Latin-1
        expected = _unfold(str(policy.default.header_fetch_parse(name, _eight_bit(value))))
    except Exception:
        return  # the fallback decoders are exercised by the garbage tests above
    assert _decoded_header(name, value) == expected


HEADER_LINES = st.lists(st.sampled_from([
    b"Subject: Re: [#1234] wifi\r\n", b"X-Spam-Flag:YES\r\n", b"Received: from a\r\n",
    b"\tby b; Mon, 25 May 2026\r\n", b" \r\n", b"Subject:   \r\n", b"Odd\xffName: v\xe9\r\n",
    b"From a@b Mon\r\n", b": no name\r\n", b"no colon\r\n", b"Bare: lf\n", b"Bare: cr\r",
    b"To: <a@b>, \"C\" <c@d>\r\n", b"\r\n", b"X: a  \r\n",
]), max_size=12).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(HEADER_LINES)
def test_the_header_section_splitter_gives_the_email_parsers_raw_items_or_declines(head):
    from email.parser import BytesParser
    from email.policy import default

    from lmtp.message import split_header_section

    section = head[:header_section_end(head)]
    items = split_header_section(section)
    if items is not None:
        assert items == list(BytesParser(policy=default).parsebytes(section).raw_items())
        assert BytesParser(policy=default).parsebytes(section).defects == []


# --- 8-bit and UTF-8 headers: the envelope is always valid UTF-8 JSON ----------------------

import json  # noqa: E402

from txcl.builtin_ops.emit import event_json  # noqa: E402


def test_latin1_bytes_in_a_display_name_do_not_poison_emit():
    raw = b"From: J\xe9r\xf4me <a@x.example>\r\nTo: support@acme.example\r\nSubject: caf\xe9\r\n\r\nhi\r\n"
    msg, _ = parse_message(raw)
    assert msg["from"] == [{"name": "J\u00e9r\u00f4me", "addr": "a@x.example"}]
    assert msg["subject"] == "caf\u00e9"
    assert msg["headers"]["from"] == ["J\u00e9r\u00f4me <a@x.example>"]
    envelope = {"_txc": {"src": "lmtp", "lmtp": {"msg": msg}}}
    assert json.loads(event_json(envelope, {}, "EMIT"))["_txc"]["lmtp"]["msg"]["from"] == (
        msg["from"])


def test_utf8_headers_land_as_proper_strings():
    raw = ("From: Jos\u00e9 <jos\u00e9@ex\u00e4mple.com>\r\nTo: j\u00f6se@acme.example\r\n"
           "Subject: Gr\u00fc\u00dfe \u2013 \u00e7a va\r\n\r\nhi\r\n").encode()
    for needs in (EVERYTHING, MessageNeeds(frozenset({"from", "to", "subject"}), frozenset())):
        msg, _ = parse_message(raw, needs)
        assert msg["subject"] == "Gr\u00fc\u00dfe \u2013 \u00e7a va"
        assert msg["from"] == [{"name": "Jos\u00e9", "addr": "jos\u00e9@ex\u00e4mple.com"}]
        assert msg["to"] == [{"name": "", "addr": "j\u00f6se@acme.example"}]


EIGHT_BIT = st.lists(st.sampled_from([
    b"From: J\xe9r\xf4me <a@x>\r\n", b"Subject: \xc3\xa9t\xc3\xa9\r\n", b"X-\xff: \xfe\r\n",
    b"Subject: =?x-unknown?q?=FF?=\r\n", b"Content-Type: text/plain; charset=unicode_escape\r\n",
    b"Content-Disposition: attachment; filename=\"\xe9.txt\"\r\n", b"\\ud800\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n", b"--b\r\n", b"\r\n", b"\xe9\xff\r\n",
    b"To: \"\xe9\" <\xe9@\xe9>\r\n", b"Content-Type: \xe9/\xe9\r\n",
]), max_size=25).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=800), EIGHT_BIT, MIMEISH), PARTIAL_NEEDS)
def test_every_envelope_is_strict_utf8_json(data, needs):
    for msg in (parse_message(data)[0], parse_message(data, needs)[0]):
        json.dumps(msg, ensure_ascii=False).encode("utf-8")  # strict: no lone surrogates
