"""lmtp.mime: the envelope's MIME fields without waste, bounded, and the same as the email
package's (the reference: `parse_message` with nothing elided, `REFERENCE`)."""

from __future__ import annotations

import base64
import hashlib
import threading
import tracemalloc
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtp.message import (
    ATTACHMENT_CONTENT,
    EVERYTHING,
    MSG_FIELDS,
    MessageNeeds,
    needs_of_path,
    parse_message,
)
from lmtp.mime import MimeLimits, ParseCancelled, parse_tree
from lmtp.mime import _base64_stats as base64_stats
from tests.test_message import MIMEISH

SAMPLES = sorted((Path(__file__).parent.parent / "examples" / "inbound-support-mailbox"
                  / "samples").glob("*.eml"))
REFERENCE = MimeLimits(elide_min_bytes=None)  # the email package reads every byte
ELIDE_ALL = MimeLimits(elide_min_bytes=1)  # every body run is replaced, however small
# What a body-reading stack builds: headers, subject, sender, the bodies, attachment facts.
BODY_READER = MessageNeeds(frozenset({"subject", "from", "headers", "text", "html",
                                      "attachments"}), None)


def with_attachments(body: str = "plain body\n", count: int = 2, size: int = 5000,
                     html: bool = True) -> bytes:
    em = EmailMessage()
    em["From"] = "Alice <alice@example.com>"
    em["To"] = "support@acme.example"
    em["Subject"] = "invoice"
    em.set_content(body)
    if html:
        em.add_alternative("<p>html body</p>\n", subtype="html")
    for index in range(count):
        blob = hashlib.sha256(str(index).encode()).digest() * (size // 32 + 1)
        em.add_attachment(blob[:size], maintype="application", subtype="pdf",
                          filename=f"file{index}.pdf")
    inner = EmailMessage()
    inner["Subject"] = "forwarded"
    inner.set_content("inner body\n" * 500)
    em.add_attachment(inner)
    em.add_attachment("x" * 3000, subtype="csv", filename="data.csv")
    return em.as_bytes()


def restricted(msg: dict, needs: MessageNeeds) -> dict:
    out = {name: value for name, value in msg.items() if name in needs.fields}
    if needs.header_names is not None and "headers" in out:
        out["headers"] = {k: v for k, v in out["headers"].items() if k in needs.header_names}
    if ATTACHMENT_CONTENT not in needs.fields and "attachments" in out:
        out["attachments"] = [{k: v for k, v in a.items() if k != "content"}
                              for a in out["attachments"]]
    return out


def assert_same_as_reference(data: bytes, limits: MimeLimits = ELIDE_ALL) -> None:
    reference, _ = parse_message(data, EVERYTHING, limits=REFERENCE)
    for needs in (BODY_READER, EVERYTHING):
        msg, _ = parse_message(data, needs, limits=limits)
        assert msg == restricted(reference, needs)


CORPUS = [*(path.read_bytes() for path in SAMPLES), with_attachments(),
          with_attachments(html=False, count=1, size=200_000)]


@pytest.mark.parametrize("data", CORPUS, ids=[p.name for p in SAMPLES] + ["multipart", "big"])
def test_a_body_reading_envelope_equals_the_email_packages_field_for_field(data):
    assert_same_as_reference(data)
    assert_same_as_reference(data, MimeLimits())


def test_big_bodies_are_really_replaced_before_the_parse():
    data = with_attachments(body="plain body\n" * 1000, count=3, size=100_000)
    tree = parse_tree(data)
    assert len(tree.runs) >= 4  # the text body and three attachments at least
    assert sum(run.end - run.start for run in tree.runs) > 0.9 * len(data) - 20_000
    assert_same_as_reference(data, MimeLimits())


@settings(max_examples=300, deadline=None)
@given(st.one_of(MIMEISH, st.lists(st.sampled_from([
    b"Content-Type: multipart/mixed; boundary=b\r\n", b"Content-Type: message/rfc822\r\n",
    b"Content-Type: multipart/alternative; boundary=c\r\n", b"Content-Type: text/plain\r\n",
    b"Content-Type: text/html\r\n", b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n", b"Content-Disposition: attachment\r\n",
    b"\r\n", b"\n", b"\r", b"--b\r\n", b"--b--\r\n", b"--c\r\n", b"--c--\n", b"-- \r\n",
    b"QUJD\r\n", b"QUI=\r\n", b"QQ\r\n", b"=41=\r\n", b"caf\xe9 x\r\n", b"x: y\r\n",
]), max_size=40).map(b"".join)))
def test_mime_shaped_input_gives_the_reference_fields(data):
    assert_same_as_reference(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"QUJD", b"QUI=", b"QQ==", b"QQ", b"Q", b"\r\n", b"\n", b"=",
                                 b"!", b" ", b"\xff", b"A" * 64]), max_size=30),
       st.integers(min_value=1, max_value=40))
