"""values.py: MISSING, strict comparisons across types, existential lists, + and truth."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txcl.compiler import compile_file
from txcl.parser import parse
from txcl.values import (
    COMPARISONS,
    MISSING,
    add,
    contained_in,
    equals,
    json_problem,
    not_contained_in,
    not_equals,
    same,
    to_json,
)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
any_value = st.one_of(json_values, st.just(MISSING), st.tuples(json_scalars, json_scalars))


class TestMissing:
    def test_missing_is_a_singleton_checked_with_is(self) -> None:
        assert MISSING is MISSING
        assert MISSING is not None
        assert repr(MISSING) == "MISSING"

    @pytest.mark.parametrize("op", ["==", "<", "<=", ">", ">=", "IN"])
    @pytest.mark.parametrize("other", [None, 0, "", [], {}, MISSING])
    def test_every_comparison_with_missing_is_false(self, op: str, other: object) -> None:
        assert COMPARISONS[op](MISSING, other) is False
        assert COMPARISONS[op](other, MISSING) is False

    def test_not_equals_is_true_on_missing(self) -> None:
        assert not_equals(MISSING, "x") is True
        assert not_equals("x", MISSING) is True

    def test_missing_is_not_null(self) -> None:
        assert equals(MISSING, None) is False
        assert equals(None, None) is True


EQUALITY = [
    pytest.param(1, 1, True, id="same int"),
    pytest.param(1, 1.0, True, id="int and float are both numbers"),
    pytest.param(1, True, False, id="bool is not a number"),
    pytest.param(0, False, False, id="0 is not false"),
    pytest.param("1", 1, False, id="string is not a number"),
    pytest.param(None, False, False, id="null is not false"),
    pytest.param([1, 2], [1, 2], True, id="lists equal element-wise"),
    pytest.param([1], [True], False, id="lists are strict about kinds too"),
    pytest.param({"a": 1}, {"a": 1}, True, id="objects"),
    pytest.param({"a": 1}, {"a": True}, False, id="objects are strict about kinds"),
    pytest.param(["a", "b"], "b", True, id="a list against a scalar is existential"),
    pytest.param(["a", "b"], "c", False, id="no element equal"),
    pytest.param([], "a", False, id="empty list has no element"),
    pytest.param(("x", "y"), "y", True, id="multi-valued path is existential"),
    pytest.param((), "y", False, id="a JSONPath that found nothing"),
]


@pytest.mark.parametrize(("left", "right", "expected"), EQUALITY)
def test_equality(left: object, right: object, expected: bool) -> None:
    assert equals(left, right) is expected
    assert not_equals(left, right) is (not expected)


ORDERING = [
    pytest.param("<", 1, 2, True, id="numbers"),
    pytest.param("<", 1.5, 2, True, id="float and int"),
    pytest.param("<", "a", "b", True, id="strings"),
    pytest.param("<", "1", 2, False, id="string and number are not ordered"),
    pytest.param("<", True, 2, False, id="bool is not ordered"),
    pytest.param(">=", 2, 2, True, id=">= equal"),
    pytest.param(">", None, 0, False, id="null is not ordered"),
    pytest.param(">", [3], 1, False, id="a JSON list is not ordered"),
    pytest.param(">", (1, 3000), 1000, True, id="a multi-valued path is existential"),
]


@pytest.mark.parametrize(("op", "left", "right", "expected"), ORDERING)
def test_ordering(op: str, left: object, right: object, expected: bool) -> None:
    assert COMPARISONS[op](left, right) is expected


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        ("a", ["a", "b"], True),
        ("c", ["a", "b"], False),
        (1, [True], False),
        ("a", "abc", False),  # IN is list membership, not substring
        (("x", "b"), ["a", "b"], True),
        ("b", ("a", "b"), True),
        # a list on the left is existential, as with ==
        (["x", "b"], ["a", "b"], True),
        (["x", "y"], ["a", "b"], False),
        ([], ["a", "b"], False),  # an empty list has no element in anything
        ([], [[]], True),  # ... but it equals an empty list, as [] == [] does
        ([1, 2], [[1, 2]], True),
        (MISSING, ["a"], False),
        (MISSING, [], False),
        ("a", [], False),
        ("a", MISSING, False),
    ],
)
def test_in(left: object, right: object, expected: bool) -> None:
    assert contained_in(left, right) is expected
    assert not_contained_in(left, right) is not expected


@given(any_value, any_value)
def test_in_a_one_item_list_is_equality(left: object, right: object) -> None:
    assert contained_in(left, [right]) is equals(left, right)
    assert not_contained_in(left, [right]) is not_equals(left, right)


@given(any_value, st.lists(any_value, max_size=3))
def test_in_is_equality_with_some_item(left: object, items: list[object]) -> None:
    assert contained_in(left, items) is any(equals(left, item) for item in items)
    assert contained_in(left, tuple(items)) is contained_in(left, items)


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        (1, 2, 3),
        (1.5, 1, 2.5),
        ("a", "b", "ab"),
        ("a", 1, MISSING),
        (True, 1, MISSING),
        (MISSING, 1, MISSING),
        ([1], [2], MISSING),
    ],
)
def test_add(left: object, right: object, expected: object) -> None:
    assert add(left, right) == expected if expected is not MISSING else add(left, right) is MISSING


@pytest.mark.parametrize(
    ("value", "holds"),
    [(True, True), (1, False), ("true", False), ([True], False), (None, False), (False, False)],
)
def test_only_true_is_true(value: object, holds: bool) -> None:
    """A WHEN (the compiler's `is True`) holds only on the boolean true; NOT of anything
    else holds."""
    (rule,) = compile_file(parse("WHEN s.v\nWHEN NOT NOT s.v\nSET x.y = 1\n", "t.txcl"))
    assert (rule.test({"s": {"v": value}}) is not None) is holds
    (negated,) = compile_file(parse("WHEN NOT s.v\nSET x.y = 1\n", "t.txcl"))
    assert (negated.test({"s": {"v": value}}) is not None) is not holds
    assert negated.test({"s": {}}) is not None  # missing


def test_to_json_turns_multi_into_list() -> None:
    assert to_json(("a", "b")) == ["a", "b"]
    assert to_json({"a": 1}) == {"a": 1}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"a": [1, 2.5, None, True, "x"]}, None),
        ({"a": float("nan")}, "nan is not a JSON number"),
        ({1: "a"}, "object key 1 is not a string"),
        ({"a": {1, 2}}, "a set is not JSON"),
    ],
)
def test_json_problem(value: object, problem: str | None) -> None:
    assert json_problem(value) == problem


@given(any_value, any_value)
def test_not_equals_is_the_exact_negation(left: object, right: object) -> None:
    assert not_equals(left, right) is (not equals(left, right))


@given(any_value, any_value)
def test_comparisons_never_raise_and_return_bools(left: object, right: object) -> None:
    for compare in COMPARISONS.values():
        assert compare(left, right) in (True, False)


@given(json_values)
def test_same_is_reflexive(value: object) -> None:
    assert same(value, value)
