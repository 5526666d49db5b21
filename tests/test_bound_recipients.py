"""`@lmtp.rcpt.*` binds the recipients a WHEN matched; `recipients.*` answers exactly those
(issue 15.4). The example stack answers 1, 3 and 50 recipients with one rule each way."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmtp.verdicts import SOURCE
from txcl.compiler import compile_file
from txcl.errors import TxclError
from txcl.lint import lint_source
from txcl.loader import load_target
from txcl.parser import parse
from txcl.runner import TEST_POLICY, Stack

EXAMPLE = Path(__file__).resolve().parent.parent / "examples/inbound-support-mailbox"
SAMPLE = (EXAMPLE / "samples/outage.eml").read_bytes()
STUBS = {"CLASSIFY": {"classify": {"label": "outage", "score": 1.0}},
         "TICKET": {"ticket": {"id": 7, "new": True, "ref": "#7", "repeat": False}}}


@pytest.fixture(scope="module")
def support() -> Stack:
    return load_target(EXAMPLE / "OPS/acme/support").stacks["acme/support"]


def replies(stack: Stack, rcpts: list[str]) -> list[str]:
    import dataclasses

    envelope = SOURCE.envelope_from_message(
        SAMPLE, rcpts=rcpts, mail_from="a@b.example", stack=stack.name, stage=0)
    result = stack.run(envelope, dataclasses.replace(TEST_POLICY, op_stubs=STUBS))
    assert result.error is None, result.error
    return [line for _, line in SOURCE.replies(result.envelope, result.error)]


@pytest.mark.parametrize("count", [1, 3, 50])
def test_the_example_answers_every_recipient_by_its_address(support, count):
    rcpts = [f"support+{i}@acme.example" if i % 3 != 1 else f"sales{i}@acme.example"
             for i in range(count)]
    got = replies(support, rcpts)
    want = ["250 2.0.0 ticket #7" if i % 3 != 1 else "550 5.1.1 no such mailbox"
            for i in range(count)]
    assert got == want


def stack_of(text: str) -> Stack:
    rules = compile_file(parse(text, "r.txcl"))
    from txcl.runner import Stage

    return Stack("acme/_mail", (Stage(0, rules, ("r.txcl",)),))


def run(text: str, rcpts: list[str]) -> list[str]:
    envelope = {"_txc": {"src": "lmtp", "route": {"to": "acme/_mail/0"},
                         "lmtp": {"rcpt": rcpts}}}
    result = stack_of(text).run(envelope, TEST_POLICY)
    assert result.error is None, result.error
    return [line for _, line in SOURCE.replies(result.envelope, result.error)]


BILLING = ("WHEN @lmtp.rcpt.* =~ /^billing@/\nSET @lmtp.res.recipients.*.code = 250\n"
           'SET @lmtp.res.recipients.*.msg = "billing"\n')


def test_only_the_matched_recipients_are_answered_the_rest_keep_default_deny():
    assert run(BILLING, ["a@x", "billing@x", "b@x", "billing@y"]) == [
        "550 5.1.1 no rule accepted this recipient", "250 2.0.0 billing",
        "550 5.1.1 no rule accepted this recipient", "250 2.0.0 billing"]
    assert run(BILLING, ["a@x"]) == ["550 5.1.1 no rule accepted this recipient"]


def test_two_bound_whens_keep_the_indices_both_hold_for():
    rules = ("WHEN @lmtp.rcpt.* =~ /^billing@/\nWHEN @lmtp.rcpt.* =~ /@y$/\n"
             "SET @lmtp.res.recipients.*.code = 250\n")
    assert run(rules, ["billing@x", "billing@y", "a@y"]) == [
        "550 5.1.1 no rule accepted this recipient", "250 2.0.0 OK",
        "550 5.1.1 no rule accepted this recipient"]


def test_the_broadcast_form_is_unchanged():
    assert run("SET @lmtp.res.code = 250\n", ["a@x", "b@x"]) == ["250 2.0.0 OK"] * 2


@pytest.mark.parametrize(("text", "says"), [
    ("SET @lmtp.res.recipients.*.code = 250\n", "needs a WHEN that binds it"),
    ('WHEN @lmtp.rcpt.0 == @lmtp.rcpt.*\nSET tag.x = 1\n', "binds list indices only"),
    ("WHEN @lmtp.rcpt.*.*.x == 1\nSET tag.x = 1\n", "one `*` per path"),
])
def test_a_misplaced_star_is_a_compile_error(text, says):
    with pytest.raises(TxclError, match=says.replace("`", ".").replace("*", ".")):
        compile_file(parse(text, "r.txcl"))


def test_lint_knows_a_star_path_and_its_item_type():
    assert lint_source(BILLING, "r.txcl") == []
    (problem,) = lint_source("WHEN @lmtp.rcpt.* > 3\nSET @lmtp.res.recipients.*.code = 250\n",
                             "r.txcl")
    assert problem.check == "type-mismatch"
