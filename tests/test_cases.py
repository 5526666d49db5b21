"""Stack test case files: how they are read, and what a bad one says."""

from __future__ import annotations

from pathlib import Path

import pytest

from txcl.cases import aim_at, load_cases, run_case_file
from txcl.errors import TxclError
from txcl.loader import load_target


@pytest.fixture
def stack(tmp_path: Path):
    stage = tmp_path / "OPS" / "acme" / "_mail" / "1"
    stage.mkdir(parents=True)
    (stage / "a.txcl").write_text("SET @lmtp.res.code = 250\n")
    return load_target(stage.parent).stacks["acme/_mail"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "case.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("name: x\n", "`input` needs exactly one of envelope, envelope_file, eml", id="no input"),
        pytest.param("input: {envelope: {}}\n", "every case needs a `name`", id="no name"),
        pytest.param("name: x\ninput: {eml: m.eml}\n", "input.eml needs `rcpt`", id="eml without rcpt"),
        pytest.param("name: x\ninput: {envelope: []}\n", "the envelope must be a JSON object", id="envelope list"),
        pytest.param("name: x\ninput: {envelope: {}}\nexpect: {fird: []}\n", "unknown expectation 'fird'", id="typo in expect"),
        pytest.param("name: x\ninput: {envelope: {}}\nops: {A: 1}\n", "`ops` maps op names", id="stub not a patch"),
        pytest.param("cases:\n  - {name: x, input: {envelope: {}}}\n  - {name: x, input: {envelope: {}}}\n", "two cases are named 'x'", id="duplicate names"),
        pytest.param("name: [\n", "not valid YAML", id="bad yaml"),
    ],
)
def test_a_bad_case_file_says_what_is_wrong(tmp_path, stack, text, message):
    with pytest.raises(TxclError) as err:
        load_cases(write(tmp_path, text), stack)
    assert message in err.value.problem.message
    assert err.value.problem.pos.file == str(tmp_path / "case.yaml")


def test_a_bad_case_file_is_one_failed_result_not_a_crash(tmp_path, stack):
    [result] = run_case_file(write(tmp_path, "name: [\n"), stack)
    assert not result.passed and result.problem.code == "txcl_test_error"


def test_aim_at_routes_the_envelope_to_the_first_stage_without_touching_the_input(stack):
    envelope = {"_txc": {"src": "lmtp", "route": {"to": "other/x/0", "ingress": "domain:a"}}}
    aimed = aim_at(envelope, stack)
    assert aimed["_txc"]["route"] == {"to": "acme/_mail/1", "tenant": "acme", "stack": "acme/_mail", "ingress": "domain:a"}
    assert envelope["_txc"]["route"]["to"] == "other/x/0"


def test_aim_at_keeps_a_route_that_names_a_stage_of_the_stack(stack):
    envelope = {"_txc": {"route": {"to": "acme/_mail/1"}}}
    assert aim_at(envelope, stack) is envelope


def test_an_expected_run_error_is_matched_by_substring(tmp_path):
    stage = tmp_path / "OPS" / "acme" / "_mail" / "0"
    stage.mkdir(parents=True)
    (stage / "a.txcl").write_text("SET @lmtp.res.code = 990 + 9\n")  # computed: lint cannot see it
    stack = load_target(stage.parent).stacks["acme/_mail"]
    path = write(tmp_path, "name: bad code\ninput: {envelope: {_txc: {src: lmtp}}}\nexpect: {error: '999'}\n")
    [result] = run_case_file(path, stack)
    assert result.passed, result.mismatches
