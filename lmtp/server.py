"""The LMTP protocol (RFC 2033) on aiosmtpd: listeners, limits, timeouts, one reply per RCPT.

aiosmtpd's `LMTP` only swaps the greeting: its `smtp_DATA` sends one reply, reads the
message line by line and has no per-phase timeouts, and its replies carry no enhanced
status codes. `LMTPProtocol` keeps aiosmtpd's connection plumbing (session, envelope,
transport, timer) and replaces the command loop and the commands:

- RCPT is routed at once through the handler: unrouted recipients get 550 5.1.1 before
  any message byte is read.
- DATA is read in large chunks by `DataDecoder` (terminator found across chunk borders,
  dot-stuffing undone with bytes operations, size limit enforced while streaming, the
  rest of an oversized message drained without keeping it).
- DATA is answered with exactly one reply per accepted RCPT, in RCPT order, whatever
  happens: the deliverer's lines, 552 for an oversized message, 451 when the deliverer
  fails or misses --lmtp-resp-timeout.
- Replies to pipelined commands are written together when no further command is waiting.

`LMTPHead` binds every --lmtp-listen-addrs entry and shuts down gracefully. With several
worker processes (`txco serve --workers N`) the parent binds once (`bind_listeners`) and
each worker serves the inherited sockets: the kernel hands every connection to one worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import socket
import stat
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import Envelope, Session

from lmtp.config import LISTENER_NAME, ListenAddress, Settings
from txcl.chassis.balance import BalancedAcceptor, WorkerSlot

log = logging.getLogger("txco.lmtp")

# Unread command bytes kept before the socket is paused (a pipelining client while a
# delivery runs); the DATA decoder never buffers, it consumes each chunk as it comes.
INPUT_BUFFER_LIMIT = 1 << 20
# RFC 5321 4.5.3.1.4: 512 octets per command line; SIZE= and BODY= may lengthen MAIL.
MAX_COMMAND_LINE = 512
MAX_MAIL_LINE = 512 + 26 + 15

_STUFFED_DOT = re.compile(rb"\r\n\.")
# How the bytes before a DATA chunk ended (DataDecoder), and what its _dot_line returns
# when the message has not ended there.
_CRLF, _CR, _OTHER = "CRLF", "CR", "other"
_HOLD, _GO_ON = -1, -2
_SIMPLE_PATH = re.compile(r"<([^<>()\[\]\\,;:@\"\s]+@[A-Za-z0-9.-]+)>(?:\s+(.*))?\Z")
_REPLY_LINE = re.compile(r"[245]\d\d [ -~]*\Z")

R_TOO_LARGE = "552 5.3.4 message too large"
R_NO_RULE = "550 5.1.1 no rule accepted this recipient"
R_TOO_MANY_RCPTS = "452 4.5.3 too many recipients"


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
    kept as a state, so a chunk is never glued to the previous one's tail: that copied
    every chunk, ~9 % of a worker's interpreter time with 100 KiB messages.
    Over `max_bytes` the message is dropped at once and the rest is only counted, so memory
    stays bounded by the limit whatever the client sends.

    With `size_hint` (MAIL FROM's SIZE=, which Postfix sends) of a large message, the
    buffer is allocated once, a little over the hint, and cut to size at the end: grown
    step by step, a buffer the allocator had put in its heap is copied when it outgrows its
    place, briefly holding the message twice (a 25 MiB message's peak went from ~3.6x to
    4.2-4.4x its size in about one run in four). Such buffers, allocated before their data
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

    def feed(self, chunk: bytes) -> int:
        """Take the next bytes. -1: the message goes on; else how many bytes of `chunk`
        belonged to the message (what follows is the client's next command)."""
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
        if piece.endswith(b"\r\n") or (piece == b"\n" and ended_with is _CR):
            self._ended_with = _CRLF
        elif piece.endswith(b"\r"):
            self._ended_with = _CR
        elif piece:
            self._ended_with = _OTHER
        return -1

    def _line_start_dots(self, piece: bytes) -> Iterator[int]:
        """Where a dot starts a line in `piece`: at its border (the bytes before ended with
        CRLF, or a held dot is back in front; or after an LF that completes a CR), then
        after each CRLF within it. A regex search: twice as fast as bytes.find here."""
        ended_with = self._ended_with
        border = 0 if ended_with is _CRLF else 1 if ended_with is _CR and piece[:1] == b"\n" else -1
        after = 0
        if border >= 0 and piece[border:border + 1] == b".":
            yield border
            after = border + 1
        for found in _STUFFED_DOT.finditer(piece, after):
            yield found.end() - 1

    def _dot_line(self, piece: bytes, start: int, dot: int) -> int:
        """A line of `piece` starts with a dot at `dot`; emit what precedes it. The end of
        the message (the index in `piece` after the terminator); _HOLD (the dot is held
        for the next chunk); or _GO_ON (a stuffed dot, dropped)."""
        self._emit(piece, start, dot)
        tail = piece[dot + 1:dot + 3]
        if tail == b"\r\n":
            self.done = True
            return dot + 3
        if tail in (b"", b"\r"):  # maybe a terminator the next chunk completes
            self._held = piece[dot:]
            self._ended_with = _CRLF
            return _HOLD
        return _GO_ON

    def _emit(self, piece: bytes, start: int, stop: int) -> None:
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

    @property
    def kept(self) -> int:
        """Bytes of message held so far (0 once over the limit: nothing more is kept)."""
        return self._out.tell()

    def message(self) -> bytes:
        """The unstuffed message (once `done` and not `too_large`); the buffer is released."""
        self._out.truncate()  # what was allocated beyond the message (in place, no copy)
        data = self._out.getvalue()
        self._out = io.BytesIO()
        return data


def decode_data(stream: bytes, max_bytes: int = 1 << 62) -> tuple[bytes, bytes] | None:
    """(message, rest of stream) for a whole DATA stream; None when it does not end."""
    decoder = DataDecoder(max_bytes)
    used = decoder.feed(stream)
    if used < 0:
        return None
    return decoder.message(), stream[used:]


class Router(Protocol):
    def route(self, address: str, listener: str = LISTENER_NAME) -> Any: ...


class Deliverer(Protocol):
    def deliver(self, tx: Any) -> Awaitable[list[str]]: ...


class LMTPEnvelope(Envelope):
    """aiosmtpd's envelope plus the route of every accepted RCPT (same order as rcpt_tos)."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: list[Any] = []
        self.declared_size: int | None = None


@dataclass(frozen=True)
class DeliveryHandler:
    """The two hooks with work behind them: RCPT -> router, DATA -> deliverer.

    `make_transaction(**fields)` builds the deliverer's input (`lmtp.delivery.Transaction`).
    """

    router: Router
    deliverer: Deliverer
    make_transaction: Callable[..., Any]
    listener: str = LISTENER_NAME

    async def handle_RCPT(self, server: LMTPProtocol, session: Session,
                          envelope: LMTPEnvelope, address: str, rcpt_options: list[str]) -> str:
        route = self.router.route(address, self.listener)
        if route is None:
            return R_NO_RULE
        envelope.rcpt_tos.append(address)
        envelope.routes.append(route)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: LMTPProtocol, session: Session,
                          envelope: LMTPEnvelope) -> list[str]:
        tx = self.make_transaction(
            listener=self.listener,
            client_ip=client_ip(session.peer),
            helo=session.host_name or "",
            mail_from=envelope.mail_from or "",
            rcpts=tuple(envelope.rcpt_tos),
            routes=tuple(envelope.routes),
            data=envelope.content,
            received_at=time.time(),
        )
        return await self.deliverer.deliver(tx)


def client_ip(peer: Any) -> str:
    """The client's IP address; "unix" for a Unix-socket client (it has no address)."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unix"


class _TooLong:
    pass


_TOO_LONG = _TooLong()


class LMTPProtocol(LMTP):
    """One LMTP connection. See the module docstring for what differs from aiosmtpd."""

    def __init__(self, head: LMTPHead) -> None:
        settings = head.settings
        self._deadline = 0.0  # loop time when the current timeout runs out
        super().__init__(
            head.handler,
            data_size_limit=settings.lmtp_max_msg_bytes,
            hostname=settings.lmtp_hostname,
            ident="LMTP txco ready",
            timeout=settings.lmtp_read_timeout,
            loop=asyncio.get_running_loop(),
        )
        self.head = head
        self.settings = settings
        self.envelope: LMTPEnvelope
        self._inbuf = bytearray()
        self._input_waiter: asyncio.Future[None] | None = None
        self._decoder: DataDecoder | None = None
        self._eof = False
        self._reading_paused = False
        self._out: list[bytes] = []
        self._waiting_for_command = False
        self._closing = False
        self._quit = False
        self._timeout_reply = self._read_timeout_reply()

    # --- connection plumbing ---------------------------------------------------------

    def _create_envelope(self) -> LMTPEnvelope:
        return LMTPEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.head.sessions.add(self)  # published when its setup ends (LMTPHead._connect)

    def connection_lost(self, error: Exception | None) -> None:
        self.head.sessions.discard(self)
        self.head.sessions_changed()
        super().connection_lost(error)
        if not self.head.sessions:
            self.head.all_closed.set()

    # Input bypasses aiosmtpd's StreamReader: bytes go straight from the socket into the
    # DATA decoder (no buffer copy, no wake-up per chunk) or into `_inbuf` for commands.

    def data_received(self, data: bytes) -> None:
        decoder = self._decoder
        if decoder is not None:
            used = decoder.feed(data)
            if used < 0:
                return
            self._decoder = None
            data = data[used:]
        elif len(self._inbuf) > INPUT_BUFFER_LIMIT and self.transport is not None:
            # Commands pile up while a delivery runs: stop reading until we catch up.
            self.transport.pause_reading()
            self._reading_paused = True
        self._inbuf += data
        self._wake_reader()

    def eof_received(self) -> bool:
        # aiosmtpd cancels the session here, dropping replies still owed for commands the
        # client sent before closing its side. Finish them, then see the end of input.
        self._eof = True
        self._wake_reader()
        return True

    def _wake_reader(self) -> None:
        waiter = self._input_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait_for_input(self) -> None:
        """Flush the replies so far, then wait until data_received or EOF brings news."""
        await self._flush()
        if self._eof:
            return
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        self._input_waiter = self.loop.create_future()
        try:
            await self._input_waiter
        finally:
            self._input_waiter = None

    def _reset_timeout(self, duration: float | None = None) -> None:
        # One timer per connection, moved lazily: each command only pushes the deadline out;
        # a timer that fires before the deadline re-arms itself for it. aiosmtpd cancels and
        # schedules a new timer per command instead.
        loop = self.loop
        deadline = loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is not None and not handle.cancelled() and handle.when() <= deadline:
            return
        if handle is not None:
            handle.cancel()
        self._timeout_handle = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._on_timer)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._timeout_reply.encode() + b"\r\n")
            self.transport.close()

    def _read_timeout_reply(self) -> str:
        return (f"421 4.4.2 {self.hostname} no command within "
                f"{_seconds(self.settings.lmtp_read_timeout)}, closing")

    def close_for_shutdown(self) -> None:
        """Say 421 and close now if waiting for a command; else after the current one."""
        self._closing = True
        if self._waiting_for_command and self.transport is not None:
            self.transport.write(f"421 4.3.2 {self.hostname} shutting down\r\n".encode())
            self.transport.close()

    def _reply(self, line: str) -> None:
        self._out.append(line.encode("utf-8", "surrogateescape") + b"\r\n")

    async def _flush(self) -> None:
        if self._out:
            self._writer.write(b"".join(self._out))
            self._out.clear()
            await self._writer.drain()

    async def _read_line(self) -> bytes | _TooLong | None:
        """The next command line without its line ending; _TOO_LONG; None at end of input."""
        buf = self._inbuf
        too_long = False
        while True:
            end = buf.find(b"\n")
            if end >= 0:
                line = bytes(buf[:end])
                del buf[:end + 1]
                if too_long or end > MAX_MAIL_LINE:
                    return _TOO_LONG
                return line[:-1] if line.endswith(b"\r") else line
            if len(buf) > MAX_MAIL_LINE:
                too_long = True
                buf.clear()
            if self._eof:
                return None
            self._reset_timeout()
            self._waiting_for_command = True
            try:
                await self._wait_for_input()
            finally:
                self._waiting_for_command = False

    # --- the command loop ------------------------------------------------------------

    async def _handle_client(self) -> None:
        self._reply(f"220 {self.hostname} {self.__ident__}")
        try:
            while self.transport is not None and not (self._closing or self._quit):
                line = await self._read_line()
                if line is None:
                    break
                await self._dispatch(line)
            if self._closing and not self._quit:
                self._reply(f"421 4.3.2 {self.hostname} shutting down")
            await self._flush()
        except (ConnectionError, asyncio.CancelledError):
            pass
        if self.transport is not None:
            self.transport.close()

    async def _dispatch(self, line: bytes | _TooLong) -> None:
        if isinstance(line, _TooLong):
            self._reply("500 5.5.2 line too long (a command line is at most 512 octets)")
            return
        verb_bytes, _, arg_bytes = line.partition(b" ")
        try:
            verb = verb_bytes.decode("ascii").upper()
            arg = arg_bytes.decode("ascii").strip()
        except UnicodeDecodeError:
            if verb_bytes.upper() in (b"MAIL", b"RCPT"):
                self._reply("553 5.6.7 non-ASCII address: this server does not offer SMTPUTF8")
            else:
                self._reply("500 5.5.2 syntax error: non-ASCII command")
            return
        if len(line) > MAX_COMMAND_LINE and verb != "MAIL":
            self._reply("500 5.5.2 line too long (a command line is at most 512 octets)")
            return
        command = _COMMANDS.get(verb)
        if command is None:
            if not verb:
                self._reply("500 5.5.2 syntax error: empty command")
            else:
                self._reply(f"500 5.5.2 command not recognized: {verb[:32]}")
            return
        try:
            await command(self, arg)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("lmtp: %s failed", verb)
            self._reply("451 4.3.0 internal error, try again later")

    # --- commands ----------------------------------------------------------------------

    async def lhlo(self, arg: str) -> None:
        if not arg:
            self._reply("501 5.5.4 syntax: LHLO hostname")
            return
        self._set_rset_state()
        self.session.host_name = arg
        self.session.extended_smtp = True
        for line in (f"250-{self.hostname}", "250-PIPELINING", "250-ENHANCEDSTATUSCODES",
                     "250-8BITMIME", f"250 SIZE {self.settings.lmtp_max_msg_bytes}"):
            self._reply(line)

    async def helo(self, arg: str) -> None:
        self._reply("500 5.5.1 this is an LMTP server (RFC 2033): say LHLO instead")

    async def mail(self, arg: str) -> None:
        if not self.session.host_name:
            self._reply("503 5.5.1 send LHLO first")
            return
        if self.envelope.mail_from is not None:
            self._reply("503 5.5.1 sender already given (RSET to start over)")
            return
        rest = _after_keyword("FROM:", arg)
        parsed = None if rest is None else self._path(rest, null_ok=True)
        if parsed is None:
            self._reply("501 5.5.4 syntax: MAIL FROM:<address> [SIZE=n] [BODY=7BIT|8BITMIME]")
            return
        address, params = parsed
        size: int | None = None
        for param in params:
            key, _, value = param.partition("=")
            key = key.upper()
            if key == "SIZE" and value.isdigit():
                size = int(value)
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                continue
            else:
                self._reply(f"555 5.5.4 MAIL FROM parameter not supported: {param[:40]}")
                return
        if size is not None and size > self.settings.lmtp_max_msg_bytes:
            self._reply(f"{R_TOO_LARGE} (limit {self.settings.lmtp_max_msg_bytes} bytes)")
            return
        self.envelope.mail_from = address
        self.envelope.declared_size = size
        self._reply("250 2.1.0 OK")

    async def rcpt(self, arg: str) -> None:
        if self.envelope.mail_from is None:
            self._reply("503 5.5.1 need MAIL before RCPT")
            return
        rest = _after_keyword("TO:", arg)
        parsed = None if rest is None else self._path(rest, null_ok=False)
        if parsed is None:
            self._reply("501 5.5.4 syntax: RCPT TO:<address>")
            return
        address, params = parsed
        if params:
            self._reply(f"555 5.5.4 RCPT TO parameter not supported: {params[0][:40]}")
            return
        if len(self.envelope.rcpt_tos) >= self.settings.lmtp_max_recipients:
            self._reply(R_TOO_MANY_RCPTS)
            return
        try:
            status = await self._call_handler_hook("RCPT", address, [])
        except Exception:
            log.exception("lmtp: routing %r failed", address)
            status = "451 4.3.0 routing failed, try again later"
        self._reply(status)

    async def data(self, arg: str) -> None:
        if self.envelope.mail_from is None:
            self._reply("503 5.5.1 need MAIL before DATA")
            return
        if not self.envelope.rcpt_tos:
            self._reply("503 5.5.1 no valid recipients")
            return
        if arg:
            self._reply("501 5.5.4 syntax: DATA")
            return
        self._reply("354 2.0.0 send the message, end with <CRLF>.<CRLF>")
        self._timeout_reply = (f"421 4.4.2 {self.hostname} message not received within "
                               f"{_seconds(self.settings.lmtp_data_timeout)}, closing")
        self._reset_timeout(self.settings.lmtp_data_timeout)
        started = time.monotonic()
        decoder = await self._read_message()
        if decoder is None:
            return
        self._timeout_handle.cancel()
        self._timeout_reply = self._read_timeout_reply()
        envelope = self.envelope
        count = len(envelope.rcpt_tos)
        if decoder.too_large:
            replies = [R_TOO_LARGE] * count
        else:
            envelope.content = envelope.original_content = decoder.message()
            replies = await self._deliver(count)
        self._set_post_data_state()
        for line in replies:
            self._reply(line)
        log.info("lmtp delivery client=%s from=<%s> rcpts=%d size=%d replies=%s %.0fms",
                 client_ip(self.session.peer), envelope.mail_from, count, decoder.size,
                 ",".join(line[:3] for line in replies), (time.monotonic() - started) * 1000)

    async def _read_message(self) -> DataDecoder | None:
        decoder = DataDecoder(self.settings.lmtp_max_msg_bytes, self.envelope.declared_size)
        if self._inbuf:
            chunk = bytes(self._inbuf)
            self._inbuf.clear()
            used = decoder.feed(chunk)
            if used >= 0:
                self._inbuf += memoryview(chunk)[used:]
                return decoder
        self._decoder = decoder
        try:
            while not decoder.done and not self._eof:
                await self._wait_for_input()
        finally:
            self._decoder = None
        return decoder if decoder.done else None

    async def _deliver(self, count: int) -> list[str]:
        timeout = self.settings.lmtp_resp_timeout
        try:
            async with asyncio.timeout(timeout):  # unlike wait_for, no task per delivery
                lines = await self._call_handler_hook("DATA")
        except TimeoutError:
            log.warning("lmtp: no verdict within %s for %d recipient(s)", _seconds(timeout), count)
            return [f"451 4.3.0 no verdict within {_seconds(timeout)}, try again later"] * count
        except Exception:
            log.exception("lmtp: delivery failed")
            return ["451 4.3.0 delivery failed, try again later"] * count
        if (not isinstance(lines, Sequence) or len(lines) != count
                or not all(isinstance(x, str) and _REPLY_LINE.match(x) for x in lines)):
            log.error("lmtp: deliverer returned %r for %d recipient(s)", lines, count)
            return ["451 4.3.0 delivery failed, try again later"] * count
        return list(lines)

    async def rset(self, arg: str) -> None:
        self._set_rset_state()
        self._reply("250 2.0.0 OK")

    async def noop(self, arg: str) -> None:
        self._reply("250 2.0.0 OK")

    async def vrfy(self, arg: str) -> None:
        if not arg:
            self._reply("501 5.5.4 syntax: VRFY <address>")
            return
        self._reply("252 2.5.0 cannot VRFY, but will take the message and try delivery")

    async def help(self, arg: str) -> None:
        self._reply("214 2.0.0 commands: LHLO MAIL RCPT DATA RSET NOOP VRFY QUIT")

    async def quit(self, arg: str) -> None:
        self._reply(f"221 2.0.0 {self.hostname} closing")
        self._quit = True

    def _path(self, text: str, *, null_ok: bool) -> tuple[str, list[str]] | None:
        """(address, parameters) of `<address> [params]`; None when malformed."""
        text = text.strip()
        if text.startswith("<>"):
            if not null_ok:
                return None
            return "", text[2:].split()
        simple = _SIMPLE_PATH.match(text)
        if simple:
            return simple.group(1), (simple.group(2) or "").split()
        try:
            address, rest = self._getaddr(text)
        except (IndexError, ValueError):  # the email parser trips over some inputs, e.g. "a@"
            return None
        if not address:
            return None
        return address, (rest or "").split()


