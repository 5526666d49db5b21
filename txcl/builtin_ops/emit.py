"""op://EMIT: append the envelope as one JSON line to the stack's event log.

The log is `events.jsonl` in the stack's storage. Each append is one write() on an
O_APPEND descriptor under an exclusive flock, then fsync: lines from concurrent deliveries
(threads, coroutines, processes) never interleave, and a returned offset is on disk.
The line is the envelope as an event (`support.event_json`, what WEBHOOK posts too).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from txcl.builtin_ops.support import event_json, fsync_dir, once
from txcl.ops import ANYTHING, OpContext, RegisteredOp

EVENT_LOG = "events.jsonl"


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


OP = RegisteredOp.builtin("EMIT", once("EMIT", emit), ANYTHING)  # the whole envelope
