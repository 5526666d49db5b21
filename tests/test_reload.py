"""txcl.chassis.reload (with the LMTP head): snapshots compiled aside, swapped atomically, bad edits refused, triggers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import unrid

from lmtp.config import Settings
from lmtp.personality import LmtpPersonality
from lmtp.reload import ReloadingHandler
from lmtp.routing import Route
from txcl.chassis.reload import ReloadOutcome, RuntimeHolder, fingerprint
from txcl.chassis.status import format_status, read_status

ACCEPT = 'SET @lmtp.res.code = 250\nSET @lmtp.res.msg = "v1"\n'
ACCEPT_V2 = 'SET @lmtp.res.code = 250\nSET @lmtp.res.msg = "v2"\n'
BROKEN = "SET @lmtp.res.code = 250\nWHEN @lmtp.msg.subject =~ /(unclosed/\nSET x = 1\n"
CONFIG = "ingress:\n  lmtp:\n    verified_domains:\n      acme.example: {tenant: acme}\n"


def layout(tmp_path: Path, config: str = CONFIG) -> Settings:
    rules = tmp_path / "OPS" / "acme" / "_mail" / "0"
    rules.mkdir(parents=True)
    (rules / "10-accept.txcl").write_text(ACCEPT)
    (tmp_path / "txco.yaml").write_text(config)
    return Settings(
        ops_dir=tmp_path / "OPS",
        config_file=tmp_path / "txco.yaml",
        state_dir=tmp_path / "var",
        lmtp_hostname="test",
    )


def start(settings: Settings) -> RuntimeHolder:
    return RuntimeHolder.start(settings, [LmtpPersonality(settings)])


def reload_now(holder: RuntimeHolder) -> ReloadOutcome:
    return asyncio.run(holder.reload("test"))


def rule_file(tmp_path: Path, name: str = "10-accept.txcl") -> Path:
    return tmp_path / "OPS" / "acme" / "_mail" / "0" / name


def edit(path: Path, text: str) -> None:
    """Write and move the mtime forward, so a same-size edit within one clock tick counts."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    st = path.stat()
    if st.st_mtime_ns <= before:
        os.utime(path, ns=(st.st_atime_ns, before + 1_000_000))


def verdict_msg(holder: RuntimeHolder) -> str:
    stack = holder.current.tree.stacks["acme/_mail"]
    envelope = {"_txc": {"src": "lmtp", "route": {"to": "acme/_mail/0"}, "lmtp": {"rcpt": ["a"]}}}
    return stack.run(envelope).envelope["_txc"]["lmtp"]["res"]["msg"]


def test_start_builds_version_1_and_writes_status(tmp_path: Path) -> None:
    holder = start(layout(tmp_path))
    assert holder.current.version == 1
    assert verdict_msg(holder) == "v1"
    assert holder.current.heads["lmtp"].router.route("x@acme.example") is not None
    status = read_status(tmp_path / "var")
    assert status["version"] == 1 and status["stacks"] == 1
    assert status["last_reload"]["ok"] is True
    assert status["last_reload"]["trigger"] == "start"


def test_a_good_edit_swaps_in_the_next_version(tmp_path: Path) -> None:
    holder = start(layout(tmp_path))
    first = holder.current
    edit(rule_file(tmp_path), ACCEPT_V2)
    outcome = reload_now(holder)
    assert outcome.ok and outcome.version == 2
    assert holder.current is not first and holder.current.version == 2
    assert verdict_msg(holder) == "v2"
    assert read_status(tmp_path / "var")["version"] == 2


