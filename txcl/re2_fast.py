"""The fast match path of TXCL regexes: google-re2's RE2 object called directly.

google-re2's documented `re`-style API re-maps byte offsets to str offsets and builds a match
object on every call; TXCL only needs whether a regex matched and the text of its named
groups, which the RE2 object under the wrapper (`_Regexp._regexp`, `_re2.RE2.Match`,
`NamedCapturingGroups`) answers directly. This is the one module that reaches inside
google-re2. matchers() raises Unavailable when that cannot be done (a google-re2 outside
VERIFIED_RE2, internals that moved), and txcl/regex.py then matches through the documented
API.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Callable
from typing import Any, Final

__all__ = ["VERIFIED_RE2", "Matchers", "Unavailable", "encode", "matchers"]

# The google-re2 releases this module was checked against, [lowest, first unverified): the
# same range as the google-re2 dependency in pyproject.toml.
VERIFIED_RE2: Final[tuple[tuple[int, int], tuple[int, int]]] = ((1, 1), (1, 2))

_NO_MATCH: Final = (-1, -1)

Search = Callable[[str], bool]
Groups = Callable[[str], dict[str, str] | None]
Matchers = tuple[Search, Groups]


class Unavailable(Exception):
    """The fast path cannot be used with the installed google-re2; use its documented API."""


def encode(text: str) -> bytes:
    """UTF-8, keeping lone surrogates (from surrogateescape'd headers) matchable."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


@functools.cache
def _unanchored() -> Any:
    """RE2's UNANCHORED constant, once the installed google-re2 is known to fit."""
    try:
        major, minor = importlib.metadata.version("google-re2").split(".")[:2]
        version = (int(major), int(minor))
    except (importlib.metadata.PackageNotFoundError, ValueError) as err:
        raise Unavailable(f"cannot tell which google-re2 is installed: {err}") from None
    low, high = VERIFIED_RE2
    if not low <= version < high:
        raise Unavailable(f"google-re2 {version} is outside {low}..{high}")
    try:
        return importlib.import_module("re2._re2").RE2.Anchor.UNANCHORED
    except (ImportError, AttributeError) as err:
        raise Unavailable(f"google-re2's internals moved: {err!r}") from None


def matchers(compiled: Any) -> Matchers:
    """search and groups over the RE2 object inside `compiled` (what re2.compile returned)."""
    unanchored = _unanchored()
    try:
        raw = compiled._regexp
        match = raw.Match
        index = tuple(
            (n.decode() if isinstance(n, bytes) else n, i) for n, i in raw.NamedCapturingGroups()
        )
    except (AttributeError, TypeError, ValueError) as err:
        raise Unavailable(f"google-re2's regex object moved: {err!r}") from None

    def search(text: str) -> bool:
        data = encode(text)
        return match(unanchored, data, 0, len(data))[0] != _NO_MATCH

    def groups(text: str) -> dict[str, str] | None:
        data = encode(text)
        spans = match(unanchored, data, 0, len(data))
        if spans[0] == _NO_MATCH:
            return None
        found: dict[str, str] = {}
        for name, number in index:
            start, end = spans[number]
            if start >= 0:
                found[name] = data[start:end].decode("utf-8", "replace")
        return found

    return search, groups
