"""What the built-in ops share, so that no op imports another.

- the envelope's source section and the raw message, whichever head delivered it: the
  bytes the source handed over with the call (`OpContext.message`; the LMTP head always
  does), else `_txc.<src>.msg.raw` (`"b64:..."`);
- the envelope as an event document (EMIT writes it, WEBHOOK posts it), leaving out raw
  bytes and attachment content unless a rule asks for them;
- boolean WITH arguments;
- durable directory entries (`fsync_dir`);
- acting once per delivery (`once`): a retry after a 4xx gets the first call's patch;
- the deadline of the network ops: a socket timeout bounds each wait, and a watchdog shuts
  the socket down when the whole budget is spent, so a peer that trickles bytes cannot
  stretch a call past its deadline.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import functools
import hashlib
import inspect
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from txcl.envelope import TXC, section_of, source_of
from txcl.ops import Op, OpContext, OpFailure

B64_PREFIX = "b64:"


# --- the envelope's source section and the raw message ----------------------------------


def source_section(envelope: Mapping[str, Any], op: str) -> Mapping[str, Any]:
    """`_txc.<src>`, the part of the envelope the source stamped; raises when absent."""
    section = section_of(envelope)
    if section is None:
        raise OpFailure(f"{op}: the envelope names no source section (_txc.src and _txc.<src>)")
    return section


def raw_base64(envelope: Mapping[str, Any], op: str) -> str:
    """`_txc.<src>.msg.raw` as it is, `"b64:..."`; raises when absent or of another form."""
    msg = source_section(envelope, op).get("msg")
    raw = msg.get("raw") if isinstance(msg, Mapping) else None
    if not isinstance(raw, str) or not raw.startswith(B64_PREFIX):
        raise OpFailure(
            f'{op}: the envelope has no raw message at _txc.{source_of(envelope)}.msg.raw ("b64:...")'
        )
    return raw


def raw_message(envelope: Mapping[str, Any], op: str, ctx: OpContext | None = None) -> bytes:
    """The message exactly as it arrived: the bytes the source handed over with the call
    (`ctx.message`), else `_txc.<src>.msg.raw` decoded from `"b64:..."`."""
    if ctx is not None and ctx.message is not None:
        return ctx.message
    raw = raw_base64(envelope, op)
    try:
        return base64.b64decode(raw[len(B64_PREFIX) :], validate=True)
    except binascii.Error as exc:
        raise not_base64(envelope, op, exc) from None


def not_base64(envelope: Mapping[str, Any], op: str, error: binascii.Error) -> OpFailure:
    """The failure for a `_txc.<src>.msg.raw` that does not decode."""
    return OpFailure(f"{op}: _txc.{source_of(envelope)}.msg.raw is not valid base64: {error}")


# --- the envelope as an event -------------------------------------------------------------


def flag_argument(args: Mapping[str, Any], op: str, name: str) -> bool:
    """A boolean WITH argument, false when absent; anything but true/false is refused."""
    value = args.get(name, False)
    if not isinstance(value, bool):
        raise OpFailure(f"{op}: {name} must be true or false, not {value!r}")
    return value


def event_document(
    envelope: Mapping[str, Any], *, include_raw: bool, include_attachments: bool
) -> Mapping[str, Any]:
    """The envelope without `_txc.<src>.msg.raw` and attachment `content`, unless included.

    Only the containers on the way to what is left out are copied; the envelope itself is
    never changed.
    """
    src = source_of(envelope)
    section = section_of(envelope, src)
    if src is None or section is None or (include_raw and include_attachments):
        return envelope
    msg = section.get("msg")
    if not isinstance(msg, Mapping):
        return envelope
    slim = dict(msg)
    if not include_raw:
        slim.pop("raw", None)
    attachments = msg.get("attachments")
    if not include_attachments and isinstance(attachments, list):
        slim["attachments"] = [
            {k: v for k, v in a.items() if k != "content"} if isinstance(a, Mapping) else a
            for a in attachments
        ]
    return {**envelope, TXC: {**envelope[TXC], src: {**section, "msg": slim}}}


def event_json(envelope: Mapping[str, Any], args: Mapping[str, Any], op: str) -> bytes:
    """The event document as compact UTF-8 JSON, honouring include_raw/include_attachments."""
    document = event_document(
        envelope,
        include_raw=flag_argument(args, op, "include_raw"),
        include_attachments=flag_argument(args, op, "include_attachments"),
    )
    try:
        text = json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise OpFailure(f"{op}: the envelope cannot be written as JSON: {exc}") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (8-bit header bytes kept by surrogateescape) has no UTF-8 form;
        # as a JSON \u escape the line is still JSON, and the message is not refused for it.
        return json.dumps(document, separators=(",", ":"), allow_nan=False).encode("ascii")


# --- files ----------------------------------------------------------------------------------


def fsync_dir(path: str | Path) -> None:
    """Make the entries of a directory (a file created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- once per delivery ----------------------------------------------------------------------

ONCE_FOLDER = ".txcl-once"
ONCE_WINDOW_DAYS = 7  # longer than Postfix's default queue lifetime (5 days)
_DAY_S = 86400
# (stack storage) -> the last day whose folder exists; a new day prunes the old ones.
_once_days: dict[Path, int] = {}


def once_key(ctx: OpContext, op: str, args: Mapping[str, Any]) -> str:
    """What makes a call the same call again: the delivery, the op and its arguments; ""
    when the caller gave no delivery key (then nothing is remembered)."""
    if not ctx.delivery_key or ctx.state_dir is None:
        return ""
    try:
        text = json.dumps(args, sort_keys=True, separators=(",", ":"), default=repr)
    except (TypeError, ValueError):
        text = repr(sorted(args.items(), key=lambda item: str(item[0])))
    digest = hashlib.sha256(f"{ctx.delivery_key}\0{op}\0{text}".encode("utf-8", "replace"))
    return digest.hexdigest()[:40]


# A key's file is this many spaces while its op acts; the op's patch then overwrites it in
# place, so recording it after the op acted needs no new disk space (a full disk fails the
# call before it acts, never between acting and remembering).
_RESERVED = b" " * 2048


def recall(ctx: OpContext, key: str) -> tuple[dict[str, Any] | None, bool]:
    """The patch a call with this key returned within the window (or None), and whether a
    call with it was cut off while it acted (a crash, kill -9): its key was reserved but
    never recorded, so it may or may not have acted."""
    if not key:
        return None, False
    folder = ctx.storage(ONCE_FOLDER)
    today = int(time.time() // _DAY_S)
    for day in range(today, today - ONCE_WINDOW_DAYS - 1, -1):
        try:
            with open(f"{folder}/{day}/{key}", "rb") as file:
                text = file.read()
        except FileNotFoundError:
            continue
        except OSError:
            return None, False
        with contextlib.suppress(ValueError):
            patch = json.loads(text) if text.strip() else None
            if isinstance(patch, dict):
                return patch, False
        return None, True
    return None, False


def reserve(ctx: OpContext, key: str) -> str:
    """Make the key's file before the op acts (spaces: not done yet); its path. A day's
    first key prunes the days past the window, in a thread of its own."""
    folder = ctx.storage(ONCE_FOLDER)
    today = int(time.time() // _DAY_S)
    day_folder = f"{folder}/{today}"
    if _once_days.get(folder) != today:
        os.makedirs(day_folder, mode=0o700, exist_ok=True)
        if len(_once_days) >= 4096:
            _once_days.clear()
        _once_days[folder] = today
        threading.Thread(target=_prune_once, args=(folder, today), daemon=True).start()
    path = f"{day_folder}/{key}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if os.write(fd, _RESERVED) != len(_RESERVED):
            raise OSError(errno.ENOSPC, "no room to remember the call", path)
    except BaseException:
        os.close(fd)
        _remove(path)
        raise
    os.close(fd)
    return path


def record(path: str, patch: Mapping[str, Any]) -> None:
    """Write the op's patch over the reserved spaces. Not fsynced, and a patch too large to
    fit may fail: either way the key reads as not done, and a retry acts again."""
    with contextlib.suppress(OSError, TypeError, ValueError):
        data = json.dumps(patch, separators=(",", ":")).encode()
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _prune_once(folder: Path, today: int) -> None:
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name.isdigit() and int(entry.name) < today - ONCE_WINDOW_DAYS:
                shutil.rmtree(entry.path, ignore_errors=True)


Recover = Callable[[Mapping[str, Any], Mapping[str, Any], OpContext, str], "dict[str, Any] | None"]
"""`recover(envelope, args, ctx, key)`: for a call cut off while it acted, the patch of
what it did, if the op can find it (ARCHIVE looks for its file by the key), else None."""


class _OnceCall:
    """One call of an op under `once`: what an earlier call returned (`remembered`), else a
    reserved key that the `with` block's success records and its failure removes."""

    def __init__(self, ctx: OpContext, name: str, args: Mapping[str, Any]) -> None:
        self.key = once_key(ctx, name, args)
        self.remembered, self.cut_off = recall(ctx, self.key)
        self._path = reserve(ctx, self.key) if self.key and self.remembered is None else ""

    def __enter__(self) -> _OnceCall:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None and self._path:
            _remove(self._path)

    def done(self, patch: Any) -> Any:
        if self._path:
            record(self._path, patch)
        return patch


def once(name: str, op: Op, *, recover: Recover | None = None) -> Op:
    """`op`, acting once per delivery: a repeated call with the same delivery key, op and
    arguments (a retry after a 4xx) returns the first call's patch instead of acting again.
    A call that fails is forgotten; one cut off while it acted is looked for with
    `recover`, else acts again. Works for sync and async ops alike."""
    if inspect.iscoroutinefunction(op):

        async def once_async(
            envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: OpContext
        ) -> Any:
            call = _OnceCall(ctx, name, args)
            if call.remembered is not None:
                return call.remembered
            with call:
                if call.cut_off and recover is not None:
                    found = await asyncio.get_running_loop().run_in_executor(
                        None, recover, envelope, args, ctx, call.key
                    )
                    if found is not None:
                        return call.done(found)
                return call.done(await op(envelope, args, ctx))

        return functools.update_wrapper(once_async, op)

    def once_sync(envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: OpContext) -> Any:
        call = _OnceCall(ctx, name, args)
        if call.remembered is not None:
            return call.remembered
        with call:
            found = recover(envelope, args, ctx, call.key) if call.cut_off and recover else None
            return call.done(found if found is not None else op(envelope, args, ctx))

    return functools.update_wrapper(once_sync, op)


# --- the network ops' deadline --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deadline:
    """When a network op's budget ends; `fired` is set once the watchdog has cut the socket."""

    at: float
    fired: threading.Event

    def passed(self) -> bool:
        return self.fired.is_set() or time.monotonic() >= self.at


@contextlib.contextmanager
def socket_deadline(
    seconds: float, current_socket: Callable[[], socket.socket | None]
) -> Iterator[Deadline]:
    """Shut the current socket down after `seconds`, ending any read or write blocked on it."""
    deadline = Deadline(time.monotonic() + seconds, threading.Event())

    def expire() -> None:
        deadline.fired.set()
        sock = current_socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(seconds, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield deadline
    finally:
        watchdog.cancel()
