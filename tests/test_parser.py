"""The TXCL parser: text -> frozen AST, and syntax errors that say where and what."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path as FsPath
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txcl import ast, lark_fast
from txcl import parser as txcl_parser
from txcl.errors import Pos, TxclSyntaxError, source_lines
from txcl.parser import (
    MAX_NESTING,
    SYNTAX_EXAMPLES,
    _LineScan,
    _parse_by_line,
    _parse_file,
    grammar_text,
    parse,
    parse_expression,
)

X = Pos("", 0, 0)


@pytest.fixture(scope="module", autouse=True, params=["fast", "stock"])
def file_parse(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test of this module runs twice: whole files parsed by txcl/lark_fast.py, and by
    stock lark, as when the fast path cannot be set up (here: lark outside its range)."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "stock":
            patch.setattr(lark_fast, "VERIFIED_LARK", ((0, 0), (0, 1)))
        txcl_parser._file_parse.cache_clear()
        fast = isinstance(getattr(txcl_parser._file_parse(), "__self__", None), lark_fast.FileParser)
        assert fast == (request.param == "fast")
        yield request.param
    txcl_parser._file_parse.cache_clear()


def expr(text: str) -> ast.Expr:
    return ast.strip_pos(parse_expression(text))


def path(*segments: ast.Segment) -> ast.Path:
    return ast.Path(segments, X)


def lit(value: object) -> ast.Literal:
    return ast.Literal(value, X)  # type: ignore[arg-type]


def first_lines(source: str, name: str = "r.txcl") -> list[str]:
    with pytest.raises(TxclSyntaxError) as err:
        parse(source, name)
    return [str(p).splitlines()[0] for p in err.value.problems]


class TestProductSpecExamples:
    """Every rule of the product spec (the examples of docs/lmtp.md) parses unchanged."""

    SPEC_RULES = [
        "WHEN @lmtp.rcpt.0 =~ /support@/\nSET @lmtp.res.recipients.0.code = 250\n"
        'SET @lmtp.res.recipients.0.msg = "queued"\n',
        'WHEN @lmtp.msg.subject =~ /unsubscribe/\nSET @lmtp.res.code = 250\nSET @lmtp.res.msg = "noted"\n',
        "WHEN @lmtp.msg.headers.authentication-results.0 !=~ /spf=pass/\n"
        'SET @lmtp.res.code = 550\nSET @lmtp.res.msg = "SPF failed"\n',
        "# OPS/system/mail_catchall/0/accept.txcl\nSET @lmtp.res.code = 250\n"
        'SET @lmtp.res.msg = "accepted (archived)"\nEXEC "op://ARCHIVE"\n',
        "WHEN @lmtp.rcpt.0 =~ /^support@/\n"
        'WITH omit = "_txc.lmtp.msg.attachments, _txc.lmtp.msg.raw"\n'
        'WITH redact = "_txc.lmtp.msg.headers.authorization"\nEXEC "op://CLASSIFY"\n',
        "WHEN @lmtp.rcpt.0 =~ /support@/\n"
        "WHEN NOT @lmtp.msg.subject =~ /unsubscribe/i      # several WHENs = AND\n"
        'WITH omit = "_txc.lmtp.msg.attachments, _txc.lmtp.msg.raw"\n'
        "SET @lmtp.res.recipients.0.code = 250\n"
        'SET @lmtp.res.recipients.0.msg = "queued"\nEXEC "op://CLASSIFY"\n',
    ]

    @pytest.mark.parametrize("source", SPEC_RULES)
    def test_spec_rule_parses_to_one_rule(self, source: str) -> None:
        file = parse(source, "spec.txcl")
        assert len(file.rules) == 1
        assert file.rules[0].body

    def test_spf_gate_is_a_negated_match_on_a_hyphenated_header(self) -> None:
        file = parse(self.SPEC_RULES[2], "spf.txcl")
        when = ast.strip_pos(file.rules[0].whens[0])
        assert when.expr == ast.Match(
            path("_txc", "lmtp", "msg", "headers", "authentication-results", 0),
            ast.Regex("spf=pass", "", X),
            True,
            X,
        )

    def test_statements_keep_their_positions(self) -> None:
        file = parse(self.SPEC_RULES[0], "s.txcl")
        rule = file.rules[0]
        assert rule.pos == Pos("s.txcl", 1, 1)
        assert rule.whens[0].expr.regex.pos == Pos("s.txcl", 1, 22)  # type: ignore[union-attr]
        assert rule.body[0].pos == Pos("s.txcl", 2, 1)
        assert rule.body[0].value.pos == Pos("s.txcl", 2, 35)  # type: ignore[union-attr]
        assert rule.body[1].target.pos == Pos("s.txcl", 3, 5)  # type: ignore[union-attr]

    def test_with_and_exec_bodies(self) -> None:
        body = ast.strip_pos(parse(self.SPEC_RULES[4], "w.txcl").rules[0].body)
        assert body == (
            ast.With("omit", lit("_txc.lmtp.msg.attachments, _txc.lmtp.msg.raw"), X),
            ast.With("redact", lit("_txc.lmtp.msg.headers.authorization"), X),
            ast.Exec("op://CLASSIFY", X),
        )


class TestPathsAndLiterals:
    CASES = [
        pytest.param("@a.b", path("_txc", "a", "b"), id="@ is _txc"),
        pytest.param("ticket.id", path("ticket", "id"), id="bare top-level path"),
        pytest.param("match.num", path("match", "num"), id="match groups"),
        pytest.param('@h."x-odd.key"', path("_txc", "h", "x-odd.key"), id="quoted segment"),
        pytest.param('@h."0"', path("_txc", "h", "0"), id="quoted digits stay a key"),
        pytest.param("@r.10.code", path("_txc", "r", 10, "code"), id="digits index"),
        pytest.param("@a.-1", path("_txc", "a", "-1"), id="-1 in a path is a key"),
        pytest.param('@a."\\u00e9"', path("_txc", "a", "é"), id="JSON escapes in segments"),
        pytest.param("not.x", path("not", "x"), id="keyword-like root of a path"),
        pytest.param(
            "$._txc.lmtp.msg.attachments[*].type",
            ast.JsonPath("$._txc.lmtp.msg.attachments[*].type", X),
            id="jsonpath",
        ),
        pytest.param(
            '$.a[?(@.b == "x, y")].c',
            ast.JsonPath('$.a[?(@.b == "x, y")].c', X),
            id="jsonpath filter with spaces and comma in brackets",
        ),
        pytest.param('"a\\n\\"b\\u00e9"', lit('a\n"bé'), id="JSON string escapes"),
        pytest.param("-1", lit(-1), id="negative int"),
        pytest.param("2.50", lit(2.5), id="decimal"),
        pytest.param("1e3", lit(1000.0), id="exponent"),
        pytest.param("TRUE", lit(True), id="true any case"),
        pytest.param("False", lit(False), id="false any case"),
        pytest.param("nULL", lit(None), id="null any case"),
        pytest.param("[]", ast.ListLit((), X), id="empty list"),
        pytest.param(
            '[1, ["a"]]', ast.ListLit((lit(1), ast.ListLit((lit("a"),), X)), X), id="list"
        ),
        pytest.param("LOWER(@a.b)", ast.Call("lower", (path("_txc", "a", "b"),), X), id="call"),
        pytest.param("f()", ast.Call("f", (), X), id="call without arguments"),
    ]

    @pytest.mark.parametrize(("text", "expected"), CASES)
    def test_atom(self, text: str, expected: ast.Expr) -> None:
        assert expr(text) == expected

    def test_regex_slash_escape_and_flags(self) -> None:
        match = expr(r"@a.b =~ /a\/b\d/ims")
        assert isinstance(match, ast.Match)
        assert match.regex == ast.Regex(r"a/b\d", "ims", X)

    def test_jsonpath_stops_at_a_comma_or_paren_outside_brackets(self) -> None:
        call = expr("f($.a.b, $.c[0])")
        assert call == ast.Call("f", (ast.JsonPath("$.a.b", X), ast.JsonPath("$.c[0]", X)), X)


class TestPrecedence:
    a, b, c = path("_txc", "a"), path("_txc", "b"), path("_txc", "c")

    def test_and_binds_tighter_than_or(self) -> None:
        assert expr("@a OR @b AND @c") == ast.Or(self.a, ast.And(self.b, self.c, X), X)

    def test_not_binds_looser_than_comparison(self) -> None:
        assert expr("NOT @a == 1") == ast.Not(ast.Compare("==", self.a, lit(1), X), X)

    def test_not_binds_tighter_than_and(self) -> None:
        assert expr("NOT @a AND @b") == ast.And(ast.Not(self.a, X), self.b, X)

    def test_plus_binds_tighter_than_comparison_and_is_left_associative(self) -> None:
        assert expr("@a + @b + 1 == @c") == ast.Compare(
            "==", ast.Add(ast.Add(self.a, self.b, X), lit(1), X), self.c, X
        )

    def test_or_is_left_associative(self) -> None:
        assert expr("@a OR @b OR @c") == ast.Or(ast.Or(self.a, self.b, X), self.c, X)

    def test_parentheses_override(self) -> None:
        assert expr("(@a OR @b) AND @c") == ast.And(ast.Or(self.a, self.b, X), self.c, X)

    @pytest.mark.parametrize("op", ["==", "!=", "<", "<=", ">", ">="])
    def test_comparison_operators(self, op: str) -> None:
        assert expr(f"@a {op} 1") == ast.Compare(op, self.a, lit(1), X)

    def test_in_is_a_comparison(self) -> None:
        assert expr("@a in [1]") == ast.Compare("IN", self.a, ast.ListLit((lit(1),), X), X)

    def test_not_in_is_one_comparison(self) -> None:
        assert expr("@a not in [1]") == ast.Compare("NOT IN", path("_txc", "a"), ast.ListLit((lit(1),), X), X)
        assert expr("NOT @a NOT IN [1]") == ast.Not(expr("@a NOT IN [1]"), X)
        assert expr("@a NOT IN [1] AND @b") == ast.And(expr("@a NOT IN [1]"), path("_txc", "b"), X)

    def test_keywords_are_whole_words(self) -> None:
        # `ORx.y` is a path, so this is a missing operator, not `@a OR x.y`
        assert first_lines("WHEN @a ORx.y\nSET @a = 1\n")[0].startswith(
            "r.txcl:1:9: txcl_parse_error: missing operator between two values"
        )


class TestRules:
    def test_when_after_a_body_line_starts_a_new_rule(self) -> None:
        file = parse('WHEN @a == 1\nSET @b = 1\nWHEN @c == 1\nWHEN @d == 1\nEXEC "op://X"\n', "f")
        assert [(len(r.whens), len(r.body)) for r in file.rules] == [(1, 1), (2, 1)]
        assert file.rules[1].pos == Pos("f", 3, 1)

    def test_a_file_without_when_is_one_unconditional_rule(self) -> None:
        file = parse("SET @a = 1\n\n# note\nSET @b = 2\n", "f")
        assert [(len(r.whens), len(r.body)) for r in file.rules] == [(0, 2)]

    def test_body_before_the_first_when_is_its_own_rule(self) -> None:
        file = parse("SET @a = 1\nWHEN @c == 1\nSET @b = 1\n", "f")
        assert [(len(r.whens), len(r.body)) for r in file.rules] == [(0, 1), (1, 1)]

    def test_whens_without_a_body_are_an_error(self) -> None:
        assert first_lines("WHEN @a == 1\nSET @b = 1\n\nWHEN @c == 1  # dangling\n") == [
            "r.txcl:4:1: txcl_parse_error: a rule needs at least one SET, EXEC or WITH after its WHENs"
        ]

    def test_empty_and_comment_only_files_have_no_rules(self) -> None:
        assert parse("", "f").rules == ()
        file = parse("  # a\n\n#b\n", "f")
        assert file.rules == ()
        assert [c.text for c in file.comments] == [" a", "b"]
        assert file.comments[0].pos == Pos("f", 1, 3)

    def test_trailing_comments_are_collected_with_positions(self) -> None:
        file = parse('SET @a = "#not a comment"  # yes a comment   \n', "f")
        assert file.comments == (ast.Comment(" yes a comment", Pos("f", 1, 28)),)
        assert ast.strip_pos(file.rules[0].body[0].value) == lit("#not a comment")  # type: ignore[union-attr]

    def test_keywords_are_case_insensitive(self) -> None:
        upper = parse("WHEN NOT @a IN [TRUE] OR @b == NULL\nSET @c = FALSE\n", "f")
        lower = parse("when not @a in [true] or @b == null\nset @c = false\n", "f")
        assert ast.strip_pos(upper) == ast.strip_pos(lower)

    def test_a_leading_byte_order_mark_is_skipped(self) -> None:
        assert parse("\ufeffSET @a = 1\n", "f") == parse("SET @a = 1\n", "f")

    def test_crlf_line_endings_are_accepted(self) -> None:
        lf = parse("WHEN @a == 1  # c\nSET @b = 2\n", "f")
        crlf = parse("WHEN @a == 1  # c\r\nSET @b = 2\r\n", "f")
        assert crlf == lf


class TestSyntaxErrors:
    CASES = [
        pytest.param(
            "WHEN @lmtp.msg.subject =~ /urgent\n",
            "r.txcl:1:27: txcl_parse_error: unterminated regex",
            id="unterminated regex",
        ),
        pytest.param(
            'SET @a = "abc\n',
            "r.txcl:1:10: txcl_parse_error: unterminated string",
            id="unterminated string",
        ),
        pytest.param(
            "SET @a.b 1\n",
            "r.txcl:1:10: txcl_parse_error: missing '=' in SET; expected '=', found '1'",
            id="missing = in SET",
        ),
        pytest.param(
            "EXEC op://ARCHIVE\n",
            'r.txcl:1:6: txcl_parse_error: EXEC needs a quoted op URI like "op://ARCHIVE";'
            " expected a string, found 'op'",
            id="unquoted EXEC",
        ),
        pytest.param(
            "IF @a == 1\n",
            "r.txcl:1:1: txcl_parse_error: unknown keyword; a statement starts with WHEN, SET,"
            " EXEC or WITH; expected EXEC, SET, WHEN, WITH or end of line, found 'IF'",
            id="unknown keyword",
        ),
        pytest.param(
            "WHEN\n",
            "r.txcl:1:5: txcl_parse_error: missing expression; expected a value, found end of line",
            id="empty WHEN",
        ),
        pytest.param(
            'WHEN @a =~ "x"\n',
            "r.txcl:1:12: txcl_parse_error: =~ and !=~ need a regex such as /pattern/i on their"
            " right; expected a regex, found '\"x\"'",
            id="match against a string",
        ),
        pytest.param(
            "WHEN 1 < @a < 3\n",
            "r.txcl:1:13: txcl_parse_error: comparisons do not chain; join them with AND;"
            " expected '+', AND, OR or end of line, found '<'",
            id="chained comparison",
        ),
        pytest.param(
            "WHEN (@a == 1\n",
            "r.txcl:1:14: txcl_parse_error: missing ')'; expected ')', found end of line",
            id="missing paren",
        ),
        pytest.param(
            "SET @a = [1, 2\n",
            "r.txcl:1:15: txcl_parse_error: missing ']'; expected ',' or ']', found end of line",
            id="missing bracket",
        ),
        pytest.param(
            "SET @a = 1 SET @b = 2\n",
            "r.txcl:1:12: txcl_parse_error: one statement per line; expected an operator, AND,"
            " OR or end of line, found 'SET'",
            id="two statements on a line",
        ),
        pytest.param(
            "WHEN @a == yes\n",
            'r.txcl:1:12: txcl_parse_error: bare word yes is not a value: write a string ("yes")'
            " or a path such as @lmtp.yes or ticket.yes",
            id="bare word",
        ),
        pytest.param(
            "WHEN @a =~ /x/g\n",
            "r.txcl:1:15: txcl_parse_error: unknown regex flag 'g'; the flags are i, m and s",
            id="bad regex flag",
        ),
        pytest.param(
            "WHEN @a =~ /x/ii\n",
            "r.txcl:1:16: txcl_parse_error: regex flag 'i' is given twice",
            id="repeated regex flag",
        ),
        pytest.param(
            'SET @a = "\\q"\n',
            'r.txcl:1:11: txcl_parse_error: invalid escape in string; use JSON escapes such as \\n, \\" or \\u00e9',
            id="bad escape",
        ),
        pytest.param(
            'SET @a = "\\ud800"\n',
            "r.txcl:1:10: txcl_parse_error: string holds an unpaired surrogate (not valid in UTF-8)",
            id="lone surrogate escape",
        ),
        pytest.param(
            "WHEN @a == 1 && @b == 2\n",
            "r.txcl:1:14: txcl_parse_error: unexpected character '&'; write AND",
            id="&&",
        ),
        pytest.param(
            "WHEN @a. == 1\n",
            "r.txcl:1:8: txcl_parse_error: a '.' in a path must be followed by a segment",
            id="dangling dot",
        ),
        pytest.param(
            "SET x = 1\n",
            "r.txcl:1:5: txcl_parse_error: SET needs a path such as @lmtp.res.code; expected a"
            " path or an @path, found 'x'",
            id="SET to a bare word",
        ),
        pytest.param(
            'WITH timeout "5s"\n',
            "r.txcl:1:14: txcl_parse_error: missing '=' in WITH; expected '=', found '\"5s\"'",
            id="missing = in WITH",
        ),
        pytest.param(
            "SET @a = /x/\n",
            "r.txcl:1:10: txcl_parse_error: a regex cannot stand alone; match it with =~ or !=~;"
            " expected a value, found '/x/'",
            id="lone regex",
        ),
        pytest.param(
            "SET @a = 1e999\n",
            "r.txcl:1:10: txcl_parse_error: number 1e999 is out of range",
            id="float overflow",
        ),
    ]

    @pytest.mark.parametrize(("source", "first_line"), CASES)
    def test_error_message(self, source: str, first_line: str) -> None:
        assert first_lines(source) == [first_line]

    def test_context_is_the_line_and_a_caret(self) -> None:
        with pytest.raises(TxclSyntaxError) as err:
            parse("SET @a = 1\nWHEN @lmtp.msg.subject =~ /urgent\n", "r.txcl")
        assert str(err.value) == (
            "r.txcl:2:27: txcl_parse_error: unterminated regex\n"
            "    WHEN @lmtp.msg.subject =~ /urgent\n"
            "                              ^"
        )
        problem = err.value.problem
        assert (problem.code, problem.pos, problem.severity) == (
            "txcl_parse_error",
            Pos("r.txcl", 2, 27),
            "error",
        )

    def test_every_bad_line_is_reported(self) -> None:
        source = "WHEN @a =~ /x\nSET @a.b 1\nSET @ok = 1\nEXEC ARCHIVE\nWHEN\nSET @b = 2\n"
        assert [line.split(": txcl_parse_error")[0] for line in first_lines(source)] == [
            "r.txcl:1:12",
            "r.txcl:2:10",
            "r.txcl:4:6",
            "r.txcl:5:5",
        ]

    def test_reporting_stops_after_many_errors(self) -> None:
        lines = first_lines("FOO\n" * 500)
        assert len(lines) == 51
        assert (
            lines[-1] == "r.txcl:51:1: txcl_parse_error: too many syntax errors; stopped after 50"
        )

    def test_nul_byte_is_an_unexpected_character(self) -> None:
        with pytest.raises(TxclSyntaxError) as err:
            parse("SET @a = 1\x00\n", "r.txcl")
        assert str(err.value).splitlines() == [
            "r.txcl:1:11: txcl_parse_error: unexpected character '\\x00'",
            "    SET @a = 1\ufffd",
            "              ^",
        ]

    def test_tabs_keep_the_caret_under_the_column(self) -> None:
        with pytest.raises(TxclSyntaxError) as err:
            parse("\tSET\t@a = ~\n", "r.txcl")
        assert str(err.value).splitlines()[1:] == ["    \tSET\t@a = ~", "    \t   \t     ^"]

    def test_long_lines_are_clipped_around_the_error(self) -> None:
        with pytest.raises(TxclSyntaxError) as err:
            parse('SET @a = "' + "x" * 100_000 + '" ~\n', "r.txcl")
        context = err.value.problem.context.splitlines()
        assert len(context[0]) < 120
        assert context[1].index("^") == context[0].index("~")


class TestHostileInput:
    @pytest.mark.parametrize(
        "source",
        [
            pytest.param("WHEN " + "(" * 100_000 + "\nSET @a = 1\n", id="100k open parens"),
            pytest.param(
                "WHEN " + "(" * 100_000 + "1" + ")" * 100_000 + "\nSET @a = 1\n",
                id="100k balanced parens",
            ),
            pytest.param("WHEN " + "[" * 100_000 + "\nSET @a = 1\n", id="100k brackets"),
            pytest.param("WHEN " + "NOT " * 10_000 + "@a\nSET @a = 1\n", id="NOT chain"),
            pytest.param(
                "WHEN " + " AND ".join(["@a"] * 10_000) + "\nSET @a = 1\n", id="AND chain"
            ),
            pytest.param("SET @a = " + " + ".join(["1"] * 10_000) + "\n", id="+ chain"),
        ],
    )
    def test_deep_nesting_is_refused_with_a_position(self, source: str) -> None:
        lines = first_lines(source)
        assert len(lines) == 1
        assert lines[0].startswith("r.txcl:1:")
        assert lines[0].endswith(
            f"txcl_parse_error: expression nested too deeply (more than {MAX_NESTING} levels)"
        )

    def test_nesting_up_to_the_limit_is_accepted(self) -> None:
        depth = MAX_NESTING - 1
        source = "WHEN " + "NOT " * depth + "(" * depth + "@a" + ")" * depth + "\nSET @a = 1\n"
        assert len(parse(source, "f").rules) == 1

    def test_huge_string_and_unterminated_huge_string(self) -> None:
        big = "x" * 2_000_000
        assert parse(f'SET @a = "{big}"\n', "f").rules[0].body[0].value.value == big  # type: ignore[union-attr]
        assert first_lines(f'SET @a = "{big}\n') == [
            "r.txcl:1:10: txcl_parse_error: unterminated string"
        ]

    def test_huge_integer_is_refused(self) -> None:
        assert first_lines("SET @a = " + "9" * 100_000 + "\n") == [
            "r.txcl:1:10: txcl_parse_error: integer longer than 1000 digits"
        ]

    def test_parse_work_grows_linearly(self) -> None:
        # Counts function calls instead of timing them: the machines are shared and noisy,
        # and a count is the same on every run. bench/txcl_bench.py prints the timings.
        block = (
            "# support\nWHEN @lmtp.rcpt.0 =~ /support@/ AND NOT @lmtp.msg.subject =~ /x/i\n"
            'SET @lmtp.res.recipients.0.code = 250\nSET @lmtp.res.recipients.0.msg = "queued"\n'
        )

        def calls(copies: int) -> int:
            count = 0

            def profile(frame: Any, event: str, arg: Any) -> None:
                nonlocal count
                if event in ("call", "c_call"):
                    count += 1

            parse(block, "warm.txcl")
            sys.setprofile(profile)
            try:
                parse(block * copies, "big.txcl")
            finally:
                sys.setprofile(None)
            return count

        small, large = calls(150), calls(600)
        assert large < small * 4.2  # 4x the text; quadratic would be 16x


def test_grammar_is_found_beside_the_package() -> None:
    in_tree = FsPath(__file__).resolve().parent.parent / "grammar" / "txcl.lark"
    assert grammar_text() == in_tree.read_text("utf-8")


def test_parse_expression_reports_positions_in_its_own_text() -> None:
    with pytest.raises(TxclSyntaxError) as err:
        parse_expression("@a =~ /x", "e")
    assert str(err.value).splitlines()[0] == "e:1:7: txcl_parse_error: unterminated regex"
    assert parse_expression("@a == 1", "e").pos == Pos("e", 1, 1)


@pytest.mark.parametrize(
    ("label", "example"),
    [(label, ex) for label, examples in SYNTAX_EXAMPLES.items() for ex in examples],
)
def test_every_syntax_example_earns_its_own_label(label: str, example: str) -> None:
    with pytest.raises(TxclSyntaxError) as err:
        parse(example + "\n", "x.txcl")
    assert err.value.problem.message.startswith(label)


# --- the whole-file parse finds what the line-by-line parse finds -----------------------------

LINE_PIECES = [
    "WHEN @lmtp.rcpt.0 =~ /^support@/i",
    "  when not @a.b IN [1, \"x\", true] or len(@c) > 2  # trailing",
    'SET @lmtp.res.recipients.0.msg = "queued \\" # not a comment"',
    "SET ticket.\"odd.key\".0 = match.num + 1",
    'EXEC "op://ARCHIVE"',
    "WITH timeout = \"5s\"",
    "WHEN $._txc.lmtp.msg.attachments[?(@.type == 'a b')].name =~ /pdf/",
    "\t# an own-line comment",
    "",
    "   ",
    "#",
    "WHEN (@a == 1",
    "SET @a = yes",
    "WHEN @a =~ /x/q",
    'SET @a = "\\q"',
    "FOO",
    "SET @a = 1 SET @b = 2",
    "\x0c",
    "SET @a = \"x\r\"",
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(LINE_PIECES), max_size=8),
    st.sampled_from(["\n", "\r\n"]),
    st.booleans(),
)
def test_whole_file_parse_agrees_with_the_line_by_line_parse(
    pieces: list[str], newline: str, final_newline: bool
) -> None:
    source = newline.join(pieces) + (newline if final_newline else "")
    try:
        expected: object = _parse_by_line(source_lines(source), "f.txcl")
    except TxclSyntaxError as err:
        expected = err.problems
    try:
        found: object = parse(source, "f.txcl")
    except TxclSyntaxError as err:
        found = err.problems
    assert found == expected
    if isinstance(expected, ast.File):  # a file without errors takes the one-parse path
        assert _parse_file(_LineScan("f.txcl", 1), "\n".join(source_lines(source))) is not None


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs",), exclude_characters='\r\n"\\'), max_size=30))
def test_a_string_without_escapes_decodes_as_json_does(inner: str) -> None:
    written = f'"{inner}"'
    rule = parse(f"WHEN @a == {written}\nSET @res.code = 250\n", "s.txcl").rules[0]
    compare = rule.whens[0].expr
    assert isinstance(compare, ast.Compare) and isinstance(compare.right, ast.Literal)
    assert compare.right.value == json.loads(written, strict=False)
