"""regex.py: RE2 with flags, named groups, refusals with positions, and a quiet stderr."""

from __future__ import annotations

import subprocess
import sys

import pytest
import re2
from hypothesis import given
from hypothesis import strategies as st

from txcl import ast
from txcl.errors import Pos, TxclCompileError
from txcl.regex import compile_regex

AT = Pos("r.txcl", 1, 27)


def rx(pattern: str, flags: str = "") -> ast.Regex:
    return ast.Regex(pattern, flags, AT)


@pytest.mark.parametrize(
    ("pattern", "flags", "text", "expected"),
    [
        ("urgent", "", "this is URGENT", False),
        ("urgent", "i", "this is URGENT", True),
        ("^b$", "", "a\nb\nc", False),
        ("^b$", "m", "a\nb\nc", True),
        ("a.b", "", "a\nb", False),
        ("a.b", "s", "a\nb", True),
        ("^support@", "", "support@acme.example", True),
        ("^support@", "", "x-support@acme.example", False),
        ("example$", "", "acme.example", True),
        ("example$", "", "acme.example\n", False),  # RE2's $ is the very end without m
        (r"acme\.example", "", "acme.example", True),
        (r"acme\.example", "", "acmeXexample", False),
        (r"spf=pass", "", "mx; spf=pass smtp.mailfrom=x", True),
        ("é", "i", "CAFÉ", True),
        (r"\d+", "", "ticket 42", True),
    ],
)
def test_search(pattern: str, flags: str, text: str, expected: bool) -> None:
    assert compile_regex(rx(pattern, flags)).search(text) is expected


def test_named_groups() -> None:
    regex = compile_regex(rx(r"#(?P<num>\d+)(?: (?P<tag>\w+))?"))
    assert regex.group_names == ("num", "tag")
    assert regex.groups("Re: ticket #123 é") == {"num": "123"}
    assert regex.groups("#7 urgent") == {"num": "7", "tag": "urgent"}
    assert regex.groups("nothing") is None


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (
            r"(a)\1",
            r"RE2 cannot compile /(a)\1/: invalid escape sequence: \1 "
            "(backreferences are not supported by RE2; TXCL regexes run in linear time)",
        ),
        (
            "foo(?=bar)",
            "RE2 cannot compile /foo(?=bar)/: invalid perl operator: (?= "
            "(look-ahead is not supported by RE2; TXCL regexes run in linear time)",
        ),
        (
            "(?<!x)y",
            "RE2 cannot compile /(?<!x)y/: invalid perl operator: (?<! "
            "(look-behind is not supported by RE2; TXCL regexes run in linear time)",
        ),
        ("(", "RE2 cannot compile /(/: missing ): ("),
    ],
)
def test_refused_patterns_are_compile_errors_at_the_regex(pattern: str, message: str) -> None:
    with pytest.raises(TxclCompileError) as err:
        compile_regex(rx(pattern))
    assert str(err.value) == f"r.txcl:1:27: txcl_compile_error: {message}"


def test_unknown_flags_are_refused() -> None:
    with pytest.raises(TxclCompileError) as err:
        compile_regex(rx("a", "x"))
    assert err.value.problem.message == "regex flags 'x': only i, m and s, each at most once"


def test_refusing_a_pattern_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TxclCompileError):
        compile_regex(rx(r"(a)\1"))
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_stderr_stays_empty_in_a_fresh_process() -> None:
    code = (
        "from txcl import ast; from txcl.errors import Pos, TxclCompileError;"
        "from txcl.regex import compile_regex\n"
        "for p in ['(a)\\\\1', '(?=x)', '(']:\n"
        "    try: compile_regex(ast.Regex(p, '', Pos('f', 1, 1)))\n"
        "    except TxclCompileError: pass\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stderr == ""


def _reference(pattern: str, flags: str) -> re2._Regexp:
    options = re2.Options()
    options.log_errors = False
    prefix = f"(?{flags})" if flags else ""
    return re2.compile(prefix + pattern, options)


literal_patterns = st.builds(
    lambda caret, body, dollar: caret + body + dollar,
    st.sampled_from(["", "^"]),
    st.text(alphabet="abAB.@\\é", max_size=4),
    st.sampled_from(["", "$"]),
)


@given(literal_patterns, st.sampled_from(["", "i", "m", "im"]), st.text(alphabet="abAB.@\né", max_size=8))
def test_search_agrees_with_re2(pattern: str, flags: str, text: str) -> None:
    """The plain-string shortcut for literal patterns answers exactly what RE2 answers."""
    try:
        reference = _reference(pattern, flags)
    except re2.error:
        return
    expected = reference.search(text) is not None
    assert compile_regex(rx(pattern, flags)).search(text) is expected
