"""`txcl fmt`: golden files, and properties over generated rule files."""

from __future__ import annotations

import json
from pathlib import Path as FsPath

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txcl import ast, fmt
from txcl.errors import TxclSyntaxError
from txcl.fmt import InternalFormatError, format_expr, format_source
from txcl.parser import parse, parse_expression

GOLDEN = FsPath(__file__).parent / "fmt"
CASES = sorted(GOLDEN.glob("*.txcl"))


def read(path: FsPath) -> str:
    return path.read_text("utf-8") if path.stat().st_size else ""


@pytest.mark.parametrize("source", CASES, ids=[p.stem for p in CASES])
def test_golden(source: FsPath) -> None:
    with source.open(encoding="utf-8", newline="") as f:
        text = f.read()
    expected = read(source.with_name(source.name + ".formatted"))
    assert format_source(text, source.name) == expected


@pytest.mark.parametrize("source", CASES, ids=[p.stem for p in CASES])
def test_golden_output_is_already_formatted(source: FsPath) -> None:
    formatted = read(source.with_name(source.name + ".formatted"))
    assert format_source(formatted, source.name) == formatted


def test_every_golden_file_has_its_formatted_twin() -> None:
    assert CASES
    assert all(p.with_name(p.name + ".formatted").exists() for p in CASES)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        pytest.param("(@a OR @b) AND @c", "(@a OR @b) AND @c", id="OR inside AND keeps parens"),
        pytest.param("@a OR (@b AND @c)", "@a OR @b AND @c", id="AND inside OR needs none"),
        pytest.param("@a AND (@b AND @c)", "@a AND (@b AND @c)", id="right-nested AND keeps"),
        pytest.param("(@a AND @b) AND @c", "@a AND @b AND @c", id="left-nested AND drops"),
        pytest.param("NOT (@a == 1)", "NOT @a == 1", id="NOT over a comparison"),
        pytest.param("(NOT @a) == 1", "(NOT @a) == 1", id="NOT as a compared value"),
        pytest.param("@a + (@b + @c)", "@a + (@b + @c)", id="right-nested + keeps"),
        pytest.param("(@a == 1) != (@b == 2)", "(@a == 1) != (@b == 2)", id="compared comparisons"),
        pytest.param("(@a + 1) =~ /x/", "@a + 1 =~ /x/", id="sum matched"),
        pytest.param('_txc.a."b c".0', '@a."b c".0', id="_txc path in @ form"),
        pytest.param('@a."plain"', "@a.plain", id="needless quotes dropped"),
        pytest.param('@a."12"', '@a."12"', id="quoted digits keep their quotes"),
        pytest.param('"\\u00e9\\/\\u0001"', '"é/\\u0001"', id="strings as JSON"),
        pytest.param("1.50", "1.5", id="decimal"),
        pytest.param(
            "@a=~/a\\/b/mi", "@a =~ /a\\/b/mi", id="regex slash stays escaped, flags in order"
        ),
        pytest.param("LEN( [1 ,2] )", "len([1, 2])", id="calls and lists"),
    ],
)
def test_expression_canonical_form(text: str, canonical: str) -> None:
    assert format_expr(parse_expression(text)) == canonical


def test_syntax_errors_pass_through() -> None:
    with pytest.raises(TxclSyntaxError):
        format_source("WHEN @a =~ /x\n", "bad.txcl")


def test_output_that_would_change_the_rules_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmt, "format_file", lambda file: "SET @a = 2\n")
    with pytest.raises(InternalFormatError) as err:
        format_source("SET @a = 1\n", "r.txcl")
    assert str(err.value) == (
        "txcl_internal_error: r.txcl: formatting would change the rules; please report this"
    )


# --- properties over generated files ----------------------------------------------------------


def keyword(word: str) -> st.SearchStrategy[str]:
    return st.sampled_from([word, word.lower(), word.capitalize()])


spaces = st.sampled_from(["", " ", "  ", "\t"])
gap = st.sampled_from([" ", "  ", "\t", " \t "])
plain_segment = st.from_regex(r"[A-Za-z0-9_-]{1,6}", fullmatch=True)
quoted_segment = st.builds(json.dumps, st.text(max_size=5), ensure_ascii=st.booleans())
segment = st.one_of(plain_segment, quoted_segment)
root = st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,5}", fullmatch=True)

