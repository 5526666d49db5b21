"""The envelope contract: accessors, read-only rules, codes, path text, durations, names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txcl.envelope import (
    STACK_NAME,
    TENANT_NAME,
    parse_duration,
    parse_path,
    patch_read_only_reason,
    path_text,
    read_only_reason,
    result_of,
    rid_of,
    route_of,
    route_to,
    section_of,
    source_of,
    split_path_list,
    txc_of,
    valid_code,
    verdict_problem,
)
from txcl.values import MISSING

ENVELOPE = {
    "_txc": {
        "src": "lmtp",
        "rid": "01R",
        "route": {"to": "acme/_mail/0", "stack": "acme/_mail"},
        "lmtp": {"rcpt": ["a@b"], "res": {"code": 250}},
    },
    "ticket": {"id": 1},
}


def test_accessors_read_the_stamped_places() -> None:
    assert txc_of(ENVELOPE) is ENVELOPE["_txc"]
    assert source_of(ENVELOPE) == "lmtp"
    assert rid_of(ENVELOPE) == "01R"
    assert route_of(ENVELOPE) == {"to": "acme/_mail/0", "stack": "acme/_mail"}
    assert route_to(ENVELOPE) == "acme/_mail/0"
    assert section_of(ENVELOPE) == ENVELOPE["_txc"]["lmtp"]
    assert section_of(ENVELOPE, "web") is None
    assert result_of(ENVELOPE) == {"code": 250}
    assert result_of(ENVELOPE, "web") is MISSING


@pytest.mark.parametrize(
    "envelope",
    [None, [], "x", {}, {"_txc": 1}, {"_txc": {"src": "", "rid": 5, "route": "x"}}],
)
def test_accessors_on_envelopes_without_those_places(envelope: object) -> None:
    assert source_of(envelope) is None
    assert rid_of(envelope) == ""
    assert route_of(envelope) is None
    assert route_to(envelope) is MISSING
    assert section_of(envelope) is None
    assert result_of(envelope) is MISSING


def test_read_only_places() -> None:
    assert read_only_reason(("_txc", "lmtp", "res", "code"), "lmtp") is None
    assert read_only_reason(("_txc", "web", "x"), "lmtp") is None
    assert read_only_reason(("ticket", "id"), "lmtp") is None
    for segments in [("_txc",), ("_txc", "src"), ("_txc", "rid"), ("_txc", "route", "to"),
                     ("_txc", "lmtp"), ("_txc", "lmtp", "rcpt", 0)]:
        assert read_only_reason(segments, "lmtp") is not None, segments
    assert patch_read_only_reason({"_txc": {"lmtp": {"res": {"code": 250}}}}, "lmtp") is None
    assert patch_read_only_reason({"_txc": {"lmtp": {"msg": {}}}}, "lmtp") is not None
    assert patch_read_only_reason({"_txc": None}, "lmtp") is not None


@pytest.mark.parametrize(
    ("code", "valid"),
    [(200, True), (299, True), (450, True), (599, True), (199, False), (300, False),
     (399, False), (600, False), (True, False), (250.0, False), ("250", False), (None, False)],
)
def test_valid_code(code: object, valid: bool) -> None:
    assert valid_code(code) is valid


def test_verdict_problem_names_the_bad_slot() -> None:
    assert verdict_problem(ENVELOPE, "lmtp") is None
    bad = {"_txc": {"lmtp": {"res": {"recipients": [{"code": 250}, {"code": 700}]}}}}
    assert "recipients.1.code" in (verdict_problem(bad, "lmtp") or "")
    assert verdict_problem({"_txc": {"lmtp": {"res": 5}}}, "lmtp") is not None


@pytest.mark.parametrize(
    ("segments", "full", "at"),
    [
        (("_txc", "lmtp", "rcpt", 0), "_txc.lmtp.rcpt.0", "@lmtp.rcpt.0"),
        (("headers", "x.y", "0"), 'headers."x.y"."0"', 'headers."x.y"."0"'),
        (("a", 'q"\\', ""), 'a."q\\"\\\\".""', 'a."q\\"\\\\".""'),
        (("_txc",), "_txc", "_txc"),
        (("1a", "b"), "1a.b", "1a.b"),
        (("a b", 2), '"a b".2', '"a b".2'),
    ],
)
def test_path_text_quotes_what_is_not_plain(
    segments: tuple[str | int, ...], full: str, at: str
) -> None:
    assert path_text(segments) == full
    assert path_text(segments, at=True) == at
    assert parse_path(full) == segments
    assert parse_path(at) == segments


SEGMENTS = st.lists(st.one_of(st.integers(0, 10**6), st.text(max_size=12)), min_size=1, max_size=6)


@given(SEGMENTS, st.booleans())
def test_path_text_round_trips(segments: list[str | int], at: bool) -> None:
    # a "*" segment is written bare (a rule's bound index), so it reads back as a wildcard
    assert parse_path(path_text(tuple(segments), at=at), wildcards=True) == tuple(segments)


@pytest.mark.parametrize("text", ["", "a..b", "a b", ".a", "a.", "a.*", '"x', "@", "a.-x y"])
def test_parse_path_refuses_what_is_not_a_path(text: str) -> None:
    assert parse_path(text) is None


def test_wildcards_only_when_asked_for() -> None:
    assert parse_path("@lmtp.msg.attachments.*.content", wildcards=True) == (
        "_txc", "lmtp", "msg", "attachments", "*", "content",
    )
    assert parse_path("a.*") is None


def test_split_path_list_keeps_commas_inside_quotes() -> None:
    assert split_path_list(' a.b , @c."x,y\\"", ,') == ("a.b", '@c."x,y\\""')
    assert split_path_list("") == ()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0),
     ("5", 5.0), (" 2.5 s ", 2.5), (".5", 0.5), ("0", 0.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "5 sec", "-1s", "1w", "1e3", "5s5"])
def test_parse_duration_refuses(text: str) -> None:
    assert parse_duration(text) is None


def test_days_only_where_asked_for() -> None:
    assert parse_duration("7d") is None
    assert parse_duration("7d", days=True) == 7 * 86400.0
    assert parse_duration("1.5h", days=True) == 5400.0


def test_names() -> None:
    assert TENANT_NAME.fullmatch("acme-1") and not TENANT_NAME.fullmatch("_acme")
    assert STACK_NAME.fullmatch("_mail") and not STACK_NAME.fullmatch("Mail")
    assert not TENANT_NAME.match("acme!")  # anchored, whichever way it is called
