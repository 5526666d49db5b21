"""Live reload: the rules and config a delivery runs with, swapped atomically while serving.

A `Runtime` is one consistent snapshot: the config, the router built from it, the op
registry, the compiled OPS tree and the deliverer over them. `RuntimeHolder.current` is
the snapshot new transactions take; a reload builds the next one aside, in a worker thread
so the event loop keeps answering, and assigns it only if everything compiled. A
transaction keeps the snapshot it took (the server reads `holder.current` once, at MAIL
FROM), so an in-flight delivery finishes on the version it started with.

A change that does not compile leaves the last good version serving; every problem goes to
the log (`file:line:col: code: message`) and to `<state-dir>/status.json`, which
`txco status` prints. Reloads come from SIGHUP and from a watcher that polls the OPS tree's
and the config file's mtimes and sizes (portable, and cheap for thousands of files), with a
debounce so an editor saving several files at once causes one reload.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmtp.config import (
    LISTENER_NAME,
    ConfigError,
    IngressConfig,
    Settings,
    load_ingress_config,
)
from lmtp.delivery import Deliverer
from lmtp.routing import Router
from lmtp.session import Envelope, Session, accept_recipient, deliver_envelope
from txcl.errors import Pos, Problem, TxclError
from txcl.loader import load_tree, no_cyclic_gc
from txcl.ops import OpRegistry

log = logging.getLogger("lmtp.reload")

STATUS_FILE = "status.json"
DEFAULT_WATCH_INTERVAL_S = 1.0
DEFAULT_DEBOUNCE_S = 0.3
# An editor that keeps writing for longer than this still gets its reload.
MAX_DEBOUNCE_WAIT_S = 5.0

# What the watcher compares: (path, mtime in ns, size) of every file it watches.
Fingerprint = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class Runtime:
    """Everything one delivery needs, compiled together. Never changed after it is built."""

    settings: Settings
    ingress: IngressConfig
    router: Router
    tree: Any  # txcl.loader.Tree
    registry: OpRegistry
    deliverer: Deliverer
    version: int
    loaded_at: float  # wall clock
    problems: tuple[Problem, ...] = ()  # warnings; and at start, errors of stacks not served
    fingerprint: Fingerprint = field(default=(), repr=False)


@dataclass(frozen=True)
class ReloadOutcome:
    ok: bool
    trigger: str  # "start" | "sighup" | "watch" | a caller's word
    at: float  # wall clock, when it finished
    duration_s: float  # building aside; the swap itself is one assignment
    version: int  # the version serving after this attempt
    problems: tuple[Problem, ...] = ()  # every error when it failed; warnings when it worked

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "trigger": self.trigger,
            "at": iso_time(self.at),
            "duration_s": round(self.duration_s, 4),
            "version": self.version,
            "problems": [problem_json(p) for p in self.problems],
        }


class ReloadFailed(Exception):
    """The next runtime could not be built; carries every problem found."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def iso_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def problem_json(problem: Problem) -> dict[str, Any]:
    return {**problem.to_json(), "text": str(problem)}


_LOCATED = re.compile(r"(?P<file>[^:\s][^:]*):(?P<line>\d+):(?P<col>\d+): (?P<message>.*)", re.S)


def config_problem(err: ConfigError) -> Problem:
    """A config error as a Problem; `file:line:col: ...` messages keep their position."""
    text = str(err)
    match = _LOCATED.match(text)
    if match:
        pos = Pos(match["file"], int(match["line"]), int(match["col"]))
        return Problem("txco_config_error", match["message"], pos)
    return Problem("txco_config_error", text)


# --- building one runtime ------------------------------------------------------------------


