"""compiler.py: WHEN semantics as a table, functions, reserved WITH keys, compile errors."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txcl import ast
from txcl.compiler import (
    CompiledRule,
    ExecStep,
    SetStep,
    check_file,
    compile_file,
    expr_text,
    parse_path_list,
    parse_timeout,
)
from txcl.errors import Pos, TxclCompileError
from txcl.fmt import format_expr
from txcl.parser import parse, parse_expression
from txcl.values import COMPARISONS, MISSING, contained_in

ENVELOPE: dict[str, Any] = {
    "_txc": {
        "src": "lmtp",
        "lmtp": {
            "rcpt": ["support@acme.example", "bcc@acme.example"],
            "mail": {"from": "Alice <Alice@Example.COM>", "size": 18342},
            "msg": {
                "subject": "URGENT: ticket #123",
                "from": [{"name": "Alice", "addr": "alice@example.com"}],
                "headers": {"received": ["a", "b"]},
                "attachments": [{"type": "application/pdf"}, {"type": "image/png"}],
                "flag": None,
            },
        },
    },
    "ticket": {"id": 7, "tags": ["a", "b"]},
}


def rule_of(source: str) -> CompiledRule:
    (rule,) = compile_file(parse(source, "r.txcl"))
    return rule


def holds(expression: str, envelope: dict[str, Any] = ENVELOPE) -> bool:
    return rule_of(f"WHEN {expression}\nSET x.y = 1\n").test(envelope) is not None


WHEN_CASES = [
    pytest.param("@lmtp.msg.subject =~ /urgent/i", True, id="flag i"),
    pytest.param("@lmtp.msg.subject =~ /urgent/", False, id="case sensitive by default"),
    pytest.param("@lmtp.rcpt =~ /^support@/", True, id="a list on the left is existential"),
    pytest.param("@lmtp.rcpt !=~ /^support@/", False, id="!=~ negates the existential"),
    pytest.param('@lmtp.rcpt == "bcc@acme.example"', True, id="== a scalar is existential"),
    pytest.param("@lmtp.msg.headers.x-spam.0 =~ /yes/", False, id="missing: =~ is false"),
    pytest.param("@lmtp.msg.headers.x-spam.0 !=~ /yes/", True, id="missing: !=~ is true"),
    pytest.param('@lmtp.msg.headers.x-spam.0 != "yes"', True, id="missing: != is true"),
    pytest.param('@lmtp.msg.headers.x-spam.0 == "yes"', False, id="missing: == is false"),
    pytest.param("@lmtp.msg.flag == null", True, id="null is a value"),
    pytest.param("@lmtp.msg.nothing == null", False, id="missing is not null"),
    pytest.param("1 == true", False, id="unrelated types are never equal"),
    pytest.param('ticket.id == "7"', False, id="a number is not a string"),
    pytest.param("ticket.id == 7.0", True, id="int and float compare as numbers"),
    pytest.param("@lmtp.mail.size > 10000", True, id="ordering numbers"),
    pytest.param('@lmtp.mail.size > "1"', False, id="no ordering across types"),
    pytest.param('"b" IN ticket.tags', True, id="IN a list"),
    pytest.param('"c" IN ticket.tags', False, id="not IN"),
    pytest.param("$._txc.lmtp.msg.attachments[*].type =~ /pdf/", True, id="JSONPath any value"),
    pytest.param('"image/png" IN $..type', True, id="IN a JSONPath"),
    pytest.param('$..type == "image/png"', True, id="JSONPath == is existential"),
    pytest.param("exists(@lmtp.msg.flag)", True, id="exists: null is there"),
    pytest.param("exists(@lmtp.msg.nothing)", False, id="exists: missing"),
    pytest.param("NOT exists(@lmtp.msg.nothing)", True, id="NOT"),
    pytest.param("exists($..type)", True, id="exists of a JSONPath"),
    pytest.param("len(@lmtp.rcpt) == 2", True, id="len of a list"),
    pytest.param("len(@lmtp.msg.subject) == 19", True, id="len of a string"),
    pytest.param("count($..type) == 2", True, id="count of a JSONPath"),
    pytest.param("count(@lmtp.msg.nothing) == 0", True, id="count of missing"),
    pytest.param("count(@lmtp.mail.size) == 1", True, id="count of one value"),
    pytest.param("lower(@lmtp.msg.subject) =~ /^urgent/", True, id="lower"),
    pytest.param('upper("a") == "A"', True, id="upper"),
    pytest.param('domain(@lmtp.mail.from) == "example.com"', True, id="domain of Name <addr>"),
    pytest.param('localpart(@lmtp.mail.from) == "Alice"', True, id="localpart keeps case"),
    pytest.param('domain(@lmtp.msg.from.0) == "example.com"', True, id="domain of {name, addr}"),
    pytest.param('"acme.example" IN domain(@lmtp.rcpt)', True, id="domain of a list"),
    pytest.param('domain("no address") == null', False, id="domain of a non-address"),
    pytest.param('"a" + "b" == "ab"', True, id="+ joins strings"),
    pytest.param("ticket.id + 1 == 8", True, id="+ adds numbers"),
    pytest.param('ticket.id + "x" != "7x"', True, id="+ of unrelated types is missing"),
    pytest.param("true AND (false OR true)", True, id="AND / OR / parentheses"),
    pytest.param("@lmtp.rcpt.0", False, id="a non-boolean value does not hold"),
    pytest.param("NOT @lmtp.msg.nothing", True, id="NOT of missing holds"),
    pytest.param("[1, 2] == [1, 2]", True, id="list literal equality"),
]


@pytest.mark.parametrize(("expression", "expected"), WHEN_CASES)
def test_when(expression: str, expected: bool) -> None:
    assert holds(expression) is expected


def test_several_whens_are_and() -> None:
    rule = rule_of("WHEN @lmtp.rcpt =~ /support@/\nWHEN @lmtp.msg.subject =~ /nope/\nSET x.y = 1\n")
    assert rule.test(ENVELOPE) is None


def test_a_rule_without_when_always_fires() -> None:
    assert rule_of("SET x.y = 1\n").test({}) == {}


def test_named_groups_become_captures() -> None:
    rule = rule_of(
        "WHEN @lmtp.msg.subject =~ /#(?P<num>\\d+)/\n"
        "WHEN @lmtp.rcpt =~ /^(?P<box>[a-z]+)@/\n"
        'SET ticket.ref = match.box + "-" + match.num\n'
    )
    assert rule.captures == ("box", "num")
    captures = rule.test(ENVELOPE)
    assert captures == {"num": "123", "box": "support"}
    (step,) = rule.steps
    assert isinstance(step, SetStep)
    assert step.value(ENVELOPE, captures) == "support-123"


def test_a_when_reports_truth_and_captures() -> None:
    rule = rule_of("WHEN @lmtp.msg.subject =~ /#(?P<num>\\d+)/\nSET x.y = 1\n")
    captures: dict[str, str] = {}
    assert rule.whens[0].evaluate(ENVELOPE, captures) is True
    assert captures == {"num": "123"}
    captures = {}
    assert rule.whens[0].evaluate({}, captures) is not True
    assert captures == {}
    assert rule.whens[0].text == "@lmtp.msg.subject =~ /#(?P<num>\\d+)/"


def test_rule_metadata() -> None:
    rule = rule_of(
        "WHEN @lmtp.rcpt.0 =~ /support@/\n"
        'WITH omit = "_txc.lmtp.msg.attachments, @lmtp.msg.raw"\n'
        'WITH redact = "_txc.lmtp.msg.headers.authorization"\n'
        'WITH timeout = "500ms"\n'
        'WITH folder = "Support"\n'
        "SET @lmtp.res.recipients.0.code = 250\n"
        'EXEC "op://CLASSIFY"\n'
        'EXEC "op://ARCHIVE"\n'
        'EXEC "op://CLASSIFY"\n'
    )
    assert rule.omit == {"_txc.lmtp.msg.attachments", "_txc.lmtp.msg.raw"}
    assert rule.redact == {"_txc.lmtp.msg.headers.authorization"}
    assert rule.timeout_s == 0.5
    assert rule.ops == ("CLASSIFY", "ARCHIVE")
    assert [type(s) for s in rule.steps] == [SetStep, ExecStep, ExecStep, ExecStep]
    assert rule.evaluate_args(ENVELOPE, {}) == {"folder": "Support"}
    assert rule.reads == {("_txc", "lmtp", "rcpt", 0)}
    assert rule.writes == {("_txc", "lmtp", "res", "recipients", 0, "code")}
    assert rule.file == "r.txcl"
    assert str(rule.pos) == "r.txcl:1:1"


def test_with_arguments_drop_missing_values_and_turn_multis_into_lists() -> None:
    rule = rule_of('WITH a = @nothing\nWITH b = $..type\nEXEC "op://X"\n')
    assert rule.evaluate_args(ENVELOPE, {}) == {"b": ["application/pdf", "image/png"]}


def compile_errors(source: str) -> list[str]:
    """The problems compile_file raises, which check_file (lint's path) raises alike."""
    with pytest.raises(TxclCompileError) as err:
        compile_file(parse(source, "r.txcl"))
    with pytest.raises(TxclCompileError) as checked:
        check_file(parse(source, "r.txcl"))
    assert checked.value.problems == err.value.problems
    assert all(p.code == "txcl_compile_error" for p in err.value.problems)
    return [f"{p.pos}: {p.message}" for p in err.value.problems]


def test_every_problem_of_a_file_is_reported_with_its_position() -> None:
    source = (
        "WHEN nosuch(@a) == 1\n"
        "WHEN len(@a, @b) == 1\n"
        'WHEN exists("x")\n'
        "WHEN @a =~ /(a)\\1/\n"
        "SET match.num = 1\n"
        'WITH timeout = "soon"\n'
        'WITH omit = "a..b"\n'
        'EXEC "http://x"\n'
    )
    assert compile_errors(source) == [
        "r.txcl:1:6: unknown function nosuch(); known: count, domain, exists, len, "
        "localpart, lower, upper",
        "r.txcl:2:6: len() takes exactly one argument, 2 given",
        'r.txcl:3:13: exists() takes a path (such as @lmtp.rcpt or $..type), not "x"',
        "r.txcl:4:16: RE2 cannot compile /(a)\\1/: invalid escape sequence: \\1 "
        "(backreferences are not supported by RE2; TXCL regexes run in linear time)",
        "r.txcl:5:5: SET match.num: match.* holds the WHENs' regex groups and is read-only",
        'r.txcl:6:1: WITH timeout = "soon": give a duration such as "5s", "500ms" or a '
        "number of seconds, above 0 and at most 3600s",
        'r.txcl:7:1: WITH omit = "a..b": give a string with a comma list of full paths, '
        'such as "_txc.lmtp.msg.raw, _txc.lmtp.msg.attachments"',
        'r.txcl:8:1: EXEC "http://x": only op:// URIs are supported (e.g. "op://ARCHIVE")',
    ]


def test_problems_of_all_rules_are_reported() -> None:
    problems = compile_errors("WHEN bad(1)\nSET x.y = 1\nWHEN worse(1)\nSET y.z = 1\n")
    assert [p.split(": ")[0] for p in problems] == ["r.txcl:1:6", "r.txcl:3:6"]


def test_duplicate_with_keys_are_refused() -> None:
    assert compile_errors('WITH folder = "a"\nWITH folder = "b"\nEXEC "op://X"\n') == [
        "r.txcl:2:1: WITH folder is given twice in this rule (first at r.txcl:1:1)"
    ]


def test_set_to_a_jsonpath_is_refused() -> None:
    pos = parse("SET x.y = 1\n", "r.txcl").rules[0].body[0].pos
    file = ast.File(
        "r.txcl",
        (ast.Rule((), (ast.Set(ast.JsonPath("$.a", pos), ast.Literal(1, pos), pos),), pos),),
    )  # type: ignore[arg-type]
    with pytest.raises(TxclCompileError) as err:
        compile_file(file)
    assert (
        err.value.problem.message == "SET needs a plain path (a JSONPath may name several places)"
    )


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0),
        (2.5, 2.5),
        ("5s", 5.0),
        ("500ms", 0.5),
        ("1m", 60.0),
        ("7", 7.0),
        (0, None),
        ("-1s", None),
        (True, None),
        ("5 minutes", None),
        (None, None),
        (99999, None),
    ],
)
def test_parse_timeout(value: object, seconds: float | None) -> None:
    assert parse_timeout(value) == seconds


