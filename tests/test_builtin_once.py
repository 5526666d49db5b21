"""The built-in ops act once per delivery (support.once), and write whole event lines."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from test_builtin_ops import RAW, HookHandler, ctx, hook_url, make_envelope, stack_dir

from txcl.builtin_ops import BUILTINS
from txcl.builtin_ops.emit import emit
from txcl.builtin_ops.webhook import webhook

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


def test_keys_older_than_the_window_are_forgotten_and_pruned(ctx, monkeypatch):
    from txcl.builtin_ops import support

    keyed = dataclasses.replace(ctx, delivery_key="k1")
    now = time.time()
    first = by_name("EMIT")(make_envelope(), {}, keyed)
    later = now + (support.ONCE_WINDOW_DAYS + 2) * 86400
    monkeypatch.setattr(support.time, "time", lambda: later)
    again = by_name("EMIT")(make_envelope(), {}, keyed)
    assert again != first
    once = stack_dir(ctx) / support.ONCE_FOLDER
    deadline = time.monotonic() + 5
    while len(list(once.iterdir())) > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [p.name for p in once.iterdir()] == [str(int(later // 86400))]


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
    from txcl.builtin_ops import support

    keyed = dataclasses.replace(ctx, delivery_key="k1", message=RAW)
    first = asyncio.run(by_name("ARCHIVE")(make_envelope(), {"folder": "Support"}, keyed))
    keys = [p for p in (stack_dir(ctx) / support.ONCE_FOLDER).rglob("*") if p.is_file()]
    assert len(keys) == 1
    keys[0].write_bytes(b" " * 2048)  # reserved, never recorded: killed after storing
    again = asyncio.run(by_name("ARCHIVE")(make_envelope(), {"folder": "Support"}, keyed))
    assert again == first
    assert len(list((stack_dir(ctx) / "Maildir" / ".Support" / "new").iterdir())) == 1
    keys[0].write_bytes(b" " * 2048)
    Path(first["archive"]["path"]).unlink()  # cut off before it stored anything
    third = asyncio.run(by_name("ARCHIVE")(make_envelope(), {"folder": "Support"}, keyed))
    assert third["archive"]["path"] != first["archive"]["path"]
    assert len(list((stack_dir(ctx) / "Maildir" / ".Support" / "new").iterdir())) == 1
