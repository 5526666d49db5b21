"""`TraceWriter`: stores trace records under `<state-dir>/requests/` from a background thread.

Writing never slows or fails the caller: `TraceWriter.__call__` only checks the mode and
enqueues references (the envelope, the result, the message bytes — nothing is copied or
serialised on the caller's side). The queue is bounded in records and in bytes (the
message sizes it holds alive): a message over the per-trace limit, or one the byte budget
has no room for, is let go at once and the trace queued without it (its summary says so);
when the queue is full even so, the trace is dropped and counted. The worker
thread scrubs and encodes, and writes (`txcl.trace_files.StoredTraces`: the folders, kept
within their count, age and total bytes); with `file_process` (the server's choice) it
hands each batch's bytes to a process of its own that does the writing
(`txcl.trace_process`), so the file system's calls do not contend with the event loop for
the interpreter lock. One trace over the per-trace limit keeps its summary,
result and replies and says what was cut. An I/O error loses that trace, is counted, and is
logged at most once per interval.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from txcl.builtin_ops.archive import OP as ARCHIVE
from txcl.builtin_ops.archive import archived_file
from txcl.records import ExecRecord
from txcl.trace import (
    TRACE_MODES,
    TraceMode,
    TraceRecord,
    build_artifacts,
    hints_of,
    reply_code,
)
from txcl.trace_files import StagedFile, StoredTraces
from txcl.trace_process import TraceProcess
from txcl.trace_store import (
    MessageBytes,
    StagedMessage,
    encode,
    encode_parts,
    requests_root,
    safe_rid,
)

log = logging.getLogger("txcl.trace")

DEFAULT_KEEP_COUNT: Final = 1000
DEFAULT_KEEP_AGE_S: Final = 7 * 86400.0
DEFAULT_KEEP_BYTES: Final = 1 << 30
DEFAULT_MAX_TRACE_BYTES: Final = 32 << 20
DEFAULT_QUEUE_SIZE: Final = 1024
DEFAULT_QUEUE_BYTES: Final = 64 << 20
# How long the writer lets records gather once it has written all it had.
DEFAULT_BATCH_WAIT_S: Final = 0.02
# A record with a message above this is written at once, not after the wait.
HURRY_MESSAGE_BYTES: Final = 1 << 20
# What a queued record holds alive besides its message: the envelope, result and replies.
RECORD_OVERHEAD: Final = 16 << 10
# Messages from this size on are staged (`TraceWriter.stage`) when every run is traced.
STAGE_FROM_BYTES: Final = 1 << 20
# How long the trace thread waits for a message still being staged when its trace comes.
STAGE_FINISH_S: Final = 60.0
# How long the trace thread waits for the file process to confirm a flush.
SYNC_WAIT_S: Final = 30.0
# Traces built on the event loop are handed to the thread once they hold this many bytes
# (or once the batch wait has passed).
HAND_OVER_BYTES: Final = 256 << 10


Stored = MessageBytes | StagedFile
"""What a trace stores as its message: the bytes, the staged file, or ARCHIVE's copy."""
# From this size on, a message ARCHIVE stored unchanged is linked from its Maildir copy
# into the trace, not written a second time.
LINK_ARCHIVED_FROM: Final = 64 << 10


def archived_copy(result: Any, size: int, state_dir: str) -> StagedFile | None:
    """The file in which this run's ARCHIVE stored the message (`size` bytes), if it did,
    under `state_dir` (a path an op's result names elsewhere is never linked into a trace)."""
    for step in getattr(result, "steps", None) or ():
        if step.__class__ is not ExecRecord or not step.executed or step.op != ARCHIVE.name:
            continue
        stored = archived_file(step.patch)
        if stored is not None and stored[1] == size and (
                os.path.abspath(stored[0]).startswith(state_dir + os.sep)):
            return StagedFile(stored[0], size, maildir=True)
    return None


@dataclass(frozen=True, slots=True)
class TraceStats:
    written: int
    dropped: int  # the queue was full
    skipped: int  # mode "errors" and the run was fine, or mode "off"
    failed: int  # I/O errors: the trace was lost
    pruned: int
    cut: int = 0  # written without some parts, to stay within the per-trace limit