def test_parse_path_list() -> None:
    assert parse_path_list(" _txc.a.b ,@c.d") == ("_txc.a.b", "_txc.c.d")
    assert parse_path_list("a b") is None
    assert parse_path_list("") is None


@pytest.mark.parametrize(
    "expression",
    [
        "@lmtp.rcpt.0 =~ /support@/",
        "NOT (@a == 1 OR @b == 2) AND c.d IN [1, 2]",
        '$..type != "x" AND exists(headers."x.y")',
        "(@a + 1) + 2 == 3",
        "@a + (1 + 2) == 3",
    ],
)
def test_expr_text_is_canonical_and_reparses_to_the_same_tree(expression: str) -> None:
    tree = parse_expression(expression)
    text = expr_text(tree)
    assert ast.strip_pos(parse_expression(text)) == ast.strip_pos(tree)
    assert text == expr_text(parse_expression(text))


@given(st.text(alphabet="abc@._ ", max_size=8), st.sampled_from(["", "i"]))
def test_match_and_not_match_are_exact_negations(subject: str, flags: str) -> None:
    envelope = {"s": {"t": subject}}
    matched = holds(f"s.t =~ /a.c/{flags}", envelope)
    assert matched is not holds(f"s.t !=~ /a.c/{flags}", envelope)


