"""The built-in ops act once per delivery (support.once), and write whole event lines."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_builtin_ops import RAW, HookHandler, ctx, hook_url, make_envelope, stack_dir

from txcl.builtin_ops import BUILTINS, once
from txcl.builtin_ops import archive as archive_module
from txcl.builtin_ops.emit import emit
from txcl.builtin_ops.webhook import webhook
from txcl.ops import OpFailure

__all__ = ["ctx", "hook_url"]  # fixtures, used by name




def by_name(name: str) -> Any:
    return next(op.fn for op in BUILTINS if op.name == name)


def test_a_repeated_delivery_emits_once_and_gets_the_first_answer(ctx):
    keyed = dataclasses.replace(ctx, delivery_key="k1")
    first = by_name("EMIT")(make_envelope(), {}, keyed)
    again = by_name("EMIT")(make_envelope(), {}, keyed)
    assert again == first
    assert len((stack_dir(ctx) / "events.jsonl").read_bytes().splitlines()) == 1
    other = by_name("EMIT")(make_envelope(), {}, dataclasses.replace(ctx, delivery_key="k2"))
    with_args = by_name("EMIT")(make_envelope(), {"include_raw": True}, keyed)
    unkeyed = [by_name("EMIT")(make_envelope(), {}, ctx) for _ in range(2)]
    offsets = [p["emit"]["offset"] for p in (first, other, with_args, *unkeyed)]
    assert len(set(offsets)) == 5


def test_a_repeated_delivery_archives_once(ctx):
    keyed = dataclasses.replace(ctx, delivery_key="k1", message=RAW)
    patches = [asyncio.run(by_name("ARCHIVE")(make_envelope(), {}, keyed)) for _ in range(3)]
    assert patches[0] == patches[1] == patches[2]
    assert len(list((stack_dir(ctx) / "Maildir" / "new").iterdir())) == 1


def test_a_failed_call_is_not_remembered(ctx, tmp_path):
    keyed = dataclasses.replace(ctx, delivery_key="k1")
    log = stack_dir(ctx) / "events.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.mkdir()  # EMIT cannot open it
    with pytest.raises(OSError):
        by_name("EMIT")(make_envelope(), {}, keyed)
    log.rmdir()
    assert by_name("EMIT")(make_envelope(), {}, keyed)["emit"]["offset"] == 0


def once_folder(ctx) -> Path:
    return stack_dir(ctx) / once.ONCE_FOLDER


def log_events(ctx) -> list[tuple[str, str]]:
    """(kind, key) of every line of every process's log, in file order."""
    events = []
    for log in sorted(once_folder(ctx).glob("*/*.log")):
        text = log.read_bytes().split(b"\0", 1)[0].decode()
        events += [tuple(line.split(" ")[:2]) for line in text.splitlines()]
    return events


def as_if_killed_before_recording(ctx) -> None:
    """As a kill -9 between acting and recording leaves the keys: reserved, no patch (and
    the next attempt comes to a process that never saw them)."""
    for store in once._stores.values():
        store.close()
    once._stores.clear()
    for log in once_folder(ctx).glob("*/*.log"):
        lines = log.read_bytes().split(b"\0", 1)[0].splitlines(keepends=True)
        log.write_bytes(b"".join(line for line in lines if not line.startswith(b"D ")))


