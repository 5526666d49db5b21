"""op://EMIT: append the envelope as one JSON line to the stack's event log.

The log is `events.jsonl` in the stack's storage. Each append is one write() on an
O_APPEND descriptor under an exclusive flock, then fsync: lines from concurrent deliveries
(threads, coroutines, processes) never interleave, and a returned offset is on disk.

This module also owns the envelope-as-event document that WEBHOOK posts: raw message
bytes and attachment content are left out unless a rule asks for them.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from txcl.builtin_ops.archive import fsync_dir
from txcl.ops import Op, OpContext, OpFailure

EVENT_LOG = "events.jsonl"


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
    txc = envelope.get("_txc")
    src = txc.get("src") if isinstance(txc, Mapping) else None
    section = txc.get(src) if isinstance(src, str) else None
    msg = section.get("msg") if isinstance(section, Mapping) else None
    if not isinstance(msg, Mapping) or (include_raw and include_attachments):
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
    return {**envelope, "_txc": {**txc, src: {**section, "msg": slim}}}


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
    return text.encode("utf-8")


def append_line(path: Path, line: bytes) -> int:
    """Append `line` durably and return the byte offset at which it starts."""
    new_file = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        end = os.lseek(fd, 0, os.SEEK_CUR)
        os.fsync(fd)
    finally:
        os.close(fd)  # also releases the flock
    if new_file:  # the log's directory entry must be as durable as its first line
        fsync_dir(path.parent)
    return end - len(line)


def emit(envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: OpContext) -> dict:
    """op://EMIT [WITH include_raw = true] [WITH include_attachments = true]."""
    line = event_json(envelope, args, "EMIT") + b"\n"
    log = ctx.storage() / EVENT_LOG
    offset = append_line(log, line)
    return {"emit": {"log": str(log), "offset": offset}}


OPS: dict[str, Op] = {"EMIT": emit}
