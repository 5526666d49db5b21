"""A message's MIME tree without waste: the email package reads the structure, C passes the bytes.

Before the email parser sees a message, every big run of body lines (an attachment's
base64, a long text part) is replaced by one short placeholder line, so the parser walks a
skeleton of headers and small bodies. Such a run is whole lines after a header section's
empty line, with no line starting "--" (nothing in it can be a boundary), so it cannot
change the structure wherever it lands in a body or a preamble. After the parse, every
placeholder must sit in the payload of a leaf reached through multiparts only, or in such
a multipart's preamble or epilogue (nowhere a header section can start); if one does not,
the message is parsed again with nothing replaced — the email package's own result.

A leaf's original bytes are its payload with each placeholder swapped back
(`MimeTree.segments`, slices of the message, not copies): the text and HTML bodies get
their text back before they are decoded; an attachment's size and sha256 come from C passes
over those slices (base64 decoded a slice at a time), and its content is decoded only when
asked for.

Bounds (`MimeLimits`): at most `max_parts` lines starting "--" (every boundary is one) and
`max_depth` nested multiparts are read; past either the rest of the message is left out
of the parse and the tree says so (`truncated`); header lines past `max_header_lines` are
left out the same way, the body kept. The parser is fed in slices, and a set
`cancel` event stops it between slices (`ParseCancelled`).
"""

from __future__ import annotations

import binascii
import hashlib
import quopri
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from email import errors, policy
from email.message import EmailMessage, Message
from email.parser import BytesFeedParser

Segment = bytes | memoryview


class ParseCancelled(Exception):
    """The delivery this parse was for has been answered: nobody needs the result."""


@dataclass(frozen=True, slots=True)
class MimeLimits:
    """How much of one message's MIME structure is parsed (docs/lmtp.md § The envelope)."""

    max_parts: int = 1000
    max_depth: int = 50
    max_header_lines: int = 10_000  # of the message's own header section
    # Body runs at least this long are replaced before the parse; None: nothing is.
    elide_min_bytes: int | None = 4096
    feed_slice_bytes: int = 16 * 1024


DEFAULT_LIMITS = MimeLimits()
_LINE_END = re.compile(rb"\r\n|\r|\n")
_CONTENT_TYPE = re.compile(rb"(?im)^content-type:[ \t]*([a-z0-9!#$%&'*+.^_`|~-]+)/")
_BOUNDARY = re.compile(rb'(?i)\bboundary[ \t]*=[ \t]*(?:"([^"\r\n]+)"|([^\s;"]+))')
_TOKEN_PREFIX = "\x00txcl-elided-"
_TOKEN = re.compile("\x00txcl-elided-([0-9]+)\x00")
_STREAM_BYTES = 256 * 1024
_PART_HEAD_BYTES = 64 * 1024  # how far a part's header section is looked for
_BASE64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_UUENCODE = frozenset({"x-uuencode", "uuencode", "uue", "x-uue"})
_DASH_MISSES = 64  # dashes starting no "--" line before _dash_lines searches for lines instead


@dataclass(frozen=True, slots=True)
class Run:
    """Message bytes [start, end) replaced by one placeholder line ending in `eol`."""

    start: int
    end: int
    eol: bytes


