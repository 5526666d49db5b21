"""op://ARCHIVE: store the exact raw message in the stack's own Maildir.

Standard Maildir delivery (write into tmp/, fsync, rename into new/, fsync new/), so that
a rule which sets 250 and EXECs ARCHIVE has the message on disk before Postfix hears 250,
and any mail client (Dovecot, mutt, Python's mailbox.Maildir) can read the folder.

This module also reads the raw message out of an envelope for the other built-ins: the
envelope's source `_txc.src` names where it lives (`_txc.<src>.msg.raw`, `"b64:..."`),
so nothing here knows which head delivered it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from txcl.ops import Op, OpContext, OpFailure, StorageError

MAILDIR = "Maildir"
SUBDIRS = ("tmp", "new", "cur")
# One Maildir++ folder name ("Support", "Support.Urgent"): dot-separated, no empty part,
# so neither ".." nor a leading or trailing dot can make a path outside the Maildir.
FOLDER_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
FOLDER_MAX_LEN = 200


def source_section(envelope: Mapping[str, Any], op: str) -> Mapping[str, Any]:
    """`_txc.<src>`, the part of the envelope the source stamped; raises when absent."""
    txc = envelope.get("_txc")
    src = txc.get("src") if isinstance(txc, Mapping) else None
    section = txc.get(src) if isinstance(src, str) and src else None
    if not isinstance(section, Mapping):
        raise OpFailure(f"{op}: the envelope names no source section (_txc.src and _txc.<src>)")
    return section


def raw_message(envelope: Mapping[str, Any], op: str) -> bytes:
    """The message exactly as it arrived: `_txc.<src>.msg.raw` decoded from `"b64:..."`."""
    msg = source_section(envelope, op).get("msg")
    raw = msg.get("raw") if isinstance(msg, Mapping) else None
    src = envelope["_txc"]["src"]
    if not isinstance(raw, str) or not raw.startswith("b64:"):
        raise OpFailure(f'{op}: the envelope has no raw message at _txc.{src}.msg.raw ("b64:...")')
    try:
        return base64.b64decode(raw[4:], validate=True)
    except binascii.Error as exc:
        raise OpFailure(f"{op}: _txc.{src}.msg.raw is not valid base64: {exc}") from None


def folder_argument(args: Mapping[str, Any]) -> str:
    """The validated `folder` argument; "" for the Maildir's inbox."""
    folder = args.get("folder", "")
    if folder is None or folder == "":
        return ""
    if (
        not isinstance(folder, str)
        or len(folder) > FOLDER_MAX_LEN
        or not FOLDER_NAME.fullmatch(folder)
    ):
        raise StorageError(
            f"ARCHIVE: folder {folder!r} is refused: a folder name is letters, digits, "
            "'_', '-' and single dots between them (Maildir++ levels), at most "
            f"{FOLDER_MAX_LEN} characters"
        )
    return folder


def _host_part() -> str:
    # The Maildir spec's escapes for the two characters a file name may not carry here.
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072")


def unique_name() -> str:
    """`<sec>.M<usec>P<pid>R<random>.<host>`: unique across processes, threads and hosts."""
    now = time.time()
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    return f"{seconds}.M{micros}P{os.getpid()}R{secrets.token_hex(8)}.{_host_part()}"


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory (a file created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_maildir(path: Path, *, subfolder: bool, durable_up_to: Path) -> None:
    """Create tmp/ new/ cur/ (and the Maildir++ `maildirfolder` marker) when missing.

    A folder made here is fsynced, with every folder above it up to `durable_up_to`, so the
    first message stored in it does not vanish with a directory entry after a power cut.
    """
    if all((path / sub).is_dir() for sub in SUBDIRS):
        return
    for sub in SUBDIRS:
        (path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    if subfolder:
        (path / "maildirfolder").touch(mode=0o600, exist_ok=True)
    for folder in (path, *path.parents):
        fsync_dir(folder)
        if folder == durable_up_to or folder == folder.parent:
            break


def deliver(maildir: Path, data: bytes) -> Path:
    """Durably deliver `data` into `maildir/new/` and return the file's path."""
    name = unique_name()
    tmp_path = maildir / "tmp" / name
    new_path = maildir / "new" / name
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_path, new_path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(maildir / "new")
    return new_path


def archive(envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: OpContext) -> dict:
    """op://ARCHIVE [WITH folder = "Support"]: the raw message into the stack's Maildir."""
    folder = folder_argument(args)
    data = raw_message(envelope, "ARCHIVE")
    root = ctx.storage(MAILDIR)
    state_dir = Path(ctx.state_dir or root)
    ensure_maildir(root, subfolder=False, durable_up_to=state_dir)
    target = ctx.storage(MAILDIR, "." + folder) if folder else root
    if folder:
        ensure_maildir(target, subfolder=True, durable_up_to=root)
    path = deliver(target, data)
    return {
        "archive": {
            "maildir": str(root),
            "folder": folder,
            "path": str(path),
            "key": path.name,
            "size": len(data),
        }
    }


OPS: dict[str, Op] = {"ARCHIVE": archive}
