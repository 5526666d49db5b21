"""One LMTP session (RFC 2033): the protocol state machine, its replies, limits and timeouts.

`LMTPSession` is a plain asyncio protocol. Bytes go straight from the socket into a message
sink (lmtp.wire: the DATA decoder, a BDAT chunk) or into a buffer for command lines; one
task per connection reads commands and answers them:

- RCPT is routed at once through the handler: unrouted recipients get 550 5.1.1 before
  any message byte is read. UTF-8 addresses need SMTPUTF8 on MAIL (RFC 6531).
- DATA, and BDAT ... LAST (CHUNKING, RFC 3030), are answered with exactly one reply per
  accepted RCPT, in RCPT order, whatever happens: the deliverer's lines, 552 for an
  oversized message, 451 when the deliverer fails or misses --lmtp-resp-timeout.
- Replies to pipelined commands are written together when no further command is waiting.
- A command line must arrive whole within --lmtp-read-timeout, and a session may send
  --lmtp-max-commands commands between deliveries; then 421.

The handler (`Handler`: `DeliveryHandler` here, `lmtp.reload.ReloadingHandler` when serving)
has the two hooks with work behind them, RCPT and DATA.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from lmtp.config import LISTENER_NAME, Settings
from lmtp.wire import (
    MAX_COMMAND_LINE,
    ChunkedMessage,
    ChunkReader,
    DataDecoder,
    Sink,
    TooLong,
    printable,
    take_line,
)
from txcl.chassis.status import COUNTERS

if TYPE_CHECKING:
    from lmtp.routing import Route

log = logging.getLogger("txco.lmtp")

# Unread command bytes kept before the socket is paused (a pipelining client while a
# delivery runs); a message sink never buffers, it consumes each chunk as it comes.
INPUT_BUFFER_LIMIT = 1 << 20

R_TOO_LARGE = "552 5.3.4 message too large"
R_NO_RULE = "550 5.1.1 no rule accepted this recipient"
R_TOO_MANY_RCPTS = "452 4.5.3 too many recipients"
R_LINE_TOO_LONG = "500 5.5.2 line too long (a command line is at most 512 octets)"
R_OK = "250 2.0.0 OK"
R_NEEDS_SMTPUTF8 = "553 5.6.7 non-ASCII address: MAIL FROM must give SMTPUTF8"
R_DELIVERY_FAILED = "451 4.3.0 delivery failed, try again later"

_REPLY_LINE = re.compile(r"[245]\d\d [ -~]*\Z")
_BDAT = re.compile(r"(\d{1,18})(?: +(LAST))? *\Z", re.IGNORECASE)


def _path_grammar(utf8: str) -> re.Pattern[str]:
    """RFC 5321 4.1.2 Path (source routes dropped): a Dot-string or Quoted-string local
    part, then a domain or an address literal; `utf8` is what RFC 6531 adds to atoms,
    quoted strings and domain labels. Never a control character: none can reach a log."""
    atom = rf"(?:[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~-]{utf8})+"
    local = rf'(?:{atom}(?:\.{atom})*|"(?:[ !#-\[\]-~]{utf8}|\\[ -~])*")'
    letter = rf"(?:[A-Za-z0-9_]{utf8})"
    label = rf"{letter}(?:(?:[A-Za-z0-9_-]{utf8})*{letter})?"
    domain = rf"{label}(?:\.{label})*"
    literal = r"\[[!-Z^-~]+\]"
    return re.compile(
        rf"<(?:@[^:<>]*:)?({local}@(?:{domain}|{literal})|(?i:postmaster))>(?:\s+(.*))?\Z")


# Most addresses are ASCII: their grammar, without the UTF-8 alternatives, is cheaper.
_ASCII_PATH = _path_grammar("")
_UTF8_PATH = _path_grammar(r"|[^\x00-\x9f\s\u2028\u2029\ud800-\udfff]")


class Router(Protocol):
    def route(self, address: str, listener: str = LISTENER_NAME) -> Route | None: ...

    def refusal(self, address: str) -> str: ...


class Deliverer(Protocol):
    def deliver(self, tx: Any) -> Awaitable[list[str]]: ...


@dataclass
class Session:
    """What the handler sees of the connection."""

    peer: Any
    host_name: str | None = None


@dataclass(eq=False)
class Envelope:
    """One transaction: MAIL, the accepted RCPTs with their routes (same order), the data."""

    mail_from: str | None = None
    declared_size: int | None = None
    smtputf8: bool = False  # MAIL FROM gave SMTPUTF8: addresses may be UTF-8 (RFC 6531)
    rcpt_tos: list[str] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    content: bytes = b""
    chunks: ChunkedMessage | None = None  # what BDAT chunks (RFC 3030) have brought so far
    runtime: Any = None  # the rules version a handler chose for this transaction (lmtp.reload)


class Handler(Protocol):
    """The RCPT and DATA hooks: a reply line for RCPT, one line per recipient for DATA."""

    async def handle_RCPT(self, server: Any, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str: ...

    async def handle_DATA(self, server: Any, session: Session,
                          envelope: Envelope) -> list[str]: ...


# Why a recipient is refused at RCPT: the name of its counter (status.json `counters`,
# `rcpt_refused`) and the words of its log line.
REFUSALS = {
    "no_route": "no route",
    "hostname_unverified": "hostname not verified",
    "too_many_recipients": "too many recipients",
    "needs_smtputf8": "non-ASCII address without SMTPUTF8",
    "unsupported_parameter": "parameter not supported",
    "syntax": "not an address",
    "routing_failed": "routing failed",
}
_REFUSED = {reason: COUNTERS.counter("rcpt_refused", reason) for reason in REFUSALS}


def refuse_recipient(address: str, where: str, reason: str, reply: str) -> str:
    """Count and log a recipient refused at RCPT time; the reply."""
    COUNTERS.add(_REFUSED[reason])
    log.info("lmtp rcpt refused at RCPT: <%s> %s: %s (%s)",
             printable(address, 256), where, REFUSALS[reason], reply[:9])
    return reply


def accept_recipient(router: Router, listener: str, envelope: Envelope, address: str) -> str:
    """Route `address`; a routed one joins the envelope. The RCPT reply."""
    route = router.route(address, listener)
    if route is None:
        reason = router.refusal(address)
        return refuse_recipient(address, f"listener={listener}", reason, R_NO_RULE)
    envelope.rcpt_tos.append(address)
    envelope.routes.append(route)
    return "250 2.1.5 OK"


def deliver_envelope(deliverer: Deliverer, make_transaction: Callable[..., Any], listener: str,
                     session: Session, envelope: Envelope) -> Awaitable[list[str]]:
    """Hand the transaction to the deliverer: its replies, one per recipient."""
    tx = make_transaction(
        listener=listener,
        client_ip=client_ip(session.peer),
        helo=session.host_name or "",
        mail_from=envelope.mail_from or "",
        rcpts=tuple(envelope.rcpt_tos),
        routes=tuple(envelope.routes),
        data=envelope.content,
        received_at=time.time(),
    )
    return deliverer.deliver(tx)


@dataclass(frozen=True)
class DeliveryHandler:
    """The two hooks with work behind them: RCPT -> router, DATA -> deliverer.

    `make_transaction(**fields)` builds the deliverer's input (`lmtp.delivery.Transaction`).
    """

    router: Router
    deliverer: Deliverer
    make_transaction: Callable[..., Any]
    listener: str = LISTENER_NAME

    async def handle_RCPT(self, server: Any, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        return accept_recipient(self.router, self.listener, envelope, address)

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> list[str]:
        return await deliver_envelope(self.deliverer, self.make_transaction, self.listener,
                                      session, envelope)


def client_ip(peer: Any) -> str:
    """The client's IP address; "unix" for a Unix-socket client (it has no address)."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unix"


