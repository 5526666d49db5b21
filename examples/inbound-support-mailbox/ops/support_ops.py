"""The support mailbox's two ops: CLASSIFY (what is this mail about) and TICKET (file it).

Both are plain Python ops as docs/internals.md describes them: called with the envelope
(read-only), the rule's WITH arguments and an OpContext; they return an RFC 7386 merge
patch that the runner merges into the envelope. txco.yaml names them:

    ops:
      CLASSIFY: {python: "support_ops:classify", path: "ops"}
      TICKET:   {python: "support_ops:ticket", path: "ops"}

CLASSIFY is a keyword scorer, small enough to read in one sitting and deterministic, so the
stack's test cases and a rule author can predict it. TICKET keeps tickets in SQLite under
the tenant's own storage; it is idempotent on Message-ID, because Postfix retries a
delivery that got a 4xx, and threads replies whose subject carries "[#123]".
"""

from __future__ import annotations

import base64
import hashlib
import re
import sqlite3
from collections.abc import Iterable, Mapping
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

# --- CLASSIFY ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signal:
    """One piece of evidence: a regex over a part of the mail and the weight it adds."""

    label: str
    where: str  # subject | body | sender | attachment | auth
    pattern: re.Pattern[str]
    weight: float
    why: str


def _signal(label: str, where: str, pattern: str, weight: float, why: str) -> Signal:
    return Signal(label, where, re.compile(pattern, re.IGNORECASE), weight, why)


# A subject says more than a body: the same word there weighs double (SUBJECT_FACTOR).
SIGNALS: tuple[Signal, ...] = (
    _signal("billing", "text", r"\b(invoice|receipt|refund|charged?|billing|payment|"
            r"subscription|credit card|vat|rechnung)\b", 1.0, "billing words"),
    _signal("billing", "text", r"\b(twice|double|overcharged?)\b", 0.5, "double charge"),
    _signal("billing", "attachment", r"(invoice|receipt|rechnung)", 1.0, "invoice attached"),
    _signal("outage", "text", r"\b(down|outage|unreachable|not reachable|offline|"
            r"nicht erreichbar|störung|ausfall)\b|障害", 1.5, "outage words"),
    _signal("outage", "text", r"\b(5\d\d|timeouts?|timed out|error rate)\b", 1.0,
            "server errors"),
    _signal("outage", "text", r"\b(urgent|asap|production|all users)\b", 0.5, "urgency"),
    _signal("how-to", "text", r"\b(how (do|can|to)|is it possible|where (do|can) i|"
            r"export|import|set ?up|configure|documentation|tutorial)\b", 1.0,
            "question words"),
    _signal("how-to", "text", r"\?", 0.25, "asks a question"),
    _signal("how-to", "attachment", r"\.(png|jpe?g|gif)$", 0.5, "screenshot attached"),
    _signal("spam", "text", r"\b(viagra|casino|lottery|winner|bitcoin|crypto|"
            r"investment opportunity|act now|limited time|100% free|click here)\b", 2.0,
            "spam words"),
    _signal("spam", "text", r"\$\$\$|!!!", 1.5, "shouting money"),
    _signal("spam", "sender", r"^(promo|offers?|deals?|marketing|bulk)[^@]*@", 1.5,
            "bulk sender"),
    _signal("spam", "auth", r"\bspf=(fail|softfail)\b", 2.0, "SPF failed"),
)
LABELS: tuple[str, ...] = ("billing", "outage", "how-to", "spam")
SUBJECT_FACTOR = 2.0
UNCLASSIFIED = "other"


