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
folder under its rid is always whole (`txcl.trace_files` writes the folders).

JSON goes through orjson (C); a document it refuses (an integer beyond 64 bits) falls back to
the standard library, so a trace is never lost to its encoder.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import json
import os
import re
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from txcl import inputs
from txcl.trace_files import (
    MESSAGE_FILE,
    TMP_PREFIX,
    TRACE_FILE,
    link_or_copy,
    private_folder,
    scan,
    write_private,
)

PARTS: Final = ("summary", "envelope", "steps", "result", "response")
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
        """Write the bytes to a private file under `root` (made private if need be) and let
        them go (the trace thread calls this); a failure is kept in `error` and the bytes
        are let go all the same."""
        data, self.data = self.data, None
        try:
            if data is None:
                return
            path = f"{os.fspath(root)}/{TMP_PREFIX}message-{os.getpid()}-{id(self):x}.eml"
            try:
                private_folder(root)
                write_private(path, data)
            except OSError as err:
                self.error = err
                with contextlib.suppress(OSError):
                    os.unlink(path)
                return
            self.path = path
            # Not at interpreter exit: the file process may still be linking it (a leftover
            # goes with the stale temporary files, after an hour).
            weakref.finalize(self, _unlink_quietly, path).atexit = False
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
        link_or_copy(self.path, path)
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


# --- reading traces back -----------------------------------------------------------------


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
