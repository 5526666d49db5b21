"""Live reload: the runtime every head serves from, swapped atomically while serving.

`RuntimeHolder.current` is the snapshot new work takes; a reload builds the next one aside
(txcl.chassis.runtime), in a worker thread so the event loop keeps answering, and assigns it
only if everything compiled. Work keeps the snapshot it took (LMTP: at the first RCPT), so
in-flight work finishes on the version it started with.

A stack whose change has errors keeps its last good version serving while the other
stacks' changes go live (a stack new in the change is not served until it is fixed); a
configuration error keeps the whole last good version. Either way the reload is reported
as failed, every problem goes to the log (`file:line:col: code: message`) and to
`<state-dir>/status.json`, which `txco status` prints. Reloads come from SIGHUP and from a
watcher, with a debounce so an editor saving several files at once causes one reload. With
a change feed (txcl.chassis.changes, Linux inotify) the watcher waits on it and a reload
re-reads only the stacks under changed paths; without one, or once it cannot tell what
changed, the watcher polls the OPS tree's and the config file's mtimes and sizes every
interval and a reload compares every stack's signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from txcl.chassis.changes import ChangeFeed
from txcl.chassis.head import Head
from txcl.chassis.runtime import (
    Fingerprint,
    Places,
    Preloaded,
    ReloadFailed,
    Runtime,
    StackFailure,
    build_runtime,
    over_tree,
)
from txcl.chassis.status import (
    COUNTERS,
    STATUS_FILE,
    iso_time,
    problem_json,
    stack_memory,
    write_json_atomically,
)
from txcl.errors import Problem
from txcl.loader import LazyStacks, Scan, complete, no_cyclic_gc, scan_tree

log = logging.getLogger("txco.reload")

DEFAULT_WATCH_INTERVAL_S = 1.0
DEFAULT_DEBOUNCE_S = 0.3
# An editor that keeps writing for longer than this still gets its reload.
MAX_DEBOUNCE_WAIT_S = 5.0


@dataclass(frozen=True)
class ReloadOutcome:
    ok: bool  # everything went live
    trigger: str  # "start" | "sighup" | "watch" | a caller's word
    at: float  # wall clock, when it finished
    duration_s: float  # building aside; the swap itself is one assignment
    version: int  # the version serving after this attempt
    problems: tuple[Problem, ...] = ()  # every error, and the new version's warnings
    failed_stacks: tuple[StackFailure, ...] = ()  # in a version that went live

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "trigger": self.trigger,
            "at": iso_time(self.at),
            "duration_s": round(self.duration_s, 4),
            "version": self.version,
            "problems": [problem_json(p) for p in self.problems],
            "failed_stacks": [
                {"stack": f.stack, "serving": "last good version" if f.serving else "none",
                 "problems": [problem_json(p) for p in f.problems]}
                for f in self.failed_stacks
            ],
        }



def watched_paths(settings: Places) -> tuple[Path, ...]:
    paths = [Path(settings.ops_dir)]
    if settings.config_file is not None:
        paths.append(Path(settings.config_file))
    return tuple(paths)


def fingerprint(paths: Iterable[Path]) -> Fingerprint:
    """(path, mtime_ns, size) of every file under these files and folders, sorted.

    Symlinked folders are not followed (the loader refuses them too), and a symlink that
    cannot be followed counts as itself, so creating or removing a loop is a change; a
    missing path is recorded as missing, so creating it counts as a change.
    """
    return survey(paths)[0]


def survey(paths: Iterable[Path]) -> tuple[Fingerprint, Scan | None]:
    """The fingerprint of these paths, and the walk of the first one if it is a folder (the
    OPS tree), which the load that follows reads instead of walking it again."""
    out: list[tuple[str, int, int]] = []
    first: Scan | None = None
    for number, root in enumerate(paths):
        try:
            st = os.stat(root)
        except OSError:
            out.append((str(root), -1, -1))
            continue
        if not os.path.isdir(root):
            out.append((str(root), st.st_mtime_ns, st.st_size))
            continue
        scan = scan_tree(str(root))
        if number == 0:
            first = scan
        for entries in scan.entries.values():
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        continue
                    st = entry.stat()
                except OSError:  # a symlink that loops or leads nowhere: watch the link
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                out.append((entry.path, st.st_mtime_ns, st.st_size))
    out.sort()
    return tuple(out), first


def _indented(problem: Problem) -> str:
    """A problem as a log line shows it: its further lines (source, caret) indented."""
    return str(problem).replace("\n", "\n  ")


def _serving_words(failure: StackFailure) -> str:
    if failure.serving:
        return "still serving its last good version"
    return "not served (its mail gets 451 4.3.0 and waits in the queue)"


# --- the holder ----------------------------------------------------------------------------


class RuntimeHolder:
    """Holds the serving Runtime and replaces it on reload.

    `current` is a plain attribute read: assignment of a new Runtime is atomic in Python,
    so readers on the event loop or in threads see the old or the new snapshot, never a mix.
    """

    def __init__(
        self,
        initial: Runtime,
        rebuild: Callable[[int, Fingerprint, Runtime, Scan | None, AbstractSet[str] | None],
                          Runtime],
        paths: tuple[Path, ...] = (),
        status_file: Path | None = None,
        feed: ChangeFeed | None = None,
    ) -> None:
        self.current: Runtime = initial
        self._rebuild = rebuild
        self.paths = paths
        self.status_file = status_file
        self.feed = feed
        # What the feed reported that no version serves yet (a reload that did not go live):
        # names for the next reload, or None when it must walk everything.
        self._unapplied: frozenset[str] | None = frozenset()
        self.last = ReloadOutcome(
            ok=True,
            trigger="start",
            at=initial.loaded_at,
            duration_s=0.0,
            version=initial.version,
            problems=initial.problems,
        )
        self._seen: Fingerprint = initial.fingerprint
        self._lock = asyncio.Lock()
        self._pending: str | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._memory: tuple[Runtime, dict[str, Any]] | None = None
        # A lazily loaded start: how to complete it, and the task doing so (see complete_start)
        self._complete_with: Callable[[Runtime], Runtime] | None = None
        self._completing: asyncio.Task[None] | None = None
        self.write_status()

    @classmethod
    def start(
        cls,
        settings: Places,
        heads: Sequence[Head],
        *,
        trace_sink: Callable[..., Any] | None = None,
        compile_cache: bool = True,
        preloaded: Preloaded | None = None,
        lazy: bool = False,
        feed: bool = False,
    ) -> RuntimeHolder:
        """Build the first runtime now and a holder around it.

        ReloadFailed if the config or the ops cannot be loaded; problems in the OPS tree
        only keep their stacks out (reported in the log and status.json). `preloaded` is a
        tree loaded before (by the parent of --workers): it is served as it is, and the
        first change since its fingerprint reloads. `lazy` only finds the stacks: each is
        compiled when a delivery first needs it, and complete_start() compiles the rest
        (then reports problems); until it is done, reloads and the watcher wait.
        Each reload builds over the serving runtime's tree, compiling only what changed.
        `feed` makes a ChangeFeed, which the watcher (or else the first reload) starts once
        the start is complete; `close()` ends it.
        """
        paths = watched_paths(settings)
        changes = ChangeFeed(settings.ops_dir, settings.config_file) if feed else None
        status_file = Path(settings.state_dir) / STATUS_FILE
        lazy = lazy and preloaded is None

        def rebuild(version: int, seen: Fingerprint, serving: Runtime, scan: Scan | None,
                    changed: AbstractSet[str] | None) -> Runtime:
            return build_runtime(
                settings, version, heads, trace_sink=trace_sink, fingerprint=seen,
                previous=serving.tree, compile_cache=compile_cache, scan=scan, serving=serving,
                changed=changed,
            )

        started = time.monotonic()
        seen, scan = ((), None) if lazy or preloaded is not None else survey(paths)
        initial = build_runtime(
            settings,
            1,
            heads,
            trace_sink=trace_sink,
            fingerprint=seen if preloaded is None else preloaded.fingerprint,
            strict=False,
            preloaded=None if preloaded is None else preloaded.tree,
            compile_cache=compile_cache,
            lazy=lazy,
            scan=scan,
        )
        tree = initial.tree
        if lazy:
            log.info("found version 1: %d stacks in %.3fs; each is compiled when first needed, "
                     "all of them from now on", len(tree.stacks), time.monotonic() - started)
        else:
            log.info("loaded version 1: %d stacks, %d rule files (%d compiled, %d parsed) in "
                     "%.3fs", len(tree.stacks), tree.files, tree.compiled, tree.parsed,
                     time.monotonic() - started)
        errors = tuple(p for p in initial.problems if p.severity == "error")
        for problem in errors:
            log.error("not served: %s", _indented(problem))
        holder = cls(initial, rebuild, paths, status_file, changes)
        if lazy:
            holder._complete_with = lambda runtime: over_tree(
                runtime, complete(runtime.tree, _let_others_run), heads, trace_sink)
        holder.last = ReloadOutcome(
            ok=not errors,
            trigger="start",
            at=initial.loaded_at,
            duration_s=time.monotonic() - started,
            version=1,
            problems=initial.problems,
            failed_stacks=initial.failed_stacks,
        )
        holder.write_status()
        return holder

    # -- a lazy start -----------------------------------------------------------------------

    def complete_start(self) -> asyncio.Task[None] | None:
        """Compile, in a worker thread, every stack of a lazily loaded start not compiled yet,
        then serve the completed tree (the same version; the stacks already compiled are
        the same objects) and report its problems as start's. Reloads wait for it. The task,
        or None if the start was not lazy."""
        if self._complete_with is None:
            return None
        if self._completing is None:
            self._completing = asyncio.get_running_loop().create_task(self._complete())
        return self._completing

    async def _complete(self) -> None:
        async with self._lock:
            logged = set(self.last.problems)  # at start
            try:
                await asyncio.to_thread(self._complete_now)
            except Exception:  # the lazy tree keeps serving: each stack compiles when needed
                log.exception("compiling the stacks of version %d failed", self.current.version)
            await asyncio.to_thread(self.write_status)
            for problem in self.last.problems:
                if problem.severity == "error" and problem not in logged:
                    log.error("not served: %s", _indented(problem))

    def _complete_now(self) -> None:
        assert self._complete_with is not None
        started = time.monotonic()
        seen = fingerprint(self.paths)
        with no_cyclic_gc():
            runtime = self._complete_with(self.current)
            self._seen = seen
            self.current = dataclasses.replace(runtime, fingerprint=seen)
            # What the start compiled lives as long as the process: out of the collector's
            # scans (as the supervisor does for an eager start), before it scans it once.
            gc.freeze()
        tree = runtime.tree
        log.info("compiled version %d: %d stacks, %d rule files (%d compiled, %d parsed) in "
                 "%.3fs", runtime.version, len(tree.stacks), tree.files, tree.compiled,
                 tree.parsed, time.monotonic() - started)
        self.last = dataclasses.replace(
            self.last, ok=not any(p.severity == "error" for p in tree.problems),
            duration_s=self.last.duration_s + time.monotonic() - started,
            problems=tree.problems)

    async def _started(self) -> None:
        if self._completing is not None:
            await asyncio.shield(self._completing)

    # -- reloading --------------------------------------------------------------------------

    async def reload(self, trigger: str = "manual") -> ReloadOutcome:
        """Build the next runtime aside and swap it in if it compiled. Never raises."""
        await self._started()
        async with self._lock:
            changed = self._take_changes()
            if changed is None:
                seen, scan = await asyncio.to_thread(survey, self.paths)
            else:  # the feed knows what changed: no walk
                seen, scan = self._seen, None
            outcome = await asyncio.to_thread(self._reload_now, trigger, seen, scan, changed)
            await asyncio.to_thread(self.write_status)
            return outcome

    def _take_changes(self) -> frozenset[str] | None:
        """The stacks and tenants that may have changed since the serving version was built,
        or None if that is not known (no feed, or it lost track): everything is compared."""
        if self.feed is not None:
            self.feed.start()  # with --no-watch, at the first SIGHUP (which walks everything)
        taken = None if self.feed is None else self.feed.take()
        unapplied, self._unapplied = self._unapplied, None
        if taken is None or unapplied is None:
            return None
        return taken | unapplied

    def close(self) -> None:
        """Stop the change feed, if any (the holder goes on serving; reloads walk the tree)."""
        if self.feed is not None:
            self.feed.close()

    def _reload_now(self, trigger: str, seen: Fingerprint, scan: Scan | None = None,
                    changed: frozenset[str] | None = None) -> ReloadOutcome:
        started = time.monotonic()
        serving = self.current.version
        self._seen = seen
        self._unapplied = changed  # until a version built over them serves
        try:
            with no_cyclic_gc():
                runtime: Runtime | None = self._rebuild(serving + 1, seen, self.current, scan,
                                                        changed)
            problems = runtime.problems if runtime else ()
        except ReloadFailed as failed:
            runtime = None
            problems = failed.problems or (Problem("txco_reload_error", "reload failed"),)
            log.error(
                "reload (%s) failed; still serving version %d. %d problem(s):",
                trigger,
                serving,
                len(problems),
            )
            for problem in problems:
                log.error("  %s", _indented(problem))
        except Exception as err:  # a bug in a builder must not take the chassis down
            runtime = None
            problems = (Problem("txco_reload_error", f"{type(err).__name__}: {err}"),)
            log.exception("reload (%s) crashed; still serving version %d", trigger, serving)
        held_back = runtime.failed_stacks if runtime is not None else ()
        if runtime is not None:
            self.current = runtime
            self._unapplied = frozenset()
        outcome = ReloadOutcome(
            ok=runtime is not None and not held_back,
            trigger=trigger,
            at=time.time(),
            duration_s=time.monotonic() - started,
            version=self.current.version,
            problems=problems,
            failed_stacks=held_back,
        )
        if runtime is not None:
            log.info(
                "reload (%s): now serving version %d (built in %.3fs; %d of %d rule files "
                "compiled, %d parsed)",
                trigger,
                runtime.version,
                outcome.duration_s,
                runtime.tree.compiled,
                runtime.tree.files,
                runtime.tree.parsed,
            )
        for stack in held_back:
            log.error("reload (%s): stack %s FAILED; %s. %d problem(s):", trigger, stack.stack,
                      _serving_words(stack), len(stack.problems))
            for problem in stack.problems:
                log.error("  %s", _indented(problem))
        self.last = outcome
        return outcome

    def request_reload(self, trigger: str) -> None:
        """Ask for a reload from a signal handler or callback on the loop. Requests that
        arrive while one runs are folded into one more reload after it."""
        self._pending = trigger
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._pending is not None:
            trigger, self._pending = self._pending, None
            await self.reload(trigger)

    def install_sighup(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        loop = loop or asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.request_reload, "sighup")

    async def watch(
        self,
        interval_s: float = DEFAULT_WATCH_INTERVAL_S,
        debounce_s: float = DEFAULT_DEBOUNCE_S,
    ) -> None:
        """Reload, forever, once the watched files changed and then held still for
        `debounce_s` (or after MAX_DEBOUNCE_WAIT_S of continuous writing). With a healthy
        change feed the watcher waits on it, and `interval_s` is not used; without one (or
        from when it breaks) it compares the files' fingerprint every `interval_s`."""
        await self._started()
        feed = self.feed
        wake = asyncio.Event()
        if feed is not None:
            loop = asyncio.get_running_loop()
            feed.notify = lambda: _call_soon(loop, wake.set)
            feed.start()
            await asyncio.to_thread(feed.ready.wait)
            if feed.healthy:  # what changed before the feed watched everything: one walk
                await self._reload_if_changed(debounce_s)
                feed.trust()
                log.info("change feed ready: a reload reads only what changed")
        while True:
            try:
                if feed is not None and feed.healthy:
                    await self._reload_on_feed(wake, debounce_s)
                else:
                    await asyncio.sleep(interval_s)
                    await self._reload_if_changed(debounce_s)
            except Exception:  # the watcher must outlive any one bad poll
                log.exception("reload watcher: poll failed; watching on")

    async def _reload_on_feed(self, wake: asyncio.Event, debounce_s: float) -> None:
        await wake.wait()
        wake.clear()
        waited = 0.0
        while waited < MAX_DEBOUNCE_WAIT_S:
            await asyncio.sleep(debounce_s)
            waited += debounce_s
            if not wake.is_set():
                break
            wake.clear()
        assert self.feed is not None
        if self.feed.pending():  # else a reload since took them (a SIGHUP)
            await self._reload_for("watch")

    async def _reload_if_changed(self, debounce_s: float) -> None:
        now = await asyncio.to_thread(fingerprint, self.paths)
        if now == self._seen:
            return
        waited = 0.0
        while waited < MAX_DEBOUNCE_WAIT_S:
            await asyncio.sleep(debounce_s)
            waited += debounce_s
            settled = await asyncio.to_thread(fingerprint, self.paths)
            if settled == now:
                break
            now = settled
        if now != self._seen:
            self._unapplied = None  # the feed missed it, or there is none: walk everything
            await self._reload_for("watch")

    async def _reload_for(self, trigger: str) -> None:
        self.request_reload(trigger)
        if self._drainer is not None:
            await asyncio.shield(self._drainer)

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        current = self.current
        return {
            "pid": os.getpid(),
            "version": current.version,
            "loaded_at": iso_time(current.loaded_at),
            "ops_dir": str(current.settings.ops_dir),
            "config_file": None
            if current.settings.config_file is None
            else str(current.settings.config_file),
            "stacks": len(current.tree.stacks),
            "rule_files": {"total": current.tree.files, "compiled": current.tree.compiled,
                           "parsed": current.tree.parsed},
            "memory": self._memory_of(current),
            "warnings": [problem_json(p) for p in current.problems],
            "last_reload": self.last.to_json(),
            "counters": COUNTERS.snapshot(),  # since the server started, all workers
        }

    def _memory_of(self, runtime: Runtime) -> dict[str, Any]:
        """stack_memory of a runtime, weighed once per version."""
        if self._memory is None or self._memory[0] is not runtime:
            stacks = runtime.tree.stacks
            if isinstance(stacks, LazyStacks):  # weighing must not compile
                stacks = stacks.compiled()
            self._memory = (runtime, stack_memory(stacks))
        return self._memory[1]

    def write_status(self) -> None:
        """status.json, replaced atomically; failure to write is logged, never raised."""
        if self.status_file is None:
            return
        try:
            write_json_atomically(self.status_file, self.status())
        except OSError as err:
            log.warning("cannot write %s: %s", self.status_file, err)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """callback on `loop`, from another thread; nothing once the loop is closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


def _let_others_run() -> None:
    """Between two stacks of a long compile: the GIL to a thread that waits for it."""
    time.sleep(0)
