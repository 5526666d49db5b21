"""`txco serve`'s processes: one serving process, or a parent and `--workers` forked workers
that share the listeners the parent bound. Each serving process builds the runtime
(txcl.chassis.reload), starts every head's server over it, reloads on SIGHUP or a file
change, and stops on SIGTERM/SIGINT, giving work in flight each head's grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from txcl.chassis.balance import SessionCounts, WorkerSlot
from txcl.chassis.head import BindError, Head, HeadServer
from txcl.chassis.reload import ReloadFailed, RuntimeHolder, fingerprint, watched_paths
from txcl.chassis.runtime import Places, Preloaded, load_ops_tree
from txcl.chassis.status import COUNTERS, keep_counters_current
from txcl.loader import no_cyclic_gc

OK, FAILURE, USAGE = 0, 1, 2

log = logging.getLogger("txco")


class CannotStart(Exception):
    """The rules or the config cannot be loaded at start: reported as one message, exit 2."""


@dataclass(frozen=True)
class ServeOptions:
    """What every serving process is started with."""

    heads: Sequence[Head]
    settings: Places
    # A trace writer per serving process (opened after the fork); `.close()` at the end.
    open_trace_writer: Callable[[], Any]
    watch_interval: float | None = None
    compile_cache: bool = True  # `--no-cache`: False
    # The tree the parent of --workers loaded before it forked: each first worker serves it.
    preloaded: Preloaded | None = None
    # Listen before compiling: each stack compiles when first needed, the rest right after
    # (RuntimeHolder.start's `lazy`); a preloaded tree is compiled already.
    lazy: bool = True


@dataclass(frozen=True)
class StartGate:
    """How a forked worker tells the parent it is ready, and learns when to accept.

    `ready` (a pipe's write end; None for a worker that replaces a dead one) gets one byte
    once the worker's rules are loaded and its servers set up; `go` (a pipe's read end)
    reaches end-of-file when the parent closes the other end, after every first worker is
    ready, so they all begin to accept at once (a later worker finds it at EOF already)."""

    ready: int | None
    go: int


def serve(options: ServeOptions, workers: int = 1) -> int:
    """Serve until SIGTERM/SIGINT: in this process, or in `workers` forked ones."""
    if workers > 1:
        return _serve_workers(options, workers)
    return _serve_process(options)


def _serve_process(options: ServeOptions, inherited: Mapping[str, object] | None = None,
                   gate: StartGate | None = None, slot: WorkerSlot | None = None) -> int:
    """One serving process: the rules, the trace writer and the event loop."""
    # Until the loop's SIGHUP handler is installed, a HUP (a reload asked for while a large
    # tree still compiles at start) must not kill the chassis.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if slot is not None:
        COUNTERS.use_row(slot.slot)
    writer = options.open_trace_writer()
    try:
        # What start-up built (modules, grammar, the first tree) lives as long as the process:
        # keep it out of the cyclic collector's scans, so a full collection (one follows each
        # reload) costs what changed since, not everything. No collection first (the
        # collector stays off until the freeze): it would scan the whole tree (seconds at
        # 10,000 files) to free a few dozen objects.
        with no_cyclic_gc():
            holder = _runtime_holder(options, writer)
            gc.freeze()
        code = _run_without_waiting_for_threads(_serve(options, holder, inherited, gate, slot))
    finally:
        writer.close()
    _exit_if_threads_still_busy(code)
    return code


def _run_without_waiting_for_threads(main: Coroutine[Any, Any, int]) -> int:
    """asyncio.run(main), except that the end does not wait for worker threads (an op or a
    MIME parse still running for a delivery the head has already answered or cut)."""
    loop = asyncio.new_event_loop()
    executor = ThreadPoolExecutor(thread_name_prefix="txco-worker")
    loop.set_default_executor(executor)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks, timeout=TASKS_CANCEL_WAIT_S))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
            loop.close()


# How long the end of a serving process waits for cancelled tasks, and for idle worker
# threads to notice the executor's shutdown.
TASKS_CANCEL_WAIT_S = 1.0
IDLE_THREADS_WAIT_S = 1.0


def _exit_if_threads_still_busy(code: int) -> None:
    """Threads still running now would keep the interpreter from exiting (it joins them):
    log them and end the process here, streams flushed."""
    deadline = time.monotonic() + IDLE_THREADS_WAIT_S
    busy = []
    for thread in threading.enumerate():
        if thread is threading.main_thread() or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            busy.append(thread.name)
    if not busy:
        return
    log.warning("exiting with %d worker thread(s) still busy (%s): their deliveries were "
                "answered or cut already", len(busy), ", ".join(busy))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _runtime_holder(options: ServeOptions, trace_sink: Callable[..., Any] | None
                    ) -> RuntimeHolder:
    """Everything a delivery needs, loaded and compiled before the first connection; later
    versions are compiled on SIGHUP or a file change (txcl.chassis.reload)."""
    settings = options.settings
    try:
        return RuntimeHolder.start(settings, options.heads, trace_sink=trace_sink,
                                   compile_cache=options.compile_cache,
                                   preloaded=options.preloaded, lazy=options.lazy,
                                   feed=True)
    except ReloadFailed as err:
        raise CannotStart(f"cannot load {settings.ops_dir} and {settings.config_file}:\n{err}"
                          ) from None


async def _serve(options: ServeOptions, holder: RuntimeHolder,
                 inherited: Mapping[str, object] | None = None,
                 gate: StartGate | None = None, slot: WorkerSlot | None = None) -> int:
    servers: dict[str, HeadServer] = {}
    for head in options.heads:
        server = head.server(holder, None if inherited is None else inherited[head.name], slot)
        try:
            await server.start(accept=gate is None)
        except BindError as err:
            for started in servers.values():
                await started.close(grace=0)
            print(f"txco: error: {err}", file=sys.stderr)
            return FAILURE
        servers[head.name] = server
    if gate is not None:
        if gate.ready is not None:
            os.write(gate.ready, b".")
            os.close(gate.ready)
        await _end_of_file(gate.go)
        for server in servers.values():
            await server.accept_connections()
    for name, server in servers.items():
        log.info("%s listening on %s", name, ", ".join(server.bound))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    warm_up = loop.create_task(_warm_up(holder))  # reloads wait for the start it completes
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    holder.install_sighup(loop)
    watcher = None
    if options.watch_interval:
        watcher = loop.create_task(holder.watch(options.watch_interval))
    # One process keeps the shared counters in status.json current.
    counting = None if slot is not None and slot.slot else loop.create_task(
        keep_counters_current(holder.write_status))
    await stop.wait()
    warm_up.cancel()
    if counting is not None:
        counting.cancel()
    if watcher is not None:
        watcher.cancel()
    for name, server in servers.items():
        log.info("%s shutting down: finishing deliveries in flight (at most %gs)",
                 name, server.grace_s)
        await server.close(grace=server.grace_s)
        log.info("%s stopped", name)
    return OK


async def _warm_up(holder: RuntimeHolder) -> None:
    """Compile the stacks a lazy start left, then build the parser if nothing needed it."""
    completing = holder.complete_start()
    if completing is not None:
        await completing
    if holder.current.tree.parsed == 0:  # all from the cache: the first edit need not wait
        await asyncio.get_running_loop().run_in_executor(None, _build_parser)


def _build_parser() -> None:
    """Build the rule parser's tables (a start that parsed nothing has not built them)."""
    from txcl.parser import parse

    parse("", "<warm-up>")


