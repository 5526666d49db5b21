"""Decoded header values for the plainest, most common forms, without the email policy's
tokenizer: the exact strings (and addresses) `email.policy.default` gives for them.

Most mail names its sender as `a@b.example`, `<a@b.example>` or `Alice <a@b.example>`, dates
as RFC 5322 dates and message ids as `<left@right>`. The policy's header classes parse each
through a general tokenizer at a cost far above the rest of the envelope; here a strict
pattern recognises the plain forms and builds the same result directly. Anything else
(comments, quoted strings, encoded words, 8-bit bytes, line folds, groups, odd spacing)
gets None, and the caller asks the policy. tests/test_header_fast.py checks the two agree.
"""

from __future__ import annotations

import email.utils
import re
from email import policy
from email.headerregistry import (
    AddressHeader,
    DateHeader,
    HeaderRegistry,
    MessageIDHeader,
    UnstructuredHeader,
)
from functools import lru_cache
from typing import Final, Literal

HeaderKind = Literal["unstructured", "address", "date", "message-id", "other"]

_ATEXT: Final = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_DOT_ATOM: Final = rf"{_ATEXT}(?:\.{_ATEXT})*"
_ADDR_SPEC: Final = rf"{_DOT_ATOM}@{_DOT_ATOM}"
# One mailbox: a bare addr-spec, or an optional phrase of plain words before <addr-spec>.
_MAILBOX = re.compile(
    rf"[ \t]*(?:(?P<bare>{_ADDR_SPEC})|(?P<phrase>{_ATEXT}(?:[ \t]+{_ATEXT})*)?[ \t]*"
    rf"<(?P<angle>{_ADDR_SPEC})>)[ \t]*"
)
_MESSAGE_ID = re.compile(rf"<{_DOT_ATOM}@{_DOT_ATOM}>")
_PLAIN_TEXT = re.compile(r"[\t -~]*")
_WORD_GAP = re.compile(r"[ \t]+")

_KINDS: dict[str, HeaderKind] = {}
_KINDS_MAX: Final = 1024


def header_kind(name: str) -> HeaderKind:
    """How the default policy parses the header `name` (by its registered class)."""
    key = name.lower()
    kind = _KINDS.get(key)
    if kind is None:
        registry = policy.default.header_factory
        cls = registry[key] if isinstance(registry, HeaderRegistry) else None
        kind = ("other" if cls is None
                else "unstructured" if issubclass(cls, UnstructuredHeader)
                else "address" if issubclass(cls, AddressHeader)
                else "date" if issubclass(cls, DateHeader)
                else "message-id" if issubclass(cls, MessageIDHeader)
                else "other")
        if len(_KINDS) < _KINDS_MAX:
            _KINDS[key] = kind
    return kind


def _plain(value: str) -> bool:
    return "=?" not in value and _PLAIN_TEXT.fullmatch(value) is not None


def plain_addresses(value: str) -> list[tuple[str, str]] | None:
    """(display name, addr-spec) of each mailbox of a plain address list, or None."""
    if not value or not _plain(value):
        return None
    out = []
    for item in value.split(","):
        found = _MAILBOX.fullmatch(item)
        if found is None:
            return None
        phrase = found["phrase"]
        display = _WORD_GAP.sub(" ", phrase) if phrase else ""
        out.append((display, found["bare"] or found["angle"]))
    return out


def plain_decoded(name: str, value: str) -> str | None:
    """`str(policy.default.header_fetch_parse(name, value))` for a plain value, or None."""
    if not _plain(value):
        return None
    kind = header_kind(name)
    if kind == "unstructured":
        return value
    if kind == "address":
        mailboxes = plain_addresses(value)
        if mailboxes is None:
            return None
        return ", ".join(f"{display} <{addr}>" if display else addr for display, addr in mailboxes)
    if kind == "message-id":
        return value if _MESSAGE_ID.fullmatch(value) else None
    if kind == "date" and value:
        return _plain_date(value)
    return None


@lru_cache(maxsize=64)
def _plain_date(value: str) -> str | None:
    # Cached: the messages of one sending (a list's fan-out, a burst) share their Date.
    try:
        return email.utils.format_datetime(email.utils.parsedate_to_datetime(value))
    except ValueError:  # the policy keeps an unparseable date as it is
        return value
    except Exception:
        return None
