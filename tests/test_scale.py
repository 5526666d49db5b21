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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
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
        code, reply = client.data(b"Subject: hi\r\n\r\nhello\r\n")
    assert (code, reply) == (250, f"2.0.0 queued for {tenants[1]}".encode())
    assert server.stop() == 0