async def _end_of_file(fd: int) -> None:
    """Wait until the pipe `fd` reads as closed (its writers are gone), then close it."""
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not closed.done():
            closed.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await closed
    finally:
        loop.remove_reader(fd)
        os.close(fd)


# --- the parent of --workers ----------------------------------------------------------------

# A worker that dies sooner than this after its start is restarted only after this long,
# so a worker that cannot run does not spin the machine.
WORKER_RESTART_DELAY_S = 1.0
# How long the parent waits for its first workers to load the rules before letting the
# ready ones accept anyway.
WORKERS_READY_TIMEOUT_S = 60.0


def _serve_workers(options: ServeOptions, count: int) -> int:
    """The parent of `count` forked workers: it binds the listeners once, each worker
    serves them with its own rules and event loop (the least busy worker takes each new
    connection: txcl.chassis.balance), and signals are forwarded: SIGHUP reloads every
    worker, SIGTERM/SIGINT stop them all. A worker that dies is replaced; one that cannot
    load the rules at start (exit 2) stops the whole server with that status."""
    listeners: dict[str, object] = {}
    try:
        for head in options.heads:
            listeners[head.name] = head.bind()
    except BindError as err:
        _release(options.heads, listeners)
        print(f"txco: error: {err}", file=sys.stderr)
        return FAILURE
    children: dict[int, tuple[float, int]] = {}  # pid -> (when it started, its slot)
    sessions = SessionCounts(count)
    COUNTERS.share(count)
    stopping = False

    def forward(signum: int, frame: Any) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    # What the parent imported (and the tree it loaded) is shared with every worker until
    # written to: keep the workers' cyclic collector from writing to it (Instagram's
    # gc.freeze-before-fork; no collection first, as in _serve_process).
    with no_cyclic_gc():
        options = dataclasses.replace(options, preloaded=_preload(options))
        gc.freeze()
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()
    try:
        for slot in range(count):
            gate = StartGate(ready_write, go_read)
            pid = _fork_worker(options, listeners, gate, WorkerSlot(sessions, slot),
                               (ready_read, go_write))
            children[pid] = (time.monotonic(), slot)
        os.close(ready_write)
        ready = _count_ready(ready_read, count, WORKERS_READY_TIMEOUT_S)
        os.close(go_write)  # every worker sees end-of-file on go_read: accept from now on
        if ready < count:
            log.warning("%d of %d workers ready after %gs; the others join when they are",
                        ready, count, WORKERS_READY_TIMEOUT_S)
        log.info("serving with %d workers (pids %s)", count, " ".join(map(str, children)))
        status = OK
        while children:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            child = children.pop(pid, None)
            if child is None:
                continue
            started, slot = child
            sessions.set(slot, 0)  # its connections died with it
            code = os.waitstatus_to_exitcode(wait_status)
            if stopping:
                continue
            if code == USAGE:
                status = USAGE
                forward(signal.SIGTERM, None)
                continue
            log.error("worker %d exited (status %d); starting another", pid, code)
            if time.monotonic() - started < WORKER_RESTART_DELAY_S:
                time.sleep(WORKER_RESTART_DELAY_S)
            if not stopping:  # it loads the tree as it is now, not as the first workers did
                fresh = dataclasses.replace(options, preloaded=None)
                pid = _fork_worker(fresh, listeners, StartGate(None, go_read),
                                   WorkerSlot(sessions, slot), ())
                children[pid] = (time.monotonic(), slot)
        return status
    finally:
        os.close(go_read)
        _release(options.heads, listeners)


