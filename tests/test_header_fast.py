"""lmtp.header_fast: the plain forms it decodes itself equal what the email policy gives."""

from __future__ import annotations

from email import policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtp.header_fast import header_kind, plain_addresses, plain_decoded


def policy_decoded(name: str, value: str) -> str:
    return str(policy.default.header_fetch_parse(name, value))


def policy_addresses(name: str, value: str) -> list[tuple[str, str]]:
    header = policy.default.header_fetch_parse(name, value)
    return [(a.display_name, a.addr_spec) for a in header.addresses]


PLAIN = [
    ("From", "<alice@client.example>"),
    ("From", "alice@client.example"),
    ("From", " alice@client.example "),
    ("From", "Alice Smith <alice@client.example>"),
    ("From", "Alice  \tSmith<alice@client.example> "),
    ("To", "a@b.example, Bob <bob@b.example>,c.d+tag@e.example"),
    ("Cc", "John_Doe <x@y>"),
    ("Reply-To", "list-bounces+x=y@lists.example"),
    ("Message-ID", "<01eb.000d.fffffff9@bench.example>"),
    ("Date", "Wed,  2 Dec 2026 07:25:50 +0000 (UTC)"),
    ("Date", "Mon, 25 May 2026 16:00:00 +0200"),
    ("Date", "Mon, 25 May 2026 16:00:00 -0000"),
    ("Date", "not a date"),
    ("Subject", "wifi keeps dropping"),
    ("X-Spam-Flag", "YES"),
]

NOT_PLAIN = [
    ("From", "A.B <a@b>"),  # a special in the phrase: the policy quotes it
    ("From", '"Smith, Alice" <a@b>'),
    ("From", "<a@b> (comment)"),
    ("From", "a@b,"),
    ("From", "=?utf-8?q?Al=C3=AFce?= <a@b>"),
    ("From", "undisclosed-recipients:;"),
    ("From", "<>"),
    ("From", ""),
    ("Message-ID", "<a b@c>"),
    ("Message-ID", "<a@b> "),
    ("Subject", "caf\udcc3\udca9"),
    ("Subject", "folded\r\n line"),
]


@pytest.mark.parametrize(("name", "value"), PLAIN)
def test_plain_forms_are_decoded_here_as_the_policy_decodes_them(name: str, value: str) -> None:
    assert plain_decoded(name, value) == policy_decoded(name, value)
    if header_kind(name) == "address":
        assert plain_addresses(value) == policy_addresses(name, value)


@pytest.mark.parametrize(("name", "value"), NOT_PLAIN)
def test_other_forms_are_left_to_the_policy(name: str, value: str) -> None:
    assert plain_decoded(name, value) is None


def test_header_kinds_follow_the_policy_registry() -> None:
    assert [header_kind(n) for n in ("Subject", "from", "RESENT-TO", "Date", "Message-Id",
                                     "Content-Type", "X-Anything")] == [
        "unstructured", "address", "address", "date", "message-id", "other", "unstructured"]


# Pieces that make plain forms and the near misses around them.
PIECES = st.sampled_from([
    "a", "bob", "x.y", "Z9", "+", "=", "?", "_", "-", "'", ".", "@", "<", ">", ",", " ", "  ",
    "\t", '"', "(", ")", ";", ":", "[", "]", "\\", "example.com", "=?", "é", "\r\n ",
])
VALUES = st.lists(PIECES, max_size=14).map("".join)
ADDRESSY = st.builds(
    lambda phrase, local, domain, sep: f"{phrase}{sep}<{local}@{domain}>" if phrase
    else f"{local}@{domain}",
    st.lists(st.sampled_from(["Al", "Bo", "x_y", "a+b", "#1"]), max_size=3).map(" ".join),
    st.sampled_from(["a", "a.b", "a..b", ".a", "a+tag", "'q'"]),
    st.sampled_from(["b", "b.example", "b..c", "b-c.example", "[1.2.3.4]"]),
    st.sampled_from(["", " ", "\t", "  "]),
)
LISTS = st.lists(ADDRESSY, min_size=1, max_size=3).flatmap(
    lambda items: st.sampled_from([",", ", ", " ,", ",\t"]).map(lambda sep: sep.join(items)))
NAMES = st.sampled_from(["From", "To", "Cc", "Sender", "Message-ID", "Date", "Subject",
                         "X-Thing", "Content-Type"])


@settings(max_examples=1500, deadline=None)
@given(NAMES, st.one_of(VALUES, LISTS, ADDRESSY))
def test_whatever_the_fast_path_decodes_equals_the_policy(name: str, value: str) -> None:
    fast = plain_decoded(name, value)
    if fast is not None:
        assert fast == policy_decoded(name, value)
    mailboxes = plain_addresses(value)
    if mailboxes is not None and header_kind(name) == "address":
        assert mailboxes == policy_addresses(name, value)


@settings(max_examples=300, deadline=None)
@given(st.datetimes(timezones=st.timezones()))
def test_rfc_5322_dates_decode_as_the_policy_decodes_them(when) -> None:
    from email.utils import format_datetime

    value = format_datetime(when)
    assert plain_decoded("Date", value) == policy_decoded("Date", value)
