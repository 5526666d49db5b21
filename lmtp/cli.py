"""`txco`: the chassis command. `serve` runs the LMTP head; `route` and `hostnames` inspect
and edit what routing sees; `trace` and `status` show what happened to a delivery and which
rules are serving. Arguments and rendering only; the work lives in the modules.

Exit codes: 0 ok, 1 failure (a listener that cannot bind, an unrouted address, a missing
row), 2 usage or configuration error (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtp.config import (
    DEFAULT_LISTEN_ADDRS,
    DEFAULT_PERSONALITIES,
    TRANSACTION_RCPT_SCOPES,
    ConfigError,
    IngressConfig,
    Settings,
    load_ingress_config,
    parse_comma_list,
    parse_duration,
    parse_listen_addrs,
    parse_positive_int,
)
from lmtp.tracecmd import (
    add_serve_trace_arguments,
    add_trace_arguments,
    run_trace,
    trace_writer_from_args,
)
from txcl.chassis import serverlog
from txcl.chassis.config import default_config_file
from txcl.chassis.status import add_status_arguments, run_status
from txcl.chassis.supervisor import FAILURE, OK, USAGE, CannotStart, ServeOptions, serve
from txcl.inputs import terminal_text

# Personalities this build can run; the --personalities default (docs/lmtp.md) also names
# heads not built yet.
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
    parser.add_argument("--lmtp-reply-rid", nargs="?", const=True, default=True,
                        type=_parse_bool, metavar="BOOL",
                        help="end each recipient's reply text with (rid <request id>), so a "
                        "Postfix log line leads to its trace; =off leaves it out (default: on)")
    parser.add_argument("--lmtp-resp-timeout", default="30s", metavar="DURATION",
                        help="delivery to verdict (default: 30s)")
    parser.add_argument("--lmtp-max-connections", default="500", metavar="N",
                        help="open LMTP connections per process; more get 421 (default: 500)")
    parser.add_argument("--lmtp-max-connections-per-ip", default="100", metavar="N",
                        help="of those, from one client address (default: 100)")
    parser.add_argument("--lmtp-max-commands", default="1000", metavar="N",
                        help="commands a session may send between deliveries; then 421 "
                        "(default: 1000)")
    parser.add_argument("--lmtp-transaction-rcpt", default="all", choices=TRANSACTION_RCPT_SCOPES,
                        help="what _txc.lmtp.transaction_rcpt lists: every recipient of the "
                        "transaction, or only those of the stack's own tenant (default: all)")
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
                        help="worker processes sharing the listeners and the rules compiled "
                        "before they fork; SIGHUP and SIGTERM reach them all (default: 1)")
    parser.add_argument("--no-cache", dest="compile_cache", action="store_false",
                        help="parse every rule file; neither read nor write the compile cache "
                        "(<state-dir>/cache/)")
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
            lmtp_reply_rid=args.lmtp_reply_rid,
            lmtp_max_connections=parse_positive_int(args.lmtp_max_connections,
                                                    "--lmtp-max-connections"),
            lmtp_max_connections_per_ip=parse_positive_int(args.lmtp_max_connections_per_ip,
                                                           "--lmtp-max-connections-per-ip"),
            lmtp_max_commands=parse_positive_int(args.lmtp_max_commands, "--lmtp-max-commands"),
            ops_dir=Path(args.ops),
            op_calls_per_tenant=parse_positive_int(args.op_calls_per_tenant,
                                                   "--op-calls-per-tenant"),
            lmtp_transaction_rcpt=args.lmtp_transaction_rcpt,
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
    serverlog.configure(sys.stderr)
    from lmtp.personality import LmtpPersonality

    return serve(ServeOptions(
        heads=(LmtpPersonality(settings),),
        settings=settings,
        open_trace_writer=lambda: trace_writer_from_args(args, settings.state_dir),
        watch_interval=args.watch_interval if args.watch else None,
        compile_cache=args.compile_cache,
    ), workers)


# --- route -------------------------------------------------------------------------------


def cmd_route(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    explanation = _router(settings, load_ingress_config(settings.config_file)).explain(
        args.address)
    for line in explanation.lines():
        print(terminal_text(line, keep=""))
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
            fields = (row.hostname, row.tenant, row.target_stack, state)
            print("\t".join(terminal_text(field, keep="") for field in fields))
        return OK
    done = store.verify(args.hostname) if action == "verify" else store.remove(args.hostname)
    if not done:
        print(f"txco: no hostname {args.hostname!r} in {store.path}", file=sys.stderr)
        return FAILURE
    shown = terminal_text(args.hostname, keep="")
    print(f"{shown}: {'verified' if action == 'verify' else 'removed'}")
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
                         add_status_arguments, run_status),
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
    except (ConfigError, UsageError, CannotStart) as err:
        print(f"txco: error: {err}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        return FAILURE


if __name__ == "__main__":
    sys.exit(main())