def is_error(result: Any, replies: Sequence[tuple[str, str]], error: str = "") -> bool:
    """What `--trace=errors` keeps: a failed run, or any tempfail (4xx) reply. No result
    and no error is a routed stack that does not exist: default-deny, not an error."""
    if error or getattr(result, "error", None) is not None:
        return True
    return any((code := reply_code(line)) is not None and 400 <= code < 500 for _, line in replies)


def record_weight(message: MessageBytes | None) -> int:
    """The bytes a queued record holds alive, as the queue counts them: its message twice
    (the bytes, and what the run parsed out of them), and a fixed share for the rest. A
    staged message's bytes are counted by the staging until they are written."""
    if isinstance(message, StagedMessage):
        return RECORD_OVERHEAD + len(message)
    return RECORD_OVERHEAD + 2 * (len(message) if message is not None else 0)


def fit(
    parts: dict[str, Any],
    message: MessageBytes | None,
    limit: int,
    cut_before: Sequence[str] = (),
) -> tuple[list[bytes], MessageBytes | None, list[str]]:
    """The lines and message of one trace within `limit` bytes: the message goes first,
    then the envelope, then the steps; the summary, result and replies always stay, and
    the summary's `cut` says what went (after what `cut_before` says went already)."""
    cut = list(cut_before)
    if cut:
        parts["summary"]["cut"] = cut
    lines = encode_parts(parts)
    total = sum(map(len, lines)) + (len(message) if message is not None else 0)
    if total <= limit:
        return lines, message, cut
    if message is not None:
        cut.append(f"message ({len(message)} bytes)")
        total -= len(message)
        message = None
    emptied: tuple[tuple[int, str, dict[str, Any]], ...] = (
        (1, "envelope", {}),
        (2, "steps", {"fired": [], "steps": []}),
    )
    for index, name, keep in emptied:
        if total <= limit:
            break
        size = len(lines[index])
        cut.append(f"{name} ({size} bytes)")
        parts[name] = keep
        lines[index] = encode({name: keep}) + b"\n"
        total += len(lines[index]) - size
    parts["summary"]["cut"] = cut
    lines[0] = encode({"summary": parts["summary"]}) + b"\n"
    return lines, message, cut


