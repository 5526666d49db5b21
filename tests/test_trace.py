"""The trace writer: what lands in requests/<rid>/, scrubbing, modes, retention, failures."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import unrid
from hypothesis import given, settings
from hypothesis import strategies as st

from txcl.errors import Pos, Problem
from txcl.records import ExecRecord, Fired, SetRecord, StackResult, WhenOutcome
from txcl.trace import (
    REDACTED,
    Scrubber,
    ScrubHints,
    TraceRecord,
    build_artifacts,
    parse_hint_path,
)
from txcl.trace_files import umask_keeps_owner_bits
from txcl.trace_store import (
    StagedMessage,
    read_summaries,
    read_trace,
    trace_names,
)
from txcl.trace_writer import STAGE_FROM_BYTES, TraceWriter

SECRET_AUTH = "Bearer sk-live-0123456789"
RAW = "b64:UmVjZWl2ZWQ6IGZyb20gbWFpbC5leGFtcGxlLmNvbQ=="


@dataclass(frozen=True)
class FakeStack:
    name: str
    hints: Any


def envelope() -> dict[str, Any]:
    return {
        "_txc": {
            "src": "lmtp",
            "rid": "01TEST",
            "route": {"tenant": "acme", "stack": "acme/_mail", "to": "acme/_mail/0"},
            "lmtp": {
                "rcpt": ["support@acme.example"],
                "msg": {
                    "subject": "wifi keeps dropping",
                    "raw": RAW,
                    "attachments": [{"name": "a.pdf", "content": "b64:AAAA"}],
                    "headers": {"authorization": [SECRET_AUTH], "subject": ["wifi"]},
                },
            },
        }
    }


def result_for(env: dict[str, Any], error: Problem | None = None) -> StackResult:
    final = json.loads(json.dumps(env))
    final["_txc"]["lmtp"]["res"] = {"code": 250, "msg": "queued"}
    pos = Pos("OPS/acme/_mail/0/10.txcl", 3, 1)
    when = WhenOutcome("@lmtp.msg.headers.authorization.0 =~ /Bearer (?P<tok>.*)/", pos, True)
    return StackResult(
        envelope=final,
        fired=(Fired(0, pos, pos.file, (when,), {"tok": SECRET_AUTH[7:]}),),
        steps=(
            SetRecord(0, pos, ("_txc", "lmtp", "res", "code"), after=250),
            ExecRecord(
                0,
                pos,
                op="ARCHIVE",
                args={"auth": SECRET_AUTH, "note": "x"},
                patch={"_txc": {"lmtp": {"msg": {"raw": RAW}}}, "ticket": {"id": 7}},
                executed=True,
                elapsed_s=0.002,
            ),
            SetRecord(0, pos, ("_txc", "lmtp", "msg"), before=env["_txc"]["lmtp"]["msg"]),
        ),
        error=error,
        elapsed_s=0.001,
    )


HINTS = ScrubHints(
    omit=("_txc.lmtp.msg.raw", "_txc.lmtp.msg.attachments"),
    redact=("_txc.lmtp.msg.headers.authorization",),
)


def write_one(tmp_path: Path, hints: Any = HINTS, **kw: Any) -> dict[str, Any]:
    env = envelope()
    writer = TraceWriter(tmp_path, **kw)
    try:
        writer(
            "01TEST",
            env,
            result_for(env),
            [("support@acme.example", "250 2.0.0 queued")],
            FakeStack("acme/_mail", hints),
        )
        assert writer.flush()
    finally:
        writer.close()
    return read_trace(tmp_path, "01TEST")


def all_text(trace: dict[str, Any]) -> str:
    return json.dumps(trace)


def test_a_trace_is_one_compact_file_of_five_parts(tmp_path: Path) -> None:
    trace = write_one(tmp_path)
    folder = tmp_path / "requests" / "01TEST"
    assert [p.name for p in folder.iterdir()] == ["trace.jsonl"]  # raw omitted: no message
    lines = (folder / "trace.jsonl").read_bytes().splitlines()
    assert [next(iter(json.loads(line))) for line in lines] == [
        "summary", "envelope", "steps", "result", "response"]
    assert all(b"\n" not in line and b": " not in line[:40] for line in lines)  # compact
    assert trace["summary"]["rid"] == "01TEST"
    assert trace["summary"]["src"] == "lmtp"
    assert trace["summary"]["stack"] == "acme/_mail"
    assert trace["summary"]["route"]["to"] == "acme/_mail/0"
    assert trace["summary"]["recipients"] == [{"rcpt": "support@acme.example", "code": 250}]
    assert trace["response"]["replies"] == [
        {"rcpt": "support@acme.example", "code": 250, "line": "250 2.0.0 queued"}
    ]
    assert trace["result"]["res"] == {"code": 250, "msg": "queued"}
    assert trace["steps"]["fired"][0]["pos"] == "OPS/acme/_mail/0/10.txcl:3:1"
    first_step = trace["steps"]["steps"][0]
    assert first_step == {
        "kind": "set",
        "stage": 0,
        "pos": "OPS/acme/_mail/0/10.txcl:3:1",
        "path": "_txc.lmtp.res.code",
        "after": 250,
    }


def test_omit_and_redact_apply_to_every_artifact(tmp_path: Path) -> None:
    trace = write_one(tmp_path)
    text = all_text(trace)
    assert RAW not in text
    assert "a.pdf" not in text
    assert SECRET_AUTH not in text
    assert SECRET_AUTH[7:] not in text  # the regex group copied out of the header
    msg = trace["envelope"]["_txc"]["lmtp"]["msg"]
    assert "raw" not in msg and "attachments" not in msg
    assert msg["headers"]["authorization"] == REDACTED
    assert msg["subject"] == "wifi keeps dropping"  # unscrubbed paths stay
    exec_step = trace["steps"]["steps"][1]
    assert exec_step["args"] == {"auth": REDACTED, "note": "x"}
    assert exec_step["patch"] == {"_txc": {"lmtp": {"msg": {}}}, "ticket": {"id": 7}}
    whole_msg_step = trace["steps"]["steps"][2]
    assert "raw" not in whole_msg_step["before"]
    assert whole_msg_step["before"]["headers"]["authorization"] == REDACTED


def test_the_run_objects_are_not_mutated_by_scrubbing(tmp_path: Path) -> None:
    env = envelope()
    before = json.dumps(env, sort_keys=True)
    result = result_for(env)
    final_before = json.dumps(result.envelope, sort_keys=True)
    writer = TraceWriter(tmp_path)
    writer("01TEST", env, result, [("a@b", "250 ok")], FakeStack("acme/_mail", HINTS))
    writer.flush()
    writer.close()
    assert json.dumps(env, sort_keys=True) == before
    assert json.dumps(result.envelope, sort_keys=True) == final_before
    assert result.steps[1].args["auth"] == SECRET_AUTH


def test_hints_may_come_as_a_mapping_or_comma_lists(tmp_path: Path) -> None:
    trace = write_one(
        tmp_path,
        hints={
            "omit": "_txc.lmtp.msg.raw, _txc.lmtp.msg.attachments",
            "redact": ["_txc.lmtp.msg.headers.authorization"],
        },
    )
    assert RAW not in all_text(trace) and SECRET_AUTH not in all_text(trace)


def test_hints_as_the_runner_gives_them(tmp_path: Path) -> None:
    from txcl.compiler import compile_file
    from txcl.parser import parse
    from txcl.runner import Stack, Stage

    rules = (
        'WITH omit = "_txc.lmtp.msg.raw, @lmtp.msg.attachments"\n'
        'WITH redact = "_txc.lmtp.msg.headers.authorization"\nEXEC "op://A"\n'
    )
    hints = Stack("acme/_mail", (Stage(0, compile_file(parse(rules, "r.txcl"))),)).hints
    assert (set(hints.omit), hints.redact) == (set(HINTS.omit), HINTS.redact)
    trace = write_one(tmp_path, hints=hints)
    assert RAW not in all_text(trace) and SECRET_AUTH not in all_text(trace)


def test_no_hints_keeps_everything(tmp_path: Path) -> None:
    trace = write_one(tmp_path, hints=None)
    assert trace["envelope"]["_txc"]["lmtp"]["msg"]["raw"] == RAW


def test_a_copy_inside_a_longer_string_is_redacted_in_place() -> None:
    env = envelope()
    result = StackResult(
        envelope=env,
        fired=(),
        steps=(
            SetRecord(0, Pos("f", 1, 1), ("ticket", "title"), after="auth was " + SECRET_AUTH),
        ),
    )
    record = TraceRecord("r", 0.0, env, result, (), "acme/_mail", HINTS)
    steps = build_artifacts(record).parts["steps"]["steps"]
    assert steps[0]["after"] == "auth was " + REDACTED


def test_errors_mode_keeps_failed_runs_and_tempfails_only(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, mode="errors")
    env = envelope()
    stack = FakeStack("acme/_mail", HINTS)
    assert not writer("ok", env, result_for(env), [("a@b", "250 2.0.0 ok")], stack)
    assert not writer("deny", env, result_for(env), [("a@b", "550 5.1.1 no")], stack)
    boom = Problem("txcl_run_error", "op ARCHIVE timed out", Pos("f", 2, 1))
    assert writer("failed", env, result_for(env, boom), [("a@b", "451 4.3.0 x")], stack)
    assert writer("late", env, None, [("a@b", "451 4.4.7 timeout")], stack, error="deadline")
    assert not writer("nostack", env, None, [("a@b", "550 5.1.1 no rule")], "acme/none")
    writer.flush()
    writer.close()
    assert sorted(trace_names(tmp_path)) == ["failed", "late"]
    failed = read_trace(tmp_path, "failed")
    assert failed["result"]["error"]["message"] == "op ARCHIVE timed out"
    assert failed["result"]["error"]["location"] == {"file": "f", "line": 2, "column": 1}
    assert failed["summary"]["error"] == "op ARCHIVE timed out"
    assert read_trace(tmp_path, "late")["summary"]["error"] == "deadline"
    assert writer.stats().skipped == 3


def test_off_mode_writes_nothing_and_starts_no_thread(tmp_path: Path) -> None:
    before = threading.active_count()
    writer = TraceWriter(tmp_path, mode="off")
    env = envelope()
    assert not writer("r", env, result_for(env), [], None)
    assert threading.active_count() == before
    assert not (tmp_path / "requests").exists()


def test_unknown_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="all, errors, off"):
        TraceWriter(tmp_path, mode="some")  # type: ignore[arg-type]


def test_a_file_where_the_requests_folder_should_be_loses_the_trace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "requests").write_text("not a folder")
    writer = TraceWriter(tmp_path, log_interval_s=3600)
    env = envelope()
    for rid in ("r1", "r2", "r3"):
        assert writer(rid, env, result_for(env), [], None) is True
    assert writer.flush()
    writer.close()
    assert writer.stats().failed == 3 and writer.stats().written == 0
    losses = [r for r in caplog.records if r.name == "txcl.trace"]
    assert len(losses) == 1  # logged once per interval, not once per trace
    assert "cannot write r1" in losses[0].getMessage()


def stalled_writer(tmp_path: Path, **kw: Any) -> tuple[TraceWriter, threading.Event]:
    """A writer whose thread waits (at most 5 s) for the event before each write."""
    writer = TraceWriter(tmp_path, **kw)
    gate = threading.Event()
    real_write = writer.write

    def slow_write(record: TraceRecord) -> str:
        gate.wait(5)
        return real_write(record)

    writer.write = slow_write  # type: ignore[method-assign]
    return writer, gate


def test_a_full_queue_drops_instead_of_blocking(tmp_path: Path) -> None:
    writer, gate = stalled_writer(tmp_path, queue_size=2)
    env = envelope()
    started = time.monotonic()
    accepted = [writer(f"r{i}", env, result_for(env), [], None) for i in range(20)]
    assert time.monotonic() - started < 2.5  # a blocking writer would take 5 s per call
    gate.set()
    writer.flush()
    writer.close()
    assert accepted.count(False) == writer.stats().dropped >= 17
    assert writer.stats().written == accepted.count(True)


def test_retention_by_count_keeps_the_newest(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, keep_count=3)
    env = envelope()
    for i in range(6):
        writer(f"r{i}", env, result_for(env), [], None)
    writer.flush()
    writer.close()
    assert trace_names(tmp_path) == ["r3", "r4", "r5"]
    assert writer.stats().pruned == 3


def test_retention_by_count_reuses_the_pruned_folder_for_the_new_trace(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, keep_count=2)
    env = envelope()
    keeps, omits = FakeStack("acme/_mail", None), FakeStack("acme/_mail", HINTS)
    root = tmp_path / "requests"
    inodes = {}
    for rid, stack in (("r0", keeps), ("r1", omits), ("r2", omits), ("r3", keeps)):
        writer(rid, env, result_for(env), [], stack, message=f"message of {rid}\r\n".encode())
        writer.flush()
        inodes[rid] = (root / rid).stat().st_ino
    writer.close()
    assert trace_names(tmp_path) == ["r2", "r3"]
    assert writer.stats().pruned == 2
    assert (inodes["r2"], inodes["r3"]) == (inodes["r0"], inodes["r1"])  # the same folders
    assert [p.name for p in (root / "r2").iterdir()] == ["trace.jsonl"]  # r0's message went
    assert (root / "r3" / "message.eml").read_bytes() == b"message of r3\r\n"
    assert (root / "r3" / "message.eml").stat().st_mode & 0o777 == 0o600
    fresh = TraceWriter(tmp_path / "fresh")
    fresh("r3", env, result_for(env), [], keeps, message=b"message of r3\r\n")
    fresh.flush()
    fresh.close()
    reused, written = read_trace(tmp_path, "r3"), read_trace(tmp_path / "fresh", "r3")
    for part in (reused, written):
        part["summary"].pop("time")
    assert reused == written


def test_a_reused_folder_holds_exactly_the_new_message_longer_or_shorter(tmp_path: Path) -> None:
    """A reused folder's message is overwritten in place: nothing of a longer old one stays."""
    writer = TraceWriter(tmp_path, keep_count=1)
    env = envelope()
    stack = FakeStack("acme/_mail", None)
    for i, size in enumerate((300, 40, 40, 2000, 1)):
        message = bytes([65 + i]) * size
        writer(f"r{i}", env, result_for(env), [], stack, message=message)
        writer.flush()
        assert (tmp_path / "requests" / f"r{i}" / "message.eml").read_bytes() == message
    writer.close()
    assert writer.stats().pruned == 4


