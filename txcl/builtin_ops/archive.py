"""op://ARCHIVE: store the exact raw message in the stack's own Maildir.

Standard Maildir delivery (write into tmp/, fsync, rename into new/, fsync new/), so that
a rule which sets 250 and EXECs ARCHIVE has the message on disk before Postfix hears 250,
and any mail client (Dovecot, mutt, Python's mailbox.Maildir) can read the folder.

This module also reads the raw message for the other built-ins: the bytes the source
handed over with the call (`OpContext.message`; the LMTP head always does), else out of the
envelope, where its source `_txc.src` names the place (`_txc.<src>.msg.raw`, `"b64:..."`),
so nothing here knows which head delivered it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from txcl.ops import Op, OpContext, OpFailure, StorageError

MAILDIR = "Maildir"
SUBDIRS = ("tmp", "new", "cur")
# One Maildir++ folder name ("Support", "Support.Urgent"): dot-separated, no empty part,
# so neither ".." nor a leading or trailing dot can make a path outside the Maildir.
FOLDER_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
FOLDER_MAX_LEN = 200
# Characters of base64 decoded per slice (a multiple of 4, so every slice is whole quads):
# a 25 MiB message is written from 768 KiB pieces instead of three full-size copies.
DECODE_CHUNK = 4 * 2**18

# Maildirs (tmp/ new/ cur/ all present) this process has delivered into: their folder checks
# are skipped; a delivery that finds one deleted forgets it, recreates it and retries once.
_known_maildirs: set[Path] = set()
_known_maildirs_lock = threading.Lock()


def source_section(envelope: Mapping[str, Any], op: str) -> Mapping[str, Any]:
    """`_txc.<src>`, the part of the envelope the source stamped; raises when absent."""
    txc = envelope.get("_txc")
    src = txc.get("src") if isinstance(txc, Mapping) else None
    section = txc.get(src) if isinstance(src, str) and src else None
    if not isinstance(section, Mapping):
        raise OpFailure(f"{op}: the envelope names no source section (_txc.src and _txc.<src>)")
    return section


def raw_base64(envelope: Mapping[str, Any], op: str) -> str:
    """`_txc.<src>.msg.raw` as it is, `"b64:..."`; raises when absent or of another form."""
    msg = source_section(envelope, op).get("msg")
    raw = msg.get("raw") if isinstance(msg, Mapping) else None
    if not isinstance(raw, str) or not raw.startswith("b64:"):
        src = envelope["_txc"]["src"]
        raise OpFailure(f'{op}: the envelope has no raw message at _txc.{src}.msg.raw ("b64:...")')
    return raw


def raw_message(envelope: Mapping[str, Any], op: str, ctx: OpContext | None = None) -> bytes:
    """The message exactly as it arrived: the bytes the source handed over with the call
    (`ctx.message`), else `_txc.<src>.msg.raw` decoded from `"b64:..."`."""
    if ctx is not None and ctx.message is not None:
        return ctx.message
    raw = raw_base64(envelope, op)
    try:
        return base64.b64decode(raw[4:], validate=True)
    except binascii.Error as exc:
        raise not_base64(envelope, op, exc) from None


def not_base64(envelope: Mapping[str, Any], op: str, error: binascii.Error) -> OpFailure:
    """The failure for a `_txc.<src>.msg.raw` that does not decode."""
    src = envelope["_txc"]["src"]
    return OpFailure(f"{op}: _txc.{src}.msg.raw is not valid base64: {error}")


def write_base64(fd: int, text: str, start: int) -> int:
    """Decode `text[start:]` (strict base64) into `fd` slice by slice; the bytes written.

    Writes and raises exactly what one `binascii.a2b_base64(text[start:], strict_mode=True)`
    would. A slice of whole quads decodes alone as it does within the text unless padding
    is involved: a slice that is not the last may hold `=` only as its ending run, and the
    last one differs only when it starts with `=`. Those cases, and any error, go to the
    whole-text decode, which has the final say (and the exact error message).
    """
    written = 0
    end = len(text)
    for i in range(start, end, DECODE_CHUNK):
        piece = text[i : i + DECODE_CHUNK]
        last = i + DECODE_CHUNK >= end
        if (not last and piece.endswith("=")) or (last and i > start and piece[0] == "="):
            return _write_whole(fd, text, start)
        try:
            data = binascii.a2b_base64(piece, strict_mode=True)
        except binascii.Error:
            return _write_whole(fd, text, start)
        written += _write_all(fd, data)
    return written


def _write_whole(fd: int, text: str, start: int) -> int:
    data = binascii.a2b_base64(text[start:], strict_mode=True)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    return _write_all(fd, data)


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


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


@functools.cache
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


class SharedDirSync:
    """fsync of one directory, shared by the threads that renamed into it meanwhile.

    A directory fsync makes durable every entry changed before it started, so a thread
    whose rename is done needs only *one* fsync that starts after that moment, not one of
    its own: while one runs, the threads that arrive wait for the next, and that one
    covers them all (group commit). Generation numbers say which fsync covers whom.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._next = 1  # the generation the next fsync to start will have
        self._done = 0  # the newest generation finished
        self._running = False
        self._error: tuple[int, OSError] | None = None  # (generation, what it raised)

    def sync(self) -> None:
        """Return once an fsync of the directory that started after this call has ended."""
        with self._cond:
            needed = self._next
            while self._done < needed:
                if self._running:
                    self._cond.wait()
                    continue
                generation, self._next = self._next, self._next + 1
                self._running = True
                self._cond.release()
                error: OSError | None = None
                try:
                    fsync_dir(self.path)
                except OSError as exc:
                    error = exc
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._done = generation
                    self._error = (generation, error) if error else None
                    self._cond.notify_all()
            if self._error is not None and self._error[0] == self._done:
                failed = self._error[1]  # a fresh exception per thread, same errno and type
                raise OSError(failed.errno, failed.strerror, failed.filename)