def test_a_broken_edit_keeps_the_last_good_version_and_reports_every_problem(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder = start(layout(tmp_path))
    good = holder.current
    edit(rule_file(tmp_path), BROKEN)
    edit(tmp_path / "txco.yaml", "ingress:\n  lmtp:\n    listeners: [oops\n")
    outcome = reload_now(holder)
    assert not outcome.ok
    assert holder.current is good and verdict_msg(holder) == "v1"
    texts = [str(p) for p in outcome.problems]
    rule = str(rule_file(tmp_path))
    assert any(t.startswith(f"{rule}:2:") for t in texts), texts
    assert any(t.startswith(f"{tmp_path / 'txco.yaml'}:4:") for t in texts), texts
    status = read_status(tmp_path / "var")
    assert status["version"] == 1
    assert status["last_reload"]["ok"] is False
    locations = [p.get("location", {}).get("file") for p in status["last_reload"]["problems"]]
    assert rule in locations
    shown = format_status(status)
    assert "FAILED, still serving the version above" in shown
    assert f"{rule}:2:" in shown
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "txco.reload")
    assert "still serving version 1" in logged and f"{rule}:2:" in logged


def test_fixing_the_edit_serves_again(tmp_path: Path) -> None:
    holder = start(layout(tmp_path))
    edit(rule_file(tmp_path), BROKEN)
    assert not reload_now(holder).ok
    edit(rule_file(tmp_path), ACCEPT_V2)
    outcome = reload_now(holder)
    assert outcome.ok and outcome.version == 3 and verdict_msg(holder) == "v2"
    assert read_status(tmp_path / "var")["last_reload"]["problems"] == []
    assert read_status(tmp_path / "var")["last_reload"]["failed_stacks"] == []


def test_an_unknown_op_keeps_out_only_its_stack_at_start_and_on_reload(tmp_path: Path) -> None:
    settings = layout(tmp_path)
    other = tmp_path / "OPS" / "beta" / "_mail" / "0"
    other.mkdir(parents=True)
    (other / "10.txcl").write_text('EXEC "op://NO_SUCH_OP"\n')
    holder = start(settings)
    assert set(holder.current.tree.stacks) == {"acme/_mail"}
    assert holder.last.ok is False  # start reports the stack it could not serve
    assert [(f.stack, f.serving) for f in holder.last.failed_stacks] == [("beta/_mail", False)]
    edit(rule_file(tmp_path), ACCEPT_V2)
    outcome = reload_now(holder)  # beta has no good version: acme's edit goes live alone
    assert not outcome.ok and outcome.version == 2 and verdict_msg(holder) == "v2"
    assert set(holder.current.tree.stacks) == {"acme/_mail"}
    [failure] = outcome.failed_stacks
    assert failure.stack == "beta/_mail" and not failure.serving
    assert any("NO_SUCH_OP" in str(p) for p in failure.problems)


def test_a_transaction_keeps_the_runtime_it_started_with(tmp_path: Path) -> None:
    holder = start(layout(tmp_path))
    handler = ReloadingHandler(holder, make_transaction=lambda **kw: kw)
    in_flight = SimpleNamespace(rcpt_tos=[], routes=[])
    reply = asyncio.run(handler.handle_RCPT(None, None, in_flight, "a@acme.example", []))
    assert reply.startswith("250")
    edit(rule_file(tmp_path), ACCEPT_V2)
    assert reload_now(holder).ok
    assert handler.runtime_of(in_flight).version == 1
    fresh = SimpleNamespace(rcpt_tos=[], routes=[])
    assert handler.runtime_of(fresh).version == 2
    assert isinstance(in_flight.routes[0], Route)


def test_the_fingerprint_sees_edits_additions_and_removals(tmp_path: Path) -> None:
    settings = layout(tmp_path)
    paths = (settings.ops_dir, settings.config_file)
    base = fingerprint(paths)
    assert fingerprint(paths) == base
    edit(rule_file(tmp_path), ACCEPT_V2)
    edited = fingerprint(paths)
    assert edited != base
    rule_file(tmp_path, "20-more.txcl").write_text(ACCEPT)
    added = fingerprint(paths)
    assert added != edited
    rule_file(tmp_path, "20-more.txcl").unlink()
    assert fingerprint(paths) == edited
    missing = fingerprint((tmp_path / "nothing-here",))
    assert missing == ((str(tmp_path / "nothing-here"), -1, -1),)


