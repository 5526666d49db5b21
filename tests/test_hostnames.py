"""lmtp.hostnames: the tenant_hostnames table in the state dir."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import idna
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmtp.hostnames import (
    DB_FILE_NAME,
    HostnameError,
    HostnameRow,
    HostnameStore,
    check_hostname,
    normalize_hostname,
)


def lookup(store: HostnameStore, hostname: str) -> HostnameRow | None:
    """The row a hostname finds, as the router finds it: in the snapshot, in one form."""
    return store.snapshot().get(normalize_hostname(hostname))


def test_reading_a_missing_database_creates_nothing(tmp_path: Path):
    store = HostnameStore(tmp_path / "var")
    assert store.list() == []
    assert lookup(store, "acme.example") is None
    assert store.snapshot() == {}
    assert not (tmp_path / "var").exists()


def test_add_lowercases_and_lookup_is_exact(tmp_path: Path):
    store = HostnameStore(tmp_path)
    row = store.add("App.Acme.Example.", "acme")
    assert (row.hostname, row.tenant, row.stack, row.verified) == (
        "app.acme.example", "acme", None, False
    )
    assert row.target_stack == "acme/_mail"
    assert lookup(store, "APP.acme.example") == row
    assert lookup(store, "acme.example") is None
    assert lookup(store, "x.app.acme.example") is None


def test_verify_sets_the_flag_and_time(tmp_path: Path):
    store = HostnameStore(tmp_path)
    store.add("acme.example", "acme", "acme/inbound")
    assert store.verify("ACME.example") is True
    row = lookup(store, "acme.example")
    assert row is not None and row.verified and row.verified_at is not None
    assert row.target_stack == "acme/inbound"
    assert store.verify("missing.example") is False


def test_add_verified_and_replace(tmp_path: Path):
    store = HostnameStore(tmp_path)
    store.add("acme.example", "acme", verified=True)
    store.add("acme.example", "other")
    row = lookup(store, "acme.example")
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


# --- what a hostname may be, and its one stored form ----------------------------------------


@pytest.mark.abuse
@pytest.mark.parametrize("hostname", [
    "", ".", "../etc", "a/b.example", "a\\b.example", "a b.example", " acme.example",
    "acme.example\n", "ac\rme.example", "ac\x00me.example", "ac\x1b[31mme.example",
    "a..b.example", ".acme.example", "acme.example..", "-acme.example", "acme-.example",
    "a_b.example", "x" * 64 + ".example", ".".join(["abcdefghi"] * 26), "acme.example\u202e",
])
def test_add_refuses_what_is_not_a_dns_name(tmp_path: Path, hostname: str):
    store = HostnameStore(tmp_path)
    with pytest.raises(HostnameError) as refused:
        store.add(hostname, "acme")
    message = str(refused.value)
    assert "\n" not in message and "\r" not in message and "\x1b" not in message
    assert "\x00" not in message
    assert store.list() == []


@pytest.mark.parametrize(("typed", "stored"), [
    ("Acme.Example.", "acme.example"),
    ("JÖSE.example", "jöse.example"),
    ("xn--jse-sna.example", "jöse.example"),
    ("XN--JSE-SNA.Example", "jöse.example"),
    ("bücher.example", "bücher.example"),
    ("a-b.c0.example", "a-b.c0.example"),
])
def test_hostnames_are_stored_in_one_form_and_either_idna_spelling_finds_them(
        tmp_path: Path, typed: str, stored: str):
    store = HostnameStore(tmp_path)
    assert store.add(typed, "acme").hostname == stored
    assert check_hostname(typed) == normalize_hostname(typed) == stored
    row = lookup(store, stored)
    assert row is not None and row.hostname == stored
    ascii_form = idna.encode(stored).decode()
    assert lookup(store, ascii_form) == row
    assert lookup(store, ascii_form.upper()) == row


def test_normalize_never_raises_and_leaves_ascii_alone_but_lower_cased():
    assert normalize_hostname(" Mail.Example. ") == "mail.example"
    assert normalize_hostname("xn--invalid--.example") == "xn--invalid--.example"
    assert normalize_hostname("A B") == "a b"


@pytest.mark.abuse
@given(st.text(max_size=80))
def test_a_checked_hostname_is_its_own_normal_form_and_holds_no_unsafe_character(text: str):
    try:
        host = check_hostname(text)
    except HostnameError:
        return
    assert host == normalize_hostname(host) == check_hostname(host)
    assert not any(c.isspace() or c in "/\\" or ord(c) < 0x20 for c in host)
    assert host and ".." not in host and not host.endswith(".")


@pytest.mark.abuse
def test_a_database_of_garbage_bytes_is_a_clear_error(tmp_path: Path):
    (tmp_path / DB_FILE_NAME).write_bytes(bytes(range(256)) * 32)
    store = HostnameStore(tmp_path)
    for use in (store.list, lambda: store.add("acme.example", "acme"),
                lambda: lookup(store, "acme.example"), lambda: store.remove("acme.example")):
        with pytest.raises(HostnameError, match="chassis.sqlite3: not a usable hostname database"):
            use()


def test_rows_stored_before_validation_can_still_be_removed(tmp_path: Path):
    HostnameStore(tmp_path).add("acme.example", "acme")
    conn = sqlite3.connect(tmp_path / DB_FILE_NAME)
    with conn:
        conn.execute("UPDATE tenant_hostnames SET hostname = '../bad'")
    conn.close()
    store = HostnameStore(tmp_path)
    assert [r.hostname for r in store.list()] == ["../bad"]
    assert store.remove("../bad") is True


def test_the_hostname_database_and_status_json_are_private_whatever_the_umask(tmp_path) -> None:
    import os
    import stat

    from txcl.chassis.status import write_json_atomically

    old = os.umask(0o022)
    try:
        store = HostnameStore(tmp_path / "var")
        store.add("mail.acme.example", "acme")
        write_json_atomically(tmp_path / "var" / "status.json", {"version": 1})
    finally:
        os.umask(old)
    for path in (tmp_path / "var").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