# Bounded like the folder names it is keyed by; one dropped while in use still works.
_dir_syncs: dict[Path, SharedDirSync] = {}
_dir_syncs_lock = threading.Lock()
_DIR_SYNCS_MAX = 4096


def shared_fsync_dir(path: Path) -> None:
    """fsync_dir, sharing one fsync among threads delivering into `path` at the same time."""
    with _dir_syncs_lock:
        syncer = _dir_syncs.get(path)
        if syncer is None:
            if len(_dir_syncs) >= _DIR_SYNCS_MAX:
                _dir_syncs.clear()
            syncer = _dir_syncs[path] = SharedDirSync(path)
    syncer.sync()


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


def deliver(maildir: Path, write: Callable[[int], int]) -> tuple[Path, int]:
    """Durably deliver what `write(fd)` writes into `maildir/new/`: its path and size.

    A write (or anything after it) that fails removes the file from tmp/ before raising.
    """
    name = unique_name()
    tmp_path = maildir / "tmp" / name
    new_path = maildir / "new" / name
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            size = write(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_path, new_path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    shared_fsync_dir(maildir / "new")
    return new_path, size


def _ensure_known(path: Path, *, subfolder: bool, durable_up_to: Path) -> None:
    with _known_maildirs_lock:
        if path in _known_maildirs:
            return
    ensure_maildir(path, subfolder=subfolder, durable_up_to=durable_up_to)


def _remember(*paths: Path) -> None:
    with _known_maildirs_lock:
        _known_maildirs.update(paths)


def _forget(*paths: Path) -> None:
    with _known_maildirs_lock:
        _known_maildirs.difference_update(paths)


def archive(envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: OpContext) -> dict:
    """op://ARCHIVE [WITH folder = "Support"]: the raw message into the stack's Maildir."""
    folder = folder_argument(args)
    message = ctx.message
    raw = raw_base64(envelope, "ARCHIVE") if message is None else ""
    root = ctx.storage(MAILDIR)
    state_dir = Path(ctx.state_dir or root)
    target = ctx.storage(MAILDIR, "." + folder) if folder else root

    def write(fd: int) -> int:
        if message is not None:
            return _write_all(fd, message)
        try:
            return write_base64(fd, raw, 4)
        except binascii.Error as exc:
            raise not_base64(envelope, "ARCHIVE", exc) from None

    def store() -> tuple[Path, int]:
        _ensure_known(root, subfolder=False, durable_up_to=state_dir)
        if folder:
            _ensure_known(target, subfolder=True, durable_up_to=root)
        return deliver(target, write)

    try:
        path, size = store()
    except FileNotFoundError:
        # A Maildir this process knew was deleted under it: recreate it, once.
        _forget(root, target)
        path, size = store()
    _remember(root, target)
    return {
        "archive": {
            "maildir": str(root),
            "folder": folder,
            "path": str(path),
            "key": path.name,
            "size": size,
        }
    }


OPS: dict[str, Op] = {"ARCHIVE": archive}
