"""`txco`: the chassis command. `serve` runs the LMTP head; `route` and `hostnames` inspect
and edit what routing sees; `trace` and `status` show what happened to a delivery and which
rules are serving. Arguments and rendering only; the work lives in the modules.

Exit codes: 0 ok, 1 failure (a listener that cannot bind, an unrouted address, a missing
row), 2 usage or configuration error (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtp.balance import SessionCounts, WorkerSlot
from lmtp.config import (
    DEFAULT_LISTEN_ADDRS,
    DEFAULT_PERSONALITIES,
    ConfigError,
    IngressConfig,
    Settings,
    default_config_file,
    load_ingress_config,
    parse_comma_list,
    parse_duration,
    parse_listen_addrs,
    parse_positive_int,
)
from lmtp.server import BoundListener, ListenError, LMTPHead, bind_listeners, close_listeners
from lmtp.tracecmd import (
    add_serve_trace_arguments,
    add_status_arguments,
    add_trace_arguments,
    run_status,
    run_trace,
    trace_writer_from_args,
)

OK, FAILURE, USAGE = 0, 1, 2
# Personalities this build can run. The seed's default list names the chassis's others.
AVAILABLE_PERSONALITIES = ("lmtp",)

log = logging.getLogger("txco")


class UsageError(Exception):
    """Bad arguments or configuration: reported as one line, exit 2."""


# --- shared flags ------------------------------------------------------------------------


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _add_place_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="the YAML config (default: ./txco.yaml when present)")
    parser.add_argument("--state-dir", metavar="DIR", default="var",
                        help="tenant_hostnames database, traces, op storage (default: ./var)")


def _add_routing_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lmtp-default-hosts", metavar="HOSTS", default="",
                        help="comma list: rcpts tenant.stack[+mod]@HOST route to tenant/stack")
    parser.add_argument("--require-hostname-verification", nargs="?", const=True,
                        default=False, type=_parse_bool, metavar="BOOL",
                        help="Strategy B uses only verified tenant_hostnames rows")


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--personalities", default=",".join(DEFAULT_PERSONALITIES),
                        help="comma list; add lmtp to enable the LMTP head "
                        f"(default: {','.join(DEFAULT_PERSONALITIES)})")
    parser.add_argument("--lmtp-listen-addrs", default=DEFAULT_LISTEN_ADDRS, metavar="ADDRS",
                        help="comma list of unix:/path, :port, host:port, [::1]:port; "
                        "empty disables the head (default: :2424)")
    parser.add_argument("--lmtp-max-msg-bytes", default="26214400", metavar="N")
    parser.add_argument("--lmtp-max-recipients", default="50", metavar="N")
    parser.add_argument("--lmtp-read-timeout", default="30s", metavar="DURATION",
                        help="per-command idle (default: 30s)")
    parser.add_argument("--lmtp-data-timeout", default="60s", metavar="DURATION",
                        help="the whole DATA phase, 354 to the final dot (default: 60s)")
    parser.add_argument("--lmtp-resp-timeout", default="30s", metavar="DURATION",
                        help="delivery to verdict (default: 30s)")
    parser.add_argument("--op-calls-per-tenant", default="8", metavar="N",
                        help="op calls one tenant may have running at once (default 8)")
    parser.add_argument("--log-repeat-interval", default="10s", metavar="DURATION",
                        help="log the same error at most once per DURATION (default 10s)")
    parser.add_argument("--lmtp-hostname", default=None, metavar="NAME",
                        help="greeting hostname (default: this host's name)")
    _add_routing_flags(parser)
    parser.add_argument("--ops", metavar="DIR", default="OPS",
                        help="the OPS tree (default: ./OPS)")
    parser.add_argument("--workers", default="1", metavar="N",
                        help="worker processes sharing the listeners, each with its own copy "
                        "of the rules; SIGHUP and SIGTERM reach them all (default: 1)")
    _add_place_flags(parser)
    add_serve_trace_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """A Settings from parsed flags; ConfigError names the flag at fault."""
    fields: dict[str, Any] = {
        "lmtp_default_hosts": parse_comma_list(args.lmtp_default_hosts),
        "require_hostname_verification": args.require_hostname_verification,
        "config_file": default_config_file(args.config),
        "state_dir": Path(args.state_dir),
    }
    if hasattr(args, "personalities"):
        fields.update(
            personalities=parse_comma_list(args.personalities),
            lmtp_listen_addrs=parse_listen_addrs(args.lmtp_listen_addrs),
            lmtp_max_msg_bytes=parse_positive_int(args.lmtp_max_msg_bytes,
                                                  "--lmtp-max-msg-bytes"),
            lmtp_max_recipients=parse_positive_int(args.lmtp_max_recipients,
                                                   "--lmtp-max-recipients"),
            lmtp_read_timeout=parse_duration(args.lmtp_read_timeout, "--lmtp-read-timeout"),
            lmtp_data_timeout=parse_duration(args.lmtp_data_timeout, "--lmtp-data-timeout"),
            lmtp_resp_timeout=parse_duration(args.lmtp_resp_timeout, "--lmtp-resp-timeout"),
            ops_dir=Path(args.ops),
            op_calls_per_tenant=parse_positive_int(args.op_calls_per_tenant,
                                                   "--op-calls-per-tenant"),
            log_repeat_interval=parse_duration(args.log_repeat_interval,
                                               "--log-repeat-interval"),
        )
        if args.lmtp_hostname:
            fields["lmtp_hostname"] = args.lmtp_hostname
    return Settings(**fields)


def _router(settings: Settings, ingress: IngressConfig) -> Any:
    from lmtp.hostnames import HostnameStore
    from lmtp.routing import Router

    return Router(ingress, settings, HostnameStore(settings.state_dir))


# --- serve -------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    unavailable = [p for p in settings.personalities if p not in AVAILABLE_PERSONALITIES]
    if unavailable:
        print(f"txco: warning: personalities not in this build, skipped: "
              f"{', '.join(unavailable)}", file=sys.stderr)
    if "lmtp" not in settings.personalities:
        raise UsageError("nothing to run: add lmtp to --personalities "
                         "(e.g. --personalities=lmtp)")
    if not settings.lmtp_listen_addrs:
        raise UsageError("nothing to run: the lmtp head is disabled "
                         "(--lmtp-listen-addrs is empty) and no other personality runs")
    if not settings.ops_dir.is_dir():
        raise UsageError(f"--ops {settings.ops_dir}: no such directory")
    workers = parse_positive_int(args.workers, "--workers")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s txco %(levelname)s %(message)s")
    # aiosmtpd's own per-connection chatter; our server logs one line per delivery.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # Two lines per delivery: skip the record fields the format never shows (the logging
    # docs' "Optimization" section): caller frame lookup, thread, process names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if workers > 1:
        return _serve_workers(args, settings, workers)
    return _serve_process(args, settings)


@dataclass(frozen=True)
class StartGate:
    """How a forked worker tells the parent it is ready, and learns when to accept.

    `ready` (a pipe's write end; None for a worker that replaces a dead one) gets one byte
    once the worker's rules are loaded and its servers set up; `go` (a pipe's read end)
    reaches end-of-file when the parent closes the other end, after every first worker is
    ready, so they all begin to accept at once (a later worker finds it at EOF already)."""

    ready: int | None
    go: int


def _serve_process(args: argparse.Namespace, settings: Settings,
                   inherited: list[BoundListener] | None = None,
                   gate: StartGate | None = None, slot: WorkerSlot | None = None) -> int:
    """One serving process: the rules, the trace writer and the event loop."""
    # Until the loop's SIGHUP handler is installed, a HUP (a reload asked for while a large
    # tree still compiles at start) must not kill the chassis.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    writer = trace_writer_from_args(args, settings.state_dir)
    try:
        holder = _runtime_holder(settings, writer)
        # What start-up built (modules, grammar, the first tree) lives as long as the process:
        # keep it out of the cyclic collector's scans, so a full collection (one follows each
        # reload) costs what changed since, not everything.
        gc.collect()
        gc.freeze()
        watch_interval = args.watch_interval if args.watch else None
        return asyncio.run(_serve(settings, _reloading_handler(holder), holder, watch_interval,
                                  inherited, gate, slot))
    finally:
        writer.close()


# A worker that dies sooner than this after its start is restarted only after this long,
# so a worker that cannot run does not spin the machine.
WORKER_RESTART_DELAY_S = 1.0


def _serve_workers(args: argparse.Namespace, settings: Settings, count: int) -> int:
    """The parent of `count` forked workers: it binds the listeners once, each worker
    serves them with its own rules and event loop (the least busy worker takes each new
    connection: lmtp.balance), and signals are forwarded: SIGHUP reloads every worker,
    SIGTERM/SIGINT stop them all. A worker that dies is replaced; one that cannot load the
    rules at start (exit 2) stops the whole server with that status."""
    try:
        listeners = bind_listeners(settings)
    except ListenError as err:
        print(f"txco: error: {err}", file=sys.stderr)
        return FAILURE
    children: dict[int, tuple[float, int]] = {}  # pid -> (when it started, its slot)
    sessions = SessionCounts(count)
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
    # What the parent imported is shared with every worker until written to: keep the
    # workers' cyclic collector from writing to it (Instagram's gc.freeze-before-fork).
    gc.collect()
    gc.freeze()
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()
    try:
        for slot in range(count):
            gate = StartGate(ready_write, go_read)
            pid = _fork_worker(args, settings, listeners, gate, WorkerSlot(sessions, slot),
                               (ready_read, go_write))
            children[pid] = (time.monotonic(), slot)
        os.close(ready_write)
        ready = _count_ready(ready_read, count, WORKERS_READY_TIMEOUT_S)
        os.close(go_write)  # every worker sees end-of-file on go_read: accept from now on
        if ready < count:
            log.warning("lmtp: %d of %d workers ready after %gs; the others join when they are",
                        ready, count, WORKERS_READY_TIMEOUT_S)
        log.info("lmtp: %d workers (pids %s)", count, " ".join(map(str, children)))
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
            log.error("lmtp worker %d exited (status %d); starting another", pid, code)
            if time.monotonic() - started < WORKER_RESTART_DELAY_S:
                time.sleep(WORKER_RESTART_DELAY_S)
            if not stopping:
                pid = _fork_worker(args, settings, listeners, StartGate(None, go_read),
                                   WorkerSlot(sessions, slot), ())
                children[pid] = (time.monotonic(), slot)
        return status
    finally:
        os.close(go_read)
        close_listeners(listeners)


# How long the parent waits for its first workers to load the rules before letting the
# ready ones accept anyway (a large tree compiles in a few seconds).
WORKERS_READY_TIMEOUT_S = 60.0


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


def _fork_worker(args: argparse.Namespace, settings: Settings,
                 listeners: list[BoundListener], gate: StartGate, slot: WorkerSlot,
                 parent_only: tuple[int, ...]) -> int:
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
        code = _serve_process(args, settings, listeners, gate, slot)
    except UsageError as err:
        print(f"txco: error: {err}", file=sys.stderr)
        code = USAGE
    except KeyboardInterrupt:
        code = OK
    except BaseException:
        log.exception("lmtp worker %d failed", os.getpid())
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


def _runtime_holder(settings: Settings, trace_sink: Any) -> Any:
    """Everything a delivery needs, loaded and compiled before the first connection; later
    versions are compiled on SIGHUP or a file change (lmtp.reload)."""
    from lmtp.hostnames import HostnameStore
    from lmtp.reload import ReloadFailed, RuntimeHolder

    try:
        return RuntimeHolder.start(settings, hostnames=HostnameStore(settings.state_dir),
                                   trace_sink=trace_sink)
    except ReloadFailed as err:
        raise UsageError(f"cannot load {settings.ops_dir} and {settings.config_file}:\n{err}"
                         ) from None


def _reloading_handler(holder: Any) -> Any:
    from lmtp.delivery import Transaction
    from lmtp.reload import ReloadingHandler

    return ReloadingHandler(holder, Transaction)


async def _serve(settings: Settings, handler: Any, holder: Any = None,
                 watch_interval: float | None = None,
                 inherited: list[BoundListener] | None = None,
                 gate: StartGate | None = None, slot: WorkerSlot | None = None) -> int:
    head = LMTPHead(settings, handler, inherited, slot)
    try:
        await head.start(accept=gate is None)
    except ListenError as err:
        print(f"txco: error: {err}", file=sys.stderr)
        return FAILURE
    if gate is not None:
        if gate.ready is not None:
            os.write(gate.ready, b".")
            os.close(gate.ready)
        await _end_of_file(gate.go)
        await head.accept_connections()
    log.info("lmtp listening on %s", ", ".join(head.bound))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watcher = None
    if holder is not None:
        holder.install_sighup(loop)
        if watch_interval:
            watcher = loop.create_task(holder.watch(watch_interval))
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    log.info("lmtp shutting down: finishing deliveries in flight (at most %gs)",
             settings.lmtp_resp_timeout)
    await head.close(grace=settings.lmtp_resp_timeout)
    log.info("lmtp stopped")
    return OK


async def _end_of_file(fd: int) -> None:
    """Wait until the pipe `fd` reads as closed (its writers are gone), then close it."""
    loop = asyncio.get_running_loop()
    closed = loop.create_future()
    loop.add_reader(fd, lambda: closed.done() or closed.set_result(None))
    try:
        await closed
    finally:
        loop.remove_reader(fd)
        os.close(fd)


# --- route -------------------------------------------------------------------------------


def cmd_route(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    explanation = _router(settings, load_ingress_config(settings.config_file)).explain(
        args.address)
    for line in explanation.lines():
        print(line)
    return OK if explanation.route is not None else FAILURE


# --- hostnames ---------------------------------------------------------------------------


def cmd_hostnames(args: argparse.Namespace) -> int:
    from lmtp.hostnames import HostnameStore

    store = HostnameStore(Path(args.state_dir))
    action = args.action
    if action == "add":
        _check_tenant_and_stack(args.tenant, args.stack)
        row = store.add(args.hostname, args.tenant, args.stack, verified=args.verified)
        state = "verified" if row.verified else "unverified"
        print(f"{row.hostname} -> {row.target_stack} ({state})")
        return OK
    if action == "list":
        for row in store.list():
            state = "verified" if row.verified else "unverified"
            print(f"{row.hostname}\t{row.tenant}\t{row.target_stack}\t{state}")
        return OK
    done = store.verify(args.hostname) if action == "verify" else store.remove(args.hostname)
    if not done:
        print(f"txco: no hostname {args.hostname!r} in {store.path}", file=sys.stderr)
        return FAILURE
    print(f"{args.hostname}: {'verified' if action == 'verify' else 'removed'}")
    return OK


def _check_tenant_and_stack(tenant: str, stack: str | None) -> None:
    from lmtp.config import STACK_SLUG, TENANT_SLUG

    if not TENANT_SLUG.match(tenant):
        raise UsageError(f"tenant {tenant!r} is not a tenant name ([a-z][a-z0-9-]*)")
    if stack is not None:
        owner, sep, name = stack.partition("/")
        if not sep or owner != tenant or not STACK_SLUG.match(name):
            raise UsageError(f"--stack {stack!r} must be {tenant}/<stack> "
                             "(stack names match [a-z_][a-z0-9_-]*)")


def _configure_hostnames(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", metavar="DIR", default="var",
                        help="where the tenant_hostnames database lives (default: ./var)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add (or replace) a tenant's hostname")
    add.add_argument("hostname")
    add.add_argument("tenant")
    add.add_argument("--stack", help="default: <tenant>/_mail")
    add.add_argument("--verified", action="store_true", help="mark it verified at once")
    actions.add_parser("list", help="every hostname, tenant, stack and state")
    for name, help_text in (("verify", "mark a hostname verified"),
                            ("remove", "delete a hostname")):
        actions.add_parser(name, help=help_text).add_argument("hostname")


def _configure_trace(parser: argparse.ArgumentParser) -> None:
    add_trace_arguments(parser)
    parser.add_argument("--state-dir", metavar="DIR", default="var",
                        help="where txco serve writes requests/<rid>/ (default: ./var)")


def _configure_status(parser: argparse.ArgumentParser) -> None:
    add_status_arguments(parser)
    parser.add_argument("--state-dir", metavar="DIR", default="var",
                        help="where txco serve writes status.json (default: ./var)")


def _configure_route(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", help="a RCPT TO address")
    _add_routing_flags(parser)
    _add_place_flags(parser)


# --- the command table ---------------------------------------------------------------------


@dataclass(frozen=True)
class Subcommand:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {
    "serve": Subcommand("run the chassis (the lmtp personality)", _add_serve_flags, cmd_serve),
    "route": Subcommand("show which routing step takes an address, and where",
                        _configure_route, cmd_route),
    "hostnames": Subcommand("add, list, verify or remove tenant hostnames",
                            _configure_hostnames, cmd_hostnames),
    "trace": Subcommand("show what happened to the latest (or a given) request",
                        _configure_trace, run_trace),
    "status": Subcommand("show the serving version of the rules and the last reload",
                         _configure_status, run_status),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txco", description="The txcl chassis.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, sub in SUBCOMMANDS.items():
        sub.configure(commands.add_parser(name, help=sub.help, description=sub.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return SUBCOMMANDS[args.command].run(args)
    except (ConfigError, UsageError) as err:
        print(f"txco: error: {err}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        return FAILURE


if __name__ == "__main__":
    sys.exit(main())
