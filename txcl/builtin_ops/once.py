"""Acting once per delivery: a retry after a 4xx gets the first call's patch.

A call is known by its key (`once_key`: the delivery, the op and its arguments). Each
process appends what its calls do to a log of its own under the stack's storage,
`.txcl-once/<day>/<process>.log`, one line per event: `R <key>` (reserved: the op is about
to act), `D <key> <patch>` (done) or `F <key>` (failed: forgotten). Every process keeps an
index of all the logs of the window in memory and, before each lookup, reads what the
other processes appended since (a read per log that may still grow, a stat of the two
newest day folders for logs that are new), so a retry that reaches another worker, or a
process started later, sees the first call. No file is created per call: the index spares
a lookup's opens, and a log takes one inode per process and day.

A log is grown in chunks reserved on disk ahead (`posix_fallocate`), and a call reserves
room for its `D` line before it acts: a full disk fails the call then, never between
acting and remembering. A process holds an exclusive flock on its current log; a log
whose lock can be taken belongs to a process that is gone and is read once more, then no
more. A key reserved in some log and never recorded belongs to a call cut off while it
acted (kill -9, a crash), or to one still running. Keys count for `ONCE_WINDOW_DAYS`; a
process's first call of a day removes older day folders in a thread of its own. Key files
of the earlier layout (`<day>/<key>`, the patch or spaces) are read as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import inspect
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from txcl.ops import Op, OpContext, OpFailure

ONCE_FOLDER = ".txcl-once"
ONCE_WINDOW_DAYS = 7  # longer than Postfix's default queue lifetime (5 days)
LOG_SUFFIX = ".log"
_DAY_S = 86400
# Room kept in the log for the `D` line of each call that reserved its key; a longer patch
# needs more room when it is recorded, and is not remembered if the disk has none.
_ROOM = 2048
_CHUNK = 256 * 1024  # a log is reserved on disk this much at a time
_PEEK = 4096
_READ = 256 * 1024  # no line is longer: a patch that would make one is not recorded
_LIVENESS_EVERY = 64  # reads that found nothing new before a log's owner is checked
_STORES_MAX = 256


def once_key(ctx: OpContext, op: str, args: Mapping[str, Any]) -> str:
    """What makes a call the same call again: the delivery, the op and its arguments; ""
    when the caller gave no delivery key (then nothing is remembered)."""
    if not ctx.delivery_key or ctx.state_dir is None:
        return ""
    try:
        text = json.dumps(args, sort_keys=True, separators=(",", ":"), default=repr)
    except (TypeError, ValueError):
        text = repr(sorted(args.items(), key=lambda item: str(item[0])))
    digest = hashlib.sha256(f"{ctx.delivery_key}\0{op}\0{text}".encode("utf-8", "replace"))
    return digest.hexdigest()[:40]


def today() -> int:
    return int(time.time() // _DAY_S)


class _Log:
    """Another process's log (or a key file of the earlier layout), read as it grows."""

    __slots__ = ("path", "day", "fd", "offset", "idle", "final")

    def __init__(self, path: str, day: int) -> None:
        self.path = path
        self.day = day
        self.fd = -1
        self.offset = 0
        self.idle = 0
        self.final = False


