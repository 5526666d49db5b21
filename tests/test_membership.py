"""IN and NOT IN through the parser and the compiler: `a IN [b]` is `a == b` and
`a NOT IN [b]` is `a != b`, for every shape of value, constant or read from a path."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txcl import ast
from txcl.compiler import compile_file
from txcl.errors import Pos
from txcl.fmt import format_expr
from txcl.parser import parse

X = Pos("", 0, 0)

SCALARS = st.none() | st.booleans() | st.sampled_from([0, 1, 2.0, -1.5]) | st.text("ab", max_size=2)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("ab"), inner, max_size=2)
    ),
    max_leaves=6,
)
MAYBE_MISSING = st.none() | VALUES.map(lambda v: [v])  # None: the key is not there


def holds(expression: str, envelope: dict[str, Any]) -> bool:
    (rule,) = compile_file(parse(f"WHEN {expression}\nSET x.y = 1\n", "r.txcl"))
    return rule.test(envelope) is not None


def envelope(a: list[Any] | None, b: list[Any] | None) -> dict[str, Any]:
    s = {}
    if a is not None:
        s["a"] = a[0]
    if b is not None:
        s["b"] = b[0]
    return {"s": s}


@settings(deadline=None)  # the first example builds the parser
@given(MAYBE_MISSING, MAYBE_MISSING)
def test_in_a_one_path_list_agrees_with_equality(a: list[Any] | None, b: list[Any] | None) -> None:
    env = envelope(a, b)
    assert holds("s.a IN [s.b]", env) is holds("s.a == s.b", env)
    assert holds("s.a NOT IN [s.b]", env) is holds("s.a != s.b", env)


@settings(deadline=None)  # the first example builds the parser
@given(MAYBE_MISSING, SCALARS)
def test_in_a_constant_list_agrees_with_equality(a: list[Any] | None, constant: Any) -> None:
    env = envelope(a, None)
    text = format_expr(ast.Literal(constant, X))
    assert holds(f"s.a IN [{text}]", env) is holds(f"s.a == {text}", env)
    assert holds(f"s.a NOT IN [{text}]", env) is holds(f"s.a != {text}", env)
    assert holds(f"s.a NOT IN [{text}]", env) is holds(f"NOT s.a IN [{text}]", env)


@settings(deadline=None)  # the first example builds the parser
@given(MAYBE_MISSING, MAYBE_MISSING)
def test_in_a_list_read_from_a_path_is_equality_with_some_item(
    a: list[Any] | None, b: list[Any] | None
) -> None:
    env = envelope(a, b)
    items = env["s"].get("b")
    if not isinstance(items, list):
        assert holds("s.a IN s.b", env) is False
        return
    expected = any(holds("s.a == s.i", {"s": {**env["s"], "i": item}}) for item in items)
    assert holds("s.a IN s.b", env) is expected


RCPT = {"_txc": {"lmtp": {"rcpt": ["ap@globex.example", "bob@globex.example"]}}}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ('@lmtp.rcpt IN ["ap@globex.example"]', True),  # any recipient, as == says
        ('@lmtp.rcpt == "ap@globex.example"', True),
        ('@lmtp.rcpt IN ["carol@globex.example"]', False),
        ('@lmtp.rcpt NOT IN ["carol@globex.example"]', True),  # no recipient in the list
        ('@lmtp.rcpt NOT IN ["ap@globex.example", "x@y"]', False),
        ('@lmtp.mail.from NOT IN ["x@y"]', True),  # missing: NOT IN is true, like !=
        ('@lmtp.mail.from IN ["x@y"]', False),
    ],
)
def test_in_over_the_recipient_list(expression: str, expected: bool) -> None:
    assert holds(expression, RCPT) is expected
