"""`txco serve` flags and the `ingress.lmtp` YAML, each turned into one frozen object.

`Settings` holds every flag of docs/lmtp.md's flag table with its default; the
parsers here (durations, listen addresses, comma lists) are the only place their syntax
lives. `IngressConfig` is the `ingress.lmtp` section of `txco.yaml` (the file itself is read
by txcl.chassis.config), validated up front so a typo stops the chassis at start with a
message naming the key, never at the first RCPT.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from txcl.chassis.config import (
    ConfigError,
    ConfigFile,
    expect_mapping,
    load_config,
    reject_unknown,
)
from txcl.envelope import STACK_NAME, TENANT_NAME
from txcl.envelope import parse_duration as duration_seconds

DEFAULT_PERSONALITIES = ("cron", "tcp", "web", "admin")
DEFAULT_LISTEN_ADDRS = ":2424"
# Every listen address belongs to the listener of this name: the key `ingress.lmtp.listeners`
# uses for its catch-all, and the value of `_txc.lmtp.listener`.
LISTENER_NAME = "default"
# `--lmtp-transaction-rcpt`: "all" (docs/lmtp.md's default) or "tenant" (a tenant's own).
TRANSACTION_RCPT_SCOPES = ("all", "tenant")

TENANT_SLUG = TENANT_NAME
STACK_SLUG = STACK_NAME
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*\Z")


# --- flag values -------------------------------------------------------------------------


def parse_duration(text: str, name: str = "duration") -> float:
    """`30s`, `500ms`, `2m`, `1h`, `1d` or a bare number of seconds -> seconds (> 0)."""
    seconds = duration_seconds(text)
    if seconds is None:
        raise ConfigError(f"{name}: {text!r} is not a duration (examples: 30s, 500ms, 2m)")
    if seconds <= 0:
        raise ConfigError(f"{name}: {text!r} must be longer than zero")
    return seconds


def parse_positive_int(text: str, name: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a whole number") from None
    if value < 1:
        raise ConfigError(f"{name}: {text!r} must be at least 1")
    return value


def parse_comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One entry of `--lmtp-listen-addrs`: a TCP host/port or a Unix socket path.

    host None means every interface (IPv4 and IPv6), as `:2424` asks.
    """

    kind: str  # "tcp" | "unix"
    host: str | None = None
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.host is None:
            return f":{self.port}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen_addrs(text: str) -> tuple[ListenAddress, ...]:
    """`unix:/path`, `:port`, `host:port`, `[::1]:port`, comma separated; empty -> ()."""
    return tuple(_parse_listen_addr(item) for item in parse_comma_list(text))


def _parse_listen_addr(item: str) -> ListenAddress:
    flag = "--lmtp-listen-addrs"
    if item.startswith("unix:"):
        path = item[len("unix:"):]
        if not path:
            raise ConfigError(f"{flag}: {item!r} names no socket path")
        return ListenAddress("unix", path=path)
    if item.startswith("["):
        host, sep, port_text = item[1:].partition("]:")
        if not sep or not host:
            raise ConfigError(f"{flag}: {item!r} is not [ipv6-address]:port")
    else:
        host, sep, port_text = item.rpartition(":")
        if not sep:
            raise ConfigError(
                f"{flag}: {item!r} has no port (use :port, host:port, [::1]:port or unix:/path)"
            )
        if ":" in host:
            raise ConfigError(f"{flag}: {item!r}: write IPv6 addresses as [address]:port")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{flag}: {item!r}: port must be a number from 0 to 65535")
    return ListenAddress("tcp", host=host or None, port=int(port_text))


@dataclass(frozen=True)
class Settings:
    """Every `txco serve` flag, parsed. Defaults are docs/lmtp.md's flag table."""

    personalities: tuple[str, ...] = DEFAULT_PERSONALITIES
    lmtp_listen_addrs: tuple[ListenAddress, ...] = parse_listen_addrs(DEFAULT_LISTEN_ADDRS)
    lmtp_max_msg_bytes: int = 26214400
    lmtp_max_recipients: int = 50
    lmtp_read_timeout: float = 30.0
    lmtp_data_timeout: float = 60.0
    lmtp_resp_timeout: float = 30.0
    lmtp_reply_rid: bool = True  # each recipient's reply text ends with "(rid <request id>)"
    op_calls_per_tenant: int = 8  # ops one tenant may have running at once
    log_repeat_interval: float = 10.0  # the same error is logged once per interval
    # What `_txc.lmtp.transaction_rcpt` shows a stack: every recipient, or its tenant's only.
    lmtp_transaction_rcpt: str = "all"
    lmtp_hostname: str = field(default_factory=socket.gethostname)
    # Limits on clients: docs/lmtp.md, "Limits, timeouts and the replies they produce".
    lmtp_max_connections: int = 500
    lmtp_max_connections_per_ip: int = 100
    lmtp_max_commands: int = 1000
    lmtp_default_hosts: tuple[str, ...] = ()
    require_hostname_verification: bool = False
    ops_dir: Path = Path("OPS")
    config_file: Path | None = None
    state_dir: Path = Path("var")