def seconds(value: float) -> str:
    return f"{value:g}s"


class SessionRegistry(Protocol):
    """Who keeps track of open sessions (the head: shutdown, load, connection limits)."""

    def opened(self, session: LMTPSession) -> None: ...

    def closed(self, session: LMTPSession) -> None: ...


class LMTPSession(asyncio.Protocol):
    """One LMTP connection. See the module docstring."""

    def __init__(self, settings: Settings, handler: Handler, registry: SessionRegistry) -> None:
        self.settings = settings
        self.handler = handler
        self.registry = registry
        self.hostname = settings.lmtp_hostname
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.session = Session(peer=None)
        self.envelope = Envelope()
        self._inbuf = bytearray()
        self._dropping_line = False
        self._input_waiter: asyncio.Future[None] | None = None
        self._sink: Sink | None = None
        self._eof = False
        self._reading_paused = False
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._out: list[bytes] = []
        self._waiting_for_command = False
        self._closing = False
        self._quit = False
        self._commands = 0  # since the session began or its last delivery
        self._task: asyncio.Task[None] | None = None
        self._deadline = 0.0  # loop time when the current timeout runs out
        self._timer: asyncio.TimerHandle | None = None
        self._read_timeout_reply = (f"421 4.4.2 {self.hostname} no command within "
                                    f"{seconds(settings.lmtp_read_timeout)}, closing")
        self._data_timeout_reply = (f"421 4.4.2 {self.hostname} message not received within "
                                    f"{seconds(settings.lmtp_data_timeout)}, closing")
        self._timeout_reply = self._read_timeout_reply
        self._expire: Callable[[], None] = self._say_timeout_and_close  # at the deadline
        self._verdict_late = False  # the deliverer missed --lmtp-resp-timeout

    # --- connection plumbing ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.session.peer = transport.get_extra_info("peername")
        self.registry.opened(self)
        self._task = self.loop.create_task(self._run())

    def connection_lost(self, error: Exception | None) -> None:
        self.transport = None
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
        self._wake_writer()
        self.registry.closed(self)

    # Bytes go straight from the socket into the message sink (no buffer copy, no wake-up
    # per chunk) or into `_inbuf` for commands.

    def data_received(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            used = sink.feed(data)
            if used < 0:
                return
            self._sink = None
            self._inbuf += memoryview(data)[used:]  # the next commands (and messages)
        else:
            if len(self._inbuf) > INPUT_BUFFER_LIMIT and self.transport is not None:
                # Commands pile up while a delivery runs: stop reading until we catch up.
                self.transport.pause_reading()
                self._reading_paused = True
            self._inbuf += data
        self._wake_reader()

    def eof_received(self) -> bool:
        # Finish the replies owed for commands the client sent before closing its side,
        # then see the end of input.
        self._eof = True
        self._wake_reader()
        return True

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

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

    def _start_timeout(self, duration: float, expire: Callable[[], None] | None = None) -> None:
        """Call `expire` (by default: say `_timeout_reply` and close) when `duration` has
        passed, unless a new timeout starts or `_stop_timeout` comes first."""
        # One timer per connection, moved lazily: a new deadline only moves a number; a
        # timer that fires before the deadline re-arms itself for it.
        deadline = self.loop.time() + duration
        self._deadline = deadline
        self._expire = self._say_timeout_and_close if expire is None else expire
        timer = self._timer
        if timer is not None and not timer.cancelled() and timer.when() <= deadline:
            return
        if timer is not None:
            timer.cancel()
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _stop_timeout(self) -> None:
        self._deadline = math.inf  # the timer, when it fires, sees there is nothing to do

    def _on_timer(self) -> None:
        if self._deadline == math.inf:
            self._timer = None
            return
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        self._timer = None
        self._deadline = math.inf
        self._expire()

    def _say_timeout_and_close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._timeout_reply.encode() + b"\r\n")
            self.transport.close()

    def close_for_shutdown(self) -> None:
        """Say 421 and close now if waiting for a command; else after the current one."""
        self._closing = True
        if self._waiting_for_command and self.transport is not None:
            self.transport.write(f"421 4.3.2 {self.hostname} shutting down\r\n".encode())
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _reply(self, line: str) -> None:
        self._out.append(line.encode("utf-8", "surrogateescape") + b"\r\n")

    async def _flush(self) -> None:
        if not self._out:
            return
        if self.transport is None:
            raise ConnectionResetError("connection lost")
        self.transport.write(b"".join(self._out))
        self._out.clear()
        while self._writing_paused and self.transport is not None:
            self._drained = self.loop.create_future()
            try:
                await self._drained
            finally:
                self._drained = None

    async def _read_line(self) -> bytes | TooLong | None:
        """The next command line without its line ending; TOO_LONG; None at end of input.
        The read timeout runs from the first wait to the whole line: a client that trickles
        a command byte by byte gets no more time than one that sends nothing."""
        timing = False
        while True:
            line, self._dropping_line = take_line(self._inbuf, self._dropping_line)
            if line is not None:
                if timing:
                    self._stop_timeout()
                return line
            if self._eof:
                return None
            if not timing:
                self._start_timeout(self.settings.lmtp_read_timeout)
                timing = True
            self._waiting_for_command = True
            try:
                await self._wait_for_input()
            finally:
                self._waiting_for_command = False

    # --- the command loop ------------------------------------------------------------

    async def _run(self) -> None:
        self._reply(f"220 {self.hostname} LMTP txco ready")
        try:
            while self.transport is not None and not (self._closing or self._quit):
                line = await self._read_line()
                if line is None:
                    break
                self._commands += 1
                if self._commands > self.settings.lmtp_max_commands:
                    self._reply(f"421 4.7.0 {self.hostname} too many commands, closing")
                    self._quit = True
                    break
                await self._dispatch(line)
            if self._closing and not self._quit:
                self._reply(f"421 4.3.2 {self.hostname} shutting down")
            await self._flush()
        except (ConnectionError, asyncio.CancelledError):
            pass
        if self.transport is not None:
            self.transport.close()

    async def _dispatch(self, line: bytes | TooLong) -> None:
        if isinstance(line, TooLong):
            self._reply(R_LINE_TOO_LONG)
            return
        verb_bytes, _, arg_bytes = line.partition(b" ")
        if not line.isascii():
            if verb_bytes.upper() not in (b"MAIL", b"RCPT"):
                self._reply("500 5.5.2 syntax error: non-ASCII command")
                return
            try:  # RFC 6531: UTF-8 addresses (MAIL and RCPT check that SMTPUTF8 was given)
                arg_bytes.decode("utf-8")
            except UnicodeDecodeError:
                self._reply("501 5.5.4 syntax error: an address that is not UTF-8")
                return
        verb = verb_bytes.decode("ascii").upper()
        arg = arg_bytes.decode("utf-8").strip()
        if len(line) > MAX_COMMAND_LINE and verb != "MAIL":
            self._reply(R_LINE_TOO_LONG)
            return
        command = _COMMANDS.get(verb)
        if command is None:
            if not verb:
                self._reply("500 5.5.2 syntax error: empty command")
            else:
                self._reply(f"500 5.5.2 command not recognized: {printable(verb, 32)}")
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
        self.envelope = Envelope()
        self.session.host_name = arg
        for line in (f"250-{self.hostname}", "250-PIPELINING", "250-ENHANCEDSTATUSCODES",
                     "250-8BITMIME", "250-SMTPUTF8", "250-CHUNKING", f"250 SIZE {self.settings.lmtp_max_msg_bytes}"):
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
        parsed = None if rest is None else _path(rest, null_ok=True)
        if parsed is None:
            self._reply("501 5.5.4 syntax: MAIL FROM:<address> [SIZE=n] [BODY=7BIT|8BITMIME] "
                        "[SMTPUTF8]")
            return
        address, params = parsed
        size: int | None = None
        smtputf8 = False
        for param in params:
            key, _, value = param.partition("=")
            key = key.upper()
            if key == "SIZE" and value.isdigit():
                size = int(value)
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                continue
            elif key == "SMTPUTF8" and param.upper() == "SMTPUTF8":
                smtputf8 = True
            else:
                self._reply(f"555 5.5.4 MAIL FROM parameter not supported: {printable(param, 40)}")
                return
        if not (smtputf8 or address.isascii()):
            self._reply(R_NEEDS_SMTPUTF8)
            return
        if size is not None and size > self.settings.lmtp_max_msg_bytes:
            self._reply(f"{R_TOO_LARGE} (limit {self.settings.lmtp_max_msg_bytes} bytes)")
            return
        self.envelope.mail_from = address
        self.envelope.declared_size = size
        self.envelope.smtputf8 = smtputf8
        self._reply("250 2.1.0 OK")

    async def rcpt(self, arg: str) -> None:
        if self.envelope.mail_from is None:
            self._reply("503 5.5.1 need MAIL before RCPT")
            return
        rest = _after_keyword("TO:", arg)
        parsed = None if rest is None else _path(rest, null_ok=False)
        if parsed is None:
            self._refuse(arg, "syntax", "501 5.5.4 syntax: RCPT TO:<address>")
            return
        address, params = parsed
        if not (self.envelope.smtputf8 or address.isascii()):
            self._refuse(address, "needs_smtputf8", R_NEEDS_SMTPUTF8)
            return
        if params:
            self._refuse(address, "unsupported_parameter",
                         f"555 5.5.4 RCPT TO parameter not supported: {printable(params[0], 40)}")
            return
        if len(self.envelope.rcpt_tos) >= self.settings.lmtp_max_recipients:
            self._refuse(address, "too_many_recipients", R_TOO_MANY_RCPTS)
            return
        try:
            status = await self.handler.handle_RCPT(self, self.session, self.envelope, address, [])
        except Exception:
            log.exception("lmtp: routing <%s> failed", printable(address, 256))
            self._refuse(address, "routing_failed", "451 4.3.0 routing failed, try again later")
            return
        self._reply(status)

    def _refuse(self, address: str, reason: str, reply: str) -> None:
        """A RCPT refused before routing (or when routing fails): counted, logged, said."""
        where = f"client={client_ip(self.session.peer)}"
        self._reply(refuse_recipient(address, where, reason, reply))

    async def data(self, arg: str) -> None:
        if self.envelope.mail_from is None:
            self._reply("503 5.5.1 need MAIL before DATA")
            return
        if self.envelope.chunks is not None:
            self._reply("503 5.5.1 DATA after BDAT (RSET to start over)")
            return
        if not self.envelope.rcpt_tos:
            self._reply("503 5.5.1 no valid recipients")
            return
        if arg:
            self._reply("501 5.5.4 syntax: DATA")
            return
        self._reply("354 2.0.0 send the message, end with <CRLF>.<CRLF>")
        started = time.monotonic()
        decoder = DataDecoder(self.settings.lmtp_max_msg_bytes, self.envelope.declared_size)
        if not await self._read_into(decoder):
            return
        content = b"" if decoder.too_large else decoder.message()
        await self._finish(decoder.too_large, content, decoder.size, started)

    async def bdat(self, arg: str) -> None:
        """RFC 3030 with RFC 2033: each chunk but the last gets one 250; the LAST one, one
        reply per accepted recipient, as DATA. The chunk's bytes are read (or, after an
        error, skipped) whatever the reply, so they are never taken for commands."""
        match = _BDAT.match(arg)
        if match is None:
            self._reply("501 5.5.4 syntax: BDAT <size> [LAST]")
            return
        size, last = int(match.group(1)), match.group(2) is not None
        started = time.monotonic()
        envelope = self.envelope
        refusal = None
        if envelope.mail_from is None:
            refusal = "503 5.5.1 need MAIL before BDAT"
        elif not envelope.rcpt_tos:
            refusal = "503 5.5.1 no valid recipients"
        chunks = envelope.chunks
        if chunks is None:
            chunks = ChunkedMessage(self.settings.lmtp_max_msg_bytes)
            if refusal is None:
                envelope.chunks = chunks
        if not await self._read_into(ChunkReader(size, chunks)):
            return
        if refusal is not None:
            self._reply(refusal)
        elif not last:
            self._reply(R_TOO_LARGE if chunks.too_large else f"250 2.0.0 {size} octets received")
        else:
            content = b"" if chunks.too_large else chunks.message()
            await self._finish(chunks.too_large, content, chunks.size, started)

    async def _read_into(self, sink: Sink) -> bool:
        """Feed the message bytes to `sink` until it is done (True), within
        --lmtp-data-timeout; False when the client goes first."""
        self._timeout_reply = self._data_timeout_reply
        self._start_timeout(self.settings.lmtp_data_timeout)
        if self._inbuf and not sink.done:
            with memoryview(self._inbuf) as arrived:  # released before the buffer is cut
                used = sink.feed(arrived)
            del self._inbuf[:len(self._inbuf) if used < 0 else used]
        self._sink = sink
        try:
            while not sink.done and not self._eof:
                await self._wait_for_input()
        finally:
            self._sink = None
        if not sink.done:
            return False
        self._stop_timeout()
        self._timeout_reply = self._read_timeout_reply
        return True

    async def _finish(self, too_large: bool, content: bytes, size: int, started: float) -> None:
        """The end of a message: one reply per accepted recipient, a new transaction."""
        envelope = self.envelope
        count = len(envelope.rcpt_tos)
        if too_large:
            replies = [R_TOO_LARGE] * count
        else:
            envelope.content = content
            replies = await self._deliver(count)
        self.envelope = Envelope()
        self._commands = 0
        for line in replies:
            self._reply(line)
        # The sender goes on each group's line, scrubbed by that stack's WITH omit/redact.
        log.info("lmtp delivery client=%s rcpts=%d size=%d replies=%s %.0fms",
                 client_ip(self.session.peer), count,
                 size, ",".join(line[:3] for line in replies),
                 (time.monotonic() - started) * 1000)

    async def _deliver(self, count: int) -> list[str]:
        timeout = self.settings.lmtp_resp_timeout
        # The deadline is the session's timer (asyncio.timeout would add a timer per
        # delivery): at --lmtp-resp-timeout it cancels this task, as asyncio.timeout does,
        # and a cancellation that is ours alone becomes the timeout.
        task = self._task  # the session's task runs every command
        assert task is not None
        cancelling = task.cancelling()
        self._verdict_late = False
        self._start_timeout(timeout, self._cancel_late_delivery)
        try:
            lines = await self.handler.handle_DATA(self, self.session, self.envelope)
        except asyncio.CancelledError:
            if not (self._verdict_late and task.uncancel() <= cancelling):
                raise
            lines = None
        except Exception as exc:
            if self._verdict_late:  # the deliverer swallowed our cancellation
                task.uncancel()
            if not isinstance(exc, TimeoutError):
                log.exception("lmtp: delivery failed")
                return [R_DELIVERY_FAILED] * count
            lines = None
        else:
            if self._verdict_late:  # the deliverer swallowed our cancellation and answered
                task.uncancel()
        finally:
            self._stop_timeout()
        if lines is None:
            log.warning("lmtp: no verdict within %s for %d recipient(s)", seconds(timeout), count)
            return [f"451 4.3.0 no verdict within {seconds(timeout)}, try again later"] * count
        if (not isinstance(lines, Sequence) or len(lines) != count
                or not all(isinstance(x, str) and _REPLY_LINE.match(x) for x in lines)):
            log.error("lmtp: deliverer returned %s for %d recipient(s)",
                      printable(repr(lines), 512), count)
            return [R_DELIVERY_FAILED] * count
        return list(lines)

    def _cancel_late_delivery(self) -> None:
        self._verdict_late = True
        if self._task is not None:
            self._task.cancel()

    async def rset(self, arg: str) -> None:
        self.envelope = Envelope()
        self._reply(R_OK)

    async def noop(self, arg: str) -> None:
        self._reply(R_OK)

    async def vrfy(self, arg: str) -> None:
        if not arg:
            self._reply("501 5.5.4 syntax: VRFY <address>")
            return
        self._reply("252 2.5.0 cannot VRFY, but will take the message and try delivery")

    async def help(self, arg: str) -> None:
        self._reply("214 2.0.0 commands: LHLO MAIL RCPT DATA BDAT RSET NOOP VRFY QUIT")

    async def quit(self, arg: str) -> None:
        self._reply(f"221 2.0.0 {self.hostname} closing")
        self._quit = True


