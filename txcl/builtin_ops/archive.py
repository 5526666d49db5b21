"""op://ARCHIVE: store the exact raw message in the stack's own Maildir.

Standard Maildir delivery (write into tmp/, fsync, rename into new/, fsync new/), so that
a rule which sets 250 and EXECs ARCHIVE has the message on disk before Postfix hears 250,
and any mail client (Dovecot, mutt, Python's mailbox.Maildir) can read the folder.

ARCHIVE is an async op. A message up to 256 KiB is written from the event loop (a
page-cache copy) and handed at once to the process's fsync threads, which fsync it and
rename it into new/: the fsyncs of concurrent deliveries run side by side and share the
file system's journal commits instead of waiting for one another. The thread that moves
the last file of a turn's batch fsyncs new/ once for the batch, or leaves it to the
fsync of new/ that follows the one running (`CommitQueue`): the loop serves other
sessions while the disk works, one hand-over to a thread per file and one back to the
loop per batch, and what arrives while new/ is fsynced shares the next fsync. Messages
over 256 KiB are written and fsynced in a worker thread, so that one large message does
not hold the loop.

The raw message comes with the call or out of the envelope (`support.raw_base64`), so
nothing here knows which head delivered it.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import errno
import functools
import os
import queue
import random
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from txcl.builtin_ops.once import once, once_key
from txcl.builtin_ops.support import fsync_dir, not_base64, raw_base64
from txcl.envelope import SRC_KEY, TXC
from txcl.ops import OpContext, OpReads, RegisteredOp, StorageError

MAILDIR = "Maildir"
SUBDIRS = ("tmp", "new", "cur")
# One Maildir++ folder name ("Support", "Support.Urgent"): dot-separated, no empty part,
# so neither ".." nor a leading or trailing dot can make a path outside the Maildir.
FOLDER_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
FOLDER_MAX_LEN = 200
TAG_LEN = 20  # characters of the once-key in a file name
# Messages up to this size are written and fsynced from the event loop (a page-cache copy
# taking microseconds); larger ones, and base64 text to decode, in a worker thread.
INLINE_WRITE_BYTES = 256 * 1024
# Characters of base64 decoded per slice (a multiple of 4, so every slice is whole quads):
# a 25 MiB message is written from 768 KiB pieces instead of three full-size copies.
DECODE_CHUNK = 4 * 2**18
# Threads of a process that fsync waiting files side by side. Few: the fsyncs share the
# journal's commits anyway, and a busy thread takes the next file without going to sleep
# and being woken (each wake-up is a fight for the GIL with the loop).
FSYNC_THREADS = 4

# (state dir, tenant, stack, folder) -> (its stack's Maildir, the Maildir delivered into),
# once a delivery there succeeded: the next ones skip the storage checks and folder setup.
# A delivery that finds one deleted forgets it, recreates it and retries once. Bounded like
# OpContext.storage()'s cache (and, like it, plain dict operations): folder names come from
# rule arguments.
_places: dict[tuple[Path | None, str, str, str], tuple[Path, Path]] = {}
_PLACES_MAX = 4096


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


def unique_name(tag: str = "") -> str:
    """`<sec>.M<usec>P<pid>R<random>[K<tag>].<host>`: unique across processes, threads and
    hosts; `tag` (the call's once-key) lets a retry find a file its cut-off call stored."""
    now = time.time()
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    keyed = f"K{tag}" if tag else ""
    # random's generator, seeded from the system's and again in a forked child: no
    # getrandom() call (a release of the GIL) per message, as secrets would make
    rand = f"{random.getrandbits(64):016x}"
    return f"{seconds}.M{micros}P{os.getpid()}R{rand}{keyed}.{_host_part()}"


class CommitQueue:
    """The files of one event loop's deliveries waiting to be made durable in new/.

    A delivery adds its written file (still in tmp/) and awaits the returned future. An
    fsync thread takes the file at once, beside the others': fsyncs it and renames it into
    new/ (a file whose fsync or rename fails fails only its delivery). The files added in
    one turn of the loop are a batch: the thread that moves the batch's last file commits
    it, fsyncing each new/ directory once for all the batch's files renamed into it (a
    failed directory fsync fails exactly those deliveries), and hands the outcomes to the
    loop, one call per new/ directory. A batch whose new/ another thread is fsyncing waits
    for that fsync to end and joins the next one with every batch that arrived meanwhile:
    the busier the disk, the more deliveries one fsync of new/ covers. One hand-over to a
    thread per file, no thread of the commit's own. A delivery that fails or is cancelled
    leaves nothing behind: its file is closed and removed from tmp/ (or from new/, if it
    was renamed there already).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._open: _Batch | None = None  # the batch of this turn of the loop

    def add(
        self, fd: int | None, tmp_path: str, new_dir: str, new_path: str
    ) -> asyncio.Future[None]:
        """Commit the file at `tmp_path` to `new_path` in `new_dir`; `fd` open if it still
        needs its fsync (the move closes it), None if it had it."""
        done = self.loop.create_future()
        item = _Pending(fd, tmp_path, new_dir, new_path, done)
        batch = self._open
        if batch is None:
            batch = self._open = _Batch(self.loop, _fsync_threads())
            self.loop.call_soon(self._seal)
        batch.add(item)
        batch.threads.hand(functools.partial(batch.move, item), self.loop)
        return done

    def _seal(self) -> None:
        """The turn is over: the batch takes no more files (and commits, if all moved)."""
        batch, self._open = self._open, None
        if batch is not None and batch.count_down():
            batch.threads.hand(batch.commit, self.loop)


class _Pending:
    __slots__ = ("fd", "tmp_path", "new_dir", "new_path", "done", "moved", "error")

    def __init__(
        self,
        fd: int | None,
        tmp_path: str,
        new_dir: str,
        new_path: str,
        done: asyncio.Future[None],
    ) -> None:
        self.fd = fd
        self.tmp_path = tmp_path
        self.new_dir = new_dir
        self.new_path = new_path
        self.done = done
        self.moved = False  # renamed into new/
        self.error: OSError | None = None  # what fails the delivery

    def sync_and_close(self) -> None:
        """Fsync (unless the delivery was cancelled) and close the file; then a no-op."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if not self.done.cancelled():
                os.fsync(fd)
        finally:
            os.close(fd)

    def move(self) -> None:
        """Fsync and close the file and rename it into new/, unless its delivery was
        cancelled meanwhile; a file not moved is removed from tmp/. Errors go to `error`."""
        try:
            self.sync_and_close()
            if not self.done.cancelled():
                os.rename(self.tmp_path, self.new_path)
                self.moved = True
        except OSError as error:
            self.error = error
        except BaseException as exc:  # a bug must fail the delivery, not leave it waiting
            self.error = OSError(errno.EIO, f"commit failed: {exc!r}")
        finally:
            if not self.moved:
                _remove(self.tmp_path)


class _Batch:
    """The files added to a CommitQueue in one turn of its loop, committed together."""

    __slots__ = ("loop", "threads", "items", "_lock", "_left")

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: _FsyncThreads) -> None:
        self.loop = loop
        self.threads = threads
        self.items: list[_Pending] = []
        self._lock = threading.Lock()
        self._left = 1  # files not moved yet, and the seal at the end of the turn

    def add(self, item: _Pending) -> None:
        self.items.append(item)
        with self._lock:
            self._left += 1

    def count_down(self) -> bool:
        """One file moved (or the batch sealed): whether that was the last."""
        with self._lock:
            self._left -= 1
            return self._left == 0

    def move(self, item: _Pending) -> None:
        """An fsync thread's part: move the file; the last one moved commits the batch."""
        item.move()
        if self.count_down():
            self.commit()

    def commit(self) -> None:
        """Every file is moved or failed: fsync the new/ directories of those moved, then
        settle the deliveries in the loop."""
        renamed: dict[str, list[_Pending]] = {}
        unmoved: list[_Pending] = []
        for item in self.items:
            if item.moved:
                renamed.setdefault(item.new_dir, []).append(item)
            else:
                unmoved.append(item)
        if unmoved:
            _settle_in(self.loop, unmoved)
        for directory, items in renamed.items():
            self.threads.sync_directory(directory, self.loop, items)


