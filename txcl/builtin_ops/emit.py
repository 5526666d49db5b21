"""op://EMIT: append the envelope as one JSON line to the stack's event log.

The log is `events.jsonl` in the stack's storage. Each append is one write() on an
O_APPEND descriptor under an exclusive flock, then fsync: lines from concurrent deliveries
(threads, coroutines, processes) never interleave, and a returned offset is on disk.
The line is the envelope as an event (`support.event_json`, what WEBHOOK posts too).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from txcl.builtin_ops.once import once
from txcl.builtin_ops.support import event_json, fsync_dir
from txcl.ops import ANYTHING, OpContext, RegisteredOp

EVENT_LOG = "events.jsonl"


def append_line(path: Path, line: bytes) -> int:
    """Append `line` (ending in a newline) durably and return the byte offset at which it
    starts.

    Whole or not at all: one write(); on a short write or any error (a full disk, a failed
    fsync) the file is cut back to its size before, so a half line never stays for the
    next one to be appended to. A log that ends in a partial line all the same (a power
    cut) gets a newline before the next line, so that line is whole JSON."""
    new_file = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        before = offset = os.fstat(fd).st_size
        if before and os.pread(fd, 1, before - 1) != b"\n":
            line = b"\n" + line
            offset += 1
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"wrote {written} of {len(line)} bytes", str(path))
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, before)
            raise
    finally:
        os.close(fd)  # also releases the flock
    if new_file:  # the log's directory entry must be as durable as its first line
        fsync_dir(path.parent)
    return offset


def emit(envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: OpContext) -> dict:
    """op://EMIT [WITH include_raw = true] [WITH include_attachments = true]."""
    line = event_json(envelope, args, "EMIT") + b"\n"
    log = ctx.storage() / EVENT_LOG
    offset = append_line(log, line)
    return {"emit": {"log": str(log), "offset": offset}}


OP = RegisteredOp.builtin("EMIT", once("EMIT", emit), ANYTHING)  # the whole envelope
