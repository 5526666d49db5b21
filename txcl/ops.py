"""Ops: named operations a rule calls with `EXEC "op://NAME"`, and the registry of them.

An op is `op(envelope, args, ctx) -> dict | Awaitable[dict]`: it reads the envelope (and
must not mutate it), gets the rule's WITH arguments and an OpContext, and returns a JSON
merge patch (RFC 7386) for the runner to apply. Sync ops run in a worker thread so they do
not block the event loop; the runner gives every call a deadline.

A registered op carries what it reads (`OpReads`): the envelope paths, and whether it
reads the raw message. A source that builds envelopes lazily (the LMTP head builds only the
message fields a stack can observe) reads that instead of knowing the ops. Ops declared
nowhere (configured, entry points) may read anything.

The registry is filled, later sources overriding earlier ones, from:
1. built-ins: `txcl.builtin_ops.BUILTINS`, each declared with what it reads;
2. the Python entry-point group `txcl.ops` (an entry point loads an op, named after the
   entry point, or a mapping of names to ops; an op given as a `RegisteredOp` keeps the
   reads it declares);
3. the configuration's `ops:` section: `{python: "module:function", path: "dir"}` or
   `{command: ["prog", "arg"...]}` (paths relative to the configuration file's folder).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import os
import queue
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

from txcl.ast import Segment
from txcl.errors import Problem, TxclLoadError

Op = Callable[
    [Mapping[str, Any], Mapping[str, Any], "OpContext"],
    "dict[str, Any] | Awaitable[dict[str, Any]]",
]

ENTRY_POINT_GROUP: Final = "txcl.ops"
_STDERR_TAIL: Final = 400


class OpFailure(Exception):
    """An op could not do its work (a command exited non-zero, printed no JSON object, ...)."""


class StorageError(ValueError):
    """An op asked for storage outside its tenant's own folder, or without a state dir."""


@dataclass(frozen=True, slots=True)
class OpContext:
    """What an op knows about the call besides the envelope and its arguments."""

    tenant: str
    stack: str  # "acme/_mail"
    rid: str
    state_dir: Path | None
    deadline_s: float
    op: str = ""
    # The message exactly as the source received it, when the source hands it over (the
    # LMTP head does): the same bytes as `_txc.<src>.msg.raw`, without a base64 round trip.
    message: bytes | None = field(default=None, repr=False)
    # The same for a repeated delivery of the same message to the same stack (a retry after
    # a 4xx), different otherwise: `make_delivery_key`. "" when the caller gave none. An op
    # with side effects keys them on it so that a retry does not repeat them.
    delivery_key: str = ""

    def storage(self, *parts: str) -> Path:
        """A folder under `<state_dir>/tenants/<tenant>/<stack-name>/`, created if needed.

        Refuses (StorageError) any part that is empty, `.`, `..`, absolute or holds a path
        separator, so an argument like `folder = "../../x"` can never leave the tenant's
        storage; the resolved folder is checked again, against symlinks. That check walks
        every component, so its verdict is kept for the life of the process: the state dir
        is the server's own, and what could change it (a link planted there) is not in a
        rule's reach.
        """
        if self.state_dir is None:
            raise StorageError("this run has no state dir, so ops have no storage")
        stack_name = self.stack.rpartition("/")[2]
        for part in (self.tenant, stack_name, *parts):
            _check_storage_part(part)
        key = (self.state_dir, self.tenant, self.stack, parts)
        folder = _checked_storage.get(key)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)  # one syscall; it may have been removed
            return folder
        base = Path(self.state_dir) / "tenants" / self.tenant / stack_name
        folder = base.joinpath(*parts)
        folder.mkdir(parents=True, exist_ok=True)
        if not folder.resolve().is_relative_to(base.resolve()):
            raise StorageError(f"storage {'/'.join(parts)!r} leaves the tenant's folder")
        if len(_checked_storage) >= _CHECKED_STORAGE_MAX:
            _checked_storage.clear()
        _checked_storage[key] = folder
        return folder


def message_digest(message: bytes) -> bytes:
    """The message's part of a delivery key (SHA-256; hashlib lets go of the GIL for it)."""
    return hashlib.sha256(message).digest()


