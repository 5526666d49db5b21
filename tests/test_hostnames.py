"""lmtp.hostnames: the tenant_hostnames table in the state dir."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from lmtp.hostnames import DB_FILE_NAME, HostnameRow, HostnameStore


def test_reading_a_missing_database_creates_nothing(tmp_path: Path):
    store = HostnameStore(tmp_path / "var")
    assert store.list() == []
    assert store.lookup("acme.example") is None
    assert store.snapshot() == {}
    assert not (tmp_path / "var").exists()


def test_add_lowercases_and_lookup_is_exact(tmp_path: Path):
    store = HostnameStore(tmp_path)
    row = store.add("App.Acme.Example.", "acme")
    assert (row.hostname, row.tenant, row.stack, row.verified) == (
        "app.acme.example", "acme", None, False
    )
    assert row.target_stack == "acme/_mail"
    assert store.lookup("APP.acme.example") == row
    assert store.lookup("acme.example") is None
    assert store.lookup("x.app.acme.example") is None


def test_verify_sets_the_flag_and_time(tmp_path: Path):
    store = HostnameStore(tmp_path)
    store.add("acme.example", "acme", "acme/inbound")
    assert store.verify("ACME.example") is True
    row = store.lookup("acme.example")
    assert row is not None and row.verified and row.verified_at is not None
    assert row.target_stack == "acme/inbound"
    assert store.verify("missing.example") is False


def test_add_verified_and_replace(tmp_path: Path):
    store = HostnameStore(tmp_path)
    store.add("acme.example", "acme", verified=True)
    store.add("acme.example", "other")
    row = store.lookup("acme.example")
    assert row is not None and (row.tenant, row.verified) == ("other", False)


def test_remove_and_list_in_order(tmp_path: Path):
    store = HostnameStore(tmp_path)
    for host in ("b.example", "a.example", "c.example"):
        store.add(host, "t")
    assert store.remove("B.example") is True
    assert store.remove("b.example") is False
    assert [r.hostname for r in store.list()] == ["a.example", "c.example"]
    assert set(store.snapshot()) == {"a.example", "c.example"}
    assert all(isinstance(r, HostnameRow) for r in store.snapshot().values())


def test_database_is_in_wal_mode_with_the_expected_schema(tmp_path: Path):
    HostnameStore(tmp_path).add("acme.example", "acme")
    conn = sqlite3.connect(tmp_path / DB_FILE_NAME)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = [c[1] for c in conn.execute("PRAGMA table_info(tenant_hostnames)")]
    finally:
        conn.close()
    assert columns == ["hostname", "tenant", "stack", "verified", "created_at", "verified_at"]


def test_concurrent_writers_and_readers(tmp_path: Path):
    store = HostnameStore(tmp_path)
    store.add("seed.example", "t")
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(20):
                HostnameStore(tmp_path).add(f"h{n}-{i}.example", "t", verified=True)
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        try:
            for _ in range(40):
                assert "seed.example" in HostnameStore(tmp_path).snapshot()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(3)]
    threads += [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.list()) == 61
