"""A trace's folder on disk, and the stored traces kept within their limits.

`write_trace` and `reuse_trace` put one trace's files (`trace.jsonl`, `message.eml`) into
`<state-dir>/requests/<rid>/` (`txcl.trace_store` describes the form and reads it back);
`StoredTraces` is the retention of one writer: it knows the stored traces, reuses the folder
of the one the count limit removes, and keeps them within their count, age and total bytes.

Only the standard library is imported here, and no more of it than the work needs (not
dataclasses, typing or pathlib: each costs the file process up to a megabyte and a half of
its own memory): the trace writer's file process (`txcl.trace_process`) runs this module
and little else.
"""

from __future__ import annotations

import _thread
import contextlib
import errno
import functools
import os
import time
from collections import deque

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see the docstring)
if TYPE_CHECKING:
    from typing import Final, Protocol

    class LinkedMessage(Protocol):
        """A message already in a file of its own (a staged one): a trace links it, not
        writes it."""

        def link(self, path: str) -> int:
            """Make `path` the file (a hard link, or a copy); the bytes it holds."""
            ...

    StoredMessage = bytes | LinkedMessage
    """What a trace stores beside its JSON: the message bytes, or a file that holds them."""

TRACE_FILE: Final = "trace.jsonl"
MESSAGE_FILE: Final = "message.eml"
FOLDER_MODE: Final = 0o700
FILE_MODE: Final = 0o600
TMP_PREFIX: Final = ".tmp-"
# A temporary folder this old is the leftover of an interrupted write.
STALE_WRITE_S: Final = 3600.0



def link_or_copy(source: str, path: str) -> None:
    """`path` becomes `source` (a hard link; a private copy where no link can be made)."""
    try:
        os.link(source, path)
    except OSError:
        import shutil  # rarely needed: not imported by the file process until then

        shutil.copyfile(source, path)
        os.chmod(path, FILE_MODE)


class StagedFile:
    """A file that holds a trace's message, by its path and size: a staged message's, or
    (`maildir`) the copy ARCHIVE delivered into a Maildir's new/, which a mail client may
    have moved to cur/ (adding its flags to the name) by the time the trace links it."""

    __slots__ = ("path", "size", "maildir")

    def __init__(self, path: str, size: int, maildir: bool = False) -> None:
        self.path = path
        self.size = size
        self.maildir = maildir

    def link(self, path: str) -> int:
        """Make `path` the file; the bytes it holds. A Maildir copy deleted meanwhile (or
        filed elsewhere) leaves no file, and the trace is stored without its message."""
        try:
            link_or_copy(self.path, path)
        except FileNotFoundError:
            if not self.maildir:
                raise
            moved = _moved_to_cur(self.path)
            try:
                if moved is None:
                    return 0
                link_or_copy(moved, path)
            except FileNotFoundError:  # and deleted from cur/ meanwhile
                return 0
        return self.size


def _moved_to_cur(path: str) -> str | None:
    """Where a Maildir message delivered to `.../new/<name>` sits once read: `.../cur/<name>:2,…`."""
    new, name = os.path.split(path)
    cur = os.path.join(os.path.dirname(new), "cur")
    with contextlib.suppress(OSError), os.scandir(cur) as entries:
        for entry in entries:
            if entry.name == name or entry.name.startswith(name + ":"):
                return entry.path
    return None


def private_folder(path: str | os.PathLike[str]) -> None:
    """`path` exists as a folder only its owner can enter (created or tightened)."""
    os.makedirs(path, mode=FOLDER_MODE, exist_ok=True)
    if os.stat(path).st_mode & 0o777 != FOLDER_MODE:
        os.chmod(path, FOLDER_MODE)


@functools.cache
def _pid() -> int:
    """os.getpid(), a system call each time, once per process (forgotten in a fork's child)."""
    return os.getpid()


os.register_at_fork(after_in_child=_pid.cache_clear)


