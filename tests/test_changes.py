"""txcl.chassis.changes with the reload holder: a reload reads only the stacks under changed
paths; what the feed cannot know (overflow, a broken feed) falls back to walking everything."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import inotify_simple
import pytest

import txcl.loader
from lmtp.config import Settings
from lmtp.personality import LmtpPersonality
from txcl.chassis.changes import ChangeFeed
from txcl.chassis.reload import RuntimeHolder
from txcl.loader import load_tree

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from scale_tree import generate  # noqa: E402

from tests.conftest import Server  # noqa: E402
from tests.test_reload import count_polls  # noqa: E402
from tests.test_serve_cli import CONFIG, deliver  # noqa: E402

EDITED = 'SET @lmtp.res.code = 250\nSET @lmtp.res.msg = "edited"\n'


def backdate(root: Path, seconds: float = 60) -> None:
    when = time.time() - seconds
    for path in [root, *root.rglob("*")]:
        os.utime(path, (when, when), follow_symlinks=False)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    ops, config, _ = generate(tmp_path / "tree", 5 * 4)  # five tenants, one stack each
    backdate(ops)
    return Settings(ops_dir=ops, config_file=config, state_dir=tmp_path / "var",
                    lmtp_hostname="test")


def watching(holder: RuntimeHolder) -> RuntimeHolder:
    """`holder` once its feed watches every folder and is trusted, as the watcher does after
    its first comparison (nothing changed since the start here)."""
    assert holder.feed is not None
    holder.feed.start()
    holder.feed.ready.wait()
    assert holder.feed.healthy
    holder.feed.trust()
    return holder


@pytest.fixture
def holder(settings: Settings) -> Iterator[RuntimeHolder]:
    held = watching(RuntimeHolder.start(settings, [LmtpPersonality(settings)], feed=True))
    yield held
    held.close()


@pytest.fixture
def signatures(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The stack folders whose signature a load computes, in order."""
    computed: list[str] = []
    real = txcl.loader.stack_signature

    def counted(folder: str, scan: Any = None) -> Any:
        computed.append(os.path.relpath(folder, folder.rsplit("/", 2)[0]))
        return real(folder, scan)

    monkeypatch.setattr(txcl.loader, "stack_signature", counted)
    return computed


def put(path: Path, text: str) -> None:
    """Replace a file at once (one event: a write's events could straddle a take)."""
    aside = path.parents[4] / ".aside"  # beside OPS/
    aside.write_text(text)
    os.replace(aside, path)


