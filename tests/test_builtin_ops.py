"""The built-in ops against real things: a Maildir read back with mailbox.Maildir, an event
log written by many threads, a real HTTP server and a real SMTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import http.server
import json
import mailbox
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from txcl.builtin_ops import BUILTINS
from txcl.builtin_ops import archive as archive_module
from txcl.builtin_ops.archive import archive, write_base64
from txcl.builtin_ops.emit import emit
from txcl.builtin_ops.forward import forward
from txcl.builtin_ops.webhook import webhook
from txcl.loader import load_tree
from txcl.ops import OpContext, OpFailure, OpRegistry, StorageError
from txcl.runner import RunPolicy

RAW = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: support@acme.example\r\n"
    b"Subject: wifi keeps dropping\r\n"
    b"Message-ID: <1@mail.example.com>\r\n"
    b"\r\n"
    b"Hi support,\r\n"
    b".a line starting with a dot\r\n"
    b"My wifi\xe2\x80\xa6\r\n"
)


def run_archive(envelope: dict, args: dict, ctx: OpContext) -> dict:
    """op://ARCHIVE (an async op) run to completion."""
    return asyncio.run(archive(envelope, args, ctx))


def make_envelope(raw: bytes = RAW, src: str = "lmtp", mail_from: str = "alice@example.com"):
    return {
        "_txc": {
            "src": src,
            "rid": "01HXTEST",
            "route": {"tenant": "acme", "stack": "acme/_mail", "to": "acme/_mail/0"},
            src: {
                "mail": {"from": mail_from, "size": len(raw)},
                "rcpt": ["support@acme.example"],
                "msg": {
                    "subject": "wifi keeps dropping",
                    "attachments": [
                        {"name": "a.txt", "type": "text/plain", "size": 3, "content": "b64:YWJj"}
                    ],
                    "raw": "b64:" + base64.b64encode(raw).decode(),
                },
            },
        },
        "ticket": {"id": 7},
    }


@pytest.fixture
def ctx(tmp_path: Path) -> OpContext:
    return OpContext(
        tenant="acme", stack="acme/_mail", rid="01HXTEST", state_dir=tmp_path, deadline_s=5.0
    )


def stack_dir(ctx: OpContext) -> Path:
    return Path(ctx.state_dir) / "tenants" / "acme" / "_mail"


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_registry_holds_the_four_ops_under_their_names():
    expected = {"ARCHIVE": archive, "EMIT": emit, "WEBHOOK": webhook, "FORWARD": forward}
    assert expected == {op.name: op.fn.__wrapped__ for op in BUILTINS}  # type: ignore[attr-defined]


def test_the_default_registry_runs_the_built_ins_in_a_worker_thread(ctx):
    registry = OpRegistry.default()
    assert {"ARCHIVE", "EMIT", "WEBHOOK", "FORWARD"} <= registry.names()
    patch = asyncio.run(registry.call("EMIT", make_envelope(), {}, ctx))
    assert patch == {"emit": {"log": str(stack_dir(ctx) / "events.jsonl"), "offset": 0}}


# ARCHIVE ---------------------------------------------------------------------------------


def test_archive_stores_the_exact_bytes_readable_by_a_mail_client(ctx):
    patch = run_archive(make_envelope(), {}, ctx)

    maildir = mailbox.Maildir(stack_dir(ctx) / "Maildir", create=False)
    keys = maildir.keys()
    assert keys == [patch["archive"]["key"]]
    assert maildir.get_bytes(keys[0]) == RAW
    assert maildir[keys[0]]["Subject"] == "wifi keeps dropping"
    assert patch == {
        "archive": {
            "maildir": str(stack_dir(ctx) / "Maildir"),
            "folder": "",
            "path": str(stack_dir(ctx) / "Maildir" / "new" / keys[0]),
            "key": keys[0],
            "size": len(RAW),
        }
    }
    assert not any((stack_dir(ctx) / "Maildir" / "tmp").iterdir())


def test_archive_into_a_folder_makes_a_maildirplusplus_subfolder(ctx):
    patch = run_archive(make_envelope(), {"folder": "Support.Urgent"}, ctx)

    root = mailbox.Maildir(stack_dir(ctx) / "Maildir", create=False)
    assert root.list_folders() == ["Support.Urgent"]
    folder = root.get_folder("Support.Urgent")
    assert [folder.get_bytes(k) for k in folder.iterkeys()] == [RAW]
    assert len(root) == 0
    assert (stack_dir(ctx) / "Maildir" / ".Support.Urgent" / "maildirfolder").exists()
    assert patch["archive"]["folder"] == "Support.Urgent"
    assert Path(patch["archive"]["path"]).parent == stack_dir(ctx) / "Maildir/.Support.Urgent/new"


def test_archive_gives_every_message_its_own_file(ctx):
    keys = {run_archive(make_envelope(), {}, ctx)["archive"]["key"] for _ in range(20)}
    assert len(keys) == 20
    assert len(mailbox.Maildir(stack_dir(ctx) / "Maildir", create=False)) == 20