def _after_keyword(keyword: str, arg: str) -> str | None:
    if arg[:len(keyword)].upper() != keyword:
        return None
    return arg[len(keyword):]


def _seconds(value: float) -> str:
    return f"{value:g}s"


_COMMANDS: dict[str, Callable[[LMTPProtocol, str], Awaitable[None]]] = {
    "LHLO": LMTPProtocol.lhlo,
    "HELO": LMTPProtocol.helo,
    "EHLO": LMTPProtocol.helo,
    "MAIL": LMTPProtocol.mail,
    "RCPT": LMTPProtocol.rcpt,
    "DATA": LMTPProtocol.data,
    "RSET": LMTPProtocol.rset,
    "NOOP": LMTPProtocol.noop,
    "VRFY": LMTPProtocol.vrfy,
    "HELP": LMTPProtocol.help,
    "QUIT": LMTPProtocol.quit,
}


class ListenError(Exception):
    """A listen address that cannot be used. The message names it."""


@dataclass(frozen=True)
class BoundListener:
    """The sockets bound for one listen address (a host name may bind several)."""

    address: ListenAddress
    sockets: tuple[socket.socket, ...]


# Connections the kernel queues for accept(), asyncio's own default.
LISTEN_BACKLOG = 100


def bind_listeners(settings: Settings) -> list[BoundListener]:
    """Bind every --lmtp-listen-addrs entry now, without serving, for worker processes to
    inherit (`LMTPHead(..., inherited=...)`); ListenError names an address that cannot be
    bound, after closing what was. Binding is asyncio's own, so it matches `LMTPHead.start`."""
    return asyncio.run(_bind_listeners(settings))