def test_a_reused_folder_holds_exactly_the_new_trace_longer_or_shorter(tmp_path: Path) -> None:
    """trace.jsonl is overwritten in place and cut only when the old one was longer: every
    line parses, and a link to the old file elsewhere keeps the old bytes."""
    writer = TraceWriter(tmp_path, keep_count=1)
    env = envelope()
    root = tmp_path / "requests"
    for i, error in enumerate(("x" * 300, "", "", "y" * 3000, "z")):
        if i == 4:  # a hard link to the folder's file: written beside, not through
            os.link(root / "r3" / "trace.jsonl", tmp_path / "kept.jsonl")
        writer(f"r{i}", env, result_for(env), [], None, error=error)
        writer.flush()
        lines = (root / f"r{i}" / "trace.jsonl").read_bytes().splitlines()
        assert [next(iter(json.loads(line))) for line in lines] == [
            "summary", "envelope", "steps", "result", "response"]
        assert read_trace(tmp_path, f"r{i}")["summary"]["error"] == (error or None)
    writer.close()
    assert writer.stats().pruned == 4
    kept = (tmp_path / "kept.jsonl").read_bytes().splitlines()
    assert json.loads(kept[0])["summary"]["rid"] == "r3"


def test_retention_by_count_counts_traces_already_on_disk(tmp_path: Path) -> None:
    for i in range(3):
        writer = TraceWriter(tmp_path, keep_count=4)
        env = envelope()
        writer(f"run{i}a", env, result_for(env), [], None)
        writer(f"run{i}b", env, result_for(env), [], None)
        writer.flush()
        writer.close()
    assert sorted(trace_names(tmp_path)) == ["run1a", "run1b", "run2a", "run2b"]


