"""The trace writer's file process: trace folders written by a process of their own.

A serving process's trace thread builds each trace (scrub, explain, encode: interpreter
work) and hands the bytes to this process through a pipe, a batch at a time, with one
write; this process makes the folders (`txcl.trace_files.StoredTraces`: write, reuse,
prune). The dozen file-system calls of a trace then never hand the serving process's
interpreter lock back and forth with its event loop. `TraceProcess.start` runs its `main`
in an interpreter of its own (`python -I -S`: no site-packages scan, and only what this
module and `txcl.trace_files` import: a few MB); it ends when its pipe closes, once it has
written what it was given, and ignores SIGINT, SIGTERM and SIGHUP, which are its parent's
to handle.

The pipe carries frames: a header (`HEADER`), then the folder name, the trace's lines,
and the message (its bytes, or the path of a staged message's file). After each read that
completes frames, the process answers one line: the sequence number of the last frame it
finished, its counts (written, failed, pruned) and its last error.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import signal
import struct
import sys
import time

from txcl.trace_files import StagedFile, StoredTraces

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (txcl.trace_files)
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Sequence
    from pathlib import Path
    from typing import IO, Final, Protocol

    from txcl.trace_files import StoredMessage

    class Staged(Protocol):
        """A message in a file of its own (`txcl.trace_store.StagedMessage`, once written)."""

        path: str | None
        size: int

# kind, sequence number, and the lengths of the name, the lines and the message part;
# for a staged message the message part is its file's path, and `size` its bytes.
HEADER: Final = struct.Struct("<cQIIQQ")
TRACE: Final = b"T"  # the message part is the bytes (or empty: no message)
LINKED: Final = b"L"  # the message part is the path of a staged message's file
MAILDIR: Final = b"M"  # the message part is the path of ARCHIVE's copy, in a Maildir's new/
SYNC: Final = b"S"  # nothing to write: answer once everything before it is done
READ_BYTES: Final = 1 << 20
# How `TraceProcess.start` runs `main`: argv[1] is the folder that holds the txcl package.
_MAIN: Final = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from txcl.trace_process import main; sys.exit(main(sys.argv[1:]))"
)
PIPE_BYTES: Final = 1 << 20  # asked of the kernel for the pipe to the process
# A send fails (the process is taken for stuck, killed, and the serving process writes its
# traces itself) when the pipe takes nothing for this long.
SEND_TIMEOUT_S: Final = 60.0


def frame(kind: bytes, seq: int, name: str = "", lines: Sequence[bytes] = (),
          message: bytes = b"", size: int = 0) -> list[bytes]:
    """The buffers of one frame, ready for `os.writev`."""
    encoded = name.encode("utf-8", "surrogateescape")
    body = sum(map(len, lines))
    return [HEADER.pack(kind, seq, len(encoded), body, len(message), size), encoded,
            *lines, message]


# --- the process ---------------------------------------------------------------------------


def serve(stored: StoredTraces, prune_interval_s: float, source: int = 0, answers: int = 1) -> None:
    """Write the traces framed on `source` until it closes, answering on `answers`; prune
    every `prune_interval_s` seconds."""
    written_before = stored.written
    failed, error, done = 0, "", 0
    buffer = bytearray()
    next_prune = time.monotonic() + prune_interval_s
    while True:
        start, finished = 0, False
        while len(buffer) - start >= HEADER.size:
            kind, seq, name_len, lines_len, message_len, size = HEADER.unpack_from(buffer, start)
            end = start + HEADER.size + name_len + lines_len + message_len
            if len(buffer) < end:
                break
            at = start + HEADER.size
            name = buffer[at : at + name_len].decode("utf-8", "surrogateescape")
            at += name_len
            lines = bytes(buffer[at : at + lines_len])
            at += lines_len
            part = bytes(buffer[at:end])
            message: StoredMessage | None = (
                StagedFile(os.fsdecode(part), size, maildir=kind == MAILDIR)
                if kind in (LINKED, MAILDIR) else part or None
            )
            if kind != SYNC:
                try:
                    stored.store(name, [lines], message)
                except Exception as err:  # OSError, mostly: that trace is lost, not the rest
                    failed, error = failed + 1, f"cannot write {name}: {err}"
            start, done, finished = end, seq, True
        del buffer[:start]
        if finished and answers >= 0:
            written = stored.written - written_before
            line = f"{done} {written} {failed} {stored.pruned} {error}".replace("\n", " ")
            try:
                os.write(answers, line.encode("utf-8", "replace") + b"\n")
            except OSError:  # the parent is gone: write what reached the pipe all the same
                answers = -1
        wait = max(0.0, next_prune - time.monotonic())
        if not select.select([source], [], [], wait)[0]:
            next_prune = time.monotonic() + prune_interval_s
            try:
                stored.prune()
            except OSError as err:
                error = f"cannot prune {stored.root}: {err}"
            continue
        chunk = os.read(source, READ_BYTES)
        if not chunk:
            return
        buffer += chunk


def main(argv: Sequence[str]) -> int:
    """The file process: `ROOT KEEP_COUNT KEEP_AGE_S KEEP_BYTES PRUNE_INTERVAL_S` (also runs as
    `python -m txcl.trace_process ...`)."""
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    root, keep_count, keep_age_s, keep_bytes, prune_interval_s = argv
    stored = StoredTraces(root, int(keep_count), float(keep_age_s), int(keep_bytes))
    serve(stored, float(prune_interval_s))
    return 0


# --- the serving process's end ---------------------------------------------------------------


class TraceProcess:
    """The serving process's end of the file process: frames gathered per batch and sent
    with one write (`send`), its answers read as they come. Used from one thread (the trace
    writer's); OSError from `send` or `sync` means the process is gone (`abandon`)."""

    def __init__(self, proc: subprocess.Popen[bytes], to_process: int, from_process: int) -> None:
        self._proc = proc
        self._to = to_process
        self._from = from_process
        self._pending: list[bytes] = []
        self.pending_bytes = 0
        self._pending_traces: list[int] = []  # the numbers of the traces gathered
        self._seq = 0  # the last frame's number
        self.done = 0  # the last frame the process finished
        self.written = self.failed = self.pruned = 0
        self.error = ""
        self._partial = b""
        self._held: collections.deque[tuple[int, Staged]] = collections.deque()
        self._unconfirmed: collections.deque[int] = collections.deque()  # traces sent, not done

    @classmethod
    def start(cls, root: Path, keep_count: int, keep_age_s: float, keep_bytes: int,
              prune_interval_s: float) -> TraceProcess:
        """Start the process for the traces under `root`. OSError if it cannot be started."""
        import subprocess  # only the serving process's end needs it

        # -I -S: no site-packages scan, no environment; the package is found where this one
        # was loaded from, so the process runs the same code.
        home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        argv = [sys.executable, "-I", "-S", "-c", _MAIN, home, os.fspath(root), str(keep_count),
                repr(float(keep_age_s)), str(keep_bytes), repr(float(prune_interval_s))]
        # A session of its own: a terminal's ^C reaches the server, which closes the pipe.
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                close_fds=True, start_new_session=True)
        assert proc.stdin is not None and proc.stdout is not None
        to_process, from_process = proc.stdin.fileno(), proc.stdout.fileno()
        with contextlib.suppress(OSError, AttributeError):  # fewer wake-ups per batch
            import fcntl

            fcntl.fcntl(to_process, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        os.set_blocking(from_process, False)
        os.set_blocking(to_process, False)  # a stuck process never holds a send for ever
        return cls(proc, to_process, from_process)

    def store(self, name: str, lines: Sequence[bytes], message: bytes | None,
              staged: Staged | StagedFile | None = None) -> None:
        """Queue one trace for the next `send`. `staged`: a written staged message, linked by
        the process (its file stays while held here, until the process is done with it)."""
        self._seq += 1
        if isinstance(staged, StagedFile):  # a file of its own, not held here
            kind = MAILDIR if staged.maildir else LINKED
            self._pending += frame(kind, self._seq, name, lines, os.fsencode(staged.path),
                                   staged.size)
        elif staged is not None and staged.path is not None:
            path = os.fsencode(staged.path)
            self._pending += frame(LINKED, self._seq, name, lines, path, staged.size)
            self._held.append((self._seq, staged))
        else:
            self._pending += frame(TRACE, self._seq, name, lines, message or b"")
        self._pending_traces.append(self._seq)
        self.pending_bytes += HEADER.size + len(name) + sum(map(len, lines)) + len(message or b"")

    def send(self, timeout: float = SEND_TIMEOUT_S) -> None:
        """Write what `store` gathered (one write, unless the pipe is full: then the answers
        are read while it drains), then read the answers that came meanwhile. TimeoutError
        (an OSError) when the process takes nothing for `timeout` seconds: it is stuck."""
        if self._pending:
            buffers, self._pending, self.pending_bytes = self._pending, [], 0
            self._unconfirmed.extend(self._pending_traces)
            self._pending_traces = []
            self._write_all(buffers, timeout)
        self._read_answers()

    def sync(self, timeout: float) -> bool:
        """Send what is gathered and wait until the process has done it all. True if in time."""
        self._seq += 1
        self._pending += frame(SYNC, self._seq)
        self.send(timeout)
        deadline = time.monotonic() + timeout
        while self.done < self._seq:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([self._from], [], [], left)
            self._read_answers()
        return True

    def close(self, timeout: float) -> int:
        """Send what is gathered, close the pipe and wait for the process to write it all and
        end (killed when it does not in time). The traces it did not confirm: lost."""
        try:
            finished = self.sync(timeout)
        except OSError:
            finished = False
        with contextlib.suppress(OSError):
            self._close(self._proc.stdin)
        with contextlib.suppress(Exception):  # subprocess.TimeoutExpired: stuck on the disk
            self._proc.wait(timeout if finished else 0.1)
        with contextlib.suppress(OSError):
            self._read_answers()
        return self.abandon()

    def abandon(self) -> int:
        """Kill the process (gone, or stuck); the traces it did not confirm, now lost."""
        with contextlib.suppress(OSError):
            self._proc.kill()
        with contextlib.suppress(Exception):
            self._proc.wait(5)
        for pipe in (self._proc.stdin, self._proc.stdout):
            with contextlib.suppress(OSError):
                self._close(pipe)
        lost = len(self._pending_traces) + sum(seq > self.done for seq in self._unconfirmed)
        self._pending, self._pending_traces, self.pending_bytes = [], [], 0
        self._unconfirmed.clear()
        self._held.clear()
        return lost

    def _write_all(self, buffers: list[bytes], timeout: float) -> None:
        """All of `buffers` into the pipe, reading the answers whenever it is full (the
        process may be waiting to answer before it reads on)."""
        views = [memoryview(b) for b in buffers if b]
        first = 0
        deadline = time.monotonic() + timeout
        while first < len(views):
            try:
                sent = os.writev(self._to, views[first : first + 1024])  # IOV_MAX
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the trace file process takes nothing") from None
                readable, _, _ = select.select([self._from], [self._to], [], left)
                if readable:
                    self._read_answers()
                continue
            deadline = time.monotonic() + timeout
            while sent:
                if sent >= len(views[first]):
                    sent -= len(views[first])
                    first += 1
                else:
                    views[first], sent = views[first][sent:], 0

    @staticmethod
    def _close(pipe: IO[bytes] | None) -> None:
        """Close one end of the pipes through its file object, which owns the descriptor."""
        if pipe is not None:
            pipe.close()

    def _read_answers(self) -> None:
        """Read the answers that came; BrokenPipeError once the process has ended (what it
        answered before is read first)."""
        ended = False
        while True:
            try:
                chunk = os.read(self._from, 65536)
            except BlockingIOError:
                break
            if not chunk:
                ended = True
                break
            self._partial += chunk
        *lines, self._partial = self._partial.split(b"\n")
        for line in lines:
            done, written, failed, pruned, error = line.decode("utf-8", "replace").split(" ", 4)
            self.done, self.written, self.failed = int(done), int(written), int(failed)
            self.pruned, self.error = int(pruned), error
        while self._held and self._held[0][0] <= self.done:
            self._held.popleft()
        while self._unconfirmed and self._unconfirmed[0] <= self.done:
            self._unconfirmed.popleft()
        if ended:
            raise BrokenPipeError("the trace file process ended")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
