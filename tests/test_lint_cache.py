"""`txcl lint` and the compile cache: a stack whose files are unchanged is not looked at again
(its cross-file checks included); what its findings depend on invalidates them."""

from __future__ import annotations

from pathlib import Path

import pytest

from txcl import lint, schema
from txcl.cli import main
from txcl.compile_cache import CompileCache, stack_key
from txcl.ops import OpRegistry

READER = "WHEN tag.seen == 1\nSET @lmtp.res.code = 250\n"
WRITER = "SET tag.seen = 1\n"


def write_tree(ops: Path, tenants: tuple[str, ...] = ("acme", "beta")) -> None:
    for tenant in tenants:
        for name, text in (("0/10-writer.txcl", WRITER), ("1/10-reader.txcl", READER)):
            path = ops / tenant / "_mail" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def lint_out(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["lint", *args])
    return code, capsys.readouterr().out


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "txcl"


class Calls:
    """Counts the calls of a lint function, and keeps what it returns, while it still does
    its work."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.count = 0
        self.results: list[object] = []
        real = getattr(lint, name)

        def counted(*args: object, **kwargs: object) -> object:
            self.count += 1
            self.results.append(real(*args, **kwargs))
            return self.results[-1]

        monkeypatch.setattr(lint, name, counted)


@pytest.mark.parametrize("form", ["text", "json", "sarif", "github"])
def test_a_warm_lint_looks_at_no_file_and_says_the_same(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], form: str,
) -> None:
    ops = tmp_path / "OPS"
    write_tree(ops)
    (ops / "beta/_mail/1/10-reader.txcl").write_text(
        'WHEN tag.sen == 1\nEXEC "op://NOPE"\nWITH timout = 1\n'
    )
    expected = lint_out(capsys, str(ops), "--format", form, "--no-cache")
    assert "NOPE" in expected[1]
    assert lint_out(capsys, str(ops), "--format", form) == expected  # fills the cache

    def not_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("an unchanged stack was looked at again")

    with monkeypatch.context() as patch:
        for name in ("_lint_parsed", "_stack_findings", "_lint_path", "_check_stack"):
            patch.setattr(lint, name, not_again)
        patch.setattr("txcl.parser.parse", not_again)
        assert lint_out(capsys, str(ops), "--format", form) == expected
    cache = CompileCache(xdg)
    salt = lint._findings_salt(OpRegistry.default())
    files = sorted(str(p) for p in (ops / "acme").rglob("*.txcl"))
    assert cache.get_findings(stack_key(((f, Path(f).read_text()) for f in files), salt)) == ()


def test_an_edit_relints_its_file_and_the_stack_checks_of_the_files_around_it(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ops = tmp_path / "OPS"
    write_tree(ops)
    assert lint_out(capsys, str(ops)) == (0, "0 error(s), 0 warning(s)\n")
    # the writer stops writing: the unchanged reader's read becomes an unwritten-path warning
    (ops / "acme/_mail/0/10-writer.txcl").write_text("SET tag.other = 1\n")
    code, out = lint_out(capsys, str(ops), "--no-cache")
    parsed = Calls(monkeypatch, "_lint_parsed")
    assert lint_out(capsys, str(ops)) == (code, out)
    assert parsed.count == 1  # the edited file; the reader's own findings come from the cache
    assert "10-reader.txcl:1:6: txcl_lint_warning: tag.seen is read, but no rule" in out
    assert "beta" not in out
    (ops / "acme/_mail/0/10-writer.txcl").write_text(WRITER)
    assert lint_out(capsys, str(ops)) == (0, "0 error(s), 0 warning(s)\n")
    assert parsed.count == 1  # that text's findings were cached before


def test_a_config_with_other_ops_gets_findings_of_its_own(
    tmp_path: Path, xdg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ops = tmp_path / "OPS"
    write_tree(ops, ("acme",))
    (ops / "acme/_mail/0/10-writer.txcl").write_text('SET tag.seen = 1\nEXEC "op://NOPE"\n')
    config = tmp_path / "txco.yaml"
    config.write_text("ops: {}\n")
    code, out = lint_out(capsys, str(ops), "--config", str(config))
    assert code == 1 and "unknown op 'NOPE'" in out
    assert lint_out(capsys, str(ops), "--config", str(config)) == (code, out)
    config.write_text('ops:\n  NOPE: {python: "json:loads"}\n')
    assert lint_out(capsys, str(ops), "--config", str(config)) == (
        0, "0 error(s), 0 warning(s)\n"
    )
    config.write_text("ops: {}\n")
    assert lint_out(capsys, str(ops), "--config", str(config)) == (code, out)


def test_another_schema_gets_findings_of_its_own(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ops = tmp_path / "OPS"
    (ops / "acme/_mail/0").mkdir(parents=True)
    (ops / "acme/_mail/0/10-a.txcl").write_text("WHEN @demo.size == 1\nSET tag.x = 1\n")
    assert lint_out(capsys, str(ops)) == (0, "0 error(s), 0 warning(s)\n")
    monkeypatch.setattr(schema, "_registered", {
        "demo": {"type": "object", "properties": {"sizes": {"type": "integer"}}},
    })
    schema.schemas_digest.cache_clear()
    schema.section_schema.cache_clear()
    try:
        code, out = lint_out(capsys, str(ops))
    finally:
        monkeypatch.undo()
        schema.schemas_digest.cache_clear()
        schema.section_schema.cache_clear()
    assert code == 1 and "did you mean @demo.sizes?" in out


def test_a_stage_or_stack_target_is_cached_apart_from_the_tree(
    tmp_path: Path, xdg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ops = tmp_path / "OPS"
    write_tree(ops, ("acme",))
    stage = ops / "acme/_mail/1"
    alone = lint_out(capsys, str(stage), "--no-cache")
    assert "tag.seen is read, but no rule" in alone[1]  # the stage alone: nothing writes it
    for _ in range(2):
        assert lint_out(capsys, str(stage)) == alone
        assert lint_out(capsys, str(ops)) == (0, "0 error(s), 0 warning(s)\n")
        assert lint_out(capsys, str(ops / "acme/_mail")) == (0, "0 error(s), 0 warning(s)\n")


# --- a pool of processes for many files --------------------------------------------------------


@pytest.fixture
def own_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """threading.active_count() counts this test's threads only: idle op threads that
    earlier tests in the same run left are not what the pool's rule is about."""
    import threading

    before = set(threading.enumerate()) - {threading.main_thread()}
    monkeypatch.setattr("threading.active_count",
                        lambda: len(set(threading.enumerate()) - before))



