"""txcl/jsonpath_fast.py, both ways: reading jsonpath-ng's parsed tree, and (for a
jsonpath-ng outside the verified range) the documented find() and a text check for `=~`."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonpath_ng.ext.parser import ExtendedJsonPathParser

from txcl import ast, jsonpath_fast
from txcl.errors import Pos, TxclCompileError
from txcl.paths import compile_jsonpath

HERE = Pos("r.txcl", 1, 6)
VERIFIED_JSONPATH = jsonpath_fast.VERIFIED_JSONPATH


@pytest.fixture(scope="module", autouse=True, params=["fast", "stock"])
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "stock":
            patch.setattr(jsonpath_fast, "VERIFIED_JSONPATH", ((0, 0), (0, 1)))
        jsonpath_fast._internals.cache_clear()
        assert (jsonpath_fast._internals() is not None) == (request.param == "fast")
        yield request.param
    jsonpath_fast._internals.cache_clear()


KEYS = st.sampled_from(["a", "b", "x-y"])
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(allow_nan=False)
    | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=12,
)
STEPS = st.lists(
    st.sampled_from([".a", ".b", '."x-y"', "[*]", "[0]", "..a", "[?(@.a)]"]), max_size=4
)


@given(JSON, STEPS)
def test_every_path_finds_what_jsonpath_ng_finds(doc: object, steps: list[str]) -> None:
    text = "$" + "".join(steps)
    expected = tuple(m.value for m in ExtendedJsonPathParser().parse(text).find(doc))
    assert compile_jsonpath(ast.JsonPath(text, HERE))(doc) == expected


def test_plain_paths_take_the_shortcut_only_with_a_known_jsonpath_ng(mode: str) -> None:
    def general(doc: object) -> tuple[object, ...]:
        return ()

    parsed = ExtendedJsonPathParser().parse("$.a.\"x-y\".b")
    assert (jsonpath_fast.plain_getter(parsed, general) is general) == (mode == "stock")
    filtered = ExtendedJsonPathParser().parse("$.a[?(@.b == 1)]")
    assert jsonpath_fast.plain_getter(filtered, general) is general


@pytest.mark.parametrize("text", ["$.a[?(@.x =~ 'a+')]", "$..b[?(@.c =~ '(x+)+y')].d"])
def test_regex_filters_are_refused(text: str) -> None:
    with pytest.raises(TxclCompileError) as err:
        compile_jsonpath(ast.JsonPath(text, HERE))
    assert "backtracking" in err.value.problem.message


def test_without_the_tree_a_regex_in_a_quoted_key_is_refused_too(mode: str) -> None:
    text = "$.'a =~ b'"
    if mode == "fast":
        compile_jsonpath(ast.JsonPath(text, HERE))  # a key, not a filter
    else:
        with pytest.raises(TxclCompileError):
            compile_jsonpath(ast.JsonPath(text, HERE))


def test_internals_that_moved_are_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonpath_fast, "VERIFIED_JSONPATH", VERIFIED_JSONPATH)
    monkeypatch.setitem(sys.modules, "jsonpath_ng.ext.filter", None)  # the import fails
    jsonpath_fast._internals.cache_clear()
    assert jsonpath_fast._internals() is None
    assert jsonpath_fast.uses_python_regex(object(), "$.a[?(@.x =~ 'a')]")
    jsonpath_fast._internals.cache_clear()
