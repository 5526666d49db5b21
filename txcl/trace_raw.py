"""Scrubbing the message bytes a trace stores beside its JSON (`message.eml`).

The stack's `WITH omit` / `WITH redact` hints reach the stored message as they reach the
envelope, for every path under `_txc.<src>.msg`:

- a header (`msg.headers.<name>`, or a field read from one: `subject`, `id` (Message-ID),
  `date`, `from`, `to`, `cc`): every field of that name in the header section is redacted
  (its value becomes `[REDACTED]`, folded lines and encoded words included) or omitted
  (the field is removed), exactly;
- a body field (`text`, `html`, `attachments`, or a path inside one): the message holds it
  encoded (base64, quoted-printable, a charset) where it cannot be scrubbed exactly, so
  the message is not stored at all;
- and any scrubbed value (from any path) that appears verbatim in the message, in a
  header or a plain body, is replaced by `[REDACTED]` wherever it appears.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from txcl.trace_store import MessageBytes, StagedMessage

# Below this length a value is too common to hunt for in a whole message.
_MIN_SECRET: Final = 8
# The envelope fields read from one header, by the header's (lower-case) name.
_HEADER_OF_FIELD: Final = {
    "subject": "subject",
    "id": "message-id",
    "date": "date",
    "from": "from",
    "to": "to",
    "cc": "cc",
}
_BODY_FIELDS: Final = frozenset({"text", "html", "attachments"})
_HEADER_SECTION_END = re.compile(rb"\r?\n\r?\n")
_FIELD_LINE = re.compile(rb"[^\r\n]*(?:\r?\n|\Z)")

Segments = Sequence[str | int]


@dataclass(frozen=True, slots=True)
class MessagePlan:
    """What the hints ask of the stored message: header fields by name ("*": all) ->
    "omit" or "redact", or a reason the message cannot be stored."""

    headers: dict[str, str]
    left_out: str | None = None


def _matches(pattern: str | int, actual: str) -> bool:
    return pattern == "*" or str(pattern) == actual


def plan_for(rules: Iterable[tuple[Segments, str]], src: str) -> MessagePlan:
    """The plan for scrubbing the message of source `src` under these (path, action) rules.
    Paths at or above `msg.raw` are not here: they remove the stored message outright."""
    msg_path = ("_txc", src, "msg")
    headers: dict[str, str] = {}
    for segs, action in rules:
        if len(segs) < 4 or not all(_matches(p, a) for p, a in zip(segs, msg_path, strict=False)):
            continue
        field = str(segs[3])
        if field in ("raw", "*"):
            continue  # the stored message itself goes; see build_artifacts
        if field in _BODY_FIELDS:
            where = ".".join(map(str, segs))
            return MessagePlan(
                headers, f"WITH {action} of {where}: the message holds it in its body"
            )
        name = str(segs[4]).lower() if field == "headers" and len(segs) > 4 else (
            "*" if field == "headers" else _HEADER_OF_FIELD.get(field))
        if name is not None and headers.get(name) != "omit":
            headers[name] = action
    return MessagePlan(headers)


def _scrub_header_section(head: bytes, headers: dict[str, str], marker: bytes) -> bytes:
    out: list[bytes] = []
    action: str | None = None  # of the field being copied, for its continuation lines
    for line in _FIELD_LINE.findall(head):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and action is not None:
            continue  # a folded line of a scrubbed field
        if line[:1] not in (b" ", b"\t"):
            name = line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
            action = headers.get(name) or headers.get("*") if b":" in line else None
            if action == "redact":
                ending = b"\r\n" if line.endswith(b"\r\n") else b"\n"
                out.append(line.split(b":", 1)[0] + b": " + marker + ending)
                continue
            if action == "omit":
                continue
        out.append(line)
    return b"".join(out)


def scrub_message(
    message: MessageBytes, plan: MessagePlan, secrets: Iterable[str], replacement: str
) -> MessageBytes:
    """`message` with the planned header fields scrubbed and every verbatim copy of a
    secret replaced by `replacement`. The plan must not say `left_out`. A staged message
    comes back as it is unless something in it was scrubbed (read back to look)."""
    secrets = [secret for secret in secrets if len(secret) >= _MIN_SECRET]
    if isinstance(message, StagedMessage):
        if not plan.headers and not secrets:
            return message
        data = message.read()
    else:
        data = message
    original = data
    marker = replacement.encode("utf-8")
    if plan.headers:
        end = _HEADER_SECTION_END.search(data)
        split = end.start() + 1 if end else len(data)  # keep the first line ending
        if end and data[end.start()] == 13:  # "\r\n\r\n": the line ending is two bytes
            split += 1
        data = _scrub_header_section(data[:split], plan.headers, marker) + data[split:]
    for secret in secrets:
        needle = secret.encode("utf-8", "surrogateescape")
        if needle in data:
            data = data.replace(needle, marker)
    return message if data is original else data
