"""The worked example examples/inbound-support-mailbox/: its ops, its stack tests, and the
whole thing behind a real `txco serve`, fed the sample mail over LMTP."""

from __future__ import annotations

import json
import mailbox
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import txco_argv, unrid
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtp.message import parse_message
from txcl.chassis.config import load_config
from txcl.ops import OpContext, OpRegistry

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "inbound-support-mailbox"
SAMPLES = EXAMPLE / "samples"


def _registry() -> OpRegistry:
    """The example's ops exactly as `txco serve` loads them: through txco.yaml's `ops:`."""
    config = load_config(EXAMPLE / "txco.yaml", heads=("lmtp",))
    return OpRegistry.from_config(config.ops, config.base_dir, defaults=False)


REGISTRY = _registry()
CLASSIFY_ENTRY, TICKET_ENTRY = REGISTRY.entry("CLASSIFY"), REGISTRY.entry("TICKET")
assert CLASSIFY_ENTRY is not None and TICKET_ENTRY is not None
CLASSIFY, TICKET = CLASSIFY_ENTRY.fn, TICKET_ENTRY.fn


def _sample_bytes(name: str) -> bytes:
    """A sample as it arrives over LMTP: CRLF line ends."""
    return (SAMPLES / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _envelope(msg: Mapping[str, Any], *, mail_from: str = "", **top: Any) -> dict[str, Any]:
    return {
        "_txc": {
            "src": "lmtp",
            "rid": "01TESTRID",
            "route": {"tenant": "acme", "stack": "acme/support", "ingress": "domain:acme.example",
                      "to": "acme/support/0"},
            "lmtp": {"mail": {"from": mail_from, "size": 0}, "rcpt": ["support@acme.example"],
                     "msg": dict(msg)},
        },
        **top,
    }


def _sample_envelope(name: str) -> dict[str, Any]:
    msg, defects = parse_message(_sample_bytes(name))
    assert defects == [], defects
    return _envelope(msg)


def _msg(subject: str = "", text: str = "", *, message_id: str = "", raw: str = "b64:",
         sender: str = "someone@example.org", **extra: Any) -> dict[str, Any]:
    return {"id": message_id, "subject": subject, "text": text, "html": "",
            "from": [{"name": "", "addr": sender}], "headers": {}, "attachments": [],
            "raw": raw, **extra}


# --- CLASSIFY ----------------------------------------------------------------------------

SAMPLE_LABELS = [
    pytest.param("billing.eml", "billing", id="billing: words and the invoice PDF"),
    pytest.param("howto-screenshot.eml", "how-to", id="how-to with a screenshot"),
    pytest.param("outage.eml", "outage", id="outage: down, 502"),
    pytest.param("outage-utf8-subject.eml", "outage", id="RFC 2047 subject: Störung"),
    pytest.param("reply-to-ticket.eml", "billing", id="reply about the charge"),
    pytest.param("spam.eml", "spam", id="spam: words, sender, SPF softfail"),
    pytest.param("unknown-recipient.eml", "how-to", id="sales question"),
]


@pytest.mark.parametrize(("sample", "label"), SAMPLE_LABELS)
def test_classify_labels_each_sample(sample: str, label: str) -> None:
    result = CLASSIFY(_sample_envelope(sample), {}, None)["classify"]
    assert result["label"] == label
    assert 0.5 <= result["score"] <= 1.0
    assert any(f"({label} +" in reason for reason in result["reasons"])


def test_classify_gives_the_same_answer_every_time() -> None:
    envelope = _sample_envelope("billing.eml")
    assert CLASSIFY(envelope, {}, None) == CLASSIFY(envelope, {}, None)


def test_classify_explains_its_score() -> None:
    envelope = _envelope(_msg("Refund please", "I was charged twice."))
    result = CLASSIFY(envelope, {}, None)["classify"]
    assert result == {
        "label": "billing",
        "score": 1.0,
        "scores": {"billing": 3.5, "outage": 0.0, "how-to": 0.0, "spam": 0.0},
        "reasons": [
            "subject: 'Refund' (billing +2)",
            "body: 'charged' (billing +1)",
            "body: 'twice' (billing +0.5)",
        ],
    }


def test_classify_score_is_the_winners_share_of_the_evidence() -> None:
    envelope = _envelope(_msg("", "The invoice page is down."))
    result = CLASSIFY(envelope, {}, None)["classify"]
    assert result["scores"]["billing"] == 1.0 and result["scores"]["outage"] == 1.5
    assert (result["label"], result["score"]) == ("outage", 0.6)


def test_classify_without_any_signal_says_other() -> None:
    result = CLASSIFY(_envelope(_msg("hello", "just saying hi")), {}, None)["classify"]
    assert (result["label"], result["score"]) == ("other", 0.0)


def test_classify_counts_a_failed_spf_stamp_as_spam() -> None:
    msg = _msg("hello", "just saying hi",
               headers={"authentication-results": ["mx; spf=fail smtp.mailfrom=x.example"]})
    result = CLASSIFY(_envelope(msg), {}, None)["classify"]
    assert result["label"] == "spam"
    assert result["reasons"] == ["auth: 'spf=fail' (spam +2)"]


def test_classify_reads_the_envelope_sender_too() -> None:
    result = CLASSIFY(_envelope(_msg("hello", "hi", sender=""), mail_from="deals@shop.example"),
                      {}, None)["classify"]
    assert result["label"] == "spam"


def test_classify_falls_back_to_the_html_body() -> None:
    msg = _msg("", "", html="<p>Our <b>invoice</b> is wrong</p>")
    assert CLASSIFY(_envelope(msg), {}, None)["classify"]["label"] == "billing"


def test_classify_does_not_mutate_the_envelope() -> None:
    envelope = _sample_envelope("spam.eml")
    before = json.dumps(envelope, sort_keys=True)
    CLASSIFY(envelope, {}, None)
    assert json.dumps(envelope, sort_keys=True) == before


@settings(max_examples=200, deadline=None)
@given(subject=st.text(max_size=80), text=st.text(max_size=300), sender=st.text(max_size=40))
def test_classify_always_returns_a_label_and_a_bounded_score(
    subject: str, text: str, sender: str
) -> None:
    result = CLASSIFY(_envelope(_msg(subject, text, sender=sender)), {}, None)["classify"]
    assert result["label"] in {"billing", "outage", "how-to", "spam", "other"}
    assert 0.0 <= result["score"] <= 1.0
    assert json.loads(json.dumps(result)) == result  # a JSON merge patch, nothing else


# --- TICKET ------------------------------------------------------------------------------


def _ctx(state_dir: Path, *, deadline_s: float = 5.0, rid: str = "01TESTRID") -> OpContext:
    return OpContext(tenant="acme", stack="acme/support", rid=rid, state_dir=state_dir,
                     deadline_s=deadline_s)


def _db(state_dir: Path) -> Path:
    return state_dir / "tenants" / "acme" / "support" / "tickets" / "tickets.sqlite3"


def _rows(state_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(_db(state_dir)) as db:
        return db.execute(sql).fetchall()


def _file(state_dir: Path, message_id: str, subject: str = "Help", **args: Any) -> dict:
    envelope = _envelope(_msg(subject, "body", message_id=message_id),
                         classify={"label": "billing", "score": 1.0})
    return TICKET(envelope, args, _ctx(state_dir))["ticket"]


def test_ticket_opens_a_ticket_in_the_tenants_own_storage(tmp_path: Path) -> None:
    assert _file(tmp_path, "<a@x>", "Charged twice") == {
        "id": 1, "new": True, "ref": "#1", "repeat": False,
    }
    assert _rows(tmp_path, "SELECT id, subject, requester, label, status FROM tickets") == [
        (1, "Charged twice", "someone@example.org", "billing", "open")
    ]


def test_ticket_numbers_new_mail_in_order(tmp_path: Path) -> None:
    assert [_file(tmp_path, f"<{n}@x>")["id"] for n in range(3)] == [1, 2, 3]


def test_a_retried_delivery_never_makes_a_second_ticket(tmp_path: Path) -> None:
    first = _file(tmp_path, "<same@x>")
    again = _file(tmp_path, "<same@x>")
    assert again == {**first, "repeat": True}
    assert _rows(tmp_path, "SELECT count(*) FROM tickets") == [(1,)]
    assert _rows(tmp_path, "SELECT count(*) FROM messages") == [(1,)]


def test_the_store_itself_refuses_a_second_row_for_one_message_id(tmp_path: Path) -> None:
    _file(tmp_path, "<same@x>")
    with pytest.raises(sqlite3.IntegrityError), sqlite3.connect(_db(tmp_path)) as db:
        db.execute("INSERT INTO messages (message_id, ticket_id, opened, rid, sender, subject,"
                   " received_at) VALUES ('<same@x>', 1, 1, 'r', 's', 's', 't')")


def test_a_reply_is_threaded_onto_its_ticket(tmp_path: Path) -> None:
    _file(tmp_path, "<first@x>")
    _file(tmp_path, "<other@x>")
    reply = _file(tmp_path, "<reply@x>", "Re: [#1] Help", thread="1")
    assert reply == {"id": 1, "new": False, "thread": 1, "ref": "#1", "repeat": False}
    assert _rows(tmp_path, "SELECT count(*) FROM tickets") == [(2,)]
    assert _rows(tmp_path, "SELECT message_id, opened FROM messages WHERE ticket_id = 1"
                           " ORDER BY rowid") == [("<first@x>", 1), ("<reply@x>", 0)]


def test_a_retried_reply_stays_threaded(tmp_path: Path) -> None:
    _file(tmp_path, "<first@x>")
    _file(tmp_path, "<reply@x>", thread=1)
    assert _file(tmp_path, "<reply@x>", thread=1) == {
        "id": 1, "new": False, "thread": 1, "ref": "#1", "repeat": True,
    }


def test_a_reply_to_a_ticket_that_does_not_exist_opens_a_new_one(tmp_path: Path) -> None:
    assert _file(tmp_path, "<reply@x>", "Re: [#77] hi", thread="77") == {
        "id": 1, "new": True, "ref": "#1", "repeat": False,
    }


@pytest.mark.parametrize("thread", ["", "abc", "0", "-3", None, True], ids=repr)
def test_a_thread_argument_that_is_not_a_ticket_number_opens_a_new_ticket(
    tmp_path: Path, thread: object
) -> None:
    _file(tmp_path, "<first@x>")
    assert _file(tmp_path, "<second@x>", thread=thread)["id"] == 2


def test_mail_without_message_id_is_keyed_on_its_bytes(tmp_path: Path) -> None:
    def deliver(raw: str) -> dict:
        return TICKET(_envelope(_msg("Help", raw=raw)), {}, _ctx(tmp_path))["ticket"]

    assert deliver("b64:SGVsbG8=")["id"] == 1
    assert deliver("b64:SGVsbG8=") == {"id": 1, "new": True, "ref": "#1",
                                       "repeat": True}
    assert deliver("b64:SGVsbG8h")["id"] == 2
    assert _rows(tmp_path, "SELECT message_id FROM messages ORDER BY rowid")[0][0].startswith(
        "sha256:")


def test_ticket_raises_when_the_store_cannot_be_opened(tmp_path: Path) -> None:
    _db(tmp_path).mkdir(parents=True)  # a directory where the database file should be
    with pytest.raises(RuntimeError, match=r"ticket store .*tickets\.sqlite3 unavailable"):
        _file(tmp_path, "<a@x>")


def test_ticket_raises_when_the_store_stays_locked(tmp_path: Path) -> None:
    _file(tmp_path, "<first@x>")
    holder = sqlite3.connect(_db(tmp_path), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="database is locked"):
            envelope = _envelope(_msg("Help", message_id="<second@x>"))
            TICKET(envelope, {}, _ctx(tmp_path, deadline_s=0.4))
        assert time.monotonic() - started < 2.0  # waits half the deadline, not forever
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert _file(tmp_path, "<second@x>")["id"] == 2  # the retry after the lock is gone works


def test_ticket_needs_a_state_dir(tmp_path: Path) -> None:
    ctx = OpContext(tenant="acme", stack="acme/support", rid="r", state_dir=None, deadline_s=5)
    with pytest.raises(ValueError, match="no state dir"):
        TICKET(_envelope(_msg("Help", message_id="<a@x>")), {}, ctx)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.sampled_from(["<a@x>", "<b@x>", "<c@x>", "<d@x>"]), min_size=1, max_size=12))
