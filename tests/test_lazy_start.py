"""A lazy start (what a single `txco serve` does): only the stack folders are found before
listening; a stack compiles at the first RCPT routed to it, and complete_start() compiles
the rest, then serves the completed tree as the same version and reports its problems.
Counted in compiled stacks and files, not timed."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from conftest import unrid

from lmtp.config import Settings
from lmtp.delivery import Transaction
from lmtp.personality import LmtpPersonality
from lmtp.reload import ReloadingHandler
from lmtp.session import Envelope
from txcl.chassis.reload import RuntimeHolder
from txcl.loader import LazyStacks, load_tree

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from scale_tree import domain_of, generate  # noqa: E402

BAD_CODE = "SET @lmtp.res.code = 999\n"  # a lint error: the stack is not served


def backdate(root: Path, seconds: float = 60) -> None:
    when = time.time() - seconds
    for path in [root, *root.rglob("*")]:
        os.utime(path, (when, when), follow_symlinks=False)


def tree_of(tmp_path: Path, files: int = 12) -> tuple[Settings, list[str]]:
    ops, config, tenants = generate(tmp_path / "tree", files)
    backdate(ops)
    return Settings(ops_dir=ops, config_file=config, state_dir=tmp_path / "var",
                    lmtp_hostname="test"), tenants


def lazy_start(settings: Settings) -> RuntimeHolder:
    return RuntimeHolder.start(settings, [LmtpPersonality(settings)], lazy=True)


def compiled(holder: RuntimeHolder) -> set[str]:
    stacks = holder.current.tree.stacks
    assert isinstance(stacks, LazyStacks)
    return set(stacks.compiled())


async def rcpt(handler: ReloadingHandler, envelope: Envelope, address: str) -> str:
    return await handler.handle_RCPT(None, None, envelope, address, [])  # type: ignore[arg-type]


async def data(handler: ReloadingHandler, envelope: Envelope) -> list[str]:
    envelope.mail_from = "a@example.com"
    envelope.content = b"Subject: hi\r\n\r\nhello\r\n"
    session: Any = type("S", (), {"peer": ("127.0.0.1", 1), "host_name": "client"})()
    return await handler.handle_DATA(None, session, envelope)


def test_nothing_compiles_before_a_recipient_is_routed_and_the_rest_after_listening(
    tmp_path: Path,
) -> None:
    settings, tenants = tree_of(tmp_path)
    holder = lazy_start(settings)
    assert compiled(holder) == set() and len(holder.current.tree.stacks) == 3
    handler = ReloadingHandler(holder, Transaction)

    async def main() -> None:
        envelope = Envelope()
        assert (await rcpt(handler, envelope, f"support@{domain_of(tenants[1])}")).startswith(
            "250")
        assert compiled(holder) == {f"{tenants[1]}/_mail"}  # at its RCPT, and only it
        first = holder.current.tree.stacks[f"{tenants[1]}/_mail"]
        assert unrid(await data(handler, envelope)) == [f"250 2.0.0 queued for {tenants[1]}"]
        assert compiled(holder) == {f"{tenants[1]}/_mail"}
        task = holder.complete_start()
        assert task is not None
        await task
        tree = holder.current.tree
        assert not isinstance(tree.stacks, LazyStacks) and holder.current.version == 1
        assert (tree.files, tree.compiled) == (12, 12)
        assert tree.stacks[f"{tenants[1]}/_mail"] is first  # compiled once, kept
        assert set(tree.signatures) == set(tree.stacks)

    asyncio.run(main())
    status = json.loads((tmp_path / "var" / "status.json").read_text())
    assert status["stacks"] == 3 and status["rule_files"]["compiled"] == 12
    assert status["last_reload"]["ok"] is True


def test_a_transaction_runs_its_stack_as_the_files_were_at_its_rcpt(tmp_path: Path) -> None:
    settings, tenants = tree_of(tmp_path)
    holder = lazy_start(settings)
    handler = ReloadingHandler(holder, Transaction)
    verdict = settings.ops_dir / tenants[0] / "_mail" / "1" / "20-verdict.txcl"

    async def main() -> None:
        envelope = Envelope()
        await rcpt(handler, envelope, f"support@{domain_of(tenants[0])}")
        verdict.write_text(verdict.read_text().replace("queued for", "edited for"))
        assert unrid(await data(handler, envelope)) == [f"250 2.0.0 queued for {tenants[0]}"]
        task = holder.complete_start()
        assert task is not None
        await task
        outcome = await holder.reload("test")  # the edit is seen as one
        assert outcome.ok and holder.current.version == 2
        assert holder.current.tree.compiled == 4
        envelope = Envelope()
        await rcpt(handler, envelope, f"support@{domain_of(tenants[0])}")
        assert unrid(await data(handler, envelope)) == [f"250 2.0.0 edited for {tenants[0]}"]

    asyncio.run(main())


def test_a_broken_stack_gets_451_and_is_reported_once_compiled(tmp_path: Path) -> None:
    settings, tenants = tree_of(tmp_path)
    bad = settings.ops_dir / tenants[2] / "_mail" / "1" / "30-bad.txcl"
    bad.write_text(BAD_CODE)
    backdate(settings.ops_dir)
    holder = lazy_start(settings)
    handler = ReloadingHandler(holder, Transaction)
    assert holder.last.ok  # not known yet: nothing compiled

    async def main() -> None:
        envelope = Envelope()
        await rcpt(handler, envelope, f"support@{domain_of(tenants[2])}")
        await rcpt(handler, envelope, f"support@{domain_of(tenants[0])}")
        replies = await data(handler, envelope)
        assert replies[0].startswith("451 4.3.0") and replies[1].startswith("250")
        assert f"{tenants[2]}/_mail" in holder.current.tree.rejected
        stacks = holder.current.tree.stacks
        assert len(stacks) == 2 and len(list(stacks)) == 2  # the rejected one is out
        task = holder.complete_start()
        assert task is not None
        await task

    asyncio.run(main())
    tree = holder.current.tree
    assert f"{tenants[2]}/_mail" not in tree.stacks and tree.rejected == {f"{tenants[2]}/_mail"}
    assert not holder.last.ok and f"{bad}:1:22" in str(holder.last.problems[0].pos)
    status = json.loads((tmp_path / "var" / "status.json").read_text())
    assert status["last_reload"]["ok"] is False
    assert f"{bad}:1:22" in json.dumps(status["last_reload"]["problems"])


def test_a_reload_asked_for_while_the_start_completes_waits_for_it(tmp_path: Path) -> None:
    settings, tenants = tree_of(tmp_path)
    holder = lazy_start(settings)
    verdict = settings.ops_dir / tenants[1] / "_mail" / "1" / "20-verdict.txcl"
    verdict.write_text(verdict.read_text().replace("queued for", "edited for"))

    async def main() -> None:
        task = holder.complete_start()
        assert task is not None
        outcome = await holder.reload("sighup")  # the start's compile read the edit already
        assert task.done() and outcome.ok and outcome.version == 2

    asyncio.run(main())
    tree = holder.current.tree
    assert tree.compiled == 4  # the edited stack's folder is too recent to take over
    assert tree.files == 12 and len(tree.stacks) == 3


def test_a_lazy_tree_completes_to_what_an_eager_load_finds(tmp_path: Path) -> None:
    from txcl.loader import complete

    settings, tenants = tree_of(tmp_path)
    (settings.ops_dir / tenants[1] / "_mail" / "1" / "30-bad.txcl").write_text(BAD_CODE)
    (settings.ops_dir / "README").write_text("not a tenant\n")
    eager = load_tree(settings.ops_dir)
    lazy = load_tree(settings.ops_dir, lazy=True)
    assert lazy.compiled == 0 and isinstance(lazy.stacks, LazyStacks)
    done = complete(lazy)
    assert [str(p) for p in done.problems] == [str(p) for p in eager.problems]
    assert (set(done.stacks), done.rejected, done.files, done.compiled) == (
        set(eager.stacks), eager.rejected, eager.files, eager.compiled)
    assert done.signatures == eager.signatures
