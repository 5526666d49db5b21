"""`txcl test --explain`: every rule of every stage, each WHEN's result and values, scrubbed."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txcl.cli import main
from txcl.explain import _Shown, _spaced_json, explain, explain_record
from txcl.loader import load_target
from txcl.records import ScrubHints
from txcl.runner import TEST_POLICY, RunPolicy
from txcl.trace import scrubber_for

RULES = {
    "0/10-from.txcl": (
        'WHEN @lmtp.mail.from == "boss@acme.example"\n'
        'WHEN @lmtp.msg.subject =~ /urgent/\n'
        "SET flags.urgent = true\n"
        'WITH redact = "_txc.lmtp.mail.from"\n'
    ),
    "0/20-any.txcl": "WHEN len(@lmtp.rcpt) > 0\nSET flags.seen = true\n",
    "1/10-late.txcl": "WHEN flags.urgent == true\nSET flags.paged = true\n",
}

ENVELOPE = {
    "_txc": {
        "src": "lmtp",
        "route": {"tenant": "acme", "stack": "acme/s", "to": "acme/s/0"},
        "lmtp": {
            "rcpt": ["a@acme.example"],
            "mail": {"from": "boss@acme.example"},
            "msg": {"subject": "lunch?"},
        },
    }
}


def _tree(tmp_path: Path) -> Path:
    for name, text in RULES.items():
        path = tmp_path / "OPS" / "acme" / "s" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "env.json").write_text(json.dumps(ENVELOPE))
    return tmp_path / "OPS" / "acme" / "s"


def test_explain_shows_rules_that_did_not_fire_with_values_scrubbed(tmp_path, capsys):
    stack_dir = _tree(tmp_path)
    code = main(["test", str(stack_dir), str(tmp_path / "env.json"), "--explain", "--json", "--no-cache"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    rules = doc["explain"]
    assert [(r["stage"], Path(r["file"]).name, r["fired"]) for r in rules] == [
        (0, "10-from.txcl", False),
        (0, "20-any.txcl", True),
        (1, "10-late.txcl", False),
    ]
    first = rules[0]
    assert first["first_false"] == 1
    assert [w["held"] for w in first["whens"]] == [True, False]
    # the sender is redacted by the stack's WITH redact, as the trace shows it
    assert first["whens"][0]["values"] == {"@lmtp.mail.from": '"[REDACTED]"'}
    assert first["whens"][1]["values"] == {"@lmtp.msg.subject": '"lunch?"'}
    assert rules[1]["whens"][0]["values"] == {"len(@lmtp.rcpt)": "1"}
    assert rules[2]["whens"][0]["values"] == {"flags.urgent": "missing"}


def test_explain_text_through_the_cli(tmp_path):
    stack_dir = _tree(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "txcl.cli", "test", str(stack_dir), str(tmp_path / "env.json"), "--explain", "--no-cache"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "explain:" in out
    assert "10-from.txcl:1:1  not fired" in out
    assert '✗ WHEN @lmtp.msg.subject =~ /urgent/   <- first WHEN that did not hold' in out
    assert '@lmtp.mail.from = "[REDACTED]"' in out
    assert '@lmtp.msg.subject = "lunch?"' in out


def test_recording_is_off_unless_asked(tmp_path):
    stack = load_target(_tree(tmp_path)).stacks["acme/s"]
    assert stack.run(ENVELOPE, TEST_POLICY).snapshots is None
    result = stack.run(ENVELOPE, RunPolicy(run_ops=False, explain=True))
    assert [s.stage for s in result.snapshots] == [0, 1]
    assert result.snapshots[0].envelope is ENVELOPE  # a reference, not a copy
    assert len(explain(stack, result)) == 3


def test_explain_under_test_cases_shows_why_a_case_failed(tmp_path, capsys):
    stack_dir = _tree(tmp_path)
    (stack_dir / "tests").mkdir()
    (stack_dir / "tests" / "t.yaml").write_text(
        "name: the boss is urgent\n"
        f"input: {{envelope: {json.dumps(ENVELOPE)}}}\n"
        "expect: {paths: {flags.urgent: true}}\n"
    )
    assert main(["test", str(stack_dir), "--explain", "--no-cache"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  acme/s · t.yaml · the boss is urgent" in out
    assert "✗ WHEN @lmtp.msg.subject =~ /urgent/   <- first WHEN that did not hold" in out


SCRUBBED_STACK = {
    "0/10-reads.txcl": (
        "WHEN $._txc.lmtp.msg.attachments[*].type =~ /pdf/\n"
        "WHEN lower(@lmtp.msg.headers.authorization.0) =~ /bearer/\n"
        "WHEN @lmtp.msg.text =~ /nothing like this/\n"
        "SET flags.x = true\n"
        'WITH omit = "_txc.lmtp.msg.attachments"\n'
        'WITH redact = "_txc.lmtp.msg.headers.authorization"\n'
    ),
}
TOKEN = "Bearer sk-live-0123456789abcdef"


def test_values_computed_from_scrubbed_paths_are_scrubbed_whole_and_long_ones_cut(tmp_path):
    for name, text in SCRUBBED_STACK.items():
        path = tmp_path / "OPS" / "acme" / "s" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    stack = load_target(tmp_path / "OPS").stacks["acme/s"]
    # the body quotes the token just where the shown text is cut
    body = "x" * 60 + TOKEN + "y" * 10_000
    envelope = {
        "_txc": {
            "src": "lmtp",
            "route": {"tenant": "acme", "stack": "acme/s", "to": "acme/s/0"},
            "lmtp": {
                "msg": {
                    "attachments": [{"type": "application/pdf", "name": "secret-plan.pdf"}],
                    "headers": {"authorization": [TOKEN]},
                    "text": body,
                },
            },
        }
    }
    [rule] = explain(stack, stack.run(envelope, RunPolicy(run_ops=False, explain=True)))
    values = [w.operands[0].value for w in rule.whens]
    assert values[0] == '"[OMITTED]"'  # a JSONPath into omitted attachments
    assert values[1] == '"[REDACTED]"'  # a function of a redacted header
    assert values[2].startswith('"' + "x" * 60 + "[REDACTED]yyy") and values[2].endswith("…")
    assert len(values[2]) == 80 and "sk-live" not in values[2]
    assert [w.held for w in rule.whens] == [True, True, False] and rule.first_false == 2


@settings(max_examples=200, deadline=None)
@given(
    before=st.text(max_size=200),
    after=st.text(max_size=200),
    secret=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=8, max_size=120),
)
def test_a_shown_value_is_short_and_never_holds_a_scrubbed_value(before, after, secret):
    """Whatever surrounds a redacted value, and wherever the cut falls, it does not show."""
    hints = ScrubHints(redact=("_txc.lmtp.mail.from",))
    scrubber = scrubber_for(hints)
    envelope = {"_txc": {"lmtp": {"mail": {"from": secret}, "msg": {"text": before + secret + after}}}}
    shown = _Shown(scrubber, scrubber.taint(envelope))
    text = shown(before + secret + after, ("path", ("_txc", "lmtp", "msg", "text")))
    assert len(text) <= 80
    assert secret not in text
    assert shown(secret, ("path", ("_txc", "lmtp", "mail", "from"))) == '"[REDACTED]"'


# Rules of every shape explain meets: several WHENs, captures read by later WHENs, `*`
# bindings, missing values, functions, NOT and OR, a regex over the body.
NOTED_STACK = {
    "0/05-early.txcl": "WHEN flags.urgent\nSET flags.early = 1\n",  # set by a later rule
    "0/10-multi.txcl": (
        "WHEN @lmtp.mail.from =~ /@acme\\.example$/\n"
        "WHEN @lmtp.msg.subject =~ /urgent/\n"
        "WHEN @lmtp.msg.text =~ /invoice/i\n"
        "SET flags.urgent = true\n"
    ),
    "0/20-capture.txcl": (
        "WHEN @lmtp.msg.subject =~ /\\[#(?P<num>[0-9]+)\\]/\n"
        'WHEN match.num != "0"\n'
        "SET flags.ticket = match.num\n"
    ),
    "0/30-capture-only.txcl": (
        "WHEN @lmtp.msg.subject =~ /(?P<word>[a-z]+)/\n"
        "WHEN @lmtp.mail.from != \"x\"\n"
        "SET flags.word = match.word\n"
    ),
    "0/40-bound.txcl": (
        "WHEN @lmtp.rcpt.* =~ /^a/\n"
        "WHEN @lmtp.rcpt.* =~ /acme/\n"
        "SET flags.bound = true\n"
    ),
    "0/50-missing.txcl": "WHEN @lmtp.msg.headers.x-flag.0 == \"YES\"\nWHEN flags.none\nSET flags.y = 1\n",
    "0/60-logic.txcl": (
        "WHEN NOT domain(@lmtp.mail.from) IN [\"acme.example\"] OR len(@lmtp.rcpt) > 1\n"
        "WHEN exists(@lmtp.msg.subject)\n"
        "SET flags.z = true\n"
    ),
    "0/70-bare.txcl": "WHEN @lmtp.msg.headers.x-flag\nWHEN @lmtp.msg.subject == \"x\"\nSET flags.b = 1\n",
    "0/80-always.txcl": "SET flags.always = true\n",
    "1/10-late.txcl": "WHEN flags.urgent == true\nWHEN flags.ticket == \"7\"\nSET flags.paged = true\n",
    # the fields of rules before, compared again (explain shows each once per stage start)
    "1/20-again.txcl": (
        "WHEN flags.urgent == true\n"
        "WHEN @lmtp.msg.subject =~ /urgent/\n"
        "SET flags.after = 1\n"
    ),
    "1/30-again.txcl": "WHEN flags.b == 1 OR flags.urgent\nWHEN flags.ticket\nSET flags.c = 1\n",
}


@pytest.fixture(scope="module")
def noted_stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("noted")
    for name, text in NOTED_STACK.items():
        path = root / "OPS" / "acme" / "s" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    tree = load_target(root / "OPS")
    assert not tree.problems, tree.problems
    return tree.stacks["acme/s"]


@settings(max_examples=300, deadline=None)
@given(
    sender=st.sampled_from(["boss@acme.example", "a@other.example", "x", ""]),
    subject=st.one_of(st.none(), st.sampled_from(["urgent [#7]", "[#0] hi", "x", "URGENT", ""])),
    text=st.sampled_from(["", "the Invoice", "nothing"]),
    rcpt=st.lists(st.sampled_from(["a@acme.example", "b@acme.example", "ab@x"]), max_size=3),
    flag=st.one_of(st.none(), st.sampled_from(["YES", "no"])),
)
def test_explain_from_what_the_run_noted_equals_evaluating_again(
    noted_stack, sender, subject, text, rcpt, flag
):
    """What the run notes of each rule (StageStart.first_false) spares explain evaluating
    the WHENs again, and changes nothing it shows; nor does the noting change the run."""
    msg: dict[str, Any] = {"text": text, "headers": {}}
    if subject is not None:
        msg["subject"] = subject
    if flag is not None:
        msg["headers"]["x-flag"] = [flag]
    envelope = {"_txc": {
        "src": "lmtp",
        "route": {"tenant": "acme", "stack": "acme/s", "to": "acme/s/0"},
        "lmtp": {"rcpt": rcpt, "mail": {"from": sender}, "msg": msg},
    }}
    on = RunPolicy(run_ops=False, explain=True)
    result = noted_stack.run(envelope, on)
    plain = noted_stack.run(envelope, TEST_POLICY)
    assert (result.envelope, result.fired, result.steps) == (
        plain.envelope, plain.fired, plain.steps)
    assert all(len(s.first_false) == len(s.rules) for s in result.snapshots)
    unnoted = dataclasses.replace(result, snapshots=tuple(
        dataclasses.replace(s, first_false=None) for s in result.snapshots))
    hints = noted_stack.hints
    assert explain_record(result, hints) == explain_record(unnoted, hints)
    assert explain(noted_stack, result) == explain(noted_stack, unnoted)
    # a run that stopped within a stage noted fewer rules: the rest are evaluated
    cut = dataclasses.replace(result, snapshots=tuple(
        dataclasses.replace(s, first_false=s.first_false[:2]) for s in result.snapshots))
    assert explain_record(cut, hints) == explain_record(unnoted, hints)


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),  # text: surrogates too
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text() | st.integers() | st.booleans(), inner, max_size=4)
    | st.tuples(inner, inner),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(_JSONISH)
def test_values_shown_as_json_with_spaces_as_the_standard_library_writes_them(value):
    """A list or object a WHEN compares is shown as `json.dumps` writes it (", " and ": "),
    built from orjson's strings; the standard library's only for what those do not cover."""
    assert _spaced_json(value) == json.dumps(value, ensure_ascii=False, default=repr)