def test_the_fingerprint_sees_a_symlink_loop_come_and_go(tmp_path: Path) -> None:
    settings = layout(tmp_path)
    paths = (settings.ops_dir,)
    base = fingerprint(paths)
    loop = rule_file(tmp_path, "loop.txcl")
    loop.symlink_to("loop.txcl")
    with_loop = fingerprint(paths)
    assert with_loop != base and fingerprint(paths) == with_loop  # seen, and stable
    loop.unlink()
    assert fingerprint(paths) == base


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


def count_polls(holder: RuntimeHolder) -> list[int]:
    """A one-item list counting the watcher's finished polls (each compares the files once)."""
    done = [0]
    poll = holder._reload_if_changed

    async def counted(debounce_s: float) -> None:
        await poll(debounce_s)
        done[0] += 1

    holder._reload_if_changed = counted  # type: ignore[method-assign]
    return done


def test_the_watcher_reloads_once_for_a_multi_file_save(tmp_path: Path) -> None:
    holder = start(layout(tmp_path))
    polls = count_polls(holder)
    versions: list[int] = []

    async def scenario() -> None:
        watcher = asyncio.create_task(holder.watch(interval_s=0.05, debounce_s=0.25))
        await _until(lambda: polls[0] >= 1)
        for i, name in enumerate(("10-accept.txcl", "20-b.txcl", "30-c.txcl")):
            edit(rule_file(tmp_path, name), ACCEPT_V2 if i == 0 else ACCEPT)
            await asyncio.sleep(0.05)
        await _until(lambda: holder.current.version > 1)
        after = polls[0]
        await _until(lambda: polls[0] >= after + 3)  # the watcher has looked again since
        versions.append(holder.current.version)
        watcher.cancel()

    asyncio.run(scenario())
    assert versions == [2]
    assert len(holder.current.tree.stacks["acme/_mail"].rules) == 3
    assert holder.last.trigger == "watch"


def test_the_watcher_does_not_retry_a_broken_tree_until_it_changes(tmp_path: Path) -> None:
    holder = start(layout(tmp_path))
    polls = count_polls(holder)
    attempts: list[float] = []

    async def scenario() -> None:
        watcher = asyncio.create_task(holder.watch(interval_s=0.03, debounce_s=0.05))
        edit(rule_file(tmp_path), BROKEN)
        await _until(lambda: holder.last.trigger == "watch")
        attempts.append(holder.last.at)
        after = polls[0]
        await _until(lambda: polls[0] >= after + 5)  # five more looks at the unchanged files
        attempts.append(holder.last.at)
        edit(rule_file(tmp_path), ACCEPT_V2)
        await _until(lambda: holder.current.version == 2)
        watcher.cancel()

    asyncio.run(scenario())
    assert attempts[0] == attempts[1]


def test_sighup_reloads(tmp_path: Path) -> None:
    holder = start(layout(tmp_path))

    async def scenario() -> None:
        holder.install_sighup()
        try:
            edit(rule_file(tmp_path), ACCEPT_V2)
            os.kill(os.getpid(), signal.SIGHUP)
            await _until(lambda: holder.current.version == 2)
        finally:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    asyncio.run(scenario())
    assert holder.last.trigger == "sighup" and verdict_msg(holder) == "v2"


def test_requests_during_a_reload_fold_into_one_more(tmp_path: Path) -> None:
    holder = start(layout(tmp_path))

    async def scenario() -> None:
        for _ in range(10):
            holder.request_reload("sighup")
        await _until(lambda: holder._drainer is not None and holder._drainer.done())

    asyncio.run(scenario())
    assert holder.current.version == 2


def test_the_loop_keeps_serving_while_a_reload_compiles(tmp_path: Path) -> None:
    settings = layout(tmp_path)
    for i in range(200):
        (rule_file(tmp_path, f"{i:03d}-r.txcl")).write_text(
            f"WHEN @lmtp.msg.subject =~ /ticket {i} (?P<n>[0-9]+)/\nSET ticket.t{i} = match.n\n"
        )
    holder = start(settings)
    gaps: list[float] = []

    async def scenario() -> None:
        reload = asyncio.create_task(holder.reload("test"))
        last = time.perf_counter()
        while not reload.done():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        assert (await reload).ok

    asyncio.run(scenario())
    assert holder.current.version == 2
    assert len(gaps) > 5  # the loop ran during the reload, not only after it
    assert max(gaps) < 0.25, max(gaps)