async def _bind_listeners(settings: Settings) -> list[BoundListener]:
    loop = asyncio.get_running_loop()
    bound: list[BoundListener] = []
    try:
        for address in settings.lmtp_listen_addrs:
            try:
                if address.kind == "unix":
                    _clear_stale_socket(Path(address.path))
                    server = await loop.create_unix_server(
                        asyncio.Protocol, address.path, start_serving=False)
                    _open_to_group(Path(address.path))
                else:
                    server = await loop.create_server(
                        asyncio.Protocol, address.host, address.port, reuse_address=True,
                        start_serving=False)
            except OSError as err:
                raise ListenError(f"cannot listen on {address}: {err.strerror or err}") from None
            # The server owns its sockets and closes them with the loop: keep duplicates.
            socks = tuple(socket.socket(fileno=os.dup(s.fileno())) for s in server.sockets)
            server.close()
            for sock in socks:
                sock.listen(LISTEN_BACKLOG)
            bound.append(BoundListener(address, socks))
    except BaseException:
        close_listeners(bound)
        raise
    return bound


def close_listeners(bound: Sequence[BoundListener]) -> None:
    """Close bound sockets and remove their socket files (the binding process's duty)."""
    for listener in bound:
        for sock in listener.sockets:
            sock.close()
        if listener.address.kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                Path(listener.address.path).unlink()


