"""`txcl lint`: golden files for the per-file checks, and OPS trees for the stack-wide ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from txcl.errors import Pos
from txcl.lint import CHECKS, LINT_CODE, lint_file, lint_source, lint_target, lint_tree
from txcl.ops import OpRegistry

GOLDEN = Path(__file__).parent / "lint"
CASES = sorted(GOLDEN.glob("*.txcl"))


def _noop(envelope: object, args: object, ctx: object) -> dict[str, object]:
    return {}


REGISTRY = OpRegistry({"ARCHIVE": _noop, "CLASSIFY": _noop})


def render(problems: list) -> str:
    return "".join(f"[{p.severity}] {p}\n" for p in problems)


@pytest.mark.parametrize("source", CASES, ids=[p.stem for p in CASES])
def test_golden(source: Path) -> None:
    problems = lint_source(source.read_text("utf-8"), source.name, REGISTRY)
    expected = source.with_name(source.name + ".error").read_text("utf-8")
    assert render(problems) == expected


def test_every_golden_file_has_its_expected_findings() -> None:
    assert CASES
    assert all(p.with_name(p.name + ".error").exists() for p in CASES)


def test_findings_carry_the_code_of_their_severity_and_name_their_check() -> None:
    problems = [
        p for case in CASES for p in lint_source(case.read_text("utf-8"), case.name, REGISTRY)
    ]
    assert {p.code for p in problems if p.severity == "error"} == {LINT_CODE}
    assert {p.code for p in problems if p.severity == "warning"} == {"txcl_lint_warning"}
    assert {p.check for p in problems} == set(CHECKS) - {"layout", "schema"}
    assert all(p.severity == CHECKS[p.check] for p in problems)


def test_without_a_registry_ops_are_not_checked() -> None:
    assert lint_source('EXEC "op://WHATEVER"\n', "r.txcl") == []


def test_lint_file_reads_crlf_utf8_with_bom(tmp_path: Path) -> None:
    rule = tmp_path / "r.txcl"
    rule.write_bytes(b"\xef\xbb\xbfSET @lmtp.res.code = 999\r\n")
    (problem,) = lint_file(rule)
    assert (problem.check, problem.pos) == ("verdict-code", Pos(str(rule), 1, 22))


def test_lint_file_reports_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    rule = tmp_path / "r.txcl"
    rule.write_bytes(b'SET @a.b = 1\nSET @a.c = "\xff"\n')
    (problem,) = lint_file(rule)
    assert (problem.check, problem.pos, problem.message) == (
        "layout",
        Pos(str(rule), 2, 13),
        "not UTF-8 text: byte 0xff",
    )


# --- trees ------------------------------------------------------------------------------------


def write(root: Path, relative: str, text: str = "SET @lmtp.res.code = 250\n") -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")
    return path


def checks(problems: list) -> list[tuple[str, str]]:
    return [(p.check, Path(p.pos.file).name if p.pos else "") for p in problems]


def test_recipient_slots_are_checked_across_the_files_of_a_stack(tmp_path: Path) -> None:
    ops = tmp_path / "OPS"
    write(ops, "acme/_mail/0/10-first.txcl", "SET @lmtp.res.recipients.1.code = 250\n")
    write(ops, "acme/_mail/1/20-second.txcl", "SET @lmtp.res.recipients.0.code = 250\n")
    write(ops, "beta/inbound/0/a.txcl", "SET @lmtp.res.recipients.1.code = 250\n")
    assert checks(lint_tree(ops)) == [("recipient-gap", "a.txcl")]


def test_tree_reports_layout_and_file_findings_together(tmp_path: Path) -> None:
    ops = tmp_path / "OPS"
    write(ops, "acme/_mail/0/ok.txcl")
    write(ops, "acme/_mail/0/notes.md", "# not a rule\n")
    write(ops, "acme/_mail/01/x.txcl")
    write(ops, "Bad_Tenant/_mail/0/x.txcl")
    write(ops, "acme/Bad Stack/0/x.txcl")
    write(ops, "acme/_mail/1/bad.txcl", 'EXEC "op://NOPE"\nSET @src = "x"\n')
    outside = write(tmp_path, "elsewhere/secret.txcl", "SET @src = 1\n")
    os.symlink(outside, ops / "acme/_mail/0/link.txcl")
    problems = lint_tree(ops, REGISTRY)
    layout = [p for p in problems if p.check == "layout"]
    assert all(p.severity == "error" and p.code == LINT_CODE for p in layout)
    assert sorted(p.message.split(":")[0].removeprefix(f"{ops}/") for p in layout) == [
        "Bad_Tenant",
        "acme/Bad Stack",
        "acme/_mail/0/link.txcl",
        "acme/_mail/0/notes.md",
        "acme/_mail/01",
    ]
    assert sorted(checks(p for p in problems if p.check != "layout")) == [
        ("read-only-write", "bad.txcl"),
        ("unknown-op", "bad.txcl"),
    ]


def test_a_rule_file_over_the_size_limit_is_one_layout_error(tmp_path: Path) -> None:
    ops = tmp_path / "OPS"
    big = write(ops, "acme/_mail/0/big.txcl", "SET a.b = 1\n")
    os.truncate(big, 10 << 20)  # sparse: no time spent writing 10 MiB
    expected = [
        (
            "layout",
            "error",
            Pos(str(big), 1, 1),
            "rule file is 10.0 MiB; the limit is 1 MiB — split it into several files",
        )
    ]
    for target in (big, ops / "acme/_mail/0", ops / "acme/_mail", ops):
        found = [(p.check, p.severity, p.pos, p.message) for p in lint_target(target)]
        assert found == expected, target


def test_a_clean_tree_has_no_findings(tmp_path: Path) -> None:
    ops = tmp_path / "OPS"
    write(ops, "acme/_mail/0/a.txcl", (GOLDEN / "clean.txcl").read_text("utf-8"))
    write(ops, "acme/_mail/tests/case.yaml", "{}\n")
    assert lint_tree(ops, REGISTRY) == []


def test_lint_target_takes_a_file_a_stage_a_stack_or_a_root(tmp_path: Path) -> None:
    ops = tmp_path / "OPS"
    write(ops, "acme/_mail/0/a.txcl", "SET @lmtp.res.recipients.1.code = 250\n")
    write(ops, "acme/_mail/1/b.txcl", "SET @lmtp.res.recipients.0.code = 250\n")
    stack = ops / "acme/_mail"
    assert checks(lint_target(stack / "0/a.txcl")) == [("recipient-gap", "a.txcl")]
    assert checks(lint_target(stack / "0")) == [("recipient-gap", "a.txcl")]
    assert lint_target(stack) == []
    assert lint_target(ops) == []
    assert [p.message for p in lint_target(tmp_path / "missing")] == [
        f"{tmp_path / 'missing'}: no such file or folder"
    ]


def test_a_schema_that_cannot_load_is_one_clear_finding(monkeypatch) -> None:
    from txcl import schema

    class Broken:
        name = "lmtp"

        def schema(self) -> dict:
            raise ValueError("Expecting ',' delimiter: line 3 column 5")

    monkeypatch.setattr("txcl.sources.sources", lambda: {"lmtp": Broken()})
    schema.section_schema.cache_clear()
    try:
        rules = "WHEN @lmtp.msg.subjet == 1\nWHEN @lmtp.x == 2\nSET tag.x = 1\n"
        problems = lint_source(rules, "r.txcl")
    finally:
        schema.section_schema.cache_clear()
    (problem,) = problems
    assert (problem.check, problem.severity) == ("schema", "error")
    assert problem.pos == Pos("r.txcl", 1, 6)
    assert "lmtp" in problem.message and "line 3 column 5" in problem.message


def test_a_hundred_segment_path_is_one_clear_finding() -> None:
    deep = ".".join(f"k{i}" for i in range(100))
    (problem,) = lint_source(f"WHEN @lmtp.msg.{deep} == 1\nSET tag.x = 1\n", "r.txcl")
    assert problem.check == "unknown-path" and "@lmtp.msg.k0" in problem.message
    assert lint_source(f"WHEN @lmtp.res.{deep} == 1\nSET tag.x = 1\n", "r.txcl") == []
