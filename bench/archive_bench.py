"""op://ARCHIVE on its own: time and peak memory for many small messages and one big one.

    python bench/archive_bench.py                      # the installed txcl.builtin_ops.archive
    python bench/archive_bench.py --module /tmp/old.py # another version of the module, for A/B
    python bench/archive_bench.py --no-fsync           # without the disk: the op's CPU alone
    python bench/archive_bench.py --from-envelope      # decode the envelope's base64 instead

Each case runs in a fresh subprocess, twice: once for time (wall and CPU; the fsyncs are
wall time the CPU figure leaves out) and once under tracemalloc for the peak of what the
op allocates beyond the envelope it was given. ru_maxrss is the whole process's high-water
mark (interpreter and the envelope's own "b64:..." string included). The Maildir lives in
a temporary folder on the disk of --dir (default: the system's temp folder). --no-fsync
makes fsync a no-op in the measured process, leaving the op's own CPU cost.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import importlib.util
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from txcl.ops import OpContext

CASES = {"1KiB x 2000": (1024, 2000), "25MiB x 3": (25 * 2**20 - 4096, 3)}


def load_module(spec: str):
    if spec.endswith(".py"):
        loader = importlib.util.spec_from_file_location("archive_under_test", spec)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def envelope_of(size: int) -> dict:
    # Whole 48-byte lines (64 base64 characters each) after a head of a multiple of 3 bytes,
    # so the "b64:..." string is built with at most two copies of itself alive: the op's
    # own peak, not the building, decides the process's high-water mark.
    head = b"From: a@b.example\r\nSubject: bench\r\n\r\n"
    head += b" " * (-len(head) % 3)
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789\r\n"
    lines = (size - len(head)) // len(line)
    body = base64.b64encode(line).decode() * lines
    raw = "b64:" + base64.b64encode(head).decode() + body
    del body
    return {"_txc": {"src": "lmtp", "lmtp": {"msg": {"raw": raw}}}}


def run_case(
    module_spec: str, size: int, count: int, mode: str, where: str, sync: bool, handed: bool
) -> dict:
    if not sync:
        os.fsync = lambda fd: None  # the op's own CPU cost, without the disk's
    archive = load_module(module_spec).archive
    envelope = envelope_of(size)
    # As the LMTP head calls it: the received bytes handed over beside the envelope.
    message = base64.b64decode(envelope["_txc"]["lmtp"]["msg"]["raw"][4:]) if handed else None

    async def call(ctx: OpContext) -> None:
        result = archive(envelope, {}, ctx)
        if inspect.isawaitable(result):  # ARCHIVE is async now; --module may be older
            await result

    async def measure() -> tuple[float, float, int | None]:
        with tempfile.TemporaryDirectory(dir=where) as state:
            ctx = OpContext("t", "t/s", "r", Path(state), 5.0, "ARCHIVE", **(
                {"message": message} if handed else {}))  # fmt: skip
            await call(ctx)  # the first delivery creates the Maildir: not measured
            if mode == "mem":
                tracemalloc.start()
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(count):
                await call(ctx)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            return wall, cpu, tracemalloc.get_traced_memory()[1] if mode == "mem" else None

    wall, cpu, peak = asyncio.run(measure())
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"wall_s": wall, "cpu_s": cpu, "traced_peak": peak, "maxrss_kib": maxrss_kib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", default="txcl.builtin_ops.archive")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument(
        "--no-fsync", action="store_true", help="fsync as a no-op: the op's CPU cost alone"
    )
    parser.add_argument(
        "--from-envelope",
        action="store_true",
        help="decode the envelope's base64 raw instead of taking the bytes handed over",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        size, count = CASES[args.case]
        sync = not args.no_fsync
        handed = not args.from_envelope
        print(json.dumps(run_case(args.module, size, count, args.mode, args.dir, sync, handed)))
        return
    for case, (size, count) in CASES.items():
        out = {}
        for mode in ("time", "mem"):
            cmd = [sys.executable, __file__, "--module", args.module, "--dir", args.dir]
            cmd += ["--no-fsync"] if args.no_fsync else []
            cmd += ["--from-envelope"] if args.from_envelope else []
            done = subprocess.run(
                [*cmd, "--case", case, "--mode", mode], check=True, capture_output=True, text=True
            )
            out[mode] = json.loads(done.stdout)
        t, m = out["time"], out["mem"]
        rate = (
            f"{size * count / t['wall_s'] / 1e6:.1f} MB/s"
            if size > 2**20
            else (
                f"{t['wall_s'] / count * 1e3:.3f} ms wall, {t['cpu_s'] / count * 1e6:.0f} us CPU per msg"
            )
        )
        print(
            f"{case:12} wall {t['wall_s']:.3f}s cpu {t['cpu_s']:.3f}s ({rate}); "
            f"op peak {m['traced_peak'] / 2**20:.2f} MiB; "
            f"maxrss {t['maxrss_kib'] / 1024:.1f} MiB"
        )
    print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
