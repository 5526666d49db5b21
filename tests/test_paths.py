"""paths.py: getters, JSONPath, the path-copying setter and RFC 7386 merge patches."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txcl import ast
from txcl.errors import Pos, TxclCompileError
from txcl.paths import (
    MAX_LIST_INDEX,
    PathWriteError,
    compile_getter,
    compile_jsonpath,
    compile_setter,
    merge_patch,
)
from txcl.values import MISSING

HERE = Pos("r.txcl", 1, 6)


def path(*segments: str | int) -> ast.Path:
    return ast.Path(tuple(segments), HERE)


DOC = {
    "_txc": {
        "lmtp": {
            "rcpt": ["a@x", "b@x"],
            "msg": {"headers": {"x-odd.key": ["1"], "authentication-results": []}},
            "n": None,
        }
    },
    "ticket": {"id": 7},
}


@pytest.mark.parametrize(
    ("segments", "expected"),
    [
        (("_txc", "lmtp", "rcpt", 1), "b@x"),
        (("_txc", "lmtp", "rcpt"), ["a@x", "b@x"]),
        (("_txc", "lmtp", "msg", "headers", "x-odd.key", 0), "1"),
        (("ticket", "id"), 7),
        (("_txc", "lmtp", "n"), None),
        (("_txc", "lmtp", "rcpt", 2), MISSING),
        (("_txc", "lmtp", "msg", "headers", "authentication-results", 0), MISSING),
        (("_txc", "lmtp", "rcpt", "0"), MISSING),  # a str key never indexes a list
        (("ticket", "id", "x"), MISSING),
        (("_txc", "lmtp", "rcpt", 0, 0), MISSING),  # an index never reaches into a string
        (("nothing",), MISSING),
    ],
)
def test_getter(segments: tuple[str | int, ...], expected: object) -> None:
    got = compile_getter(path(*segments))(DOC)
    assert got is expected if expected is MISSING else got == expected


def test_getter_on_a_non_object_is_missing() -> None:
    get = compile_getter(path("a"))
    assert get([1]) is MISSING
    assert get("a") is MISSING


def test_jsonpath_yields_every_value() -> None:
    get = compile_jsonpath(ast.JsonPath("$._txc.lmtp.rcpt[*]", HERE))
    assert get(DOC) == ("a@x", "b@x")
    assert get({}) == ()


KEYS = st.sampled_from(["a", "b", "x-y"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=12,
)
PLAIN_STEPS = st.lists(st.sampled_from([".a", ".b", '."x-y"', "[*]"]), max_size=4)


@given(JSON, PLAIN_STEPS)
def test_plain_jsonpaths_find_what_jsonpath_ng_finds(doc: object, steps: list[str]) -> None:
    from jsonpath_ng.ext.parser import ExtendedJsonPathParser

    text = "$" + "".join(steps)
    expected = tuple(m.value for m in ExtendedJsonPathParser().parse(text).find(doc))
    assert compile_jsonpath(ast.JsonPath(text, HERE))(doc) == expected


def test_invalid_jsonpath_is_a_compile_error_at_its_position() -> None:
    with pytest.raises(TxclCompileError) as err:
        compile_jsonpath(ast.JsonPath("$.[[", HERE))
    assert err.value.problem.pos == HERE
    assert err.value.problem.message.startswith("invalid JSONPath '$.[['")


def test_jsonpath_regex_filters_are_refused() -> None:
    with pytest.raises(TxclCompileError) as err:
        compile_jsonpath(ast.JsonPath("$.a[?(@.x =~ 'a+')]", HERE))
    assert "backtracking" in err.value.problem.message


class TestSetter:
    def test_set_does_not_mutate_the_input(self) -> None:
        before = copy.deepcopy(DOC)
        out = compile_setter(path("_txc", "lmtp", "res", "code"))(DOC, 250)
        assert before == DOC
        assert out["_txc"]["lmtp"]["res"] == {"code": 250}
        # containers off the written path are shared, not copied
        assert out["_txc"]["lmtp"]["msg"] is DOC["_txc"]["lmtp"]["msg"]
        assert out["ticket"] is DOC["ticket"]

    def test_list_slots_are_padded_with_null(self) -> None:
        out = compile_setter(path("res", "recipients", 1, "code"))({"res": {"recipients": []}}, 250)
        assert out == {"res": {"recipients": [None, {"code": 250}]}}

    def test_missing_containers_are_created(self) -> None:
        out = compile_setter(path("a", 0, "b"))({}, "x")
        assert out == {"a": [{"b": "x"}]}

    def test_a_null_slot_becomes_a_container(self) -> None:
        out = compile_setter(path("a", 0, "code"))({"a": [None]}, 250)
        assert out == {"a": [{"code": 250}]}

    def test_writing_a_key_into_a_string_is_an_error(self) -> None:
        with pytest.raises(PathWriteError) as err:
            compile_setter(path("ticket", "id", "x"))(DOC, 1)
        assert str(err.value) == "cannot write ticket.id.x: ticket.id is a number, not an object"

    def test_writing_an_index_into_an_object_is_an_error(self) -> None:
        with pytest.raises(PathWriteError) as err:
            compile_setter(path("ticket", 0))(DOC, 1)
        assert str(err.value) == "cannot write ticket.0: ticket is an object, not a list"

    def test_huge_indexes_are_refused_at_load_time(self) -> None:
        with pytest.raises(TxclCompileError) as err:
            compile_setter(path("a", MAX_LIST_INDEX + 1))
        assert err.value.problem.pos == HERE


# RFC 7386 appendix A, row by row.
RFC7386 = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "expected"), RFC7386)
def test_merge_patch_rfc7386(target: object, patch: object, expected: object) -> None:
    assert merge_patch(target, patch) == expected


json_docs = st.recursive(
    st.one_of(st.none(), st.integers(), st.text(max_size=3)),
    lambda inner: st.dictionaries(st.sampled_from("abc"), inner, max_size=3),
    max_leaves=10,
)


@given(json_docs, json_docs)
def test_merge_patch_never_mutates_its_arguments(target: object, patch: object) -> None:
    target_before, patch_before = copy.deepcopy(target), copy.deepcopy(patch)
    merge_patch(target, patch)
    assert target == target_before
    assert patch == patch_before


@given(
    st.sampled_from("ab"),
    st.lists(st.one_of(st.sampled_from("ab"), st.integers(0, 3)), max_size=4),
)
def test_what_is_set_is_what_is_read(first: str, rest: list[str | int]) -> None:
    target = path(first, *rest)
    out = compile_setter(target)({}, "v")
    assert compile_getter(target)(out) == "v"


def _walk(doc: object, segments: tuple[str | int, ...]) -> object:
    """What a getter reads, one step at a time, as the module docstring says."""
    for seg in segments:
        if isinstance(seg, int):
            if not isinstance(doc, list) or not -len(doc) <= seg < len(doc):
                return MISSING
        elif not isinstance(doc, dict) or seg not in doc:
            return MISSING
        doc = doc[seg]
    return doc


PATHS = st.lists(st.one_of(st.sampled_from("ab"), st.integers(0, 2)), min_size=1, max_size=7)


@given(JSON, PATHS)
def test_getters_read_what_a_step_by_step_walk_reads(doc: object, segments: list[str | int]
                                                     ) -> None:
    # Paths of every length: the short all-key ones are read by subscripts written out.
    got = compile_getter(path(*segments))(doc)
    expected = _walk(doc, tuple(segments))
    assert got is expected if expected is MISSING else got == expected


def _blocked(doc: object, segments: tuple[str | int, ...]) -> bool:
    """Whether a container on the way is of the wrong kind for its next segment; from a
    missing or null one on, the setter makes what it needs."""
    for i, seg in enumerate(segments):
        node = _walk(doc, segments[:i])
        if node is MISSING or node is None:
            return False
        if not isinstance(node, list if isinstance(seg, int) else dict):
            return True
    return False


@given(st.dictionaries(KEYS, JSON, max_size=3), PATHS)
def test_setters_write_the_path_or_refuse_a_container_of_the_wrong_kind(
    doc: dict[str, object], segments: list[str | int]
) -> None:
    before = copy.deepcopy(doc)
    target = path(*segments)
    try:
        out = compile_setter(target)(doc, "v")
    except PathWriteError:
        assert _blocked(doc, tuple(segments))
    else:
        assert not _blocked(doc, tuple(segments))
        assert compile_getter(target)(out) == "v"
    assert doc == before  # never mutated
