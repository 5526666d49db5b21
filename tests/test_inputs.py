"""txcl.inputs: bounded reading of files and documents, and terminal-safe text."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txcl.inputs import (
    MAX_DEPTH,
    InputError,
    TooLarge,
    check_tree,
    load_json,
    load_json_object,
    load_yaml,
    parse_json,
    read_bytes,
    read_text,
    terminal_json,
    terminal_text,
)

pytestmark = pytest.mark.abuse

UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_a_regular_file_is_read_up_to_its_limit(tmp_path: Path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_bytes(path, limit=100) == b"x" * 100
    with pytest.raises(TooLarge) as too_big:
        read_bytes(path, limit=99)
    assert (too_big.value.size, too_big.value.limit) == (100, 99)
    assert str(too_big.value) == f"{path}: 100 bytes; the limit is 99 bytes"


@pytest.mark.parametrize("kind", ["fifo", "folder", "device", "missing", "loop"])
def test_anything_but_a_regular_file_is_refused_without_reading(tmp_path: Path, kind: str):
    path = tmp_path / "x"
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer
    elif kind == "folder":
        path.mkdir()
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "loop":
        path.symlink_to(path)
    says = {"fifo": "not a regular file: a FIFO", "folder": "not a regular file: a folder",
            "device": "not a regular file: a character device",
            "missing": "cannot be read: No such file", "loop": "cannot be read: a symlink loop"}
    with pytest.raises(InputError, match=re.escape(f"{path}: {says[kind]}")):
        read_bytes(path)


def test_text_is_utf8_without_a_byte_order_mark(tmp_path: Path):
    path = tmp_path / "t"
    path.write_bytes("\ufeffhé".encode())
    assert read_text(path) == "hé"
    path.write_bytes(b"ok\nab\xff")
    with pytest.raises(InputError) as bad:
        read_text(path)
    assert (bad.value.line, bad.value.column) == (2, 3)
    assert str(bad.value) == f"{path}:2:3: not UTF-8 text: byte 0xff"


def test_json_is_bounded_in_depth_whether_the_parser_recurses_or_not(tmp_path: Path):
    assert parse_json(nested(MAX_DEPTH), "x") is not None
    for depth in (MAX_DEPTH + 1, 900, 5000, 100_000):
        with pytest.raises(InputError, match=f"x: nested more than {MAX_DEPTH} levels deep"):
            parse_json(nested(depth), "x")


def test_json_errors_name_the_line_and_column(tmp_path: Path):
    path = tmp_path / "e.json"
    path.write_text('{"a":\n  nope}')
    with pytest.raises(InputError) as bad:
        load_json(path)
    assert str(bad.value).startswith(f"{path}:2:3: not valid JSON")
    path.write_text("[1]")
    assert load_json(path) == [1]
    with pytest.raises(InputError, match="not a JSON object but a list"):
        load_json_object(path)


def test_check_tree_stops_cycles_and_expansions():
    cyclic: dict = {}
    cyclic["self"] = cyclic
    with pytest.raises(InputError, match="or cyclic"):
        check_tree(cyclic, "env")
    shared: list = ["x"] * 10
    for _ in range(7):  # ten to the eighth leaves, as JSON output would write them
        shared = [shared] * 10
    with pytest.raises(InputError, match="too large"):
        check_tree(shared, "env")
    check_tree({"a": [1, {"b": None}], "c": "d"}, "env")


def test_yaml_aliases_are_bounded_as_they_expand(tmp_path: Path):
    path = tmp_path / "laughs.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="too large"):
        load_yaml(path)
    path.write_text("a: &a [*a]\n")
    with pytest.raises(InputError, match="cyclic"):
        load_yaml(path)
    path.write_text("name: [\n")
    with pytest.raises(InputError, match=r"laughs.yaml:2:1: not valid YAML"):
        load_yaml(path)


@given(st.text())
def test_terminal_text_leaves_no_control_character_but_the_kept_newline(text: str):
    shown = terminal_text(text)
    assert not UNSAFE.search(shown.replace("\n", ""))
    assert shown.count("\n") == text.count("\n")
    assert not UNSAFE.search(terminal_text(text, keep=""))


@given(st.text().filter(lambda t: not UNSAFE.search(t)))
def test_terminal_text_leaves_safe_text_alone(text: str):
    assert terminal_text(text, keep="") == text


def test_terminal_text_escapes_visibly():
    assert terminal_text("a\x1b[31mb\r\x00\x9b\u202ec\n") == "a\\e[31mb\\r\\x00\\x9b\\u202ec\n"
    assert terminal_text("a\nb\tc", keep="") == "a\\nb\\tc"


def test_an_input_error_is_one_line_whatever_the_file_is_called(tmp_path: Path):
    path = tmp_path / "evil\n\x1b[2Jname"
    with pytest.raises(InputError) as bad:
        read_bytes(path)
    assert "\n" not in str(bad.value) and "\x1b" not in str(bad.value)
    assert json.dumps(str(bad.value))  # printable as it is


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_terminal_json_is_the_same_document_without_control_characters(value: object):
    text = terminal_json(value)
    assert json.loads(text) == value
    assert not UNSAFE.search(text.replace("\n", ""))


def test_a_case_built_in_code_with_a_cyclic_envelope_fails_clearly(tmp_path: Path):
    from txcl.cases import Case, run_case
    from txcl.errors import Pos
    from txcl.runner import Stack

    envelope: dict = {"_txc": {"src": "lmtp"}}
    envelope["_txc"]["self"] = envelope
    case = Case(tmp_path / "c.yaml", "cyclic", envelope, {}, {}, Pos("c.yaml", 1, 1))
    result = run_case(case, Stack("acme/_mail", ()))
    assert not result.passed and result.problem is not None
    assert "nested more than 100 levels deep (or cyclic)" in result.problem.message