# --- the YAML file -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Where a recipient goes: a tenant and one of its stacks (`acme/_mail`)."""

    tenant: str
    stack: str


@dataclass(frozen=True)
class IngressConfig:
    """`ingress.lmtp` of `txco.yaml`, validated.

    recipients:       exact `local@domain` keys and `@domain` wildcards (lower-cased)
    verified_domains: the static stand-in for `tenant_hostnames` (Strategy B)
    listeners:        catch-all per listener name
    """

    recipients: Mapping[str, Target] = field(default_factory=lambda: MappingProxyType({}))
    verified_domains: Mapping[str, Target] = field(default_factory=lambda: MappingProxyType({}))
    listeners: Mapping[str, Target] = field(default_factory=lambda: MappingProxyType({}))


HEAD = "lmtp"  # this head's personality name and its `ingress.<name>` section
_LMTP_KEYS = ("recipients", "verified_domains", "listeners")


def load_ingress_config(path: Path | None) -> IngressConfig:
    """Read `txco.yaml` and validate its `ingress.lmtp`; None gives the empty configuration."""
    return ingress_config(load_config(path, heads=(HEAD,)))


def ingress_config(config: ConfigFile) -> IngressConfig:
    """The `ingress.lmtp` section of a read `txco.yaml`, validated."""
    name = config.name
    lmtp = config.section(HEAD)
    reject_unknown(lmtp, _LMTP_KEYS, name, "ingress.lmtp.")
    return IngressConfig(
        recipients=_targets(lmtp, "recipients", name, _check_recipient_key, stack_required=True),
        verified_domains=_targets(lmtp, "verified_domains", name, _check_domain_key,
                                  stack_required=False),
        listeners=_targets(lmtp, "listeners", name, _check_listener_key, stack_required=True),
    )


def _targets(lmtp: Mapping[str, Any], section: str, name: str,
             check_key: Callable[[str, str, str], str], *, stack_required: bool
             ) -> Mapping[str, Target]:
    entries = lmtp.get(section) or {}
    expect_mapping(entries, name, f"ingress.lmtp.{section}")
    out: dict[str, Target] = {}
    for raw_key, entry in entries.items():
        where = f"ingress.lmtp.{section}[{str(raw_key)!r}]"
        if not isinstance(raw_key, str):
            raise ConfigError(f"{name}: {where}: key must be a string")
        key = check_key(raw_key, name, where)
        if key in out:
            raise ConfigError(f"{name}: {where}: listed twice (keys are case-insensitive)")
        out[key] = _target(entry, name, where, stack_required=stack_required)
    return MappingProxyType(out)


def _target(entry: object, name: str, where: str, *, stack_required: bool) -> Target:
    expect_mapping(entry, name, where)
    assert isinstance(entry, dict)
    reject_unknown(entry, ("tenant", "stack"), name, f"{where}.")
    tenant = entry.get("tenant")
    if not isinstance(tenant, str) or not TENANT_SLUG.match(tenant):
        raise ConfigError(
            f"{name}: {where}.tenant: {tenant!r} is not a tenant name ([a-z][a-z0-9-]*)"
        )
    stack = entry.get("stack")
    if stack is None:
        if stack_required:
            raise ConfigError(f"{name}: {where}.stack: missing (write it as {tenant}/<stack>)")
        stack = f"{tenant}/_mail"
    if not isinstance(stack, str):
        raise ConfigError(f"{name}: {where}.stack: must be a string like {tenant}/_mail")
    owner, sep, stack_name = stack.partition("/")
    if not sep or not STACK_SLUG.match(stack_name):
        raise ConfigError(
            f"{name}: {where}.stack: {stack!r} is not <tenant>/<stack> "
            f"(stack names match [a-z_][a-z0-9_-]*)"
        )
    if owner != tenant:
        raise ConfigError(
            f"{name}: {where}.stack: {stack!r} belongs to tenant {owner!r}, "
            f"but the entry's tenant is {tenant!r}"
        )
    return Target(tenant, stack)


def _check_recipient_key(key: str, name: str, where: str) -> str:
    local, at, domain = key.strip().rpartition("@")
    if not at or not _HOSTNAME.match(domain.lower()) or " " in local:
        raise ConfigError(
            f"{name}: {where}: not an address (user@domain) or a domain wildcard (@domain)"
        )
    return f"{local}@{domain.lower()}"


def _check_domain_key(key: str, name: str, where: str) -> str:
    domain = key.strip().rstrip(".").lower()
    if not _HOSTNAME.match(domain):
        raise ConfigError(f"{name}: {where}: not a domain name")
    return domain


def _check_listener_key(key: str, name: str, where: str) -> str:
    if not STACK_SLUG.match(key):
        raise ConfigError(f"{name}: {where}: listener names match [a-z_][a-z0-9_-]*")
    return key
