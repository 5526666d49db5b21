"""The lark fast path (txcl/lark_fast.py) against stock lark: the same AST, the same errors,
and stock lark whenever the fast path cannot be set up. tests/test_parser.py runs the whole
parser suite both ways."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lark.exceptions import UnexpectedInput

from txcl import lark_fast
from txcl import parser as txcl_parser
from txcl.errors import TxclSyntaxError
from txcl.parser import _BUILDERS, MAX_NESTING, _lark, _LineScan, _on_comment, _Refused


@pytest.fixture(autouse=True)
def fresh_choice() -> Iterator[None]:
    txcl_parser._file_parse.cache_clear()
    yield
    txcl_parser._file_parse.cache_clear()


def _is_fast(parse: Callable[[str], Any]) -> bool:
    return isinstance(getattr(parse, "__self__", None), lark_fast.FileParser)


def _both() -> tuple[Callable[[str], Any], Callable[[str], Any]]:
    stock = _lark("file")
    return lark_fast.FileParser(stock, _BUILDERS, _on_comment, MAX_NESTING).parse, stock.parse


def _outcome(parse: Callable[[str], Any], text: str) -> tuple[object, list[tuple[str, int, int]]]:
    """The statements (or None for any syntax error) and the comments collected on the way."""
    scan = _LineScan("f.txcl", 1)
    reset = txcl_parser._SCAN.set(scan)
    try:
        found: object = parse(text)
    except (UnexpectedInput, _Refused):
        found = None
    finally:
        txcl_parser._SCAN.reset(reset)
    comments = [(t.value, t.line, t.column) for t in scan.comments] if found is not None else []
    return found, comments


PIECES = [
    "WHEN @lmtp.rcpt.0 =~ /^support@/i",
    '  when not @a.b IN [1, "x", true] or len(@c) > 2  # trailing',
    'SET @lmtp.res.recipients.0.msg = "queued \\" # not a comment"',
    'SET ticket."odd.key".0 = match.num + 1.5e3',
    'EXEC "op://ARCHIVE"',
    'WITH timeout = "5s"',
    "WHEN $._txc.lmtp.msg.attachments[?(@.type == 'a b')].name =~ /pdf/",
    "WHEN f() AND g(1, [2, [3]]) != null OR (false)",
    "WHEN @a <= -1 AND @a >= 2 AND @a < 3 AND @a !=~ /x\\/y/ms",
    "\t# an own-line comment",
    "",
    "WHEN (@a == 1",
    "SET @a = yes",
    "WHEN @a =~ /x/q",
    'SET @a = "\\q"',
    "FOO & bar",
    "SET @a = 1 SET @b = 2",
    "WHEN " + "(" * (MAX_NESTING + 1) + "1" + ")" * (MAX_NESTING + 1),
    "\x0c",
]

# Characters the terminals are made of, to reach odd token boundaries the pieces miss.
ALPHABET = "@$./\\\"'()[],=!<>~+#-_ \t\n0123456789eEaxWHENSTOIRAD"


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=8).map("\n".join))
def test_fast_and_stock_build_the_same_statements_and_comments(text: str) -> None:
    fast, stock = _both()
    assert _outcome(fast, text) == _outcome(stock, text)


@settings(max_examples=400, deadline=None)
@given(st.text(ALPHABET, max_size=40))
def test_fast_and_stock_agree_on_arbitrary_text(text: str) -> None:
    fast, stock = _both()
    assert _outcome(fast, text) == _outcome(stock, text)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=6).map("\n".join))
def test_parse_gives_the_same_ast_and_errors_either_way(source: str) -> None:
    def outcome() -> object:
        try:
            return txcl_parser.parse(source, "f.txcl")
        except TxclSyntaxError as err:
            return err.problems

    assert _is_fast(txcl_parser._file_parse())
    fast = outcome()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lark_fast, "VERIFIED_LARK", ((0, 0), (0, 1)))
        txcl_parser._file_parse.cache_clear()
        assert not _is_fast(txcl_parser._file_parse())
        stock = outcome()
    txcl_parser._file_parse.cache_clear()
    assert fast == stock


# --- setup failures fall back to stock lark -------------------------------------------------


def test_the_fast_path_is_used_with_the_lark_it_was_verified_against() -> None:
    assert _is_fast(txcl_parser._file_parse())


def test_a_lark_outside_the_verified_range_gets_stock_lark(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(lark_fast, "VERIFIED_LARK", ((9, 0), (9, 1)))
    caplog.set_level("INFO", logger="txcl.parser")
    assert not _is_fast(txcl_parser._file_parse())
    assert "outside" in caplog.text
    assert len(txcl_parser.parse("WHEN @a == 1\nSET @b = 2\n", "f").rules) == 1


def test_lark_internals_that_moved_get_stock_lark(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lark.parsers.lalr_parser_state", None)  # import fails
    with pytest.raises(lark_fast.Unavailable, match="internals moved"):
        _both()
    assert not _is_fast(txcl_parser._file_parse())


def test_a_table_with_a_rule_it_cannot_build_is_refused() -> None:
    builders = {name: b for name, b in _BUILDERS.items() if name != "when"}
    with pytest.raises(lark_fast.Unavailable, match="when has no builder"):
        lark_fast.FileParser(_lark("file"), builders, _on_comment, MAX_NESTING)


def test_a_fast_path_that_disagrees_on_the_sample_gets_stock_lark(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(lark_fast.FileParser, "parse", lambda self, text: [])
    assert not _is_fast(txcl_parser._file_parse())
    assert "disagrees" in caplog.text