class _OwnLog:
    """This process's log of one day: lines written at `offset` into room reserved ahead."""

    def __init__(self, path: str, day: int) -> None:
        self.path = path
        self.day = day
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # released by the process's end: the log is final
        self.offset = 0
        self.reserved = 0  # bytes reserved on disk
        self.promised = 0  # room kept for the D lines of calls not recorded yet

    def ensure(self, size: int) -> None:
        """Room for `size` more bytes beyond those promised; OSError (a full disk) if none."""
        need = self.offset + self.promised + size
        while need > self.reserved:
            try:
                os.posix_fallocate(self.fd, self.reserved, _CHUNK)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                self.reserved = need  # nothing to reserve with: the write may still fail
                return
            self.reserved += _CHUNK

    def append(self, line: bytes) -> None:
        written = os.pwrite(self.fd, line, self.offset)
        if written != len(line):
            raise OSError(errno.ENOSPC, f"wrote {written} of {len(line)} bytes", self.path)
        self.offset += written

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class KeyStore:
    """One stack's keys as this process knows them, kept up to date from every log."""

    def __init__(self, folder: Path) -> None:
        self.folder = os.fspath(folder)
        self.ident = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._lock = threading.Lock()
        self._done: dict[str, tuple[int, str]] = {}  # key -> (day, patch JSON)
        self._reserved: dict[str, dict[str, int]] = {}  # key -> {log path: day}
        self._logs: dict[str, _Log] = {}  # path -> reader, for every log but our own
        self._folder_mtimes: dict[int, int] = {}
        self._own: _OwnLog | None = None
        self._scanned = False

    # -- reading what every process did --------------------------------------------------

    def _refresh(self, day: int) -> None:
        if not self._scanned:
            for entry in _scandir(self.folder):
                if entry.name.isdigit() and int(entry.name) >= day - ONCE_WINDOW_DAYS:
                    self._scan_day(int(entry.name))
            self._scanned = True
        else:  # new logs appear in the newest folders (yesterday's: a call at midnight)
            for d in (day - 1, day):
                self._scan_day(d)
        for log in list(self._logs.values()):
            if not log.final:
                self._read(log)

    def _scan_day(self, day: int) -> None:
        folder = f"{self.folder}/{day}"
        try:
            mtime = os.stat(folder).st_mtime_ns
        except OSError:
            return
        # A folder changed within the clock's grain of the last look may have changed again
        # with the same mtime: it is looked at again until its mtime is a second old.
        if self._folder_mtimes.get(day) == mtime and time.time() * 1e9 - mtime > 1e9:
            return
        self._folder_mtimes[day] = mtime
        own = self._own.path if self._own is not None else ""
        for entry in _scandir(folder):
            path = entry.path
            if path not in self._logs and path != own and entry.is_file(follow_symlinks=False):
                self._logs[path] = log = _Log(path, day)
                if not entry.name.endswith(LOG_SUFFIX):
                    self._read_key_file(log, entry.name)

    def _read_key_file(self, log: _Log, key: str) -> None:
        log.final = True
        with contextlib.suppress(OSError), open(log.path, "rb") as file:
            text = file.read().decode("utf-8", "replace").strip()
            if _patch(text) is not None:
                self._done.setdefault(key, (log.day, text))
            else:
                self._reserved.setdefault(key, {})[log.path] = log.day

    def _read(self, log: _Log) -> None:
        if log.fd < 0:
            try:
                log.fd = os.open(log.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                log.final = True
                return
        gone = False
        if log.idle >= _LIVENESS_EVERY:
            log.idle = 0
            try:  # its owner holds it exclusively while alive
                fcntl.flock(log.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                gone = True
            except OSError:
                pass
        got = False
        size = _PEEK  # most reads find nothing new: the room reserved ahead, zeros
        while True:
            try:
                data = os.pread(log.fd, size, log.offset)
            except OSError:
                break
            used = self._apply(data, log)
            log.offset += used
            got = got or used > 0
            # on until the written end (the file's, or the zeros reserved ahead): a peek
            # full of lines, or one that ends within a line, is not the end of the log
            written_end = len(data) < size or data.find(b"\0", used) >= 0
            if written_end or (used == 0 and size == _READ):  # no line is longer
                break
            size = _READ
        log.idle = 0 if got else log.idle + 1
        if gone:
            log.final = True
            os.close(log.fd)
            log.fd = -1

    def _apply(self, data: bytes, log: _Log) -> int:
        """Take the whole lines of `data` into the index; the bytes used."""
        end = data.find(b"\0")
        end = data.rfind(b"\n", 0, len(data) if end < 0 else end) + 1
        for line in data[:end].decode("utf-8", "replace").splitlines():
            self._event(line, log.path, log.day)
        return end

    def _event(self, line: str, path: str, day: int) -> None:
        kind, _, rest = line.partition(" ")
        key, _, patch = rest.partition(" ")
        if kind == "R":
            self._reserved.setdefault(key, {})[path] = day
        elif kind in ("D", "F"):
            done = kind == "D" and _patch(patch) is not None
            self._index_end(key, patch if done else None, path, day)

    def _index_end(self, key: str, patch: str | None, path: str, day: int) -> None:
        """A call of `key` recorded in the log at `path` ended: with `patch` (JSON of an
        object), or failed (None)."""
        holders = self._reserved.get(key)
        if holders is not None:
            holders.pop(path, None)
            if not holders:
                del self._reserved[key]
        if patch is not None:
            self._done.setdefault(key, (day, patch))

    # -- this process's calls ------------------------------------------------------------

    def claim(self, key: str) -> tuple[dict[str, Any] | None, bool]:
        """Reserve `key` for a call about to act, unless an earlier call recorded a patch
        for it: (that patch, False). Else (None, cut_off): whether another call holds the
        key unrecorded (cut off while it acted, or still running); this one holds it now."""
        day = today()
        oldest = day - ONCE_WINDOW_DAYS
        with self._lock:
            self._refresh(day)
            done = self._done.get(key)
            if done is not None and done[0] >= oldest:
                return _patch(done[1]), False
            holders = self._reserved.get(key, {})
            cut_off = any(d >= oldest for d in holders.values())
            try:
                own = self._own_log(day)
                line = f"R {key}\n".encode()
                own.ensure(len(line) + _ROOM)
                own.append(line)
            except OSError as err:  # a full disk: before acting
                raise OpFailure(f"cannot remember the call in {self.folder}: {err}") from None
            own.promised += _ROOM
            self._reserved.setdefault(key, {})[own.path] = day
            return None, cut_off

    def record(self, key: str, patch: Any) -> None:
        """The op's patch for `key`. One that cannot be written (too long for its room, on
        a full disk) leaves the key reserved: a retry then finds it cut off (ARCHIVE finds
        its file; the other ops act again)."""
        with contextlib.suppress(TypeError, ValueError):
            text = json.dumps(patch, separators=(",", ":"))
            line = f"D {key} {text}\n".encode()
            if len(line) <= _READ:
                self._finish(line, key, text if isinstance(patch, dict) else None)

    def forget(self, key: str) -> None:
        """Let go of a key whose call failed: the next call acts."""
        self._finish(f"F {key}\n".encode(), key, None)

    def _finish(self, line: bytes, key: str, patch: str | None) -> None:
        with self._lock:
            own = self._own
            if own is None:
                return
            own.promised = max(0, own.promised - _ROOM)
            with contextlib.suppress(OSError):
                if len(line) > _ROOM:
                    own.ensure(len(line))
                own.append(line)
                # what the other processes will read from the line, without parsing it back
                self._index_end(key, patch, own.path, own.day)

    def _own_log(self, day: int) -> _OwnLog:
        own = self._own
        if own is not None and own.day == day:
            return own
        folder = f"{self.folder}/{day}"
        os.makedirs(folder, mode=0o700, exist_ok=True)
        new = _OwnLog(f"{folder}/{self.ident}{LOG_SUFFIX}", day)
        if own is not None:
            new.promised = own.promised  # calls reserved yesterday record today
            own.close()  # its lock goes: the others read it to its end
        self._own = new
        threading.Thread(target=_prune_days, args=(self.folder, day), daemon=True).start()
        self._forget_days_before(day - ONCE_WINDOW_DAYS)
        return new

    def _forget_days_before(self, oldest: int) -> None:
        self._done = {k: v for k, v in self._done.items() if v[0] >= oldest}
        for path, log in list(self._logs.items()):
            if log.day < oldest:
                if log.fd >= 0:
                    os.close(log.fd)
                del self._logs[path]
        self._folder_mtimes = {d: m for d, m in self._folder_mtimes.items() if d >= oldest}

    def close(self) -> None:
        """Close the logs; a call still running then leaves its key reserved."""
        with self._lock:
            if self._own is not None:
                self._own.close()
                self._own = None
            for log in self._logs.values():
                if log.fd >= 0:
                    os.close(log.fd)
                    log.fd = -1


def _scandir(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError:
        return []


def _patch(text: str | None) -> dict[str, Any] | None:
    with contextlib.suppress(ValueError, TypeError):
        patch = json.loads(text) if text else None
        if isinstance(patch, dict):
            return patch
    return None


def _prune_days(folder: str, day: int) -> None:
    for entry in _scandir(folder):
        if entry.name.isdigit() and int(entry.name) < day - ONCE_WINDOW_DAYS:
            shutil.rmtree(entry.path, ignore_errors=True)


# (process, state dir, tenant, stack) -> its KeyStore. A forked worker makes its own.
_stores: dict[tuple[int, Path | None, str, str], KeyStore] = {}
_stores_lock = threading.Lock()


def key_store(ctx: OpContext) -> KeyStore:
    """The KeyStore of the call's stack, made on first use in this process."""
    ident = (os.getpid(), ctx.state_dir, ctx.tenant, ctx.stack)
    store = _stores.get(ident)
    if store is None:
        folder = ctx.storage(ONCE_FOLDER)
        with _stores_lock:
            store = _stores.get(ident)
            if store is None:
                if len(_stores) >= _STORES_MAX:
                    for old in _stores.values():
                        old.close()
                    _stores.clear()
                store = _stores[ident] = KeyStore(folder)
    return store


Recover = Callable[[Mapping[str, Any], Mapping[str, Any], OpContext, str], "dict[str, Any] | None"]
"""`recover(envelope, args, ctx, key)`: for a call cut off while it acted, the patch of
what it did, if the op can find it (ARCHIVE looks for its file by the key), else None."""


class _OnceCall:
    """One call of an op under `once`: what an earlier call returned (`remembered`), else a
    reserved key that the `with` block's success records and its failure lets go."""

    def __init__(self, ctx: OpContext, name: str, args: Mapping[str, Any]) -> None:
        self.key = once_key(ctx, name, args)
        self.remembered: dict[str, Any] | None = None
        self.cut_off = False
        self._store: KeyStore | None = None
        if self.key:
            store = key_store(ctx)
            self.remembered, self.cut_off = store.claim(self.key)
            if self.remembered is None:
                self._store = store

    def __enter__(self) -> _OnceCall:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None and self._store is not None:
            self._store.forget(self.key)

    def done(self, patch: Any) -> Any:
        if self._store is not None:
            self._store.record(self.key, patch)
        return patch


def once(
    name: str, op: Callable[..., Any], *, recover: Recover | None = None, keyed: bool = False
) -> Op:
    """`op`, acting once per delivery: a repeated call with the same delivery key, op and
    arguments (a retry after a 4xx) returns the first call's patch instead of acting again.
    A call that fails is forgotten; one cut off while it acted is looked for with
    `recover`, else acts again. Works for sync and async ops alike. A `keyed` op is also
    given the call's key (`key=`, its `once_key`), so that it need not compute it again."""

    def act(envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: OpContext,
            call: _OnceCall) -> Any:
        return op(envelope, args, ctx, key=call.key) if keyed else op(envelope, args, ctx)

    if inspect.iscoroutinefunction(op):

        async def once_async(
            envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: OpContext
        ) -> Any:
            call = _OnceCall(ctx, name, args)
            if call.remembered is not None:
                return call.remembered
            with call:
                if call.cut_off and recover is not None:
                    found = await asyncio.get_running_loop().run_in_executor(
                        None, recover, envelope, args, ctx, call.key
                    )
                    if found is not None:
                        return call.done(found)
                return call.done(await act(envelope, args, ctx, call))

        return functools.update_wrapper(once_async, op)

    def once_sync(envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: OpContext) -> Any:
        call = _OnceCall(ctx, name, args)
        if call.remembered is not None:
            return call.remembered
        with call:
            found = recover(envelope, args, ctx, call.key) if call.cut_off and recover else None
            return call.done(found if found is not None else act(envelope, args, ctx, call))

    return functools.update_wrapper(once_sync, op)