def classify(
    envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: object
) -> dict[str, Any]:
    """Label a mail billing / outage / how-to / spam; "other" when nothing matched.

    Result: {"classify": {"label", "score", "scores", "reasons"}}. `score` is the winning
    label's share of all evidence (0..1, two decimals); `scores` the raw points per label;
    `reasons` one line per signal that fired, e.g. "subject: 'invoice' (billing +2)".
    Ties go to the label listed first in LABELS, so the result never depends on dict order.
    """
    msg = _msg(envelope)
    subject = str(msg.get("subject") or "")
    body = str(msg.get("text") or "") or _strip_tags(str(msg.get("html") or ""))
    senders = [str(a.get("addr") or "") for a in msg.get("from") or () if isinstance(a, Mapping)]
    senders.append(str(_lmtp(envelope).get("mail", {}).get("from") or ""))
    attachments = [str(a.get("name") or "") for a in msg.get("attachments") or ()
                   if isinstance(a, Mapping)]
    auth = [str(h) for h in (msg.get("headers") or {}).get("authentication-results") or ()]

    scores = dict.fromkeys(LABELS, 0.0)
    reasons: list[str] = []

    def hit(signal: Signal, where: str, texts: Iterable[str], factor: float = 1.0) -> None:
        for text in texts:
            found = signal.pattern.search(text)
            if found:
                points = signal.weight * factor
                scores[signal.label] += points
                reasons.append(f"{where}: {found.group(0)!r} ({signal.label} +{points:g})")
                return

    for signal in SIGNALS:
        if signal.where == "text":
            hit(signal, "subject", [subject], SUBJECT_FACTOR)
            hit(signal, "body", [body])
        elif signal.where == "sender":
            hit(signal, "sender", senders)
        elif signal.where == "attachment":
            hit(signal, "attachment", attachments)
        elif signal.where == "auth":
            hit(signal, "auth", auth)
    if subject and len(subject) >= 12 and subject.upper() == subject and any(
        c.isalpha() for c in subject
    ):
        scores["spam"] += 1.0
        reasons.append("subject: all capitals (spam +1)")

    total = sum(scores.values())
    if total == 0:
        return {"classify": {"label": UNCLASSIFIED, "score": 0.0, "scores": scores,
                             "reasons": ["no signal matched"]}}
    label = max(LABELS, key=lambda name: (scores[name], -LABELS.index(name)))
    return {"classify": {"label": label, "score": round(scores[label] / total, 2),
                         "scores": scores, "reasons": reasons}}


def _strip_tags(html: str) -> str:
    return re.sub(r"<[^>]*>", " ", html)


# --- TICKET ------------------------------------------------------------------------------


class StorageContext(Protocol):
    """The part of txcl's OpContext that TICKET uses."""

    tenant: str
    rid: str
    deadline_s: float

    def storage(self, *parts: str) -> Path: ...


class TicketStoreUnavailable(RuntimeError):
    """The SQLite store cannot be opened or stays locked: the run fails, Postfix hears 451
    and retries later. Never swallowed: accepting mail we could not file would lose it."""