def test_base64_decoded_a_slice_at_a_time_is_the_email_packages_decoding(pieces, split):
    body = b"".join(pieces) + b"\r\n"
    data = (b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b"\r\n" + body)
    expected = BytesParser(policy=default).parsebytes(data).get_payload(decode=True)
    tree = parse_tree(data, ELIDE_ALL)
    leaf = tree.root
    segments = tree.segments(leaf)
    assert segments is not None
    joined = b"".join(segments)
    size, sha256, content = base64_stats([joined[:split], joined[split:]], leaf, keep=True)
    assert (size, sha256, content) == (len(expected), hashlib.sha256(expected).hexdigest(),
                                       expected)


def test_attachment_content_is_its_own_need():
    msg_path = ("_txc", "lmtp", "msg", "attachments")
    assert ATTACHMENT_CONTENT not in needs_of_path((*msg_path, 0, "sha256")).fields
    assert ATTACHMENT_CONTENT in needs_of_path((*msg_path, 0, "content")).fields
    assert ATTACHMENT_CONTENT in needs_of_path(msg_path).fields
    data = with_attachments()
    facts, _ = parse_message(data, needs_of_path((*msg_path, 0, "name")))
    assert facts["attachments"] and all("content" not in a for a in facts["attachments"])
    full, _ = parse_message(data)
    assert [base64.b64decode(a["content"][4:]) for a in full["attachments"]][0][:4] != b""


