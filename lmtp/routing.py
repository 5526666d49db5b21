"""RCPT TO -> (tenant, stack): the six-step resolution order of docs/lmtp.md, first match wins.

1. `ingress.lmtp.recipients[<address>]`        operator exact override
2. `ingress.lmtp.recipients["@" + domain]`     operator domain wildcard
3. Strategy A: `tenant.stack[+modifier]@host`   for host in --lmtp-default-hosts
4. Strategy B: `verified_domains:` (YAML), then the `tenant_hostnames` table
5. `ingress.lmtp.listeners[<listener>]`         the catch-all (`default` unless named)
6. nothing: None, and the caller answers 550 5.1.1

Addresses are compared case-insensitively as a whole, the way Postfix folds lookup-table
keys; the envelope keeps the address exactly as the client sent it.

The `tenant_hostnames` rows are held in memory and re-read from SQLite at most once per
`hostname_ttl_s` (default 5 s), on the first RCPT after the interval has passed. That keeps
SQLite off the per-RCPT path while `txco hostnames add/verify/remove` takes effect within
seconds on a running server, without a reload signal.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from lmtp.config import IngressConfig, Target
from lmtp.hostnames import HostnameRow, normalize_hostname
from txcl.envelope import TENANT_NAME

SLUG = TENANT_NAME  # a hostname's stack label is a DNS label too, like a tenant name
DEFAULT_LISTENER = "default"
DEFAULT_HOSTNAME_TTL_S = 5.0


@dataclass(frozen=True, slots=True)
class Route:
    """Where one recipient goes. `to` names the entry stage; `listener` is set by step 5."""

    tenant: str
    stack: str
    ingress: str
    to: str
    listener: str = ""


@dataclass(frozen=True, slots=True)
class Explanation:
    """What `txco route` prints: each step tried, what it found, and the route (or None)."""

    address: str
    route: Route | None
    trail: tuple[tuple[str, str], ...]

    def lines(self) -> list[str]:
        out = [f"{step}: {outcome}" for step, outcome in self.trail]
        if self.route is None:
            out.append("=> unrouted: 550 5.1.1 no rule accepted this recipient")
        else:
            r = self.route
            out.append(f"=> {r.tenant} {r.stack} (to {r.to}, ingress {r.ingress})")
        return out


class HostnameSource(Protocol):
    def snapshot(self) -> Mapping[str, HostnameRow]: ...


Note = Callable[[str, str], None]


def split_address(address: str) -> tuple[str, str]:
    """(local part, lower-cased domain) of a RCPT TO address; domain "" when there is none.

    Accepts the address with or without `<>`, drops an RFC 5321 source route, and unquotes
    a quoted local part (`"acme.support"@h` is `acme.support@h`).
    """
    addr = address.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1].strip()
    if addr.startswith("@") and ":" in addr:
        addr = addr.split(":", 1)[1]
    local, at, domain = addr.rpartition("@")
    if not at:
        local, domain = addr, ""
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return local, domain_key(domain)


def domain_key(hostname: str) -> str:
    """The form every domain is compared in: `normalize_hostname`'s, with IDNA A-labels
    (`xn--...`) turned into the U-labels they stand for (RFC 5890), so `bücher.example`,
    `BÜCHER.example` and `xn--bcher-kva.example` are one domain to every routing step."""
    host = normalize_hostname(hostname)
    if host.isascii() and "xn--" not in host:
        return host
    try:
        return host.encode("idna").decode("idna")  # nameprep (case-folds), then ToUnicode
    except UnicodeError:  # not a valid IDN: compared as it came
        return host


def _address_key(address: str) -> str:
    """A `recipients:` key (`local@domain` or `@domain`) with its domain as `domain_key`."""
    local, at, domain = str(address).strip().rpartition("@")
    return f"{local.lower()}@{domain_key(domain)}" if at else local.strip().lower()


def _target(value: Target) -> tuple[str, str | None]:
    """(tenant, stack or None) from a config entry."""
    return value.tenant, value.stack or None


def _stack_name(tenant: str, stack: str | None) -> str:
    if not stack:
        return f"{tenant}/_mail"
    return stack if "/" in stack else f"{tenant}/{stack}"


def _route(tenant: str, stack: str | None, ingress: str, listener: str = "") -> Route:
    name = _stack_name(tenant, stack)
    return Route(tenant, name, ingress, f"{name}/0", listener)


class RoutingSettings(Protocol):
    """What routing reads of the settings (an `lmtp.config.Settings`)."""

    @property
    def lmtp_default_hosts(self) -> Sequence[str]: ...

    @property
    def require_hostname_verification(self) -> bool: ...


class Router:
    """Resolves one RCPT at a time. Build once per config load; cheap to call per RCPT.

    `config` is the `ingress.lmtp` section; `hostnames` is a `HostnameStore` or None.
    """

    def __init__(
        self,
        config: IngressConfig,
        settings: RoutingSettings,
        hostnames: HostnameSource | None = None,
        *,
        hostname_ttl_s: float = DEFAULT_HOSTNAME_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._recipients = {_address_key(k): v for k, v in config.recipients.items()}
        self._verified_domains = {
            domain_key(k): v for k, v in config.verified_domains.items()
        }
        self._listeners = dict(config.listeners)
        # The routes of the tables' entries, made once: a RCPT that matches one is a lookup.
        self._recipient_routes = {
            key: _route(*_target(entry), f"recipient:{key}")
            for key, entry in self._recipients.items()
        }
        self._listener_routes = {
            name: _route(*_target(entry), f"listener:{name}", name)
            for name, entry in self._listeners.items()
        }
        self._default_hosts = frozenset(domain_key(h) for h in settings.lmtp_default_hosts if h)
        self._strict = settings.require_hostname_verification
        self._hostnames = hostnames
        self._ttl = hostname_ttl_s
        self._clock = clock
        self._rows: Mapping[str, HostnameRow] = {}
        self._rows_loaded_at: float | None = None

    def route(self, address: str, listener: str = DEFAULT_LISTENER) -> Route | None:
        """The route for one RCPT TO address, or None (the caller answers 550 5.1.1)."""
        return self._walk(address, listener, None)

    def refusal(self, address: str) -> str:
        """Why `route` found nothing for `address`: `hostname_unverified` when its domain
        has a tenant_hostnames row that --require-hostname-verification keeps out, else
        `no_route` (the names of lmtp.session's refusal counters)."""
        domain = split_address(address)[1]
        row = self._hostname_rows().get(domain) if domain else None
        if self._strict and row is not None and not row.verified:
            return "hostname_unverified"
        return "no_route"

    def explain(self, address: str, listener: str = DEFAULT_LISTENER) -> Explanation:
        """The same walk as `route`, recording what each step found."""
        trail: list[tuple[str, str]] = []
        found = self._walk(address, listener, lambda step, outcome: trail.append((step, outcome)))
        return Explanation(address, found, tuple(trail))

    def refresh_hostnames(self) -> None:
        """Re-read `tenant_hostnames` now (the CLI and tests; the server relies on the TTL)."""
        rows = self._hostnames.snapshot() if self._hostnames is not None else {}
        self._rows = {domain_key(host): row for host, row in rows.items()}
        self._rows_loaded_at = self._clock()

    def _hostname_rows(self) -> Mapping[str, HostnameRow]:
        if self._hostnames is None:
            return self._rows
        loaded = self._rows_loaded_at
        if loaded is None or self._clock() - loaded >= self._ttl:
            self.refresh_hostnames()
        return self._rows

    def _walk(self, address: str, listener: str, note: Note | None) -> Route | None:
        local, domain = split_address(address)
        if not local and not domain:
            if note:
                note("address", "empty: nothing to route")
            return None
        key = f"{local}@{domain}".lower() if domain else local.lower()
        for step in (self._recipient, self._recipient_domain, self._strategy_a, self._strategy_b):
            found = step(local, domain, key, note)
            if found is not None:
                return found
        return self._listener(listener, note)

    @staticmethod
    def _from_table(
        step: str, routes: Mapping[str, Route], key: str, note: Note | None
    ) -> Route | None:
        found = routes.get(key)
        if note:
            note(step, f"{key!r} matched" if found is not None else f"no entry {key!r}")
        return found

    def _recipient(self, local: str, domain: str, key: str, note: Note | None) -> Route | None:
        return self._from_table("1 recipients[address]", self._recipient_routes, key, note)

    def _recipient_domain(
        self, local: str, domain: str, key: str, note: Note | None
    ) -> Route | None:
        if not domain:
            return None
        return self._from_table(
            "2 recipients[@domain]", self._recipient_routes, f"@{domain}", note
        )

    def _strategy_a(self, local: str, domain: str, key: str, note: Note | None) -> Route | None:
        if domain not in self._default_hosts:
            if note:
                note("3 default hosts", f"{domain!r} is not in --lmtp-default-hosts")
            return None
        base = local.lower().split("+", 1)[0]
        tenant, dot, stack = base.partition(".")
        if not (dot and SLUG.match(tenant) and SLUG.match(stack)):
            if note:
                note("3 default hosts", f"local part {local!r} is not tenant.stack[+modifier]")
            return None
        if note:
            note("3 default hosts", f"{local!r} parses as {tenant}/{stack}")
        return _route(tenant, f"{tenant}/{stack}", f"default-host:{domain}")

    def _strategy_b(self, local: str, domain: str, key: str, note: Note | None) -> Route | None:
        if not domain:
            if note:
                note("4 verified domains", "address has no domain")
            return None
        entry = self._verified_domains.get(domain)
        if entry is not None:
            tenant, stack = _target(entry)
            if note:
                note("4 verified domains", f"{domain!r} in verified_domains (tenant {tenant})")
            return _route(tenant, stack, f"domain:{domain}")
        row = self._hostname_rows().get(domain)
        if row is None:
            if note:
                note("4 verified domains", f"{domain!r} in neither verified_domains nor tenant_hostnames")
            return None
        if self._strict and not row.verified:
            if note:
                note("4 verified domains", f"{domain!r} is unverified and verification is required")
            return None
        if note:
            state = "verified" if row.verified else "unverified (accepted: not strict)"
            note("4 verified domains", f"{domain!r} in tenant_hostnames, {state}, tenant {row.tenant}")
        return _route(row.tenant, row.stack, f"hostname:{domain}")

    def _listener(self, listener: str, note: Note | None) -> Route | None:
        name = listener if listener in self._listeners else DEFAULT_LISTENER
        return self._from_table("5 listeners", self._listener_routes, name, note)