DB_NAME = "tickets.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS tickets (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    subject    TEXT NOT NULL,
    requester  TEXT NOT NULL,
    label      TEXT NOT NULL,
    status     TEXT NOT NULL DEFAULT 'open',
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    message_id  TEXT NOT NULL UNIQUE,   -- a retried delivery finds its first row here
    ticket_id   INTEGER NOT NULL REFERENCES tickets(id),
    opened      INTEGER NOT NULL,       -- 1 when this message opened the ticket
    rid         TEXT NOT NULL,
    sender      TEXT NOT NULL,
    subject     TEXT NOT NULL,
    received_at TEXT NOT NULL
);
"""
# Wait at most this long for another writer; longer belongs to Postfix's retry queue.
MAX_LOCK_WAIT_S = 2.0


def ticket(
    envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: StorageContext
) -> dict[str, Any]:
    """File the mail as a ticket, or thread it onto the ticket named by `WITH thread = N`.

    Result: {"ticket": {"id": N, "new": bool, "thread": N, "ref": "#N", "repeat": bool}}.
    `new` is true when this message opened the ticket; `thread` is there only when a reply
    was threaded onto ticket N (a reply to a #N that does not exist opens a ticket of its
    own; and a merge patch cannot say null, which means "delete"); `repeat` is true when
    this Message-ID was filed before (a retried delivery): the answer is then the first
    one, and no row is added.
    Raises TicketStoreUnavailable when the store cannot be opened or written in time.
    """
    msg = _msg(envelope)
    message_id = _message_key(msg)
    wanted = _thread_number(args.get("thread"))
    db_path = ctx.storage("tickets") / DB_NAME
    wait_s = max(0.05, min(MAX_LOCK_WAIT_S, float(ctx.deadline_s) / 2))
    try:
        with closing(sqlite3.connect(db_path, timeout=wait_s, isolation_level=None)) as db:
            db.executescript(SCHEMA)
            db.execute("BEGIN IMMEDIATE")
            try:
                result = _file(db, msg, message_id, wanted, label=_label(envelope),
                               rid=str(ctx.rid))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
    except sqlite3.Error as exc:
        raise TicketStoreUnavailable(f"ticket store {db_path} unavailable: {exc}") from exc
    return {"ticket": result}


def _file(
    db: sqlite3.Connection, msg: Mapping[str, Any], message_id: str, wanted: int | None, *,
    label: str, rid: str,
) -> dict[str, Any]:
    seen = db.execute(
        "SELECT ticket_id, opened FROM messages WHERE message_id = ?", (message_id,)
    ).fetchone()
    if seen:
        ticket_id, opened = seen
        return _answer(ticket_id, new=bool(opened), threaded=not opened, repeat=True)

    subject = str(msg.get("subject") or "")
    sender = _sender(msg)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    exists = wanted is not None and db.execute(
        "SELECT 1 FROM tickets WHERE id = ?", (wanted,)
    ).fetchone()
    if exists:
        ticket_id = wanted
    else:
        ticket_id = db.execute(
            "INSERT INTO tickets (subject, requester, label, created_at) VALUES (?, ?, ?, ?)",
            (subject, sender, label, now),
        ).lastrowid
    db.execute(
        "INSERT INTO messages (message_id, ticket_id, opened, rid, sender, subject, "
        "received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (message_id, ticket_id, 0 if exists else 1, rid, sender, subject, now),
    )
    return _answer(ticket_id, new=not exists, threaded=bool(exists), repeat=False)


def _answer(ticket_id: int, *, new: bool, threaded: bool, repeat: bool) -> dict[str, Any]:
    answer: dict[str, Any] = {"id": ticket_id, "new": new, "ref": f"#{ticket_id}",
                              "repeat": repeat}
    if threaded:
        answer["thread"] = ticket_id
    return answer


def _thread_number(value: object) -> int | None:
    """`WITH thread = match.num` passes the digits as a string; accept an int too."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    text = str(value).strip().lstrip("#")
    return int(text) if text.isdigit() and int(text) > 0 else None


def _message_key(msg: Mapping[str, Any]) -> str:
    """The Message-ID; without one, a digest of the raw bytes, which a retry repeats too."""
    message_id = str(msg.get("id") or "").strip()
    if message_id:
        return message_id
    raw = str(msg.get("raw") or "")
    data = base64.b64decode(raw[4:]) if raw.startswith("b64:") else raw.encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _label(envelope: Mapping[str, Any]) -> str:
    """What CLASSIFY (stage 0) said, when it ran."""
    found = envelope.get("classify")
    return str(found.get("label") or "") if isinstance(found, Mapping) else ""


def _sender(msg: Mapping[str, Any]) -> str:
    for address in msg.get("from") or ():
        if isinstance(address, Mapping) and address.get("addr"):
            return str(address["addr"])
    return ""


# --- envelope access ---------------------------------------------------------------------


def _lmtp(envelope: Mapping[str, Any]) -> Mapping[str, Any]:
    txc = envelope.get("_txc")
    lmtp = txc.get("lmtp") if isinstance(txc, Mapping) else None
    return lmtp if isinstance(lmtp, Mapping) else {}


def _msg(envelope: Mapping[str, Any]) -> Mapping[str, Any]:
    msg = _lmtp(envelope).get("msg")
    return msg if isinstance(msg, Mapping) else {}