@dataclass(slots=True)
class MimeTree:
    """The parsed message, and how to get its leaves' original bytes back."""

    root: EmailMessage
    data: bytes
    runs: list[Run] = field(default_factory=list)
    truncated: str = ""  # why the parse stopped short of the end, or ""

    def segments(self, part: Message) -> list[Segment] | None:
        """A leaf's payload as original bytes (slices of the message); None if its payload
        is not text (a multipart's parts, an attached message)."""
        payload = _text_payload(part)
        if payload is None:
            return None
        if not self.runs or _TOKEN_PREFIX not in payload:
            return [payload.encode("ascii", "surrogateescape")]
        view = memoryview(self.data)
        out: list[Segment] = []
        pos = 0
        for found in _TOKEN.finditer(payload):
            if found.start() > pos:
                out.append(payload[pos:found.start()].encode("ascii", "surrogateescape"))
            run = self.runs[int(found.group(1))]
            eol = run.eol.decode("ascii")
            if payload.startswith(eol, found.end()):
                out.append(view[run.start:run.end])
                pos = found.end() + len(eol)
            else:  # the line ending before a boundary belongs to the boundary
                out.append(view[run.start:run.end - len(run.eol)])
                pos = found.end()
        if pos < len(payload):
            out.append(payload[pos:].encode("ascii", "surrogateescape"))
        return out

    def restore(self, part: Message) -> None:
        """Put a leaf's original text back, so the email package decodes it as it would."""
        payload = _text_payload(part)
        if self.runs and payload is not None and _TOKEN_PREFIX in payload:
            segments = self.segments(part) or []
            part.set_payload(b"".join(segments).decode("ascii", "surrogateescape"))

    def leaf_bytes(self, part: Message, keep: bool) -> tuple[int, str, bytes | None]:
        """(size, sha256 hex, content or None unless `keep`) of a leaf's decoded payload,
        as `part.get_payload(decode=True)` gives it (b"" where that is not bytes)."""
        segments = self.segments(part)
        cte = str(part.get("content-transfer-encoding", "")).lower()
        if segments is None or cte in _UUENCODE:
            self.restore(part)
            payload = part.get_payload(decode=True)
            content = payload if isinstance(payload, bytes) else b""
            return len(content), hashlib.sha256(content).hexdigest(), content if keep else None
        if cte == "base64":
            return _base64_stats(segments, part, keep)
        if cte == "quoted-printable":
            content = quopri.decodestring(b"".join(segments))
            return len(content), hashlib.sha256(content).hexdigest(), content if keep else None
        digest = hashlib.sha256()
        size = 0
        for segment in segments:
            digest.update(segment)
            size += len(segment)
        return size, digest.hexdigest(), b"".join(segments) if keep else None


def parse_tree(data: bytes, limits: MimeLimits = DEFAULT_LIMITS,
               cancel: threading.Event | None = None) -> MimeTree:
    """The message's MIME tree within `limits`; raises ParseCancelled once `cancel` is set."""
    head_end = header_section_end(data)
    keep = header_lines_cut(data, head_end, limits.max_header_lines)
    if keep is not None:  # the header lines past the bound are left out, the body kept
        data = data[:keep] + data[head_end:]
    cut, runs, truncated = _layout(data, limits, cancel)
    if keep is not None:
        truncated = f"more than {limits.max_header_lines} header lines" + (
            f", {truncated}" if truncated else "")
    skeleton = _skeleton(data, cut, runs) if runs else b""
    # A message that has a placeholder's text of its own is parsed as it is.
    if runs and skeleton.count(_TOKEN_PREFIX.encode()) == len(runs):
        tree = MimeTree(_feed(skeleton, limits, cancel), data, runs, truncated)
        if _placeholders_in_bodies(tree.root) == len(runs):
            return tree
    source = data if cut == len(data) else data[:cut]
    return MimeTree(_feed(source, limits, cancel), data, [], truncated)


def header_section_end(data: bytes) -> int:
    """Where the header section ends: just past the line ending before the first empty line
    (any of CRLF, LF, CR ends a line, as the email parser reads them); len(data) if none."""
    if data[:1] in (b"\r", b"\n"):
        return 0
    found = _empty_line(data, 0, len(data))
    return found + 1 if found >= 0 else len(data)


def _empty_line(data: bytes, start: int, limit: int) -> int:
    """Where the line ending before the first empty line in [start, limit) is, or -1: the
    earliest of LF CR (CRLF CRLF, LF CRLF), LF LF and CR CR. Each `find` after the first
    looks only before what was found already, so a CRLF body is not read three times."""
    found = -1
    for pair in (b"\n\r", b"\n\n", b"\r\r"):
        pos = data.find(pair, start, limit)
        if pos >= 0:
            found, limit = pos, pos + 1
    return found