def _settle_in(loop: asyncio.AbstractEventLoop, items: list[_Pending]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_settle, items)


def _settle(items: list[_Pending]) -> None:
    """In the loop: each delivery's outcome. A file renamed into new/ for a delivery that
    was cancelled, or whose fsync of new/ failed, is removed: that delivery is not
    remembered, and its retry stores the message again."""
    for item in items:
        if item.error is not None or item.done.cancelled():
            if item.moved:
                _remove(item.new_path)
            if item.error is not None:
                _fail(item.done, item.error)
        elif not item.done.done():
            item.done.set_result(None)


class _FsyncThreads:
    """Threads of one process that move the files handed to them into new/ (fsync, rename),
    side by side: up to FSYNC_THREADS, started when a file finds none idle, then kept. They
    also fsync the new/ directories, one fsync of a directory at a time (`sync_directory`).
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads done with their job and not yet claimed by another
        # new/ directory -> the deliveries waiting for its next fsync, while one runs
        self._unsynced: dict[str, list[tuple[asyncio.AbstractEventLoop, list[_Pending]]]] = {}

    def hand(self, job: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
        """Give a job to a thread; if no thread can be had, to `loop`'s executor, and
        without that either, run it here (every delivery of a batch waits for each job)."""
        with self._lock:
            idle = self._idle > 0
            self._idle -= idle
            spawn = not idle and self._threads < FSYNC_THREADS  # else the next one done
            self._threads += spawn
        if spawn and not self._start() and self._threads == 0:
            try:
                loop.run_in_executor(None, job)
            except RuntimeError:  # the executor is shut down or gives no thread either
                job()
            return
        self._jobs.put(job)

    def _start(self) -> bool:
        name = f"txcl-archive-fsync-{self._threads}"
        try:
            threading.Thread(target=self._work, name=name, daemon=True).start()
        except RuntimeError:  # the system gives no more threads
            with self._lock:
                self._threads -= 1
            return False
        return True

    def _work(self) -> None:
        while True:
            self._jobs.get()()
            with self._lock:
                self._idle += 1

    def sync_directory(
        self, directory: str, loop: asyncio.AbstractEventLoop, items: list[_Pending]
    ) -> None:
        """Fsync `directory` for `items` (renamed into it) and settle them in `loop`. If a
        fsync of it is running, they wait for the next, which the thread running that one
        does for all the items that came meanwhile."""
        with self._lock:
            running = directory in self._unsynced
            self._unsynced.setdefault(directory, []).append((loop, items))
            if running:
                return
        while True:
            with self._lock:
                waiting = self._unsynced[directory]
                if not waiting:
                    del self._unsynced[directory]
                    return
                self._unsynced[directory] = []
            error = _fsync_dir_error(directory)
            if error is not None:
                for _, items in waiting:
                    for item in items:
                        item.error = error
            for loop, items in waiting:
                _settle_in(loop, items)


def _fsync_dir_error(directory: str) -> OSError | None:
    """Fsync `directory`: what fails the deliveries it was to cover, if anything."""
    try:
        fsync_dir(directory)
    except OSError as error:
        return error
    except Exception as exc:  # a bug must fail the deliveries, not leave them waiting
        return OSError(errno.EIO, f"commit failed: {exc!r}")
    return None


_fsync_threads_of_process: _FsyncThreads | None = None


def _fsync_threads() -> _FsyncThreads:
    """This process's fsync threads (a forked worker makes its own)."""
    global _fsync_threads_of_process
    threads = _fsync_threads_of_process
    if threads is None or threads.pid != os.getpid():
        threads = _fsync_threads_of_process = _FsyncThreads()
    return threads


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fail(done: asyncio.Future[None], error: OSError) -> None:
    if not done.done():  # a fresh exception each: same errno, same type
        done.set_exception(OSError(error.errno, error.strerror, error.filename))