def test_archive_reads_the_message_of_any_source(ctx):
    patch = run_archive(make_envelope(b"Subject: hi\r\n\r\nbody\r\n", src="web"), {}, ctx)
    assert Path(patch["archive"]["path"]).read_bytes() == b"Subject: hi\r\n\r\nbody\r\n"


@pytest.mark.parametrize(
    "folder",
    [
        "../../x",
        "..",
        ".Support",
        "Support.",
        "a..b",
        "a/b",
        "/etc",
        "/tmp/x",
        "Sup port",
        "x\n",
        "\x00",
        "a" * 201,
        7,
        ["Support"],
    ],
)
def test_archive_refuses_a_folder_that_could_leave_the_maildir(ctx, folder):
    with pytest.raises(StorageError, match="ARCHIVE: folder .* is refused"):
        run_archive(make_envelope(), {"folder": folder}, ctx)
    assert files_under(Path(ctx.state_dir)) == set()


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(folder=st.text(alphabet=st.sampled_from("aZ09._-/\\~ \x00"), max_size=12))
def test_archive_never_writes_outside_the_stack_maildir(ctx, folder):
    root = stack_dir(ctx) / "Maildir"
    before = files_under(Path(ctx.state_dir))
    try:
        run_archive(make_envelope(), {"folder": folder}, ctx)
    except StorageError:
        assert files_under(Path(ctx.state_dir)) == before
    else:
        new = files_under(Path(ctx.state_dir)) - before
        assert new and all(root in p.parents for p in new)


@pytest.mark.parametrize(
    ("envelope", "message"),
    [
        ({}, "ARCHIVE: the envelope names no source section"),
        (
            {"_txc": {"src": "lmtp", "lmtp": {"msg": {}}}},
            r"ARCHIVE: the envelope has no raw message at _txc\.lmtp\.msg\.raw",
        ),
        ({"_txc": {"src": "lmtp", "lmtp": {"msg": {"raw": "abc"}}}}, "ARCHIVE: .* no raw message"),
        (
            {"_txc": {"src": "lmtp", "lmtp": {"msg": {"raw": "b64:@@@"}}}},
            r"ARCHIVE: _txc\.lmtp\.msg\.raw is not valid base64",
        ),
    ],
)
def test_archive_without_a_raw_message_is_an_op_error(ctx, envelope, message):
    with pytest.raises(OpFailure, match=message):
        run_archive(envelope, {}, ctx)


def raw_envelope(raw: str) -> dict[str, Any]:
    return {"_txc": {"src": "lmtp", "lmtp": {"msg": {"raw": raw}}}}


def whole_decode(text: str) -> bytes | str:
    """What one strict decode of the whole text gives: the bytes, or the error's message."""
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        return str(exc)


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(alphabet=st.sampled_from("AQgw+/=x!\n"), max_size=40),
    chunk=st.sampled_from([4, 8, 12]),
)
@example(text="AAAA=", chunk=4)  # a stray pad after whole quads: the decode accepts it
@example(text="AAAAAAA=AAAA", chunk=8)  # padding ends a slice, data follows
@example(text="AAAA" * 3 + "A", chunk=8)  # the error counts the data characters of it all
def test_decoding_in_slices_accepts_exactly_what_one_whole_decode_accepts(monkeypatch, text, chunk):
    monkeypatch.setattr(archive_module, "DECODE_CHUNK", chunk)
    expected = whole_decode(text)
    with tempfile.TemporaryFile() as out:
        try:
            size = write_base64(out.fileno(), "b64:" + text, 4)
        except binascii.Error as exc:
            assert str(exc) == expected
        else:
            out.seek(0)
            assert out.read() == expected
            assert size == len(expected)


@pytest.mark.parametrize(
    "encoded",
    [
        base64.b64encode(RAW).decode()[:16] + "@@@@" + base64.b64encode(RAW).decode()[16:],
        base64.b64encode(b"0123456789a").decode() + base64.b64encode(b"x").decode(),
        base64.b64encode(RAW).decode() + "A",
    ],
    ids=["bad-character", "padding-mid-text", "length"],
)
def test_raw_corrupt_after_some_slices_is_the_same_error_and_leaves_no_file(
    ctx, monkeypatch, encoded
):
    monkeypatch.setattr(archive_module, "DECODE_CHUNK", 8)
    with pytest.raises(OpFailure) as err:
        run_archive(raw_envelope("b64:" + encoded), {}, ctx)
    assert (
        str(err.value) == f"ARCHIVE: _txc.lmtp.msg.raw is not valid base64: {whole_decode(encoded)}"
    )
    maildir = stack_dir(ctx) / "Maildir"
    assert files_under(maildir / "tmp") == set() and files_under(maildir / "new") == set()


def test_archive_of_a_message_over_several_slices_stores_every_byte(ctx):
    raw = RAW + os.urandom(2 * archive_module.DECODE_CHUNK + 5)
    patch = run_archive(make_envelope(raw), {"folder": "Big"}, ctx)
    assert patch["archive"]["size"] == len(raw)
    assert Path(patch["archive"]["path"]).read_bytes() == raw


def test_archive_of_an_empty_message_stores_an_empty_file(ctx):
    patch = run_archive(raw_envelope("b64:"), {}, ctx)
    assert patch["archive"]["size"] == 0
    assert Path(patch["archive"]["path"]).read_bytes() == b""