@pytest.fixture
def listed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The folders a load lists (the root, tenants, stacks, stages), relative to OPS/."""
    found: list[str] = []
    real = txcl.loader._Walker.entries

    def counted(walker: Any, folder: str, problems: Any) -> Any:
        found.append(os.path.relpath(folder, walker.root))
        return real(walker, folder, problems)

    monkeypatch.setattr(txcl.loader._Walker, "entries", counted)
    return found


def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def reload_seen(holder: RuntimeHolder) -> None:
    """Reload once the feed has the change just made."""
    assert holder.feed is not None
    until(holder.feed.pending)
    outcome = asyncio.run(holder.reload("test"))
    assert outcome.version == holder.current.version


def as_a_full_load_sees_it(holder: RuntimeHolder) -> None:
    fresh = load_tree(holder.current.settings.ops_dir)
    served = holder.current.tree
    assert sorted(served.stacks) == sorted(fresh.stacks)
    for name, stack in fresh.stacks.items():
        assert shape(served.stacks[name].rules) == shape(stack.rules)


def shape(rules: Any) -> list[Any]:
    return [(r.file, r.pos, r.reads, r.writes) for r in rules]


def stack_folder(settings: Settings, tenant: str) -> Path:
    return Path(settings.ops_dir) / tenant / "_mail"


def tenants(settings: Settings) -> list[str]:
    return sorted(p.name for p in Path(settings.ops_dir).iterdir())


def test_an_edit_reads_that_stack_only(holder: RuntimeHolder, settings: Settings,
                                       signatures: list[str], listed: list[str]) -> None:
    first, *others = tenants(settings)
    before = holder.current.tree
    put(stack_folder(settings, first) / "1" / "20-verdict.txcl", EDITED)
    reload_seen(holder)
    assert signatures == [f"{first}/_mail"]
    assert [f for f in listed if "/" not in f] == [".", first]  # the other tenants: unlisted
    after = holder.current.tree
    assert after.stacks[f"{first}/_mail"] is not before.stacks[f"{first}/_mail"]
    assert all(after.stacks[f"{t}/_mail"] is before.stacks[f"{t}/_mail"] for t in others)
    assert after.signatures[f"{others[0]}/_mail"] == before.signatures[f"{others[0]}/_mail"]
    assert (after.compiled, after.parsed) == (4, 1)  # its files; the edited one parsed
    as_a_full_load_sees_it(holder)
    # nothing changed since: a reload reads no signature at all
    signatures.clear()
    asyncio.run(holder.reload("test"))
    assert signatures == []


def test_a_new_tenant_a_deleted_stack_a_rename_and_a_new_stage_are_seen(
        holder: RuntimeHolder, settings: Settings, signatures: list[str]) -> None:
    ops = Path(settings.ops_dir)
    first, second, third, *_ = tenants(settings)
    shutil.copytree(stack_folder(settings, first), ops / "newcomer" / "_mail")
    reload_seen(holder)
    assert "newcomer/_mail" in holder.current.tree.stacks
    assert signatures == ["newcomer/_mail"]
    as_a_full_load_sees_it(holder)

    shutil.rmtree(stack_folder(settings, second))
    reload_seen(holder)
    assert f"{second}/_mail" not in holder.current.tree.stacks
    as_a_full_load_sees_it(holder)

    (ops / third).rename(ops / "renamed")
    reload_seen(holder)
    assert "renamed/_mail" in holder.current.tree.stacks
    assert f"{third}/_mail" not in holder.current.tree.stacks
    as_a_full_load_sees_it(holder)
    # the renamed folder is watched under its new name
    signatures.clear()
    put(ops / "renamed" / "_mail" / "0" / "10-classify.txcl", EDITED)
    reload_seen(holder)
    assert signatures == ["renamed/_mail"]
    as_a_full_load_sees_it(holder)

    stage = stack_folder(settings, first) / "7"
    stage.mkdir()
    put(stage / "10-late.txcl", EDITED)
    reload_seen(holder)
    assert [s.number for s in holder.current.tree.stacks[f"{first}/_mail"].stages][-1] == 7
    as_a_full_load_sees_it(holder)


def test_a_stack_with_a_symlink_inside_is_always_read_again(
        holder: RuntimeHolder, settings: Settings, signatures: list[str]) -> None:
    first, second, *_ = tenants(settings)
    (stack_folder(settings, first) / "5").symlink_to(stack_folder(settings, first) / "1")
    reload_seen(holder)
    assert f"{first}/_mail" in holder.current.tree.stacks
    signatures.clear()
    put(stack_folder(settings, second) / "0" / "10-classify.txcl", EDITED)
    reload_seen(holder)
    assert sorted(signatures) == sorted([f"{first}/_mail", f"{second}/_mail"])
    as_a_full_load_sees_it(holder)


def test_an_overflow_walks_everything_and_stays_correct(
        holder: RuntimeHolder, settings: Settings, signatures: list[str]) -> None:
    assert holder.feed is not None
    first, *_ = tenants(settings)
    put(stack_folder(settings, first) / "0" / "10-classify.txcl", EDITED)
    until(holder.feed.pending)
    holder.feed.handle([inotify_simple.Event(-1, inotify_simple.flags.Q_OVERFLOW, 0, "")])
    asyncio.run(holder.reload("test"))
    assert len(signatures) == len(tenants(settings))  # every stack compared
    as_a_full_load_sees_it(holder)
    signatures.clear()  # and the feed goes on after it
    put(stack_folder(settings, first) / "0" / "10-classify.txcl", EDITED + "\n")
    reload_seen(holder)
    assert signatures == [f"{first}/_mail"]


def test_a_feed_that_cannot_watch_falls_back_to_polling(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, signatures: list[str]) -> None:
    def no_room(*_: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(inotify_simple.INotify, "add_watch", no_room)
    holder = RuntimeHolder.start(settings, [LmtpPersonality(settings)], feed=True)
    assert holder.feed is not None
    holder.feed.start()
    holder.feed.ready.wait()
    assert not holder.feed.healthy
    first, *_ = tenants(settings)
    signatures.clear()
    put(stack_folder(settings, first) / "0" / "10-classify.txcl", EDITED)

    async def scenario() -> None:
        watcher = asyncio.create_task(holder.watch(interval_s=0.05, debounce_s=0.05))
        deadline = time.monotonic() + 5
        while holder.current.version < 2:
            assert time.monotonic() < deadline, "the polling watcher did not reload"
            await asyncio.sleep(0.01)
        watcher.cancel()

    asyncio.run(scenario())
    assert len(signatures) == len(tenants(settings))  # a full walk, as without a feed
    as_a_full_load_sees_it(holder)
    holder.close()


def test_a_change_during_a_reload_is_kept_for_the_next(
        holder: RuntimeHolder, settings: Settings, signatures: list[str]) -> None:
    assert holder.feed is not None
    feed: ChangeFeed = holder.feed
    first, second, *_ = tenants(settings)
    rebuild = holder._rebuild

    def edit_meanwhile(*args: Any) -> Any:
        put(stack_folder(settings, second) / "0" / "10-classify.txcl", EDITED)
        until(feed.pending)
        return rebuild(*args)

    holder._rebuild = edit_meanwhile
    put(stack_folder(settings, first) / "0" / "10-classify.txcl", EDITED)
    reload_seen(holder)
    assert signatures == [f"{first}/_mail"]
    holder._rebuild = rebuild
    signatures.clear()
    asyncio.run(holder.reload("test"))
    assert signatures == [f"{second}/_mail"]
    as_a_full_load_sees_it(holder)


def test_a_failed_reload_keeps_what_it_did_not_apply(
        holder: RuntimeHolder, settings: Settings, signatures: list[str]) -> None:
    first, *_ = tenants(settings)
    config = Path(settings.config_file)  # type: ignore[arg-type]
    good = config.read_text()
    config.write_text("ingress: [not a mapping\n")
    put(stack_folder(settings, first) / "0" / "10-classify.txcl", EDITED)
    reload_seen(holder)
    assert not holder.last.ok and holder.current.version == 1
    config.write_text(good)
    reload_seen(holder)
    assert holder.last.ok and holder.current.version == 2
    assert f"{first}/_mail" in signatures
    as_a_full_load_sees_it(holder)


def test_the_watcher_reloads_from_the_feed_without_polling(
        holder: RuntimeHolder, settings: Settings) -> None:
    """With a healthy feed the interval is not used: an hour, and the edit still goes live;
    the fingerprint is compared once, when the watcher starts."""
    polls = count_polls(holder)
    first, *_ = tenants(settings)

    async def scenario() -> None:
        watcher = asyncio.create_task(holder.watch(interval_s=3600, debounce_s=0.05))
        deadline = time.monotonic() + 5
        while polls[0] < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        put(stack_folder(settings, first) / "0" / "10-classify.txcl", EDITED)
        while holder.current.version < 2:
            assert time.monotonic() < deadline, "the feed did not wake the watcher"
            await asyncio.sleep(0.01)
        watcher.cancel()

    asyncio.run(scenario())
    assert holder.last.trigger == "watch"
    assert polls[0] == 1
    as_a_full_load_sees_it(holder)


def test_a_layout_problem_is_found_again_and_its_fix_seen(
        settings: Settings, listed: list[str]) -> None:
    ops = Path(settings.ops_dir)
    (ops / "zz_bad").mkdir()
    holder = watching(RuntimeHolder.start(settings, [LmtpPersonality(settings)], feed=True))
    try:
        assert any("zz_bad" in str(p) for p in holder.current.tree.problems)
        first, *_ = tenants(settings)
        listed.clear()
        put(stack_folder(settings, first) / "0" / "10-classify.txcl", EDITED)
        reload_seen(holder)  # refused as a whole: the misnamed folder is still there
        assert not holder.last.ok
        assert len([f for f in listed if "/" not in f]) == len(tenants(settings))  # root + all
        (ops / "zz_bad").rename(ops / "fixed")
        reload_seen(holder)
        assert holder.last.ok and not holder.current.tree.problems
        as_a_full_load_sees_it(holder)
    finally:
        holder.close()


def test_txco_serve_puts_an_edit_live_from_the_feed_not_the_interval(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    """End to end: with a healthy feed --watch-interval is not used (an hour here)."""
    good = 'SET @lmtp.res.code = 250\nSET @lmtp.res.msg = "v1"\n'
    server = serve(tmp_path, {"acme/_mail/0/10-accept.txcl": good}, CONFIG,
                   "--watch-interval", "3600")
    server.wait_for_log(r"change feed ready: a reload reads only what changed", timeout=30)
    (tmp_path / "OPS/acme/_mail/0/10-accept.txcl").write_text(good.replace("v1", "v2"))
    server.wait_for_log(r"reload \(watch\): now serving version 2", timeout=30)
    with server.lmtp() as client:
        _, replies = deliver(client, ["a@acme.example"])
    assert replies[0] == (250, b"2.0.0 v2")


def test_until_the_feed_is_whole_a_reload_walks_everything(
        settings: Settings, signatures: list[str]) -> None:
    """A change made before a folder's watch was added is in no event: the first take after
    the feed watches everything says 'unknown' unless the caller compared everything."""
    holder = RuntimeHolder.start(settings, [LmtpPersonality(settings)], feed=True)
    try:
        assert holder.feed is not None
        holder.feed.start()
        holder.feed.ready.wait()
        signatures.clear()
        asyncio.run(holder.reload("test"))
        assert len(signatures) == len(tenants(settings))
        signatures.clear()
        first, *_ = tenants(settings)
        put(stack_folder(settings, first) / "0" / "10-classify.txcl", EDITED)
        reload_seen(holder)
        assert signatures == [f"{first}/_mail"]
    finally:
        holder.close()


def test_a_log_written_beside_the_config_wakes_nothing(tmp_path: Path) -> None:
    """The config file's folder may hold a busy log: its appends are no events; the config
    rewritten in place is one, once its writer closes it."""
    ops, config, _ = generate(tmp_path / "tree", 4)
    log_file = Path(config).parent / "server.log"
    log_file.write_text("")  # before the watch: its appends are what is looked at
    seen: list[str] = []
    batches = threading.Event()
    feed = ChangeFeed(ops, config)
    handle = feed._handle

    def recording(events: list[inotify_simple.Event]) -> None:
        seen.extend(event.name for event in events)
        handle(events)
        batches.set()

    feed._handle = recording  # type: ignore[method-assign]
    feed.start()
    try:
        assert feed.ready.wait(10) and feed.healthy
        feed.trust()
        with open(log_file, "a", buffering=1) as log:
            for n in range(50):
                log.write(f"line {n}\n")  # flushed each line, not closed
            with open(config, "a") as edit:
                edit.write("\n")
            deadline = time.monotonic() + 10
            while Path(config).name not in seen:
                assert time.monotonic() < deadline, "the config edit was not seen"
                batches.wait(0.1)
                batches.clear()
            assert log_file.name not in seen  # events come in order: the log's would be first
        assert feed.pending() and feed.take() == frozenset()  # the config: no stack named
    finally:
        feed.close()
