"""The envelope contract: the facts every module agrees on, each defined once.

An envelope is a JSON object. `_txc.src` names its source (`"lmtp"`), `_txc.rid` the
request, `_txc.route.to` the entry stage (`<tenant>/<stack>/<stage>`); the source stamps
`_txc.<src>.*`, of which rules and ops may write only `_txc.<src>.res.*`, the verdict.

Here live: the accessors for those places, the read-only rules, what a valid verdict code
is, a path's text form both ways (`path_text` / `parse_path`), the duration syntax shared
by rules and flags, and the tenant and stack name patterns. Nothing here knows a source.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

from txcl.ast import Segment
from txcl.values import MISSING, to_json

TXC: Final = "_txc"
SRC_KEY: Final = "src"
RID_KEY: Final = "rid"
ROUTE_KEY: Final = "route"
RESULT_KEY: Final = "res"  # the one writable part of `_txc.<src>`
READ_ONLY_TXC_KEYS: Final = frozenset({SRC_KEY, RID_KEY, ROUTE_KEY})
# The request id a reply text carries at its end (a Postfix log line leads to its trace).
RID_SUFFIX: Final = re.compile(r" \(rid [0-9A-Za-z]+\)$")


def rid_suffix(rid: str) -> str:
    """What a reply text ends with to carry the request id `rid` (RID_SUFFIX reads it)."""
    return f" (rid {rid})"


def without_rid(text: str) -> str:
    """A reply line or text without the request id at its end, if it has one."""
    return RID_SUFFIX.sub("", text)

# Envelopes are dicts when they come from JSON: `isinstance` tries the exact type first.
_MAPPING: Final = (dict, Mapping)

# A segment of a path an op declares it reads (txcl.ops.OpReads): the envelope's own
# source section, whatever the source is (`_txc.<src>`).
ANY_SOURCE: Final = "<src>"

# Tenant and stack folder names (OPS/<tenant>/<stack>/); a tenant name is also a DNS label.
TENANT_NAME: Final = re.compile(r"[a-z][a-z0-9-]*\Z")
STACK_NAME: Final = re.compile(r"[a-z_][a-z0-9_-]*\Z")


# --- accessors -----------------------------------------------------------------------------


def txc_of(envelope: object) -> Mapping[str, Any] | None:
    """`_txc`, when the envelope is an object holding one."""
    txc = envelope.get(TXC) if isinstance(envelope, _MAPPING) else None
    return txc if isinstance(txc, _MAPPING) else None


def source_of(envelope: object) -> str | None:
    """`_txc.src` when it is a non-empty string, else None."""
    txc = txc_of(envelope)
    src = txc.get(SRC_KEY) if txc is not None else None
    return src if isinstance(src, str) and src else None


def rid_of(envelope: object) -> str:
    """`_txc.rid`, or "" when it is not a string."""
    txc = txc_of(envelope)
    rid = txc.get(RID_KEY) if txc is not None else None
    return rid if isinstance(rid, str) else ""


def route_of(envelope: object) -> Mapping[str, Any] | None:
    """`_txc.route`, when it is an object."""
    txc = txc_of(envelope)
    route = txc.get(ROUTE_KEY) if txc is not None else None
    return route if isinstance(route, _MAPPING) else None


def route_to(envelope: object) -> Any:
    """`_txc.route.to` as it is (not necessarily a string), or MISSING."""
    route = route_of(envelope)
    return route.get("to", MISSING) if route is not None else MISSING


def section_of(envelope: object, src: str | None = None) -> Mapping[str, Any] | None:
    """`_txc.<src>`, the part the source stamped (`src` defaults to `_txc.src`)."""
    src = source_of(envelope) if src is None else src
    txc = txc_of(envelope)
    section = txc.get(src) if txc is not None and src else None
    return section if isinstance(section, _MAPPING) else None


def result_of(envelope: object, src: str | None = None) -> Any:
    """`_txc.<src>.res` as it is, or MISSING (`src` defaults to `_txc.src`)."""
    section = section_of(envelope, src)
    return section.get(RESULT_KEY, MISSING) if section is not None else MISSING


def for_source(segments: tuple[Segment, ...], src: str) -> tuple[Segment, ...]:
    """A declared path with `ANY_SOURCE` replaced by the source `src`."""
    return tuple(src if seg == ANY_SOURCE else seg for seg in segments)


# --- read-only rules and verdicts ------------------------------------------------------------


def read_only_reason(segments: tuple[Segment, ...], src: str | None) -> str | None:
    """Why writing at `segments` is refused, or None if it is allowed.

    Read-only: `_txc` itself, `_txc.src`, `_txc.rid`, `_txc.route.*`, and `_txc.<src>.*`
    except `_txc.<src>.res.*`. `src` is the envelope's `_txc.src`.
    """
    if not segments or segments[0] != TXC:
        return None
    if len(segments) == 1:
        return "_txc belongs to the engine and the source; write below it"
    key = segments[1]
    if key in READ_ONLY_TXC_KEYS:
        return f"_txc.{key} is read-only"
    if src is not None and key == src and (len(segments) == 2 or segments[2] != RESULT_KEY):
        return f"_txc.{src} is stamped by the source and read-only, except _txc.{src}.{RESULT_KEY}"
    return None


def patch_read_only_reason(patch: Mapping[str, Any], src: str | None) -> str | None:
    """Why a merge patch would change a read-only path, or None."""
    txc = patch.get(TXC, MISSING)
    if txc is MISSING:
        return None
    if not isinstance(txc, dict):
        return "it would replace _txc, which belongs to the engine and the source"
    for key, value in txc.items():
        reason = read_only_reason((TXC, key), src)
        if reason is None:
            continue
        if key != src or not isinstance(value, dict):
            return reason
        for sub in value:
            sub_reason = read_only_reason((TXC, key, sub), src)
            if sub_reason:
                return sub_reason
    return None


def valid_code(code: object) -> bool:
    """Whether `code` may stand as a verdict code: an int (not a bool) in 200-299 or 400-599."""
    return (
        isinstance(code, int)
        and not isinstance(code, bool)
        and (200 <= code <= 299 or 400 <= code <= 599)
    )


def verdict_problem(envelope: Any, src: str | None) -> str | None:
    """What is wrong with `_txc.<src>.res` (codes must be ints in 2xx, 4xx or 5xx), or None."""
    if src is None:
        return None
    res = result_of(envelope, src)
    if res is MISSING or res is None:
        return None
    where = f"_txc.{src}.{RESULT_KEY}"
    if not isinstance(res, dict):
        return f"{where} must be an object with code/msg or recipients, not {to_json(res)!r}"
    if "code" in res and not valid_code(res["code"]):
        return f"invalid verdict {where}.code = {res['code']!r}: an integer in 200-299 or 400-599"
    recipients = res.get("recipients", MISSING)
    if recipients is MISSING or recipients is None:
        return None
    if not isinstance(recipients, list):
        return f"{where}.recipients must be a list"
    for i, slot in enumerate(recipients):
        if isinstance(slot, dict) and "code" in slot and not valid_code(slot["code"]):
            return (
                f"invalid verdict {where}.recipients.{i}.code = {slot['code']!r}: "
                "an integer in 200-299 or 400-599"
            )
    return None


# --- a path's text form ----------------------------------------------------------------------

_PLAIN_SEGMENT: Final = re.compile(r"[A-Za-z0-9_-]+")
# One segment of a path's text: plain, a JSON string, or (in hint patterns) `*`.
_SEGMENT_TEXT: Final = re.compile(r'([A-Za-z0-9_-]+|\*)|("(?:[^"\\]|\\.)*")')
_WILDCARD: Final = "*"


def segment_text(segment: Segment) -> str:
    """One segment as written in a path: plain, else a JSON string (a digit string, a key
    with dots or spaces, ...); an int is a list index."""
    if isinstance(segment, int):
        return str(segment)
    if segment == _WILDCARD:  # a rule's bound index (`@lmtp.rcpt.*`)
        return segment
    if _PLAIN_SEGMENT.fullmatch(segment) and not segment.isdigit():
        return segment
    return json.dumps(segment, ensure_ascii=False)


def path_text(segments: tuple[Segment, ...], *, at: bool = False) -> str:
    """A path's text: `_txc.lmtp."x.y".0`; with `at`, paths under `_txc` in their `@` form
    (`@lmtp."x.y".0`, as a rule author writes them). `parse_path` reads both back."""
    if not segments:
        return ""
    if at and segments[0] == TXC and len(segments) > 1:
        return "@" + ".".join(segment_text(s) for s in segments[1:])
    return ".".join(segment_text(s) for s in segments)


def parse_path(text: str, *, wildcards: bool = False) -> tuple[Segment, ...] | None:
    """The segments of a path's text (`path_text`'s forms, surrounding spaces ignored), or
    None if it is not one. Digits index lists; with `wildcards`, a bare `*` is kept as the
    segment "*" (any key or index, for scrub hints)."""
    text = text.strip()
    segments: list[Segment] = []
    if text.startswith("@"):
        segments.append(TXC)
        text = text[1:]
    pos = 0
    while True:
        found = _SEGMENT_TEXT.match(text, pos)
        if found is None:
            return None
        bare, quoted = found.group(1), found.group(2)
        if quoted is not None:
            try:
                segments.append(json.loads(quoted))
            except ValueError:
                return None
        elif bare == _WILDCARD and not wildcards:
            return None
        elif bare.isdigit():
            segments.append(int(bare))
        else:
            segments.append(bare)
        pos = found.end()
        if pos == len(text):
            return tuple(segments)
        if text[pos] != ".":
            return None
        pos += 1


def split_path_list(text: str) -> tuple[str, ...]:
    """`"a.b, @c.\\"x,y\\""` -> the items of a comma list of paths (commas inside quoted
    segments do not split), stripped, empty items dropped."""
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quoted:
            escaped = char == "\\"
            quoted = char != '"'
        elif char == '"':
            quoted = True
        elif char == ",":
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    items.append("".join(current))
    return tuple(item.strip() for item in items if item.strip())


# --- durations --------------------------------------------------------------------------------

_DURATION: Final = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*\Z")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str, *, days: bool = False) -> float | None:
    """`500ms`, `30s`, `2m`, `1h` or a bare number of seconds -> seconds (>= 0), or None if
    `text` is not a duration; `7d` too where `days` are allowed (ages, not timeouts).
    Callers check the range they allow."""
    found = _DURATION.match(text)
    if found is None or (found.group(2) == "d" and not days):
        return None
    return float(found.group(1)) * _DURATION_UNITS[found.group(2)]
