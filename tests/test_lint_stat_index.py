"""`txcl lint` and the compile cache's stat index: a stack whose folder's signature (what
stat() says of its entries) is unchanged gets its findings without a file read; an edit, a
write in the same clock tick as the stat (git's racy-clean rule), another engine or a
corrupt index makes lint read the files again, and it says what a cold lint says."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_lint_cache import (
    WRITER,
    lint_out,
    own_threads,
    twelve_tenants,
    two_workers_from,
    write_tree,
)
from txcl import compile_cache, lint
from txcl.compile_cache import INDEX_SUFFIX, CompileCache
from txcl.loader import RACY_MARGIN_NS, StackSignature, stack_signature

HOUR_NS = 3600 * 10**9


def date_back(ops: Path) -> None:
    """Every entry of the tree written an hour ago: nothing in it is racy any more."""
    then = time.time_ns() - HOUR_NS
    for path in ops.rglob("*"):
        os.utime(path, ns=(then, then))


class Reads:
    """Counts the rule files the loader reads, while it still reads them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import txcl.loader

        self.paths: list[str] = []
        real = txcl.loader.read_rule_source

        def counted(path: str) -> str:
            self.paths.append(path)
            return real(path)

        monkeypatch.setattr(txcl.loader, "read_rule_source", counted)


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "txcl"


def findings_tree(ops: Path) -> None:
    """A tree with findings of every origin: the walk, a stack's layout, a file's syntax and
    lint checks, a stack-wide check."""
    write_tree(ops, ("acme", "beta", "gamma"))
    (ops / "beta/_mail/1/10-reader.txcl").write_text(
        'WHEN tag.sen == 1\nEXEC "op://NOPE"\nWITH timout = 1\n'
    )
    (ops / "acme/_mail/0/10-writer.txcl").write_text("SET tag.other = 1\n")
    (ops / "gamma/_mail/0/20-broken.txcl").write_text("WHEN tag.seen ==\nSET x = 1\n")
    (ops / "gamma/_mail/notes.md").write_text("a stray file\n")
    (ops / "Bad-Tenant").mkdir()


@pytest.mark.parametrize("form", ["text", "json"])
def test_an_unchanged_tree_is_linted_without_reading_a_file_and_says_the_same(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], form: str,
) -> None:
    ops = tmp_path / "OPS"
    findings_tree(ops)
    date_back(ops)
    cold = lint_out(capsys, str(ops), "--format", form, "--no-cache")
    for check in ("layout", "syntax", "unknown-op", "unwritten-path", "unknown-with-key"):
        assert check in cold[1]
    assert lint_out(capsys, str(ops), "--format", form) == cold  # fills the cache and index
    assert list(xdg.glob(f"*{INDEX_SUFFIX}"))
    index_before = {p: p.stat().st_mtime_ns for p in xdg.glob(f"*{INDEX_SUFFIX}")}
    reads = Reads(monkeypatch)
    assert lint_out(capsys, str(ops), "--format", form) == cold
    assert reads.paths == []
    # nothing new was found: the index is not written again
    assert {p: p.stat().st_mtime_ns for p in xdg.glob(f"*{INDEX_SUFFIX}")} == index_before


