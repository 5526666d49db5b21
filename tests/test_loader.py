"""loader.py: the OPS layout, every problem of every file, and what a target can be."""

from __future__ import annotations

import os
from pathlib import Path

from txcl.loader import MAX_RULE_FILE_BYTES, load_target, load_tree
from txcl.ops import OpRegistry
from txcl.runner import TEST_POLICY

ACCEPT = 'SET @lmtp.res.code = 250\nSET @lmtp.res.msg = "ok"\n'


def write(root: Path, relative: str, text: str | bytes = ACCEPT) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def messages(tree_problems: tuple) -> list[str]:  # type: ignore[type-arg]
    return [str(p).splitlines()[0] for p in tree_problems]


def test_a_tree_loads_stacks_stages_and_files_in_byte_order(tmp_path: Path) -> None:
    ops = tmp_path / "OPS"
    write(ops, "acme/_mail/0/b.txcl", "SET order.b = 1\n")
    write(ops, "acme/_mail/0/B.txcl", "SET order.upper = 1\n")
    write(ops, "acme/_mail/0/a.txcl", "SET order.a = 1\n")
    write(ops, "acme/_mail/10/z.txcl", ACCEPT)
    write(ops, "acme/_mail/tests/basic.yaml", "cases: []\n")
    write(ops, "beta-co/mail_catchall/0/accept.txcl", ACCEPT)
    tree = load_tree(ops)
    assert tree.problems == ()
    assert tree.files == 5
    assert sorted(tree.stacks) == ["acme/_mail", "beta-co/mail_catchall"]
    mail = tree.stacks["acme/_mail"]
    assert [s.number for s in mail.stages] == [0, 10]
    assert [Path(f).name for f in mail.stages[0].files] == ["B.txcl", "a.txcl", "b.txcl"]
    assert tree.case_files["acme/_mail"] == (ops / "acme/_mail/tests/basic.yaml",)
    result = mail.run({"_txc": {"src": "lmtp", "route": {"to": "acme/_mail/0"}}}, TEST_POLICY)
    assert result.envelope["_txc"]["lmtp"]["res"] == {"code": 250, "msg": "ok"}


def test_layout_problems_are_reported_and_only_their_stack_is_dropped(tmp_path: Path) -> None:
    ops = tmp_path / "OPS"
    write(ops, "good/_mail/0/a.txcl")
    write(ops, "acme/_mail/0/a.txcl")
    write(ops, "acme/_mail/0/notes.md", "hi")
    write(ops, "acme/_mail/01/a.txcl")
    write(ops, "acme/_mail/stage/a.txcl")
    write(ops, "Acme/_mail/0/a.txcl")
    write(ops, "acme/Bad/0/a.txcl")
    write(ops, "README", "x")
    tree = load_tree(ops)
    assert sorted(tree.stacks) == ["good/_mail"]
    assert tree.rejected == {"acme/_mail"}
    assert all(p.code == "txcl_load_error" for p in tree.problems)
    assert messages(tree.problems) == [
        f"txcl_load_error: {ops}/Acme: expected a tenant folder named [a-z][a-z0-9-]*",
        f"txcl_load_error: {ops}/README: expected a tenant folder named [a-z][a-z0-9-]*",
        f"txcl_load_error: {ops}/acme/Bad: expected a stack folder named [a-z_][a-z0-9_-]*",
        f"txcl_load_error: {ops}/acme/_mail/0/notes.md: a stage holds only <name>.txcl files",
        f"txcl_load_error: {ops}/acme/_mail/01: a stack folder holds only stage folders "
        "(0, 1, 10, ...) and tests/",
        f"txcl_load_error: {ops}/acme/_mail/stage: a stack folder holds only stage folders "
        "(0, 1, 10, ...) and tests/",
    ]


