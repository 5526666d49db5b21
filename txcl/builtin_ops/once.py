"""Acting once per delivery: a retry after a 4xx gets the first call's patch.

A call is known by its key (`once_key`: the delivery, the op and its arguments). The keys
of a stack live in one SQLite database under its storage, `.txcl-once/keys.sqlite3`, in
WAL mode: every worker process (`txco serve --workers N`) and every restart sees the same
keys, a lookup is one indexed statement instead of a file per key, and two calls with the
same key cannot both reserve it. A key is reserved (no patch yet) before its op acts and
its patch recorded after; a reserved key that is never recorded belongs to a call cut off
while it acted (kill -9, a crash), or to one still running. Keys are kept for
`ONCE_WINDOW_DAYS`; a day's first call in a process removes the older ones in a thread of
its own. Key files of the earlier layout (`.txcl-once/<day>/<key>`) are taken into the
database when a process first opens it, so an upgrade forgets nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from txcl.ops import Op, OpContext, OpFailure

log = logging.getLogger("txcl.ops")

ONCE_FOLDER = ".txcl-once"
ONCE_DB = "keys.sqlite3"
ONCE_WINDOW_DAYS = 7  # longer than Postfix's default queue lifetime (5 days)
_DAY_S = 86400
_BUSY_TIMEOUT_S = 2.0  # another process's write holds the database for microseconds
_STORES_MAX = 256

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS once_keys ("
    " key TEXT PRIMARY KEY, day INTEGER NOT NULL, patch TEXT) WITHOUT ROWID"
)
_DAY_INDEX = "CREATE INDEX IF NOT EXISTS once_keys_day ON once_keys (day)"
# A key not yet held within the window is (re)claimed: inserted, or taken over from a call
# older than the window; a key held within the window is left alone (rowcount 0).
_CLAIM = (
    "INSERT INTO once_keys (key, day, patch) VALUES (?, ?, NULL) "
    "ON CONFLICT (key) DO UPDATE SET day = excluded.day, patch = NULL WHERE day < ?"
)


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


class KeyStore:
    """One stack's keys: a connection of this process to its database, used under a lock
    (async ops call from the event loop, sync ops from their threads)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / ONCE_DB
        self._lock = threading.Lock()
        self._pruned_day = 0
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            return _connect(self.path)
        except sqlite3.DatabaseError as err:
            if isinstance(err, sqlite3.OperationalError):
                raise
            # Not a database (a power cut, a stray file): the keys it held are lost, as
            # unsynced keys may be; mail keeps flowing.
            aside = self.path.with_name(f"{ONCE_DB}.unusable-{int(time.time())}")
            log.warning("once-keys: %s is not usable (%s); moved to %s", self.path, err, aside)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
            return _connect(self.path)

    def claim(self, key: str) -> tuple[dict[str, Any] | None, bool, bool]:
        """Reserve `key` for a call about to act. Returns (patch, cut_off, claimed): the
        patch an earlier call recorded; whether an earlier call holds it unrecorded (cut
        off, or running); whether this call now holds it."""
        day = today()
        row = None
        try:
            with self._lock:
                claimed = bool(
                    self._db.execute(_CLAIM, (key, day, day - ONCE_WINDOW_DAYS)).rowcount
                )
                if not claimed:
                    row = self._db.execute(
                        "SELECT patch FROM once_keys WHERE key = ?", (key,)
                    ).fetchone()
        except sqlite3.Error as err:  # a full disk, a lock held too long: before acting
            raise OpFailure(f"cannot remember the call in {self.path}: {err}") from None
        if self._pruned_day != day:
            self._pruned_day = day
            threading.Thread(target=_prune, args=(self.path, day), daemon=True).start()
        if claimed:
            return None, False, True
        patch = _patch(row[0]) if row is not None else None
        return patch, patch is None, False

    def record(self, key: str, patch: Any) -> None:
        """The op's patch for `key`. A failure (a full disk) leaves the key reserved: a
        retry then finds it cut off (ARCHIVE finds its file; other ops act again)."""
        with contextlib.suppress(sqlite3.Error, TypeError, ValueError):
            text = json.dumps(patch, separators=(",", ":"))
            with self._lock:
                self._db.execute("UPDATE once_keys SET patch = ? WHERE key = ?", (text, key))

    def forget(self, key: str) -> None:
        """Let go of a key whose call failed: the next call acts."""
        with contextlib.suppress(sqlite3.Error), self._lock:
            self._db.execute("DELETE FROM once_keys WHERE key = ? AND patch IS NULL", (key,))