def big_multipart(size: int) -> tuple[bytes, bytes]:
    em = EmailMessage()
    em["From"] = "alice@example.com"
    em["Subject"] = "big"
    em.set_content("the text part: please unsubscribe me\n")
    blob = hashlib.sha256(b"seed").digest() * (size * 3 // 4 // 32)
    em.add_attachment(blob, maintype="application", subtype="octet-stream", filename="big.bin")
    return em.as_bytes(), blob


def test_a_big_attachment_is_hashed_in_slices_not_copied():
    data, blob = big_multipart(8 * 2**20)
    tracemalloc.start()
    try:
        msg, defects = parse_message(data, BODY_READER)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert defects == []
    assert msg["text"] == "the text part: please unsubscribe me\n"
    assert msg["attachments"] == [{"name": "big.bin", "type": "application/octet-stream",
                                   "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}]
    assert peak < 0.5 * len(data), peak


def many_parts(count: int) -> bytes:
    part = b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n"
    return (b"Subject: parts\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            + part * count + b"--b--\r\n")


def test_past_the_part_bound_the_envelope_says_truncated():
    msg, defects = parse_message(many_parts(50), limits=MimeLimits(max_parts=10))
    assert msg["truncated"] is True
    assert len(msg["attachments"]) <= 10
    assert any("truncated" in d for d in defects)
    msg, _ = parse_message(many_parts(5), limits=MimeLimits(max_parts=10))
    assert msg["truncated"] is False and len(msg["attachments"]) == 4


def test_past_the_depth_bound_the_envelope_says_truncated():
    depth = 200
    head = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
                    for i in range(depth))
    data = (b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n" + head
            + b"--b%d\r\nContent-Type: text/plain\r\n\r\ndeep\r\n" % depth)
    msg, defects = parse_message(data, limits=MimeLimits(max_depth=20))
    assert msg["truncated"] is True
    assert any("deeper than 20" in d for d in defects)


@pytest.mark.parametrize("eol", [b"\r\n", b"\n", b"\r"])
def test_past_the_header_line_bound_headers_are_cut_alike_in_every_parse(eol):
    head = b"Subject: bomb" + eol + (b"X-Junk: v" + eol) * 300
    data = head + b"Content-Type: text/plain" + eol + eol + b"the body" + eol
    limits = MimeLimits(max_header_lines=100)
    full, defects = parse_message(data, limits=limits)
    assert full["truncated"] is True and full["text"].rstrip("\r\n") == "the body"
    assert full["subject"] == "bomb" and len(full["headers"]["x-junk"]) == 99
    assert any("more than 100 header lines" in d for d in defects)
    for needs in (MessageNeeds(frozenset({"headers"}), None),
                  MessageNeeds(frozenset({"subject", "headers"}), frozenset({"x-junk"}))):
        assert parse_message(data, needs, limits=limits)[0] == restricted(full, needs)
    assert parse_message(data)[0]["truncated"] is False  # within the default bound


def test_a_set_cancel_flag_stops_the_parse():
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ParseCancelled):
        parse_message(many_parts(100), cancel=cancel)
    assert parse_message(many_parts(3), MessageNeeds(frozenset({"subject"}), frozenset()),
                         cancel=cancel)[0] == {"subject": "parts"}  # no MIME walk to cancel


def test_every_field_is_built_with_a_truncated_flag():
    msg, _ = parse_message(b"Subject: x\r\n\r\nbody\r\n")
    assert set(msg) == set(MSG_FIELDS) and msg["truncated"] is False


# --- in the deliverer: what a trace writer stores, and cancellation ------------------------

import asyncio  # noqa: E402
import time  # noqa: E402

from lmtp.delivery import Deliverer, _parse  # noqa: E402
from tests.test_delivery import ACME, FakeStack, Tree, accept_support, transaction  # noqa: E402


class SubjectOnlyTraces:
    """A trace sink that stores the subject and the raw bytes of the message, no more."""

    mode = "all"
    message_needs = MessageNeeds(frozenset({"subject", "raw"}), frozenset())

    def __call__(self, *args, **kwargs) -> None:
        pass


class TextReader(FakeStack):
    rules = [type("Rule", (), {"reads": frozenset({("_txc", "lmtp", "msg", "text")}),
                               "jsonpaths": frozenset(), "ops": ()})()]


def test_a_trace_sink_that_declares_its_needs_gets_those_and_the_stacks_not_everything():
    stack = TextReader("acme/_mail", accept_support)
    deliverer = Deliverer(Tree({"acme/_mail": stack}), None, policy=object(),
                          trace_sink=SubjectOnlyTraces())
    assert asyncio.run(deliverer.deliver(transaction(("support@acme.example", ACME),
                                                     data=with_attachments())))
    assert set(stack.seen[0]["_txc"]["lmtp"]["msg"]) == {"subject", "raw", "text"}


def test_a_cancelled_delivery_frees_its_parse_thread():
    flood = many_parts(40_000)  # unbounded, its parse would take far longer than 5 s
    unbounded = MimeLimits(max_parts=10**7, elide_min_bytes=None)

    async def cancel_a_parse() -> float:
        parse = asyncio.create_task(_parse(flood, EVERYTHING, unbounded))
        await asyncio.sleep(0.5)  # the parse is running in its worker thread
        parse.cancel()
        with pytest.raises(asyncio.CancelledError):
            await parse
        started = time.monotonic()
        # one worker only: the next job runs once the cancelled parse has let go of it
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(single, time.monotonic)
        return time.monotonic() - started

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as single:
        async def main() -> float:
            asyncio.get_running_loop().set_default_executor(single)
            return await cancel_a_parse()

        assert asyncio.run(main()) < 5


@pytest.mark.parametrize(("data", "needs"), [
    pytest.param(many_parts(1500), BODY_READER, id="64 KiB of tiny parts"),
    pytest.param(b"Subject: x\r\n" + b"X-Junk: v\r\n" * 20_000 + b"\r\nbody\r\n",
                 MessageNeeds(frozenset({"subject"}), frozenset()), id="a long header section"),
])
def test_a_short_but_long_to_parse_message_is_parsed_off_the_event_loop(data, needs):
    assert len(data) <= 256 * 1024

    async def ticks_during_the_parse() -> int:
        ticks = 0
        parsing = True

        async def tick() -> None:
            nonlocal ticks
            while parsing:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        before = ticks
        await _parse(data, needs, MimeLimits())
        during = ticks - before
        parsing = False
        await ticker
        return during

    assert asyncio.run(ticks_during_the_parse()) > 1  # inline, the loop would not tick at all
    assert asyncio.run(_parse(SAMPLES[0].read_bytes(), BODY_READER, MimeLimits()))  # inline


def plain_text(size: int) -> bytes:
    return b"Subject: plain\r\nFrom: a@example.com\r\n\r\n" + b"0123456789" * (size // 10)


@pytest.mark.parametrize(("data", "needs"), [
    pytest.param(plain_text(200 * 1024), BODY_READER, id="200 KiB of plain text"),
    pytest.param(plain_text(100 * 1024), MessageNeeds(frozenset({"subject"}), frozenset()),
                 id="100 KiB, header fields only"),
    pytest.param(with_attachments(), BODY_READER, id="a small multipart"),
])
def test_a_plain_text_message_or_a_short_one_is_parsed_and_digested_on_the_loop(
        data, needs, monkeypatch):
    from txcl.ops import message_digest

    def no_thread(*args, **kwargs):
        raise AssertionError("a thread hop for a message the loop parses in C passes")

    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    msg, defects, digest = asyncio.run(_parse(data, needs, MimeLimits(), True))
    assert (msg, defects) == parse_message(data, needs)
    assert digest == message_digest(data)


@pytest.mark.parametrize(("data", "needs"), [
    pytest.param(plain_text(300 * 1024), BODY_READER, id="300 KiB of plain text"),
    pytest.param(with_attachments(count=3, size=100_000), BODY_READER, id="a big multipart"),
    pytest.param(many_parts(1500), BODY_READER, id="64 KiB of tiny parts"),
    pytest.param(plain_text(300 * 1024), MessageNeeds(frozenset({"subject"}), frozenset()),
                 id="300 KiB, header fields only"),
])
def test_what_goes_to_a_thread_takes_the_digest_along(data, needs, monkeypatch):
    from txcl.ops import message_digest

    hops = []
    to_thread = asyncio.to_thread

    async def counted(fn, *args, **kwargs):
        hops.append(fn)
        return await to_thread(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    msg, defects, digest = asyncio.run(_parse(data, needs, MimeLimits(), True))
    assert len(hops) == 1  # one hop for the parse and the digest
    assert (msg, defects) == parse_message(data, needs)
    assert digest == message_digest(data)
    hops.clear()
    assert asyncio.run(_parse(data, needs, MimeLimits()))[2] == b""  # no digest asked for


def test_a_message_with_a_placeholders_text_of_its_own_is_parsed_as_it_is():
    data = (b"Subject: tricky\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            b"--b\r\nContent-Type: text/plain\r\nX-Note: \x00txcl-elided-0\x00\r\n\r\n"
            + b"the text\r\n" * 100 + b"--b\r\nContent-Type: application/octet-stream\r\n\r\n"
            + b"\x00txcl-elided-1\x00\r\n" * 100 + b"--b--\r\n")
    assert parse_tree(data, ELIDE_ALL).runs == []
    assert_same_as_reference(data)


class SetAfter(threading.Event):
    """An event that reads as set from its `checks`-th check on."""

    def __init__(self, checks: int) -> None:
        super().__init__()
        self.left = checks

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0 or super().is_set()


def test_a_cancel_between_attachments_is_not_taken_for_a_broken_field():
    import traceback

    data = with_attachments(count=5, size=100)
    checks = 0
    while True:  # the first check that falls inside the attachments loop
        with pytest.raises(ParseCancelled) as raised:
            parse_message(data, BODY_READER, cancel=SetAfter(checks))
        frames = [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)]
        if "_attachments" in frames:
            break
        checks += 1
        assert checks < 20, frames


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"--\r\n", b"--x\n", b"-\r\n", b"a-b-c\r\n", b"\r--", b"x\r\n",
                                 b"Subject: s\r\n", b"\r\n", b"---"]), max_size=14).map(b"".join),
       st.integers(0, 4))
def test_exceeds_parts_says_when_a_single_part_parse_stops_at_the_parts_bound(data, max_parts):
    from lmtp.mime import exceeds_parts

    truncated = parse_tree(data, MimeLimits(max_parts=max_parts)).truncated
    assert exceeds_parts(data, max_parts) == ("parts" in truncated)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from([b"--", b"-", b"\r", b"\n", b"\r\n", b"x", b"-x-", b"---\n"]),
                max_size=60).map(b"".join), st.integers(0, 6), st.sampled_from([0, 1, 3, 64]))
def test_dash_lines_are_the_first_line_starts_with_two_dashes(data, most, misses):
    from lmtp.mime import _dash_lines

    starts = [p for p in range(len(data))
              if data.startswith(b"--", p) and (p == 0 or data[p - 1:p] in (b"\r", b"\n"))]
    assert _dash_lines(data, most, misses) == starts[:most]  # both ways of finding them
