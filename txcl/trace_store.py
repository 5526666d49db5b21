"""The on-disk form of a trace: `<state-dir>/requests/<rid>/`, and reading it back.

One folder per run, holding at most two files, both private to the server's user
(folders 0700, files 0600, whatever the umask):

    trace.jsonl    five lines of compact JSON, one part each, in this order:
                   {"summary": …}   rid, time, route, stack, sender, subject, codes (`--list`)
                   {"envelope": …}  the inbound envelope, scrubbed
                   {"steps": …}     the rules that fired and why, then every SET and EXEC
                   {"result": …}    error, timings, the final `_txc.<src>.res`, what was scrubbed
                   {"response": …}  the exact reply lines sent, one per recipient
    message.eml    the message bytes the envelope was built from, stored once, scrubbed;
                   the envelope names it where the message sits (`{"file": "message.eml"}`);
                   a large message's is a hard link to the file written while its stack
                   ran (`StagedMessage`), shared by the traces of its recipient groups

`--list` reads only the first line of each trace. `jq -s add trace.jsonl` is the whole trace
as one object. A trace is written in a hidden temporary folder renamed into place, so a
folder under its rid is always whole.

JSON goes through orjson (C); a document it refuses (an integer beyond 64 bits) falls back to
the standard library, so a trace is never lost to its encoder.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import json
import os
import re
import shutil
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from txcl import inputs

TRACE_FILE: Final = "trace.jsonl"
MESSAGE_FILE: Final = "message.eml"
PARTS: Final = ("summary", "envelope", "steps", "result", "response")
FOLDER_MODE: Final = 0o700
FILE_MODE: Final = 0o600
TMP_PREFIX: Final = ".tmp-"
# How long a delivery waits for its message to be staged before it answers anyway.
STAGE_WAIT_S: Final = 2.0

_SAFE_RID = re.compile(r"[^A-Za-z0-9._-]")
_ORJSON_OPTIONS: Final = orjson.OPT_NON_STR_KEYS


@dataclass(frozen=True, slots=True)
class StoredApart:
    """Marks where a value sits that the trace stores beside its JSON: the message bytes,
    or a part of them (an attachment's content) that the stored message holds."""

    file: str
    size: int | None = None


class StagedMessage:
    """A message's bytes on their way to a file of their own under requests/, written by the
    trace thread as soon as the message arrived (`TraceWriter.stage`), so that the traces of
    its runs hold the file, not the bytes, once the runs are over. Each trace folder takes
    the file by a hard link; the staged file goes when the last holder lets this go."""

    __slots__ = ("size", "data", "path", "error", "done", "__weakref__")

    def __init__(self, data: bytes) -> None:
        self.size = len(data)
        self.data: bytes | None = data  # until written
        self.path: str | None = None  # once written
        self.error: OSError | None = None
        self.done: concurrent.futures.Future[None] = concurrent.futures.Future()

    def __len__(self) -> int:
        return self.size

    async def written(self, timeout: float = STAGE_WAIT_S) -> None:
        """Wait (at most `timeout` seconds) until the bytes are on file or failed to be."""
        if not self.done.done():
            await asyncio.wait({asyncio.wrap_future(self.done)}, timeout=timeout)

    def write(self, root: str | os.PathLike[str]) -> None:
        """Write the bytes to a private file under `root` and let them go (the trace thread
        calls this); a failure is kept in `error` and the bytes are let go all the same."""
        data, self.data = self.data, None
        try:
            if data is None:
                return
            path = f"{os.fspath(root)}/{TMP_PREFIX}message-{os.getpid()}-{id(self):x}.eml"
            try:
                write_private(path, data)
            except OSError as err:
                self.error = err
                with contextlib.suppress(OSError):
                    os.unlink(path)
                return
            self.path = path
            weakref.finalize(self, _unlink_quietly, path)
        finally:
            del data
            self.done.set_result(None)

    def abandon(self) -> None:
        """Let the bytes go unwritten (`error` says why)."""
        self.data = None
        if not self.done.done():
            self.done.set_result(None)

    def link(self, path: str) -> int:
        """Make `path` the staged file (a hard link; a copy where no link can be made);
        the bytes it holds."""
        if self.path is None:
            raise OSError(errno.ENOENT, f"the message was not staged: {self.error}", path)
        try:
            os.link(self.path, path)
        except OSError:
            shutil.copyfile(self.path, path)
            os.chmod(path, FILE_MODE)
        return self.size

    def read(self) -> bytes:
        """The bytes again (a trace that scrubs them needs them): still held, or read back."""
        if self.data is not None:
            return self.data
        if self.path is None:
            raise OSError(errno.ENOENT, f"the message was not staged: {self.error}")
        with open(self.path, "rb") as file:
            return file.read()


MessageBytes = bytes | StagedMessage
"""A trace's message: the bytes themselves, or their staged file."""


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _default(value: Any) -> Any:
    if isinstance(value, StoredApart):
        return {"file": value.file} if value.size is None else {
            "file": value.file, "size": value.size}
    if isinstance(value, bytes):
        return f"({len(value)} bytes)"
    return str(value)


def encode(doc: Any) -> bytes:
    """One compact JSON document (no trailing newline)."""
    try:
        return orjson.dumps(doc, default=_default)
    except TypeError:
        pass
    try:  # a key that is no string (its check costs orjson every key, so only when needed)
        return orjson.dumps(doc, default=_default, option=_ORJSON_OPTIONS)
    except TypeError:  # beyond what orjson encodes (e.g. a huge integer): the slow way
        return json.dumps(
            doc, default=_default, ensure_ascii=False, separators=(",", ":")
        ).encode("utf-8")


def encode_parts(parts: Mapping[str, Any]) -> list[bytes]:
    """The lines of `trace.jsonl`, each with its newline."""
    return [encode({name: parts.get(name)}) + b"\n" for name in PARTS]


def safe_rid(rid: str) -> str:
    """A folder name that stays inside requests/, whatever the rid holds."""
    name = _SAFE_RID.sub("_", rid)[:128].lstrip(".")
    return name or "_"


def private_folder(path: Path) -> None:
    """`path` exists as a folder only its owner can enter (created or tightened)."""
    path.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != FOLDER_MODE:
        os.chmod(path, FOLDER_MODE)


@functools.cache
def _pid() -> int:
    """os.getpid(), a system call each time, once per process (forgotten in a fork's child)."""
    return os.getpid()


os.register_at_fork(after_in_child=_pid.cache_clear)


@functools.cache
def umask_keeps_owner_bits() -> bool:
    """The process umask leaves FOLDER_MODE and FILE_MODE as they are (it clears no bit of
    the owner's), so what is created with them needs no chmod; read once, from
    /proc/self/status (reading it with os.umask would change it for a moment, for every
    thread). False where that cannot be read: then every mode is set explicitly."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8) & 0o700 == 0
    except (OSError, ValueError, IndexError):
        pass
    return False


def write_private(path: str, data: bytes) -> int:
    """Write a new file readable by its owner only; returns the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        if not umask_keeps_owner_bits():
            os.fchmod(fd, FILE_MODE)  # the umask may have taken bits away
        _write_all(fd, data)
    finally:
        os.close(fd)
    return len(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def remove_trace(folder: str) -> None:
    """Remove one trace folder (its files, then itself); anything unexpected in it too."""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                os.unlink(entry.path)
        os.rmdir(folder)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)


def write_trace(
    root: Path, name: str, lines: list[bytes], message: MessageBytes | None
) -> tuple[str, int]:
    """One trace's files, written into a private temporary folder that is then renamed to
    `root/<name>` (or `<name>.1`, `<name>.2`… when one rid has several runs), so a trace
    appears whole or not at all. Returns the folder's name and the bytes written."""
    base = os.fspath(root)
    tmp = f"{base}/{TMP_PREFIX}{name}-{_pid()}-{threading.get_ident()}"
    os.mkdir(tmp, FOLDER_MODE)
    try:
        if not umask_keeps_owner_bits():
            os.chmod(tmp, FOLDER_MODE)  # the umask may have taken bits away
        size = write_private(f"{tmp}/{TRACE_FILE}", b"".join(lines))
        if isinstance(message, StagedMessage):
            size += message.link(f"{tmp}/{MESSAGE_FILE}")
        elif message is not None:
            size += write_private(f"{tmp}/{MESSAGE_FILE}", message)
        return _publish(base, tmp, name), size
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _overwrite_private(path: str, data: bytes) -> int:
    """Write `data` over an existing file (a new private one if missing), cutting what is
    left of the old content. A file with other links (a staged message another trace links
    to) is replaced, not written through."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return write_private(path, data)
    try:
        info = os.fstat(fd)
        if info.st_nlink <= 1:
            _write_all(fd, data)
            # Cut only a longer old file: a same-size ftruncate costs ext4 more than the fstat.
            if info.st_size > len(data):
                os.ftruncate(fd, len(data))
            return len(data)
    finally:
        os.close(fd)
    os.unlink(path)
    return write_private(path, data)


def reuse_trace(root: Path, old: str, name: str, lines: list[bytes],
                message: MessageBytes | None) -> tuple[str, int]:
    """`write_trace`, in the folder of the trace `old` (one this writer wrote, and that
    retention removes now): its files are overwritten in place, so a trace at the retention
    limit neither allocates nor frees an inode, which costs ext4 far more than the writes
    once many have been freed recently. `old` leaves its name before it changes, so no
    reader sees a mixture; FileNotFoundError if `old` is gone."""
    base = os.fspath(root)
    tmp = f"{base}/{TMP_PREFIX}{name}-{_pid()}-{threading.get_ident()}"
    os.utime(f"{base}/{old}")  # a fresh mtime: not a stale leftover, and ordered as new
    os.rename(f"{base}/{old}", tmp)
    try:
        size = _overwrite_private(f"{tmp}/{TRACE_FILE}", b"".join(lines))
        if isinstance(message, StagedMessage):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{tmp}/{MESSAGE_FILE}")
            size += message.link(f"{tmp}/{MESSAGE_FILE}")
        elif message is not None:
            size += _overwrite_private(f"{tmp}/{MESSAGE_FILE}", message)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{tmp}/{MESSAGE_FILE}")
        return _publish(base, tmp, name), size
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(base: str, tmp: str, name: str) -> str:
    """Rename the finished folder `tmp` to `base/<name>` (or `<name>.1`, `<name>.2`…);
    returns the name it got."""
    n = 0
    while True:
        final = name if n == 0 else f"{name}.{n}"
        try:
            os.rename(tmp, f"{base}/{final}")  # fails on an existing trace: it is never empty
            return final
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            n += 1


# --- reading traces back -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceEntry:
    name: str
    mtime: float


def mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def scan(root: Path) -> list[TraceEntry]:
    """Trace folders, oldest first (by mtime, then by name: rids sort by time)."""
    try:
        entries = [
            TraceEntry(e.name, mtime(e))
            for e in os.scandir(root)
            if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
        ]
    except FileNotFoundError:
        return []
    return sorted(entries, key=lambda e: (e.mtime, e.name))


def folder_size(path: str | Path) -> int:
    """The bytes of the files directly in a trace folder."""
    try:
        with os.scandir(path) as entries:
            return sum(e.stat(follow_symlinks=False).st_size for e in entries if e.is_file())
    except OSError:
        return 0


def requests_root(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / "requests"


def trace_names(state_dir: str | os.PathLike[str]) -> list[str]:
    """The stored traces' folder names, oldest first."""
    return [e.name for e in scan(requests_root(state_dir))]


def _lines(folder: Path) -> Iterator[bytes]:
    with open(folder / TRACE_FILE, "rb") as fh:
        yield from fh


def _part(line: bytes) -> tuple[str, Any] | None:
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if isinstance(doc, dict) and len(doc) == 1:
        ((name, value),) = doc.items()
        return name, value
    return None


def read_trace(state_dir: str | os.PathLike[str], name: str | None = None) -> dict[str, Any]:
    """One trace (the latest when name is None): {"name", "summary", "envelope", "steps",
    "result", "response"}. Raises FileNotFoundError when there is none; a missing or broken
    part maps to None."""
    root = requests_root(state_dir)
    if name is None:
        names = trace_names(state_dir)
        if not names:
            raise FileNotFoundError(f"no traces under {root}")
        name = names[-1]
    folder = root / safe_rid(name)
    if not folder.is_dir():
        raise FileNotFoundError(f"no trace {name!r} under {root}")
    out: dict[str, Any] = {"name": folder.name, **dict.fromkeys(PARTS)}
    try:
        for line in _lines(folder):
            part = _part(line)
            if part is not None and part[0] in PARTS:
                out[part[0]] = part[1]
    except FileNotFoundError:
        out.update({name: _legacy_part(folder, name) for name in PARTS})
    except OSError:
        pass
    return out


def _legacy_part(folder: Path, name: str) -> Any:
    """A part of a trace written before `trace.jsonl`: one indented `<part>.json` each."""
    try:
        return inputs.load_json_object(folder / f"{name}.json")
    except (OSError, ValueError):  # InputError: not a bounded JSON object
        return None


def read_message(state_dir: str | os.PathLike[str], name: str) -> bytes | None:
    """The message bytes stored with a trace, or None (omitted, cut, or none)."""
    try:
        return (requests_root(state_dir) / safe_rid(name) / MESSAGE_FILE).read_bytes()
    except OSError:
        return None


def read_summary(folder: Path) -> dict[str, Any] | None:
    """The first line of a trace (or its legacy `summary.json`); None when it has neither."""
    try:
        with open(folder / TRACE_FILE, "rb") as fh:
            first = fh.readline()
    except FileNotFoundError:
        if not os.path.lexists(folder / "summary.json"):
            return None
        legacy = _legacy_part(folder, "summary")
        return legacy if legacy is not None else {"rid": folder.name, "error": "unreadable summary"}
    except OSError:
        return {"rid": folder.name, "error": "unreadable summary"}
    part = _part(first)
    if part is None or part[0] != "summary" or not isinstance(part[1], dict):
        return {"rid": folder.name, "error": "unreadable summary"}
    return part[1]


def read_summaries(
    state_dir: str | os.PathLike[str], limit: int | None = None
) -> list[dict[str, Any]]:
    """The summaries of the newest `limit` traces (all when None), oldest first."""
    root = requests_root(state_dir)
    names = trace_names(state_dir)
    if limit is not None:
        names = names[-limit:] if limit > 0 else []
    out = []
    for name in names:
        summary = read_summary(root / name)
        if summary is not None:
            summary.setdefault("name", name)
            out.append(summary)
    return out