def header_lines_cut(data: bytes, end: int, max_lines: int) -> int | None:
    """Just past the last line of the header section [0, end) within `max_lines` lines;
    None when the section has no more lines than that."""
    if data.count(b"\n", 0, end) + data.count(b"\r", 0, end) <= max_lines:
        return None  # CRLF counts twice: at most that many lines
    for count, found in enumerate(_LINE_END.finditer(data, 0, end), start=1):
        if count == max_lines:
            return found.end() if found.end() < end else None
    return None


def _feed(data: bytes, limits: MimeLimits, cancel: threading.Event | None) -> EmailMessage:
    parser = BytesFeedParser(policy=policy.default)
    step = max(1, limits.feed_slice_bytes)
    view = memoryview(data)
    for start in range(0, len(data), step):
        if cancel is not None and cancel.is_set():
            raise ParseCancelled
        parser.feed(bytes(view[start:start + step]))
    root = parser.close()
    if not isinstance(root, EmailMessage):  # what policy.default makes
        raise TypeError(f"the parser made a {type(root).__name__}")
    return root


def _layout(data: bytes, limits: MimeLimits, cancel: threading.Event | None
            ) -> tuple[int, list[Run], str]:
    """Where the parse stops (a bound), and the body runs to replace before it."""
    starts: list[int] = []
    cut = len(data)
    truncated = ""
    open_boundaries: list[bytes] = _declared_boundary(data, 0, len(data))
    lines = _dash_lines(data, limits.max_parts + 1)
    for count, line in enumerate(lines):
        if count % 1024 == 0 and cancel is not None and cancel.is_set():
            raise ParseCancelled
        if count >= limits.max_parts:
            cut, truncated = line, f"more than {limits.max_parts} parts"
            break
        limit = lines[count + 1] if count + 1 < len(lines) else len(data)
        depth = _depth_after(data, line, limit, open_boundaries)
        if depth > limits.max_depth:
            cut, truncated = line, f"multiparts nested deeper than {limits.max_depth}"
            break
        starts.append(line)
    runs: list[Run] = []
    if limits.elide_min_bytes is not None:
        section_starts = [0] + [_line_end(data, line, cut) for line in starts]
        section_ends = starts + [cut]
        for begin, end in zip(section_starts, section_ends, strict=True):
            run = _body_run(data, begin, end, limits.elide_min_bytes)
            if run is not None:
                runs.append(run)
    return cut, runs, truncated


def exceeds_parts(data: bytes, max_parts: int) -> bool:
    """Whether parse_tree stops short at `max_parts` lines starting "--" (whatever the
    structure). Each such line holds two "-" of its own, and a count of one byte is the
    quickest C pass: only a message with that many is looked at closer."""
    return (data.count(b"-") >= 2 * (max_parts + 1)
            and len(_dash_lines(data, max_parts + 1)) > max_parts)


def _dash_lines(data: bytes, most: int, max_misses: int = _DASH_MISSES) -> list[int]:
    """Where the first `most` lines starting "--" start (every boundary line is one). A
    one-byte search (memchr) jumps from "-" to "-", past a base64 attachment at once; once
    `max_misses` dashes start no such line, the rest is searched for line starts instead."""
    found: list[int] = []
    pos = data.find(b"-")
    misses = 0
    while pos >= 0 and len(found) < most:
        if data.startswith(b"--", pos) and (pos == 0 or data[pos - 1] in b"\r\n"):
            found.append(pos)
            pos = data.find(b"-", pos + 2)
        elif misses < max_misses:
            misses += 1
            pos = data.find(b"-", pos + 1)
        else:  # dashes all over a text: per dash, Python costs more than a search
            return found + _line_starts_with_dashes(data, pos, most - len(found))
    return found


def _line_starts_with_dashes(data: bytes, start: int, most: int) -> list[int]:
    """The first `most` lines starting "--" at or after `start` (not itself one): two C
    scans, each hit a line start, so the work is bounded by `most`."""
    found: list[int] = []
    for ending in (b"\n--", b"\r--"):
        pos = data.find(ending, max(start - 1, 0))
        hits = 0
        while pos >= 0 and hits < most:
            found.append(pos + 1)
            hits += 1
            pos = data.find(ending, pos + 1)
    found.sort()
    return found[:most]