def test_an_edit_of_the_same_size_with_its_mtime_put_back_is_seen(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ops = tmp_path / "OPS"
    write_tree(ops)
    date_back(ops)
    assert lint_out(capsys, str(ops)) == (0, "0 error(s), 0 warning(s)\n")
    writer = ops / "acme/_mail/0/10-writer.txcl"
    before = writer.stat()
    writer.write_text(WRITER.replace("seen", "sean"))  # same size
    os.utime(writer, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert writer.stat().st_size == before.st_size
    assert writer.stat().st_mtime_ns == before.st_mtime_ns
    reads = Reads(monkeypatch)
    code, out = lint_out(capsys, str(ops))
    assert sorted(reads.paths) == sorted(str(p) for p in (ops / "acme").rglob("*.txcl"))
    assert (code, out) == lint_out(capsys, str(ops), "--no-cache")
    assert "tag.seen is read, but no rule" in out and "beta" not in out


def test_a_write_in_the_tick_of_the_stat_is_not_trusted(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On a file system whose stat shows nothing else of a rewrite (the same inode, no ctime),
    a file rewritten with the same size in the clock tick of the stat that indexed it looks
    unchanged: only the racy-clean rule keeps the index from answering for it."""
    import txcl.loader

    real = txcl.loader.stack_signature

    def coarse(folder: str, scan: object = None, into: object = None) -> object:
        return tuple((name, 0, size, mtime, 0)
                     for name, _, size, mtime, _ in real(folder, into=into))  # type: ignore[arg-type]

    monkeypatch.setattr(txcl.loader, "stack_signature", coarse)
    ops = tmp_path / "OPS"
    write_tree(ops)
    writer = ops / "acme/_mail/0/10-writer.txcl"
    assert lint_out(capsys, str(ops)) == (0, "0 error(s), 0 warning(s)\n")  # just written
    signature = coarse(str(ops / "acme/_mail"))
    before = writer.stat()
    writer.write_text(WRITER.replace("seen", "sean"))
    os.utime(writer, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert coarse(str(ops / "acme/_mail")) == signature  # stat sees no change
    code, out = lint_out(capsys, str(ops))
    assert code == 0 and "tag.seen is read, but no rule" in out


@pytest.mark.parametrize("when", ["racy", "old"])
def test_an_index_entry_is_kept_only_if_its_mtimes_are_older_than_the_margin(
    tmp_path: Path, when: str
) -> None:
    now = time.time_ns()
    age = RACY_MARGIN_NS // 2 if when == "racy" else RACY_MARGIN_NS + 1
    signature = (("0", 1, 0, now - 3 * RACY_MARGIN_NS, now), ("0/a.txcl", 2, 10, now - age, now))
    cache = CompileCache(tmp_path)
    index = cache.stat_index("scope", "salt")
    index.put("acme/_mail", signature, ("found",), now)
    cache.flush()
    again = CompileCache(tmp_path)
    kept = again.stat_index("scope", "salt").get("acme/_mail", signature)
    assert kept == (None if when == "racy" else ("found",))
    assert again.stat_index("scope", "other salt").get("acme/_mail", signature) is None
    assert again.stat_index("other scope", "salt").get("acme/_mail", signature) is None
    changed = (signature[0], ("0/a.txcl", 2, 11, now - age, now))
    assert again.stat_index("scope", "salt").get("acme/_mail", changed) is None


def test_a_stack_signature_sees_a_new_file_and_a_rename(tmp_path: Path) -> None:
    ops = tmp_path / "OPS"
    write_tree(ops)
    stack = str(ops / "acme/_mail")
    first = stack_signature(stack)
    (ops / "acme/_mail/0/10-writer.txcl").rename(ops / "acme/_mail/0/20-writer.txcl")
    second = stack_signature(stack)
    (ops / "acme/_mail/1/20-more.txcl").write_text(WRITER)
    assert len({first, second, stack_signature(stack)}) == 3


def indexed_findings_tree(ops: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`findings_tree(ops)`, dated back and linted once, so the index holds it: what a lint
    without a cache says of it."""
    findings_tree(ops)
    date_back(ops)
    cold = lint_out(capsys, str(ops), "--no-cache")
    assert lint_out(capsys, str(ops)) == cold
    return cold


def test_an_index_of_another_engine_is_ignored_with_a_log_line(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    ops = tmp_path / "OPS"
    cold = indexed_findings_tree(ops, capsys)
    monkeypatch.setattr(compile_cache, "engine_key", lambda: b"another engine".ljust(32, b"."))
    reads = Reads(monkeypatch)
    with caplog.at_level(logging.WARNING, "txcl.cache"):
        assert lint_out(capsys, str(ops)) == cold
    assert "of another engine version" in caplog.text
    assert len(reads.paths) == len(list(ops.rglob("*.txcl")))
    reads.paths.clear()
    assert lint_out(capsys, str(ops)) == cold  # the index of this engine, written just now
    assert reads.paths == []


@pytest.mark.parametrize("damage", ["garbage", "flipped byte", "truncated", "not a folder"])
def test_a_corrupt_index_is_ignored_with_a_log_line_and_replaced(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, damage: str,
) -> None:
    ops = tmp_path / "OPS"
    cold = indexed_findings_tree(ops, capsys)
    (index,) = xdg.glob(f"*{INDEX_SUFFIX}")
    data = index.read_bytes()
    if damage == "garbage":
        data = b"not an index"
    elif damage == "flipped byte":
        data = data[:-5] + bytes([data[-5] ^ 1]) + data[-4:]
    elif damage == "truncated":
        data = data[: len(data) // 2]
    index.write_bytes(data)
    if damage == "not a folder":  # unreadable as a file, and cannot be replaced
        index.unlink()
        index.mkdir()
    reads = Reads(monkeypatch)
    with caplog.at_level(logging.WARNING, "txcl.cache"):
        assert lint_out(capsys, str(ops)) == cold
    assert len(reads.paths) == len(list(ops.rglob("*.txcl")))
    expected = "cannot be written" if damage == "not a folder" else "is corrupt"
    assert expected in caplog.text
    reads.paths.clear()
    assert lint_out(capsys, str(ops)) == cold
    assert (reads.paths == []) is (damage != "not a folder")


def test_a_removed_stack_leaves_the_index(
    tmp_path: Path, xdg: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    ops = tmp_path / "OPS"
    write_tree(ops)
    date_back(ops)
    assert lint_out(capsys, str(ops))[0] == 0
    for path in sorted((ops / "beta").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (ops / "beta").rmdir()
    assert lint_out(capsys, str(ops))[0] == 0
    (index,) = xdg.glob(f"*{INDEX_SUFFIX}")
    stored = CompileCache(xdg)._read_sealed(str(index))
    assert stored is not None and sorted(stored["entries"]) == ["acme/_mail"]


def test_an_unchanged_config_is_not_parsed_again_and_an_edit_is_seen(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from txcl import inputs

    ops, config = tmp_path / "OPS", tmp_path / "txco.yaml"
    write_tree(ops, ("acme",))
    (ops / "acme/_mail/0/10-writer.txcl").write_text('SET tag.seen = 1\nEXEC "op://NOPE"\n')
    config.write_text('ops:\n  NOPE: {python: "json:loads"}\n')
    date_back(tmp_path)
    clean = (0, "0 error(s), 0 warning(s)\n")
    assert lint_out(capsys, str(ops), "--config", str(config)) == clean
    parses: list[object] = []
    real = inputs.load_yaml
    monkeypatch.setattr(inputs, "load_yaml", lambda *a: parses.append(a) or real(*a))
    assert lint_out(capsys, str(ops), "--config", str(config)) == clean
    assert parses == []
    before = config.stat()
    config.write_text('ops:\n  NOPX: {python: "json:loads"}\n')  # same size, mtime put back
    os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))
    code, out = lint_out(capsys, str(ops), "--config", str(config))
    assert code == 1 and "unknown op 'NOPE'" in out
    assert len(parses) == 1


_ENTRY = st.tuples(st.text(min_size=1, max_size=12), *[st.integers(0, 2**40)] * 4)


@settings(max_examples=60, deadline=None)
@given(signature=st.lists(_ENTRY, min_size=1, max_size=8).map(tuple), data=st.data())
def test_an_index_answers_only_for_the_signature_it_was_given(
    tmp_path_factory: pytest.TempPathFactory, signature: StackSignature, data: st.DataObject,
) -> None:
    taken_ns = max(entry[3] for entry in signature) + RACY_MARGIN_NS + 1
    folder = tmp_path_factory.mktemp("index")
    cache = CompileCache(folder)
    cache.stat_index("scope", "salt").put("stack", signature, ("found",), taken_ns)
    cache.flush()
    index = CompileCache(folder).stat_index("scope", "salt")
    assert index.get("stack", signature) == ("found",)
    where = data.draw(st.integers(0, len(signature) - 1))
    field = data.draw(st.integers(0, 4))
    entry = list(signature[where])
    entry[field] = entry[field] + "x" if field == 0 else entry[field] + 1
    changed = (*signature[:where], tuple(entry), *signature[where + 1:])
    assert index.get("stack", changed) is None
    assert index.get("stack", signature[:-1]) is None


@pytest.mark.usefixtures(own_threads.__name__)
def test_the_pool_starts_while_the_walk_goes_on_and_fills_the_cache_a_warm_lint_uses(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import multiprocessing.pool

    from txcl.loader import LazyStacks

    ops = tmp_path / "OPS"
    twelve_tenants(ops)
    date_back(ops)  # not racy: the stat index keeps each stack
    expected = lint_out(capsys, str(ops), "--no-cache")
    two_workers_from(monkeypatch, 4)
    events: list[str] = []
    real_load, real_pool = LazyStacks.load, multiprocessing.pool.Pool.__init__

    def load(self: LazyStacks, name: str) -> object:
        events.append("load")
        return real_load(self, name)

    def pool(self: multiprocessing.pool.Pool, *args: object, **kwargs: object) -> None:
        events.append("pool")
        real_pool(self, *args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(LazyStacks, "load", load)
        patch.setattr(multiprocessing.pool.Pool, "__init__", pool)
        assert lint_out(capsys, str(ops)) == expected  # cold: the pool, filling the cache
    # 2 files a stack: the pool starts once 2 stacks wait, 10 are loaded after it started
    assert events == ["load", "load", "pool", *["load"] * 10]

    def not_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("a stack was looked at again")

    monkeypatch.setattr(lint, "_check_stack", not_again)
    reads = Reads(monkeypatch)
    assert lint_out(capsys, str(ops)) == expected  # warm: the stat index, no file read
    assert reads.paths == []
    for path in xdg.glob(f"*{INDEX_SUFFIX}"):
        path.unlink()
    assert lint_out(capsys, str(ops)) == expected  # warm: the shards the pool's entries went to
    assert len(reads.paths) == 24
    assert "[unknown-op]" in expected[1] and "[compile]" in expected[1]