def make_delivery_key(
    digest: bytes, sender: str, recipients: Iterable[str], stack: str
) -> str:
    """`OpContext.delivery_key`: from the message (`message_digest`), the envelope sender,
    the set of recipients (order and repeats do not count) and the stack."""
    h = hashlib.sha256(digest)
    for part in (sender, "\0".join(sorted(set(recipients))), stack):
        h.update(b"\0" + part.encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


# (state_dir, tenant, stack, parts) -> the folder that passed storage()'s checks. Bounded:
# folder names come from rule arguments, so a stack could otherwise grow it without end.
_checked_storage: dict[tuple[Path, str, str, tuple[str, ...]], Path] = {}
_CHECKED_STORAGE_MAX = 4096


def _check_storage_part(part: object) -> None:
    if not isinstance(part, str) or not part or part in (".", ".."):
        raise StorageError(f"storage path part {part!r} is not a plain name")
    if "/" in part or "\\" in part or "\0" in part or os.path.isabs(part):
        raise StorageError(f"storage path part {part!r} may not hold a path separator")


def _is_async(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


@dataclass(frozen=True, slots=True)
class OpReads:
    """What an op reads. `paths`: the envelope paths it may read (a segment `ANY_SOURCE`
    stands for the envelope's own source, `_txc.<src>`), None when it may read anything.
    `message`: it reads the raw message: `OpContext.message` when the caller passes it,
    else `_txc.<src>.msg.raw` (a caller that builds `raw` lazily passes the bytes)."""

    paths: frozenset[tuple[Segment, ...]] | None = None
    message: bool = False

    @classmethod
    def only(cls, paths: Iterable[tuple[Segment, ...]], *, message: bool = False) -> OpReads:
        return cls(frozenset(paths), message)


ANYTHING: Final = OpReads()


@dataclass(frozen=True, slots=True)
class RegisteredOp:
    name: str
    fn: Op = field(repr=False)
    source: str  # where it came from, for `txcl lint` and error messages
    reads: OpReads = ANYTHING
    is_async: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_async", _is_async(self.fn))

    @classmethod
    def builtin(cls, name: str, fn: Op, reads: OpReads) -> RegisteredOp:
        """A built-in op of `txcl.builtin_ops`, with what it reads."""
        return cls(name, fn, f"builtin {fn.__module__}", reads)


class OpRegistry:
    """Name -> op. Immutable once built; `from_config` and `default` build one."""

    def __init__(self, ops: Mapping[str, Op] | None = None, *, source: str = "given") -> None:
        self._ops: dict[str, RegisteredOp] = {}
        for name, fn in (ops or {}).items():
            self._ops[name] = RegisteredOp(name, fn, source)

    @classmethod
    def default(cls) -> OpRegistry:
        """Built-ins and entry points; raises TxclLoadError if one of them cannot be loaded."""
        registry = cls()
        problems: list[Problem] = []
        registry._add_defaults(problems)
        if problems:
            raise TxclLoadError(problems)
        return registry

    @classmethod
    def from_config(
        cls, ops_section: Mapping[str, Any] | None, base_dir: Path, *, defaults: bool = True
    ) -> OpRegistry:
        """Built-ins, entry points (when `defaults`), then the configured ops over them.

        Raises TxclLoadError listing every op that cannot be loaded.
        """
        registry = cls()
        problems: list[Problem] = []
        if defaults:
            registry._add_defaults(problems)
        if ops_section is not None and not isinstance(ops_section, Mapping):
            problems.append(_problem("ops: must be a mapping of op names to their definitions"))
            ops_section = {}
        configured: dict[str, Op] = {}
        for name, spec in (ops_section or {}).items():
            fn = _configured_op(str(name), spec, Path(base_dir), problems)
            if fn is not None:
                configured[str(name)] = fn
        if problems:
            raise TxclLoadError(problems)
        return registry.with_ops(configured, source="config")

    def with_ops(self, ops: Mapping[str, Op], *, source: str = "given") -> OpRegistry:
        """A new registry: this one plus (overridden by) `ops`."""
        registry = OpRegistry()
        registry._ops = dict(self._ops)
        for name, fn in ops.items():
            registry._ops[name] = RegisteredOp(name, fn, source)
        return registry

    def entry(self, name: str) -> RegisteredOp | None:
        return self._ops.get(name)

    def names(self) -> frozenset[str]:
        return frozenset(self._ops)

    def __contains__(self, name: object) -> bool:
        return name in self._ops

    async def call(
        self,
        name: str,
        envelope: Mapping[str, Any],
        args: Mapping[str, Any],
        ctx: OpContext,
        *,
        budget: int | None = None,
    ) -> Any:
        """Call an op without blocking the loop (sync ones in a thread). KeyError if unknown.

        `budget`: how many op calls `ctx.tenant` may have running at once; past it the call
        waits for a place, within the deadline its caller puts on the call. A sync op holds
        its place until its thread returns, also after the caller stopped waiting for it (a
        thread cannot be stopped)."""
        entry = self._ops[name]
        await TENANT_CALLS.take(ctx.tenant, budget)
        if entry.is_async:
            try:
                return await cast(Awaitable[dict[str, Any]], entry.fn(envelope, args, ctx))
            finally:
                TENANT_CALLS.give(ctx.tenant)
        result = await OP_THREADS.run(
            entry.fn, (envelope, args, ctx), done=lambda: TENANT_CALLS.give(ctx.tenant)
        )
        if inspect.isawaitable(result):
            result = await result
        return result

    def _add_defaults(self, problems: list[Problem]) -> None:
        builtins, builtin_problems = _builtin_ops()
        problems.extend(builtin_problems)
        self._ops.update(builtins)
        for entry_point in _entry_points():
            try:
                loaded = entry_point.load()
            except Exception as err:
                problems.append(
                    _problem(f"entry point {entry_point.name!r} ({entry_point.value}): {err}")
                )
                continue
            source = f"entry point {entry_point.value}"
            ops = loaded if isinstance(loaded, Mapping) else {entry_point.name: loaded}
            for name, fn in ops.items():
                if isinstance(fn, RegisteredOp):  # an op that declares what it reads
                    self._ops[name] = RegisteredOp(name, fn.fn, source, fn.reads)
                elif callable(fn):
                    self._ops[name] = RegisteredOp(name, fn, source)
                else:
                    problems.append(
                        _problem(f"entry point {entry_point.value}: {name} is not callable")
                    )


class TenantCalls:
    """Op calls running per tenant, process-wide: a thread outlives a reload and its caller's
    timeout, so the count must too. A call past the budget waits for a place (under its own
    deadline, which the caller sets); a place is handed on in the order calls came."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}
        self._waiting: dict[str, collections.deque[asyncio.Future[None]]] = {}

    async def take(self, tenant: str, budget: int | None) -> None:
        with self._lock:
            running = self._running.get(tenant, 0)
            if budget is None or running < budget:
                self._running[tenant] = running + 1
                return
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(tenant, collections.deque()).append(future)
        WAITING_FOR_PLACE.set(True)  # read by the caller whose deadline came meanwhile
        try:
            await future  # give() hands this call a place: the count stays as it is
            WAITING_FOR_PLACE.set(False)
        except BaseException:
            with self._lock:
                queue = self._waiting.get(tenant)
                waiting = queue is not None and future in queue
                if waiting:
                    queue.remove(future)  # type: ignore[union-attr]
            if not waiting and future.done() and not future.cancelled():
                self.give(tenant)  # handed a place just as the deadline came: hand it on
            raise

    def give(self, tenant: str) -> None:
        """One call of `tenant` ended (from any thread): its place goes to the first waiter."""
        with self._lock:
            queue = self._waiting.get(tenant)
            if queue:
                future = queue.popleft()
                if not queue:
                    del self._waiting[tenant]
            else:
                running = self._running.get(tenant, 1) - 1
                if running:
                    self._running[tenant] = running
                else:
                    self._running.pop(tenant, None)
                return
        loop = future.get_loop()
        if _running_loop() is loop:  # an async op's end: no need to wake the loop's self-pipe
            loop.call_soon(self._hand, tenant, future)
            return
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there
            loop.call_soon_threadsafe(self._hand, tenant, future)

    def _hand(self, tenant: str, future: asyncio.Future[None]) -> None:
        if future.done():  # its deadline came first: the place goes to the next one
            self.give(tenant)
        else:
            future.set_result(None)

    def running(self, tenant: str) -> int:
        return self._running.get(tenant, 0)

    def waiting(self, tenant: str) -> int:
        return len(self._waiting.get(tenant, ()))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # a thread without a loop
        return None


class OpThreads:
    """Daemon worker threads for sync ops, apart from the loop's default executor (MIME
    parsing, file writes), so ops that hang cannot take the threads others need, nor keep
    the process from exiting. Threads are made on demand (the tenant budgets bound how many
    can be busy) and end after a minute idle."""

    IDLE_S: Final = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = 0
        self._work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def run(
        self, fn: Callable[..., Any], args: tuple[Any, ...], *, done: Callable[[], None]
    ) -> asyncio.Future[Any]:
        """`fn(*args)` in a worker thread; `done()` runs in that thread when it returns."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def work() -> None:
            try:
                outcome, failed = fn(*args), False
            except BaseException as err:  # handed to the caller, like an Exception
                outcome, failed = err, True
            finally:
                done()
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, future, outcome, failed)

        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
        self._work.put(work)
        if start:
            threading.Thread(target=self._worker, name="txcl-op", daemon=True).start()
        return future

    def _worker(self) -> None:
        while True:
            try:
                work = self._work.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._idle and self._work.empty():
                        self._idle -= 1
                        return
                continue
            work()
            del work
            with self._lock:
                self._idle += 1


