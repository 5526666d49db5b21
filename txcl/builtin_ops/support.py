"""What the built-in ops share, so that no op imports another.

- the envelope's source section and the raw message, whichever head delivered it: the
  bytes the source handed over with the call (`OpContext.message`; the LMTP head always
  does), else `_txc.<src>.msg.raw` (`"b64:..."`);
- the envelope as an event document (EMIT writes it, WEBHOOK posts it), leaving out raw
  bytes and attachment content unless a rule asks for them;
- boolean WITH arguments;
- durable directory entries (`fsync_dir`);
- the deadline of the network ops: a socket timeout bounds each wait, and a watchdog shuts
  the socket down when the whole budget is spent, so a peer that trickles bytes cannot
  stretch a call past its deadline.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from txcl.envelope import TXC, section_of, source_of
from txcl.ops import OpContext, OpFailure

B64_PREFIX = "b64:"


# --- the envelope's source section and the raw message ----------------------------------


def source_section(envelope: Mapping[str, Any], op: str) -> Mapping[str, Any]:
    """`_txc.<src>`, the part of the envelope the source stamped; raises when absent."""
    section = section_of(envelope)
    if section is None:
        raise OpFailure(f"{op}: the envelope names no source section (_txc.src and _txc.<src>)")
    return section


def raw_base64(envelope: Mapping[str, Any], op: str) -> str:
    """`_txc.<src>.msg.raw` as it is, `"b64:..."`; raises when absent or of another form."""
    msg = source_section(envelope, op).get("msg")
    raw = msg.get("raw") if isinstance(msg, Mapping) else None
    if not isinstance(raw, str) or not raw.startswith(B64_PREFIX):
        raise OpFailure(
            f'{op}: the envelope has no raw message at _txc.{source_of(envelope)}.msg.raw ("b64:...")'
        )
    return raw


def raw_message(envelope: Mapping[str, Any], op: str, ctx: OpContext | None = None) -> bytes:
    """The message exactly as it arrived: the bytes the source handed over with the call
    (`ctx.message`), else `_txc.<src>.msg.raw` decoded from `"b64:..."`."""
    if ctx is not None and ctx.message is not None:
        return ctx.message
    raw = raw_base64(envelope, op)
    try:
        return base64.b64decode(raw[len(B64_PREFIX) :], validate=True)
    except binascii.Error as exc:
        raise not_base64(envelope, op, exc) from None


def not_base64(envelope: Mapping[str, Any], op: str, error: binascii.Error) -> OpFailure:
    """The failure for a `_txc.<src>.msg.raw` that does not decode."""
    return OpFailure(f"{op}: _txc.{source_of(envelope)}.msg.raw is not valid base64: {error}")


# --- the envelope as an event -------------------------------------------------------------


def flag_argument(args: Mapping[str, Any], op: str, name: str) -> bool:
    """A boolean WITH argument, false when absent; anything but true/false is refused."""
    value = args.get(name, False)
    if not isinstance(value, bool):
        raise OpFailure(f"{op}: {name} must be true or false, not {value!r}")
    return value


def event_document(
    envelope: Mapping[str, Any], *, include_raw: bool, include_attachments: bool
) -> Mapping[str, Any]:
    """The envelope without `_txc.<src>.msg.raw` and attachment `content`, unless included.

    Only the containers on the way to what is left out are copied; the envelope itself is
    never changed.
    """
    src = source_of(envelope)
    section = section_of(envelope, src)
    if src is None or section is None or (include_raw and include_attachments):
        return envelope
    msg = section.get("msg")
    if not isinstance(msg, Mapping):
        return envelope
    slim = dict(msg)
    if not include_raw:
        slim.pop("raw", None)
    attachments = msg.get("attachments")
    if not include_attachments and isinstance(attachments, list):
        slim["attachments"] = [
            {k: v for k, v in a.items() if k != "content"} if isinstance(a, Mapping) else a
            for a in attachments
        ]
    return {**envelope, TXC: {**envelope[TXC], src: {**section, "msg": slim}}}


def event_json(envelope: Mapping[str, Any], args: Mapping[str, Any], op: str) -> bytes:
    """The event document as compact UTF-8 JSON, honouring include_raw/include_attachments."""
    document = event_document(
        envelope,
        include_raw=flag_argument(args, op, "include_raw"),
        include_attachments=flag_argument(args, op, "include_attachments"),
    )
    try:
        text = json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise OpFailure(f"{op}: the envelope cannot be written as JSON: {exc}") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (8-bit header bytes kept by surrogateescape) has no UTF-8 form;
        # as a JSON \u escape the line is still JSON, and the message is not refused for it.
        return json.dumps(document, separators=(",", ":"), allow_nan=False).encode("ascii")


# --- files ----------------------------------------------------------------------------------


def fsync_dir(path: str | Path) -> None:
    """Make the entries of a directory (a file created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the network ops' deadline --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deadline:
    """When a network op's budget ends; `fired` is set once the watchdog has cut the socket."""

    at: float
    fired: threading.Event

    def passed(self) -> bool:
        return self.fired.is_set() or time.monotonic() >= self.at


@contextlib.contextmanager
def socket_deadline(
    seconds: float, current_socket: Callable[[], socket.socket | None]
) -> Iterator[Deadline]:
    """Shut the current socket down after `seconds`, ending any read or write blocked on it."""
    deadline = Deadline(time.monotonic() + seconds, threading.Event())

    def expire() -> None:
        deadline.fired.set()
        sock = current_socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(seconds, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield deadline
    finally:
        watchdog.cancel()
