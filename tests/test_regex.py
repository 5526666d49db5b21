"""regex.py: RE2 with flags, named groups, refusals with positions, and a quiet stderr."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import re2
from hypothesis import given
from hypothesis import strategies as st

from txcl import ast, re2_fast, regex
from txcl.errors import Pos, TxclCompileError
from txcl.regex import compile_regex

AT = Pos("r.txcl", 1, 27)
VERIFIED_RE2 = re2_fast.VERIFIED_RE2


def _clear_caches() -> None:
    regex._compiled.cache_clear()
    regex._use_fast_path.cache_clear()
    re2_fast._unanchored.cache_clear()


@pytest.fixture(scope="module", autouse=True, params=["fast", "stock"])
def match_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test of this module runs twice: matching through txcl/re2_fast.py, and through
    google-re2's documented API, as when the fast path cannot be set up (here: google-re2
    outside its range)."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "stock":
            patch.setattr(re2_fast, "VERIFIED_RE2", ((0, 0), (0, 1)))
        _clear_caches()
        assert regex._use_fast_path() == (request.param == "fast")
        yield request.param
    _clear_caches()


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
    ("pattern", "column", "message"),
    [
        (
            r"(a)\1",
            31,  # the regex starts at 27; the caret goes under the \1 RE2 names
            r"RE2 cannot compile /(a)\1/: invalid escape sequence: \1 "
            "(backreferences are not supported by RE2; TXCL regexes run in linear time)",
        ),
        (
            "foo(?=bar)",
            31,
            "RE2 cannot compile /foo(?=bar)/: invalid perl operator: (?= "
            "(look-ahead is not supported by RE2; TXCL regexes run in linear time)",
        ),
        (
            "(?<!x)y",
            28,
            "RE2 cannot compile /(?<!x)y/: invalid perl operator: (?<! "
            "(look-behind is not supported by RE2; TXCL regexes run in linear time)",
        ),
        ("(", 27, "RE2 cannot compile /(/: missing ): ("),  # RE2 names the whole regex
        ("a/b**", 32, "RE2 cannot compile /a\\/b**/: bad repetition operator: **"),
    ],
)
def test_refused_patterns_are_compile_errors_at_the_regex(
    pattern: str, column: int, message: str
) -> None:
    with pytest.raises(TxclCompileError) as err:
        compile_regex(rx(pattern))
    assert str(err.value) == f"r.txcl:1:{column}: txcl_compile_error: {message}"


def test_refusals_speak_of_the_regex_as_written_with_its_flags() -> None:
    with pytest.raises(TxclCompileError) as err:
        compile_regex(rx("x(a", "is"))
    assert err.value.problem.message == "RE2 cannot compile /x(a/is: missing ): x(a"


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


# --- the fast path answers what google-re2's documented API answers --------------------------

patterns = st.builds(
    "".join,
    st.lists(
        st.sampled_from(["a", "b", "é", ".", "^", "$", "(?P<x>a*)", "(?P<y>é|b)?", "[ab]", "\\b"]),
        max_size=5,
    ),
)


@given(patterns, st.sampled_from(["", "i", "m", "s", "ims"]), st.text(alphabet="abAÉé\n\ud800 ", max_size=8))
def test_fast_path_and_documented_api_agree(pattern: str, flags: str, text: str) -> None:
    compiled = _reference(pattern, flags)
    if not regex._use_fast_path():
        return  # this round has no fast path to compare (the suite runs again with it)
    fast = re2_fast.matchers(compiled)
    stock = regex.stock_matchers(compiled)
    assert fast[0](text) == stock[0](text)
    assert fast[1](text) == stock[1](text)


def test_a_google_re2_outside_the_verified_range_matches_through_its_api(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(re2_fast, "VERIFIED_RE2", ((9, 0), (9, 1)))
    _clear_caches()
    caplog.set_level("INFO", logger="txcl.regex")
    assert not regex._use_fast_path()
    assert "outside" in caplog.text
    assert compile_regex(rx("(?P<n>x+)", "i")).groups("aXx") == {"n": "Xx"}
    _clear_caches()


def test_google_re2_internals_that_moved_are_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(re2_fast, "VERIFIED_RE2", VERIFIED_RE2)
    monkeypatch.setitem(sys.modules, "re2._re2", None)  # the import fails
    _clear_caches()
    with pytest.raises(re2_fast.Unavailable, match="internals moved"):
        re2_fast.matchers(_reference("a", ""))
    assert not regex._use_fast_path()
    _clear_caches()


def test_a_fast_path_that_disagrees_on_the_samples_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(re2_fast, "VERIFIED_RE2", VERIFIED_RE2)
    monkeypatch.setattr(re2_fast, "matchers", lambda compiled: (lambda t: True, lambda t: {}))
    _clear_caches()
    assert not regex._use_fast_path()
    assert "disagrees" in caplog.text
    _clear_caches()