def _settle(future: asyncio.Future[Any], outcome: Any, failed: bool) -> None:
    if future.cancelled():
        return
    if failed:
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


TENANT_CALLS: Final = TenantCalls()
# True in a call's context while it waits for a place in its tenant's budget.
WAITING_FOR_PLACE: Final[contextvars.ContextVar[bool]] = contextvars.ContextVar(
    "WAITING_FOR_PLACE", default=False
)
OP_THREADS: Final = OpThreads()


def _problem(message: str) -> Problem:
    return Problem("txcl_load_error", message)


def _entry_points() -> tuple[importlib.metadata.EntryPoint, ...]:
    return tuple(
        sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    )


@functools.cache
def _builtin_ops() -> tuple[dict[str, RegisteredOp], tuple[Problem, ...]]:
    """`txcl.builtin_ops.BUILTINS` by name, imported once, on first use (the built-ins
    import this module)."""
    try:
        package = importlib.import_module("txcl.builtin_ops")
    except Exception as err:
        return {}, (_problem(f"built-in ops: {type(err).__name__}: {err}"),)
    return {op.name: op for op in package.BUILTINS}, ()


def _configured_op(name: str, spec: object, base_dir: Path, problems: list[Problem]) -> Op | None:
    where = f"ops.{name}"
    if not isinstance(spec, Mapping) or ("python" in spec) == ("command" in spec):
        problems.append(
            _problem(f'{where}: give either python: "module:function" or command: [...]')
        )
        return None
    unknown = set(spec) - {"python", "path", "command"}
    if unknown:
        problems.append(_problem(f"{where}: unknown keys {', '.join(sorted(map(str, unknown)))}"))
        return None
    if "python" in spec:
        return _python_op(where, spec, base_dir, problems)
    argv = spec["command"]
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv):
        problems.append(_problem(f"{where}.command: a non-empty list of strings"))
        return None
    program = argv[0]
    if os.sep in program and not os.path.isabs(program):
        program = str((base_dir / program).resolve())
    return command_op([program, *argv[1:]], cwd=base_dir)


