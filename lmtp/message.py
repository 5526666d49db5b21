"""Message bytes -> the `_txc.lmtp.msg` object, and the full LMTP envelope around it.

Parsing is best effort, in the spirit of the `email` package's defects: a malformed message
is data for rules, never an exception. `raw` (the exact bytes, base64) never fails to build;
every other field is built on its own, so one broken part costs only that field. What went
wrong comes back as a list of short strings for the log.

A stack that cannot observe a field need not pay for it: `MessageNeeds` says which fields
(and which headers) the routed stacks can read — from the paths their rules read and the
built-in ops they call (`needs_of_rules`) — and `parse_message(data, needs)` builds only
those. A field it builds has the same value the full parse gives; without the body fields
(text, html, attachments, truncated) only the header section is parsed at all, and an
attachment's content is decoded only for a stack that can read it (`ATTACHMENT_CONTENT`;
its name, type, size and sha256 come from C passes over the message, `lmtp.mime`).

The common message, a single text/plain part with a plain header section, is read without
the email parser (`_parse_simple`): the same fields and defects, from C passes over the
bytes; anything else it declines, and the full parse (`_parse_all`) reads it.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import io
import quopri
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from email import policy
from email.errors import MessageDefect
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.parser import BytesParser
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any

from lmtp.header_fast import plain_addresses, plain_decoded
from lmtp.mime import (
    DEFAULT_LIMITS,
    MimeLimits,
    MimeTree,
    ParseCancelled,
    decode_b,
    exceeds_parts,
    header_lines_cut,
    header_section_end,
    leaves,
    parse_tree,
)

if TYPE_CHECKING:
    from lmtp.routing import Route

B64_PREFIX = "b64:"
_PARSER = BytesParser(policy=policy.default)

MSG_FIELDS = ("id", "date", "from", "to", "cc", "subject", "text", "html", "headers",
              "attachments", "truncated", "raw")
BODY_FIELDS = frozenset({"text", "html", "attachments", "truncated"})
# Not a field but a need: the `content` of each attachment (its other keys are cheap).
ATTACHMENT_CONTENT = "attachments.content"
_ATTACHMENT_STATS = frozenset({"name", "type", "size", "sha256"})
# The `_txc.<src>` section of an LMTP envelope, and where the message sits in it.
SOURCE = "lmtp"
MSG_PATH = ("_txc", SOURCE, "msg")


@dataclass(frozen=True, slots=True)
class MessageNeeds:
    """Which `_txc.lmtp.msg` fields to build (and whether ATTACHMENT_CONTENT);
    `header_names` None: every header."""

    fields: frozenset[str]
    header_names: frozenset[str] | None = None

    @property
    def complete(self) -> bool:
        return self.header_names is None and self.fields.issuperset(_ALL_NEEDS)

    def __or__(self, other: MessageNeeds) -> MessageNeeds:
        names = (None if self.header_names is None or other.header_names is None
                 else self.header_names | other.header_names)
        return MessageNeeds(self.fields | other.fields, names)


_ALL_NEEDS = frozenset(MSG_FIELDS) | {ATTACHMENT_CONTENT}
EVERYTHING = MessageNeeds(_ALL_NEEDS)
NOTHING = MessageNeeds(frozenset(), frozenset())


def needs_of_path(segments: Sequence[str | int]) -> MessageNeeds:
    """What reading one plain path can observe of the message."""
    depth = min(len(segments), len(MSG_PATH))
    if tuple(segments[:depth]) != MSG_PATH[:depth]:
        return NOTHING  # not under _txc.lmtp.msg, nor one of its containers
    if len(segments) <= len(MSG_PATH):
        return EVERYTHING  # _txc, _txc.lmtp or the msg object itself
    name = segments[3]
    if name == "headers":
        if len(segments) > 4 and isinstance(segments[4], str):
            return MessageNeeds(frozenset({"headers"}), frozenset({segments[4]}))
        return MessageNeeds(frozenset({"headers"}))
    if name == "attachments":
        if len(segments) > 5 and isinstance(segments[4], int) and segments[5] in _ATTACHMENT_STATS:
            return MessageNeeds(frozenset({"attachments"}), frozenset())
        return MessageNeeds(frozenset({"attachments", ATTACHMENT_CONTENT}), frozenset())
    if isinstance(name, str) and name in MSG_FIELDS:
        return MessageNeeds(frozenset({name}), frozenset())
    return NOTHING  # a key the message object never has


def needs_of_rules(rules: Iterable[Any], builtin_ops: Mapping[str, MessageNeeds]) -> MessageNeeds:
    """The union over compiled rules (`reads`, `jsonpaths`, `ops`); JSONPaths and ops not in
    `builtin_ops` may reach anything, so they need everything."""
    needs = NOTHING
    for rule in rules:
        if rule.jsonpaths:
            return EVERYTHING
        for op in rule.ops:
            op_needs = builtin_ops.get(op)
            if op_needs is None:
                return EVERYTHING
            needs = needs | op_needs
        for segments in rule.reads:
            needs = needs | needs_of_path(segments)
        if needs.complete:
            return EVERYTHING
    return needs


def b64(data: bytes) -> str:
    """The envelope's encoding for bytes: "b64:" + standard base64."""
    return B64_PREFIX + base64.b64encode(data).decode("ascii")


