"""TXCL regexes: RE2 (google-re2), compiled once at load time, quiet, with positions.

RE2 runs in time linear in the input whatever a tenant writes. A pattern RE2 refuses
(backreferences, look-around) is a TxclCompileError at the regex's position; there is no
fallback to Python's backtracking `re`.

Matching goes straight to the RE2 object under google-re2's `re`-style wrapper: the
wrapper re-maps byte offsets to str offsets on every call, which costs four times the
match itself; TXCL only needs whether it matched and the text of the named groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import re2

from txcl import ast
from txcl.errors import Pos, Problem, TxclCompileError

FLAGS: Final = frozenset("ims")

_UNANCHORED: Final = re2._re2.RE2.Anchor.UNANCHORED
_NO_MATCH: Final = (-1, -1)

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
    return text.encode("utf-8", "surrogatepass")


@dataclass(frozen=True, slots=True)
class CompiledRegex:
    """A regex ready to match: `search(text)` and `groups(text)` take a str."""

    pattern: str
    flags: str
    pos: Pos
    group_names: tuple[str, ...]
    _re: Any = field(repr=False, compare=False)
    _group_index: tuple[tuple[str, int], ...] = field(repr=False, compare=False)

    def search(self, text: str) -> bool:
        """Whether the regex matches anywhere in text (unanchored, like Perl's =~)."""
        data = _encode(text)
        return self._re.Match(_UNANCHORED, data, 0, len(data))[0] != _NO_MATCH

    def groups(self, text: str) -> dict[str, str] | None:
        """None if no match, else the named groups that took part in the match."""
        data = _encode(text)
        spans = self._re.Match(_UNANCHORED, data, 0, len(data))
        if spans[0] == _NO_MATCH:
            return None
        found: dict[str, str] = {}
        for name, index in self._group_index:
            start, end = spans[index]
            if start >= 0:
                found[name] = data[start:end].decode("utf-8", "replace")
        return found

    def __str__(self) -> str:
        return "/" + self.pattern.replace("/", "\\/") + "/" + self.flags


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
    prefix = f"(?{''.join(sorted(regex.flags))})" if regex.flags else ""
    try:
        compiled = re2.compile(prefix + regex.pattern, _options())
    except re2.error as err:
        reason = err.args[0] if err.args else str(err)
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        hint = next((h for prefix_, h in _HINTS if str(reason).startswith(prefix_)), "")
        message = f"RE2 cannot compile /{regex.pattern}/: {reason}"
        if hint:
            message += f" ({hint}; TXCL regexes run in linear time)"
        raise TxclCompileError(Problem("txcl_compile_error", message, regex.pos)) from None
    raw = compiled._regexp
    index = tuple(
        sorted(
            ((name.decode() if isinstance(name, bytes) else name), number)
            for name, number in raw.NamedCapturingGroups()
        )
    )
    return CompiledRegex(
        pattern=regex.pattern,
        flags=regex.flags,
        pos=regex.pos,
        group_names=tuple(name for name, _ in index),
        _re=raw,
        _group_index=index,
    )
