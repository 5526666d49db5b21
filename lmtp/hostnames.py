"""The `tenant_hostnames` table: hostnames a tenant has proven it owns (Strategy B routing).

One SQLite database in the state dir, in WAL mode so `txco hostnames` can write while a
running `txco serve` reads. A hostname is added only if it is a DNS name (check_hostname)
and is stored and matched in one form (normalize_hostname: lower case, no trailing dot,
IDNA U-labels); matching is exact (verifying `app.acme.example` says nothing about
`acme.example`). A database that is not one (garbage bytes) is a HostnameError.

Every method opens its own short-lived connection: the store is used by the CLI a few times
per invocation and by the router once per refresh (see `lmtp.routing`), never per RCPT.
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import idna

from lmtp.config import ConfigError
from txcl.inputs import terminal_text

DB_FILE_NAME = "chassis.sqlite3"
MAX_HOSTNAME_BYTES = 253  # RFC 1035, in A-label form without the trailing dot

# Caught before IDNA, for a message that names them: IDNA's own would print them raw.
_NOT_IN_A_NAME = re.compile(r"[\s/\\\x00-\x1f\x7f-\x9f]")


class HostnameError(ConfigError):
    """A hostname that cannot be stored, or a database that cannot be used: one line, reported
    like a configuration error (exit 2)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenant_hostnames (
    hostname    TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    stack       TEXT NULL,
    verified    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    verified_at REAL NULL
)
"""

_COLUMNS = "hostname, tenant, stack, verified, created_at, verified_at"


@dataclass(frozen=True, slots=True)
class HostnameRow:
    """One row of `tenant_hostnames`. `stack` None means the convention `<tenant>/_mail`."""

    hostname: str
    tenant: str
    stack: str | None
    verified: bool
    created_at: float
    verified_at: float | None

    @property
    def target_stack(self) -> str:
        return self.stack or f"{self.tenant}/_mail"


def normalize_hostname(hostname: str) -> str:
    """The one form a hostname is stored and matched in: lower case, without surrounding space
    or a trailing dot, internationalised labels as Unicode (U-labels; an A-label `xn--...` is
    shown as what it encodes), so both spellings of a domain find the same row. Lenient: a
    name that is not a valid domain name is only lower-cased (it matches nothing stored)."""
    host = hostname.strip().rstrip(".").lower()
    if host.isascii() and "xn--" not in host:
        return host
    return _u_labels(host)


@functools.lru_cache(maxsize=4096)
def _u_labels(host: str) -> str:
    # IDNA is pure Python and routing normalizes every recipient's domain: the few
    # internationalised domains a chassis sees are converted once.
    try:
        return str(idna.decode(idna.encode(host, uts46=True)))
    except (idna.IDNAError, UnicodeError):
        return host


def check_hostname(hostname: str) -> str:
    """The normal form of a hostname being added; HostnameError saying what is wrong unless it
    is a DNS name: labels of letters, digits and hyphens (or IDNA U-labels), 1-63 bytes each
    in A-label form, at most 253 in all, one trailing dot allowed."""
    shown = terminal_text(repr(hostname), keep="")
    odd = _NOT_IN_A_NAME.search(hostname)
    if odd:
        raise HostnameError(f"hostname {shown}: {_what(odd.group())} is not allowed in a hostname")
    host = hostname.removesuffix(".")
    if not host:
        raise HostnameError("hostname must not be empty")
    if "" in host.split("."):
        raise HostnameError(f"hostname {shown}: an empty label (a leading dot or two in a row)")
    try:
        ascii_form = idna.encode(host, uts46=True)
    except (idna.IDNAError, UnicodeError) as err:
        reason = terminal_text(str(err), keep="")
        raise HostnameError(f"hostname {shown}: not a valid domain name ({reason})") from None
    if len(ascii_form) > MAX_HOSTNAME_BYTES:
        raise HostnameError(f"hostname {shown}: longer than {MAX_HOSTNAME_BYTES} bytes "
                            "in its ASCII form")
    return normalize_hostname(host)


def _what(char: str) -> str:
    if char.isspace():
        return "white space"
    if char in "/\\":
        return f"a {'slash' if char == '/' else 'backslash'}"
    return f"the control character {terminal_text(char, keep='')}"


def _row(values: tuple) -> HostnameRow:
    hostname, tenant, stack, verified, created_at, verified_at = values
    return HostnameRow(hostname, tenant, stack, bool(verified), created_at, verified_at)


class HostnameStore:
    """Add, verify, remove, list and look up tenant hostnames in `<state_dir>/chassis.sqlite3`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / DB_FILE_NAME

    @contextmanager
    def _unusable_as_error(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.DatabaseError, OSError) as err:
            raise HostnameError(f"{self.path}: not a usable hostname database ({err})") from None

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        with self._unusable_as_error():
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Made 0600 before SQLite opens it: its -wal and -shm files take the same mode.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            conn = sqlite3.connect(self.path, timeout=5.0)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(_SCHEMA)
                with conn:
                    yield conn
            finally:
                conn.close()

    def _read(self, sql: str, params: tuple = ()) -> list[HostnameRow]:
        # Reading never creates the database: a chassis without hostnames has no file.
        if not self.path.exists():
            return []
        with self._unusable_as_error():
            conn = sqlite3.connect(self.path, timeout=5.0)
            try:
                conn.execute(_SCHEMA)
                return [_row(r) for r in conn.execute(sql, params)]
            finally:
                conn.close()

    def add(
        self, hostname: str, tenant: str, stack: str | None = None, *, verified: bool = False
    ) -> HostnameRow:
        """Insert or replace a hostname's row; replacing resets its verification unless given."""
        host = check_hostname(hostname)
        now = time.time()
        row = HostnameRow(host, tenant, stack, verified, now, now if verified else None)
        with self._writing() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO tenant_hostnames ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (row.hostname, row.tenant, row.stack, int(row.verified), row.created_at,
                 row.verified_at),
            )
        return row

    def verify(self, hostname: str) -> bool:
        """Mark a hostname verified. False when there is no such row."""
        with self._writing() as conn:
            cur = conn.execute(
                "UPDATE tenant_hostnames SET verified = 1, verified_at = ? WHERE hostname = ?",
                (time.time(), normalize_hostname(hostname)),
            )
            return cur.rowcount > 0

    def remove(self, hostname: str) -> bool:
        """Delete a hostname's row. False when there was none."""
        with self._writing() as conn:
            cur = conn.execute(
                "DELETE FROM tenant_hostnames WHERE hostname = ?", (normalize_hostname(hostname),)
            )
            return cur.rowcount > 0

    def list(self) -> list[HostnameRow]:
        """Every row, ordered by hostname."""
        return self._read(f"SELECT {_COLUMNS} FROM tenant_hostnames ORDER BY hostname")

    def snapshot(self) -> dict[str, HostnameRow]:
        """All rows keyed by hostname: what the router keeps in memory between refreshes."""
        return {row.hostname: row for row in self.list()}