def _without_raw(envelope: dict) -> dict:
    del envelope["_txc"]["lmtp"]["msg"]["raw"]
    return envelope


def test_archive_stores_the_bytes_the_source_handed_over_when_the_envelope_has_no_raw(ctx):
    handed = RAW + b"handed over, not in the envelope\r\n"
    patch = run_archive(_without_raw(make_envelope()), {}, dataclasses.replace(ctx, message=handed))
    assert Path(patch["archive"]["path"]).read_bytes() == handed
    assert patch["archive"]["size"] == len(handed)


def test_archive_without_handed_bytes_or_raw_is_an_op_error(ctx):
    with pytest.raises(OpFailure, match=r"ARCHIVE: the envelope has no raw message"):
        run_archive(_without_raw(make_envelope()), {}, ctx)


def _handed(ctx: OpContext, body: bytes = b"") -> OpContext:
    """`ctx` with the message handed over as bytes (the LMTP head's way): written inline."""
    return dataclasses.replace(ctx, message=RAW + body)


def _archive_together(ctx: OpContext, count: int, first: bool = True) -> list[Any]:
    """`count` ARCHIVE calls started in one turn of the loop (after one that makes the
    Maildir, unless `first` is false): their patches or exceptions."""

    async def together() -> list[Any]:
        if first:
            await archive(_without_raw(make_envelope()), {}, _handed(ctx))
        calls = [
            archive(_without_raw(make_envelope()), {}, _handed(ctx, b"%d\r\n" % i))
            for i in range(count)
        ]
        return await asyncio.gather(*calls, return_exceptions=True)

    return asyncio.run(together())


def _counting(monkeypatch, name: str, fail_on: set[int] = frozenset()) -> list[Any]:
    """Record the calls of `archive_module.os.<name>` / `archive_module.<name>`; the calls
    numbered in `fail_on` (from 1) raise EIO."""
    owner = archive_module.os if name == "fsync" else archive_module
    real = getattr(owner, name)
    calls: list[Any] = []

    def counting(arg: Any) -> None:
        calls.append(arg)
        if len(calls) in fail_on:
            raise OSError(5, "Input/output error")
        real(arg)

    monkeypatch.setattr(owner, name, counting)
    return calls


def test_deliveries_of_one_turn_share_one_fsync_of_new(ctx, monkeypatch):
    _archive_together(ctx, 0)  # the Maildir exists; its creation fsyncs folders too
    dir_syncs = _counting(monkeypatch, "fsync_dir")
    file_syncs = _counting(monkeypatch, "fsync")
    patches = _archive_together(ctx, 8, first=False)
    new = stack_dir(ctx) / "Maildir" / "new"
    assert [Path(d) for d in dir_syncs] == [new]
    assert len(file_syncs) == 8 + 1  # each file, then new/ itself
    maildir = mailbox.Maildir(stack_dir(ctx) / "Maildir", create=False)
    for i, patch in enumerate(patches):
        assert maildir.get_bytes(patch["archive"]["key"]) == RAW + b"%d\r\n" % i


def test_a_failed_fsync_of_new_fails_every_delivery_it_was_to_cover(ctx, monkeypatch):
    _archive_together(ctx, 0)
    _counting(monkeypatch, "fsync_dir", fail_on={1})
    outcomes = _archive_together(ctx, 3, first=False)
    assert [(type(e), getattr(e, "errno", None)) for e in outcomes] == [(OSError, 5)] * 3
    assert list((stack_dir(ctx) / "Maildir" / "tmp").iterdir()) == []
    # only the first call's message: the failed ones are removed, as their retries store them
    assert len(list((stack_dir(ctx) / "Maildir" / "new").iterdir())) == 1
    # The next delivery is not stuck behind the failure.
    (patch,) = _archive_together(ctx, 1, first=False)
    assert Path(patch["archive"]["path"]).read_bytes() == RAW + b"0\r\n"


def test_a_failed_fsync_of_one_file_fails_only_its_delivery(ctx, monkeypatch):
    _archive_together(ctx, 0)
    real_fsync = os.fsync

    def failing_for_the_second(fd: int) -> None:
        written = Path(f"/proc/self/fd/{fd}")
        if written.is_file() and written.read_bytes() == RAW + b"1\r\n":  # in any order
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(archive_module.os, "fsync", failing_for_the_second)
    outcomes = _archive_together(ctx, 3, first=False)
    assert isinstance(outcomes[1], OSError) and outcomes[1].errno == 5
    landed = [o for o in outcomes if isinstance(o, dict)]
    assert [Path(p["archive"]["path"]).read_bytes() for p in landed] == [
        RAW + b"0\r\n",
        RAW + b"2\r\n",
    ]
    maildir = stack_dir(ctx) / "Maildir"
    assert list((maildir / "tmp").iterdir()) == []
    assert len(list((maildir / "new").iterdir())) == 1 + 2


