"""op://FORWARD: re-send the raw message over SMTP through a relay.

All or nothing: every recipient must be accepted before DATA is sent, so a partly refused
forward sends nothing, the run fails, and Postfix retries the whole delivery later.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
from collections.abc import Mapping
from typing import Any

from txcl.builtin_ops.once import once
from txcl.builtin_ops.support import raw_message, socket_deadline, source_section
from txcl.envelope import ANY_SOURCE, SRC_KEY, TXC
from txcl.ops import OpContext, OpFailure, OpReads, RegisteredOp

DEFAULT_RELAY = "127.0.0.1:25"
MAX_RECIPIENTS = 100
# A plain mailbox: no spaces, controls, brackets or separators, one "@" with text on both
# sides. Quoted local parts are refused rather than risk a malformed SMTP command.
_ATOM = r"[^\s\x00-\x1f\x7f<>()\[\],;:\"@\\]+"
ADDRESS = re.compile(f"{_ATOM}@{_ATOM}")
RELAY = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+))(?::(?P<port>\d+))?")
BARE_LF = re.compile(rb"(?<!\r)\n")


def _checked_address(value: object, what: str) -> str:
    if not isinstance(value, str) or not ADDRESS.fullmatch(value):
        raise OpFailure(f"FORWARD: {what} {value!r} is not a plain mail address like a@b.example")
    return value


def recipients_argument(args: Mapping[str, Any]) -> list[str]:
    """WITH to = "a@b" | "a@b, c@d" | ["a@b", "c@d"] -> the checked list."""
    to = args.get("to")
    if isinstance(to, str):
        items: list[object] = [part.strip() for part in to.split(",") if part.strip()]
    elif isinstance(to, list | tuple):
        items = list(to)
    else:
        raise OpFailure('FORWARD: WITH to = "a@b.example" (or a list) is required')
    if not items:
        raise OpFailure("FORWARD: to names no recipient")
    if len(items) > MAX_RECIPIENTS:
        raise OpFailure(f"FORWARD: to names {len(items)} recipients; at most {MAX_RECIPIENTS}")
    return [_checked_address(item, "recipient") for item in items]


def sender_argument(args: Mapping[str, Any], envelope: Mapping[str, Any]) -> str:
    """WITH from, else the original envelope sender `_txc.<src>.mail.from`; "" is the null sender."""
    if "from" in args:
        sender = args["from"]
    else:
        mail = source_section(envelope, "FORWARD").get("mail")
        sender = mail.get("from") if isinstance(mail, Mapping) else None
        if sender is None:
            raise OpFailure("FORWARD: no WITH from and no envelope sender at _txc.<src>.mail.from")
    return "" if sender == "" else _checked_address(sender, "sender")


def relay_argument(args: Mapping[str, Any]) -> tuple[str, int]:
    """WITH relay = "host:port" | "host" | "[::1]:port" -> (host, port); default 127.0.0.1:25."""
    relay = args.get("relay", DEFAULT_RELAY)
    m = RELAY.fullmatch(relay) if isinstance(relay, str) else None
    port = int(m.group("port") or 25) if m else 0
    if not m or not 0 < port < 65536:
        raise OpFailure(f'FORWARD: relay {relay!r} must be "host:port" (or "[v6-address]:port")')
    return m.group("v6") or m.group("host"), port


def wire_bytes(raw: bytes) -> bytes:
    """The message with CRLF line ends, as SMTP requires; everything else unchanged."""
    return BARE_LF.sub(b"\r\n", raw)


def _mail_options(client: smtplib.SMTP, data: bytes, addresses: list[str]) -> list[str]:
    options = []
    if client.has_extn("8bitmime") and not data.isascii():
        options.append("BODY=8BITMIME")
    if not all(a.isascii() for a in addresses):
        if not client.has_extn("smtputf8"):
            raise OpFailure("FORWARD: the relay does not offer SMTPUTF8 for these addresses")
        options.append("SMTPUTF8")
    return options


def _transaction(client: smtplib.SMTP, sender: str, to: list[str], data: bytes) -> str:
    """MAIL, every RCPT, then DATA only when all were accepted; smtplib errors on refusal."""
    client.ehlo_or_helo_if_needed()
    code, reply = client.mail(sender, _mail_options(client, data, [sender, *to]))
    if code != 250:
        raise smtplib.SMTPSenderRefused(code, reply, sender)
    refused = {}
    for rcpt in to:
        code, reply = client.rcpt(rcpt)
        if code not in (250, 251):
            refused[rcpt] = (code, reply)
    if refused:
        client.rset()
        raise smtplib.SMTPRecipientsRefused(refused)
    code, reply = client.data(data)
    if code != 250:
        raise smtplib.SMTPDataError(code, reply)
    return f"{code} {reply.decode(errors='replace')}"


def _text(reply: bytes | str) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else reply


def send(host: str, port: int, sender: str, to: list[str], data: bytes, seconds: float) -> str:
    """One SMTP transaction; returns the relay's final reply. Raises on any refusal."""
    relay = f"{host}:{port}"
    client = smtplib.SMTP(timeout=seconds, local_hostname=socket.gethostname())
    with socket_deadline(seconds, lambda: getattr(client, "sock", None)) as deadline:
        try:
            client.connect(host, port)
            reply = _transaction(client, sender, to, data)
            with contextlib.suppress(OSError, smtplib.SMTPException):
                client.quit()  # the message is with the relay; a failing QUIT changes nothing
        except smtplib.SMTPRecipientsRefused as exc:
            refused = ", ".join(
                f"{rcpt} ({code} {_text(text)})" for rcpt, (code, text) in exc.recipients.items()
            )
            raise OpFailure(f"FORWARD: relay {relay} refused {refused}; nothing was sent") from None
        except smtplib.SMTPResponseException as exc:
            raise OpFailure(
                f"FORWARD: relay {relay} answered {exc.smtp_code} {_text(exc.smtp_error)}"
            ) from None
        except (OSError, smtplib.SMTPException) as exc:
            if deadline.passed() or isinstance(exc, TimeoutError):
                raise OpFailure(f"FORWARD: relay {relay} timed out after {seconds:g}s") from None
            raise OpFailure(f"FORWARD: relay {relay} failed: {exc}") from None
        finally:
            client.close()
    return reply


def forward(envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: OpContext) -> dict:
    """op://FORWARD WITH to = "a@b" [WITH from = "x@y"] [WITH relay = "host:port"]."""
    to = recipients_argument(args)
    sender = sender_argument(args, envelope)
    host, port = relay_argument(args)
    data = wire_bytes(raw_message(envelope, "FORWARD", ctx))
    seconds = ctx.deadline_s
    reply = send(host, port, sender, to, data, seconds)
    return {"forward": {"relay": f"{host}:{port}", "from": sender, "to": to, "reply": reply}}


# The raw message, and the envelope sender when no WITH from is given.
OP = RegisteredOp.builtin(
    "FORWARD",
    once("FORWARD", forward),
    OpReads.only([(TXC, SRC_KEY), (TXC, ANY_SOURCE, "mail", "from")], message=True),
)
