"""LMTP bytes on the wire: command lines in, DATA dot-decoding, reply lines out.

Nothing here knows the protocol's state: `lmtp.session` drives these pieces.

- `take_line` cuts the next command line out of the input buffer, refusing over-long ones
  without keeping them.
- `DataDecoder` turns the DATA byte stream, fed in chunks of any size, into the message.
- `ChunkReader` takes the exact byte count of one BDAT chunk (RFC 3030) into `ChunkedMessage`.
- `printable` makes client text safe to echo in a reply or write to a log.
"""

from __future__ import annotations

import io
import re
import weakref
from collections.abc import Iterator
from typing import Protocol

# Message bytes as a sink is fed them: bytes from the socket, or a view of the session's
# command buffer (what arrived with the command that started the message).
Buffer = bytes | memoryview

# RFC 5321 4.5.3.1.4: 512 octets per command line; SIZE= and BODY= may lengthen MAIL.
MAX_COMMAND_LINE = 512
MAX_MAIL_LINE = 512 + 26 + 15

_STUFFED_DOT = re.compile(rb"\r\n\.")
# How the bytes before a DATA chunk ended (DataDecoder), and what its _dot_line returns
# when the message has not ended there.
_CRLF, _CR, _OTHER = "CRLF", "CR", "other"
_HOLD, _GO_ON = -1, -2


class TooLong:
    """What `take_line` returns for a line over MAX_MAIL_LINE (it is dropped unread)."""


TOO_LONG = TooLong()


def take_line(buf: bytearray, dropping: bool) -> tuple[bytes | TooLong | None, bool]:
    """The next line of `buf` without its line ending (removed from `buf`), TOO_LONG, or
    None when no whole line is there yet; and whether the line being received is over the
    limit already (pass it back in: its bytes are dropped as they come, never kept)."""
    end = buf.find(b"\n")
    if end >= 0:
        line = bytes(buf[:end])
        del buf[:end + 1]
        if dropping or end > MAX_MAIL_LINE:
            return TOO_LONG, False
        return (line[:-1] if line.endswith(b"\r") else line), False
    if len(buf) > MAX_MAIL_LINE:
        buf.clear()
        return None, True
    return None, dropping


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str, limit: int = 64) -> str:
    """`text` cut to `limit` characters with control characters shown as \\xNN: safe to echo
    in a reply (one line, no CR/LF) and to write to a log or a terminal (no escapes)."""
    cut = text[:limit]
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", cut)


# Messages from this size on get their whole buffer at once when the client says how large
# they are (DataDecoder's size_hint)...
PREALLOCATE_FROM_BYTES = 1024 * 1024
# ...as long as the buffers so allocated before their data arrived stay under this, per
# process: clients that declare large sizes and send little hold no more than this.
PREALLOCATE_BUDGET_BYTES = 64 * 1024 * 1024


class _PreallocationBudget:
    """Bytes of DATA buffers allocated ahead of their data, in this process."""

    def __init__(self) -> None:
        self.held = 0

    def take(self, owner: object, size: int) -> bool:
        """Reserve `size` bytes until `owner` is gone; False if that would go over."""
        if self.held + size > PREALLOCATE_BUDGET_BYTES:
            return False
        self.held += size
        weakref.finalize(owner, self._give_back, size)
        return True

    def _give_back(self, size: int) -> None:
        self.held -= size


_preallocated = _PreallocationBudget()