_commit_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CommitQueue] = (
    weakref.WeakKeyDictionary()
)


def commit_queue() -> CommitQueue:
    """The CommitQueue of the running event loop."""
    loop = asyncio.get_running_loop()
    queue = _commit_queues.get(loop)
    if queue is None:
        queue = _commit_queues[loop] = CommitQueue(loop)
    return queue


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


async def deliver(
    maildir: Path, content: bytes | Callable[[int], int], tag: str = ""
) -> tuple[str, int]:
    """Durably deliver `content` (the bytes, or what `content(fd)` writes) into
    `maildir/new/`: its path and size. Anything that fails removes the file from tmp/.

    Up to INLINE_WRITE_BYTES of bytes are written here, then fsynced and renamed by an
    fsync thread and committed with the other deliveries of this turn of the loop
    (`CommitQueue`); anything else is written and fsynced in a worker thread, which owns
    the file descriptor from then on.
    """
    # Plain strings, not Path joins: this runs once per message.
    name = unique_name(tag)
    tmp_path = f"{maildir}/tmp/{name}"
    new_dir = f"{maildir}/new"
    new_path = f"{new_dir}/{name}"
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    if isinstance(content, bytes) and len(content) <= INLINE_WRITE_BYTES:
        try:
            size = _write_all(fd, content)
        except BaseException:
            os.close(fd)
            _remove(tmp_path)
            raise
        # An fsync thread (or, with none to be had, the loop's executor) fsyncs and closes it.
        await _committed(commit_queue().add(fd, tmp_path, new_dir, new_path), new_path)
        return new_path, size
    loop = asyncio.get_running_loop()
    try:  # the thread closes the file, even if this delivery is cancelled meanwhile
        size = await loop.run_in_executor(None, _write_sync_close, fd, content)
    except BaseException:
        _remove(tmp_path)
        raise
    await _committed(commit_queue().add(None, tmp_path, new_dir, new_path), new_path)
    return new_path, size


