"""lmtp.verdicts: the seed's resolution table, row by row, and what reaches the wire."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmtp.verdicts import (
    DEFAULT_DENY,
    MAX_REPLY_LINE,
    MAX_TEXT_LEN,
    RUN_FAILED,
    SOURCE,
    Reply,
    make_reply,
    replies_for,
    sanitize_text,
    with_rid,
)
from txcl.errors import Problem

DENY = "550 5.1.1 no rule accepted this recipient"
TEMPFAIL = "451 4.3.0 temporary failure processing the message, try again later"


def envelope(res: object = None, rcpt: list[str] | None = None) -> dict:
    lmtp: dict = {"rcpt": rcpt or []}
    if res is not None:
        lmtp["res"] = res
    return {"_txc": {"src": "lmtp", "lmtp": lmtp}}


RESOLUTION_TABLE = [
    pytest.param(
        {"recipients": [{"code": 250, "msg": "queued"}, {"code": 452, "msg": "over quota"}]},
        3,
        ["250 2.0.0 queued", "452 4.2.2 over quota", DENY],
        id="slots present: each slot's verdict",
    ),
    pytest.param(
        {"recipients": [{"code": 250, "msg": "queued"}]},
        2,
        ["250 2.0.0 queued", DENY],
        id="short array: missing slot 550, not inherited",
    ),
    pytest.param(
        {"recipients": [{"code": 250}, {"code": 250}, {"code": 550, "msg": "x"}]},
        2,
        ["250 2.0.0 OK", "250 2.0.0 OK"],
        id="long array: extras ignored",
    ),
    pytest.param(
        {"recipients": [None, {"code": 250, "msg": "second"}]},
        2,
        [DENY, "250 2.0.0 second"],
        id="null slot (padding) 550",
    ),
    pytest.param(
        {"recipients": [{"msg": "no code here"}, {"code": None}]},
        2,
        [DENY, DENY],
        id="slot without code 550",
    ),
    pytest.param(
        {"code": 250, "msg": "noted"},
        3,
        ["250 2.0.0 noted"] * 3,
        id="no array, broadcast to all",
    ),
    pytest.param(
        {"recipients": [{"code": 250, "msg": "only first"}], "code": 250, "msg": "all"},
        2,
        ["250 2.0.0 only first", DENY],
        id="array wins over broadcast",
    ),
    pytest.param(
        {"recipients": [], "code": 250},
        2,
        [DENY, DENY],
        id="empty array wins over broadcast",
    ),
    pytest.param({"msg": "a message without a code"}, 2, [DENY, DENY], id="broadcast msg only"),
    pytest.param({}, 2, [DENY, DENY], id="empty res"),
    pytest.param(None, 2, [DENY, DENY], id="neither set: every rcpt 550"),
]


@pytest.mark.parametrize(("res", "n_rcpt", "lines"), RESOLUTION_TABLE)
def test_resolution_table(res, n_rcpt, lines):
    assert [r.line for r in replies_for(envelope(res), n_rcpt, None)] == lines


def test_no_envelope_at_all_is_default_deny():
    assert replies_for(None, 2, None) == [DEFAULT_DENY, DEFAULT_DENY]


def test_run_error_tempfails_every_recipient_even_after_an_accept():
    error = Problem("txcl_run_error", "op CLASSIFY timed out after 5s at /secret/path")
    replies = replies_for(envelope({"code": 250}), 3, error)
    assert [r.line for r in replies] == [TEMPFAIL] * 3
    assert "secret" not in replies[0].line


INVALID_CODES = [
    pytest.param(999, id="999"),
    pytest.param("abc", id="string"),
    pytest.param("250", id="numeric string"),
    pytest.param(354, id="354 (DATA go-ahead)"),
    pytest.param(199, id="1xx"),
    pytest.param(300, id="3xx"),
    pytest.param(600, id="600"),
    pytest.param(True, id="true"),
    pytest.param(250.0, id="float"),
    pytest.param([250], id="list"),
]


@pytest.mark.parametrize("code", INVALID_CODES)
def test_invalid_broadcast_code_is_a_run_error(code):
    assert replies_for(envelope({"code": code}), 2, None) == [RUN_FAILED, RUN_FAILED]


@pytest.mark.parametrize("code", INVALID_CODES)
def test_invalid_slot_code_tempfails_the_whole_group(code):
    res = {"recipients": [{"code": 250}, {"code": code}]}
    assert replies_for(envelope(res), 2, None) == [RUN_FAILED, RUN_FAILED]


def test_invalid_code_in_an_ignored_extra_slot_still_fails_the_run():
    res = {"recipients": [{"code": 250}, {"code": 999}]}
    assert replies_for(envelope(res), 1, None) == [RUN_FAILED]


@pytest.mark.parametrize(
    "res",
    [
        pytest.param(5, id="res is a number"),
        pytest.param({"recipients": {"0": {"code": 250}}}, id="recipients is an object"),
        pytest.param({"recipients": "250"}, id="recipients is a string"),
        pytest.param({"recipients": [250]}, id="slot is a number"),
    ],
)
def test_malformed_res_is_a_run_error(res):
    assert replies_for(envelope(res), 1, None) == [RUN_FAILED]


ENHANCED_TABLE = [
    pytest.param(250, "2.0.0"),
    pytest.param(251, "2.1.5"),
    pytest.param(299, "2.0.0", id="other 2xx"),
    pytest.param(421, "4.3.2"),
    pytest.param(450, "4.2.0"),
    pytest.param(451, "4.3.0"),
    pytest.param(452, "4.2.2", id="452 mailbox full"),
    pytest.param(499, "4.0.0", id="other 4xx"),
    pytest.param(550, "5.1.1"),
    pytest.param(551, "5.1.6"),
    pytest.param(552, "5.2.2"),
    pytest.param(553, "5.1.3"),
    pytest.param(554, "5.6.0"),
    pytest.param(599, "5.0.0", id="other 5xx"),
]


@pytest.mark.parametrize(("code", "enhanced"), ENHANCED_TABLE)
def test_enhanced_code_from_basic_code(code, enhanced):
    assert make_reply(code, "x") == Reply(code, enhanced, "x")


@pytest.mark.parametrize(
    ("code", "msg", "line"),
    [
        pytest.param(550, "5.7.1 SPF failed", "550 5.7.1 SPF failed", id="same class kept"),
        pytest.param(250, "5.7.1 odd", "250 2.0.0 5.7.1 odd", id="other class is text"),
        pytest.param(550, "5.7.1", "550 5.7.1 rejected", id="code alone gets default text"),
        pytest.param(550, "5.7.10x", "550 5.1.1 5.7.10x", id="not a code"),
    ],
)
def test_rule_written_enhanced_code(code, msg, line):
    assert make_reply(code, msg).line == line


@pytest.mark.parametrize(
    ("code", "msg", "text"),
    [
        pytest.param(250, "", "OK", id="empty 2xx"),
        pytest.param(451, None, "temporary failure", id="missing 4xx"),
        pytest.param(550, "   ", "rejected", id="blank 5xx"),
        pytest.param(550, "a\r\n250 2.0.0 ok", "a 250 2.0.0 ok", id="CRLF injection"),
        pytest.param(550, "tab\there\x00nul\x7fdel", "tab here nul del", id="controls"),
        pytest.param(550, "caf\u00e9 na\u00efve", "cafe naive", id="accents folded"),
        pytest.param(550, "emoji \U0001f4e7 and \u4e2d", "emoji ? and ?", id="non-ASCII"),
        pytest.param(550, "x\u2028y\u0085z", "x y z", id="unicode line breaks"),
        pytest.param(250, 42, "42", id="number msg"),
    ],
)
def test_message_sanitising(code, msg, text):
    assert make_reply(code, msg).text == text


def test_long_message_is_bounded():
    text = sanitize_text("x" * 5000, 550)
    assert len(text) == MAX_TEXT_LEN
    assert text.endswith("...")


@given(st.text(), st.sampled_from([250, 452, 550]))
def test_any_message_gives_one_printable_ascii_line(msg, code):
    line = make_reply(code, msg).line
    assert line.isascii() and line.isprintable()
    assert len(line) <= MAX_TEXT_LEN + 10
    assert line.startswith(str(code))


RID = "01M8TT0000000000000000000A"


@given(st.text(), st.sampled_from([250, 251, 451, 452, 550, 554]))
def test_the_request_id_ends_any_reply_and_leaves_its_codes_alone(msg, code):
    plain = make_reply(code, msg)
    reply = with_rid(plain, RID)
    assert (reply.code, reply.enhanced) == (plain.code, plain.enhanced)
    assert reply.line == f"{plain.line} (rid {RID})"
    assert reply.line.isascii() and reply.line.isprintable()
    assert len(reply.line) + 2 <= 512  # RFC 5321 4.5.3.1.5, CRLF included


@given(st.text(min_size=400, max_size=2000))
def test_a_long_text_is_shortened_to_keep_the_request_id_on_a_valid_line(text):
    reply = with_rid(Reply(250, "2.0.0", text), RID)
    assert reply.line.endswith(f" (rid {RID})")
    assert len(reply.line) <= MAX_REPLY_LINE
    assert reply.line.isprintable()  # controls in a text built by hand become spaces


@pytest.mark.parametrize("rid", ["", "01M8\r\n250 2.0.0 forged", "rid with spaces", "x" * 65])
def test_an_id_that_is_not_a_bare_token_is_never_sent(rid):
    assert with_rid(make_reply(250, "queued"), rid) == make_reply(250, "queued")


def test_source_gives_the_verdict_table_by_recipient():
    env = envelope(
        {"recipients": [{"code": 250, "msg": "queued"}]},
        rcpt=["support@acme.example", "bcc@acme.example"],
    )
    assert SOURCE.name == "lmtp"
    assert SOURCE.replies(env, None) == [
        ("support@acme.example", "250 2.0.0 queued"),
        ("bcc@acme.example", DENY),
    ]


def test_source_with_an_error_tempfails_every_recipient():
    env = envelope({"code": 250}, rcpt=["a@x", "b@x"])
    error = Problem("txcl_run_error", "boom")
    assert SOURCE.replies(env, error) == [("a@x", TEMPFAIL), ("b@x", TEMPFAIL)]


def test_source_without_recipients_shows_the_broadcast_row():
    assert SOURCE.replies(envelope({"code": 250, "msg": "noted"}), None) == [
        ("*", "250 2.0.0 noted")
    ]


def test_source_is_registered_as_an_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="txcl.sources") if e.name == "lmtp"]
    assert ep.load() is SOURCE


def test_source_builds_the_envelope_the_head_would_for_a_message():
    raw = b"Subject: wifi keeps dropping\r\nFrom: a@example.com\r\n\r\nhi\r\n"
    env = SOURCE.envelope_from_message(
        raw, rcpts=["support@acme.example"], mail_from="a@example.com", stack="acme/_mail", stage=0
    )
    txc = env["_txc"]
    assert txc["src"] == "lmtp"
    assert txc["route"] == {
        "tenant": "acme", "stack": "acme/_mail", "ingress": "test", "to": "acme/_mail/0"
    }
    assert txc["lmtp"]["rcpt"] == txc["lmtp"]["transaction_rcpt"] == ["support@acme.example"]
    assert txc["lmtp"]["mail"] == {"from": "a@example.com", "size": len(raw)}
    assert txc["lmtp"]["msg"]["subject"] == "wifi keeps dropping"
    assert txc["lmtp"]["msg"]["text"] == "hi\n"