def test_keys_older_than_the_window_are_forgotten_and_pruned(ctx, monkeypatch):
    keyed = dataclasses.replace(ctx, delivery_key="k1")
    first = by_name("EMIT")(make_envelope(), {}, keyed)
    later = time.time() + (once.ONCE_WINDOW_DAYS + 2) * 86400
    monkeypatch.setattr(once.time, "time", lambda: later)
    again = by_name("EMIT")(make_envelope(), {}, keyed)
    assert again != first
    deadline = time.monotonic() + 5
    while len(list(once_folder(ctx).iterdir())) > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [p.name for p in once_folder(ctx).iterdir()] == [str(int(later // 86400))]
    assert by_name("EMIT")(make_envelope(), {}, keyed) == again


def test_webhook_sends_an_idempotency_key_the_same_for_a_retry(ctx, hook_url):
    HookHandler.received.clear()
    keyed = dataclasses.replace(ctx, delivery_key="k1")
    webhook(make_envelope(), {"url": hook_url + "/"}, keyed)
    webhook(make_envelope(), {"url": hook_url + "/"}, keyed)
    webhook(make_envelope(), {"url": hook_url + "/"}, ctx)
    keys = [headers.get("Idempotency-Key") for _, headers, _ in HookHandler.received]
    assert keys[0] and keys[0] == keys[1] and keys[2] is None


def test_emit_cut_short_by_a_full_disk_leaves_no_partial_line(ctx, monkeypatch):
    from txcl.builtin_ops import emit as emit_module

    emit(make_envelope(), {}, ctx)
    real_write = os.write

    def half_write(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data[: len(data) // 2]))

    monkeypatch.setattr(emit_module.os, "write", half_write)
    with pytest.raises(OSError, match="wrote"):
        emit(make_envelope(), {}, ctx)
    monkeypatch.setattr(emit_module.os, "write", real_write)
    log = stack_dir(ctx) / "events.jsonl"
    log.write_bytes(log.read_bytes() + b'{"cut":')  # as a power cut could leave it
    emit(make_envelope(), {}, ctx)
    lines = log.read_bytes().split(b"\n")
    assert lines[-1] == b"" and lines[1] == b'{"cut":'
    assert [json.loads(line)["ticket"] for line in (lines[0], lines[2])] == [{"id": 7}] * 2


def test_emit_writes_a_header_with_8bit_bytes_kept_as_surrogates(ctx):
    envelope = make_envelope()
    envelope["_txc"]["lmtp"]["msg"]["from"] = [{"name": "J\udce9r\udcf4me", "addr": "a@x"}]
    emit(envelope, {}, ctx)
    (line,) = (stack_dir(ctx) / "events.jsonl").read_bytes().splitlines()
    assert json.loads(line)["_txc"]["lmtp"]["msg"]["from"][0]["name"] == "J\udce9r\udcf4me"


def test_a_retry_of_an_archive_cut_off_after_storing_finds_the_stored_file(ctx):
    keyed = dataclasses.replace(ctx, delivery_key="k1", message=RAW)
    first = asyncio.run(by_name("ARCHIVE")(make_envelope(), {"folder": "Support"}, keyed))
    assert [kind for kind, _ in log_events(ctx)] == ["R", "D"]
    as_if_killed_before_recording(ctx)
    again = asyncio.run(by_name("ARCHIVE")(make_envelope(), {"folder": "Support"}, keyed))
    assert again == first
    assert len(list((stack_dir(ctx) / "Maildir" / ".Support" / "new").iterdir())) == 1
    as_if_killed_before_recording(ctx)
    Path(first["archive"]["path"]).unlink()  # cut off before it stored anything
    third = asyncio.run(by_name("ARCHIVE")(make_envelope(), {"folder": "Support"}, keyed))
    assert third["archive"]["path"] != first["archive"]["path"]
    assert len(list((stack_dir(ctx) / "Maildir" / ".Support" / "new").iterdir())) == 1
    assert asyncio.run(by_name("ARCHIVE")(make_envelope(), {"folder": "Support"}, keyed)) == third


def test_an_archive_cancelled_just_as_its_file_is_committed_leaves_one_file_after_the_retry(
    ctx, monkeypatch
):
    keyed = dataclasses.replace(ctx, delivery_key="k1", message=RAW)
    real_settle = archive_module._settle
    calls: list[asyncio.Future[Any]] = []

    def settle_then_cancel(items: Any) -> None:
        real_settle(items)  # the file is in new/: its delivery's future has its result
        calls[0].cancel()  # a deadline in the same turn, before the call resumes

    async def cancelled_then_retried() -> dict:
        monkeypatch.setattr(archive_module, "_settle", settle_then_cancel)
        calls.append(asyncio.ensure_future(by_name("ARCHIVE")(make_envelope(), {}, keyed)))
        with pytest.raises(asyncio.CancelledError):
            await calls[0]
        monkeypatch.setattr(archive_module, "_settle", real_settle)
        return await by_name("ARCHIVE")(make_envelope(), {}, keyed)

    retry = asyncio.run(cancelled_then_retried())
    stored = list((stack_dir(ctx) / "Maildir" / "new").iterdir())
    assert [path.name for path in stored] == [retry["archive"]["key"]]


EMIT_IN_ANOTHER_PROCESS = """
import dataclasses, json, sys
from pathlib import Path
from txcl.builtin_ops import BUILTINS, once
from txcl.ops import OpContext
from test_builtin_ops import make_envelope
emit = next(op.fn for op in BUILTINS if op.name == "EMIT")
ctx = OpContext("acme", "acme/_mail", "01HXTEST", Path(sys.argv[1]), 5.0)
for key in sys.argv[2:]:
    print(json.dumps(emit(make_envelope(), {}, dataclasses.replace(ctx, delivery_key=key))))
"""


def emit_in_another_process(ctx, *keys: str) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-c", EMIT_IN_ANOTHER_PROCESS, str(ctx.state_dir), *keys],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parent,
    )  # fmt: skip
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_a_retry_reaching_another_worker_process_gets_the_first_answer(ctx):
    keyed = {k: dataclasses.replace(ctx, delivery_key=k) for k in ("k1", "k2")}
    here = by_name("EMIT")(make_envelope(), {}, keyed["k1"])  # this process holds the db open
    there = emit_in_another_process(ctx, "k1", "k2", "k2")
    assert there[0] == here and there[1] == there[2]
    assert by_name("EMIT")(make_envelope(), {}, keyed["k2"]) == there[1]
    lines = (stack_dir(ctx) / "events.jsonl").read_bytes().splitlines()
    assert len(lines) == 2


def test_two_processes_see_each_others_keys_and_a_gone_ones_log_is_read_to_its_end(ctx):
    folder = ctx.storage(once.ONCE_FOLDER)
    first, second = once.KeyStore(folder), once.KeyStore(folder)  # two processes' views
    assert first.claim("k") == (None, False)
    assert second.claim("k") == (None, True)  # held unrecorded: cut off, or running
    first.record("k", {"done": 1})
    assert second.claim("k") == ({"done": 1}, False)
    assert second.claim("j") == (None, False) and first.claim("j") == (None, True)
    second.forget("j")
    first.forget("j")  # both calls failed: the next one acts afresh
    assert second.claim("j") == (None, False)
    second.record("j", {"done": 2})
    second.close()  # the process ends: its lock goes
    for _ in range(once._LIVENESS_EVERY + 2):
        first.claim("other")
    assert all(log.final for log in first._logs.values())
    assert first.claim("j") == ({"done": 2}, False)
    first.close()


def test_a_process_started_late_reads_a_long_log_to_its_end_at_its_first_call(ctx):
    # bench/soak: a worker started after a kill -9 read 4 KiB of each log per call, so a
    # retry of a message another worker had stored (its D line further on) stored it again.
    folder = ctx.storage(once.ONCE_FOLDER)
    first = once.KeyStore(folder)
    patch = {"archive": {"path": "/var/Maildir/new/" + "x" * 150}}
    for n in range(200):  # lines of some 200 bytes: a log many peeks long
        first.claim(f"k{n}")
        first.record(f"k{n}", patch)
    long_patch = {"emit": "y" * (2 * once._PEEK)}  # a line longer than a peek
    first.claim("long")
    first.record("long", long_patch)
    first.claim("running")
    late = once.KeyStore(folder)
    assert late.claim("k199") == (patch, False)
    assert late.claim("long") == (long_patch, False)
    assert late.claim("running") == (None, True)
    first.close()
    late.close()


def test_a_full_disk_fails_the_call_before_it_acts_never_after(ctx, monkeypatch):
    keyed = dataclasses.replace(ctx, delivery_key="k1")
    real = os.posix_fallocate

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(once.os, "posix_fallocate", full)
    with pytest.raises(OpFailure, match="No space left"):
        by_name("EMIT")(make_envelope(), {}, keyed)
    assert not (stack_dir(ctx) / "events.jsonl").exists()
    monkeypatch.setattr(once.os, "posix_fallocate", real)
    other = dataclasses.replace(ctx, delivery_key="k2")
    store = once.key_store(other)
    store.claim("warm")  # the log has its first chunk reserved
    monkeypatch.setattr(once.os, "posix_fallocate", full)
    first = by_name("EMIT")(make_envelope(), {}, other)  # room was reserved: it fits
    assert by_name("EMIT")(make_envelope(), {}, other) == first
    assert len((stack_dir(ctx) / "events.jsonl").read_bytes().splitlines()) == 1


def test_key_files_of_the_earlier_layout_are_read_as_they_are(ctx):
    keyed = dataclasses.replace(ctx, delivery_key="k1")
    key = once.once_key(keyed, "EMIT", {})
    day = once_folder(ctx) / str(once.today() - 1)
    day.mkdir(parents=True)
    (day / key).write_text('{"emit":{"offset":42}}')
    cut = dataclasses.replace(ctx, delivery_key="k2")
    (day / once.once_key(cut, "EMIT", {})).write_bytes(b" " * 2048)  # reserved, never recorded
    assert by_name("EMIT")(make_envelope(), {}, keyed) == {"emit": {"offset": 42}}
    assert not (stack_dir(ctx) / "events.jsonl").exists()
    store = once.key_store(keyed)
    assert store.claim(once.once_key(cut, "EMIT", {})) == (None, True)


def test_the_logs_are_private_whatever_the_umask(ctx):
    old = os.umask(0)
    try:
        by_name("EMIT")(make_envelope(), {}, dataclasses.replace(ctx, delivery_key="k1"))
    finally:
        os.umask(old)
    (log,) = once_folder(ctx).glob("*/*.log")
    assert log.stat().st_mode & 0o777 == 0o600
    assert log.parent.stat().st_mode & 0o777 == 0o700


def test_a_log_with_no_line_end_in_a_whole_read_is_passed_over_not_spun_on(ctx):
    # A torn or corrupt log (a disk error, a file put there by hand) must not hang the
    # lookups of every call of the stack, nor hide the other logs' keys.
    import signal

    folder = ctx.storage(once.ONCE_FOLDER)
    writer = once.KeyStore(folder)
    writer.claim("k1")
    writer.record("k1", {"emit": 1})
    day_folder = next(p for p in Path(folder).iterdir() if p.is_dir())
    (day_folder / "999999-garbage.log").write_bytes(b"x" * (once._READ + 4096) + b"\nD k2 {}\n")

    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("a lookup spun on the corrupt log")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        reader = once.KeyStore(folder)
        assert reader.claim("k1") == ({"emit": 1}, False)
        assert reader.claim("k3") == (None, False)
        assert reader.claim("k1") == ({"emit": 1}, False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    writer.close()
    reader.close()