def test_any_sequence_of_retries_files_each_message_once(ids: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        state = Path(folder)
        answers = [_file(state, message_id) for message_id in ids]
        first_answer: dict[str, dict] = {}
        for message_id, answer in zip(ids, answers, strict=True):
            expected = first_answer.setdefault(message_id, answer)
            assert answer["id"] == expected["id"]
            assert answer["repeat"] == (answer is not expected)
        distinct = len(first_answer)
        assert _rows(state, "SELECT count(*) FROM tickets") == [(distinct,)]
        assert _rows(state, "SELECT count(*) FROM messages") == [(distinct,)]


# --- the stack's test cases ----------------------------------------------------------------

CASE_FILES = sorted((EXAMPLE / "OPS" / "acme" / "support" / "tests").glob("*.yaml"))


def _cases(path: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    return doc.get("cases", [doc])


@pytest.mark.parametrize("case_file", CASE_FILES, ids=lambda p: p.name)
def test_stubbed_classify_results_are_what_classify_says(case_file: Path) -> None:
    """The cases stub CLASSIFY; keep the stubs honest against the real scorer."""
    for case in _cases(case_file):
        stub = case["ops"]["CLASSIFY"]["classify"]
        message = (case_file.parent / case["input"]["eml"]).resolve()
        real = CLASSIFY(_sample_envelope(message.name), {}, None)["classify"]
        assert (real["label"], real["score"]) == (stub["label"], stub["score"]), case["name"]


def test_every_sample_has_a_stack_test_case() -> None:
    used = {Path(case["input"]["eml"]).name for f in CASE_FILES for case in _cases(f)}
    assert used == {p.name for p in SAMPLES.glob("*.eml")}


def _txcl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "txcl.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_txcl_test_passes_on_the_examples_ops_tree() -> None:
    done = _txcl("test", str(EXAMPLE / "OPS"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_txcl_test_fails_when_a_rule_changes_a_verdict(tmp_path: Path) -> None:
    for name in ("OPS", "samples"):
        shutil.copytree(EXAMPLE / name, tmp_path / "example" / name)
    verdicts = tmp_path / "example" / "OPS" / "acme" / "support" / "1" / "40-verdicts.txcl"
    verdicts.write_text(verdicts.read_text().replace('"no such mailbox"', '"go away"'))
    done = _txcl("test", str(tmp_path / "example" / "OPS"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no such mailbox" in done.stdout + done.stderr


# --- end to end: `txco serve` on the example, the samples over LMTP ------------------------


def _start(serve: Callable[..., Any], tmp_path: Path) -> Any:
    """The example copied to tmp_path and served from there, as the README runs it: the
    working directory's txco.yaml is picked up without --config."""
    for name in ("OPS", "ops", "txco.yaml"):
        source = EXAMPLE / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name)
        else:
            shutil.copy(source, tmp_path / name)
    return serve(tmp_path, tmp_path / "OPS", "", "--lmtp-default-hosts=chassis.example")


def _deliver(server: Any, sample: str, rcpts: list[str], mail_from: str = "sender@example.org"
             ) -> list[str]:
    """One LMTP transaction; the reply line of each recipient, in RCPT order, without the
    request id it ends with."""
    with server.lmtp() as client:
        client.ehlo("mx.acme.example")
        assert client.mail(mail_from)[0] == 250
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250, rcpt
        replies = [client.data(_sample_bytes(sample))]
        replies += [client.getreply() for _ in rcpts[1:]]
    return unrid([f"{code} {text.decode()}" for code, text in replies])


def _store(server: Any) -> Path:
    return server.state_dir / "tenants" / "acme" / "support"


def _tickets(server: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(_store(server) / "tickets" / "tickets.sqlite3") as db:
        return db.execute("SELECT id, label, subject FROM tickets ORDER BY id").fetchall()


def _ticket_messages(server: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(_store(server) / "tickets" / "tickets.sqlite3") as db:
        return db.execute("SELECT ticket_id, opened, message_id FROM messages ORDER BY rowid"
                          ).fetchall()


def _events(server: Any) -> list[dict[str, Any]]:
    log = _store(server) / "events.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


def _message_id(sample: str) -> str:
    return parse_message(_sample_bytes(sample))[0]["id"]


# (sample, recipients, replies): a morning at Acme's support desk, in order.
DELIVERIES = [
    ("billing.eml", ["support@acme.example"], ["250 2.0.0 ticket #1"]),
    ("reply-to-ticket.eml", ["support@acme.example"], ["250 2.0.0 ticket #1"]),
    ("outage.eml", ["support@acme.example"], ["250 2.0.0 ticket #2"]),
    ("outage-utf8-subject.eml", ["acme.support+urgent@chassis.example"],
     ["250 2.0.0 ticket #3"]),
    ("howto-screenshot.eml", ["help@acme.example"], ["250 2.0.0 ticket #4"]),
    ("unknown-recipient.eml", ["sales@acme.example", "support@acme.example"],
     ["550 5.1.1 no such mailbox", "250 2.0.0 ticket #5"]),
    ("spam.eml", ["support@acme.example", "help@acme.example"],
     ["550 5.7.1 rejected as spam", "550 5.7.1 rejected as spam"]),
    ("unknown-recipient.eml", ["nobody@acme.example"], ["550 5.1.1 no such mailbox"]),
]
ACCEPTED = ["billing.eml", "reply-to-ticket.eml", "outage.eml", "outage-utf8-subject.eml",
            "howto-screenshot.eml", "unknown-recipient.eml"]


def test_every_sample_gets_its_verdicts_ticket_archive_and_event(
    serve: Callable[..., Any], tmp_path: Path
) -> None:
    server = _start(serve, tmp_path)
    got = [(sample, rcpts, _deliver(server, sample, rcpts)) for sample, rcpts, _ in DELIVERIES]
    assert got == DELIVERIES

    assert _tickets(server) == [
        (1, "billing", "Charged twice for the March invoice"),
        (2, "outage", "URGENT: dashboard down, 502 errors for all users"),
        (3, "outage", "Störung: API nicht erreichbar — 障害が発生しています"),
        (4, "how-to", "How do I export my reports to CSV?"),
        (5, "how-to", "Is it possible to set up single sign-on with Okta?"),
    ]
    assert _ticket_messages(server) == [
        (1, 1, _message_id("billing.eml")),
        (1, 0, _message_id("reply-to-ticket.eml")),  # the reply joined ticket 1
        (2, 1, _message_id("outage.eml")),
        (3, 1, _message_id("outage-utf8-subject.eml")),
        (4, 1, _message_id("howto-screenshot.eml")),
        (5, 1, _message_id("unknown-recipient.eml")),
    ]

    maildir = mailbox.Maildir(_store(server) / "Maildir", factory=None, create=False)
    archived = sorted(maildir.get_bytes(key) for key in maildir.iterkeys())
    assert archived == sorted(_sample_bytes(sample) for sample in ACCEPTED)  # byte for byte

    events = _events(server)
    assert [e["_txc"]["lmtp"]["msg"]["id"] for e in events] == [
        _message_id(sample) for sample in ACCEPTED]
    assert [e["ticket"]["id"] for e in events] == [1, 1, 2, 3, 4, 5]
    assert [e["classify"]["label"] for e in events] == [
        "billing", "billing", "outage", "outage", "how-to", "how-to"]
    screenshot = events[4]["_txc"]["lmtp"]["msg"]
    assert "raw" not in screenshot  # EMIT leaves the bytes out unless asked
    assert screenshot["attachments"] == [
        {k: v for k, v in a.items() if k != "content"}
        for a in parse_message(_sample_bytes("howto-screenshot.eml"))[0]["attachments"]]


def test_a_retried_delivery_gets_the_same_ticket(serve: Callable[..., Any], tmp_path: Path
                                                 ) -> None:
    server = _start(serve, tmp_path)
    rcpts = ["support@acme.example"]
    assert _deliver(server, "billing.eml", rcpts) == ["250 2.0.0 ticket #1"]
    assert _deliver(server, "billing.eml", rcpts) == ["250 2.0.0 ticket #1"]
    assert _ticket_messages(server) == [(1, 1, _message_id("billing.eml"))]
    # EMIT acts once per delivery: the repeat finds the first one's event, not a second.
    assert [e["ticket"] for e in _events(server)] == [
        {"id": 1, "new": True, "ref": "#1", "repeat": False},
    ]


def test_a_locked_ticket_store_tempfails_and_the_retry_files_it_once(
    serve: Callable[..., Any], tmp_path: Path
) -> None:
    server = _start(serve, tmp_path)
    rcpts = ["support@acme.example", "help@acme.example"]
    assert _deliver(server, "billing.eml", rcpts[:1]) == ["250 2.0.0 ticket #1"]

    holder = sqlite3.connect(_store(server) / "tickets" / "tickets.sqlite3",
                             isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        replies = _deliver(server, "outage.eml", rcpts)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [line[:9] for line in replies] == ["451 4.3.0", "451 4.3.0"]
    assert len(_events(server)) == 1  # nothing after the failed TICKET ran

    assert _deliver(server, "outage.eml", rcpts) == ["250 2.0.0 ticket #2"] * 2
    assert _tickets(server)[-1][:2] == (2, "outage")
    assert len(_ticket_messages(server)) == 2


def test_traces_leave_out_the_raw_message_and_attachments(
    serve: Callable[..., Any], tmp_path: Path
) -> None:
    server = _start(serve, tmp_path)
    assert _deliver(server, "howto-screenshot.eml", ["help@acme.example"]) == [
        "250 2.0.0 ticket #1"]
    message = parse_message(_sample_bytes("howto-screenshot.eml"))[0]
    secrets = [message["raw"][4:80], message["attachments"][0]["content"][4:80]]

    deadline = time.monotonic() + 10  # traces are written in the background
    while time.monotonic() < deadline and not list((server.state_dir / "requests").glob("*/*")):
        time.sleep(0.05)
    files = [p for p in (server.state_dir / "requests").rglob("*") if p.is_file()]
    assert files, "no trace was written"
    text = "\n".join(p.read_text(errors="replace") for p in files)
    assert "How do I export my reports to CSV?" in text
    assert not [s for s in secrets if s in text]

    shown = subprocess.run([*txco_argv(), "trace", "--state-dir", str(server.state_dir)],
                           capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "acme/support" in shown.stdout and "ticket #1" in shown.stdout


def test_the_poison_message_is_stored_once_with_its_event(
    serve: Callable[..., Any], tmp_path: Path
) -> None:
    """8-bit bytes in a display name to support@ once made EMIT fail on every retry (451),
    and ARCHIVE, before it, store one more copy each time (issue 13)."""
    server = _start(serve, tmp_path)
    poison = (b"From: J\xe9r\xf4me <jerome@example.org>\r\nSubject: invoice charged twice\r\n"
              b"Message-ID: <poison@example.org>\r\n\r\nplease refund\r\n")
    codes = []
    for _ in range(3):
        with server.lmtp() as client:
            client.ehlo("mx.acme.example")
            client.mail("jerome@example.org")
            client.rcpt("support@acme.example")
            codes.append(client.data(poison)[0])
    stored = [p for p in _store(server).rglob("*") if p.is_file() and p.parent.name == "new"]
    assert codes == [250, 250, 250], server.stderr()
    assert len(stored) == 1
    assert [e["ticket"]["id"] for e in _events(server)] == [1]