def test_batches_that_arrive_while_new_is_fsynced_share_its_next_fsync(ctx, monkeypatch):
    _archive_together(ctx, 0)
    new = str(stack_dir(ctx) / "Maildir" / "new")
    first_in = threading.Event()
    release = threading.Event()
    dir_syncs: list[str] = []
    real_fsync_dir = archive_module.fsync_dir

    def held_first(path: str) -> None:
        dir_syncs.append(str(path))
        if len(dir_syncs) == 1:
            first_in.set()
            assert release.wait(10)
        real_fsync_dir(path)

    def waiting_batches() -> int:
        return len(archive_module._fsync_threads()._unsynced.get(new, []))

    async def three_turns() -> list[dict]:
        first = asyncio.ensure_future(archive(_without_raw(make_envelope()), {}, _handed(ctx)))
        while not first_in.is_set():
            await asyncio.sleep(0.001)
        later = []
        for i in (2, 3):  # each in a turn of its own: a batch of its own
            later.append(
                asyncio.ensure_future(
                    archive(_without_raw(make_envelope()), {}, _handed(ctx, b"%d\r\n" % i))
                )
            )
            await asyncio.sleep(0)
        for _ in range(10_000):  # up to ~10 s; without the wait for the next fsync, never
            if waiting_batches() == 2:
                break
            await asyncio.sleep(0.001)
        release.set()
        return [await first, *[await call for call in later]]

    monkeypatch.setattr(archive_module, "fsync_dir", held_first)
    patches = asyncio.run(three_turns())
    assert dir_syncs == [new, new]  # the first batch's, then one for the two that waited
    assert [Path(p["archive"]["path"]).read_bytes() for p in patches] == [
        RAW,
        RAW + b"2\r\n",
        RAW + b"3\r\n",
    ]


