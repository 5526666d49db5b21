"""Issue 17 at small scale: --workers share the tree the parent compiled, routing stays a
dict lookup per recipient however many tenants there are, and status reports the memory
of the loaded stacks."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from conftest import unrid  # noqa: E402
from scale_tree import domain_of, generate  # noqa: E402


def backdate(root: Path, seconds: float = 60) -> None:
    when = time.time() - seconds
    for path in [root, *root.rglob("*")]:
        os.utime(path, (when, when), follow_symlinks=False)


def log_lines(server: Any, pattern: str, count: int, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in list(server.log) if pattern in line]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{count} lines with {pattern!r} not logged:\n{server.stderr()}")


def test_workers_take_over_the_tree_the_parent_compiled(
    serve: Callable[..., Any], tmp_path: Path
) -> None:
    ops, config, tenants = generate(tmp_path / "tree", 12)
    backdate(ops)
    server = serve(tmp_path, ops, config.read_text(), "--workers=2")
    parent = log_lines(server, "loaded for the workers", 1)
    assert "3 stacks, 12 rule files (12 compiled, 12 parsed)" in parent[0]
    workers = log_lines(server, "loaded version 1", 2)
    assert all("3 stacks, 12 rule files (0 compiled, 0 parsed)" in line for line in workers)
    with server.lmtp() as client:
        client.ehlo("client.example")
        client.mail("a@example.com")
        client.rcpt(f"support@{domain_of(tenants[1])}")
        code, reply = unrid(client.data(b"Subject: hi\r\n\r\nhello\r\n"))
    assert (code, reply) == (250, f"2.0.0 queued for {tenants[1]}".encode())
    assert server.stop() == 0


# --- routing: a dict lookup per recipient, however many tenants ---------------------------------


class CountingRows(dict):  # type: ignore[type-arg]
    """A tenant_hostnames snapshot that counts how it is read."""

    lookups = 0
    scans = 0

    def get(self, key: Any, default: Any = None) -> Any:
        CountingRows.lookups += 1
        return super().get(key, default)

    def __iter__(self) -> Any:
        CountingRows.scans += 1
        return super().__iter__()


def lines_run(call: Callable[[], object]) -> int:
    """How many Python lines `call` runs: a loop over the tenants would show."""
    count = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        call()
    finally:
        sys.settrace(None)
    return count


def router_for(tenants: int) -> Any:
    from lmtp.config import IngressConfig, Settings, Target
    from lmtp.hostnames import HostnameRow
    from lmtp.routing import Router

    domains = {f"t{i}.example": Target(f"t{i}", f"t{i}/_mail") for i in range(tenants)}
    rows = CountingRows({f"h{i}.example": HostnameRow(f"h{i}.example", f"h{i}", None, True,
                                                      0.0, 0.0) for i in range(tenants)})

    class Store:
        def snapshot(self) -> CountingRows:
            return rows

    settings = Settings(lmtp_default_hosts=("chassis.example",))
    router = Router(IngressConfig(verified_domains=domains), settings, Store())
    router.refresh_hostnames()
    return router


@pytest.mark.parametrize("address", ["a@t7.example", "a@h7.example", "a@nowhere.example",
                                     "t7.support@chassis.example"])
def test_routing_runs_the_same_lines_for_ten_tenants_and_25000(address: str) -> None:
    small, large = router_for(10), router_for(25_000)
    assert small.route(address) == large.route(address)
    assert lines_run(lambda: large.route(address)) == lines_run(lambda: small.route(address))


def test_a_tenant_hostnames_lookup_is_one_get_and_no_scan() -> None:
    router = router_for(25_000)
    # The router keys the snapshot by domain_key once per refresh; count what a RCPT reads.
    router._rows = CountingRows(router._rows)
    CountingRows.lookups = CountingRows.scans = 0
    for i in (0, 12_345, 24_999):
        route = router.route(f"someone@h{i}.example")
        assert route is not None and route.tenant == f"h{i}"
    assert (CountingRows.lookups, CountingRows.scans) == (3, 0)


# --- memory per loaded stack -------------------------------------------------------------------


def test_status_reports_the_memory_per_loaded_stack(tmp_path: Path) -> None:
    from lmtp.config import Settings
    from lmtp.personality import LmtpPersonality
    from txcl.chassis.reload import RuntimeHolder
    from txcl.chassis.status import format_status, read_status

    ops, config, tenants = generate(tmp_path, 12)
    bigger = ops / tenants[0] / "_mail" / "2"
    bigger.mkdir()
    for i in range(8):
        (bigger / f"{i}.txcl").write_text(f"WHEN @lmtp.msg.subject =~ /x{i}/\nSET a.b{i} = 1\n")
    settings = Settings(ops_dir=ops, config_file=config, state_dir=tmp_path / "var",
                        lmtp_hostname="test")
    RuntimeHolder.start(settings, [LmtpPersonality(settings)])
    memory = read_status(tmp_path / "var")["memory"]
    assert memory["stacks"] == memory["sampled"] == 3
    assert 0 < memory["bytes_per_stack"] < memory["max_bytes"]
    assert memory["estimated_bytes"] == 3 * memory["bytes_per_stack"]
    assert "KiB per loaded stack (weighed 3 of 3" in format_status(read_status(tmp_path / "var"))


def test_the_weight_of_a_stack_is_near_what_it_allocates(tmp_path: Path) -> None:
    import gc
    import tracemalloc

    from txcl.chassis.status import stack_memory
    from txcl.loader import load_tree

    allocated, weighed = [], []
    for files in (40, 200):
        ops, _, _ = generate(tmp_path / str(files), files)
        load_tree(ops)  # imports and parser tables first
        gc.collect()
        tracemalloc.start()
        tree = load_tree(ops)
        allocated.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.stop()
        weighed.append(stack_memory(tree.stacks)["bytes_per_stack"])
    per_stack = (allocated[1] - allocated[0]) / 40
    assert weighed[0] == pytest.approx(weighed[1], rel=0.01)  # every stack has the same shape
    assert 0.6 * per_stack < weighed[1] < 1.2 * per_stack


def test_a_delivery_in_flight_keeps_its_version_through_an_incremental_reload(
    serve: Callable[..., Any], tmp_path: Path
) -> None:
    import json
    import signal

    ops, config, tenants = generate(tmp_path / "tree", 12)
    backdate(ops)
    server = serve(tmp_path, ops, config.read_text(), "--no-watch")
    status = tmp_path / "var" / "status.json"
    verdict = ops / tenants[1] / "_mail" / "1" / "20-verdict.txcl"
    with server.lmtp() as client:
        client.ehlo("client.example")
        client.mail("a@example.com")
        assert client.rcpt(f"support@{domain_of(tenants[1])}")[0] == 250  # takes version 1
        verdict.write_text(verdict.read_text().replace("queued for", "edited for"))
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log(r"now serving version 2 \(built in [0-9.]+s; 4 of 12 rule files "
                            r"compiled, 1 parsed\)", timeout=60)
        deadline = time.monotonic() + 30  # status.json is written just after the log line
        while json.loads(status.read_text())["version"] != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert json.loads(status.read_text())["rule_files"]["compiled"] == 4
        code, reply = unrid(client.data(b"Subject: hi\r\n\r\nhello\r\n"))
        assert (code, reply) == (250, f"2.0.0 queued for {tenants[1]}".encode())
        client.mail("a@example.com")
        client.rcpt(f"support@{domain_of(tenants[1])}")
        assert unrid(client.data(b"Subject: hi\r\n\r\nhello\r\n")) == (
            250, f"2.0.0 edited for {tenants[1]}".encode())
    assert server.stop() == 0


def test_a_preloaded_tree_is_checked_against_the_workers_ops(tmp_path: Path) -> None:
    from txcl.loader import load_tree, with_registry
    from txcl.ops import OpRegistry

    ops, _, tenants = generate(tmp_path, 12)
    (ops / tenants[2] / "_mail" / "0" / "30-op.txcl").write_text('EXEC "op://CLASSIFY"\n')
    preloaded = load_tree(ops)  # as the parent of --workers loads it: no ops known
    assert len(preloaded.stacks) == 3 and preloaded.exec_ops[f"{tenants[2]}/_mail"] == {
        "CLASSIFY"}
    checked = with_registry(preloaded, OpRegistry.default())
    assert sorted(checked.stacks) == [f"{tenants[0]}/_mail", f"{tenants[1]}/_mail"]
    assert checked.stacks[f"{tenants[0]}/_mail"] is preloaded.stacks[f"{tenants[0]}/_mail"]
    assert [p.message for p in checked.problems] == ["unknown op 'CLASSIFY' (EXEC op://CLASSIFY)"]
    assert checked.rejected == {f"{tenants[2]}/_mail"}
