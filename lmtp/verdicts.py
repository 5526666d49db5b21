"""`_txc.lmtp.res` -> one sanitised reply per recipient of a group, in the group's order.

The resolution table of docs/lmtp.md ("Resolution at the inlet"), default-deny throughout:

| pipeline wrote                              | recipient i gets                         |
|---------------------------------------------|------------------------------------------|
| `res.recipients[i].{code,msg}`              | that slot                                |
| `res.recipients` shorter than the group     | missing slots -> 550 (never inherited)   |
| `res.recipients` longer than the group      | extras logged and ignored                |
| a slot that is null or has no code          | 550                                      |
| no array, `res.code` set                    | the broadcast code, for every recipient  |
| nothing                                     | 550 5.1.1 no rule accepted this recipient|
| the run failed, or any code is invalid      | 451 4.3.0 for every recipient            |

A valid code is an integer (not a boolean) in 200-299 or 400-599. An invalid verdict is a
run error: a failed run never yields an accept, so Postfix keeps the mail and retries.

Enhanced status codes come from the basic code (`ENHANCED`), unless the rule's message
starts with one of the same class (`"5.7.1 SPF failed"` with 550 keeps 5.7.1).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmtp.message import SOURCE as SRC
from txcl.envelope import result_of, rid_suffix, section_of, valid_code
from txcl.errors import Problem
from txcl.values import MISSING

log = logging.getLogger("lmtp.verdicts")

MAX_TEXT_LEN = 200
# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets, its CRLF included.
MAX_REPLY_LINE = 510
SCHEMA_FILE = "schemas/lmtp.schema.json"

ENHANCED: Mapping[int, str] = {
    250: "2.0.0",  # OK
    251: "2.1.5",  # user not local; will forward
    252: "2.1.5",  # cannot verify, will attempt delivery
    421: "4.3.2",  # service not available
    450: "4.2.0",  # mailbox unavailable
    451: "4.3.0",  # local error in processing (the tempfail of a failed run)
    452: "4.2.2",  # mailbox full (tenant over quota, docs/lmtp.md)
    550: "5.1.1",  # the default-deny code: no such mailbox here
    551: "5.1.6",  # user not local: mailbox has moved
    552: "5.2.2",  # exceeded storage allocation
    553: "5.1.3",  # mailbox name not allowed
    554: "5.6.0",  # transaction failed
}
CLASS_ENHANCED: Mapping[int, str] = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}
DEFAULT_TEXT: Mapping[int, str] = {2: "OK", 4: "temporary failure", 5: "rejected"}

_ENHANCED_PREFIX = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|\Z)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_RID_LEN = 64  # a ULID (lmtp.ulid) has 26 letters and digits; nothing else is sent


@dataclass(frozen=True, slots=True)
class Reply:
    """One LMTP reply: `Reply(250, "2.0.0", "queued").line == "250 2.0.0 queued"`."""

    code: int
    enhanced: str
    text: str

    @property
    def line(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


def with_rid(reply: Reply, rid: str) -> Reply:
    """The reply with the request id at the end of its text, as Dovecot's replies carry its
    session id: a Postfix log line then leads to the trace (`txco trace RID`). The line stays
    one valid reply line (MAX_REPLY_LINE): the text is shortened, never the id; an id that
    is not a bare token is left out rather than sent."""
    if not (rid.isascii() and rid.isalnum() and len(rid) <= MAX_RID_LEN):
        return reply
    text = reply.text
    if not (text.isascii() and text.isprintable()):  # a Reply not made by make_reply
        text = sanitize_text(text, reply.code)
    suffix = rid_suffix(rid)
    room = MAX_REPLY_LINE - len(reply.enhanced) - len(suffix) - 5  # "250 " and " "
    if len(text) > room:
        text = text[: room - 3].rstrip() + "..."
    return Reply(reply.code, reply.enhanced, text + suffix)


DEFAULT_DENY = Reply(550, "5.1.1", "no rule accepted this recipient")
RUN_FAILED = Reply(451, "4.3.0", "temporary failure processing the message, try again later")


class InvalidVerdict(ValueError):
    """What a rule wrote under `_txc.lmtp.res` cannot be a verdict."""


def sanitize_text(text: object, code: int) -> str:
    """A message safe for one reply line: printable ASCII, bounded, never empty."""
    if text is None:
        text = ""
    elif not isinstance(text, str):
        text = str(text)
    # Controls and every Unicode space or line break become one space: one line, always.
    text = " ".join(_CONTROL.sub(" ", text).split())
    if not text.isascii():
        # Keep what has an ASCII base letter (é -> e); anything else becomes "?".
        decomposed = unicodedata.normalize("NFKD", text)
        text = "".join(
            c if c.isascii() else "?" for c in decomposed if not unicodedata.combining(c)
        )
    if len(text) > MAX_TEXT_LEN:
        text = text[: MAX_TEXT_LEN - 3].rstrip() + "..."
    return text or DEFAULT_TEXT[code // 100]


def make_reply(code: int, msg: object = None) -> Reply:
    """The reply for a valid basic code and a rule's message (sanitised, enhanced code added)."""
    text = sanitize_text(msg, code)
    match = _ENHANCED_PREFIX.match(text)
    if match and int(match.group(1)) == code // 100:
        enhanced = f"{match.group(1)}.{match.group(2)}.{match.group(3)}"
        text = text[match.end():] or DEFAULT_TEXT[code // 100]
    else:
        enhanced = ENHANCED.get(code, CLASS_ENHANCED[code // 100])
    return Reply(code, enhanced, text)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _slot_reply(slot: object, index: int) -> Reply:
    if slot is None:
        return DEFAULT_DENY
    if not isinstance(slot, Mapping):
        raise InvalidVerdict(f"res.recipients.{index} is not an object")
    code = slot.get("code")
    if code is None:
        return DEFAULT_DENY
    if not valid_code(code):
        raise InvalidVerdict(f"res.recipients.{index}.code {_short(code)} is not a reply code")
    return make_reply(code, slot.get("msg"))


def _resolve(res: Mapping[str, Any], n_rcpt: int) -> list[Reply]:
    """Replies from a written `res`; raises InvalidVerdict for anything that is not one."""
    broadcast = res.get("code")
    if broadcast is not None and not valid_code(broadcast):
        raise InvalidVerdict(f"res.code {_short(broadcast)} is not a reply code")
    slots = res.get("recipients")
    if slots is not None:
        if not isinstance(slots, Sequence) or isinstance(slots, str | bytes):
            raise InvalidVerdict("res.recipients is not a list")
        # Every slot is checked, extras included: an invalid code anywhere fails the run.
        replies = [_slot_reply(slot, i) for i, slot in enumerate(slots)]
        if len(replies) > n_rcpt:
            log.warning(
                "lmtp verdict: res.recipients has %d slots for %d recipients; extras ignored",
                len(replies), n_rcpt,
            )
        return replies[:n_rcpt] + [DEFAULT_DENY] * (n_rcpt - len(replies))
    if broadcast is not None:
        return [make_reply(broadcast, res.get("msg"))] * n_rcpt
    return [DEFAULT_DENY] * n_rcpt


def lmtp_res(envelope: Mapping[str, Any] | None) -> object:
    """`_txc.lmtp.res` of an envelope, or None when it is not there."""
    res = result_of(envelope, SRC)
    return None if res is MISSING else res


def replies_for(
    envelope: Mapping[str, Any] | None, n_rcpt: int, error: Problem | None = None
) -> list[Reply]:
    """One reply per recipient of the group, from the run's final envelope and error."""
    if error is not None:
        return [RUN_FAILED] * n_rcpt
    res = lmtp_res(envelope)
    if res is None:
        return [DEFAULT_DENY] * n_rcpt
    if not isinstance(res, Mapping):
        log.warning("lmtp verdict: _txc.lmtp.res is not an object; answering 451")
        return [RUN_FAILED] * n_rcpt
    try:
        return _resolve(res, n_rcpt)
    except InvalidVerdict as bad:
        log.warning("lmtp verdict: invalid verdict (%s); answering 451", bad)
        return [RUN_FAILED] * n_rcpt


@dataclass(frozen=True, slots=True)
class LmtpSource:
    """The `txcl.sources` hook: `txcl test` shows the verdict table the head would send."""

    name: str = SRC

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of `_txc.lmtp` (txcl.schema), shipped as package data."""
        import json
        from importlib.resources import files

        return json.loads(files("lmtp").joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))

    def replies(
        self, envelope: Mapping[str, Any], error: Problem | None = None
    ) -> list[tuple[str, str]]:
        """(recipient, reply line) per `_txc.lmtp.rcpt`; one row "*" when there are none."""
        rcpts = _rcpts(envelope)
        if not rcpts:
            return [("*", replies_for(envelope, 1, error)[0].line)]
        replies = replies_for(envelope, len(rcpts), error)
        return [(rcpt, reply.line) for rcpt, reply in zip(rcpts, replies, strict=True)]

    def envelope_from_message(
        self, raw: bytes, *, rcpts: Sequence[str], mail_from: str, stack: str, stage: int
    ) -> dict[str, Any]:
        """The envelope the head would build for `raw` delivered to `rcpts` of `stack`."""
        from lmtp.message import build_envelope, parse_message
        from lmtp.routing import Route
        from lmtp.ulid import new_ulid

        msg, _defects = parse_message(raw)
        tenant = stack.partition("/")[0]
        return build_envelope(
            rid=new_ulid(),
            route=Route(tenant, stack, "test", f"{stack}/{stage}"),
            listener="default",
            client_ip="127.0.0.1",
            helo="localhost",
            mail_from=mail_from,
            size=len(raw),
            rcpt=rcpts,
            transaction_rcpt=rcpts,
            msg=msg,
        )


def _rcpts(envelope: Mapping[str, Any]) -> list[str]:
    section = section_of(envelope, SRC)
    rcpts = section.get("rcpt") if section is not None else None
    return [str(r) for r in rcpts] if isinstance(rcpts, list) else []


SOURCE = LmtpSource()