def test_the_files_of_concurrent_deliveries_are_fsynced_side_by_side(ctx, monkeypatch):
    _archive_together(ctx, 0)
    all_in = threading.Barrier(3, timeout=10)  # broken unless three fsyncs wait at once
    real_fsync = os.fsync

    def meeting(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # not new/'s fsync
            all_in.wait()
        real_fsync(fd)

    monkeypatch.setattr(archive_module.os, "fsync", meeting)
    patches = _archive_together(ctx, 3, first=False)
    assert [Path(p["archive"]["path"]).read_bytes() for p in patches] == [
        RAW + b"%d\r\n" % i for i in range(3)
    ]
    assert not all_in.broken


@pytest.mark.parametrize(
    "refused",
    [("txcl-archive-fsync",), ("txcl-archive-fsync", "asyncio_")],
    ids=["the-loops-executor-moves-them", "the-loop-moves-them"],
)
def test_without_a_thread_to_be_had_the_files_are_moved_all_the_same(ctx, monkeypatch, refused):
    _archive_together(ctx, 0)

    class NoThread(threading.Thread):
        def start(self) -> None:
            if self.name.startswith(refused):  # "asyncio_": the loop's executor's threads
                raise RuntimeError("can't start new thread")
            super().start()

    monkeypatch.setattr(archive_module, "_fsync_threads_of_process", None)
    monkeypatch.setattr(archive_module.threading, "Thread", NoThread)
    patches = _archive_together(ctx, 3, first=False)
    assert [Path(p["archive"]["path"]).read_bytes() for p in patches] == [
        RAW + b"%d\r\n" % i for i in range(3)
    ]
    assert list((stack_dir(ctx) / "Maildir" / "tmp").iterdir()) == []


def test_a_delivery_cancelled_before_its_commit_leaves_nothing_behind(ctx):
    async def cancel_before_commit() -> dict:
        await archive(_without_raw(make_envelope()), {}, _handed(ctx))
        kept = asyncio.ensure_future(archive(_without_raw(make_envelope()), {}, _handed(ctx)))
        dropped = asyncio.ensure_future(
            archive(_without_raw(make_envelope()), {}, _handed(ctx, b"dropped\r\n"))
        )
        await asyncio.sleep(0)  # both have written their file and wait for the commit
        dropped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dropped
        return await kept

    patch = asyncio.run(cancel_before_commit())
    maildir = mailbox.Maildir(stack_dir(ctx) / "Maildir", create=False)
    assert patch["archive"]["key"] in maildir
    assert all(maildir.get_bytes(key) == RAW for key in maildir.iterkeys())
    assert len(maildir.keys()) == 2
    assert list((stack_dir(ctx) / "Maildir" / "tmp").iterdir()) == []


def test_the_loop_serves_others_while_a_commit_waits_for_the_disk(ctx, monkeypatch):
    _archive_together(ctx, 0)
    real_fsync = os.fsync
    started = threading.Event()

    def slow_fsync(fd: int) -> None:
        started.set()
        time.sleep(0.3)
        real_fsync(fd)

    async def archive_while_ticking() -> tuple[dict, int, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        first = asyncio.ensure_future(archive(_without_raw(make_envelope()), {}, _handed(ctx)))
        while not started.is_set():
            await asyncio.sleep(0.001)
        # Added while the first batch is on the disk: it waits for the next batch.
        second = await archive(_without_raw(make_envelope()), {}, _handed(ctx, b"2\r\n"))
        ticker.cancel()
        return await first, second, ticks

    monkeypatch.setattr(archive_module.os, "fsync", slow_fsync)
    first, second, ticks = asyncio.run(archive_while_ticking())
    assert ticks >= 10  # the loop ran through the fsyncs' 0.6 s and more
    assert Path(first["archive"]["path"]).read_bytes() == RAW
    assert Path(second["archive"]["path"]).read_bytes() == RAW + b"2\r\n"


def test_a_delivery_cancelled_while_its_commit_runs_leaves_nothing_behind(ctx, monkeypatch):
    _archive_together(ctx, 0)
    real_fsync = os.fsync
    syncing = threading.Event()

    def slow_fsync(fd: int) -> None:
        syncing.set()
        time.sleep(0.2)
        real_fsync(fd)

    async def cancel_during_commit() -> None:
        dropped = asyncio.ensure_future(
            archive(_without_raw(make_envelope()), {}, _handed(ctx, b"dropped\r\n"))
        )
        while not syncing.is_set():
            await asyncio.sleep(0.001)
        dropped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dropped
        await asyncio.sleep(0.5)  # the commit ends and settles

    monkeypatch.setattr(archive_module.os, "fsync", slow_fsync)
    asyncio.run(cancel_during_commit())
    maildir = mailbox.Maildir(stack_dir(ctx) / "Maildir", create=False)
    assert [maildir.get_bytes(key) for key in maildir.iterkeys()] == [RAW]
    assert list((stack_dir(ctx) / "Maildir" / "tmp").iterdir()) == []


def test_a_large_message_is_written_and_fsynced_off_the_loop(ctx, monkeypatch):
    threads: list[str] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # not the folders' fsyncs
            threads.append(threading.current_thread().name)
        real_fsync(fd)

    monkeypatch.setattr(archive_module.os, "fsync", recording)
    big = os.urandom(archive_module.INLINE_WRITE_BYTES + 1)
    patch = run_archive(_without_raw(make_envelope()), {}, dataclasses.replace(ctx, message=big))
    assert Path(patch["archive"]["path"]).read_bytes() == big
    assert len(threads) == 1 and threads[0] != threading.main_thread().name


def test_concurrent_archives_into_one_folder_all_land_whole(ctx):
    async def many() -> list[dict]:
        return await asyncio.gather(*(archive(make_envelope(), {}, ctx) for _ in range(30)))

    patches = asyncio.run(many())
    assert len({p["archive"]["key"] for p in patches}) == 30
    maildir = mailbox.Maildir(stack_dir(ctx) / "Maildir", create=False)
    assert sorted(maildir.keys()) == sorted(p["archive"]["key"] for p in patches)
    assert all(maildir.get_bytes(key) == RAW for key in maildir.iterkeys())


def test_a_cancelled_archive_leaves_nothing_in_tmp(ctx, monkeypatch):
    started = threading.Event()
    release = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        started.set()
        assert release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(archive_module.os, "fsync", slow_fsync)

    async def cancel_mid_fsync() -> None:
        task = asyncio.ensure_future(archive(make_envelope(), {}, ctx))
        while not started.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()

    asyncio.run(cancel_mid_fsync())
    maildir = stack_dir(ctx) / "Maildir"
    assert list((maildir / "tmp").iterdir()) == []
    assert list((maildir / "new").iterdir()) == []


def test_a_known_maildir_is_not_checked_again(ctx, monkeypatch):
    checked: list[Path] = []
    ensure = archive_module.ensure_maildir

    def counting(path: Path, **kwargs: Any) -> None:
        checked.append(path)
        ensure(path, **kwargs)

    monkeypatch.setattr(archive_module, "ensure_maildir", counting)
    for _ in range(3):
        run_archive(make_envelope(), {"folder": "Support"}, ctx)
    root = stack_dir(ctx) / "Maildir"
    assert checked == [root, root / ".Support"]


def test_a_place_delivered_to_once_skips_the_storage_checks_after(ctx, monkeypatch):
    asked: list[tuple[str, ...]] = []
    storage = OpContext.storage

    def counting(self: OpContext, *parts: str) -> Path:
        asked.append(parts)
        return storage(self, *parts)

    monkeypatch.setattr(OpContext, "storage", counting)
    for folder in ("", "Support", "", "Support"):
        run_archive(make_envelope(), {"folder": folder}, ctx)
    assert asked == [("Maildir",), ("Maildir",), ("Maildir", ".Support")]
    other = dataclasses.replace(ctx, tenant="globex", stack="globex/_mail")
    run_archive(make_envelope(), {}, other)  # another stack is checked on its own
    assert asked[3:] == [("Maildir",)]


def test_the_places_remembered_are_bounded(ctx, monkeypatch):
    monkeypatch.setattr(archive_module, "_PLACES_MAX", 2)
    monkeypatch.setattr(archive_module, "_places", {})
    for folder in ("A", "B", "C"):
        run_archive(make_envelope(), {"folder": folder}, ctx)
        assert len(archive_module._places) <= 2
    assert (ctx.state_dir, ctx.tenant, ctx.stack, "C") in archive_module._places


@pytest.mark.parametrize(
    ("folder", "deleted"),
    [("", "Maildir"), ("", "Maildir/tmp"), ("Support", "Maildir"), ("Support", ".Support/new")],
)
def test_a_known_maildir_deleted_under_the_process_is_made_again(ctx, folder, deleted):
    run_archive(make_envelope(), {"folder": folder}, ctx)
    root = stack_dir(ctx) / "Maildir"
    shutil.rmtree(root / deleted.removeprefix("Maildir").lstrip("/"))

    patch = run_archive(make_envelope(), {"folder": folder}, ctx)

    maildir = mailbox.Maildir(root, create=False)
    target = maildir.get_folder(folder) if folder else maildir
    assert target.get_bytes(patch["archive"]["key"]) == RAW
    assert all((root / sub).is_dir() for sub in ("tmp", "new", "cur"))
    assert not any(Path(patch["archive"]["path"]).parent.parent.joinpath("tmp").iterdir())


# EMIT ------------------------------------------------------------------------------------


def read_events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_bytes().splitlines()]


def test_emit_appends_the_envelope_without_raw_or_attachment_content(ctx):
    envelope = make_envelope()
    first = emit(envelope, {}, ctx)
    second = emit(envelope, {}, ctx)

    log = stack_dir(ctx) / "events.jsonl"
    data = log.read_bytes()
    assert first == {"emit": {"log": str(log), "offset": 0}}
    assert second["emit"]["offset"] == data.index(b"\n") + 1
    (event, _) = read_events(log)
    msg = event["_txc"]["lmtp"]["msg"]
    assert "raw" not in msg
    assert msg["attachments"] == [{"name": "a.txt", "type": "text/plain", "size": 3}]
    assert event["ticket"] == {"id": 7}
    assert envelope == make_envelope()


def test_emit_includes_raw_and_attachments_when_asked(ctx):
    emit(make_envelope(), {"include_raw": True, "include_attachments": True}, ctx)
    (event,) = read_events(stack_dir(ctx) / "events.jsonl")
    assert event == make_envelope()


def test_emit_refuses_a_flag_that_is_not_a_boolean(ctx):
    with pytest.raises(OpFailure, match="EMIT: include_raw must be true or false, not 'yes'"):
        emit(make_envelope(), {"include_raw": "yes"}, ctx)


def test_emit_from_many_coroutines_through_the_registry_gives_distinct_whole_lines(ctx):
    registry = OpRegistry.default()

    async def burst() -> list[dict[str, Any]]:
        calls = [registry.call("EMIT", {**make_envelope(), "seq": i}, {}, ctx) for i in range(50)]
        return await asyncio.gather(*calls)

    patches = asyncio.run(burst())
    data = (stack_dir(ctx) / "events.jsonl").read_bytes()
    by_offset = {p["emit"]["offset"]: p for p in patches}
    assert len(by_offset) == 50
    seqs = {json.loads(data[offset : data.index(b"\n", offset)])["seq"] for offset in by_offset}
    assert seqs == set(range(50))


def test_emit_lines_from_many_threads_never_interleave(ctx):
    threads, per_thread = 8, 40
    offsets: list[int] = []

    def writer(n: int) -> None:
        for i in range(per_thread):
            envelope = {**make_envelope(), "seq": {"thread": n, "i": i, "pad": "x" * (n * 500)}}
            offsets.append(emit(envelope, {}, ctx)["emit"]["offset"])

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()

    data = (stack_dir(ctx) / "events.jsonl").read_bytes()
    starts = [0] + [i + 1 for i, b in enumerate(data) if b == ord("\n")][:-1]
    assert sorted(offsets) == starts
    seen = {
        (e["seq"]["thread"], e["seq"]["i"]) for e in read_events(stack_dir(ctx) / "events.jsonl")
    }
    assert seen == {(n, i) for n in range(threads) for i in range(per_thread)}


# WEBHOOK ---------------------------------------------------------------------------------


class HookHandler(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, str], bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        HookHandler.received.append((self.path, dict(self.headers), body))
        if self.path.startswith("/slow"):
            time.sleep(2)
        status = 500 if self.path.startswith("/fail") else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def hook_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HookHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_webhook_posts_the_envelope_as_json(ctx, hook_url):
    HookHandler.received.clear()
    patch = webhook(make_envelope(), {"url": hook_url + "/hook?token=s3cret"}, ctx)

    assert patch == {"webhook": {"status": 200}}
    ((path, headers, body),) = HookHandler.received
    assert path == "/hook?token=s3cret"
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Txcl-Rid"] == "01HXTEST"
    assert headers["X-Txcl-Stack"] == "acme/_mail"
    event = json.loads(body)
    assert "raw" not in event["_txc"]["lmtp"]["msg"]
    assert event["ticket"] == {"id": 7}


def test_webhook_with_include_raw_sends_the_raw_message(ctx, hook_url):
    HookHandler.received.clear()
    webhook(make_envelope(), {"url": hook_url + "/", "include_raw": True}, ctx)
    ((_, _, body),) = HookHandler.received
    assert (
        json.loads(body)["_txc"]["lmtp"]["msg"]["raw"]
        == make_envelope()["_txc"]["lmtp"]["msg"]["raw"]
    )


def test_webhook_answer_that_is_not_2xx_is_an_op_error(ctx, hook_url):
    with pytest.raises(OpFailure) as err:
        webhook(make_envelope(), {"url": hook_url + "/fail?token=s3cret"}, ctx)
    assert str(err.value) == f"WEBHOOK: POST {hook_url}/fail answered 500 Internal Server Error"


def test_webhook_slow_answer_times_out_at_the_op_deadline(ctx, hook_url):
    started = time.monotonic()
    with pytest.raises(OpFailure, match=r"WEBHOOK: POST .*/slow timed out after 0.3s"):
        webhook(
            make_envelope(), {"url": hook_url + "/slow"}, dataclasses.replace(ctx, deadline_s=0.3)
        )
    assert time.monotonic() - started < 1.5


def test_webhook_peer_trickling_bytes_is_cut_off_at_the_deadline(ctx):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def trickle() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                with contextlib.suppress(OSError):
                    for _ in range(30):
                        conn.sendall(b"a")
                        time.sleep(0.1)

        threading.Thread(target=trickle, daemon=True).start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        started = time.monotonic()
        with pytest.raises(OpFailure, match="timed out after 0.5s"):
            webhook(make_envelope(), {"url": url}, dataclasses.replace(ctx, deadline_s=0.5))
        assert time.monotonic() - started < 1.2


def test_webhook_connection_refused_is_an_op_error(ctx):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OpFailure, match=rf"WEBHOOK: POST http://127.0.0.1:{port}/ failed"):
        webhook(make_envelope(), {"url": f"http://127.0.0.1:{port}/"}, ctx)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, 'WITH url = "https://..." is required'),
        ({"url": "ftp://example.com/x"}, "url 'ftp://example.com/x' must use http or https"),
        ({"url": "file:///etc/passwd"}, "url 'file:///etc/passwd' must use http or https"),
        ({"url": "http:///x"}, "url 'http:///x' names no host"),
        (
            {"url": "http://user:pw@example.com/"},
            "credentials in the url are refused; put a token in its path",
        ),
        (
            {"url": "http://example.com:99999/"},
            "url 'http://example.com:99999/' is not a valid URL: Port out of range 0-65535",
        ),
        (
            {"url": "http://example.com/a b"},
            "url 'http://example.com/a b' contains spaces or control characters",
        ),
    ],
)
def test_webhook_refuses_bad_arguments_before_any_request(ctx, args, message):
    with pytest.raises(OpFailure) as err:
        webhook(make_envelope(), args, ctx)
    assert str(err.value) == f"WEBHOOK: {message}"


