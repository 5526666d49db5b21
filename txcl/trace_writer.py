"""`TraceWriter`: stores trace records under `<state-dir>/requests/` from a background thread.

Writing never slows or fails the caller: `TraceWriter.__call__` only checks the mode and
enqueues references (the envelope, the result, the message bytes — nothing is copied or
serialised on the caller's side). The queue is bounded in records and in bytes (the
message sizes it holds alive): a message over the per-trace limit, or one the byte budget
has no room for, is let go at once and the trace queued without it (its summary says so);
when the queue is full even so, the trace is dropped and counted. The worker
thread scrubs, encodes and writes (`txcl.trace_store`), and keeps the stored traces within
their count, age and total bytes. One trace over the per-trace limit keeps its summary,
result and replies and says what was cut. An I/O error loses that trace, is counted, and is
logged at most once per interval.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from txcl.trace import (
    TRACE_MODES,
    TraceMode,
    TraceRecord,
    build_artifacts,
    hints_of,
    reply_code,
)
from txcl.trace_store import (
    TMP_PREFIX,
    MessageBytes,
    StagedMessage,
    encode,
    encode_parts,
    folder_size,
    mtime,
    private_folder,
    remove_trace,
    requests_root,
    reuse_trace,
    safe_rid,
    scan,
    write_trace,
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
# A temporary folder this old is the leftover of an interrupted write.
_STALE_WRITE_S: Final = 3600.0


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
    ) -> None:
        if mode not in TRACE_MODES:
            raise ValueError(f"trace mode must be one of {', '.join(TRACE_MODES)}, not {mode!r}")
        self.root = requests_root(state_dir)
        self.mode: TraceMode = mode
        self.keep_count = max(1, int(keep_count))
        self.keep_age_s = float(keep_age_s)
        self.keep_bytes = max(1, int(keep_bytes))
        self.max_trace_bytes = max(1, int(max_trace_bytes))
        self.queue_bytes = max(1, int(queue_bytes))
        self.prune_interval_s = prune_interval_s
        self.log_interval_s = log_interval_s
        self.batch_wait_s = batch_wait_s
        self._hurry = threading.Event()  # ends the writer's wait for more records early
        self._queue: queue.Queue[TraceRecord | threading.Event | None] = queue.Queue(queue_size)
        self._queued_bytes = 0
        self._counts = dict.fromkeys(("written", "dropped", "skipped", "failed", "pruned", "cut"), 0)
        self._lock = threading.Lock()
        # Stored traces, oldest first, as (folder name, bytes); loaded lazily.
        self._known: deque[tuple[str, int]] | None = None
        self._known_bytes = 0
        self._mine: set[str] = set()  # the known traces this writer wrote (reusable folders)
        self._root_ready = False
        self._last_prune = 0.0
        self._last_log = -1e18
        self._thread: threading.Thread | None = None
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
            return TraceStats(**self._counts)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written. True if it was in time."""
        if self._thread is None:
            return True
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
            self._hurry.set()
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread; log the counts if any trace lost parts
        or was lost."""
        if self._thread is None:
            return
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
            counts = dict(self._counts)
        log.warning(
            "trace: " + message + " (so far: %d dropped, %d failed)",
            *args,
            counts["dropped"],
            counts["failed"],
        )

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.prune_interval_s)
            except queue.Empty:
                self._prune_safely()
                continue
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self.write(item)
            except OSError as err:
                self._root_ready = False
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
                # Let the next records gather: a thread waiting on the queue is woken for
                # every record, and the waking preempts the event loop while it holds the GIL.
                self._hurry.wait(self.batch_wait_s)
                self._hurry.clear()

    def _stage(self, staged: StagedMessage) -> None:
        try:
            private_folder(self.root)
        except OSError as err:
            staged.error = err
            staged.abandon()
        else:
            staged.write(self.root)
        finally:
            self._release(staged.size)
        if staged.error is not None:
            self._log_loss("cannot stage a message under %s: %s", self.root, staged.error)

    def write(self, record: TraceRecord) -> str:
        """Scrub, encode and write one record now (the worker calls this; so may tests).
        Returns the name of its folder under `root`."""
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
        if not self._root_ready:
            private_folder(self.root)
            self._root_ready = True
        known = self._known_traces()  # before the folder exists: a first scan does not count it
        spare = self._spare(known)
        folder: str | None = None
        size = 0
        if spare is not None:
            with contextlib.suppress(FileNotFoundError):  # gone: write a new folder instead
                folder, size = reuse_trace(self.root, spare, safe_rid(record.rid), lines, message)
        if folder is None:
            folder, size = write_trace(self.root, safe_rid(record.rid), lines, message)
        self._count("written")
        if cut:
            self._count("cut")
        self._remember(folder, size)
        return folder

    def _spare(self, known: deque[tuple[str, int]]) -> str | None:
        """The oldest trace, when the count limit removes it on this write and this writer
        wrote it (so it holds only the files a trace has): its folder is reused."""
        if len(known) < self.keep_count or known[0][0] not in self._mine:
            return None
        name, size = known.popleft()
        self._known_bytes -= size
        self._mine.discard(name)
        self._count("pruned")
        return name

    def _remember(self, name: str, size: int) -> None:
        known = self._known_traces()
        known.append((name, size))
        self._mine.add(name)
        self._known_bytes += size
        while len(known) > self.keep_count or (
            self._known_bytes > self.keep_bytes and len(known) > 1
        ):
            old, old_size = known.popleft()
            self._known_bytes -= old_size
            self._mine.discard(old)
            self._remove(old)

    def _known_traces(self) -> deque[tuple[str, int]]:
        if self._known is None:
            self._known = deque((e.name, folder_size(self.root / e.name)) for e in scan(self.root))
            self._known_bytes = sum(size for _, size in self._known)
        return self._known

    def _remove(self, name: str) -> None:
        remove_trace(f"{self.root}/{name}")
        self._count("pruned")

    def _prune_safely(self) -> None:
        try:
            self.prune()
        except OSError as err:
            self._log_loss("cannot prune %s: %s", self.root, err)

    def prune(self, now: float | None = None) -> int:
        """Remove traces beyond `keep_count`, beyond `keep_bytes` in total, older than
        `keep_age_s`, and leftovers of interrupted writes. Returns how many went."""
        self._last_prune = time.monotonic()
        now = time.time() if now is None else now
        if not self.root.is_dir():
            return 0
        stale = now - _STALE_WRITE_S
        for entry in os.scandir(self.root):
            if entry.name.startswith(TMP_PREFIX) and mtime(entry) < stale:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:  # a staged message left by a process that ended
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
        entries = scan(self.root)
        cutoff = now - self.keep_age_s
        sized = [(e.name, folder_size(self.root / e.name)) for e in entries if e.mtime >= cutoff]
        keep: deque[tuple[str, int]] = deque()
        total = 0
        for name, size in reversed(sized[-self.keep_count :]):
            if keep and total + size > self.keep_bytes:
                break
            keep.appendleft((name, size))
            total += size
        gone = {e.name for e in entries} - {name for name, _ in keep}
        for name in gone:
            self._remove(name)
        self._known, self._known_bytes = keep, total
        self._mine.intersection_update(name for name, _ in keep)
        return len(gone)
