"""Faults in ops, through a real `txco serve`: an op cannot end the server, starve other
tenants, or multiply its side effects on a retry."""

from __future__ import annotations

import concurrent.futures
import json
import os
import smtplib
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Server

pytestmark = pytest.mark.abuse

CONFIG = textwrap.dedent("""\
    ingress:
      lmtp:
        verified_domains:
          acme.example: {tenant: acme, stack: acme/_mail}
          slow.example: {tenant: slow, stack: slow/_mail}
    ops:
    """)

FAULTY_OPS = textwrap.dedent("""\
    import asyncio
    import time


    def exit_sync(envelope, args, ctx):
        raise SystemExit(3)


    async def interrupt_async(envelope, args, ctx):
        raise KeyboardInterrupt


    def interrupt_sync(envelope, args, ctx):
        raise KeyboardInterrupt


    async def exit_async(envelope, args, ctx):
        raise SystemExit("bye")


    def ok(envelope, args, ctx):
        return {"ok": True}


    def sleep(envelope, args, ctx):
        time.sleep(float(args.get("seconds", 3600)))
        return {}


    def fail(envelope, args, ctx):
        raise RuntimeError(args.get("message", "failed"))


    def full_while_flagged(envelope, args, ctx):
        import os
        if os.path.exists(args["flag"]):
            raise OSError(28, "No space left on device")
        return {}
    """)

OP_NAMES = (
    "exit_sync", "interrupt_async", "interrupt_sync", "exit_async", "ok", "sleep", "fail",
    "full_while_flagged",
)
MESSAGE = "From: a@x.example\r\nSubject: hi\r\n\r\nbody\r\n"


def config(*, extra: str = "") -> str:
    ops = "".join(
        f'  {name.upper()}: {{python: "faulty_ops:{name}", path: "ops"}}\n' for name in OP_NAMES
    )
    return CONFIG + ops + extra


def accept_after(op: str, *withs: str) -> str:
    lines = "".join(f"WITH {w}\n" for w in withs)
    return f'EXEC "op://{op}"\n{lines}SET @lmtp.res.code = 250\n'


def write_ops(tmp_path: Path) -> None:
    (tmp_path / "ops").mkdir(exist_ok=True)
    (tmp_path / "ops" / "faulty_ops.py").write_text(FAULTY_OPS)


def deliver(server: Server, rcpt: str, message: str = MESSAGE) -> tuple[int, str]:
    """The one recipient's reply (code, text)."""
    with server.lmtp() as client:
        client.ehlo("test.example")
        try:
            client.sendmail("a@x.example", [rcpt], message)
        except smtplib.SMTPRecipientsRefused as refused:
            code, text = refused.recipients[rcpt]
            return code, text.decode()
        except smtplib.SMTPDataError as err:
            return err.smtp_code, err.smtp_error.decode()
    return 250, ""


@pytest.mark.parametrize("op", ["EXIT_SYNC", "INTERRUPT_ASYNC", "INTERRUPT_SYNC", "EXIT_ASYNC"])
def test_an_op_raising_a_base_exception_gets_451_and_the_server_keeps_serving(
    serve, tmp_path: Path, op: str
) -> None:
    write_ops(tmp_path)
    server = serve(
        tmp_path,
        {"acme/_mail/0/all.txcl": accept_after(op)},
        config(),
    )
    code, text = deliver(server, "x@acme.example")
    assert code == 451, text
    server.wait_for_log(rf"op {op} failed: (SystemExit|KeyboardInterrupt)")
    code, text = deliver(server, "y@acme.example")
    assert code == 451, text
    assert server.proc.poll() is None
    assert server.stop() == 0


def test_a_tenant_whose_ops_never_return_cannot_starve_another_tenants_ops(
    serve, tmp_path: Path
) -> None:
    write_ops(tmp_path)
    server = serve(
        tmp_path,
        {
            "slow/_mail/0/all.txcl": accept_after("SLEEP", 'timeout = "3600s"'),
            "acme/_mail/0/all.txcl": accept_after("OK"),
        },
        config(),
        "--lmtp-resp-timeout=2s",
        "--op-calls-per-tenant=3",
    )
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        slow = [pool.submit(deliver, server, f"u{i}@slow.example") for i in range(10)]
        # Past its budget, the slow tenant's own deliveries wait for a place, within their
        # deadline: the hour-long WITH timeout is capped by --lmtp-resp-timeout.
        refused = next(concurrent.futures.as_completed(slow, timeout=30)).result()
        assert refused[0] == 451 and time.monotonic() - started < 3.5, refused
        for i in range(3):
            before = time.monotonic()
            assert deliver(server, f"x{i}@acme.example") == (250, "")
            assert time.monotonic() - before < 3.0
        # The WITH timeout of an hour is capped by --lmtp-resp-timeout.
        codes = [f.result(timeout=30)[0] for f in slow]
    assert codes == [451] * 10
    assert time.monotonic() - started < 20
    assert deliver(server, "y@acme.example") == (250, "")