@functools.cache
def umask_keeps_owner_bits() -> bool:
    """The process umask leaves FOLDER_MODE and FILE_MODE as they are (it clears no bit of
    the owner's), so what is created with them needs no chmod; read once, from
    /proc/self/status (reading it with os.umask would change it for a moment, for every
    thread). False where that cannot be read: then every mode is set explicitly."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8) & 0o700 == 0
    except (OSError, ValueError, IndexError):
        pass
    return False


def write_private(path: str, data: bytes) -> int:
    """Write a new file readable by its owner only; returns the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        if not umask_keeps_owner_bits():
            os.fchmod(fd, FILE_MODE)  # the umask may have taken bits away
        _write_all(fd, data)
    finally:
        os.close(fd)
    return len(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def remove_trace(folder: str) -> None:
    """Remove one trace folder (its files, then itself); anything unexpected in it too."""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                os.unlink(entry.path)
        os.rmdir(folder)
    except FileNotFoundError:
        pass
    except OSError:
        _rmtree(folder, ignore_errors=True)


def write_trace(
    root: str | os.PathLike[str], name: str, lines: list[bytes], message: StoredMessage | None
) -> tuple[str, int]:
    """One trace's files, written into a private temporary folder that is then renamed to
    `root/<name>` (or `<name>.1`, `<name>.2`… when one rid has several runs), so a trace
    appears whole or not at all. Returns the folder's name and the bytes written."""
    base = os.fspath(root)
    tmp = f"{base}/{TMP_PREFIX}{name}-{_pid()}-{_thread.get_ident()}"
    os.mkdir(tmp, FOLDER_MODE)
    try:
        if not umask_keeps_owner_bits():
            os.chmod(tmp, FOLDER_MODE)  # the umask may have taken bits away
        size = write_private(f"{tmp}/{TRACE_FILE}", b"".join(lines))
        if isinstance(message, bytes):
            size += write_private(f"{tmp}/{MESSAGE_FILE}", message)
        elif message is not None:
            size += message.link(f"{tmp}/{MESSAGE_FILE}")
        return _publish(base, tmp, name), size
    except BaseException:
        _rmtree(tmp, ignore_errors=True)
        raise


def _overwrite_private(path: str, data: bytes) -> int:
    """Write `data` over an existing file (a new private one if missing), cutting what is
    left of the old content. A file with other links (a staged message another trace links
    to) is replaced, not written through."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return write_private(path, data)
    try:
        info = os.fstat(fd)
        if info.st_nlink <= 1:
            _write_all(fd, data)
            # Cut only a longer old file: a same-size ftruncate costs ext4 more than the fstat.
            if info.st_size > len(data):
                os.ftruncate(fd, len(data))
            return len(data)
    finally:
        os.close(fd)
    os.unlink(path)
    return write_private(path, data)


def reuse_trace(root: str | os.PathLike[str], old: str, name: str, lines: list[bytes],
                message: StoredMessage | None) -> tuple[str, int]:
    """`write_trace`, in the folder of the trace `old` (one this writer wrote, and that
    retention removes now): its files are overwritten in place, so a trace at the retention
    limit neither allocates nor frees an inode, which costs ext4 far more than the writes
    once many have been freed recently. `old` leaves its name before it changes, so no
    reader sees a mixture; FileNotFoundError if `old` is gone."""
    base = os.fspath(root)
    tmp = f"{base}/{TMP_PREFIX}{name}-{_pid()}-{_thread.get_ident()}"
    os.utime(f"{base}/{old}")  # a fresh mtime: not a stale leftover, and ordered as new
    os.rename(f"{base}/{old}", tmp)
    try:
        size = _overwrite_private(f"{tmp}/{TRACE_FILE}", b"".join(lines))
        if isinstance(message, bytes):
            size += _overwrite_private(f"{tmp}/{MESSAGE_FILE}", message)
        elif message is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{tmp}/{MESSAGE_FILE}")
            size += message.link(f"{tmp}/{MESSAGE_FILE}")
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{tmp}/{MESSAGE_FILE}")
        return _publish(base, tmp, name), size
    except BaseException:
        _rmtree(tmp, ignore_errors=True)
        raise


def _publish(base: str, tmp: str, name: str) -> str:
    """Rename the finished folder `tmp` to `base/<name>` (or `<name>.1`, `<name>.2`…);
    returns the name it got."""
    n = 0
    while True:
        final = name if n == 0 else f"{name}.{n}"
        try:
            os.rename(tmp, f"{base}/{final}")  # fails on an existing trace: it is never empty
            return final
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            n += 1


class TraceEntry:
    """A stored trace's folder name and when it was last written."""

    __slots__ = ("name", "mtime")

    def __init__(self, name: str, mtime: float) -> None:
        self.name = name
        self.mtime = mtime


def mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def scan(root: str | os.PathLike[str]) -> list[TraceEntry]:
    """Trace folders, oldest first (by mtime, then by name: rids sort by time)."""
    try:
        entries = [
            TraceEntry(e.name, mtime(e))
            for e in os.scandir(root)
            if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
        ]
    except FileNotFoundError:
        return []
    return sorted(entries, key=lambda e: (e.mtime, e.name))


def folder_size(path: str | os.PathLike[str]) -> int:
    """The bytes of the files directly in a trace folder."""
    try:
        with os.scandir(path) as entries:
            return sum(e.stat(follow_symlinks=False).st_size for e in entries if e.is_file())
    except OSError:
        return 0


class StoredTraces:
    """The traces under `root` that one writer keeps: it writes each (`store`), and keeps
    them within `keep_count`, `keep_bytes` in total and `keep_age_s` (`prune`). At the
    count limit the oldest trace's folder, when this writer wrote it, is reused for the new
    one. Not thread-safe: one thread (or process) stores and prunes."""

    def __init__(self, root: str | os.PathLike[str], keep_count: int, keep_age_s: float,
                 keep_bytes: int) -> None:
        self.root = os.fspath(root)
        self.keep_count = max(1, int(keep_count))
        self.keep_age_s = float(keep_age_s)
        self.keep_bytes = max(1, int(keep_bytes))
        self.written = 0
        self.pruned = 0
        # Stored traces, oldest first, as (folder name, bytes); loaded lazily.
        self._known: deque[tuple[str, int]] | None = None
        self._known_bytes = 0
        self._mine: set[str] = set()  # the known traces this writer wrote (reusable folders)
        self._root_ready = False

    def store(self, name: str, lines: list[bytes], message: StoredMessage | None) -> str:
        """Write one trace under the folder name `name` (or `name.1`, … when taken); the
        name it got. OSError: the trace is lost (nothing of it is left)."""
        try:
            if not self._root_ready:
                private_folder(self.root)
                self._root_ready = True
            known = self._known_traces()  # before the folder exists: a first scan does not count it
            spare = self._spare(known)
            folder: str | None = None
            size = 0
            if spare is not None:
                with contextlib.suppress(FileNotFoundError):  # gone: write a new folder instead
                    folder, size = reuse_trace(self.root, spare, name, lines, message)
            if folder is None:
                folder, size = write_trace(self.root, name, lines, message)
        except OSError:
            self._root_ready = False
            raise
        self.written += 1
        self._remember(folder, size)
        return folder

    def _spare(self, known: deque[tuple[str, int]]) -> str | None:
        """The oldest trace, when the count limit removes it on this write and this writer
        wrote it (so it holds only the files a trace has): its folder is reused."""
        if len(known) < self.keep_count or known[0][0] not in self._mine:
            return None
        name, size = known.popleft()
        self._known_bytes -= size
        self._mine.discard(name)
        self.pruned += 1
        return name

    def _remember(self, name: str, size: int) -> None:
        known = self._known_traces()
        known.append((name, size))
        self._mine.add(name)
        self._known_bytes += size
        while len(known) > self.keep_count or (
            self._known_bytes > self.keep_bytes and len(known) > 1
        ):
            old, old_size = known.popleft()
            self._known_bytes -= old_size
            self._mine.discard(old)
            self._remove(old)

    def _known_traces(self) -> deque[tuple[str, int]]:
        if self._known is None:
            self._known = deque((e.name, folder_size(f"{self.root}/{e.name}")) for e in scan(self.root))
            self._known_bytes = sum(size for _, size in self._known)
        return self._known

    def _remove(self, name: str) -> None:
        remove_trace(f"{self.root}/{name}")
        self.pruned += 1

    def prune(self, now: float | None = None) -> int:
        """Remove traces beyond `keep_count`, beyond `keep_bytes` in total, older than
        `keep_age_s`, and leftovers of interrupted writes. Returns how many went."""
        now = time.time() if now is None else now
        if not os.path.isdir(self.root):
            return 0
        stale = now - STALE_WRITE_S
        for entry in os.scandir(self.root):
            if entry.name.startswith(TMP_PREFIX) and mtime(entry) < stale:
                if entry.is_dir(follow_symlinks=False):
                    _rmtree(entry.path, ignore_errors=True)
                else:  # a staged message left by a process that ended
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
        entries = scan(self.root)
        cutoff = now - self.keep_age_s
        sized = [(e.name, folder_size(f"{self.root}/{e.name}")) for e in entries if e.mtime >= cutoff]
        keep: deque[tuple[str, int]] = deque()
        total = 0
        for name, size in reversed(sized[-self.keep_count :]):
            if keep and total + size > self.keep_bytes:
                break
            keep.appendleft((name, size))
            total += size
        gone = {e.name for e in entries} - {name for name, _ in keep}
        for name in gone:
            self._remove(name)
        self._known, self._known_bytes = keep, total
        self._mine.intersection_update(name for name, _ in keep)
        return len(gone)


def _rmtree(path: str, ignore_errors: bool = True) -> None:
    import shutil  # rarely needed: not imported by the file process until then

    shutil.rmtree(path, ignore_errors=ignore_errors)
