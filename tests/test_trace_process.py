"""The trace writer's file process: the same traces as the thread writes, retention, and what
happens when the process fails or its parent dies."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_trace import HINTS, FakeStack, envelope, result_for
from txcl.records import ScrubHints
from txcl.trace_files import StoredTraces
from txcl.trace_process import HEADER, TRACE, TraceProcess, frame, serve
from txcl.trace_store import read_message, read_trace, trace_names
from txcl.trace_writer import STAGE_FROM_BYTES, TraceWriter

RCPT = [("support@acme.example", "250 2.0.0 queued")]
HINTS_REDACT_AUTH = ScrubHints(redact=("_txc.lmtp.msg.headers.authorization",))


def send(writer: TraceWriter, rid: str, hints: Any = (), message: bytes | None = None) -> None:
    env = envelope()
    staged = writer.stage(message) if message is not None else None
    assert writer(rid, env, result_for(env), RCPT, FakeStack("acme/_mail", hints),
                  message=staged if staged is not None else message)


def folder_bytes(root: Path, name: str) -> dict[str, bytes]:
    folder = root / "requests" / name
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def without_times(files: dict[str, bytes]) -> dict[str, Any]:
    """The files of a trace with the wall-clock fields (time, elapsed) taken out."""
    import json

    out: dict[str, Any] = dict(files)
    lines = [json.loads(line) for line in files["trace.jsonl"].splitlines()]
    for line in lines:
        line.get("summary", {}).pop("time", None)
    out["trace.jsonl"] = lines
    return out


def test_the_file_process_writes_what_the_thread_writes(tmp_path: Path) -> None:
    big = b"Subject: big\r\n\r\n" + b"x" * STAGE_FROM_BYTES
    small = b"Subject: small\r\n\r\nhello\r\n"
    written: dict[bool, dict[str, Any]] = {}
    for own in (False, True):
        root = tmp_path / str(own)
        writer = TraceWriter(root, file_process=own)
        try:
            assert (writer._process is not None) is own
            send(writer, "plain", message=small)
            send(writer, "scrubbed", hints=HINTS, message=small)
            send(writer, "staged", message=big)  # a staged message: linked, not piped
            assert writer.flush()
            stats = writer.stats()
        finally:
            writer.close()
        assert stats.written == 3 and stats.failed == 0
        written[own] = {name: without_times(folder_bytes(root, name)) for name in trace_names(root)}
    assert written[True] == written[False]
    assert set(written[True]) == {"plain", "scrubbed", "staged"}
    assert read_message(tmp_path / "True", "staged") == big


def test_a_large_message_in_errors_mode_goes_by_file_not_through_the_pipe(tmp_path: Path) -> None:
    big = b"Subject: big\r\n\r\n" + b"y" * (2 << 20)
    writer = TraceWriter(tmp_path, mode="errors", file_process=True)
    try:
        env = envelope()
        assert writer("err", env, result_for(env), [("a@acme.example", "451 4.3.0 later")],
                      FakeStack("acme/_mail", ()), message=big)
        assert writer.flush()
    finally:
        writer.close()
    assert read_message(tmp_path, "err") == big
    leftovers = [p.name for p in (tmp_path / "requests").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the staging file went once the process had linked it


def test_retention_runs_in_the_file_process(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, keep_count=2, file_process=True)
    try:
        for n in range(5):
            send(writer, f"r{n}")
            assert writer.flush()
        stats = writer.stats()
    finally:
        writer.close()
    assert trace_names(tmp_path) == ["r3", "r4"]
    assert (stats.written, stats.pruned) == (5, 3)


def test_close_waits_for_the_file_process_and_ends_it(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, file_process=True)
    process = writer._process
    assert process is not None
    for n in range(20):
        send(writer, f"r{n:02d}")
    writer.close()  # no flush first: close writes what is queued
    assert len(trace_names(tmp_path)) == 20
    assert process._proc.poll() == 0


def test_a_killed_file_process_leaves_the_writing_to_the_thread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = TraceWriter(tmp_path, file_process=True, log_interval_s=0)
    try:
        send(writer, "before")
        assert writer.flush()
        process = writer._process
        assert process is not None
        process._proc.kill()
        process._proc.wait()
        with caplog.at_level(logging.WARNING, logger="txcl.trace"):
            for n in range(3):
                send(writer, f"after{n}")
                assert writer.flush()
        assert writer._process is None
        stats = writer.stats()
    finally:
        writer.close()
    names = trace_names(tmp_path)
    assert "before" in names and {"after1", "after2"} <= set(names)
    assert stats.written + stats.failed == 4
    assert "file process ended" in caplog.text


def test_a_failure_in_the_file_process_is_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "requests").write_text("a file where the folder goes")
    writer = TraceWriter(tmp_path, file_process=True, log_interval_s=0)
    try:
        with caplog.at_level(logging.WARNING, logger="txcl.trace"):
            send(writer, "lost")
            assert writer.flush()
        stats = writer.stats()
    finally:
        writer.close()
    assert (stats.written, stats.failed) == (0, 1)
    assert "cannot write lost" in caplog.text


def test_the_file_process_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    """A worker killed with SIGKILL leaves no file process behind: it writes what reached
    it and ends when the pipe closes."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from txcl.trace_writer import TraceWriter
        writer = TraceWriter({str(tmp_path)!r}, file_process=True)
        print(writer._process._proc.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 10
    while not _ignores(child, signal.SIGTERM) and time.monotonic() < deadline:
        time.sleep(0.02)  # until it has started
    os.kill(child, signal.SIGTERM)  # ignored: its parent's signal, not its own
    time.sleep(0.2)
    assert _alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def _ignores(pid: int, number: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) >> (number - 1) & 1)
    return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_serve_writes_frames_split_across_reads_and_answers_each_read(tmp_path: Path) -> None:
    """The process side on its own: frames arrive in arbitrary pieces; each read that
    completes frames is answered with the last one done and the counts."""
    stored = StoredTraces(tmp_path / "requests", keep_count=10, keep_age_s=3600, keep_bytes=1 << 20)
    data = b"".join(
        b"".join(frame(TRACE, seq, f"r{seq}", [b'{"summary":{}}\n'], b"msg %d" % seq))
        for seq in (1, 2, 3)
    )
    to_read, to_write = os.pipe()
    answers_read, answers_write = os.pipe()
    pieces = [data[:HEADER.size - 3], data[HEADER.size - 3 : len(data) // 2], data[len(data) // 2 :]]
    server = threading.Thread(target=serve, args=(stored, 3600, to_read, answers_write))
    server.start()
    for piece in pieces:
        os.write(to_write, piece)
        time.sleep(0.05)  # each piece a read of its own
    os.close(to_write)
    server.join(10)
    assert not server.is_alive()
    os.close(answers_write)
    answers = os.read(answers_read, 4096).decode().splitlines()
    assert [a.split(" ")[:4] for a in answers] == [["1", "1", "0", "0"], ["3", "3", "0", "0"]]
    assert sorted(trace_names(tmp_path)) == ["r1", "r2", "r3"]
    assert read_message(tmp_path, "r2") == b"msg 2"
    assert read_trace(tmp_path, "r3")["summary"] == {}


def test_a_stalled_file_process_never_holds_up_deliveries(tmp_path: Path) -> None:
    """A trace disk that hangs (here: the file process stopped) costs traces, counted, never
    a delivery's time: every run is handed over at once on the event loop, the queue's byte
    budget runs out and further traces are dropped; once the process goes on, what was
    queued is written."""
    import asyncio

    writer = TraceWriter(tmp_path, file_process=True, queue_bytes=4 << 20, log_interval_s=3600)
    process = writer._process
    assert process is not None
    message = b"Subject: x\r\n\r\n" + b"y" * 1000 + b"\r\n"
    total = 1500

    async def deliveries() -> None:
        for n in range(total):
            env = envelope()
            writer(f"r{n:05d}", env, result_for(env), RCPT, FakeStack("acme/_mail", ()),
                   message=message)
            if n % 20 == 0:
                await asyncio.sleep(0.001)  # let the loop's turns, and the hand-overs, run

    os.kill(process._proc.pid, signal.SIGSTOP)
    try:
        signal.alarm(120)  # a hang fails the test instead of the suite
        asyncio.run(deliveries())
        dropped = writer.stats().dropped
    finally:
        os.kill(process._proc.pid, signal.SIGCONT)
        signal.alarm(0)
    try:
        assert writer.flush(60)
        stats = writer.stats()
    finally:
        writer.close()
    assert dropped > 0
    assert stats.written + stats.dropped == total and stats.failed == 0
    assert len(trace_names(tmp_path)) == min(stats.written, 1000)  # --trace-keep


def archived_run(env: dict[str, Any], path: Path, size: int) -> Any:
    """A run whose ARCHIVE stored the message at `path`."""
    import dataclasses

    from txcl.records import ExecRecord

    result = result_for(env)
    archive = ExecRecord(0, result.steps[0].pos, op="ARCHIVE", executed=True,
                         patch={"archive": {"path": str(path), "size": size}})
    return dataclasses.replace(result, steps=(*result.steps, archive))


@pytest.mark.parametrize("own", [False, True], ids=["thread", "file-process"])
def test_a_large_archived_message_is_linked_from_its_maildir_copy(tmp_path: Path, own: bool) -> None:
    message = b"Subject: big\r\n\r\n" + b"z" * (100 << 10)
    maildir = tmp_path / "var" / "tenants" / "acme" / "_mail" / "Maildir"  # where ARCHIVE puts it
    for sub in ("new", "cur"):
        (maildir / sub).mkdir(parents=True)
    delivered = {}
    for name in ("stays", "read", "deleted"):
        delivered[name] = maildir / "new" / f"1700000000.{name}.host"
        delivered[name].write_bytes(message)
    delivered["read"].rename(maildir / "cur" / f"{delivered['read'].name}:2,S")  # a client read it
    delivered["deleted"].unlink()  # and this one was deleted at once
    writer = TraceWriter(tmp_path / "var", file_process=own, log_interval_s=0)
    try:
        for name, path in delivered.items():
            env = envelope()
            assert writer(name, env, archived_run(env, path, len(message)), RCPT,
                          FakeStack("acme/_mail", ()), message=message)
        assert writer.flush()
        stats = writer.stats()
    finally:
        writer.close()
    requests = tmp_path / "var" / "requests"
    assert os.path.samefile(requests / "stays" / "message.eml", delivered["stays"])
    assert os.path.samefile(requests / "read" / "message.eml",
                            maildir / "cur" / f"{delivered['read'].name}:2,S")
    assert (stats.written, stats.failed) == (3, 0)
    assert read_message(tmp_path / "var", "stays") == message
    # deleted before the trace was written: the trace is kept, without its message
    assert not (requests / "deleted" / "message.eml").exists()
    assert read_trace(tmp_path / "var", "deleted")["summary"]["rid"] == "deleted"


def test_a_scrubbed_or_small_message_is_written_not_linked(tmp_path: Path) -> None:
    big = b"Subject: big\r\nAuthorization: Bearer sk-live-0123456789\r\n\r\n" + b"z" * (100 << 10)
    small = b"Subject: small\r\n\r\nhi\r\n"
    maildir = tmp_path / "var" / "tenants" / "acme" / "_mail" / "Maildir" / "new"
    maildir.mkdir(parents=True)
    writer = TraceWriter(tmp_path / "var")
    try:
        for rid, message, hints in (("scrubbed", big, HINTS_REDACT_AUTH), ("small", small, ())):
            copy = maildir / rid
            copy.write_bytes(message)
            env = envelope()
            writer(rid, env, archived_run(env, copy, len(message)), RCPT,
                   FakeStack("acme/_mail", hints), message=message)
        assert writer.flush()
    finally:
        writer.close()
    requests = tmp_path / "var" / "requests"
    for rid in ("scrubbed", "small"):
        assert not os.path.samefile(requests / rid / "message.eml", maildir / rid)
    assert b"sk-live" not in (requests / "scrubbed" / "message.eml").read_bytes()
    assert (requests / "small" / "message.eml").read_bytes() == small


def test_an_archive_result_naming_a_file_outside_the_state_dir_is_not_linked(tmp_path: Path) -> None:
    """Only a file under the server's state dir is linked into a trace: an op's result that
    names another (here: a stand-in for a system file) leaves the message written as bytes."""
    message = b"Subject: big\r\n\r\n" + b"z" * (100 << 10)
    elsewhere = tmp_path / "elsewhere" / "new" / "1700000000.x.host"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_bytes(message)
    writer = TraceWriter(tmp_path / "var")
    try:
        env = envelope()
        writer("outside", env, archived_run(env, elsewhere, len(message)), RCPT,
               FakeStack("acme/_mail", ()), message=message)
        assert writer.flush()
    finally:
        writer.close()
    stored = tmp_path / "var" / "requests" / "outside" / "message.eml"
    assert stored.read_bytes() == message and not os.path.samefile(stored, elsewhere)


def test_the_file_process_writes_what_reached_it_when_its_answers_cannot_be_read(
    tmp_path: Path,
) -> None:
    """Its parent gone (the answer pipe has no reader), the process still writes every frame
    that reached it, across reads, instead of dying at its first answer."""
    stored = StoredTraces(tmp_path / "requests", keep_count=10, keep_age_s=3600, keep_bytes=1 << 20)
    to_read, to_write = os.pipe()
    answers_read, answers_write = os.pipe()
    os.close(answers_read)
    server = threading.Thread(target=serve, args=(stored, 3600, to_read, answers_write))
    server.start()
    for seq in (1, 2, 3, 4):
        os.write(to_write, b"".join(frame(TRACE, seq, f"r{seq}", [b'{"summary":{}}\n'], b"m")))
        time.sleep(0.05)  # each frame a read of its own
    os.close(to_write)
    server.join(10)
    assert not server.is_alive()
    os.close(answers_write)
    assert sorted(trace_names(tmp_path)) == ["r1", "r2", "r3", "r4"]


def test_a_stuck_file_process_fails_a_send_instead_of_hanging_it(tmp_path: Path) -> None:
    """A process that takes nothing (stopped, or stuck on a dead disk) makes a send fail
    after its timeout; the traces it never confirmed are counted lost, each once."""
    process = TraceProcess.start(tmp_path / "requests", 100, 3600.0, 1 << 30, 3600.0)
    os.kill(process._proc.pid, signal.SIGSTOP)
    try:
        for n in range(3):  # more than the pipe holds
            process.store(f"r{n}", [b'{"summary":{}}\n'], b"x" * (700 << 10))
        with pytest.raises(TimeoutError):
            process.send(timeout=1.0)
    finally:
        os.kill(process._proc.pid, signal.SIGCONT)
    assert process.abandon() == 3
    assert process._proc.poll() is not None  # killed, not left stopped