def _depth_after(data: bytes, line: int, limit: int, open_boundaries: list[bytes]) -> int:
    """Track the boundaries a "--" line closes or opens (a model of the parser's nesting,
    used only to bound it); the part's header section is looked for before `limit` (the
    next such line), so each line costs a scan of its own part only."""
    for index in range(len(open_boundaries) - 1, -1, -1):
        boundary = open_boundaries[index]
        if data.startswith(b"--" + boundary, line):
            after = line + 2 + len(boundary)
            del open_boundaries[index + 1:]
            if data.startswith(b"--", after):
                open_boundaries.pop()
            else:
                end = _line_end(data, line, limit)
                open_boundaries.extend(_declared_boundary(data, end, limit))
            break
    return len(open_boundaries)


def _declared_boundary(data: bytes, start: int, limit: int) -> list[bytes]:
    """The boundary a header section starting at `start` declares for a multipart (one
    longer than _PART_HEAD_BYTES counts as none: this only models the nesting)."""
    head_end = _header_end(data, start, min(limit, start + _PART_HEAD_BYTES))
    head = data[start:head_end]
    kind = _CONTENT_TYPE.search(head)
    if kind is None or kind.group(1).lower() != b"multipart":
        return []
    boundary = _BOUNDARY.search(head)
    return [boundary.group(1) or boundary.group(2)] if boundary else []


def _line_end(data: bytes, line: int, limit: int) -> int:
    """Just past the line ending of the line starting at `line` (or `limit`)."""
    newline = data.find(b"\n", line, limit)
    ret = data.find(b"\r", line, newline if newline >= 0 else limit)  # only before the LF
    pos = ret if ret >= 0 else newline
    if pos < 0:
        return limit
    return pos + 2 if data.startswith(b"\r\n", pos) else pos + 1


def _header_end(data: bytes, start: int, limit: int) -> int:
    """Where the header section starting at line `start` ends (its empty line included)."""
    if start >= limit:
        return limit
    if data[start:start + 1] in (b"\r", b"\n"):
        return start + (2 if data.startswith(b"\r\n", start) else 1)
    found = _empty_line(data, start, limit)
    if found < 0:
        return limit
    empty = found + 1
    return empty + (2 if data.startswith(b"\r\n", empty) else 1)


def _body_run(data: bytes, begin: int, end: int, min_bytes: int) -> Run | None:
    """The body of the section [begin, end) if it is big, not a multipart or message, and
    made of whole lines (and its header section is not past _PART_HEAD_BYTES)."""
    head_limit = min(end, begin + _PART_HEAD_BYTES)
    body = _header_end(data, begin, head_limit)
    if body >= head_limit:
        return None  # no empty line (that soon): nothing to replace
    kind = _CONTENT_TYPE.search(data, begin, body)
    if kind is not None and kind.group(1).lower() in (b"multipart", b"message"):
        return None
    if end == len(data) and not data.endswith((b"\n", b"\r")):
        end = max(data.rfind(b"\n", body, end), data.rfind(b"\r", body, end)) + 1
    if end - body < max(min_bytes, 1) or end <= body:
        return None
    if data.startswith(b"\r\n", end - 2):
        eol = b"\r\n"
    elif data[end - 1:end] in (b"\r", b"\n"):
        eol = data[end - 1:end]
    else:
        return None
    return Run(body, end, eol)


def _skeleton(data: bytes, cut: int, runs: Sequence[Run]) -> bytes:
    pieces: list[bytes] = []
    pos = 0
    for index, run in enumerate(runs):
        pieces.append(data[pos:run.start])
        pieces.append(f"{_TOKEN_PREFIX}{index}\x00".encode() + run.eol)
        pos = run.end
    pieces.append(data[pos:cut])
    return b"".join(pieces)


def leaves(part: Message) -> Iterator[Message]:
    """Leaf parts in order; an attached message/rfc822 counts as one leaf, not its insides."""
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        for sub in part.get_payload():
            if isinstance(sub, Message):
                yield from leaves(sub)
    else:
        yield part


def _containers(part: Message) -> Iterator[Message]:
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        yield part
        for sub in part.get_payload():
            if isinstance(sub, Message):
                yield from _containers(sub)


