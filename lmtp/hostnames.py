"""The `tenant_hostnames` table: hostnames a tenant has proven it owns (Strategy B routing).

One SQLite database in the state dir, in WAL mode so `txco hostnames` can write while a
running `txco serve` reads. Hostnames are stored lower-cased without a trailing dot;
matching is exact (verifying `app.acme.example` says nothing about `acme.example`).

Every method opens its own short-lived connection: the store is used by the CLI a few times
per invocation and by the router once per refresh (see `lmtp.routing`), never per RCPT.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DB_FILE_NAME = "chassis.sqlite3"

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
    """Lower-case, surrounding space and one trailing dot removed."""
    return hostname.strip().rstrip(".").lower()


def _row(values: tuple) -> HostnameRow:
    hostname, tenant, stack, verified, created_at, verified_at = values
    return HostnameRow(hostname, tenant, stack, bool(verified), created_at, verified_at)


class HostnameStore:
    """Add, verify, remove, list and look up tenant hostnames in `<state_dir>/chassis.sqlite3`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / DB_FILE_NAME

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        host = normalize_hostname(hostname)
        if not host:
            raise ValueError("hostname must not be empty")
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

    def lookup(self, hostname: str) -> HostnameRow | None:
        """The row for exactly this hostname (case-insensitive), if any."""
        rows = self._read(
            f"SELECT {_COLUMNS} FROM tenant_hostnames WHERE hostname = ?",
            (normalize_hostname(hostname),),
        )
        return rows[0] if rows else None

    def snapshot(self) -> dict[str, HostnameRow]:
        """All rows keyed by hostname: what the router keeps in memory between refreshes."""
        return {row.hostname: row for row in self.list()}