def test_retention_by_age_prunes_old_folders(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, keep_age_s=3600)
    env = envelope()
    for rid in ("old", "new"):
        writer(rid, env, result_for(env), [], None)
    writer.flush()
    two_hours_ago = time.time() - 7200
    os.utime(tmp_path / "requests" / "old", (two_hours_ago, two_hours_ago))
    assert writer.prune() == 1
    writer.close()
    assert trace_names(tmp_path) == ["new"]


def test_one_rid_with_several_runs_keeps_them_all(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path)
    env = envelope()
    writer("same", env, result_for(env), [], FakeStack("acme/_mail", None))
    writer("same", env, result_for(env), [], FakeStack("beta/_mail", None))
    writer.flush()
    writer.close()
    assert sorted(trace_names(tmp_path)) == ["same", "same.1"]
    assert {s["stack"] for s in read_summaries(tmp_path)} == {"acme/_mail", "beta/_mail"}


def test_a_rid_cannot_leave_the_requests_folder(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path)
    env = envelope()
    writer("../../etc/x", env, result_for(env), [], None)
    writer.flush()
    writer.close()
    assert trace_names(tmp_path) == ["_.._etc_x"]
    assert not (tmp_path.parent / "etc").exists()


def test_latest_and_list(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path)
    env = envelope()
    for rid in ("a1", "a2", "a3"):
        writer(rid, env, result_for(env), [("x@y", "250 ok")], None)
        writer.flush()
        time.sleep(0.01)
    writer.close()
    assert read_trace(tmp_path)["name"] == "a3"
    assert [s["rid"] for s in read_summaries(tmp_path, limit=2)] == ["a2", "a3"]
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path, "nope")
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "empty")


@pytest.mark.parametrize(
    ("text", "segments"),
    [
        ("_txc.lmtp.msg.raw", ("_txc", "lmtp", "msg", "raw")),
        ("@lmtp.rcpt.0", ("_txc", "lmtp", "rcpt", 0)),
        ('_txc.lmtp.msg.headers."x.odd"', ("_txc", "lmtp", "msg", "headers", "x.odd")),
        (
            "_txc.lmtp.msg.attachments.*.content",
            ("_txc", "lmtp", "msg", "attachments", "*", "content"),
        ),
    ],
)
def test_hint_paths(text: str, segments: tuple[object, ...]) -> None:
    assert parse_hint_path(text) == segments


def test_wildcards_and_list_indexes() -> None:
    scrubber = Scrubber(ScrubHints(omit=("a.*.content",), redact=("b.1",)))
    doc = {"a": [{"content": 1, "name": "x"}, {"content": 2}], "b": ["p", "q", "r"]}
    assert scrubber.document(doc) == {"a": [{"name": "x"}, {}], "b": ["p", REDACTED, "r"]}
    assert doc["a"][0]["content"] == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["a", "b", "c", "raw"]), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(["a", "b", "raw"]), json_values, max_size=3))
def test_omitted_keys_never_survive_and_the_input_is_unchanged(doc: dict[str, Any]) -> None:
    scrubber = Scrubber(ScrubHints(omit=("raw", "a.raw", "b.*.raw")))
    snapshot = json.dumps(doc, sort_keys=True)
    out = scrubber.document(doc)
    assert "raw" not in out
    if isinstance(out.get("a"), dict):
        assert "raw" not in out["a"]
    for item in out.get("b", []) if isinstance(out.get("b"), list) else []:
        if isinstance(item, dict):
            assert "raw" not in item
    assert json.dumps(doc, sort_keys=True) == snapshot


# --- with the real engine and deliverer ----------------------------------------------------

NEVER_FIRES_BUT_SCRUBS = """\
WHEN @lmtp.rcpt.0 =~ /^nobody-ever@/
WITH omit = "_txc.lmtp.msg.raw, _txc.lmtp.msg.attachments"
WITH redact = "_txc.lmtp.msg.headers.authorization, _txc.lmtp.msg.subject"
SET @lmtp.res.code = 550
"""

ACCEPT = """\
WHEN @lmtp.rcpt.0 =~ /^support@/
SET @lmtp.res.code = 250
SET @lmtp.res.msg = "queued"
SET ticket.title = "re: " + @lmtp.msg.subject
"""

MAIL = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: support@acme.example\r\n"
    b"Subject: password is hunter2-hunter2\r\n"
    b"Authorization: " + SECRET_AUTH.encode() + b"\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"\r\n"
    b"Hi support\r\n"
)


def test_a_rule_that_never_fires_still_scrubs_a_real_delivery(tmp_path: Path) -> None:
    import asyncio

    from lmtp.config import Settings
    from lmtp.delivery import Deliverer, Transaction
    from lmtp.routing import Route
    from txcl.loader import load_tree

    ops = tmp_path / "OPS" / "acme" / "_mail" / "0"
    ops.mkdir(parents=True)
    (ops / "10-accept.txcl").write_text(ACCEPT)
    (ops / "20-never.txcl").write_text(NEVER_FIRES_BUT_SCRUBS)
    tree = load_tree(tmp_path / "OPS")
    assert tree.ok, tree.problems
    writer = TraceWriter(tmp_path / "var")
    deliverer = Deliverer(tree, Settings(state_dir=tmp_path / "var"), trace_sink=writer)
    route = Route("acme", "acme/_mail", "domain:acme.example", "acme/_mail/0")
    tx = Transaction(
        "default",
        "10.0.0.7",
        "mx",
        "alice@example.com",
        ("support@acme.example",),
        (route,),
        MAIL,
        0.0,
    )
    replies = asyncio.run(deliverer.deliver(tx))
    assert unrid(replies) == ["250 2.0.0 queued"]
    assert writer.flush()
    writer.close()

    trace = read_trace(tmp_path / "var")
    text = all_text(trace)
    assert "hunter2" not in text
    assert SECRET_AUTH not in text
    msg = trace["envelope"]["_txc"]["lmtp"]["msg"]
    assert "raw" not in msg
    assert msg["subject"] == REDACTED
    assert msg["headers"]["authorization"] == REDACTED
    assert msg["headers"]["subject"] == [REDACTED]  # a copy of the redacted subject
    fired = trace["steps"]["fired"]
    assert [f["pos"].rsplit("/", 1)[-1] for f in fired] == ["10-accept.txcl:1:1"]
    title = [s for s in trace["steps"]["steps"] if s.get("path") == "ticket.title"]
    assert title[0]["after"] == "re: " + REDACTED
    assert trace["response"]["replies"] == [
        {"rcpt": "support@acme.example", "code": 250, "line": replies[0]}  # the id and all
    ]
    assert trace["summary"]["route"]["to"] == "acme/_mail/0"
    assert trace["result"]["res"] == {"code": 250, "msg": "queued"}


