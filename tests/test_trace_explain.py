"""`txco trace RID --explain` shows what the server recorded when it ran: the rules as they
were then (file:line, WHEN text), each WHEN's result and the values it compared, scrubbed as
the trace is; after an edit it still explains the run that happened, and a trace without
the record says so."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from conftest import Server, txco_argv
from test_trace_e2e import deliver, wait_for

from lmtp.delivery import Deliverer
from lmtp.tracecmd import add_trace_arguments, run_trace
from txcl.loader import load_target
from txcl.runner import RunPolicy
from txcl.trace import TraceRecord, hints_of
from txcl.trace_store import read_trace
from txcl.trace_writer import TraceWriter

CONFIG = "ingress:\n  lmtp:\n    verified_domains:\n      acme.example: {tenant: acme}\n"
ACCEPT = """\
WHEN @lmtp.rcpt.0 =~ /^support@/
WHEN @lmtp.msg.subject =~ /wifi/
SET @lmtp.res.code = 250
SET @lmtp.res.msg = "v1"
"""
VIP = """\
# the sender is private: traces and explain show it redacted
WHEN domain(@lmtp.mail.from) == "bigcustomer.example"
WHEN @lmtp.msg.subject =~ /urgent/
SET flags.vip = true
WITH redact = "_txc.lmtp.mail.from"
"""
QUOTES_SENDER = 'WHEN @lmtp.mail.from == "alice@example.com"\nSET flags.alice = true\n'
TICKET = 'WHEN @lmtp.msg.headers.x-ticket.0 == "7"\nSET flags.ticket = true\n'
LATE = "WHEN flags.vip == true\nSET flags.paged = true\n"
OPS = {
    "acme/_mail/0/10-accept.txcl": ACCEPT,
    "acme/_mail/0/20-vip.txcl": VIP,
    "acme/_mail/0/30-ticket.txcl": TICKET,
    "acme/_mail/0/40-alice.txcl": QUOTES_SENDER,
    "acme/_mail/1/10-late.txcl": LATE,
}
EDITED_VIP = "\n\n" + VIP.replace("bigcustomer", "partner")  # two lines down, a new domain


def txco(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*txco_argv(), *args], capture_output=True, text=True, timeout=60)


def _traces(state_dir: Path) -> list[str]:
    root = state_dir / "requests"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_trace_explain_shows_the_recorded_run_after_the_rules_changed(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    server = serve(tmp_path, OPS, CONFIG)
    assert deliver(server) == ["250 2.0.0 v1"]
    [rid] = wait_for(lambda: _traces(server.state_dir))
    (tmp_path / "OPS" / "acme" / "_mail" / "0" / "20-vip.txcl").write_text(EDITED_VIP)
    (tmp_path / "OPS" / "acme" / "_mail" / "0" / "30-ticket.txcl").unlink()
    server.wait_for_log(r"reload \(watch\): now serving version 2")

    shown = txco("trace", rid, "--explain", "--state-dir", str(server.state_dir))
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "(as recorded: the rules and values of that run)" in out
    assert "stage 0\n" in out and "stage 1\n" in out
    assert "0/10-accept.txcl:1:1  fired" in out
    assert "✓ WHEN @lmtp.msg.subject =~ /wifi/" in out
    assert '@lmtp.msg.subject = "wifi keeps dropping"' in out
    # the rule as it was then: its old text and line, though the file now says otherwise
    assert "0/20-vip.txcl:2:1  not fired" in out
    assert (
        '✗ WHEN domain(@lmtp.mail.from) == "bigcustomer.example"'
        "   <- first WHEN that did not hold\n"
    ) in out
    assert "partner" not in out
    # a value computed from a redacted path stays redacted; the runner stopped at the first
    # WHEN that did not hold, so the next is shown as not reached
    assert 'domain(@lmtp.mail.from) = "[REDACTED]"' in out
    assert "· WHEN @lmtp.msg.subject =~ /urgent/   (not reached; false on this envelope)" in out
    # a rule that read a missing value, from a file that no longer exists
    assert "0/30-ticket.txcl:1:1  not fired" in out
    assert "<- first WHEN that did not hold (a value it reads is missing)" in out
    assert "@lmtp.msg.headers.x-ticket.0 = missing" in out
    # the sender never shows, not even where a rule's text quotes it
    assert "alice@example.com" not in out
    assert '✓ WHEN @lmtp.mail.from == "[REDACTED]"' in out
    assert "1/10-late.txcl:1:1  not fired" in out and "flags.vip = missing" in out

    as_json = json.loads(txco("trace", rid, "--explain", "--json", "--state-dir", str(server.state_dir)).stdout)
    vip = next(r for r in as_json["explain"] if r["file"].endswith("20-vip.txcl"))
    assert (vip["fired"], vip["first_false"]) == (False, 0)
    assert [(w["result"], w["reached"]) for w in vip["whens"]] == [("false", True), ("false", False)]
    ticket = next(r for r in as_json["explain"] if r["file"].endswith("30-ticket.txcl"))
    assert ticket["whens"][0]["result"] == "missing"

    # the next delivery runs, and explains, the edited rules
    deliver(server)
    second = wait_for(lambda: [n for n in _traces(server.state_dir) if n != rid])[0]
    now = txco("trace", second, "--explain", "--state-dir", str(server.state_dir)).stdout
    assert "0/20-vip.txcl:4:1  not fired" in now and '"partner.example"' in now
    assert "30-ticket.txcl" not in now

    # a trace written without the record (an older txco) says so instead of guessing
    jsonl = server.state_dir / "requests" / rid / "trace.jsonl"
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for line in lines:
        line.get("steps", {}).pop("explain", None)
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    old = txco("trace", rid, "--explain", "--state-dir", str(server.state_dir))
    assert old.returncode == 1 and old.stdout == ""
    assert "written before txco recorded explain data" in old.stderr


def _args(state_dir: Path, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_trace_arguments(parser)
    parser.add_argument("--state-dir", default=str(state_dir))
    return parser.parse_args(list(argv))


def _stack(tmp_path: Path):  # noqa: ANN202
    ops = tmp_path / "OPS"
    for name, text in OPS.items():
        (ops / name).parent.mkdir(parents=True, exist_ok=True)
        (ops / name).write_text(text)
    return load_target(ops).stacks["acme/_mail"]


ENVELOPE = {
    "_txc": {
        "src": "lmtp",
        "rid": "01JEXPLAIN",
        "route": {"tenant": "acme", "stack": "acme/_mail", "to": "acme/_mail/0"},
        "lmtp": {
            "rcpt": ["support@acme.example"],
            "mail": {"from": "alice@example.com"},
            "msg": {"subject": "wifi", "headers": {}},
        },
    }
}


def _write(writer: TraceWriter, stack, result, rid: str) -> None:  # noqa: ANN001
    writer.write(TraceRecord(rid, 0.0, ENVELOPE, result, (("support@acme.example", "250 2.0.0 ok"),),
                             stack.name, hints_of(stack.hints)))


def test_a_trace_without_the_record_says_why(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    stack = _stack(tmp_path)
    writer = TraceWriter(tmp_path / "var", mode="off", max_trace_bytes=1 << 20)
    recorded = stack.run(ENVELOPE, RunPolicy(run_ops=False, explain=True))
    _write(writer, stack, recorded, "01JWITH")
    _write(writer, stack, stack.run(ENVELOPE, RunPolicy(run_ops=False)), "01JOFF")
    assert "explain" in (read_trace(tmp_path / "var", "01JWITH")["steps"])
    assert "explain" not in (read_trace(tmp_path / "var", "01JOFF")["steps"])

    out = io.StringIO()
    assert run_trace(_args(tmp_path / "var", "01JWITH", "--explain"), out) == 0
    assert "0/20-vip.txcl:2:1  not fired" in out.getvalue()
    assert run_trace(_args(tmp_path / "var", "01JOFF", "--explain"), io.StringIO()) == 1
    assert "written before txco recorded explain data" in capsys.readouterr().err

    small = TraceWriter(tmp_path / "var", mode="off", max_trace_bytes=1500)
    _write(small, stack, recorded, "01JCUT")
    assert any(c.startswith("steps") for c in read_trace(tmp_path / "var", "01JCUT")["summary"]["cut"])
    assert run_trace(_args(tmp_path / "var", "01JCUT", "--explain"), io.StringIO()) == 1
    assert "cut to fit --trace-max-bytes" in capsys.readouterr().err

    assert run_trace(_args(tmp_path / "var", "01JNEVER", "--explain"), io.StringIO()) == 1
    assert "--trace=errors keeps only failed runs and tempfails" in capsys.readouterr().err


def test_only_traced_servers_record(tmp_path: Path) -> None:
    """The runner learns from its policy; the server asks for the record only with traces on."""
    on = TraceWriter(tmp_path / "on", mode="errors")
    off = TraceWriter(tmp_path / "off", mode="off")
    try:
        assert Deliverer(None, None, trace_sink=on).policy.explain is True
        assert Deliverer(None, None, trace_sink=off).policy.explain is False
        assert Deliverer(None, None).policy.explain is False
    finally:
        on.close()
    assert not os.path.exists(tmp_path / "off" / "requests")


def test_a_failed_run_is_explained_up_to_where_it_stopped(tmp_path: Path) -> None:
    ops = tmp_path / "OPS"
    for name, text in {
        "acme/_mail/0/10-mark.txcl": "SET flags.marked = true\n",
        "acme/_mail/1/10-bad.txcl": "WHEN flags.marked == true\nSET @lmtp.res.code = len(@lmtp.rcpt) + 998\n",
        "acme/_mail/2/10-never.txcl": "SET flags.late = true\n",
    }.items():
        (ops / name).parent.mkdir(parents=True, exist_ok=True)
        (ops / name).write_text(text)
    stack = load_target(ops).stacks["acme/_mail"]
    result = stack.run(ENVELOPE, RunPolicy(run_ops=False, explain=True))
    assert result.error is not None
    _write(TraceWriter(tmp_path / "var", mode="off"), stack, result, "01JFAILED")
    out = io.StringIO()
    assert run_trace(_args(tmp_path / "var", "01JFAILED", "--explain"), out) == 0
    text = out.getvalue()
    assert "stage 1\n" in text and "✓ WHEN flags.marked == true" in text
    assert "flags.marked = true" in text  # the value as stage 1 began, after stage 0's SET
    assert "stage 2" not in text and "(the run stopped there)" in text


def test_the_stored_explain_is_the_json_form_of_explain_run(tmp_path: Path) -> None:
    """What a trace stores (put together from JSON templates made once per rule) encodes
    to the bytes of the JSON form built field by field from `explain_run` (cleaned of the
    copies of scrubbed values, as a trace is), for a run as it noted each rule, one that
    noted none, and one whose notes stop within a stage; with the stack's hints and none."""
    import dataclasses

    from txcl.explain import explain_json, explain_record, explain_run
    from txcl.records import ScrubHints
    from txcl.trace import scrubber_for
    from txcl.trace_store import encode

    stack = _stack(tmp_path)
    for subject, sender in (("wifi urgent", "ceo@bigcustomer.example"), ("x", "alice@example.com")):
        envelope = json.loads(json.dumps(ENVELOPE))
        envelope["_txc"]["lmtp"]["msg"]["subject"] = subject
        envelope["_txc"]["lmtp"]["mail"]["from"] = sender
        envelope["_txc"]["lmtp"]["msg"]["headers"]["x-ticket"] = ["7"]
        result = stack.run(envelope, RunPolicy(run_ops=False, explain=True))
        assert result.snapshots
        runs = [result]
        for keep in (0, 1):
            runs.append(dataclasses.replace(result, snapshots=tuple(
                dataclasses.replace(s, first_false=(s.first_false or [])[:keep])
                for s in result.snapshots)))
        for hints in (hints_of(stack.hints), ScrubHints()):
            for run in runs:
                envelopes = [s.envelope for s in run.snapshots or ()]
                taint = scrubber_for(hints).taint(*envelopes, run.envelope)
                reference = taint.clean(explain_json(explain_run(run, hints, taint)))
                assert encode(explain_record(run, hints)) == encode(reference)