def _preload(options: ServeOptions) -> Preloaded | None:
    """The OPS tree, compiled once in the parent so the workers share its pages instead of
    each compiling its own (ops are checked, and each worker's runtime built, in the worker)."""
    started = time.monotonic()
    try:
        seen = fingerprint(watched_paths(options.settings))
        with no_cyclic_gc():
            tree = load_ops_tree(options.settings, None, compile_cache=options.compile_cache)
    except Exception:  # the workers load it themselves and report what is wrong
        log.exception("loading %s before starting the workers failed", options.settings.ops_dir)
        return None
    log.info("loaded for the workers: %d stacks, %d rule files (%d compiled, %d parsed) in "
             "%.3fs", len(tree.stacks), tree.files, tree.compiled, tree.parsed,
             time.monotonic() - started)
    return Preloaded(tree, seen)


def _release(heads: Sequence[Head], listeners: Mapping[str, object]) -> None:
    for head in heads:
        if head.name in listeners:
            head.release(listeners[head.name])


def _count_ready(ready_read: int, count: int, timeout: float) -> int:
    """Read one byte per ready worker from `ready_read` until `count` arrive, every worker
    has closed its end (ready or dead), or `timeout` passes; close it; how many arrived."""
    deadline = time.monotonic() + timeout
    ready = 0
    try:
        while ready < count:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([ready_read], [], [], left)[0]:
                break
            got = os.read(ready_read, count)
            if not got:
                break
            ready += len(got)
    finally:
        os.close(ready_read)
    return ready


def _fork_worker(options: ServeOptions, listeners: Mapping[str, object], gate: StartGate,
                 slot: WorkerSlot, parent_only: tuple[int, ...]) -> int:
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = FAILURE
    try:
        for fd in parent_only:  # else end-of-file could never come
            os.close(fd)
        _die_with_parent(parent)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        code = _serve_process(options, listeners, gate, slot)
    except CannotStart as err:
        print(f"txco: error: {err}", file=sys.stderr)
        code = USAGE
    except KeyboardInterrupt:
        code = OK
    except BaseException:
        log.exception("worker %d failed", os.getpid())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _die_with_parent(parent: int) -> None:
    """A worker gets SIGTERM when the parent dies, even by SIGKILL, so that no orphan
    serves (or spins on) the listeners the parent bound. Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(OK)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