def test_status_json_is_replaced_atomically_and_readable(tmp_path: Path) -> None:
    holder = start(layout(tmp_path))
    reload_now(holder)
    path = tmp_path / "var" / "status.json"
    doc = json.loads(path.read_text())
    assert doc["version"] == 2 and doc["pid"] == os.getpid()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


# --- incremental reload: what changed is compiled, the rest is shared --------------------------

TENANTS = ("acme", "beta", "gamma")


def multi_tenant(tmp_path: Path, config: str = "") -> Settings:
    """Three tenants of two files each, every file dated a minute back (so that none is too
    recent for its stack to be taken over)."""
    for tenant in TENANTS:
        for name, text in (("0/10-a.txcl", f"SET seen.{tenant} = 1\n"),
                           ("1/10-accept.txcl", ACCEPT.replace("v1", f"{tenant} v1"))):
            path = tmp_path / "OPS" / tenant / "_mail" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    domains = "".join(f"      {t}.example: {{tenant: {t}}}\n" for t in TENANTS)
    (tmp_path / "txco.yaml").write_text(
        config or f"ingress:\n  lmtp:\n    verified_domains:\n{domains}")
    backdate(tmp_path / "OPS")
    return Settings(ops_dir=tmp_path / "OPS", config_file=tmp_path / "txco.yaml",
                    state_dir=tmp_path / "var", lmtp_hostname="test")


def backdate(root: Path, seconds: float = 60) -> None:
    when = time.time() - seconds
    for path in [root, *root.rglob("*")]:
        os.utime(path, (when, when), follow_symlinks=False)


def stacks_of(holder: RuntimeHolder) -> dict[str, Any]:
    return dict(holder.current.tree.stacks)