async def _committed(done: asyncio.Future[None], new_path: str) -> None:
    """Wait for the commit of the file at `new_path`. A delivery cancelled after its
    commit settled, before it resumed, removes the file as one cancelled before does:
    its call is forgotten, and a retry would store the message a second time."""
    try:
        await done
    except asyncio.CancelledError:
        if done.done() and not done.cancelled() and done.exception() is None:
            _remove(new_path)
        raise


def _write_sync_close(fd: int, content: bytes | Callable[[int], int]) -> int:
    """Write `content`, fsync and close `fd`: the bytes written."""
    try:
        size = _write_all(fd, content) if isinstance(content, bytes) else content(fd)
        os.fsync(fd)
        return size
    finally:
        os.close(fd)


async def _prepare(ctx: OpContext, folder: str) -> tuple[Path, Path]:
    """The stack's Maildir and the one to deliver into (itself or `.folder`), both past
    the storage checks and with tmp/ new/ cur/ made (in a worker thread: a new folder is
    fsynced up to the state dir)."""
    root = ctx.storage(MAILDIR)
    target = ctx.storage(MAILDIR, "." + folder) if folder else root
    state_dir = Path(ctx.state_dir or root)
    await asyncio.get_running_loop().run_in_executor(None, _make_maildirs, root, target, state_dir)
    return root, target


def _make_maildirs(root: Path, target: Path, state_dir: Path) -> None:
    ensure_maildir(root, subfolder=False, durable_up_to=state_dir)
    if target != root:
        ensure_maildir(target, subfolder=True, durable_up_to=root)


async def archive(
    envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: OpContext, key: str | None = None
) -> dict:
    """op://ARCHIVE [WITH folder = "Support"]: the raw message into the stack's Maildir;
    `key` the call's `once_key` when `once` has it already."""
    folder = folder_argument(args)
    content: bytes | Callable[[int], int]
    if ctx.message is not None:
        content = ctx.message
    else:
        raw = raw_base64(envelope, "ARCHIVE")

        def content(fd: int) -> int:
            try:
                return write_base64(fd, raw, 4)
            except binascii.Error as exc:
                raise not_base64(envelope, "ARCHIVE", exc) from None

    if key is None:
        key = once_key(ctx, "ARCHIVE", args)
    tag = key[:TAG_LEN]
    where = (ctx.state_dir, ctx.tenant, ctx.stack, folder)
    known = place = _places.get(where)
    try:
        if place is None:
            place = await _prepare(ctx, folder)
        path, size = await deliver(place[1], content, tag)
    except FileNotFoundError:
        # A Maildir this process knew was deleted under it: recreate it, once.
        _places.pop(where, None)
        place = await _prepare(ctx, folder)
        path, size = await deliver(place[1], content, tag)
    if place is not known:
        if len(_places) >= _PLACES_MAX:
            _places.clear()
        _places[where] = place
    return _result(place[0], folder, path, size)


def _result(root: Path, folder: str, path: str, size: int) -> dict[str, Any]:
    return {
        "archive": {
            "maildir": str(root),
            "folder": folder,
            "path": path,
            "key": path.rpartition("/")[2],
            "size": size,
        }
    }


def archived_file(patch: Any) -> tuple[str, int] | None:
    """The stored file and its size that an ARCHIVE call's result (`_result`) names."""
    archived = patch.get("archive") if isinstance(patch, Mapping) else None
    if not isinstance(archived, Mapping):
        return None
    path, size = archived.get("path"), archived.get("size")
    return (path, size) if isinstance(path, str) and isinstance(size, int) else None


def find_archived(
    envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: OpContext, key: str
) -> dict[str, Any] | None:
    """For an ARCHIVE call cut off after it stored the message (kill -9 before its key was
    recorded): the file it stored, found by the tag in its name, in new/ or cur/."""
    folder = folder_argument(args)
    root = ctx.storage(MAILDIR)
    target = ctx.storage(MAILDIR, "." + folder) if folder else root
    mark = f"K{key[:TAG_LEN]}."
    for sub in ("new", "cur"):
        with contextlib.suppress(OSError), os.scandir(target / sub) as entries:
            for entry in entries:
                if mark in entry.name:
                    return _result(root, folder, entry.path, entry.stat().st_size)
    return None


# The raw message, and `_txc.src` to find it in the envelope when it does not come with the call.
OP = RegisteredOp.builtin(
    "ARCHIVE",
    once("ARCHIVE", archive, recover=find_archived, keyed=True),
    OpReads.only([(TXC, SRC_KEY)], message=True),
)