def parse_message(
    data: bytes, needs: MessageNeeds = EVERYTHING, *, limits: MimeLimits = DEFAULT_LIMITS,
    cancel: threading.Event | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Parse RFC 5322 bytes into the `_txc.lmtp.msg` object; also return parse defects.

    With `needs`, only those fields are in the object (each with its full-parse value).
    `limits` bounds the MIME walk; once `cancel` is set it raises ParseCancelled.
    The same as `parse_plain_text`, where that answers, else `parse_mime`."""
    if not needs.complete and not (needs.fields & BODY_FIELDS):
        return _parse_head(data, needs, limits)
    plain = parse_plain_text(data, needs, limits)
    return plain if plain is not None else parse_mime(data, needs, limits, cancel)


def parse_plain_text(
    data: bytes, needs: MessageNeeds = EVERYTHING, limits: MimeLimits = DEFAULT_LIMITS
) -> tuple[dict[str, Any], list[str]] | None:
    """`parse_message`'s result for a plain single-part text/plain message, read with C
    passes over the bytes only (no email parser); None for any other message."""
    simple = _parse_simple(data, needs, limits)
    return None if simple is None else _narrowed(simple, needs)


def parse_mime(
    data: bytes, needs: MessageNeeds = EVERYTHING, limits: MimeLimits = DEFAULT_LIMITS,
    cancel: threading.Event | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """`parse_message`'s result from the email parser's MIME walk, for any message."""
    return _narrowed(_parse_all(data, needs, limits, cancel), needs)


def _narrowed(parsed: tuple[dict[str, Any], list[str]], needs: MessageNeeds
              ) -> tuple[dict[str, Any], list[str]]:
    """The parse's fields that `needs` names (and only the headers it names)."""
    msg, defects = parsed
    if not needs.complete:
        msg = {name: value for name, value in msg.items() if name in needs.fields}
        if needs.header_names is not None and "headers" in msg:
            msg["headers"] = {k: v for k, v in msg["headers"].items() if k in needs.header_names}
    return msg, defects


_HEADER_FIELDS = {"id": "message-id", "date": "date", "subject": "subject"}
_ADDRESS_FIELDS = frozenset({"from", "to", "cc"})
# A header section the email parser reads without a quirk: CRLF lines, each a field name
# (printable ASCII but ":") and a colon, or a continuation; no "From " envelope line.
_PLAIN_FIELD_LINE = re.compile(rb"(?:[!-9;-~]+:|[ \t])[^\r\n]*\r\n")
_PLAIN_SECTION = re.compile(rb"(?:[!-9;-~]+:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)*\Z")


def split_header_section(head: bytes) -> list[tuple[str, str]] | None:
    """(name, raw value) pairs as the email parser's `raw_items()` gives them for a plain
    header section (see _PLAIN_SECTION); None for anything else (the parser then reads it).
    A fast path: the parser costs far more for the handful of headers most stacks read."""
    if head.startswith(b"From ") or b"\r\nFrom " in head or not _PLAIN_SECTION.match(head):
        return None
    text = head.decode("ascii", "surrogateescape")
    items: list[tuple[str, str]] = []
    for line in text.split("\r\n")[:-1]:
        if line[0] in " \t":  # a continuation: the parser keeps its line ending inside
            name, value = items[-1]
            items[-1] = (name, value + "\r\n" + line)
            continue
        name, _, value = line.partition(":")
        items.append((name, value.lstrip(" \t")))
    return items


def _parse_head(data: bytes, needs: MessageNeeds, limits: MimeLimits
                ) -> tuple[dict[str, Any], list[str]]:
    """Header-derived fields only: the body is never parsed, nor copied beyond `raw`."""
    fields = needs.fields
    msg: dict[str, Any] = {}
    defects: list[str] = []
    if fields - {"raw"}:
        end = header_section_end(data)
        cut = header_lines_cut(data, end, limits.max_header_lines)
        if cut is not None:
            defects.append(f"headers: truncated, more than {limits.max_header_lines} lines")
        head = data[:end if cut is None else cut]
        items = split_header_section(head)
        parsed: Message | None = None
        if items is None:
            try:
                parsed = _PARSER.parsebytes(head)
                items = list(parsed.raw_items())
            except Exception as exc:
                defects.append(f"message: unparseable ({type(exc).__name__})")
        wanted = _wanted_headers(needs)
        headers: dict[str, list[str]] = {}
        if items is not None:
            try:
                headers = _headers_from(items, wanted)
            except Exception as exc:
                defects.append(f"headers: {type(exc).__name__}: {exc}"[:200])
        defaults: dict[str, Any] = {"id": "", "date": "", "from": [], "to": [], "cc": [],
                                    "subject": ""}
        for name in MSG_FIELDS:
            if name not in fields or name == "raw":
                continue
            msg[name] = defaults.get(name)
            if name == "headers":
                keep = needs.header_names
                msg[name] = headers if keep is None else {
                    k: v for k, v in headers.items() if k in keep}
            elif items is None:
                continue
            elif name in _ADDRESS_FIELDS:
                _build_field(msg, defects, name, partial(_addresses, items, headers, name))
            elif name == "id":
                _build_field(msg, defects, name, lambda: _first(headers, "message-id").strip())
            elif name == "date":
                _build_field(msg, defects, name, lambda: _iso_date(_first(headers, "date")))
            elif name == "subject":
                _build_field(msg, defects, name, lambda: _first(headers, "subject"))
        if parsed is not None:
            defects.extend(f"message: {type(d).__name__}" for d in parsed.defects)
    if "raw" in fields:
        msg["raw"] = b64(data)
    return msg, defects


def _wanted_headers(needs: MessageNeeds) -> set[str] | None:
    """The header names the needed fields read (None: every header)."""
    fields = needs.fields
    if "headers" in fields and needs.header_names is None:
        return None
    names = set(needs.header_names or ()) if "headers" in fields else set()
    names.update(_HEADER_FIELDS[name] for name in fields if name in _HEADER_FIELDS)
    names.update(name for name in ("from", "to", "cc") if name in fields)
    return names


def _build_field(msg: dict[str, Any], defects: list[str], name: str,
                 build: Callable[[], Any]) -> None:
    try:
        msg[name] = build()
    except Exception as exc:
        defects.append(f"{name}: {type(exc).__name__}: {exc}"[:200])


def _empty_msg(data: bytes, needs: MessageNeeds) -> dict[str, Any]:
    """Every field with its value for a message that has none of it (`raw` if needed)."""
    return {"id": "", "date": "", "from": [], "to": [], "cc": [], "subject": "", "text": "",
            "html": "", "headers": {}, "attachments": [], "truncated": False,
            "raw": b64(data) if "raw" in needs.fields else ""}


def _parse_all(data: bytes, needs: MessageNeeds, limits: MimeLimits,
               cancel: threading.Event | None) -> tuple[dict[str, Any], list[str]]:
    defects: list[str] = []
    msg = _empty_msg(data, needs)
    try:
        tree = parse_tree(data, limits, cancel)
    except ParseCancelled:
        raise
    except Exception as exc:  # the parser is documented not to raise; stay safe if it does
        defects.append(f"message: unparseable ({type(exc).__name__})")
        return msg, defects
    parsed = tree.root
    if tree.truncated:
        msg["truncated"] = True
        defects.append(f"message: truncated, {tree.truncated}")

    def field(name: str, build: Callable[[], Any]) -> None:
        if name not in needs.fields and name != "headers":  # the header fields read that
            return
        try:
            msg[name] = build()
        except ParseCancelled:
            raise
        except Exception as exc:
            defects.append(f"{name}: {type(exc).__name__}: {exc}"[:200])

    _header_fields(msg, defects, list(parsed.raw_items()), needs)
    text_part = html_part = None
    try:
        text_part = parsed.get_body(preferencelist=("plain",))
        html_part = parsed.get_body(preferencelist=("html",))
    except Exception as exc:
        defects.append(f"body: {type(exc).__name__}: {exc}"[:200])
    field("text", lambda: _text_content(tree, text_part))
    field("html", lambda: _text_content(tree, html_part))
    bodies = {id(p) for p in (text_part, html_part) if p is not None}
    keep = ATTACHMENT_CONTENT in needs.fields
    field("attachments", lambda: _attachments(tree, bodies, keep, cancel))
    defects.extend(_defects(parsed))
    return msg, defects


def _header_fields(msg: dict[str, Any], defects: list[str], items: list[tuple[str, str]],
                   needs: MessageNeeds) -> None:
    """The fields read from the header section (`headers` always: the others read it)."""
    wanted = _wanted_headers(needs)  # decoding a header is costly: only the ones read
    _build_field(msg, defects, "headers", lambda: _headers_from(items, wanted))
    headers: dict[str, list[str]] = msg["headers"]
    fields = needs.fields
    if "id" in fields:
        _build_field(msg, defects, "id", lambda: _first(headers, "message-id").strip())
    if "date" in fields:
        _build_field(msg, defects, "date", lambda: _iso_date(_first(headers, "date")))
    if "subject" in fields:
        _build_field(msg, defects, "subject", lambda: _first(headers, "subject"))
    for name in ("from", "to", "cc"):
        if name in fields:
            _build_field(msg, defects, name, partial(_addresses, items, headers, name))


# The common message, one text/plain part (or no Content-Type at all), is read without the
# email parser when its header section is plain (split_header_section) and its MIME headers
# have the plain forms below; _parse_all reads every other message. Both give the same
# fields and defects (tests/test_message_simple.py holds them to it).
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+"
_PARAM = re.compile(rf'[ \t]*;[ \t]*([A-Za-z0-9_.-]+)=({_TOKEN}|"[ !#-\[\]-~]*")')
_TEXT_PLAIN = re.compile(rf"(?i:text/plain)(?:{_PARAM.pattern})*")
_SIMPLE_CTE = frozenset({"", "7bit", "8bit", "binary", "quoted-printable", "base64"})
_MIME_HEADERS = frozenset({"content-type", "content-transfer-encoding", "content-disposition"})


def _parse_simple(data: bytes, needs: MessageNeeds, limits: MimeLimits
                  ) -> tuple[dict[str, Any], list[str]] | None:
    """`_parse_all`'s result for a plain single-part text/plain message; None for any other."""
    end = header_section_end(data)
    if header_lines_cut(data, end, limits.max_header_lines) is not None:
        return None  # the full parse says where it stopped
    items = split_header_section(data[:end])
    if items is None:
        return None
    mime: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        if key in _MIME_HEADERS:
            if key in mime:
                return None
            mime[key] = value
    content_type = mime.get("content-type")
    charset = "ASCII"  # what get_content assumes without a charset parameter
    if content_type is not None:
        if not _TEXT_PLAIN.fullmatch(content_type):
            return None
        charset = next((value.strip('"') for name, value in _PARAM.findall(content_type)
                        if name.lower() == "charset"), charset)
    cte = mime.get("content-transfer-encoding", "").lower()
    disposition = mime.get("content-disposition")
    if cte not in _SIMPLE_CTE or (disposition is not None and disposition.lower() != "inline"):
        return None
    if limits.max_depth < 0 or exceeds_parts(data, limits.max_parts):
        return None  # the full parse says where it stopped (a pass over the whole message)
    defects: list[str] = []
    msg = _empty_msg(data, needs)
    decode_defects: list[MessageDefect] = []
    if "text" in needs.fields:
        if end < len(data):  # past the empty line, whichever line ending it has
            end += 2 if data.startswith(b"\r\n", end) else 1
        body: bytes | memoryview = memoryview(data)[end:]  # not a copy of a big body
        if cte == "quoted-printable":
            body = quopri.decodestring(body)
        elif cte == "base64":
            body, decode_defects = decode_b(b"".join(data[end:].splitlines()))
        try:
            text = str(body, charset, "replace")  # bytes.decode, for a view as well
        except (LookupError, UnicodeError, ValueError, AssertionError):
            return None  # the full parse has its own way with a charset it cannot use
        msg["text"] = _scrub(_lf(text))
    _header_fields(msg, defects, items, needs)
    defects.extend(f"message: {type(d).__name__}" for d in decode_defects)  # as _defects has them
    return msg, defects


def _first(headers: Mapping[str, list[str]], name: str) -> str:
    values = headers.get(name)
    return values[0] if values else ""


def _unfold(value: str) -> str:
    if "\n" not in value and "\r" not in value:
        return value
    return value.replace("\r\n", "").replace("\n", "").replace("\r", "")


def _headers_from(items: Iterable[tuple[str, str]], wanted: set[str] | None
                  ) -> dict[str, list[str]]:
    """Every header by lower-case name (or only the `wanted` names), values decoded."""
    by_name: dict[str, list[str]] = {}
    for name, value in items:
        key = _scrub(name.strip().lower())
        if wanted is not None and key not in wanted:
            continue
        by_name.setdefault(key, []).append(_decoded_header(name, value))
    return dict(sorted(by_name.items()))


def _decoded_header(name: str, raw_value: str) -> str:
    plain = plain_decoded(name, raw_value)  # the common plain forms: skip the tokenizer
    if plain is not None:
        return plain
    raw_value = _eight_bit(raw_value)
    try:
        return _scrub(_unfold(str(policy.default.header_fetch_parse(name, raw_value))))
    except Exception:  # the policy's header classes choke on some garbage; decode plainly
        try:
            return _scrub(_unfold(str(make_header(decode_header(raw_value)))))
        except Exception:
            return _scrub(_unfold(raw_value))


def _has_surrogates(text: str) -> bool:
    """Whether `text` holds a surrogate code point (U+D800..U+DFFF): the parser keeps each
    8-bit byte of a header as a lone one (U+DC80..U+DCFF). Strict UTF-8 encoding fails on
    exactly those, and is a C pass where a regex is a per-character walk."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _eight_bit(value: str) -> str:
    """A raw header value with its 8-bit bytes decoded: as UTF-8 (RFC 6532) when they are
    that, else as Latin-1 — one choice for the whole value."""
    if not _has_surrogates(value):
        return value
    data = value.encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _scrub(text: str) -> str:
    """`text` without lone surrogates (what an encoded word in an unknown charset, or a
    body codec, can leave), so the envelope is always valid UTF-8 JSON."""
    if not _has_surrogates(text):
        return text
    try:
        return _eight_bit(text)
    except UnicodeEncodeError:  # a surrogate no byte was escaped into
        return text.encode("utf-8", "replace").decode("utf-8")


@lru_cache(maxsize=64)
def _iso_date(value: str) -> str:
    if not value:
        return ""
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return ""
    if when.tzinfo is None:  # "-0000" or no zone: RFC 5322 says the zone is unknown; take UTC
        when = when.replace(tzinfo=UTC)
    try:
        return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError):
        return ""


def _addresses(
    items: Iterable[tuple[str, str]], headers: Mapping[str, list[str]], name: str
) -> list[dict[str, str]]:
    """`name`'s addresses as the policy's address headers give them (`get_all`), read from
    the raw items with their 8-bit bytes decoded."""
    try:
        pairs = [
            pair for key, value in items if key.lower() == name for pair in _mailboxes(key, value)
        ]
    except Exception:  # structured parse failed: fall back to the lenient classic parser
        pairs = email.utils.getaddresses(headers.get(name, []))
    out = []
    for display, addr in pairs:
        addr = "" if addr == "<>" else addr
        if addr or display:
            out.append({"name": _scrub(_unfold(display)), "addr": _scrub(addr)})
    return out


def _mailboxes(name: str, raw_value: str) -> list[tuple[str, str]]:
    plain = plain_addresses(raw_value)
    if plain is not None:
        return plain
    return [(a.display_name, a.addr_spec)
            for a in policy.default.header_fetch_parse(name, _eight_bit(raw_value)).addresses]


def _text_content(tree: MimeTree, part: Message | None) -> str:
    if part is None:
        return ""
    tree.restore(part)
    try:
        content = part.get_content() if isinstance(part, EmailMessage) else None
        if isinstance(content, str):
            return _scrub(_lf(content))
    except (LookupError, UnicodeError, ValueError, AssertionError):
        pass  # unknown or lying charset: decode the bytes ourselves below
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return _scrub(_lf(payload.decode(charset, errors="replace")))
    except LookupError:
        return _lf(payload.decode("utf-8", errors="replace"))


def _lf(text: str) -> str:
    """Bodies use "\n" line ends, as rule authors write them in regexes; `raw` keeps CRLF."""
    if "\r" not in text:
        return text
    # Universal newlines turn CRLF and a lone CR into LF in one C pass (str.replace finds each
    # CRLF with a search of its own); a text with a lone CR keeps it, so it is replaced instead.
    decoder = io.IncrementalNewlineDecoder(None, translate=True)
    lf = decoder.decode(text, final=True)
    seen = decoder.newlines
    if "\r" in (seen if isinstance(seen, tuple) else (seen,)):
        return text.replace("\r\n", "\n")
    return lf


def _attachments(tree: MimeTree, bodies: set[int], keep: bool,
                 cancel: threading.Event | None) -> list[dict[str, Any]]:
    """Every leaf but the bodies; `content` only with `keep`."""
    parsed = tree.root
    out = []
    for part in leaves(parsed):
        if id(part) in bodies:
            continue
        if (part is parsed and part.get_content_maintype() == "text"
                and not (isinstance(part, EmailMessage) and part.is_attachment())):
            continue  # a single-part text message is a body, even one get_body passed over
        if cancel is not None and cancel.is_set():
            raise ParseCancelled
        size, sha256, content = _part_bytes(tree, part, keep)
        attachment = {
            "name": _scrub(_unfold(part.get_filename() or "")),
            "type": _scrub(part.get_content_type()),
            "size": size,
            "sha256": sha256,
        }
        if content is not None:
            attachment["content"] = b64(content)
        out.append(attachment)
    return out


def _part_bytes(tree: MimeTree, part: Message, keep: bool) -> tuple[int, str, bytes | None]:
    """(size, sha256, content if `keep`) of an attachment's bytes."""
    if part.get_content_maintype() == "message":
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            content = inner[0].as_bytes(policy=policy.default.clone(linesep="\r\n"))
            return len(content), hashlib.sha256(content).hexdigest(), content if keep else None
    return tree.leaf_bytes(part, keep)


def _defects(parsed: Message) -> list[str]:
    found: list[str] = []
    for index, part in enumerate(parsed.walk()):
        where = "message" if index == 0 else f"part {index} ({part.get_content_type()})"
        found.extend(f"{where}: {type(d).__name__}" for d in part.defects)
    return found


def build_envelope(
    *,
    rid: str,
    route: Route,
    listener: str,
    client_ip: str,
    helo: str,
    mail_from: str,
    size: int,
    rcpt: Sequence[str],
    transaction_rcpt: Sequence[str],
    msg: Mapping[str, Any],
) -> dict[str, Any]:
    """One group's envelope (docs/lmtp.md § The envelope). `msg` is shared, not copied, between groups:
    the runner never mutates its input and rules may not write under `_txc.lmtp`."""
    return {
        "_txc": {
            "src": "lmtp",
            "rid": rid,
            "route": {
                "tenant": route.tenant,
                "stack": route.stack,
                "ingress": route.ingress,
                "to": route.to,
            },
            "lmtp": {
                "listener": listener,
                "client": {"ip": client_ip, "helo": helo},
                "mail": {"from": mail_from, "size": size},
                "rcpt": list(rcpt),
                "transaction_rcpt": list(transaction_rcpt),
                "msg": msg,
            },
        }
    }