def _path(text: str, *, null_ok: bool) -> tuple[str, list[str]] | None:
    """(address, parameters) of `<address> [params]`; None when malformed (RFC 5321 4.1.2)."""
    text = text.strip()
    if text.startswith("<>"):
        if not null_ok or text[2:3] not in ("", " "):
            return None
        return "", text[2:].split()
    match = (_ASCII_PATH if text.isascii() else _UTF8_PATH).match(text)
    if match is None:
        return None
    return match.group(1), (match.group(2) or "").split()


def _after_keyword(keyword: str, arg: str) -> str | None:
    if arg[:len(keyword)].upper() != keyword:
        return None
    return arg[len(keyword):]


_COMMANDS: dict[str, Callable[[LMTPSession, str], Awaitable[None]]] = {
    "LHLO": LMTPSession.lhlo,
    "HELO": LMTPSession.helo,
    "EHLO": LMTPSession.helo,
    "MAIL": LMTPSession.mail,
    "RCPT": LMTPSession.rcpt,
    "DATA": LMTPSession.data,
    "BDAT": LMTPSession.bdat,
    "RSET": LMTPSession.rset,
    "NOOP": LMTPSession.noop,
    "VRFY": LMTPSession.vrfy,
    "HELP": LMTPSession.help,
    "QUIT": LMTPSession.quit,
}
