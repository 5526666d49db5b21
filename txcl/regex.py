"""TXCL regexes: RE2 (google-re2), compiled once at load time, quiet, with positions.

RE2 runs in time linear in the input whatever a tenant writes. A pattern RE2 refuses
(backreferences, look-around) is a TxclCompileError at the regex's position; there is no
fallback to Python's backtracking `re`.

Matching goes through txcl/re2_fast.py (the RE2 object under google-re2's `re`-style
wrapper, called directly) when it can be set up, else through the wrapper's documented
`search` and `groupdict`, with the text passed as UTF-8 bytes; literal patterns are answered
with plain string operations (_literal_search).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Final

import re2

from txcl import ast, re2_fast
from txcl.errors import Pos, Problem, TxclCompileError
from txcl.re2_fast import Groups, Matchers, Search, encode

FLAGS: Final = frozenset("ims")

_META: Final = frozenset("\\.^$|?*+()[]{}")
_log = logging.getLogger(__name__)

_HINTS: Final = (
    ("invalid escape sequence: \\1", "backreferences are not supported by RE2"),
    ("invalid escape sequence: \\2", "backreferences are not supported by RE2"),
    ("invalid perl operator: (?=", "look-ahead is not supported by RE2"),
    ("invalid perl operator: (?!", "look-ahead is not supported by RE2"),
    ("invalid perl operator: (?<=", "look-behind is not supported by RE2"),
    ("invalid perl operator: (?<!", "look-behind is not supported by RE2"),
)


def _options() -> re2.Options:
    options = re2.Options()
    # RE2 otherwise prints every refused pattern on the process's stderr from C++.
    options.log_errors = False
    return options


@dataclass(frozen=True, slots=True)
class CompiledRegex:
    """A regex ready to match.

    search(text) -> bool: whether it matches anywhere in text (unanchored, like Perl's =~).
    groups(text) -> dict | None: None if no match, else the named groups that took part.
    """

    pattern: str
    flags: str
    pos: Pos
    group_names: tuple[str, ...]
    search: Search = field(repr=False, compare=False)
    groups: Groups = field(repr=False, compare=False)

    def __str__(self) -> str:
        return "/" + self.pattern.replace("/", "\\/") + "/" + self.flags


def stock_matchers(compiled: Any) -> Matchers:
    """search and groups through google-re2's documented API. A str pattern matches bytes
    text as UTF-8, which keeps lone surrogates matchable and skips the offset re-mapping."""
    find = compiled.search

    def search(text: str) -> bool:
        return find(encode(text)) is not None

    def groups(text: str) -> dict[str, str] | None:
        found = find(encode(text))
        if found is None:
            return None
        return {
            name: value.decode("utf-8", "replace")
            for name, value in found.groupdict().items()
            if value is not None
        }

    return search, groups


# Patterns and texts on which the fast path must answer what the documented API answers.
_SAMPLE_PATTERNS: Final = ("(?i)b(?P<x>é+)?(?P<y>z)?", "^$", "(?P<n>a*)")
_SAMPLE_TEXTS: Final = ("", "abÉÉc", "B", "\ud800b", "aa")


@functools.cache
def _use_fast_path() -> bool:
    """Whether txcl/re2_fast.py sets up against the installed google-re2 and agrees with
    the documented API on the samples."""
    try:
        for pattern in _SAMPLE_PATTERNS:
            compiled = re2.compile(pattern, _options())
            fast, stock = re2_fast.matchers(compiled), stock_matchers(compiled)
            for text in _SAMPLE_TEXTS:
                if any(f(text) != s(text) for f, s in zip(fast, stock, strict=True)):
                    _log.warning("matching through google-re2's API: re2_fast disagrees on %r", text)
                    return False
    except re2_fast.Unavailable as err:
        _log.info("matching through google-re2's API: %s", err)
        return False
    return True


def _matchers(compiled: Any) -> Matchers:
    if _use_fast_path():
        try:
            return re2_fast.matchers(compiled)
        except re2_fast.Unavailable:
            pass
    return stock_matchers(compiled)


def _literal(pattern: str) -> str | None:
    """The text a pattern matches literally (`acme\\.example`), or None if it is not one."""
    out = []
    escaped = False
    for char in pattern:
        if escaped:
            if char.isalnum() or not char.isascii():
                return None  # \d, \b, \x41, ...: a class or an escape with a meaning
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in _META:
            return None
        else:
            out.append(char)
    return None if escaped else "".join(out)


def _literal_search(pattern: str, flags: str, fallback: Search) -> Search:
    """A plain-string search for `lit`, `^lit`, `lit$` and `^lit$`, where RE2 is not needed.

    A call into RE2 has a fixed cost whatever the input; most rule regexes are
    literals, and `in`, startswith and endswith answer those exactly, in linear time. Without
    the m flag RE2's ^ and $ match only at the ends of the text. Case-insensitive literals
    take this path only for ASCII text (RE2's Unicode case folding is not Python's lower()).
    """
    start = pattern.startswith("^") and "m" not in flags
    end = pattern.endswith("$") and not pattern.endswith("\\$") and "m" not in flags
    core = pattern[1 if start else 0 : len(pattern) - 1 if end else len(pattern)]
    literal = _literal(core)
    if literal is None:
        return fallback
    if start and end:

        def test(text: str, lit: str) -> bool:
            return text == lit
    elif start:

        def test(text: str, lit: str) -> bool:
            return text.startswith(lit)
    elif end:

        def test(text: str, lit: str) -> bool:
            return text.endswith(lit)
    else:

        def test(text: str, lit: str) -> bool:
            return lit in text

    if "i" not in flags:
        return lambda text: test(text, literal)
    if not literal.isascii():
        return fallback
    folded = literal.lower()
    return lambda text: test(text.lower(), folded) if text.isascii() else fallback(text)


def compile_regex(regex: ast.Regex) -> CompiledRegex:
    """Compile with RE2; raise TxclCompileError (at the regex's position) if RE2 refuses."""
    bad = sorted(set(regex.flags) - FLAGS)
    if bad or len(set(regex.flags)) != len(regex.flags):
        raise TxclCompileError(
            Problem(
                "txcl_compile_error",
                f"regex flags {regex.flags!r}: only i, m and s, each at most once",
                regex.pos,
            )
        )
    try:
        names, search, groups = _compiled(regex.pattern, regex.flags)
    except re2.error as err:
        raise TxclCompileError(_refusal(regex, err)) from None
    return CompiledRegex(
        pattern=regex.pattern,
        flags=regex.flags,
        pos=regex.pos,
        group_names=names,
        search=search,
        groups=groups,
    )


def _written(regex: ast.Regex) -> str:
    return "/" + regex.pattern.replace("/", "\\/") + "/" + regex.flags


def _refusal(regex: ast.Regex, err: re2.error) -> Problem:
    """RE2's reason in TXCL's terms: about the regex as written (not the flag prefix
    _compiled adds), at the character RE2 names when it names one."""
    reason = err.args[0] if err.args else str(err)
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", "replace")
    what, _, fragment = str(reason).partition(": ")
    fragment = fragment.removeprefix(_flag_prefix(regex.flags))
    index = regex.pattern.find(fragment) if fragment and fragment != regex.pattern else -1
    if what == "trailing \\":
        index = len(regex.pattern) - 1
    pos = regex.pos
    if index >= 0:  # the column of that character in the source, where `/` is written `\/`
        offset = 1 + index + regex.pattern.count("/", 0, index)
        pos = Pos(pos.file, pos.line, pos.column + offset)
    message = f"RE2 cannot compile {_written(regex)}: {what}"
    if fragment:
        message += f": {fragment}"
    hint = next((h for start, h in _HINTS if f"{what}: {fragment}".startswith(start)), "")
    if hint:
        message += f" ({hint}; TXCL regexes run in linear time)"
    return Problem("txcl_compile_error", message, pos)


def _flag_prefix(flags: str) -> str:
    return f"(?{''.join(sorted(flags))})" if flags else ""


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str, flags: str) -> tuple[tuple[str, ...], Search, Groups]:
    """The named groups and matchers of a pattern, compiled once per (pattern, flags): an
    RE2 object is immutable, and the same regex recurs across the files of a tree."""
    compiled = re2.compile(_flag_prefix(flags) + pattern, _options())
    names = tuple(sorted(compiled.groupindex))
    search, groups = _matchers(compiled)
    return names, _literal_search(pattern, flags, search), groups