def _python_op(
    where: str, spec: Mapping[str, Any], base_dir: Path, problems: list[Problem]
) -> Op | None:
    target = spec["python"]
    module_name, _, attribute = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not module_name or not attribute:
        problems.append(_problem(f'{where}.python: "module:function", not {target!r}'))
        return None
    if "path" in spec:
        if not isinstance(spec["path"], str):
            problems.append(_problem(f"{where}.path: a folder relative to the configuration file"))
            return None
        folder = str((base_dir / spec["path"]).resolve())
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except Exception as err:
        problems.append(
            _problem(f"{where}.python: cannot load {target}: {type(err).__name__}: {err}")
        )
        return None
    if not callable(obj):
        problems.append(_problem(f"{where}.python: {target} is not callable"))
        return None
    fn: Op = obj
    return fn


def command_op(argv: list[str], *, cwd: Path | None = None) -> Op:
    """An op that runs `argv`: envelope JSON on stdin, a JSON merge patch expected on stdout.

    The arguments and context reach it as environment variables: TXCL_OP, TXCL_ARGS (JSON),
    TXCL_TENANT, TXCL_STACK, TXCL_RID, TXCL_DEADLINE_S, TXCL_DELIVERY_KEY. It runs in its own process group,
    which is killed when the call's deadline passes.
    """
    command = tuple(argv)

    async def run_command(
        envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: OpContext
    ) -> dict[str, Any]:
        env = dict(os.environ)
        env.update(
            TXCL_OP=ctx.op,
            TXCL_ARGS=json.dumps(args),
            TXCL_TENANT=ctx.tenant,
            TXCL_STACK=ctx.stack,
            TXCL_RID=ctx.rid,
            TXCL_DEADLINE_S=str(ctx.deadline_s),
            TXCL_DELIVERY_KEY=ctx.delivery_key,
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        except OSError as err:
            raise OpFailure(f"cannot start {command[0]}: {err.strerror or err}") from None
        try:
            out, err_out = await proc.communicate(json.dumps(envelope).encode())
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        if proc.returncode != 0:
            tail = err_out.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
            raise OpFailure(f"{command[0]} exited with status {proc.returncode}: {tail}")
        try:
            patch = json.loads(out)
        except ValueError as err:
            raise OpFailure(f"{command[0]} printed no JSON: {err}") from None
        if not isinstance(patch, dict):
            raise OpFailure(f"{command[0]} printed JSON that is not an object")
        return patch

    return run_command
