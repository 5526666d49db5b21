"""compile_cache.py: files checked before are not parsed again; a stale, corrupt or
unwritable cache is ignored with a log line, never trusted."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from txcl import compile_cache, lint
from txcl.cli import main
from txcl.compile_cache import SHARD_SUFFIX, CachedFile, CompileCache
from txcl.loader import load_target, load_tree
from txcl.runner import TEST_POLICY

ACCEPT = 'SET @lmtp.res.code = 250\nSET @lmtp.res.msg = "ok"\n'
BROKEN = "WHEN @lmtp.msg.subject =~ /(/\nSET x = 1\n"


def write_tree(ops: Path) -> None:
    for tenant in ("acme", "beta"):
        for name, text in (("0/10-a.txcl", "SET seen.a = 1\n"), ("1/10-accept.txcl", ACCEPT)):
            path = ops / tenant / "_mail" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def filled_cache(tmp_path: Path) -> tuple[Path, Path]:
    """A tree under tmp_path/OPS, loaded once through a cache in tmp_path/cache."""
    ops, folder = tmp_path / "OPS", tmp_path / "cache"
    write_tree(ops)
    cache = CompileCache(folder)
    load_tree(ops, cache=cache)
    cache.flush()
    return ops, folder


def run(tree: object, name: str) -> object:
    stack = tree.stacks[name]  # type: ignore[attr-defined]
    envelope = {"_txc": {"src": "lmtp", "route": {"to": f"{name}/0"}}}
    return stack.run(envelope, TEST_POLICY).envelope


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{SHARD_SUFFIX}"))


def test_a_second_load_parses_nothing_and_builds_the_same_stacks(tmp_path: Path) -> None:
    ops, folder = tmp_path / "OPS", tmp_path / "cache"
    write_tree(ops)
    first_cache = CompileCache(folder)
    cold = load_tree(ops, cache=first_cache)
    first_cache.flush()
    assert (cold.parsed, cold.compiled, first_cache.written) == (4, 4, 4)
    warm_cache = CompileCache(folder)
    warm = load_tree(ops, cache=warm_cache)
    assert (warm.parsed, warm.compiled, warm_cache.hits, warm_cache.misses) == (0, 4, 4, 0)
    assert sorted(warm.stacks) == sorted(cold.stacks)
    assert run(warm, "acme/_mail") == run(cold, "acme/_mail")


def test_problems_come_from_the_cache_with_their_positions(tmp_path: Path) -> None:
    ops, folder = tmp_path / "OPS", tmp_path / "cache"
    write_tree(ops)
    (ops / "beta/_mail/0/10-a.txcl").write_text(BROKEN)
    cache = CompileCache(folder)
    cold = load_tree(ops, cache=cache)
    cache.flush()
    warm = load_tree(ops, cache=CompileCache(folder))
    assert warm.parsed == 0
    assert [str(p) for p in warm.problems] == [str(p) for p in cold.problems]
    assert warm.rejected == {"beta/_mail"} and sorted(warm.stacks) == ["acme/_mail"]


def test_an_edited_or_renamed_file_is_parsed_again(tmp_path: Path) -> None:
    ops, folder = filled_cache(tmp_path)
    (ops / "acme/_mail/0/10-a.txcl").write_text("SET seen.a = 2\n")
    (ops / "beta/_mail/0/10-a.txcl").rename(ops / "beta/_mail/0/20-a.txcl")
    cache = CompileCache(folder)
    tree = load_tree(ops, cache=cache)
    assert (tree.parsed, cache.hits) == (2, 2)
    assert run(tree, "acme/_mail")["seen"] == {"a": 2}  # type: ignore[index]


def test_entries_of_another_engine_are_ignored_with_a_log_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ops, folder = filled_cache(tmp_path)
    monkeypatch.setattr(compile_cache, "engine_key", lambda: b"another grammar".ljust(32, b"."))
    with caplog.at_level(logging.WARNING, "txcl.cache"):
        tree = load_tree(ops, cache=CompileCache(folder))
    assert tree.parsed == 4
    assert "of another engine version" in caplog.text


@pytest.mark.parametrize("damage", ["garbage", "flipped byte", "truncated"])
def test_a_corrupt_shard_is_ignored_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    ops, folder = filled_cache(tmp_path)
    for shard in shards(folder):
        data = shard.read_bytes()
        if damage == "garbage":
            data = b"not a cache"
        elif damage == "flipped byte":
            data = data[:-5] + bytes([data[-5] ^ 1]) + data[-4:]
        else:
            data = data[: len(data) // 2]
        shard.write_bytes(data)
    with caplog.at_level(logging.WARNING, "txcl.cache"):
        cache = CompileCache(folder)
        tree = load_tree(ops, cache=cache)
        cache.flush()
    assert tree.parsed == 4 and sorted(tree.stacks) == ["acme/_mail", "beta/_mail"]
    assert "is corrupt" in caplog.text
    assert load_tree(ops, cache=CompileCache(folder)).parsed == 0  # replaced by sound ones


def test_a_sound_shard_holding_something_else_is_not_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ops, folder = tmp_path / "OPS", tmp_path / "cache"
    write_tree(ops)
    cache = CompileCache(folder)
    load_tree(ops, cache=cache)
    for shard in cache._shards.values():
        for key in shard:
            shard[key] = b"\x80\x05N."  # pickled None: a well-formed entry of the wrong kind
    cache._dirty = set(cache._shards)
    cache.flush()
    with caplog.at_level(logging.WARNING, "txcl.cache"):
        assert load_tree(ops, cache=CompileCache(folder)).parsed == 4
    assert "holds a NoneType" in caplog.text


def test_an_unwritable_cache_is_ignored_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ops = tmp_path / "OPS"
    write_tree(ops)
    (tmp_path / "file").write_text("not a folder")
    with caplog.at_level(logging.WARNING, "txcl.cache"):
        cache = CompileCache(tmp_path / "file" / "cache")
        tree = load_tree(ops, cache=cache)
        cache.flush()
    assert tree.parsed == 4 and sorted(tree.stacks) == ["acme/_mail", "beta/_mail"]
    assert "not used" in caplog.text

    folder = tmp_path / "cache"
    cache = CompileCache(folder)
    load_tree(ops, cache=cache)
    for shard in cache._dirty:  # a folder where a shard should go: the rename fails
        (folder / f"{shard:02x}{SHARD_SUFFIX}").mkdir()
    with caplog.at_level(logging.WARNING, "txcl.cache"):
        cache.flush()
    assert "cannot be written" in caplog.text
    assert not list(folder.glob("*.tmp"))


def test_a_folder_others_could_write_to_is_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    folder.chmod(0o777)
    with caplog.at_level(logging.WARNING, "txcl.cache"):
        cache = CompileCache(folder)
        cache.put("a.txcl", "SET a = 1\n", CachedFile(None, ()))
        cache.flush()
    assert "others could write to it" in caplog.text
    assert shards(folder) == []


def test_shards_are_private_and_written_whole(tmp_path: Path) -> None:
    ops, folder = filled_cache(tmp_path)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert shards(folder)
    assert {stat.S_IMODE(os.stat(s).st_mode) for s in shards(folder)} == {0o600}
    assert [p.name for p in folder.iterdir() if not p.name.endswith(SHARD_SUFFIX)] == []


def test_a_cached_syntax_tree_is_decoded_only_when_used(tmp_path: Path) -> None:
    ops, folder = filled_cache(tmp_path)
    checked = load_target(ops, keep_files=True, cache=CompileCache(folder), check_only=True)
    assert checked.stacks == {} and checked.parsed == 0
    read = checked.read[str(ops / "acme/_mail/1/10-accept.txcl")]
    assert read.checked._file is None  # still encoded
    assert read.file is not None and len(read.file.rules) == 1


def test_txcl_lint_keeps_its_findings_and_no_cache_leaves_it_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ops = tmp_path / "OPS"
    write_tree(ops)
    (ops / "beta/_mail/0/10-a.txcl").write_text('EXEC "op://NOPE"\n')
    assert main(["lint", str(ops), "--no-cache"]) == 1
    uncached = capsys.readouterr().out
    assert not (tmp_path / "xdg").exists()
    assert main(["lint", str(ops)]) == 1
    assert capsys.readouterr().out == uncached
    folder = tmp_path / "xdg" / "txcl"
    cache = CompileCache(folder)
    for path in sorted(ops.rglob("*.txcl")):
        entry = cache.get(str(path), path.read_text())
        assert entry is not None and entry.findings is not None

    def not_again(*args: object) -> None:
        raise AssertionError("a file with cached findings was looked at again")

    with monkeypatch.context() as patch:
        patch.setattr(lint, "_lint_parsed", not_again)
        patch.setattr("txcl.parser.parse", not_again)
        assert main(["lint", str(ops)]) == 1
    assert capsys.readouterr().out == uncached
    assert "unknown-op" in uncached
    # findings depend on the ops known: a config that has NOPE gets findings of its own
    config = tmp_path / "txco.yaml"
    config.write_text('ops:\n  NOPE: {python: "json:loads"}\n')
    assert main(["lint", str(ops), "--config", str(config)]) == 0


def test_the_encoding_reduces_what_is_not_an_engine_dataclass_as_pickle_does() -> None:
    import datetime
    import fractions
    import http
    import pickle
    import re

    value = (
        compile_cache.CachedFindings(()),  # its own __reduce__
        re.compile("a+"),  # copyreg's
        fractions.Fraction(1, 3),
        datetime.date(2026, 12, 2),
        http.HTTPStatus.OK,  # an enum member
        int,  # a class: by name
        [{"k": frozenset({1})}],
    )
    expected = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    for _ in range(2):  # the second time, each class's reducer is known
        assert compile_cache._dumps(value) == expected