def shared(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    return {name for name in before if after.get(name) is before[name]}


def msg_of(holder: RuntimeHolder, tenant: str) -> str:
    stack = holder.current.tree.stacks[f"{tenant}/_mail"]
    envelope = {"_txc": {"src": "lmtp", "route": {"to": f"{tenant}/_mail/0"},
                         "lmtp": {"rcpt": ["a"]}}}
    return stack.run(envelope).envelope["_txc"]["lmtp"]["res"]["msg"]


def test_an_edit_compiles_only_its_stack_and_shares_the_others(tmp_path: Path) -> None:
    holder = start(multi_tenant(tmp_path))
    assert holder.current.tree.compiled == 6
    before = stacks_of(holder)
    edit(tmp_path / "OPS/beta/_mail/1/10-accept.txcl", ACCEPT_V2)
    assert reload_now(holder).ok
    tree = holder.current.tree
    assert (tree.compiled, tree.parsed, tree.files) == (2, 1, 6)  # one file new to the cache
    assert shared(before, stacks_of(holder)) == {"acme/_mail", "gamma/_mail"}
    assert msg_of(holder, "beta") == "v2" and msg_of(holder, "acme") == "acme v1"
    # nothing changed since: taken over again, but for beta, written too recently to trust
    before = stacks_of(holder)
    assert reload_now(holder).ok
    assert holder.current.tree.compiled == 2
    assert shared(before, stacks_of(holder)) == {"acme/_mail", "gamma/_mail"}


def test_a_rename_a_deleted_stack_and_a_new_tenant_each_compile_only_themselves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the steps follow each other within the margin: trust what a step's load saw
    monkeypatch.setattr("txcl.loader.RACY_MARGIN_NS", 0)
    holder = start(multi_tenant(tmp_path))
    before = stacks_of(holder)
    stage = tmp_path / "OPS/acme/_mail/0"
    (stage / "10-a.txcl").rename(stage / "20-a.txcl")
    assert reload_now(holder).ok
    assert holder.current.tree.compiled == 2
    assert shared(before, stacks_of(holder)) == {"beta/_mail", "gamma/_mail"}
    assert [Path(f).name for f in holder.current.tree.stacks["acme/_mail"].stages[0].files] == [
        "20-a.txcl"]

    before = stacks_of(holder)
    for path in sorted((tmp_path / "OPS/gamma").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "OPS/gamma").rmdir()
    assert reload_now(holder).ok
    assert holder.current.tree.compiled == 0
    assert set(stacks_of(holder)) == {"acme/_mail", "beta/_mail"}
    assert shared(before, stacks_of(holder)) >= {"beta/_mail"}

    before = stacks_of(holder)
    new = tmp_path / "OPS/delta/_mail/0/10-accept.txcl"
    new.parent.mkdir(parents=True)
    new.write_text(ACCEPT.replace("v1", "delta v1"))
    assert reload_now(holder).ok
    assert holder.current.tree.compiled == 1
    assert set(stacks_of(holder)) == {"acme/_mail", "beta/_mail", "delta/_mail"}
    assert shared(before, stacks_of(holder)) >= {"beta/_mail"}
    assert msg_of(holder, "delta") == "delta v1"


def test_a_config_change_that_reroutes_compiles_no_stack(tmp_path: Path) -> None:
    settings = multi_tenant(tmp_path)
    holder = start(settings)
    before = stacks_of(holder)
    router = holder.current.heads["lmtp"].router
    assert router.route("x@acme.example").stack == "acme/_mail"
    edit(tmp_path / "txco.yaml",
         "ingress:\n  lmtp:\n    verified_domains:\n      acme.example: {tenant: beta}\n")
    assert reload_now(holder).ok
    assert holder.current.tree.compiled == 0
    assert shared(before, stacks_of(holder)) == set(before)
    router = holder.current.heads["lmtp"].router
    assert router.route("x@acme.example").stack == "beta/_mail"
    assert router.route("x@gamma.example") is None


def test_a_taken_over_stack_is_checked_against_the_new_ops(tmp_path: Path) -> None:
    ops = 'ops:\n  CLASSIFY: {python: "json:loads"}\n'
    settings = multi_tenant(tmp_path, ops)
    (tmp_path / "OPS/acme/_mail/0/20-exec.txcl").write_text('EXEC "op://CLASSIFY"\n')
    backdate(tmp_path / "OPS")
    holder = start(settings)
    assert "acme/_mail" in holder.current.tree.stacks
    edit(tmp_path / "txco.yaml", "ops: {}\n")
    outcome = reload_now(holder)
    assert not outcome.ok and holder.current.version == 1
    assert any("CLASSIFY" in str(p) for p in outcome.problems)


def test_an_edit_that_keeps_size_and_mtime_is_still_seen(tmp_path: Path) -> None:
    holder = start(multi_tenant(tmp_path))
    path = tmp_path / "OPS/beta/_mail/1/10-accept.txcl"
    st = path.stat()
    path.write_text(path.read_text().replace("v1", "v9"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # what `cp -p` or a sync tool does
    assert path.stat().st_size == st.st_size
    assert reload_now(holder).ok
    assert msg_of(holder, "beta") == "beta v9"


def test_a_file_written_just_before_a_load_is_not_trusted_by_the_next(tmp_path: Path) -> None:
    settings = multi_tenant(tmp_path)
    fresh = tmp_path / "OPS/acme/_mail/0/10-a.txcl"
    fresh.write_text("SET seen.acme = 2\n")  # in the same clock tick as the load, maybe
    holder = start(settings)
    assert reload_now(holder).ok
    assert holder.current.tree.compiled == 2  # acme's folder is too recent to take over


def test_without_the_cache_every_start_parses_and_nothing_is_written(tmp_path: Path) -> None:
    settings = multi_tenant(tmp_path)
    holder = RuntimeHolder.start(settings, [LmtpPersonality(settings)], compile_cache=False)
    assert holder.current.tree.parsed == 6
    assert not (tmp_path / "var" / "cache").exists()
    warm = start(settings)
    assert warm.current.tree.parsed == 6
    assert start(settings).current.tree.parsed == 0


def beta_in_flight(tmp_path: Path) -> tuple[RuntimeHolder, ReloadingHandler, SimpleNamespace]:
    """A holder of the multi-tenant tree, its RCPT handler, and a transaction that has
    taken its runtime with a first RCPT (to beta)."""
    holder = start(multi_tenant(tmp_path))
    handler = ReloadingHandler(holder, make_transaction=lambda **kw: kw)
    in_flight = SimpleNamespace(rcpt_tos=[], routes=[])
    asyncio.run(handler.handle_RCPT(None, None, in_flight, "a@beta.example", []))
    return holder, handler, in_flight


def test_a_transaction_in_flight_keeps_its_runtime_through_an_incremental_reload(
    tmp_path: Path,
) -> None:
    from lmtp.delivery import Transaction

    holder, handler, in_flight = beta_in_flight(tmp_path)
    first = holder.current
    edit(tmp_path / "OPS/beta/_mail/1/10-accept.txcl", ACCEPT_V2)
    assert reload_now(holder).ok
    assert holder.current.tree.compiled == 2
    taken = handler.runtime_of(in_flight)
    assert taken is first and taken.version == 1

    def deliver(runtime: Any) -> list[str]:
        transaction = Transaction("default", "127.0.0.1", "client", "a@example.com",
                                  ("a@beta.example",), tuple(in_flight.routes),
                                  b"Subject: hi\r\n\r\nhello\r\n", time.time())
        return unrid(asyncio.run(runtime.heads["lmtp"].deliverer.deliver(transaction)))

    assert deliver(taken)[0].endswith("beta v1")
    assert deliver(holder.current)[0].endswith("v2")


def test_a_stage_folder_that_loops_fails_its_stack_and_does_not_crash_the_reload(
    tmp_path: Path,
) -> None:
    holder = start(multi_tenant(tmp_path))
    before = stacks_of(holder)
    loop = tmp_path / "OPS/gamma/_mail/2"
    loop.symlink_to("3")  # a stage folder and a sibling that lead to each other
    (tmp_path / "OPS/gamma/_mail/3").symlink_to("2")
    outcome = reload_now(holder)
    assert not outcome.ok and holder.current.version == 2
    assert [(f.stack, f.serving) for f in outcome.failed_stacks] == [("gamma/_mail", True)]
    assert stacks_of(holder)["gamma/_mail"] is before["gamma/_mail"]  # its last good version
    assert [p.code for p in outcome.problems] == ["txcl_load_error", "txcl_load_error"]
    assert all("a symlink loop" in p.message for p in outcome.problems)


def test_a_broken_stack_keeps_its_last_good_version_while_the_others_go_live(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder = start(multi_tenant(tmp_path))
    before = stacks_of(holder)
    signature = holder.current.tree.signatures["acme/_mail"]
    broken = tmp_path / "OPS/acme/_mail/1/10-accept.txcl"
    edit(broken, BROKEN)
    edit(tmp_path / "OPS/beta/_mail/1/10-accept.txcl", ACCEPT_V2)
    outcome = reload_now(holder)
    assert not outcome.ok and outcome.version == 2 and holder.current.version == 2
    assert stacks_of(holder)["acme/_mail"] is before["acme/_mail"]
    assert msg_of(holder, "acme") == "acme v1" and msg_of(holder, "beta") == "v2"
    [failure] = outcome.failed_stacks
    assert failure.stack == "acme/_mail" and failure.serving
    assert any(str(p).startswith(f"{broken}:2:1: txcl_parse_error") for p in failure.problems)
    status = read_status(tmp_path / "var")
    assert status["version"] == 2 and status["last_reload"]["ok"] is False
    [listed] = status["last_reload"]["failed_stacks"]
    assert listed["stack"] == "acme/_mail" and listed["serving"] == "last good version"
    assert f"{broken}:2:1" in json.dumps(listed["problems"])
    shown = format_status(status)
    assert "last reload: FAILED for 1 stack(s); all else in the version above is live" in shown
    assert "stack acme/_mail: FAILED, still serving its last good version" in shown
    assert f"{broken}:2:1: txcl_parse_error" in shown
    warned = [r for r in caplog.records if r.name == "txco.reload" and r.levelno >= 30]
    assert any("stack acme/_mail FAILED; still serving its last good version" in r.getMessage()
               for r in warned)
    assert any(f"{broken}:2:1" in r.getMessage() for r in warned)
    # the held stack keeps the signature it was served with, so every reload tries it again
    assert holder.current.tree.signatures["acme/_mail"] == signature

    edit(tmp_path / "OPS/gamma/_mail/1/10-accept.txcl", ACCEPT_V2)  # acme still broken
    outcome = reload_now(holder)
    assert [f.stack for f in outcome.failed_stacks] == ["acme/_mail"] and outcome.version == 3
    assert stacks_of(holder)["acme/_mail"] is before["acme/_mail"]
    assert msg_of(holder, "gamma") == "v2"

    edit(broken, ACCEPT_V2.replace("v2", "acme v2"))
    outcome = reload_now(holder)
    assert outcome.ok and outcome.failed_stacks == () and msg_of(holder, "acme") == "acme v2"
    assert read_status(tmp_path / "var")["last_reload"]["failed_stacks"] == []


def test_a_new_stack_with_errors_is_not_served_and_the_rest_goes_live(tmp_path: Path) -> None:
    holder = start(multi_tenant(tmp_path))
    new = tmp_path / "OPS/delta/_mail/0/10.txcl"
    new.parent.mkdir(parents=True)
    new.write_text("SET @lmtp.res.code = 999\n")
    edit(tmp_path / "OPS/beta/_mail/1/10-accept.txcl", ACCEPT_V2)
    outcome = reload_now(holder)
    assert not outcome.ok and outcome.version == 2 and msg_of(holder, "beta") == "v2"
    assert "delta/_mail" not in holder.current.tree.stacks
    [failure] = outcome.failed_stacks
    assert (failure.stack, failure.serving) == ("delta/_mail", False)
    assert [f"{p.pos}" for p in failure.problems] == [f"{new}:1:22"]
    assert failure.problems[0].check == "verdict-code"
    shown = format_status(read_status(tmp_path / "var"))
    assert "stack delta/_mail: FAILED, not served (its mail gets 451 4.3.0)" in shown


def test_an_error_outside_any_stack_still_fails_the_whole_reload(tmp_path: Path) -> None:
    holder = start(multi_tenant(tmp_path))
    first = holder.current
    edit(tmp_path / "OPS/beta/_mail/1/10-accept.txcl", ACCEPT_V2)
    (tmp_path / "OPS/Acme").mkdir()  # a tenant folder misnamed: the stacks in it would vanish
    outcome = reload_now(holder)
    assert not outcome.ok and outcome.failed_stacks == () and holder.current is first
    assert any("OPS/Acme: expected a tenant folder" in str(p) for p in outcome.problems)
    assert "FAILED, still serving the version above" in format_status(
        read_status(tmp_path / "var"))


def test_a_transaction_keeps_its_runtime_through_a_reload_that_holds_a_stack(
    tmp_path: Path,
) -> None:
    holder, handler, in_flight = beta_in_flight(tmp_path)
    first = holder.current
    edit(tmp_path / "OPS/acme/_mail/1/10-accept.txcl", BROKEN)
    edit(tmp_path / "OPS/beta/_mail/1/10-accept.txcl", ACCEPT_V2)
    assert reload_now(holder).failed_stacks
    assert handler.runtime_of(in_flight) is first
    asyncio.run(handler.handle_RCPT(None, None, in_flight, "b@acme.example", []))
    assert handler.runtime_of(in_flight) is first  # a later RCPT does not move it
    assert handler.runtime_of(SimpleNamespace(rcpt_tos=[], routes=[])).version == 2