def _patch(text: str | None) -> dict[str, Any] | None:
    with contextlib.suppress(ValueError, TypeError):
        patch = json.loads(text) if text else None
        if isinstance(patch, dict):
            return patch
    return None


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Made 0600 before SQLite opens it: its -wal and -shm files take the same mode.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    db = sqlite3.connect(
        path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    try:
        db.execute("PRAGMA journal_mode=WAL")
        # Committed keys survive a crash of the process; a power cut may forget the last
        # ones (as it may any unsynced write), never corrupt the file.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(_SCHEMA)
        db.execute(_DAY_INDEX)
        _adopt_key_files(db, path.parent)
    except BaseException:
        db.close()
        raise
    return db


def _adopt_key_files(db: sqlite3.Connection, folder: Path) -> None:
    """Take the key files of the earlier layout (`<day>/<key>`, the patch or spaces) into
    the database, then remove them."""
    with contextlib.suppress(OSError):
        days = [e for e in os.scandir(folder) if e.is_dir() and e.name.isdigit()]
        for day in days:
            rows = []
            with contextlib.suppress(OSError), os.scandir(day.path) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError), open(entry.path, "rb") as file:
                        text = file.read().decode("utf-8", "replace").strip()
                        rows.append((entry.name, int(day.name), text or None))
            db.executemany(
                "INSERT INTO once_keys (key, day, patch) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO NOTHING",
                rows,
            )
            shutil.rmtree(day.path, ignore_errors=True)


def _prune(path: Path, day: int) -> None:
    with (
        contextlib.suppress(sqlite3.Error),
        contextlib.closing(
            sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        ) as db,
    ):
        db.execute("DELETE FROM once_keys WHERE day < ?", (day - ONCE_WINDOW_DAYS,))


# (process, stack storage) -> its KeyStore. A forked worker opens its own: a SQLite
# connection must not cross a fork.
_stores: dict[tuple[int, Path], KeyStore] = {}
_stores_lock = threading.Lock()


def key_store(ctx: OpContext) -> KeyStore:
    """The KeyStore of the call's stack, opened on first use in this process."""
    folder = ctx.storage(ONCE_FOLDER)
    ident = (os.getpid(), folder)
    store = _stores.get(ident)
    if store is None:
        with _stores_lock:
            store = _stores.get(ident)
            if store is None:
                if len(_stores) >= _STORES_MAX:
                    _stores.clear()  # the dropped stores close as they are let go
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
            self.remembered, self.cut_off, claimed = store.claim(self.key)
            if claimed or self.cut_off:
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


def once(name: str, op: Op, *, recover: Recover | None = None) -> Op:
    """`op`, acting once per delivery: a repeated call with the same delivery key, op and
    arguments (a retry after a 4xx) returns the first call's patch instead of acting again.
    A call that fails is forgotten; one cut off while it acted is looked for with
    `recover`, else acts again. Works for sync and async ops alike."""
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
                return call.done(await op(envelope, args, ctx))

        return functools.update_wrapper(once_async, op)

    def once_sync(envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: OpContext) -> Any:
        call = _OnceCall(ctx, name, args)
        if call.remembered is not None:
            return call.remembered
        with call:
            found = recover(envelope, args, ctx, call.key) if call.cut_off and recover else None
            return call.done(found if found is not None else op(envelope, args, ctx))

    return functools.update_wrapper(once_sync, op)