def build_runtime(
    settings: Settings,
    version: int,
    *,
    hostnames: Any = None,
    trace_sink: Callable[..., Any] | None = None,
    fingerprint: Fingerprint = (),
    strict: bool = True,
) -> Runtime:
    """Read the config and the OPS tree and compile everything; ReloadFailed lists all problems.

    Config and ops problems are reported together with the tree's, so one failed reload
    shows the operator everything that needs fixing. `strict` (every reload) refuses a tree
    with any error; at start (`strict=False`) there is no last good version to keep, so the
    stacks that compiled are served and the others' problems are reported.
    """
    problems: list[Problem] = []
    try:
        ingress = load_ingress_config(settings.config_file)
    except ConfigError as err:
        problems.append(config_problem(err))
        ingress = IngressConfig()
    try:
        registry = OpRegistry.from_config(ingress.ops, ingress.base_dir)
    except TxclError as err:
        problems.extend(err.problems)
        registry = OpRegistry.default()
    try:
        tree = load_tree(settings.ops_dir, registry)
    except TxclError as err:
        problems.extend(err.problems)
        tree = None
    tree_problems = tuple(getattr(tree, "problems", ()) or ())
    if strict:
        problems.extend(p for p in tree_problems if p.severity == "error")
    if problems or tree is None:
        raise ReloadFailed(problems)
    router = Router(ingress, settings, hostnames)
    deliverer = Deliverer(tree, settings, registry=registry, trace_sink=trace_sink)
    return Runtime(
        settings=settings,
        ingress=ingress,
        router=router,
        tree=tree,
        registry=registry,
        deliverer=deliverer,
        version=version,
        loaded_at=time.time(),
        problems=tree_problems,
        fingerprint=fingerprint,
    )


def watched_paths(settings: Settings) -> tuple[Path, ...]:
    paths = [Path(settings.ops_dir)]
    if settings.config_file is not None:
        paths.append(Path(settings.config_file))
    return tuple(paths)


def fingerprint(paths: Iterable[Path]) -> Fingerprint:
    """(path, mtime_ns, size) of every file under these files and folders, sorted.

    Symlinked folders are not followed (the loader refuses them too); a missing path is
    recorded as missing, so creating it counts as a change.
    """
    out: list[tuple[str, int, int]] = []
    for root in paths:
        try:
            st = os.stat(root)
        except OSError:
            out.append((str(root), -1, -1))
            continue
        if not os.path.isdir(root):
            out.append((str(root), st.st_mtime_ns, st.st_size))
            continue
        stack = [str(root)]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        continue
                    st = entry.stat()
                except OSError:
                    continue
                out.append((entry.path, st.st_mtime_ns, st.st_size))
    out.sort()
    return tuple(out)


# --- the holder ----------------------------------------------------------------------------