class DataDecoder:
    """Turns the DATA byte stream, fed in chunks of any size, into the message.

    The message ends at the first CRLF "." CRLF only (RFC 5321 4.1.1.4). A bare LF or CR
    around a dot (`\\n.\\n`, `\\r.\\n`, `\\n.\\r\\n`) is message data: ending there would let a
    sender smuggle a second message past an MTA that reads the stream differently.
    A dot at the start of a line (after CRLF) is removed (RFC 5321 4.5.2).

    One search per chunk and per dot-started line; each piece is copied once, into a
    growing buffer that `message()` hands over without another copy (BytesIO.getvalue
    shares its buffer), so a message costs about its size once, not chunks plus a join.
    Only a dot that starts a line, with the one byte after it, is ever held back for the
    next chunk (terminator or stuffing?); how the bytes before a chunk ended (CRLF, CR) is
    kept as a state, so a chunk is never glued to the previous one's tail (a copy of every
    chunk).
    Over `max_bytes` the message is dropped at once and the rest is only counted, so memory
    stays bounded by the limit whatever the client sends.

    With `size_hint` (MAIL FROM's SIZE=, which Postfix sends) of a large message, the
    buffer is allocated once, a little over the hint, and cut to size at the end: grown
    step by step, a buffer the allocator had put in its heap is copied when it outgrows its
    place, briefly holding the message twice. Such buffers, allocated before their data
    arrives, stay within PREALLOCATE_BUDGET_BYTES per process.
    """

    def __init__(self, max_bytes: int, size_hint: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.too_large = False
        self.done = False
        self._out = io.BytesIO()
        if size_hint is not None and size_hint >= PREALLOCATE_FROM_BYTES:
            # SIZE= may count LF line ends (Postfix's queue file), not the CRLFs that arrive.
            capacity = min(max_bytes, size_hint + size_hint // 16 + 64 * 1024)
            if _preallocated.take(self, capacity):
                self._out.seek(capacity - 1)
                self._out.write(b"\0")  # one allocation of `capacity`
                self._out.seek(0)
        # The stream starts as if after a CRLF, so a leading "." starts a line too.
        self._ended_with = _CRLF
        self._held = b""  # "." or ".\r" that started a line, undecided

    def feed(self, chunk: Buffer) -> int:
        """Take the next bytes (`chunk` is not kept: it may be a view of a buffer that
        changes next). -1: the message goes on; else how many bytes of `chunk` belonged to
        the message (what follows is the client's next command)."""
        held = self._held
        piece = held + chunk if held else chunk  # held: at most two bytes
        self._held = b""
        ended_with = self._ended_with
        start = 0
        for dot in self._line_start_dots(piece):
            if (used := self._dot_line(piece, start, dot)) != _GO_ON:
                return used - len(held) if used >= 0 else -1
            start = dot + 1
        self._emit(piece, start, len(piece))
        if piece[-2:] == b"\r\n" or (piece == b"\n" and ended_with is _CR):
            self._ended_with = _CRLF
        elif piece[-1:] == b"\r":
            self._ended_with = _CR
        elif piece:
            self._ended_with = _OTHER
        return -1

    def _line_start_dots(self, piece: Buffer) -> Iterator[int]:
        """Where a dot starts a line in `piece`: at its border (the bytes before ended with
        CRLF, or a held dot is back in front; or after an LF that completes a CR), then
        after each CRLF within it (a regex search: faster than bytes.find here)."""
        ended_with = self._ended_with
        border = 0 if ended_with is _CRLF else 1 if ended_with is _CR and piece[:1] == b"\n" else -1
        after = 0
        if border >= 0 and piece[border:border + 1] == b".":
            yield border
            after = border + 1
        for found in _STUFFED_DOT.finditer(piece, after):
            yield found.end() - 1

    def _dot_line(self, piece: Buffer, start: int, dot: int) -> int:
        """A line of `piece` starts with a dot at `dot`; emit what precedes it. The end of
        the message (the index in `piece` after the terminator); _HOLD (the dot is held
        for the next chunk); or _GO_ON (a stuffed dot, dropped)."""
        self._emit(piece, start, dot)
        tail = piece[dot + 1:dot + 3]
        if tail == b"\r\n":
            self.done = True
            return dot + 3
        if tail in (b"", b"\r"):  # maybe a terminator the next chunk completes
            self._held = bytes(piece[dot:])
            self._ended_with = _CRLF
            return _HOLD
        return _GO_ON

    def _emit(self, piece: Buffer, start: int, stop: int) -> None:
        if stop <= start:
            return
        self.size += stop - start
        if self.too_large:
            return
        if self.size > self.max_bytes:
            self.too_large = True
            self._out = io.BytesIO()
            return
        self._out.write(memoryview(piece)[start:stop])

    def message(self) -> bytes:
        """The unstuffed message (once `done` and not `too_large`); the buffer is released."""
        self._out.truncate()  # what was allocated beyond the message (in place, no copy)
        data = self._out.getvalue()
        self._out = io.BytesIO()
        return data




class Sink(Protocol):
    """Where message bytes go straight from the socket (DataDecoder, ChunkReader)."""

    done: bool

    def feed(self, chunk: Buffer) -> int:
        """-1: more is wanted; else how many bytes of `chunk` were taken (the rest is the
        client's next command). `chunk` is not kept: it may be a view of a buffer that
        changes next."""
        ...


class ChunkedMessage:
    """The message BDAT chunks add up to. Over `max_bytes` it is dropped at once and the
    rest only counted, so memory stays bounded by the limit whatever the client sends."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.too_large = False
        self._out = io.BytesIO()

    def reserve(self, size: int) -> None:
        """Count the next chunk's `size` bytes, before they arrive."""
        self.size += size
        if self.size > self.max_bytes and not self.too_large:
            self.too_large = True
            self._out = io.BytesIO()

    def write(self, data: memoryview) -> None:
        if not self.too_large:
            self._out.write(data)

    def message(self) -> bytes:
        data = self._out.getvalue()
        self._out = io.BytesIO()
        return data


class ChunkReader:
    """Exactly `size` bytes of one BDAT chunk, fed in pieces of any size, into `message`."""

    def __init__(self, size: int, message: ChunkedMessage) -> None:
        message.reserve(size)
        self.remaining = size
        self.message = message
        self.done = size == 0

    def feed(self, chunk: Buffer) -> int:
        take = min(len(chunk), self.remaining)
        self.message.write(memoryview(chunk)[:take])
        self.remaining -= take
        if self.remaining:
            return -1
        self.done = True
        return take