def test_problems_of_every_file_are_reported(tmp_path: Path) -> None:
    ops = tmp_path / "OPS"
    write(ops, "acme/_mail/0/a.txcl", "WHEN @a =~ /(?=x)/\nSET b.c = 1\n")
    write(ops, "acme/_mail/0/b.txcl", "WHEN nosuch(1)\nSET b.c = 1\n")
    write(ops, "acme/_mail/1/c.txcl", "SET = 1\n")
    tree = load_tree(ops)
    assert tree.stacks == {}
    heads = [p.split(": ")[0:2] for p in messages(tree.problems)]
    assert heads == [
        [f"{ops}/acme/_mail/0/a.txcl:1:13", "txcl_compile_error"],  # at the (?=
        [f"{ops}/acme/_mail/0/b.txcl:1:6", "txcl_compile_error"],
        [f"{ops}/acme/_mail/1/c.txcl:1:5", "txcl_parse_error"],
    ]


def test_malformed_utf8_is_a_problem_with_its_position(tmp_path: Path) -> None:
    ops = tmp_path / "OPS"
    write(ops, "acme/_mail/0/a.txcl", b'SET a.b = 1\nSET a.c = "caf\xc3\xa9 \xff"\n')
    (problem,) = load_tree(ops).problems
    assert (
        str(problem)
        == f"{ops}/acme/_mail/0/a.txcl:2:17: txcl_load_error: not UTF-8 text: byte 0xff"
    )