at_path = st.builds(
    lambda first, rest: "@" + ".".join([first, *rest]), segment, st.lists(segment, max_size=4)
)
bare_path = st.builds(
    lambda first, rest: ".".join([first, *rest]), root, st.lists(segment, min_size=1, max_size=4)
)
path = st.one_of(at_path, bare_path)
json_path = st.sampled_from(
    ["$", "$._txc.lmtp.rcpt[0]", "$._txc.lmtp.msg.attachments[*].type", '$.a[?(@.b == "x")].c']
)
string = st.builds(json.dumps, st.text(max_size=8), ensure_ascii=st.booleans())
number = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
constant = st.builds(
    lambda word, case: case(word),
    st.sampled_from(["true", "false", "null"]),
    st.sampled_from([str.lower, str.upper, str.capitalize]),
)
regex_piece = st.one_of(
    st.characters(blacklist_characters="/\\\n", blacklist_categories=("Cs",)),
    st.sampled_from(["\\/", "\\\\", "\\d", "\\.", "[a-z]", "(?P<num>[0-9]+)"]),
)
regex = st.builds(
    lambda pieces, flags: "/" + "".join(pieces) + "/" + "".join(flags),
    st.lists(regex_piece, max_size=6),
    st.permutations("ims").flatmap(lambda p: st.integers(0, 3).map(lambda n: p[:n])),
)
atom = st.one_of(path, json_path, string, number, constant)


def wrap(text: str) -> str:
    return f"({text})"


def compound(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Compound expressions; an operand that is itself compound is always parenthesised
    here, and fmt must find the parentheses the tree really needs."""
    # A gap may be a tab: any whitespace marks a compound (`$\t==\t$` must be wrapped too).
    operand = children.map(
        lambda t: wrap(t) if any(c.isspace() for c in t) or t.startswith("(") else t
    )
    binary = st.builds(
        lambda a, s1, op, s2, b: f"{a}{s1}{op}{s2}{b}",
        operand,
        gap,
        st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "+"]),
        gap,
        operand,
    )
    words = st.builds(
        lambda a, op, b: f"{a} {op} {b}",
        operand,
        st.one_of(keyword("AND"), keyword("OR"), keyword("IN")),
        operand,
    )
    negation = st.builds(lambda kw, a: f"{kw} {a}", keyword("NOT"), operand)
    match = st.builds(
        lambda a, op, r: f"{a} {op} {r}", operand, st.sampled_from(["=~", "!=~"]), regex
    )
    listing = st.lists(children, max_size=3).map(lambda items: "[" + ", ".join(items) + "]")
    call = st.builds(
        lambda name, args: name + "(" + ",".join(args) + ")",
        st.sampled_from(["exists", "LEN", "lower", "count"]),
        st.lists(children, max_size=2),
    )
    redundant = children.map(wrap)
    return st.one_of(binary, words, negation, match, listing, call, redundant)


expression = st.recursive(atom, compound, max_leaves=8)
comment = st.text(
    st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=10
)
trailing = st.one_of(st.just(""), comment.map(lambda c: f"  #{c}"))


def statement(kw: str, rest: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.builds(lambda k, s, r, t: f"{s}{k} {r}{t}", keyword(kw), spaces, rest, trailing)


when = statement("WHEN", expression)
set_ = statement("SET", st.builds(lambda p, e: f"{p} = {e}", path, expression))
exec_ = statement("EXEC", st.sampled_from(['"op://ARCHIVE"', '"op://CLASSIFY"']))
with_ = statement(
    "WITH",
    st.builds(lambda k, e: f"{k}={e}", st.sampled_from(["omit", "timeout", "folder"]), expression),
)
body_line = st.one_of(set_, exec_, with_)
filler = st.lists(st.one_of(st.just(""), comment.map(lambda c: f"#{c}")), max_size=2)


@st.composite
def rule_files(draw: st.DrawFn) -> str:
    lines: list[str] = []
    for index in range(draw(st.integers(1, 3))):
        min_whens = 0 if index == 0 else 1
        for part in (
            draw(st.lists(when, min_size=min_whens, max_size=2)),
            draw(st.lists(body_line, min_size=1, max_size=3)),
        ):
            for line in part:
                lines.extend(draw(filler))
                lines.append(line)
    lines.extend(draw(filler))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(lines) + draw(st.sampled_from(["", newline]))


PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(rule_files())
def test_formatting_keeps_the_rules_and_is_idempotent(source: str) -> None:
    once = format_source(source, "gen.txcl")
    assert ast.strip_pos(parse(once, "gen.txcl")) == ast.strip_pos(parse(source, "gen.txcl"))
    assert format_source(once, "gen.txcl") == once


@PROPERTY_SETTINGS
@given(expression)
def test_every_expression_prints_to_text_that_reads_back(text: str) -> None:
    tree = parse_expression(text)
    printed = format_expr(tree)
    assert ast.strip_pos(parse_expression(printed)) == ast.strip_pos(tree)
    assert format_expr(parse_expression(printed)) == printed