def _placeholders_in_bodies(root: Message) -> int:
    """How many placeholders sit where a body line of the original would have been read
    the same way: a non-message leaf's text, or a preamble or epilogue of a multipart."""
    found: list[str] = []
    for leaf in leaves(root):
        payload = _text_payload(leaf)
        if payload is not None and leaf.get_content_maintype() != "message":
            found.extend(_TOKEN.findall(payload))
    for container in _containers(root):
        for text in (container.preamble, container.epilogue):
            if text:
                found.extend(_TOKEN.findall(text))
    return len(set(found)) if len(set(found)) == len(found) else -1


def _text_payload(part: Message) -> str | None:
    """A leaf's payload as the parser stored it (`get_payload()` would re-decode 8-bit
    text). Not public API: without it no placeholder is found, so nothing is replaced."""
    payload = getattr(part, "_payload", None)
    return payload if isinstance(payload, str) else None


def _stripped_chunks(segments: Sequence[Segment]) -> Iterator[bytes]:
    """The segments' bytes without CR and LF (as `b"".join(payload.splitlines())`), a
    bounded slice at a time."""
    for segment in segments:
        view = memoryview(segment)
        for start in range(0, len(view), _STREAM_BYTES):
            yield bytes(view[start:start + _STREAM_BYTES]).translate(None, b"\r\n")


def _base64_stats(segments: Sequence[Segment], part: Message, keep: bool
                  ) -> tuple[int, str, bytes | None]:
    """`get_payload(decode=True)` of a base64 leaf: strict decoding a slice at a time where
    the whole would decode strictly, else the email package's lenient steps on the whole."""
    digest = hashlib.sha256()
    size = 0
    kept: list[bytes] = []
    carry = b""
    defects: list[errors.MessageDefect] = []
    try:
        for chunk in _stripped_chunks(segments):
            text = carry + chunk if carry else chunk
            if text.translate(None, _BASE64_CHARS):
                raise binascii.Error("not base64")
            whole = len(text) - len(text) % 4
            padding = text.find(b"=", 0, whole)
            if padding >= 0:
                whole = padding - padding % 4  # padding ends the data: keep it for the end
            if whole:  # alphabet only, whole quads: strict and lenient decoding agree
                decoded = binascii.a2b_base64(memoryview(text)[:whole])
                digest.update(decoded)
                size += len(decoded)
                if keep:
                    kept.append(decoded)
            carry = text[whole:]
            if len(carry) > 64:
                raise binascii.Error("data after padding")
        missing = len(carry) % 4
        if missing:
            carry += b"==="[:4 - missing]
            defects.append(errors.InvalidBase64PaddingDefect())
        decoded = binascii.a2b_base64(carry, strict_mode=True)
    except binascii.Error:
        content, defects = decode_b(b"".join(_stripped_chunks(segments)))
        part.defects.extend(defects)
        return len(content), hashlib.sha256(content).hexdigest(), content if keep else None
    digest.update(decoded)
    size += len(decoded)
    part.defects.extend(defects)
    if not keep:
        return size, digest.hexdigest(), None
    kept.append(decoded)
    return size, digest.hexdigest(), b"".join(kept)


def decode_b(encoded: bytes) -> tuple[bytes, list[errors.MessageDefect]]:
    """The email package's lenient base64 steps (`email._encoded_words.decode_b`, what
    `get_payload(decode=True)` does to a base64 payload without its line ends), with the
    public base64 API."""
    pad_err = len(encoded) % 4
    missing = b"==="[:4 - pad_err] if pad_err else b""
    try:
        return (binascii.a2b_base64(encoded + missing, strict_mode=True),
                [errors.InvalidBase64PaddingDefect()] if pad_err else [])
    except binascii.Error:
        pass
    try:
        return binascii.a2b_base64(encoded), [errors.InvalidBase64CharactersDefect()]
    except binascii.Error:
        pass
    try:
        return (binascii.a2b_base64(encoded + b"=="),
                [errors.InvalidBase64CharactersDefect(), errors.InvalidBase64PaddingDefect()])
    except binascii.Error:
        return encoded, [errors.InvalidBase64LengthDefect()]