class TraceWriter:
    """Writes trace records under `<state_dir>/requests/` from a background thread.

    Call it as a trace sink: `writer(rid, envelope_in, result, replies, stack, error=...,
    message=...)`. It returns at once; a full queue drops the record (`stats().dropped`).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        mode: TraceMode = "all",
        keep_count: int = DEFAULT_KEEP_COUNT,
        keep_age_s: float = DEFAULT_KEEP_AGE_S,
        keep_bytes: int = DEFAULT_KEEP_BYTES,
        max_trace_bytes: int = DEFAULT_MAX_TRACE_BYTES,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        prune_interval_s: float = 60.0,
        log_interval_s: float = 60.0,
        batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
        file_process: bool = False,
    ) -> None:
        if mode not in TRACE_MODES:
            raise ValueError(f"trace mode must be one of {', '.join(TRACE_MODES)}, not {mode!r}")
        self.root = requests_root(state_dir)
        self._state_dir = os.path.normpath(os.path.abspath(state_dir))
        self.mode: TraceMode = mode
        self.max_trace_bytes = max(1, int(max_trace_bytes))
        self.queue_bytes = max(1, int(queue_bytes))
        self.prune_interval_s = prune_interval_s
        self.log_interval_s = log_interval_s
        self.batch_wait_s = batch_wait_s
        self._hurry = threading.Event()  # ends the writer's wait for more records early
        self._queue: queue.Queue[TraceRecord | list[Any] | threading.Event | None] = (
            queue.Queue(queue_size))
        self._queued_bytes = 0
        self._counts = dict.fromkeys(("dropped", "skipped", "failed", "cut"), 0)
        self._lock = threading.Lock()
        self._stored = StoredTraces(self.root, keep_count, keep_age_s, keep_bytes)
        self._process: TraceProcess | None = None
        self._last_prune = 0.0
        self._last_log = -1e18
        self._thread: threading.Thread | None = None
        # With a file process, a run traced on an event loop is built there, a turn later,
        # and the thread only hands the bytes over (`_gather`): a thread that builds
        # contends with the loop for the interpreter lock at every system call either makes.
        self._builds_on_loop = file_process
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gathered: list[tuple[TraceRecord, int]] = []  # (record, weight): to build
        self._built: list[tuple[str, list[bytes], Stored | None, int]] = []  # to hand over
        self._built_bytes = 0
        self._hand_timer: asyncio.TimerHandle | None = None
        if mode != "off" and file_process:
            try:
                self._process = TraceProcess.start(
                    self.root, keep_count, keep_age_s, keep_bytes, prune_interval_s)
            except OSError as err:  # no process to be had: this one's thread writes the files
                log.warning("trace: cannot start the file process (%s); writing traces here", err)
        if mode != "off":
            self._thread = threading.Thread(target=self._work, name="txcl-trace", daemon=True)
            self._thread.start()

    # -- the caller's side: cheap, never raises, never blocks ---------------------------

    def __call__(
        self,
        rid: str,
        envelope_in: Mapping[str, Any],
        result: Any,
        replies: Sequence[tuple[str, str]],
        stack: Any = None,
        error: str = "",
        message: MessageBytes | None = None,
    ) -> bool:
        """Queue one run for writing. True if queued. `message`: the bytes, or what `stage`
        made of them."""
        try:
            if self.mode == "off" or (
                self.mode == "errors" and not is_error(result, replies, error)
            ):
                self._count("skipped")
                return False
            cut: tuple[str, ...] = ()
            if message is not None and len(message) > self.max_trace_bytes:
                cut, message = (f"message ({len(message)} bytes)",), None
            weight = record_weight(message)
            with self._lock:
                if message is not None and self._queued_bytes + weight > self.queue_bytes:
                    # Keep the summary and verdicts; let the message go.
                    cut = (f"message ({len(message)} bytes, the trace queue was full)",)
                    message, weight = None, record_weight(None)
                full = self._queued_bytes + weight > self.queue_bytes
                if not full:
                    self._queued_bytes += weight
            if full:
                raise queue.Full
            record = TraceRecord(
                rid=rid,
                time=time.time(),
                envelope=envelope_in,
                result=result,
                replies=tuple(replies),
                stack=str(getattr(stack, "name", "") or (stack if isinstance(stack, str) else "")),
                hints=hints_of(getattr(stack, "hints", None)),
                error=error,
                message=message,
                cut=cut,
            )
            if self._builds_on_loop and (message is None or (
                    message.__class__ is bytes and len(message) <= HURRY_MESSAGE_BYTES)):
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    pass
                else:
                    self._gather(loop, record, weight)
                    return True
            try:
                self._queue.put_nowait(record)
                if message is not None and len(message) > HURRY_MESSAGE_BYTES:
                    self._hurry.set()  # a big message is not held alive a moment longer
            except queue.Full:
                self._release(weight)
                raise
            return True
        except queue.Full:
            self._count("dropped")
            self._log_loss("trace queue full; dropping traces")
            return False
        except Exception:  # a trace must never fail a delivery
            self._count("failed")
            log.exception("trace: could not queue %s", rid)
            return False

    def stage(self, message: bytes) -> StagedMessage | None:
        """Start writing a large message to a file now, in a thread of its own, while its
        stacks run, when every run is traced: its traces then hold the file, not the
        bytes, and the delivery awaits `written()` before it answers, so the next message
        never arrives beside this one. None (the trace takes the bytes, as without
        staging): mode not `all`, a message below STAGE_FROM_BYTES or above the per-trace
        limit, or no room in the queue's byte budget."""
        size = len(message)
        if self.mode != "all" or not STAGE_FROM_BYTES <= size <= self.max_trace_bytes:
            return None
        with self._lock:
            if self._queued_bytes + size > self.queue_bytes:
                return None
            self._queued_bytes += size
        staged = StagedMessage(message)
        try:
            threading.Thread(target=self._stage, args=(staged,), daemon=True).start()
        except RuntimeError:  # no thread to be had: the trace takes the bytes
            self._release(size)
            return None
        return staged


    def stats(self) -> TraceStats:
        with self._lock:
            counts = dict(self._counts)
        process, stored = self._process, self._stored
        written, pruned = stored.written, stored.pruned
        if process is not None:
            written, pruned = written + process.written, pruned + process.pruned
            counts["failed"] += process.failed
        return TraceStats(written=written, pruned=pruned, **counts)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written. True if it was in time."""
        if self._thread is None:
            return True
        self._hand_gathered(timeout)
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
            self._hurry.set()
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread (and the file process); log the counts
        if any trace lost parts or was lost. Called from the event loop's thread, or once
        the loop has stopped, when runs were traced on one."""
        if self._thread is None:
            return
        self._hand_gathered(timeout)
        try:
            self._queue.put(None, timeout=timeout)
            self._hurry.set()
        except queue.Full:
            return
        self._thread.join(timeout)
        self._thread = None
        stats = self.stats()
        if stats.dropped or stats.failed or stats.cut:  # a loss the operator should hear of
            log.info(
                "trace: %d written (%d cut to fit), %d dropped, %d failed, %d pruned",
                stats.written, stats.cut, stats.dropped, stats.failed, stats.pruned,
            )

    # -- the event loop's side, with a file process: build, then hand over ----------------

    def _gather(self, loop: asyncio.AbstractEventLoop, record: TraceRecord, weight: int) -> None:
        if loop is not self._loop:  # a new loop: a timer of the old one will never run
            self._loop, self._hand_timer = loop, None
        self._gathered.append((record, weight))
        if len(self._gathered) == 1:
            loop.call_soon(self._build_gathered)

    def _build_gathered(self) -> None:
        """Build the gathered records (after the replies of their turn went out); hand them
        to the thread when they are many bytes, else after the batch wait."""
        gathered, self._gathered = self._gathered, []
        for record, weight in gathered:
            try:
                name, lines, message = self._build(record)
            except Exception:
                self._release(weight)
                self._count("failed")
                log.exception("trace: cannot build the trace of %s", record.rid)
                continue
            self._built.append((name, lines, message, weight))
            self._built_bytes += sum(map(len, lines)) + (
                len(message) if isinstance(message, bytes) else 0)
        del gathered
        if self._built_bytes >= HAND_OVER_BYTES:
            self._hand_built()
        elif self._built and self._hand_timer is None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: close() hands them
                self._hand_timer = self._loop.call_later(self.batch_wait_s, self._hand_built)

    def _hand_built(self) -> None:
        if self._hand_timer is not None:
            self._hand_timer.cancel()
            self._hand_timer = None
        built, self._built, self._built_bytes = self._built, [], 0
        if not built:
            return
        try:
            self._queue.put_nowait(built)
        except queue.Full:
            for *_, weight in built:
                self._release(weight)
            self._count("dropped", len(built))
            self._log_loss("trace queue full; dropping traces")

    def _hand_gathered(self, timeout: float) -> None:
        """Build and hand over what the event loop gathered, now: in the loop's thread, or
        through the loop while it runs in another."""
        loop = self._loop
        if loop is None or not (self._gathered or self._built):
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop or not loop.is_running():
            self._build_gathered()
            self._hand_built()
            return
        handed = threading.Event()

        def hand() -> None:
            self._build_gathered()
            self._hand_built()
            handed.set()

        with contextlib.suppress(RuntimeError):  # closed meanwhile
            loop.call_soon_threadsafe(hand)
            handed.wait(timeout)

    # -- the worker's side ----------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _release(self, weight: int) -> None:
        with self._lock:
            self._queued_bytes -= weight

    def _log_loss(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_log < self.log_interval_s:
                return
            self._last_log = now
        stats = self.stats()
        log.warning(
            "trace: " + message + " (so far: %d dropped, %d failed)",
            *args,
            stats.dropped,
            stats.failed,
        )

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.prune_interval_s)
            except queue.Empty:
                self._prune_safely()
                continue
            if item is None:
                self._end_process()
                return
            if isinstance(item, threading.Event):
                self._hand_over(SYNC_WAIT_S)
                item.set()
                continue
            if isinstance(item, list):  # built on the event loop
                for name, lines, message, weight in item:
                    try:
                        self._store(name, lines, message)
                    except OSError as err:
                        self._count("failed")
                        self._log_loss("cannot write %s under %s: %s", name, self.root, err)
                    except Exception:
                        self._count("failed")
                        log.exception("trace: cannot write the trace %s", name)
                    finally:
                        self._release(weight)
                    if self._process is not None and (
                            self._process.pending_bytes >= HAND_OVER_BYTES):
                        self._hand_over()  # what the budget let go leaves the process now
            else:
                try:
                    self.write(item)
                except OSError as err:
                    self._count("failed")
                    self._log_loss("cannot write %s under %s: %s", item.rid, self.root, err)
                except Exception:
                    self._count("failed")
                    log.exception("trace: cannot build the trace of %s", item.rid)
                finally:
                    self._release(record_weight(item.message))
            del item  # let the message go before waiting for the next record
            if time.monotonic() - self._last_prune >= self.prune_interval_s:
                self._prune_safely()
            if self._queue.empty():
                self._hand_over()
                # Let the next records gather: a thread waiting on the queue is woken for
                # every record, and the waking preempts the event loop while it holds the GIL.
                self._hurry.wait(self.batch_wait_s)
                self._hurry.clear()

    def _hand_over(self, sync_wait: float | None = None) -> None:
        """Send the file process what this batch gathered (and, with `sync_wait`, wait until
        it has written everything); hear of its failures. A process that is gone leaves the
        files to this thread from then on."""
        process = self._process
        if process is None:
            return
        failed, error = process.failed, process.error
        try:
            process.send()
            if sync_wait is not None:
                process.sync(sync_wait)
        except OSError as err:
            self._process = None
            with self._lock:  # what it counted stays counted
                self._counts["failed"] += process.failed + process.abandon()
            self._stored.written += process.written
            self._stored.pruned += process.pruned
            self._log_loss("the trace file process ended (%s); writing traces here", err)
            return
        if process.failed > failed or process.error != error:
            self._log_loss("%s", process.error)

    def _end_process(self) -> None:
        process = self._process
        lost = process.close(SYNC_WAIT_S) if process is not None else 0
        if lost:
            self._count("failed", lost)
            self._log_loss("the trace file process did not write %d traces under %s", lost,
                           self.root)

    def _stage(self, staged: StagedMessage) -> None:
        try:
            staged.write(self.root)
        finally:
            self._release(staged.size)
        if staged.error is not None:
            self._log_loss("cannot stage a message under %s: %s", self.root, staged.error)

    def write(self, record: TraceRecord) -> str:
        """Scrub, encode and write one record now (the worker calls this; so may tests).
        Returns the name of its folder under `root`; "" when the file process writes it
        (it is handed over with the thread's batch)."""
        return self._store(*self._build(record))

    def _build(self, record: TraceRecord) -> tuple[str, list[bytes], Stored | None]:
        """A record's folder name, its trace's lines and the message to store beside them."""
        staged = record.message
        if isinstance(staged, StagedMessage) and staged.path is None:
            with contextlib.suppress(concurrent.futures.TimeoutError):
                staged.done.result(STAGE_FINISH_S)  # its delivery stopped waiting for it
        if isinstance(staged, StagedMessage) and staged.path is None:
            record = dataclasses.replace(record, message=None, cut=(
                *record.cut, f"message ({staged.size} bytes, not staged: {staged.error})"))
        artifacts = build_artifacts(record)
        lines, message, cut = fit(
            artifacts.parts, artifacts.message, self.max_trace_bytes, record.cut
        )
        if cut:
            self._count("cut")
        if message is record.message and message.__class__ is bytes and (
                len(message) >= LINK_ARCHIVED_FROM):
            archived = archived_copy(record.result, len(message), self._state_dir)
            if archived is not None:
                return safe_rid(record.rid), lines, archived
        return safe_rid(record.rid), lines, message

    def _store(self, name: str, lines: list[bytes], message: Stored | None) -> str:
        """Write one trace here, or give it to the file process ("")."""
        process = self._process
        if process is None:
            return self._stored.store(name, lines, message)
        if isinstance(message, StagedMessage | StagedFile):
            process.store(name, lines, None, staged=message)
        elif message is not None and len(message) > HURRY_MESSAGE_BYTES:
            # Not staged (a trace mode other than "all"): put in a file here, not in the pipe.
            staged_here = StagedMessage(message)
            staged_here.write(self.root)
            if staged_here.error is not None:
                raise staged_here.error
            process.store(name, lines, None, staged=staged_here)
        else:
            process.store(name, lines, message)
        return ""

    def _prune_safely(self) -> None:
        self._last_prune = time.monotonic()
        if self._process is not None:
            return  # the file process prunes what it writes
        try:
            self._stored.prune()
        except OSError as err:
            self._log_loss("cannot prune %s: %s", self.root, err)

    def prune(self, now: float | None = None) -> int:
        """Remove traces beyond the count, the total bytes and the age they are kept for, and
        leftovers of interrupted writes, now (in this thread, not the file process's).
        Returns how many went."""
        self._last_prune = time.monotonic()
        return self._stored.prune(now)