class LMTPHead:
    """Every LMTP listener of one `txco serve`, and its graceful shutdown.

    With `inherited` (sockets a parent bound) the head serves those instead of binding, and
    leaves socket files to the parent; with a `slot` too, it shares their connections with
    the parent's other workers (lmtp.balance)."""

    def __init__(self, settings: Settings, handler: Any,
                 inherited: Sequence[BoundListener] | None = None,
                 slot: WorkerSlot | None = None) -> None:
        self.settings = settings
        self.handler = handler
        self.inherited = inherited
        self.slot = slot
        self.sessions: set[LMTPProtocol] = set()
        self.all_closed = asyncio.Event()
        self.bound: list[str] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._acceptors: list[BalancedAcceptor] = []
        self._connecting: set[asyncio.Task[None]] = set()
        self._socket_files: list[Path] = []

    def sessions_changed(self) -> None:
        """Publish this worker's load (sessions open or being set up) to its peers."""
        if self.slot is not None:
            self.slot.publish(len(self.sessions) + len(self._connecting))

    async def start(self, *, accept: bool = True) -> None:
        """Bind every address; on any failure close what was bound and raise ListenError.

        With inherited sockets and `accept=False`, connections wait in the kernel's queue
        until `accept_connections()`: workers that start at different speeds begin to
        accept together, so the first one ready does not take every early connection."""
        try:
            if self.inherited is not None:
                for listener in self.inherited:
                    await self._serve_inherited(listener, accept)
                return
            for address in self.settings.lmtp_listen_addrs:
                await self._listen(address)
        except BaseException:
            await self.close(grace=0)
            raise

    async def accept_connections(self) -> None:
        """Start accepting on every listener `start(accept=False)` left waiting."""
        for server in self._servers:
            await server.start_serving()
        for acceptor in self._acceptors:
            acceptor.start()

    async def _serve_inherited(self, listener: BoundListener, accept: bool) -> None:
        for shared in listener.sockets:
            # One accept per wake-up (asyncio's servers take up to 100), and the busier
            # worker steps aside: see lmtp.balance.
            sock = socket.socket(shared.family, shared.type, fileno=os.dup(shared.fileno()))
            acceptor = BalancedAcceptor(sock, self._accepted, self.slot)
            self._acceptors.append(acceptor)
            if accept:
                acceptor.start()
            if listener.address.kind != "unix":
                host, port = sock.getsockname()[:2]
                self.bound.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        if listener.address.kind == "unix":
            self.bound.append(str(listener.address))

    def _accepted(self, conn: socket.socket) -> None:
        task = asyncio.get_running_loop().create_task(self._connect(conn))
        self._connecting.add(task)
        self.sessions_changed()

    async def _connect(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: LMTPProtocol(self), conn)
        except OSError as err:  # the client left before the transport was set up
            log.info("lmtp: connection lost while being set up: %s", err)
            conn.close()
        finally:
            self._connecting.discard(asyncio.current_task())  # type: ignore[arg-type]
            self.sessions_changed()

    async def _listen(self, address: ListenAddress) -> None:
        loop = asyncio.get_running_loop()
        factory = lambda: LMTPProtocol(self)  # noqa: E731
        if address.kind == "unix":
            path = Path(address.path)
            _clear_stale_socket(path)
            try:
                server = await loop.create_unix_server(factory, str(path))
                _open_to_group(path)
            except OSError as err:
                raise ListenError(f"cannot listen on {address}: {err.strerror or err}") from None
            self._socket_files.append(path)
            self._servers.append(server)
            self.bound.append(str(address))
            return
        try:
            server = await loop.create_server(factory, address.host, address.port,
                                              reuse_address=True)
        except OSError as err:
            raise ListenError(f"cannot listen on {address}: {err.strerror or err}") from None
        self._servers.append(server)
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            self.bound.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")

    async def close(self, grace: float) -> None:
        """Stop accepting, let sessions finish their current transaction for up to `grace`
        seconds (idle ones get 421 at once), then cut the rest and remove socket files."""
        for server in self._servers:
            server.close()
        for acceptor in self._acceptors:
            acceptor.close()
        for session in list(self.sessions):
            session.close_for_shutdown()
        if self.sessions:
            self.all_closed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_closed.wait(), grace)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.abort()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        for path in self._socket_files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._servers.clear()
        self._acceptors.clear()
        self._socket_files.clear()


SOCKET_MODE = 0o660


def _open_to_group(path: Path) -> None:
    """Make the socket read-write for its owner and group, nobody else.

    Connecting needs write permission on the socket, which the process umask (typically
    022) would deny the group. With the socket itself open to the group, who may connect
    is decided by the parent folder, as the recipe sets it up (txco:postfix 0750, or a
    setgid folder of group postfix)."""
    os.chmod(path, SOCKET_MODE)


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a crashed server; refuse to take over a live one."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"cannot listen on unix:{path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    except OSError as err:
        raise ListenError(f"cannot listen on unix:{path}: {err.strerror or err}") from None
    finally:
        probe.close()
    raise ListenError(f"cannot listen on unix:{path}: another server is listening there")