X = Pos("", 0, 0)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.sampled_from([0.5, 2.0, -1.5])
    | st.text("ab", max_size=2)
)
VALUES = (
    SCALARS
    | st.lists(SCALARS, max_size=3)
    | st.dictionaries(st.sampled_from("ab"), SCALARS, max_size=2)
)


@given(VALUES, SCALARS, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]))
def test_comparison_with_a_constant_follows_the_value_rules(
    value: Any, constant: Any, op: str
) -> None:
    text = format_expr(ast.Literal(constant, X))
    assert holds(f"s.v {op} {text}", {"s": {"v": value}}) is COMPARISONS[op](value, constant)
    missing = COMPARISONS[op](MISSING, constant)
    assert holds(f"s.nothing {op} {text}", {"s": {"v": value}}) is missing


@given(VALUES, st.lists(SCALARS, max_size=3))
def test_membership_in_constants_follows_the_value_rules(value: Any, items: list[Any]) -> None:
    text = format_expr(ast.ListLit(tuple(ast.Literal(i, X) for i in items), X))
    assert holds(f"s.v IN {text}", {"s": {"v": value}}) is contained_in(value, items)


def test_a_jsonpath_repeated_across_files_is_judged_alike_with_each_position() -> None:
    bad = '$.a[?(@.b =~ "x")]'
    for name, indent in (("a.txcl", ""), ("b.txcl", "   ")):
        source = f"WHEN {indent}{bad} == 1\nSET x.y = 1\n"
        with pytest.raises(TxclCompileError) as err:
            compile_file(parse(source, name))
        (problem,) = err.value.problems
        assert problem.pos == Pos(name, 1, 6 + len(indent))
        assert "uses a =~ filter" in problem.message
    good = "$.a[*].b"
    first, second = (compile_file(parse(f"WHEN {good} == 1\nSET x.y = 1\n", n)) for n in "cd")
    assert first[0].jsonpaths == second[0].jsonpaths == frozenset({good})
    assert first[0].test({"a": [{"b": 1}]}) is not None
    assert second[0].test({"a": [{"b": 2}]}) is None


@pytest.mark.parametrize("source", [
    "SET @lmtp.res.recipients.*.code = 250\n",
    "WHEN @lmtp.rcpt.* =~ /^b@/\nSET @lmtp.res.recipients.*.code = 250\n",
    "WHEN @lmtp.rcpt.*.*.x == 1\nSET tag.x = 1\n",
    "SET tag.10000 = 1\nSET tag.x = nosuch(1)\n",
    'SET tag.x = 1\nWITH timeout = "5s"\nWITH timeout = 2\nWITH omit = "@a.b"\nEXEC "op://A"\n',
    'WHEN @a =~ /(?P<n>x)/\nSET tag.y = match.n\nEXEC "op://A.b-c"\nEXEC "op://"\n',
    "SET tag.x = 1\n",
])
def test_check_file_finds_what_compile_file_finds(source: str) -> None:
    tree = parse(source, "r.txcl")
    try:
        compile_file(tree)
        expected: tuple[object, ...] = ()
    except TxclCompileError as err:
        expected = err.problems
    try:
        check_file(tree)
        found: tuple[object, ...] = ()
    except TxclCompileError as err:
        found = err.problems
    assert found == expected