# --- `txco trace` rendering and flags (lmtp.tracecmd) ---------------------------------------


def test_trace_flags_parse_ages_and_counts() -> None:
    import argparse

    from lmtp.tracecmd import add_serve_trace_arguments

    parser = argparse.ArgumentParser()
    add_serve_trace_arguments(parser)
    args = parser.parse_args([])
    assert (args.trace, args.trace_keep, args.trace_max_age) == ("all", 1000, 7 * 86400)
    assert (args.trace_keep_bytes, args.trace_max_bytes) == (1 << 30, 32 << 20)
    args = parser.parse_args(["--trace=errors", "--trace-keep=5", "--trace-max-age=12h",
                              "--trace-keep-bytes=512M", "--trace-max-bytes=64KiB"])
    assert (args.trace, args.trace_keep, args.trace_max_age) == ("errors", 5, 12 * 3600)
    assert (args.trace_keep_bytes, args.trace_max_bytes) == (512 << 20, 64 << 10)
    for bad in (["--trace=some"], ["--trace-keep=0"], ["--trace-max-age=soon"],
                ["--trace-keep-bytes=0"], ["--trace-max-bytes=lots"], ["--trace-max-bytes=1T"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_an_ambiguous_rid_prefix_is_refused_and_a_unique_one_found(tmp_path: Path) -> None:
    from lmtp.tracecmd import resolve_rid

    writer = TraceWriter(tmp_path)
    env = envelope()
    for rid in ("01AAA1", "01AAA2", "01BBB1"):
        writer(rid, env, result_for(env), [], None)
    writer.flush()
    writer.close()
    assert resolve_rid(tmp_path, "01B") == "01BBB1"
    assert resolve_rid(tmp_path, None) is None
    with pytest.raises(LookupError, match="matches 2 traces"):
        resolve_rid(tmp_path, "01AAA")
    with pytest.raises(FileNotFoundError):
        resolve_rid(tmp_path, "02")


def write_failure(tmp_path: Path, error: str, rcpt: str, hints: Any) -> None:
    """One trace "r1" of a run that failed with `error`, its recipient tempfailed."""
    writer = TraceWriter(tmp_path)
    env = envelope()
    boom = Problem("txcl_run_error", error, Pos("f.txcl", 2, 1))
    writer("r1", env, result_for(env, boom), [(rcpt, "451 4.3.0 later")],
           FakeStack("acme/_mail", hints))
    assert writer.flush()
    writer.close()


def test_the_terminal_view_is_compact_and_shows_errors(tmp_path: Path) -> None:
    from lmtp.tracecmd import format_list, format_trace

    write_failure(tmp_path, "op ARCHIVE timed out after 5s", "support@acme.example", HINTS)
    trace = read_trace(tmp_path, "r1")
    text = format_trace(trace, tmp_path / "requests" / "r1")
    assert "ERROR    f.txcl:2:1: txcl_run_error: op ARCHIVE timed out after 5s" in text
    assert "support@acme.example  451 4.3.0 later" in text
    assert "SET _txc.lmtp.res.code: (missing) -> 250" in text
    assert SECRET_AUTH not in text
    assert all(len(line) < 200 for line in text.splitlines())
    listed = format_list(read_summaries(tmp_path)).splitlines()
    assert listed[0].split() == ["RID", "TIME", "SRC", "ROUTE", "CODES"]
    assert listed[1].split()[2:5] == ["lmtp", "acme/_mail/0", "451"]
    assert listed[1].endswith("error: op ARCHIVE timed out after 5s")
    assert format_list([]) == "no traces yet\n"


# --- the message bytes: stored once, never base64 -------------------------------------------


def big_multipart(size: int) -> bytes:
    """A multipart message of about `size` bytes: a short text part, one base64 attachment."""
    import base64

    payload = os.urandom(size * 3 // 4)
    body = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (
        b"From: Alice <alice@example.com>\r\nTo: support@acme.example\r\n"
        b"Subject: the big log\r\nMessage-ID: <big@example.com>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\nlog attached\r\n"
        b"--b1\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="big.log"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + body + b"--b1--\r\n"
    )


def deliver_with(tmp_path: Path, rules: str, data: bytes, writer: TraceWriter) -> list[str]:
    import asyncio

    from lmtp.config import Settings
    from lmtp.delivery import Deliverer, Transaction
    from lmtp.routing import Route
    from txcl.loader import load_tree

    ops = tmp_path / "OPS" / "acme" / "_mail" / "0"
    ops.mkdir(parents=True, exist_ok=True)
    (ops / "10-accept.txcl").write_text(rules)
    tree = load_tree(tmp_path / "OPS")
    assert tree.ok, tree.problems
    deliverer = Deliverer(tree, Settings(state_dir=tmp_path / "var"), trace_sink=writer)
    route = Route("acme", "acme/_mail", "domain:acme.example", "acme/_mail/0")
    tx = Transaction(
        "default", "10.0.0.7", "mx", "alice@example.com", ("support@acme.example",),
        (route,), data, 0.0,
    )
    return unrid(asyncio.run(deliverer.deliver(tx)))


class RecordingWriter(TraceWriter):
    """A TraceWriter that keeps the records it was handed, to see what the queue held."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.records: list[TraceRecord] = []
        super().__init__(*args, **kw)

    def write(self, record: TraceRecord) -> str:
        self.records.append(record)
        return super().write(record)


def test_the_trace_of_a_25_mib_message_holds_its_bytes_once(tmp_path: Path) -> None:
    data = big_multipart(25 << 20)
    writer = RecordingWriter(tmp_path / "var")
    try:
        assert deliver_with(tmp_path, ACCEPT, data, writer) == ["250 2.0.0 queued"]
        assert writer.flush(60)
    finally:
        writer.close()
    assert writer.stats().written == 1
    # In the queue: no bytes at all. The message was staged to a file while the stack ran
    # (the delivery answered once it was written), and the record holds that file.
    (record,) = writer.records
    assert isinstance(record.message, StagedMessage) and record.message.data is None
    assert len(record.message) == len(data) and record.message.path is not None
    msg = record.envelope["_txc"]["lmtp"]["msg"]
    assert "raw" not in msg and "attachments" not in msg
    assert msg["subject"] == "the big log"
    # On disk: the message once, as bytes; the JSON small and free of base64.
    folder = tmp_path / "var" / "requests" / record.rid
    assert (folder / "message.eml").read_bytes() == data
    jsonl = (folder / "trace.jsonl").read_bytes()
    assert len(jsonl) < 16 << 10
    assert b"b64:" not in jsonl and data[-2000:-1000] not in jsonl
    assert sum(p.stat().st_size for p in folder.iterdir()) < len(data) + (16 << 10)
    trace = read_trace(tmp_path / "var")
    assert trace["envelope"]["_txc"]["lmtp"]["msg"]["raw"] == {
        "file": "message.eml", "size": len(data)}
    # The staged file was the trace's message.eml (a link), and goes with its last holder.
    staged_path = record.message.path
    assert (folder / "message.eml").stat().st_ino == os.stat(staged_path).st_ino
    del record
    writer.records.clear()
    assert not os.path.exists(staged_path)
    assert (folder / "message.eml").read_bytes() == data
    assert [p.name for p in (tmp_path / "var" / "requests").iterdir()] == [folder.name]


class UnstagedWriter(RecordingWriter):
    def stage(self, message: bytes) -> None:
        return None


def test_a_staged_message_is_scrubbed_as_the_bytes_would_be(tmp_path: Path) -> None:
    mail = MAIL + b"the subject: password is hunter2-hunter2\r\n" * (STAGE_FROM_BYTES // 40)
    rules = NEVER_FIRES_BUT_SCRUBS.replace('"_txc.lmtp.msg.raw, _txc.lmtp.msg.attachments"',
                                           '"_txc.lmtp.msg.headers.x-nothing"') + ACCEPT
    stored = []
    for kind in (RecordingWriter, UnstagedWriter):
        writer = kind(tmp_path / kind.__name__ / "var")
        try:
            assert deliver_with(tmp_path / kind.__name__, rules, mail, writer) == [
                "250 2.0.0 queued"]
            assert writer.flush(60)
        finally:
            writer.close()
        (record,) = writer.records
        assert isinstance(record.message, StagedMessage) is (kind is RecordingWriter)
        path = tmp_path / kind.__name__ / "var" / "requests" / record.rid / "message.eml"
        assert path.stat().st_nlink == 1  # scrubbed: written, not linked
        stored.append(path.read_bytes())
    assert stored[0] == stored[1]
    assert SECRET_AUTH.encode() not in stored[0] and b"Subject: [REDACTED]\r\n" in stored[0]
    assert stored[0].count(b"[REDACTED]") > STAGE_FROM_BYTES // 40  # the body copies too


def test_messages_are_staged_only_when_large_and_every_run_is_traced(tmp_path: Path) -> None:
    big = b"x" * STAGE_FROM_BYTES
    for mode, message, staged in (("all", big, True), ("all", big[:-1], False),
                                  ("errors", big, False)):
        writer = TraceWriter(tmp_path / mode, mode=mode)
        try:
            assert (writer.stage(message) is not None) is staged
        finally:
            writer.close()
    writer = TraceWriter(tmp_path / "small", max_trace_bytes=STAGE_FROM_BYTES - 1)
    assert writer.stage(big) is None
    writer.close()


def test_a_message_that_cannot_be_staged_leaves_its_trace_without_it(tmp_path: Path) -> None:
    import asyncio

    (tmp_path / "var").write_text("not a folder")  # requests/ cannot be made
    writer = TraceWriter(tmp_path / "var")
    staged = writer.stage(b"x" * STAGE_FROM_BYTES)
    assert staged is not None
    asyncio.run(staged.written(10))
    assert staged.data is None and staged.path is None and staged.error is not None
    assert writer.stats() == TraceWriter(tmp_path / "other").stats()  # nothing counted yet
    (tmp_path / "var").unlink()
    writer("r1", envelope(), None, [("a@x", "250 ok")], message=staged)
    assert writer.flush(10)
    writer.close()
    summary = read_trace(tmp_path / "var", "r1")["summary"]
    assert summary["cut"] == [f"message ({STAGE_FROM_BYTES} bytes, not staged: "
                              f"{staged.error})"]
    assert not (tmp_path / "var" / "requests" / "r1" / "message.eml").exists()


def test_the_traces_of_several_groups_share_one_staged_file(tmp_path: Path) -> None:
    from txcl.trace_files import write_trace

    root = tmp_path / "requests"
    root.mkdir()
    data = b"y" * 4096
    staged = StagedMessage(data)
    staged.write(root)
    assert staged.done.done() and staged.data is None
    folders = [write_trace(root, rid, [b"{}\n"], staged)[0] for rid in ("r1", "r2")]
    assert [(root / f / "message.eml").read_bytes() for f in folders] == [data, data]
    assert (root / folders[0] / "message.eml").stat().st_nlink == 3
    del staged
    assert (root / folders[0] / "message.eml").stat().st_nlink == 2
    assert sorted(p.name for p in root.iterdir()) == ["r1", "r2"]


def test_attachment_content_read_by_a_stack_is_not_stored_twice() -> None:
    from lmtp.message import parse_message

    data = big_multipart(64 << 10)
    env = envelope()
    env["_txc"]["lmtp"]["msg"] = parse_message(data)[0]  # raw and attachments as base64
    record = TraceRecord("r", 0.0, env, None, (), "acme/_mail", ScrubHints(), message=data)
    artifacts = build_artifacts(record)
    stored = artifacts.parts["envelope"]["_txc"]["lmtp"]["msg"]
    assert stored["raw"].file == "message.eml" and stored["attachments"][0]["content"].file == (
        "message.eml")
    assert stored["attachments"][0]["name"] == "big.log"
    assert artifacts.message is data
    assert env["_txc"]["lmtp"]["msg"]["raw"].startswith("b64:")  # the run's data untouched


def test_a_queue_over_its_byte_budget_drops_instead_of_holding_more(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="txcl.trace")
    writer, gate = stalled_writer(tmp_path, queue_bytes=(1 << 20))
    env = envelope()
    message = b"x" * (200 << 10)  # each queued record counts for 2 x 200 KiB + overhead
    accepted = [writer(f"r{i}", env, None, [], None, message=message) for i in range(6)]
    small = [writer(f"s{i}", env, None, [], None) for i in range(200)]  # 16 KiB each
    gate.set()
    assert writer.flush()
    writer.close()
    assert accepted == [True] * 6  # the first two with their message, the rest without
    assert f"{6 + small.count(True)} written (4 cut to fit), {small.count(False)} dropped" in (
        caplog.text)
    stored = [(tmp_path / "requests" / f"r{i}" / "message.eml").exists() for i in range(6)]
    assert stored == [True, True, False, False, False, False]
    assert read_trace(tmp_path, "r5")["summary"]["cut"] == [
        f"message ({200 << 10} bytes, the trace queue was full)"]
    # with no room even for a record without its message, records are dropped and counted
    assert 0 < small.count(False) == writer.stats().dropped
    assert writer.stats().written == 6 + small.count(True)
    assert writer.stats().cut == 4


# --- retention by bytes, the per-trace limit, privacy ----------------------------------------


def write_messages(writer: TraceWriter, rids: list[str], message: bytes) -> None:
    env = envelope()
    for rid in rids:
        replies = [("support@acme.example", "250 2.0.0 queued")]
        assert writer(rid, env, result_for(env), replies, FakeStack("acme/_mail", None),
                      message=message)
        assert writer.flush()


def on_disk(tmp_path: Path) -> int:
    return sum(p.stat().st_size for p in (tmp_path / "requests").rglob("*") if p.is_file())


def test_retention_by_bytes_keeps_the_newest_within_the_total(tmp_path: Path) -> None:
    message = b"x" * (10 << 10)
    writer = TraceWriter(tmp_path, keep_bytes=35 << 10)
    write_messages(writer, [f"r{i}" for i in range(6)], message)
    writer.close()
    kept = trace_names(tmp_path)
    assert kept == ["r4", "r5"]  # each trace is its 10 KiB message and some JSON
    assert on_disk(tmp_path) <= 35 << 10
    assert writer.stats().pruned == 4
    # a new writer (a restart) counts what is on disk, and prune() applies the total too
    again = TraceWriter(tmp_path, keep_bytes=20 << 10)
    again.close()
    assert again.prune() == 1 and trace_names(tmp_path) == ["r5"]


def test_a_trace_over_the_per_trace_limit_keeps_its_summary_and_verdicts(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, max_trace_bytes=8 << 10, queue_bytes=64 << 10)
    write_messages(writer, ["big"], b"y" * (20 << 10))  # too big to queue: let go at once
    write_messages(writer, ["fits"], b"y" * (7 << 10))  # fits the queue, not the limit
    writer.close()
    assert writer.stats().cut == 2
    fits = read_trace(tmp_path, "fits")["summary"]["cut"]
    assert fits[0] == f"message ({7 << 10} bytes)" and len(fits) == 1
    folder = tmp_path / "requests" / "big"
    assert [p.name for p in folder.iterdir()] == ["trace.jsonl"]  # the message went
    trace = read_trace(tmp_path, "big")
    assert trace["summary"]["cut"] == [f"message ({20 << 10} bytes)"]
    assert trace["envelope"]["_txc"]["lmtp"]["msg"]["subject"] == "wifi keeps dropping"
    assert trace["response"]["replies"][0]["line"] == "250 2.0.0 queued"
    assert trace["result"]["res"] == {"code": 250, "msg": "queued"}


def test_a_tiny_per_trace_limit_cuts_the_envelope_and_steps_too(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, max_trace_bytes=100)
    write_messages(writer, ["tiny"], b"z" * 1000)
    writer.close()
    trace = read_trace(tmp_path, "tiny")
    assert [c.split(" (")[0] for c in trace["summary"]["cut"]] == ["message", "envelope", "steps"]
    assert trace["envelope"] == {} and trace["steps"] == {"fired": [], "steps": []}
    assert trace["summary"]["recipients"] == [{"rcpt": "support@acme.example", "code": 250}]
    assert trace["response"]["replies"][0]["code"] == 250


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o000, 0o277, 0o477])
def test_traces_are_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    umask_keeps_owner_bits.cache_clear()  # read once per process: here, under this umask
    try:
        assert umask_keeps_owner_bits() == (umask & 0o700 == 0)
        writer = TraceWriter(tmp_path, keep_count=1)
        write_messages(writer, ["p0"], b"first body")
        write_messages(writer, ["p1"], b"secret body")  # in p0's folder, reused
        writer.close()
    finally:
        os.umask(old)
        umask_keeps_owner_bits.cache_clear()
    root = tmp_path / "requests"
    assert root.stat().st_mode & 0o777 == 0o700
    assert (root / "p1").stat().st_mode & 0o777 == 0o700
    files = list((root / "p1").iterdir())
    assert {p.name for p in files} == {"trace.jsonl", "message.eml"}
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files)


def test_a_requests_folder_made_by_an_older_version_is_made_private(tmp_path: Path) -> None:
    (tmp_path / "requests").mkdir(mode=0o755)
    os.chmod(tmp_path / "requests", 0o755)
    writer = TraceWriter(tmp_path)
    write_messages(writer, ["p2"], b"body")
    writer.close()
    assert (tmp_path / "requests").stat().st_mode & 0o777 == 0o700


# --- WITH omit/redact reach the stored message bytes -----------------------------------------

FOLDED_SECRET = b"Bearer sk-live-folded-0123\r\n\t456789"
RAW_MAIL = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: support@acme.example\r\n"
    b"Subject: =?utf-8?q?password_is_hunter2-hunter2?=\r\n"
    b"Authorization: " + FOLDED_SECRET + b"\r\n"
    b"X-Tracking: track-me-0123456789\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"\r\n"
    b"Hi support, my token is sk-live-body-copy-42 and the subject says it all.\r\n"
)


def trace_of_message(
    tmp_path: Path, hints: ScrubHints, data: bytes = RAW_MAIL, rules: str = ACCEPT
) -> tuple[dict[str, Any], bytes | None]:
    from txcl.trace_store import read_message

    scrub = "WHEN @lmtp.rcpt.0 =~ /^nobody-ever@/\n"
    for key, paths in (("omit", hints.omit), ("redact", hints.redact)):
        if paths:
            scrub += f'WITH {key} = "{", ".join(paths)}"\n'
    writer = TraceWriter(tmp_path / "var")
    try:
        rules_with_hints = rules + "\n" + scrub + "SET @lmtp.res.code = 550\n"
        assert deliver_with(tmp_path, rules_with_hints, data, writer) == ["250 2.0.0 queued"]
        assert writer.flush()
    finally:
        writer.close()
    trace = read_trace(tmp_path / "var")

    return trace, read_message(tmp_path / "var", trace["name"])


def test_redacting_headers_reaches_the_stored_message_exactly(tmp_path: Path) -> None:
    hints = ScrubHints(
        omit=("_txc.lmtp.msg.headers.x-tracking",),
        redact=("_txc.lmtp.msg.headers.authorization", "_txc.lmtp.msg.subject"),
    )
    trace, stored = trace_of_message(tmp_path, hints)
    assert stored is not None
    head, body = stored.split(b"\r\n\r\n", 1)
    assert head.split(b"\r\n") == [
        b"From: Alice <alice@example.com>",
        b"To: support@acme.example",
        b"Subject: [REDACTED]",  # an encoded word: the whole field goes, not just a match
        b"Authorization: [REDACTED]",  # folded over two lines
        b"Message-ID: <m1@example.com>",
    ]
    assert body == RAW_MAIL.split(b"\r\n\r\n", 1)[1]
    assert b"hunter2" not in stored and b"456789" not in stored and b"track-me" not in stored
    assert trace["envelope"]["_txc"]["lmtp"]["msg"]["raw"]["file"] == "message.eml"


def test_a_redacted_value_copied_into_the_body_is_redacted_there_too() -> None:
    env = envelope()
    env["_txc"]["lmtp"]["msg"]["headers"]["x-token"] = ["sk-live-body-copy-42"]
    hints = ScrubHints(redact=("_txc.lmtp.msg.headers.x-token",))
    record = TraceRecord("r", 0.0, env, None, (), "acme/_mail", hints, message=RAW_MAIL)
    stored = build_artifacts(record).message
    assert stored is not None and b"sk-live-body-copy-42" not in stored
    assert b"my token is [REDACTED] and" in stored


@pytest.mark.parametrize(
    "path", ["_txc.lmtp.msg.text", "_txc.lmtp.msg.attachments.*.content", "_txc.*.msg.html"]
)
def test_scrubbing_a_body_field_leaves_the_message_out(path: str) -> None:
    env = envelope()
    hints = ScrubHints(redact=(path,))
    record = TraceRecord("r", 0.0, env, None, (), "acme/_mail", hints, message=RAW_MAIL)
    artifacts = build_artifacts(record)
    assert artifacts.message is None
    msg = artifacts.parts["envelope"]["_txc"]["lmtp"]["msg"]
    assert msg["raw"] == REDACTED and msg["attachments"][0]["content"] == REDACTED
    assert "the message holds it in its body" in (
        artifacts.parts["result"]["scrubbed"]["message_left_out"])


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_=+/", min_size=8, max_size=16)


@settings(max_examples=100, deadline=None)
@given(words=st.lists(_token, min_size=1, max_size=5), folds=st.lists(st.booleans(), max_size=5),
       crlf=st.booleans())
def test_a_redacted_header_never_survives_in_the_message(
    words: list[str], folds: list[bool], crlf: bool
) -> None:
    from txcl.trace_raw import plan_for, scrub_message

    eol = b"\r\n" if crlf else b"\n"
    value = b""
    for i, word in enumerate(words):
        gap = (eol + b" ") if i < len(folds) and folds[i] else b" "
        value += (gap if i else b"") + word.encode()
    data = (b"From: a@example.com" + eol + b"X-Secret: " + value + eol
            + b"Subject: hello" + eol + eol + b"body" + eol)
    plan = plan_for([(("_txc", "lmtp", "msg", "headers", "x-secret"), "redact")], "lmtp")
    out = scrub_message(data, plan, [], REDACTED)
    assert out == (b"From: a@example.com" + eol + b"X-Secret: [REDACTED]" + eol
                   + b"Subject: hello" + eol + eol + b"body" + eol)


def test_the_summary_shows_message_id_sender_and_subject_scrubbed_like_the_rest() -> None:
    env = envelope()
    env["_txc"]["lmtp"]["msg"]["id"] = "<m1@example.com>"
    env["_txc"]["lmtp"]["mail"] = {"from": "alice@example.com", "size": 10}
    plain_summary = build_artifacts(
        TraceRecord("r", 0.0, env, None, (), "acme/_mail", ScrubHints())).parts["summary"]
    assert (plain_summary["message_id"], plain_summary["sender"], plain_summary["subject"]) == (
        "<m1@example.com>", "alice@example.com", "wifi keeps dropping")
    hints = ScrubHints(omit=("_txc.lmtp.msg.id",), redact=("@lmtp.mail", "@lmtp.msg.subject"))
    summary = build_artifacts(
        TraceRecord("r", 0.0, env, None, (), "acme/_mail", hints)).parts["summary"]
    assert (summary["message_id"], summary["sender"], summary["subject"]) == (
        None, REDACTED, REDACTED)


def test_traces_of_the_five_file_format_are_still_read(tmp_path: Path) -> None:
    folder = tmp_path / "requests" / "01OLD"
    folder.mkdir(parents=True)
    parts = {
        "summary": {"rid": "01OLD", "src": "lmtp", "recipients": [{"rcpt": "a@b", "code": 250}]},
        "envelope": {"_txc": {"src": "lmtp"}},
        "steps": {"fired": [], "steps": []},
        "result": {"error": None},
        "response": {"replies": [{"rcpt": "a@b", "code": 250, "line": "250 ok"}]},
    }
    for name, doc in parts.items():
        (folder / f"{name}.json").write_text(json.dumps(doc, indent=2))
    assert read_trace(tmp_path, "01OLD") == {"name": "01OLD", **parts}
    assert read_summaries(tmp_path) == [{**parts["summary"], "name": "01OLD"}]


def test_the_terminal_views_never_print_control_characters(tmp_path: Path) -> None:
    from lmtp.tracecmd import format_list, format_trace

    write_failure(
        tmp_path, "op said \x1b[2Jgone\r\nforged line", '"evil\x1b]0;x\x07"@acme.example', None
    )
    text = format_trace(read_trace(tmp_path, "r1"), tmp_path / "requests" / "r1")
    listed = format_list(read_summaries(tmp_path))
    for shown in (text, listed):
        assert not [c for c in shown if c != "\n" and (ord(c) < 32 or 127 <= ord(c) < 160)]
    assert '"evil\\e]0;x\\x07"@acme.example' in text
    assert "op said \\e[2Jgone\\r\\nforged line" in listed


def test_errors_mode_keeps_the_full_detail_of_a_failure(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, mode="errors")
    env = envelope()
    boom = Problem("txcl_run_error", "op ARCHIVE timed out", Pos("f", 2, 1))
    replies = [("support@acme.example", "451 4.3.0 later")]
    assert writer("failed", env, result_for(env, boom), replies, None, message=RAW_MAIL)
    assert writer.flush()
    writer.close()
    folder = tmp_path / "requests" / "failed"
    assert (folder / "message.eml").read_bytes() == RAW_MAIL  # no hints: kept as received
    trace = read_trace(tmp_path, "failed")
    assert trace["envelope"]["_txc"]["lmtp"]["msg"]["subject"] == "wifi keeps dropping"
    assert [s["kind"] for s in trace["steps"]["steps"]] == ["set", "exec", "set"]
    assert trace["steps"]["fired"] and trace["result"]["error"]["message"] == "op ARCHIVE timed out"


@settings(max_examples=500, deadline=None)
@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_summary_times_are_isoformat_in_milliseconds(ts: float) -> None:
    from datetime import UTC, datetime

    from txcl.trace import _iso

    expected = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    assert _iso(ts) == expected.replace("+00:00", "Z")


def test_the_writer_waits_for_more_records_but_not_with_a_big_message(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, batch_wait_s=30.0)
    env = envelope()
    keeps = FakeStack("acme/_mail", None)
    try:
        writer("small", env, result_for(env), [], keeps, message=b"x" * 100)
        started = time.monotonic()
        assert writer.flush(timeout=10)  # a flush does not wait out the batch
        writer("big", env, result_for(env), [], keeps, message=b"y" * (2 << 20))
        while "big" not in trace_names(tmp_path) and time.monotonic() - started < 20:
            time.sleep(0.01)
        assert time.monotonic() - started < 20 and trace_names(tmp_path) == ["small", "big"]
    finally:
        writer.close()


def test_records_shared_between_runs_are_rendered_as_each_run_alone_would_be(
    tmp_path: Path,
) -> None:
    """The JSON of a firing without captures and of a constant SET (records the runner builds
    once per rule and every run shares) is built once and reused: each trace still shows
    what step_json and fired_json give for its own run, however many came before."""
    from txcl.loader import load_target
    from txcl.records import fired_json, step_json
    from txcl.runner import RunPolicy
    from txcl.trace import _SHARED_JSON, hints_of
    from txcl.trace_store import encode_parts

    stage = tmp_path / "OPS" / "acme" / "_mail" / "0"
    stage.mkdir(parents=True)
    (stage / "10.txcl").write_text(
        'WHEN @lmtp.msg.subject =~ /wifi/\nSET flags.wifi = true\nSET flags.note = "seen"\n')
    (stage / "20.txcl").write_text(
        "WHEN @lmtp.msg.subject =~ /(?P<what>[a-z]+) keeps/\nSET flags.what = match.what\n")
    stack = load_target(tmp_path / "OPS").stacks["acme/_mail"]
    lines = []
    for subject in ("wifi keeps dropping", "wifi keeps dropping", "vpn keeps dropping"):
        env = envelope()
        env["_txc"]["lmtp"]["msg"]["subject"] = subject
        result = stack.run(env, RunPolicy(run_ops=False, explain=True))
        record = TraceRecord("r", 0.0, env, result, (), stack.name, hints_of(stack.hints))
        steps = build_artifacts(record).parts["steps"]
        assert steps["fired"] == [fired_json(f) for f in result.fired]
        assert steps["steps"] == [step_json(s) for s in result.steps]
        lines.append(encode_parts(build_artifacts(record).parts)[2])  # the steps
    assert lines[0] == lines[1] != lines[2]
    assert any(record in result.steps for record, _ in _SHARED_JSON.values())


def _clean_as_specified(taint: Any, value: str) -> Any:
    """Taint's rule for one string, written plainly: an exact copy goes whole, so does a
    piece (8+ characters) of a secret; a secret (8+) inside it is replaced."""
    action = taint.exact.get(value)
    if action:
        return REDACTED if action == "redact" else "omitted"
    if len(value) >= 8:
        for secret, secret_action in taint.scan:
            if value in secret:
                return REDACTED if secret_action == "redact" else "omitted"
    for secret, _ in taint.scan:
        if len(secret) >= 8 and secret in value:
            value = value.replace(secret, REDACTED)
    return value


@settings(max_examples=300, deadline=None)
@given(
    secrets=st.lists(st.tuples(st.text("abcxyz", min_size=1, max_size=20),
                               st.sampled_from(["redact", "omit"])), max_size=4),
    values=st.lists(st.text("abcxyz[]", max_size=30), max_size=8),
)
def test_a_string_is_cleaned_by_the_rule_however_often_it_comes(
    secrets: list[tuple[str, str]], values: list[str]
) -> None:
    from txcl.trace import _OMITTED, Taint

    taint = Taint()
    for secret, action in secrets:
        taint.add(secret, action)  # type: ignore[arg-type]
    expected = [_clean_as_specified(taint, v) for v in values]
    for _ in range(2):  # the second time from what the taint remembers
        got = [taint.clean(v) for v in values]
        assert ["omitted" if g is _OMITTED else g for g in got] == expected


def test_the_encoder_takes_keys_that_are_no_strings_and_integers_beyond_64_bits() -> None:
    from txcl.trace_store import encode

    assert json.loads(encode({1: "a", "b": [2, 10**30], None: "é"})) == {
        "1": "a", "b": [2, 10**30], "null": "é"}


NO_HINTS_STACK = {
    "0/10-thread.txcl": (
        "WHEN @lmtp.msg.subject =~ /\\[#(?P<num>[0-9]+)\\]/\nSET flags.thread = match.num\n"),
    "0/20-wifi.txcl": 'WHEN @lmtp.msg.subject =~ /wifi/\nSET flags.topic = "wifi"\n',
    "0/30-two.txcl": (
        "WHEN @lmtp.rcpt.* =~ /@acme/\nWHEN exists(@lmtp.msg.headers.x-flag.0)\n"
        "WHEN len(@lmtp.rcpt) > 1\nSET flags.two = true\n"),
    "1/10-reply.txcl": (
        "WHEN flags.topic == \"wifi\"\nSET @lmtp.res.code = 250\n"
        "SET @lmtp.res.msg = \"queued \" + flags.thread\n"),
    "1/20-bad.txcl": "WHEN flags.two == true\nSET @lmtp.res.code = len(@lmtp.rcpt) + 998\n",
}


def test_a_stack_without_hints_is_traced_as_scrubbing_with_no_hints_would_trace_it(
    tmp_path: Path,
) -> None:
    """Without hints, build_artifacts takes a path that scrubs nothing: each part, the
    message beside them and their encoded bytes are those of the scrubbing path given no
    hints, for real runs (fired or not, captures, a failed run, unnoted stage starts) and
    for the records the other tests build (EXEC steps, a SET over a value, no result)."""
    import dataclasses

    from txcl.loader import load_target
    from txcl.runner import RunPolicy
    from txcl.trace import _scrubbed_artifacts
    from txcl.trace_store import encode_parts

    for name, text in NO_HINTS_STACK.items():
        (tmp_path / "OPS" / "acme" / "_mail" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "OPS" / "acme" / "_mail" / name).write_text(text)
    stack = load_target(tmp_path / "OPS").stacks["acme/_mail"]
    records = []
    replies = (("support@acme.example", "250 2.0.0 queued"), ("b@acme.example", "550 no"))
    for subject, rcpt, flag in (("wifi [#7] drops", ["support@acme.example"], None),
                                ("wifi", ["a@acme.example", "b@x.example"], "YES"),
                                ("hello", [], "no")):
        env = envelope()
        env["_txc"]["lmtp"]["msg"]["subject"] = subject
        env["_txc"]["lmtp"]["rcpt"] = rcpt
        if flag is not None:
            env["_txc"]["lmtp"]["msg"]["headers"]["x-flag"] = [flag]
        result = stack.run(env, RunPolicy(run_ops=False, explain=True))
        unnoted = dataclasses.replace(result, snapshots=tuple(
            dataclasses.replace(s, first_false=None) for s in result.snapshots or ()))
        for run in (result, unnoted, stack.run(env, RunPolicy(run_ops=False))):
            records.append(TraceRecord("r1", 1.5, env, run, replies, stack.name, ScrubHints(),
                                       message=b"Subject: " + subject.encode() + b"\r\n\r\nhi"))
    assert any(r.result.error is not None for r in records)
    env = envelope()
    for error in (None, Problem("boom", "it failed", Pos("f", 1, 2))):
        records.append(TraceRecord("r2", 2.0, env, result_for(env, error), replies[:1],
                                   "acme/_mail", ScrubHints(), message=b"raw"))
    records.append(TraceRecord("r3", 3.0, env, None, (), "", ScrubHints(), error="deadline"))
    no_msg = {"_txc": {"src": "lmtp", "lmtp": {"rcpt": ["a@b"], "msg": "not an object"}}}
    records.append(TraceRecord("r4", 4.0, no_msg, None, replies, "s", ScrubHints(), message=b"x"))
    for record in records:
        for _ in range(2):  # the second time with what the first left cached
            fast = build_artifacts(record)
            reference = _scrubbed_artifacts(record, Scrubber(ScrubHints()))
            assert encode_parts(fast.parts) == encode_parts(reference.parts)
            assert fast.parts == reference.parts and fast.message is reference.message


def test_a_summary_field_that_copies_an_omitted_value_is_left_empty(tmp_path: Path) -> None:
    """The subject repeated whole in an omitted body is omitted from the summary too: an
    empty field, not the marker object's text."""
    env = envelope()
    env["_txc"]["lmtp"]["msg"]["text"] = "wifi keeps dropping"
    writer = TraceWriter(tmp_path)
    try:
        writer("01OMIT", env, result_for(env), [("support@acme.example", "250 2.0.0 queued")],
               FakeStack("acme/_mail", ScrubHints(omit=("_txc.lmtp.msg.text",))))
        assert writer.flush()
    finally:
        writer.close()
    trace = read_trace(tmp_path, "01OMIT")
    assert trace["summary"]["subject"] is None
    assert "wifi keeps dropping" not in json.dumps(trace) and "object at 0x" not in json.dumps(trace)
