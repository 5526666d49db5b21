"""`txcl test | lint | fmt` as a rule author uses them: output, JSON, exit codes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from txcl.cli import main

RULE = """\
WHEN @lmtp.rcpt.0 =~ /^support@/
WHEN @lmtp.msg.subject =~ /\\[#(?P<num>[0-9]+)\\]/
SET @lmtp.res.recipients.0.code = 250
SET @lmtp.res.recipients.0.msg = "ticket " + match.num
EXEC "op://ARCHIVE"
"""

ENVELOPE = {
    "_txc": {
        "src": "lmtp",
        "rid": "01J0000000000000000000000",
        "route": {"tenant": "acme", "stack": "acme/_mail", "ingress": "domain:acme.example", "to": "acme/_mail/0"},
        "lmtp": {
            "rcpt": ["support@acme.example", "bcc@acme.example"],
            "transaction_rcpt": ["support@acme.example", "bcc@acme.example"],
            "msg": {"subject": "Re: [#123] wifi keeps dropping", "headers": {}},
        },
    }
}

MESSAGE = b"""\
From: Alice <alice@example.com>\r
To: support@acme.example\r
Subject: Re: [#77] still broken\r
Message-ID: <m1@example.com>\r
\r
Hello\r
"""


@pytest.fixture
def rule_and_envelope(tmp_path: Path) -> tuple[Path, Path]:
    rule = tmp_path / "r.txcl"
    rule.write_text(RULE)
    env = tmp_path / "env.json"
    env.write_text(json.dumps(ENVELOPE))
    return rule, env


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class TestTestOnAnEnvelope:
    def test_shows_fired_rules_steps_and_the_reply_per_recipient(self, capsys, rule_and_envelope):
        rule, env = rule_and_envelope
        code, out, _ = run(capsys, "test", str(rule), str(env))
        assert code == 0
        assert f"{rule}:1:1" in out
        assert "WHEN @lmtp.rcpt.0 =~ /^support@/" in out
        assert 'match.num = "123"' in out
        assert 'SET @lmtp.res.recipients.0.msg = "ticket 123"' in out
        assert "EXEC op://ARCHIVE  [not executed]" in out
        lines = out.splitlines()
        replies = lines[lines.index("replies (lmtp):") + 1 :]
        assert [r.split() for r in replies] == [
            ["support@acme.example", "250", "2.0.0", "ticket", "123"],
            ["bcc@acme.example", "550", "5.1.1", "no", "rule", "accepted", "this", "recipient"],
        ]

    def test_json_is_one_document_with_the_same_facts(self, capsys, rule_and_envelope):
        rule, env = rule_and_envelope
        code, out, _ = run(capsys, "test", str(rule), str(env), "--json")
        doc = json.loads(out)
        assert code == 0
        assert [f["captures"] for f in doc["fired"]] == [{"num": "123"}]
        assert [s["kind"] for s in doc["steps"]] == ["set", "set", "exec"]
        assert doc["steps"][2]["executed"] is False
        assert doc["fired"][0]["pos"] == f"{rule}:1:1"
        assert doc["steps"][0]["path"] == "_txc.lmtp.res.recipients.0.code"
        assert "before" not in doc["steps"][0]  # the place was empty
        assert doc["res"] == {"recipients": [{"code": 250, "msg": "ticket 123"}]}
        assert doc["replies"] == [
            {"rcpt": "support@acme.example", "reply": "250 2.0.0 ticket 123"},
            {"rcpt": "bcc@acme.example", "reply": "550 5.1.1 no rule accepted this recipient"},
        ]
        assert doc["error"] is None

    def test_reads_the_envelope_from_stdin(self, capsys, monkeypatch, rule_and_envelope):
        rule, _ = rule_and_envelope
        monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(ENVELOPE)))
        code, out, _ = run(capsys, "test", str(rule), "-")
        assert code == 0 and "250 2.0.0 ticket 123" in out

    def test_a_message_is_built_into_an_envelope_like_the_lmtp_head_does(self, capsys, tmp_path, rule_and_envelope):
        rule, _ = rule_and_envelope
        eml = tmp_path / "m.eml"
        eml.write_bytes(MESSAGE)
        code, out, _ = run(capsys, "test", str(rule), str(eml), "--rcpt", "support@acme.example", "--from", "alice@example.com")
        assert code == 0
        assert "support@acme.example  250 2.0.0 ticket 77" in out

    def test_a_message_without_recipients_is_a_usage_error(self, capsys, tmp_path, rule_and_envelope):
        rule, _ = rule_and_envelope
        eml = tmp_path / "m.eml"
        eml.write_bytes(MESSAGE)
        code, _, err = run(capsys, "test", str(rule), str(eml))
        assert code == 2
        assert "needs at least one --rcpt" in err

    def test_an_envelope_that_is_not_an_object_fails_the_run_with_a_clear_error(self, capsys, tmp_path, rule_and_envelope):
        rule, _ = rule_and_envelope
        env = tmp_path / "list.json"
        env.write_text("[1, 2]")
        code, out, _ = run(capsys, "test", str(rule), str(env))
        assert code == 1
        assert "the envelope must be a JSON object, not list" in out

    def test_invalid_json_names_the_file_line_and_column(self, capsys, tmp_path, rule_and_envelope):
        rule, _ = rule_and_envelope
        env = tmp_path / "bad.json"
        env.write_text('{"_txc":\n  {"src": lmtp}}')
        code, _, err = run(capsys, "test", str(rule), str(env))
        assert code == 2
        assert f"{env}:2:11: txcl_test_error: not valid JSON" in err

    def test_a_run_error_exits_one_and_shows_the_tempfail(self, capsys, tmp_path):
        rule = tmp_path / "bad.txcl"
        rule.write_text("SET @lmtp.res.code = 990 + 9\n")
        env = tmp_path / "env.json"
        env.write_text(json.dumps(ENVELOPE))
        code, out, _ = run(capsys, "test", str(rule), str(env))
        assert code == 1
        assert "txcl_run_error" in out
        assert "support@acme.example  451 4.3.0" in out

    def test_a_syntax_error_is_reported_with_position_and_caret(self, capsys, tmp_path):
        rule = tmp_path / "r.txcl"
        rule.write_text("WHEN @lmtp.msg.subject =~ /urgent\nSET a.b = 1\n")
        env = tmp_path / "env.json"
        env.write_text(json.dumps(ENVELOPE))
        code, _, err = run(capsys, "test", str(rule), str(env))
        assert code == 1
        assert f"{rule}:1:27: txcl_parse_error: unterminated regex" in err
        assert "^" in err


def write_stack(root: Path, verdict_msg: str = "queued") -> Path:
    stack = root / "OPS" / "acme" / "_mail"
    (stack / "0").mkdir(parents=True)
    (stack / "0" / "10-accept.txcl").write_text(
        f'WHEN @lmtp.rcpt.0 =~ /^support@/\nSET @lmtp.res.code = 250\nSET @lmtp.res.msg = "{verdict_msg}"\nEXEC "op://TICKET"\n'
    )
    (stack / "tests").mkdir()
    (stack / "tests" / "accept.yaml").write_text(
        """\
cases:
  - name: support is accepted
    input:
      envelope:
        _txc:
          src: lmtp
          lmtp: {rcpt: [support@acme.example], msg: {subject: hi}}
    ops:
      TICKET: {ticket: {id: 7}}
    expect:
      fired: ["0/10-accept.txcl:1"]
      paths:
        ticket.id: 7
        "@lmtp.res.code": 250
        classify.label: ~missing
      verdicts: ["250 2.0.0 queued"]
  - name: others are refused
    input:
      envelope: {_txc: {src: lmtp, lmtp: {rcpt: [nobody@acme.example]}}}
    expect:
      fired: []
      verdicts: ["550 5.1.1 no rule accepted this recipient"]
"""
    )
    return root / "OPS"


class TestTestCases:
    def test_passing_cases_exit_zero_with_a_count(self, capsys, tmp_path):
        ops = write_stack(tmp_path)
        code, out, _ = run(capsys, "test", str(ops))
        assert code == 0
        assert "PASS  acme/_mail · accept.yaml · support is accepted" in out
        assert out.splitlines()[-1] == "2 passed, 0 failed"

    def test_a_failing_case_exits_one_with_expected_and_got(self, capsys, tmp_path):
        ops = write_stack(tmp_path, verdict_msg="accepted")
        code, out, _ = run(capsys, "test", str(ops))
        assert code == 1
        assert "FAIL  acme/_mail · accept.yaml · support is accepted" in out
        assert '-  "250 2.0.0 queued"' in out
        assert '+  "250 2.0.0 accepted"' in out
        assert out.splitlines()[-1] == "1 passed, 1 failed"

    def test_json_lists_every_case(self, capsys, tmp_path):
        ops = write_stack(tmp_path)
        code, out, _ = run(capsys, "test", str(ops), "--json")
        doc = json.loads(out)
        assert code == 0 and doc["passed"] == 2 and doc["failed"] == 0
        assert doc["cases"][0]["fired"] == ["0/10-accept.txcl:1"]

    def test_a_tree_with_load_problems_fails_even_without_cases(self, capsys, tmp_path):
        ops = tmp_path / "OPS"
        (ops / "Bad_Tenant").mkdir(parents=True)
        code, _, err = run(capsys, "test", str(ops))
        assert code == 1
        assert "Bad_Tenant" in err


class TestLint:
    @pytest.fixture
    def tree(self, tmp_path: Path) -> Path:
        stage = tmp_path / "OPS" / "acme" / "_mail" / "0"
        stage.mkdir(parents=True)
        (stage / "a.txcl").write_text("SET @lmtp.res.code = 999\nSET @route.to = 1\n")
        return tmp_path / "OPS"

    def test_text_findings_have_positions_and_exit_one(self, capsys, tree):
        code, out, _ = run(capsys, "lint", str(tree))
        assert code == 1
        assert "a.txcl:1:" in out and "[verdict-code]" in out
        assert out.splitlines()[-1].startswith("2 error(s)")

    def test_github_format_is_workflow_annotations(self, capsys, tree):
        _, out, _ = run(capsys, "lint", str(tree), "--format", "github")
        first = out.splitlines()[0]
        assert first.startswith("::error file=") and ",line=1,col=" in first and "title=verdict-code::" in first

    def test_json_format_counts_errors(self, capsys, tree):
        _, out, _ = run(capsys, "lint", str(tree), "--format", "json")
        doc = json.loads(out)
        assert doc["errors"] == 2
        assert {p["check"] for p in doc["problems"]} == {"verdict-code", "read-only-write"}

    def test_a_clean_tree_exits_zero(self, capsys, tmp_path):
        stage = tmp_path / "OPS" / "acme" / "_mail" / "0"
        stage.mkdir(parents=True)
        (stage / "a.txcl").write_text("SET @lmtp.res.code = 250\n")
        code, out, _ = run(capsys, "lint", str(tmp_path / "OPS"))
        assert code == 0 and out.strip() == "0 error(s), 0 warning(s)"

    def test_without_a_config_a_misspelt_builtin_op_is_still_caught(self, capsys, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        stage = tmp_path / "OPS" / "acme" / "_mail" / "0"
        stage.mkdir(parents=True)
        (stage / "a.txcl").write_text('EXEC "op://ARCHVE"\n')
        code, out, err = run(capsys, "lint", "OPS")
        assert code == 1
        assert out.splitlines()[0] == (
            "[error] OPS/acme/_mail/0/a.txcl:1:1: txcl_lint_error: unknown op 'ARCHVE' "
            "(known: ARCHIVE, EMIT, FORWARD, WEBHOOK); did you mean \"op://ARCHIVE\"? [unknown-op]"
        )
        assert "give --config" in err

    def test_a_missing_target_is_a_usage_error(self, capsys, tmp_path):
        code, _, err = run(capsys, "lint", str(tmp_path / "nope"))
        assert code == 2 and "no such file or folder" in err


class TestFmt:
    def test_check_lists_unformatted_files_and_write_fixes_them(self, capsys, tmp_path):
        f = tmp_path / "r.txcl"
        f.write_text('when @lmtp.rcpt.0 =~ /x/\nset @lmtp.res.code=250\n')
        code, out, _ = run(capsys, "fmt", "--check", str(tmp_path))
        assert code == 1 and out.strip() == str(f)
        assert run(capsys, "fmt", "-w", str(f))[0] == 0
        assert f.read_text() == "WHEN @lmtp.rcpt.0 =~ /x/\nSET @lmtp.res.code = 250\n"
        assert run(capsys, "fmt", "--check", str(f))[0] == 0

    def test_diff_shows_the_change(self, capsys, tmp_path):
        f = tmp_path / "r.txcl"
        f.write_text("set a.b=1\n")
        _, out, _ = run(capsys, "fmt", "-d", str(f))
        assert "-set a.b=1" in out and "+SET a.b = 1" in out

    def test_a_file_that_does_not_parse_is_reported_not_rewritten(self, capsys, tmp_path):
        f = tmp_path / "r.txcl"
        f.write_text("SET a.b 1\n")
        code, _, err = run(capsys, "fmt", "-w", str(f))
        assert code == 1 and "txcl_parse_error" in err
        assert f.read_text() == "SET a.b 1\n"


def test_the_installed_entry_point_runs(tmp_path, rule_and_envelope):
    rule, env = rule_and_envelope
    done = subprocess.run(
        [sys.executable, "-m", "txcl.cli", "test", str(rule), str(env)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "250 2.0.0 ticket 123" in done.stdout