def sparse(path: Path, size: int, start: bytes = b"SET a.b = 1\n") -> Path:
    """A file of `size` bytes that costs no disk and no time to write: a hole after `start`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(start)
    os.truncate(path, size)
    return path


def test_a_rule_file_over_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    ops = tmp_path / "OPS"
    big = sparse(ops / "acme/_mail/0/big.txcl", 10 << 20)
    write(ops, "beta/_mail/0/ok.txcl")
    tree = load_tree(ops)
    assert messages(tree.problems) == [
        f"{big}:1:1: txcl_load_error: rule file is 10.0 MiB; the limit is 1 MiB "
        "— split it into several files"
    ]
    assert sorted(tree.stacks) == ["beta/_mail"]
    assert messages(load_target(big).problems) == messages(tree.problems)


def test_the_size_limit_is_inclusive_and_named_in_bytes_near_it(tmp_path: Path) -> None:
    # One line padded with blanks: the lexer takes the padding in one step, so this stays fast.
    at_limit = tmp_path / "at.txcl"
    at_limit.write_bytes(b"SET a.b = 1" + b" " * (MAX_RULE_FILE_BYTES - 11))
    assert load_target(at_limit).problems == ()
    over = tmp_path / "over.txcl"
    over.write_bytes(b"SET a.b = 1" + b" " * (MAX_RULE_FILE_BYTES - 10))
    assert messages(load_target(over).problems) == [
        f"{over}:1:1: txcl_load_error: rule file is 1,048,577 bytes; the limit is 1 MiB "
        "— split it into several files"
    ]


def test_symlinks_that_escape_the_root_are_refused(tmp_path: Path) -> None:
    ops = tmp_path / "OPS"
    outside = write(tmp_path, "elsewhere/x.txcl")
    write(ops, "acme/_mail/0/a.txcl")
    os.symlink(outside, ops / "acme/_mail/0/b.txcl")
    os.symlink(tmp_path / "elsewhere", ops / "acme/_mail/1")
    inside = write(ops, "shared/a.txcl.src")
    os.symlink(inside, ops / "acme/_mail/0/c.txcl")
    tree = load_tree(ops)
    assert messages(tree.problems) == [
        f"txcl_load_error: {ops}/acme/_mail/1: a symlink that leads out of {ops}",
        f"txcl_load_error: {ops}/acme/_mail/0/b.txcl: a symlink that leads out of {ops}",
        f"txcl_load_error: {ops}/shared/a.txcl.src: expected a stack folder named "
        "[a-z_][a-z0-9_-]*",
    ]
    assert tree.files == 2  # a.txcl and the symlink that stays inside


def test_unknown_ops_are_problems_when_a_registry_is_given(tmp_path: Path) -> None:
    ops = tmp_path / "OPS"
    write(ops, "acme/_mail/0/a.txcl", 'EXEC "op://NOPE"\nEXEC "op://KNOWN"\n')
    assert "acme/_mail" in load_tree(ops).stacks
    tree = load_tree(ops, OpRegistry({"KNOWN": lambda e, a, c: {}}))
    assert messages(tree.problems) == [
        f"{ops}/acme/_mail/0/a.txcl:1:1: txcl_load_error: unknown op 'NOPE' (EXEC op://NOPE)"
    ]


def test_a_root_that_is_not_a_folder(tmp_path: Path) -> None:
    tree = load_tree(tmp_path / "missing")
    assert messages(tree.problems) == [f"txcl_load_error: {tmp_path}/missing: not a folder"]


class TestTargets:
    def test_a_single_file_is_stack_test_file_stage_0(self, tmp_path: Path) -> None:
        path = write(tmp_path, "rule.txcl")
        tree = load_target(path)
        (stack,) = tree.stacks.values()
        assert stack.name == "test/_file"
        assert [s.number for s in stack.stages] == [0]
        assert tree.files == 1

    def test_a_file_that_is_not_txcl(self, tmp_path: Path) -> None:
        tree = load_target(write(tmp_path, "rule.txt"))
        assert tree.stacks == {}
        assert len(tree.problems) == 1

    def test_a_stage_folder(self, tmp_path: Path) -> None:
        write(tmp_path, "OPS/acme/_mail/0/a.txcl")
        write(tmp_path, "OPS/acme/_mail/1/a.txcl")
        tree = load_target(tmp_path / "OPS/acme/_mail/1")
        (stack,) = tree.stacks.values()
        assert stack.name == "acme/_mail"
        assert [s.number for s in stack.stages] == [1]

    def test_a_stack_folder(self, tmp_path: Path) -> None:
        write(tmp_path, "OPS/acme/_mail/0/a.txcl")
        write(tmp_path, "OPS/acme/_mail/tests/a.yaml", "cases: []\n")
        tree = load_target(tmp_path / "OPS/acme/_mail")
        assert list(tree.stacks) == ["acme/_mail"]
        assert len(tree.case_files["acme/_mail"]) == 1

    def test_a_stack_folder_outside_a_layout_gets_the_synthetic_name(self, tmp_path: Path) -> None:
        write(tmp_path, "My Rules/0/a.txcl")
        assert list(load_target(tmp_path / "My Rules").stacks) == ["test/_file"]

    def test_an_ops_root(self, tmp_path: Path) -> None:
        write(tmp_path, "OPS/acme/_mail/0/a.txcl")
        assert list(load_target(tmp_path / "OPS").stacks) == ["acme/_mail"]


def test_many_small_files_all_load(tmp_path: Path) -> None:
    count = 300
    ops = tmp_path / "OPS"
    for i in range(count):
        write(ops, f"t{i % 3}/s/0/{i:04d}.txcl", f"WHEN @lmtp.rcpt =~ /a{i}@/\n{ACCEPT}")
    tree = load_tree(ops)
    assert tree.files == count
    assert tree.problems == ()


def test_a_load_over_previous_keeps_a_broken_stacks_last_good_version(tmp_path: Path) -> None:
    write(tmp_path, "acme/_mail/0/a.txcl")
    write(tmp_path, "beta/_mail/0/b.txcl")
    first = load_tree(tmp_path)
    broken = write(tmp_path, "acme/_mail/0/a.txcl", "SET @lmtp.res.code = 999\n")
    write(tmp_path, "gamma/_mail/0/c.txcl", "SET @lmtp.res = 250\n")
    second = load_tree(tmp_path, previous=first)
    assert second.stacks["acme/_mail"] is first.stacks["acme/_mail"]
    assert second.held == {"acme/_mail"} and "gamma/_mail" not in second.stacks
    assert second.rejected == {"acme/_mail", "gamma/_mail"}
    assert [str(p.pos) for p in second.failures["acme/_mail"]] == [f"{broken}:1:22"]
    assert second.signatures["acme/_mail"] == first.signatures["acme/_mail"]
    write(tmp_path, "acme/_mail/0/a.txcl", ACCEPT.replace("ok", "fixed"))
    third = load_tree(tmp_path, previous=second)  # the held stack's files are read again
    assert third.held == frozenset() and third.rejected == {"gamma/_mail"}
    assert third.stacks["acme/_mail"] is not first.stacks["acme/_mail"]
    assert load_tree(tmp_path).held == frozenset()  # without previous nothing is held