def test_a_pool_is_used_only_for_many_files_on_several_cores(
    monkeypatch: pytest.MonkeyPatch, own_threads: None,
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert lint.pool_workers(lint.POOL_MIN_FILES - 1) == 0
    assert lint.pool_workers(lint.POOL_MIN_FILES) == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert lint.pool_workers(100_000) == 0


def test_no_pool_while_another_thread_runs(
    monkeypatch: pytest.MonkeyPatch, own_threads: None,
) -> None:
    import threading

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    assert lint.pool_workers(100_000) == 3
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert lint.pool_workers(100_000) == 0
    finally:
        stop.set()
        other.join()


def twelve_tenants(ops: Path) -> None:
    """write_tree's stacks for 12 tenants, t07's with a bad regex and an unknown op."""
    write_tree(ops, tuple(f"t{i:02d}" for i in range(12)))
    (ops / "t07/_mail/1/10-reader.txcl").write_text('WHEN tag.sen =~ /(/\nEXEC "op://NOPE"\n')


def two_workers_from(monkeypatch: pytest.MonkeyPatch, files: int) -> None:
    """Lint's pool starts for `files` files to parse, with 2 workers."""
    monkeypatch.setattr(lint, "POOL_MIN_FILES", files)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})


def test_files_checked_by_a_pool_give_what_one_process_gives(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], own_threads: None,
) -> None:
    ops = tmp_path / "OPS"
    twelve_tenants(ops)
    (ops / "t03/_mail/1/10-reader.txcl").write_text("WHEN tag.seen ==\nSET @lmtp.res.code = 99\n")
    (ops / "t09/_mail/0/20-empty.txcl").write_text("# nothing\n")
    expected = {form: lint_out(capsys, str(ops), "--format", form, "--no-cache")
                for form in ("text", "json")}
    two_workers_from(monkeypatch, 2)
    assert lint.pool_workers(25) == 2
    pools = Calls(monkeypatch, "pool_workers")
    assert lint_out(capsys, str(ops), "--format", "text") == expected["text"]  # the pool
    assert lint_out(capsys, str(ops), "--format", "json") == expected["json"]  # the cache
    assert lint_out(capsys, str(ops / "t07/_mail"), "--no-cache") == lint_out(
        capsys, str(ops / "t07/_mail")
    )
    # asked once POOL_MIN_FILES wait: the tree's files; none when cached; --no-cache: t07's 2
    assert pools.results == [2, 2]
    assert "syntax" in expected["text"][1] and "unknown-op" in expected["text"][1]
    cache = CompileCache(xdg)
    for path in sorted(ops.rglob("*.txcl")):
        entry = cache.get(str(path), path.read_text())
        assert entry is not None and entry.findings is not None


