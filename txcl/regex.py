"""TXCL regexes: RE2 (google-re2), compiled once at load time, quiet, with positions.

RE2 runs in time linear in the input whatever a tenant writes. A pattern RE2 refuses
(backreferences, look-around) is a TxclCompileError at the regex's position; there is no
fallback to Python's backtracking `re`.

Matching goes straight to the RE2 object under google-re2's `re`-style wrapper: the
wrapper re-maps byte offsets to str offsets on every call, which costs four times the
match itself; TXCL only needs whether it matched and the text of the named groups.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import re2

from txcl import ast
from txcl.errors import Pos, Problem, TxclCompileError

FLAGS: Final = frozenset("ims")

_UNANCHORED: Final = re2._re2.RE2.Anchor.UNANCHORED
_NO_MATCH: Final = (-1, -1)
_META: Final = frozenset("\\.^$|?*+()[]{}")

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


def _encode(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # lone surrogates, e.g. from surrogateescape'd headers
        return text.encode("utf-8", "surrogatepass")


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
    search: Callable[[str], bool] = field(repr=False, compare=False)
    groups: Callable[[str], dict[str, str] | None] = field(repr=False, compare=False)

    def __str__(self) -> str:
        return "/" + self.pattern.replace("/", "\\/") + "/" + self.flags


def _re2_search(raw: Any) -> Callable[[str], bool]:
    match = raw.Match

    def search(text: str) -> bool:
        data = _encode(text)
        return match(_UNANCHORED, data, 0, len(data))[0] != _NO_MATCH

    return search


def _re2_groups(raw: Any) -> Callable[[str], dict[str, str] | None]:
    match = raw.Match
    index = tuple(
        (n.decode() if isinstance(n, bytes) else n, i) for n, i in raw.NamedCapturingGroups()
    )

    def groups(text: str) -> dict[str, str] | None:
        data = _encode(text)
        spans = match(_UNANCHORED, data, 0, len(data))
        if spans[0] == _NO_MATCH:
            return None
        found: dict[str, str] = {}
        for name, number in index:
            start, end = spans[number]
            if start >= 0:
                found[name] = data[start:end].decode("utf-8", "replace")
        return found

    return groups


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


def _literal_search(
    pattern: str, flags: str, fallback: Callable[[str], bool]
) -> Callable[[str], bool]:
    """A plain-string search for `lit`, `^lit`, `lit$` and `^lit$`, where RE2 is not needed.

    Calling into RE2 costs about two microseconds whatever the input; most rule regexes are
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
        reason = err.args[0] if err.args else str(err)
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        hint = next((h for prefix_, h in _HINTS if str(reason).startswith(prefix_)), "")
        message = f"RE2 cannot compile /{regex.pattern}/: {reason}"
        if hint:
            message += f" ({hint}; TXCL regexes run in linear time)"
        raise TxclCompileError(Problem("txcl_compile_error", message, regex.pos)) from None
    return CompiledRegex(
        pattern=regex.pattern,
        flags=regex.flags,
        pos=regex.pos,
        group_names=names,
        search=search,
        groups=groups,
    )


@functools.lru_cache(maxsize=4096)
def _compiled(
    pattern: str, flags: str
) -> tuple[tuple[str, ...], Callable[[str], bool], Callable[[str], dict[str, str] | None]]:
    """The named groups and matchers of a pattern, compiled once per (pattern, flags): an
    RE2 object is immutable, and the same regex recurs across the files of a tree."""
    prefix = f"(?{''.join(sorted(flags))})" if flags else ""
    compiled = re2.compile(prefix + pattern, _options())
    raw = compiled._regexp
    names = tuple(
        sorted(n.decode() if isinstance(n, bytes) else n for n, _ in raw.NamedCapturingGroups())
    )
    return names, _literal_search(pattern, flags, _re2_search(raw)), _re2_groups(raw)