def maildir_files(server: Server, tenant: str = "acme") -> list[Path]:
    new = server.state_dir / "tenants" / tenant / "_mail" / "Maildir" / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def test_a_retry_after_a_later_op_failed_does_not_archive_again(serve, tmp_path: Path) -> None:
    write_ops(tmp_path)
    rules = 'EXEC "op://ARCHIVE"\nEXEC "op://EMIT"\nEXEC "op://FAIL"\nSET @lmtp.res.code = 250\n'
    server = serve(tmp_path, {"acme/_mail/0/all.txcl": rules}, config())
    for _ in range(3):
        assert deliver(server, "x@acme.example")[0] == 451
    assert len(maildir_files(server)) == 1
    events = server.state_dir / "tenants" / "acme" / "_mail" / "events.jsonl"
    assert len(events.read_bytes().splitlines()) == 1
    # Another message, or the same one to other recipients, is another delivery.
    assert deliver(server, "y@acme.example")[0] == 451
    assert deliver(server, "x@acme.example", MESSAGE + "more\r\n")[0] == 451
    assert len(maildir_files(server)) == 3


def test_with_the_disk_full_after_archive_accepted_deliveries_leave_one_file_each(
    serve, tmp_path: Path
) -> None:
    write_ops(tmp_path)
    flag = tmp_path / "disk-full"
    rules = (
        'EXEC "op://ARCHIVE"\n'
        f'EXEC "op://FULL_WHILE_FLAGGED"\nWITH flag = "{flag}"\n'
        "SET @lmtp.res.code = 250\n"
    )
    server = serve(tmp_path, {"acme/_mail/0/all.txcl": rules}, config())
    messages = [MESSAGE + f"number {i}\r\n" for i in range(2)]
    flag.touch()
    assert [deliver(server, "x@acme.example", m)[0] for m in messages] == [451, 451]
    flag.unlink()
    assert [deliver(server, "x@acme.example", m)[0] for m in messages] == [250, 250]
    stored = sorted(p.read_bytes() for p in maildir_files(server))
    assert len(stored) == 2
    assert [b"number 0" in stored[0], b"number 1" in stored[1]] == [True, True]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (root only: skipped elsewhere, failed under CI, which runs as root)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode != 0:
        reason = f"cannot mount a tmpfs: {made.stderr.decode().strip()}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true, so nothing may skip: {reason}", pytrace=False)
        pytest.skip(reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_emit_on_a_full_disk_leaves_only_whole_json_lines(tiny_disk: Path) -> None:
    from txcl.builtin_ops.emit import emit
    from txcl.ops import OpContext

    ctx = OpContext(tenant="acme", stack="acme/_mail", rid="01R", state_dir=tiny_disk,
                    deadline_s=5.0)
    envelope = {"_txc": {"src": "lmtp", "lmtp": {"msg": {"subject": "x"}}}, "pad": "y" * 5000}
    ok = failed = 0
    for i in range(120):
        envelope["n"] = i
        try:
            emit(envelope, {}, ctx)
            ok += 1
        except OSError:
            failed += 1
    assert ok and failed
    lines = (tiny_disk / "tenants" / "acme" / "_mail" / "events.jsonl").read_bytes()
    assert lines.endswith(b"\n")
    assert [json.loads(line)["n"] for line in lines.splitlines()] == list(range(ok))


def test_an_op_error_with_crlf_cannot_forge_a_log_line_and_repeats_are_held_back(
    serve, tmp_path: Path
) -> None:
    write_ops(tmp_path)
    forged = "boom\\r\\n2026-01-01 00:00:00,000 txco INFO lmtp delivery replies=250 FORGED\\u001b[2J"
    rules = accept_after("FAIL", f'message = "{forged}"')
    server = serve(
        tmp_path, {"acme/_mail/0/all.txcl": rules}, config(), "--log-repeat-interval=1h"
    )
    for i in range(3):
        assert deliver(server, f"x{i}@acme.example")[0] == 451
    deliver_lines = lambda: [line for line in server.log if "lmtp delivery client" in line]  # noqa: E731
    deadline = time.monotonic() + 10
    while len(deliver_lines()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    errors = [line for line in server.log if "op FAIL failed" in line]
    assert len(errors) == 1, server.stderr()
    assert "boom\\x0d\\x0a2026-01-01" in errors[0] and "\\x1b[2J" in errors[0]
    assert not [line for line in server.log if line.startswith("2026-01-01")]
    assert not [line for line in server.log if "\x1b" in line or "\r" in line]