def test_a_pool_for_a_few_changed_stacks_gives_each_to_a_worker(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], own_threads: None,
) -> None:
    """The pool's tasks are sized by the stacks it is given, not by the tree's: with the stat
    index keeping 70 stacks, the two that changed are two tasks, not one for one worker."""
    import multiprocessing.pool

    ops = tmp_path / "OPS"
    write_tree(ops, tuple(f"t{i:02d}" for i in range(72)))
    assert lint_out(capsys, str(ops))[0] == 0
    for tenant in ("t10", "t60"):
        (ops / tenant / "_mail/0/10-writer.txcl").write_text("SET tag.seen = 2\n")
    two_workers_from(monkeypatch, 2)
    tasks: list[int] = []
    real = multiprocessing.pool.Pool.apply_async

    def counted(pool: multiprocessing.pool.Pool, func: object, args: tuple[list[object]]) -> object:
        tasks.append(len(args[0]))
        return real(pool, func, args)  # type: ignore[arg-type]

    monkeypatch.setattr(multiprocessing.pool.Pool, "apply_async", counted)
    assert lint_out(capsys, str(ops))[0] == 0
    assert tasks == [1, 1]


def test_lint_keeps_no_tree_and_a_load_after_it_parses_the_file_again(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from txcl.loader import load_tree
    from txcl.parser import parse
    from txcl.runner import TEST_POLICY

    ops = tmp_path / "OPS"
    write_tree(ops)
    assert lint_out(capsys, str(ops))[0] == 0
    reader = ops / "acme/_mail/1/10-reader.txcl"
    entry = CompileCache(xdg).get(str(reader), READER)
    assert entry is not None and not entry.tree_kept and entry.findings is not None
    assert entry.file == parse(READER, str(reader))  # parsed again from the text
    cache = CompileCache(xdg)
    cached, fresh = load_tree(ops, cache=cache), load_tree(ops)
    assert cached.problems == fresh.problems == ()
    cache.flush()  # the trees parsed again are kept now, with lint's findings
    again = CompileCache(xdg).get(str(reader), READER)
    assert again is not None and again.tree_kept and again.findings == entry.findings

    def not_again(*args: object) -> None:
        raise AssertionError("a kept tree was parsed again")

    with monkeypatch.context() as patch:
        patch.setattr("txcl.parser.parse", not_again)
        third = load_tree(ops, cache=CompileCache(xdg))
    assert third.problems == () and sorted(third.stacks) == sorted(fresh.stacks)
    envelope = {"_txc": {"src": "lmtp", "route": {"to": "acme/_mail/0"}}}
    runs = [t.stacks["acme/_mail"].run(envelope, TEST_POLICY).envelope for t in (cached, fresh)]
    assert runs[0] == runs[1] and runs[0]["_txc"]["lmtp"]["res"]["code"] == 250


def test_a_pool_worker_that_dies_leaves_its_stacks_to_this_process(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], own_threads: None,
) -> None:
    import os
    import signal

    ops = tmp_path / "OPS"
    twelve_tenants(ops)
    expected = lint_out(capsys, str(ops), "--no-cache")
    two_workers_from(monkeypatch, 2)
    check_stack, lint_process = lint._check_stack, os.getpid()
    killed: list[str] = []

    def killed_at_t05(files: list[lint._FileJob], *args: object) -> object:
        if os.getpid() != lint_process and any("/t05/" in path for path, *_ in files):
            os.kill(os.getpid(), signal.SIGKILL)  # a pool worker, as the OOM killer would
        if any("/t05/" in path for path, *_ in files):
            killed.append(files[0][0])  # t05 was checked here, after its worker died
        return check_stack(files, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(lint, "_check_stack", killed_at_t05)  # forked workers inherit it

    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("lint still waiting for a dead worker")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        assert lint_out(capsys, str(ops), "--no-cache") == expected
        assert lint_out(capsys, str(ops)) == expected  # cold cache: the pool again
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert len(killed) == 2  # once a run: the worker's t05 was checked again here
    assert lint_out(capsys, str(ops)) == expected  # warm: what the process checked was kept