class RuntimeHolder:
    """Holds the serving Runtime and replaces it on reload.

    `current` is a plain attribute read: assignment of a new Runtime is atomic in Python,
    so readers on the event loop or in threads see the old or the new snapshot, never a mix.
    """

    def __init__(
        self,
        initial: Runtime,
        rebuild: Callable[[int, Fingerprint], Runtime],
        paths: tuple[Path, ...] = (),
        status_file: Path | None = None,
    ) -> None:
        self.current: Runtime = initial
        self._rebuild = rebuild
        self.paths = paths
        self.status_file = status_file
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
        self.write_status()

    @classmethod
    def start(
        cls,
        settings: Settings,
        *,
        hostnames: Any = None,
        trace_sink: Callable[..., Any] | None = None,
    ) -> RuntimeHolder:
        """Build the first runtime now and a holder around it.

        ReloadFailed if the config or the ops cannot be loaded; problems in the OPS tree
        only keep their stacks out (reported in the log and status.json).
        """
        paths = watched_paths(settings)
        status_file = Path(settings.state_dir) / STATUS_FILE

        def rebuild(version: int, seen: Fingerprint) -> Runtime:
            return build_runtime(
                settings, version, hostnames=hostnames, trace_sink=trace_sink, fingerprint=seen
            )

        started = time.monotonic()
        initial = build_runtime(
            settings,
            1,
            hostnames=hostnames,
            trace_sink=trace_sink,
            fingerprint=fingerprint(paths),
            strict=False,
        )
        errors = tuple(p for p in initial.problems if p.severity == "error")
        for problem in errors:
            log.error("not served: %s", str(problem).replace("\n", "\n  "))
        holder = cls(initial, rebuild, paths, status_file)
        holder.last = ReloadOutcome(
            ok=not errors,
            trigger="start",
            at=initial.loaded_at,
            duration_s=time.monotonic() - started,
            version=1,
            problems=initial.problems,
        )
        holder.write_status()
        return holder

    # -- reloading --------------------------------------------------------------------------

    async def reload(self, trigger: str = "manual") -> ReloadOutcome:
        """Build the next runtime aside and swap it in if it compiled. Never raises."""
        async with self._lock:
            seen = await asyncio.to_thread(fingerprint, self.paths)
            outcome = await asyncio.to_thread(self._reload_now, trigger, seen)
            await asyncio.to_thread(self.write_status)
            return outcome

    def reload_blocking(self, trigger: str = "manual") -> ReloadOutcome:
        """The same, for callers without an event loop (tests, tools)."""
        outcome = self._reload_now(trigger, fingerprint(self.paths))
        self.write_status()
        return outcome

    def _reload_now(self, trigger: str, seen: Fingerprint) -> ReloadOutcome:
        started = time.monotonic()
        serving = self.current.version
        self._seen = seen
        try:
            with no_cyclic_gc():
                runtime: Runtime | None = self._rebuild(serving + 1, seen)
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
                log.error("  %s", str(problem).replace("\n", "\n  "))
        except Exception as err:  # a bug in a builder must not take the chassis down
            runtime = None
            problems = (Problem("txco_reload_error", f"{type(err).__name__}: {err}"),)
            log.exception("reload (%s) crashed; still serving version %d", trigger, serving)
        if runtime is not None:
            self.current = runtime
        outcome = ReloadOutcome(
            ok=runtime is not None,
            trigger=trigger,
            at=time.time(),
            duration_s=time.monotonic() - started,
            version=self.current.version,
            problems=problems,
        )
        if runtime is not None:
            log.info(
                "reload (%s): now serving version %d (built in %.3fs)",
                trigger,
                runtime.version,
                outcome.duration_s,
            )
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
        """Poll the watched files forever; reload once they changed and then held still for
        `debounce_s` (or after MAX_DEBOUNCE_WAIT_S of continuous writing)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._reload_if_changed(debounce_s)
            except Exception:  # the watcher must outlive any one bad poll
                log.exception("reload watcher: poll failed; watching on")

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
            self.request_reload("watch")
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
            "stacks": _count(getattr(current.tree, "stacks", ())),
            "warnings": [problem_json(p) for p in current.problems],
            "last_reload": self.last.to_json(),
        }

    def write_status(self) -> None:
        """status.json, replaced atomically; failure to write is logged, never raised."""
        if self.status_file is None:
            return
        try:
            write_json_atomically(self.status_file, self.status())
        except OSError as err:
            log.warning("cannot write %s: %s", self.status_file, err)


def _count(stacks: object) -> int:
    try:
        return len(stacks)  # type: ignore[arg-type]
    except TypeError:
        return 0


def write_json_atomically(path: Path, doc: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --- the server's side ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReloadingHandler:
    """The server's RCPT and DATA hooks over whatever runtime is current.

    A transaction takes `holder.current` once, at its first RCPT TO, and keeps it on its
    envelope: every RCPT of the transaction is routed, and its DATA delivered, by that one
    version, however many reloads happen meanwhile. RSET or the end of DATA starts a new
    envelope, so the next transaction takes the version current then.
    """

    holder: RuntimeHolder
    make_transaction: Callable[..., Any]
    listener: str = LISTENER_NAME

    def runtime_of(self, envelope: Envelope) -> Runtime:
        runtime: Runtime | None = getattr(envelope, "runtime", None)
        if runtime is None:
            runtime = self.holder.current
            envelope.runtime = runtime
        return runtime

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        router = self.runtime_of(envelope).router
        return accept_recipient(router, self.listener, envelope, address)

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> list[str]:
        deliverer = self.runtime_of(envelope).deliverer
        return await deliver_envelope(
            deliverer, self.make_transaction, self.listener, session, envelope
        )


# --- `txco status` ---------------------------------------------------------------------------


def read_status(state_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The status.json a running `txco serve` keeps. FileNotFoundError if there is none."""
    path = Path(state_dir) / STATUS_FILE
    return json.loads(path.read_text(encoding="utf-8"))


def format_status(status: Mapping[str, Any]) -> str:
    last = status.get("last_reload") or {}
    lines = [
        f"serving version {status.get('version')} since {status.get('loaded_at')}"
        f" (pid {status.get('pid')}, {status.get('stacks')} stacks)",
        f"ops: {status.get('ops_dir')}   config: {status.get('config_file') or '-'}",
    ]
    verdict = "ok" if last.get("ok") else "FAILED, still serving the version above"
    lines.append(
        f"last reload: {verdict} ({last.get('trigger')}, {last.get('at')}, "
        f"{last.get('duration_s')}s)"
    )
    for problem in last.get("problems") or ():
        text = problem.get("text") or problem.get("message", "")
        lines.extend("  " + line for line in str(text).splitlines())
    warnings = status.get("warnings") or ()
    if warnings and warnings != last.get("problems"):
        lines.append(f"warnings of version {status.get('version')}:")
        for problem in warnings:
            lines.append("  " + str(problem.get("text") or problem.get("message", "")))
    return "\n".join(lines)
