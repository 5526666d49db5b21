"""The trace writer on its own: CPU per trace for the records a delivery hands over.

    python bench/trace_bench.py                         # this checkout's writer
    PYTHONPATH=/tmp/old python bench/trace_bench.py     # another checkout's, for A/B

Each case builds the envelope the deliverer builds with tracing on (for a checkout whose
writer takes the message bytes: every header field and the bytes by reference; for one
that does not: every field, base64 `raw` included), then times `TraceWriter.write` — what
the writer thread does per trace: scrub, encode, write, retention — with a stack that omits
nothing, and with one that omits the raw message and attachments and redacts a header.
With --stack the result is a real run of bench/lmtp's 14-rule stack (it reads the text
body) under RunPolicy(explain=True), as a server with traces on makes it, so the writer's
work includes explaining it. User CPU is the interpreter's work (what competes with the event loop for the GIL); system
CPU is the file system's (syscalls release the GIL); wall includes the disk. Disk
writes land in a temporary folder of --dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lmtp.message import EVERYTHING, build_envelope, needs_of_rules, parse_message
from lmtp.routing import Route
from txcl.runner import StackResult

try:  # this checkout
    from lmtp.delivery import TRACED_FIELDS as TRACE_NEEDS
    from txcl.trace_writer import TraceWriter
except ImportError:  # a checkout from before the single-file format
    from txcl.trace import TraceWriter  # type: ignore[attr-defined,no-redef]

    TRACE_NEEDS = EVERYTHING

from txcl.trace import ScrubHints, TraceRecord

TAKES_MESSAGE = "message" in {f.name for f in dataclasses.fields(TraceRecord)}
CASES = {"1KiB": (1024, 2000), "100KiB": (100 * 1024, 400), "25MiB": (25 << 20, 4)}
SCRUB = ScrubHints(
    omit=("_txc.lmtp.msg.raw", "_txc.lmtp.msg.attachments"),
    redact=("_txc.lmtp.msg.headers.authorization",),
)


def message(size: int) -> bytes:
    head = (
        b"From: Alice <alice@example.com>\r\nTo: support@acme.example\r\n"
        b"Subject: wifi keeps dropping\r\nMessage-ID: <m1@example.com>\r\n"
        b"Authorization: Bearer sk-live-0123456789\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain\r\n\r\n"
    )
    line = b"The wifi keeps dropping every few minutes since the upgrade.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def bench_stack(into: Path) -> Any:
    """bench/lmtp's stack (BENCH_STACK), loaded from files written under `into`."""
    from importlib.machinery import SourceFileLoader
    from importlib.util import module_from_spec, spec_from_loader

    from txcl.loader import load_target

    loader = SourceFileLoader("bench_lmtp", str(Path(__file__).with_name("lmtp")))
    spec = spec_from_loader("bench_lmtp", loader)
    assert spec is not None
    module = module_from_spec(spec)
    sys.modules["bench_lmtp"] = module  # its dataclasses look their module up
    loader.exec_module(module)
    for rel, text in module.BENCH_STACK.items():
        path = into / "acme" / "_mail" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return load_target(into / "acme" / "_mail").stacks["acme/_mail"]


def record_args(
    data: bytes, stack: Any = None
) -> tuple[dict[str, Any], StackResult, list[tuple[str, str]]]:
    route = Route("acme", "acme/_mail", "domain:acme.example", "acme/_mail/0")
    needs = TRACE_NEEDS
    if stack is not None:  # and what the stack reads, as a server's deliverer asks
        needs = needs | needs_of_rules(stack.rules, {})
    msg, _ = parse_message(data, needs)
    envelope = build_envelope(
        rid="01BENCH", route=route, listener="default", client_ip="127.0.0.1", helo="mx",
        mail_from="alice@example.com", size=len(data), rcpt=["support@acme.example"],
        transaction_rcpt=["support@acme.example"], msg=msg,
    )
    if stack is not None:
        from txcl.runner import RunPolicy

        result = stack.run(envelope, RunPolicy(run_ops=False, explain=True))
        return envelope, result, [("support@acme.example", "250 2.0.0 queued")]
    final = {**envelope, "_txc": {**envelope["_txc"], "lmtp": {
        **envelope["_txc"]["lmtp"], "res": {"code": 250, "msg": "queued"}}}}
    result = StackResult(envelope=final, fired=(), steps=(), elapsed_s=0.001)
    return envelope, result, [("support@acme.example", "250 2.0.0 queued")]


def run_case(
    root: Path, size: int, count: int, hints: ScrubHints, stack: Any = None
) -> tuple[float, float, float]:
    """Mean user CPU, system CPU and wall seconds per trace."""
    data = message(size)
    envelope, result, replies = record_args(data, stack)
    writer = TraceWriter(root, mode="off", keep_count=max(count // 2, 1))  # no thread: timed here
    extra = {"message": data} if TAKES_MESSAGE else {}
    records = [
        TraceRecord(f"01BENCH{i:06d}", time.time(), envelope, result, tuple(replies),
                    "acme/_mail", hints, **extra)
        for i in range(count)
    ]
    before, w0 = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
    for record in records:
        writer.write(record)
    after, wall = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter() - w0
    return (
        (after.ru_utime - before.ru_utime) / count,
        (after.ru_stime - before.ru_stime) / count,
        wall / count,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where the traces are written")
    parser.add_argument("--cases", default=",".join(CASES), help="comma list of cases")
    parser.add_argument("--stack", action="store_true",
                        help="trace real runs of bench/lmtp's stack, explained")
    args = parser.parse_args()
    print(f"writer takes the message bytes: {TAKES_MESSAGE}")
    rules = tempfile.TemporaryDirectory(dir=args.dir)
    stack = bench_stack(Path(rules.name)) if args.stack else None
    for name in args.cases.split(","):
        size, count = CASES[name]
        for label, hints in (("no hints", ScrubHints()), ("omit raw+att, redact", SCRUB)):
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                user, system, wall = run_case(Path(tmp), size, count, hints, stack)
            print(f"{name:>6} x {count:<5} {label:<21} user {user * 1e6:7.0f} us  "
                  f"system {system * 1e6:7.0f} us  wall {wall * 1e6:7.0f} us  per trace")
    rules.cleanup()
    os.sync()


if __name__ == "__main__":
    main()
