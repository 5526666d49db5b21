"""A change feed for the OPS tree: which stacks may have changed since last asked, from Linux
inotify, so that a reload costs what changed and not the tree's size.

Every folder of the tree is watched (and the config file's folder, for that one file, where
a write is seen when its writer closes the file, so a log beside it wakes nothing); a
folder created or moved in is watched as it appears. `ChangeFeed.take()` hands over, at
once, the stacks ("tenant/stack") and tenants ("tenant") under the paths changed since the
last take; events arriving while the caller reloads stay for the next take. It answers None
("unknown: walk everything") after the kernel's queue overflowed, and for good once the
feed cannot follow the tree (no inotify on this system, the watch limit reached, any
error): the caller then polls the tree's fingerprint as without a feed. A stack with a
symlink inside it is in every take (inotify does not see into what a link leads to).
The watches are added by the feed's thread once started; a change made before
its folder was watched is in no event, so takes say None until the caller has compared
everything once after `ready` (a take that said None, or `trust()`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("txco.reload")

try:  # Linux only; anywhere else the feed is unhealthy and the caller polls
    import inotify_simple
    from inotify_simple import flags as _flags
except (ImportError, OSError):  # pragma: no cover - not Linux
    inotify_simple = None

if inotify_simple is not None:
    _MASK = (_flags.MODIFY | _flags.ATTRIB | _flags.CLOSE_WRITE | _flags.CREATE
             | _flags.DELETE | _flags.MOVED_FROM | _flags.MOVED_TO | _flags.DELETE_SELF
             | _flags.MOVE_SELF | _flags.ONLYDIR | _flags.DONT_FOLLOW)
    # The config file's folder may hold busy files (a log): their writes must not wake us.
    _CONFIG_MASK = _MASK & ~_flags.MODIFY
    _NEW = _flags.CREATE | _flags.MOVED_TO | _flags.ATTRIB
    _GONE = _flags.DELETE | _flags.MOVED_FROM

# How long the reader waits on the kernel before looking whether it was closed.
_READ_TIMEOUT_MS = 1000


class ChangeFeed:
    """The paths changed under an OPS tree, read from inotify by a daemon thread."""

    def __init__(self, ops_dir: Path | str, config_file: Path | str | None = None,
                 notify: Callable[[], None] | None = None) -> None:
        """A feed, not watching until `start()`; never raises (a feed that cannot watch is
        not `healthy`).
        `notify` is called from the reader thread after each batch of events (or when the
        feed breaks); it must only hand over to its own thread (call_soon_threadsafe)."""
        self.root = os.path.abspath(ops_dir)
        self.config_file = None if config_file is None else os.path.abspath(config_file)
        self.notify = notify
        self._lock = threading.Lock()  # the recorded changes
        self._reading = threading.RLock()  # the inotify queue and the watches
        self._paths: set[str] = set()
        self._unknown = False  # events were lost: the next take walks everything
        self.broken: str | None = None  # why the feed cannot follow the tree any more
        self._folders: dict[int, str] = {}  # watch descriptor -> the folder it watches
        self._links: set[str] = set()  # symlinks found in the tree
        self._closed = False
        self._inotify = None
        self._thread: threading.Thread | None = None
        # Set once every folder is watched (or the feed broke trying), by the reader thread.
        self.ready = threading.Event()
        # Whether a take can name what changed: not until a walk of everything has followed
        # `ready` (a change made before a folder's watch was added is in no event).
        self._trusted = False
        if inotify_simple is None:
            self._break("inotify is not available on this system")
            self.ready.set()
            return
        try:
            self._inotify = inotify_simple.INotify()
        except Exception as err:
            self._break(f"cannot watch {self.root}: {err}")
            self.ready.set()
            return
        self._thread = threading.Thread(target=self._run, name="txco-change-feed", daemon=True)

    def start(self) -> None:
        """Add the watches, in the feed's thread (`ready` is set when done). Idempotent."""
        with self._lock:
            thread = self._thread
            if thread is None or thread.ident is not None:
                return
            thread.start()

    @property
    def healthy(self) -> bool:
        return self.broken is None

    def take(self) -> frozenset[str] | None:
        """The stacks and tenants that may have changed since the last take, or None if
        that is not known (walk everything). Atomic: what arrives after is for the next.
        Every event of a write made before the call is counted (the kernel queues it as
        the write returns, and this reads the queue first). None until every folder is
        watched, and once after that, for the walk that makes the feed's account whole."""
        ready = self.ready.is_set()
        if ready:
            self._drain()
        with self._lock:
            paths, self._paths = self._paths, set()
            unknown, self._unknown = self._unknown, False
            trusted, self._trusted = self._trusted, ready
            if unknown or not trusted or self.broken is not None:
                return None
            links = set(self._links)
        names: set[str] = set()
        for path in paths | links:
            name = self._name_of(path)
            if name is None:
                return None
            if name:
                names.add(name)
        return frozenset(names)

    def pending(self) -> bool:
        """Whether a take now would have something (or say 'unknown')."""
        if not self.ready.is_set():
            return False
        self._drain()
        with self._lock:
            return bool(self._paths) or self._unknown or self.broken is not None

    def trust(self) -> None:
        """The caller compared everything since `ready` (and found it served): takes can
        name what changed from now on."""
        if self.ready.is_set():
            with self._lock:
                self._trusted = True

    def close(self) -> None:
        self._closed = True
        thread = self._thread
        if thread is not None and thread.ident is not None and (
                thread is not threading.current_thread()):
            thread.join()
        with self._reading:
            if self._inotify is not None:
                self._inotify.close()
            self._inotify = None

    # -- inside -----------------------------------------------------------------------------

    def _name_of(self, path: str) -> str | None:
        """"tenant/stack" or "tenant" for a path in the tree, "" for the config file, None
        for the root itself (anything may have changed)."""
        if path == self.config_file:
            return ""
        relative = os.path.relpath(path, self.root)
        if relative == "." or relative.startswith(".."):
            return None
        parts = relative.split(os.sep)
        return "/".join(parts[:2])

    def _watch(self, folder: str, mask: int | None = None) -> None:
        assert self._inotify is not None
        try:
            wd = self._inotify.add_watch(folder, _MASK if mask is None else mask)
        except OSError as err:
            if err.errno == errno.ENOSPC:  # the watch limit (fs.inotify.max_user_watches)
                raise
            return  # gone already (its parent's event says so), or unreadable: loader reports
        self._folders[wd] = folder

    def _watch_tree(self, top: str) -> None:
        """Watch `top` and every folder under it; note the symlinks found."""
        pending = [top]
        while pending:
            folder = pending.pop()
            self._watch(folder)
            try:
                with os.scandir(folder) as it:
                    for entry in it:
                        if entry.is_symlink():
                            with self._lock:
                                self._links.add(entry.path)
                        elif entry.is_dir(follow_symlinks=False):
                            pending.append(entry.path)
            except OSError:
                continue

    def _forget_tree(self, top: str) -> None:
        """Stop watching `top` and what is under it (moved out, or away to another name)."""
        assert self._inotify is not None
        prefix = top + os.sep
        for wd, folder in list(self._folders.items()):
            if folder == top or folder.startswith(prefix):
                del self._folders[wd]
                with contextlib.suppress(OSError):
                    self._inotify.rm_watch(wd)
        with self._lock:
            self._links = {link for link in self._links
                           if link != top and not link.startswith(prefix)}

    def _run(self) -> None:
        try:
            if self.config_file is not None:
                self._watch(os.path.dirname(self.config_file), _CONFIG_MASK)
            self._watch_tree(self.root)
        except Exception as err:
            self._break(f"cannot watch {self.root}: {err}")
        finally:
            self.ready.set()
        self._read_forever()

    def _read_forever(self) -> None:
        assert self._inotify is not None
        waiting = select.poll()
        waiting.register(self._inotify.fileno(), select.POLLIN)
        while not self._closed and self.broken is None:
            try:
                if waiting.poll(_READ_TIMEOUT_MS):
                    self._drain()
            except Exception as err:
                self._break(f"reading the change feed failed: {err}")

    def _drain(self) -> None:
        """Read and record every event queued now (the reader thread, or a take)."""
        with self._reading:
            if self._inotify is None or self.broken is not None:
                return
            try:
                events = self._inotify.read(timeout=0)
                if events:
                    self._handle(events)
            except Exception as err:
                self._break(f"reading the change feed failed: {err}")

    def handle(self, events: list[inotify_simple.Event]) -> None:
        """Record one batch of events, as read from the kernel's queue."""
        with self._reading:
            self._handle(events)

    def _handle(self, events: list[inotify_simple.Event]) -> None:
        changed: set[str] = set()
        overflowed = False
        for event in events:
            if event.mask & _flags.Q_OVERFLOW:
                overflowed = True
                continue
            folder = self._folders.get(event.wd)
            if folder is None:
                continue
            if event.mask & _flags.IGNORED:
                del self._folders[event.wd]
                continue
            path = os.path.join(folder, event.name) if event.name else folder
            inside = path == self.root or path.startswith(self.root + os.sep)
            if not inside and path != self.config_file:
                continue  # another file beside the config file
            if path == self.root and event.mask & (_flags.DELETE_SELF | _flags.MOVE_SELF):
                self._break(f"{self.root} was moved or deleted")
                return
            changed.add(path)
            if event.mask & _GONE:
                with self._lock:
                    self._links.discard(path)
                if event.mask & _flags.ISDIR:
                    self._forget_tree(path)
            elif event.mask & _NEW and event.name and inside:
                if os.path.islink(path):
                    with self._lock:
                        self._links.add(path)
                elif event.mask & _flags.ISDIR:
                    self._watch_tree(path)
        if overflowed:  # events were dropped: a new folder may be unwatched
            self._watch_tree(self.root)
        with self._lock:
            self._paths |= changed
            self._unknown = self._unknown or overflowed
        if (changed or overflowed) and self.notify is not None:
            self.notify()

    def _break(self, why: str) -> None:
        log.warning("change feed off (%s); the watcher polls the tree instead", why)
        with self._lock:
            self.broken = why
        if self.notify is not None:
            self.notify()
