"""logsafe.py: control characters escaped, repeated errors held back."""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from txcl.logsafe import RepeatLimiter, escape_controls


def test_crlf_and_escapes_cannot_forge_a_line() -> None:
    forged = "boom\r\n2026-01-01 txco INFO lmtp delivery replies=250\x1b[2J\x00\u2028"
    assert escape_controls(forged) == (
        "boom\\x0d\\x0a2026-01-01 txco INFO lmtp delivery replies=250\\x1b[2J\\x00\\u2028"
    )


@given(st.text())
def test_escaped_text_is_one_line_without_controls(text: str) -> None:
    out = escape_controls(text)
    assert not [c for c in out if unicodedata.category(c) == "Cc" or c in "\u2028\u2029"]
    assert len(out.splitlines()) <= 1


def test_the_same_key_is_let_through_once_per_interval_and_counts_what_it_held() -> None:
    now = [0.0]
    limiter = RepeatLimiter(10.0, clock=lambda: now[0])
    assert limiter.allow("a") == (True, 0)
    assert [limiter.allow("a") for _ in range(3)] == [(False, 0)] * 3
    assert limiter.allow("b") == (True, 0)
    now[0] = 10.5
    assert limiter.allow("a") == (True, 3)
    assert RepeatLimiter(0).allow("a") == (True, 0) and RepeatLimiter(0).allow("a")[0]