# FORWARD ---------------------------------------------------------------------------------


class Relay:
    """An aiosmtpd handler that keeps what arrives and refuses local parts with 'nobody'."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("nobody"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.received.append(
            (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
        )
        return "250 2.0.0 queued as 4XYZ"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def relay() -> Iterator[tuple[Relay, str]]:
    handler = Relay()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield handler, f"127.0.0.1:{port}"
    controller.stop()


def test_forward_resends_the_exact_raw_message(ctx, relay):
    handler, address = relay
    handler.received.clear()
    patch = forward(make_envelope(), {"to": "ops@b.example, lead@b.example", "relay": address}, ctx)

    assert handler.received == [("alice@example.com", ["ops@b.example", "lead@b.example"], RAW)]
    assert patch == {
        "forward": {
            "relay": address,
            "from": "alice@example.com",
            "to": ["ops@b.example", "lead@b.example"],
            "reply": "250 2.0.0 queued as 4XYZ",
        }
    }


def test_forward_takes_a_list_and_an_explicit_sender(ctx, relay):
    handler, address = relay
    handler.received.clear()
    forward(make_envelope(), {"to": ["ops@b.example"], "from": "", "relay": address}, ctx)
    assert handler.received == [("<>", ["ops@b.example"], RAW)]


def test_forward_sends_crlf_line_ends(ctx, relay):
    handler, address = relay
    handler.received.clear()
    forward(make_envelope(b"Subject: x\n\nbody\n"), {"to": "ops@b.example", "relay": address}, ctx)
    assert handler.received[0][2] == b"Subject: x\r\n\r\nbody\r\n"


def test_forward_sends_the_bytes_the_source_handed_over(ctx, relay):
    handler, address = relay
    handler.received.clear()
    handed = dataclasses.replace(ctx, message=b"Subject: handed\r\n\r\nover\r\n")
    forward(_without_raw(make_envelope()), {"to": "ops@b.example", "relay": address}, handed)
    assert handler.received[0][2] == b"Subject: handed\r\n\r\nover\r\n"


def test_forward_sends_nothing_when_one_recipient_is_refused(ctx, relay):
    handler, address = relay
    handler.received.clear()
    with pytest.raises(OpFailure) as err:
        forward(make_envelope(), {"to": "ops@b.example,nobody@b.example", "relay": address}, ctx)
    assert str(err.value) == (
        f"FORWARD: relay {address} refused nobody@b.example (550 5.1.1 no such user); "
        "nothing was sent"
    )
    assert handler.received == []


def test_forward_to_a_closed_port_is_an_op_error(ctx):
    port = free_port()
    with pytest.raises(OpFailure, match=rf"FORWARD: relay 127.0.0.1:{port} failed"):
        forward(make_envelope(), {"to": "ops@b.example", "relay": f"127.0.0.1:{port}"}, ctx)


def test_forward_to_a_silent_relay_times_out(ctx):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        relay = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(OpFailure, match=f"FORWARD: relay {relay} timed out after 0.3s"):
            forward(
                make_envelope(),
                {"to": "ops@b.example", "relay": relay},
                dataclasses.replace(ctx, deadline_s=0.3),
            )
        assert time.monotonic() - started < 1.5


NOT_PLAIN = "is not a plain mail address like a@b.example"
RELAY_FORM = 'must be "host:port" (or "[v6-address]:port")'


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, 'WITH to = "a@b.example" (or a list) is required'),
        ({"to": ""}, "to names no recipient"),
        ({"to": "not-an-address"}, f"recipient 'not-an-address' {NOT_PLAIN}"),
        (
            {"to": "a@b.example>\r\nRCPT TO:<x@y.example"},
            f"recipient 'a@b.example>\\r\\nRCPT TO:<x@y.example' {NOT_PLAIN}",
        ),
        ({"to": ["a@b.example", 3]}, f"recipient 3 {NOT_PLAIN}"),
        ({"to": "a\x00b@c.example"}, f"recipient 'a\\x00b@c.example' {NOT_PLAIN}"),
        ({"to": ["a@b.example"] * 101}, "to names 101 recipients; at most 100"),
        ({"to": "a@b.example", "from": "x y@z"}, f"sender 'x y@z' {NOT_PLAIN}"),
        ({"to": "a@b.example", "relay": "host:0"}, f"relay 'host:0' {RELAY_FORM}"),
        ({"to": "a@b.example", "relay": "host:port"}, f"relay 'host:port' {RELAY_FORM}"),
        ({"to": "a@b.example", "relay": "a b:25"}, f"relay 'a b:25' {RELAY_FORM}"),
        ({"to": "a@b.example", "relay": 25}, f"relay 25 {RELAY_FORM}"),
    ],
)
def test_forward_refuses_bad_arguments_before_connecting(ctx, args, message):
    with pytest.raises(OpFailure) as err:
        forward(make_envelope(), args, ctx)
    assert str(err.value) == f"FORWARD: {message}"


def test_forward_without_any_sender_is_an_op_error(ctx):
    envelope = make_envelope()
    del envelope["_txc"]["lmtp"]["mail"]
    with pytest.raises(OpFailure, match="FORWARD: no WITH from and no envelope sender"):
        forward(envelope, {"to": "a@b.example"}, ctx)


# Through the runner ----------------------------------------------------------------------


def run_rule(tmp_path: Path, rule: str) -> Any:
    stage = tmp_path / "OPS" / "acme" / "_mail" / "0"
    stage.mkdir(parents=True)
    (stage / "accept.txcl").write_text(rule)
    tree = load_tree(tmp_path / "OPS")
    assert tree.ok, tree.problems
    policy = RunPolicy(state_dir=tmp_path / "var")
    return tree.stacks["acme/_mail"].run(make_envelope(), policy)


def test_a_rule_that_accepts_and_archives_has_the_mail_stored_when_the_run_ends(tmp_path):
    result = run_rule(
        tmp_path,
        'SET @lmtp.res.code = 250\nWITH folder = "Support"\nEXEC "op://ARCHIVE"\n',
    )
    assert result.error is None
    assert result.envelope["_txc"]["lmtp"]["res"]["code"] == 250
    stored = Path(result.envelope["archive"]["path"])
    assert stored.read_bytes() == RAW
    assert stored.is_relative_to(tmp_path / "var" / "tenants" / "acme" / "_mail" / "Maildir")


def test_a_refused_folder_fails_the_run_and_writes_nothing(tmp_path):
    result = run_rule(
        tmp_path,
        'SET @lmtp.res.code = 250\nWITH folder = "../../x"\nEXEC "op://ARCHIVE"\n',
    )
    assert result.error is not None
    assert "ARCHIVE: folder '../../x' is refused" in result.error.message
    assert not (tmp_path / "var").exists() or files_under(tmp_path / "var") == set()


def test_no_built_in_op_imports_another():
    import ast as pyast

    import txcl.builtin_ops as package

    folder = Path(package.__file__).parent
    ops = {op.fn.__module__.rpartition(".")[2] for op in BUILTINS}
    assert ops == {"archive", "emit", "forward", "webhook"}
    for name in ops:
        tree = pyast.parse((folder / f"{name}.py").read_text())
        imported = {
            node.module.rpartition(".")[2] if node.module else ""
            for node in pyast.walk(tree)
            if isinstance(node, pyast.ImportFrom)
        } | {
            alias.name.rpartition(".")[2]
            for node in pyast.walk(tree)
            if isinstance(node, pyast.ImportFrom) and node.module == "txcl.builtin_ops"
            for alias in node.names
        }
        assert not imported & (ops - {name}), f"{name} imports another op"
