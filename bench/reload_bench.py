"""Reload of a large OPS tree: the time to compile it aside, and what deliveries feel meanwhile.

    python bench/reload_bench.py [--files 1000] [--reloads 5] [--clients 2] [--baseline 3]

1. Generates an OPS tree of `--files` rule files (tenants x stacks x files, every rule with
   a regex WHEN, a SET from a named group and an omit hint), plus the stack deliveries go to.
2. Compiles it in-process the way a reload does (`txcl.chassis.runtime.build_runtime`): min/median/max.
3. Starts a real `txco serve` on it, keeps `--clients` LMTP connections delivering in a loop,
   measures each delivery's latency (MAIL to the last reply) for `--baseline` seconds, then
   sends SIGHUP `--reloads` times, waiting for each "now serving version N" log line.
   Prints latency percentiles for deliveries started while no reload ran and for those
   started during a reload, and how long each reload took.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmtp.config import Settings  # noqa: E402
from lmtp.personality import LmtpPersonality  # noqa: E402
from txcl.chassis.runtime import build_runtime  # noqa: E402

CONFIG = "ingress:\n  lmtp:\n    verified_domains:\n      acme.example: {tenant: acme}\n"
ACCEPT = 'SET @lmtp.res.code = 250\nSET @lmtp.res.msg = "ok"\n'
MESSAGE = (
    b"From: Alice <alice@example.com>\r\nTo: support@acme.example\r\n"
    b"Subject: ticket 42 wifi keeps dropping\r\n\r\nHi support\r\n"
)


def rule_text(i: int) -> str:
    return (
        f"# generated rule {i}\n"
        f"WHEN @lmtp.msg.subject =~ /ticket[ -]#?{i} (?P<num>[0-9]+)/i\n"
        f"WHEN @lmtp.rcpt.0 =~ /^support[+]{i}@/\n"
        f'WITH omit = "_txc.lmtp.msg.raw"\n'
        f"SET ticket.n{i} = match.num\n"
        f"SET @lmtp.res.recipients.0.code = 250\n"
    )


def generate(root: Path, files: int) -> None:
    """`files` rule files: the routed acme/_mail stack plus tenants of 5 stacks x 10 files."""
    accept = root / "acme" / "_mail" / "0"
    accept.mkdir(parents=True)
    (accept / "10-accept.txcl").write_text(ACCEPT)
    for i in range(files - 1):
        tenant, rest = divmod(i, 50)
        stack, number = divmod(rest, 10)
        folder = root / f"t{tenant:03d}" / f"s{stack}" / str(number % 2)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{number:02d}-rule.txcl").write_text(rule_text(i))


def compile_times(settings: Settings, runs: int) -> list[float]:
    times = []
    for version in range(runs):
        started = time.perf_counter()
        runtime = build_runtime(settings, version + 1, [LmtpPersonality(settings)])
        times.append(time.perf_counter() - started)
    stacks = len(runtime.tree.stacks)
    print(f"compiled tree: {runtime.tree.files} files, {stacks} stacks")
    return times


class Server:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.address: tuple[str, int] | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            match = re.search(r"lmtp listening on (\S+?):(\d+)", line)
            if match and not self.ready.is_set():
                self.address = (match.group(1), int(match.group(2)))
                self.ready.set()
        self.ready.set()

    def wait_for(self, pattern: str, start: int, timeout: float = 120.0) -> tuple[str, int]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index in range(start, len(self.lines)):
                if regex.search(self.lines[index]):
                    return self.lines[index], index
            time.sleep(0.002)
        raise SystemExit(f"no log line {pattern!r}:\n" + "\n".join(self.lines[-20:]))


def client_loop(
    address: tuple[str, int], stop: threading.Event, samples: list[tuple[float, float]]
) -> None:
    client = smtplib.LMTP(*address, timeout=30)
    client.ehlo_or_helo_if_needed()
    while not stop.is_set():
        started = time.monotonic()
        client.mail("alice@example.com")
        client.rcpt("support@acme.example")
        code, _ = client.data(MESSAGE)
        samples.append((started, time.monotonic() - started))
        if code != 250:
            raise SystemExit(f"delivery answered {code}")
    client.quit()


def describe(name: str, latencies: list[float]) -> None:
    if not latencies:
        print(f"{name:<28} no deliveries")
        return
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(
        f"{name:<28} n={len(ordered):<6} p50={1000 * statistics.median(ordered):7.2f}ms  "
        f"p99={1000 * p99:7.2f}ms  max={1000 * ordered[-1]:7.2f}ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--reloads", type=int, default=5)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--baseline", type=float, default=3.0, help="seconds without reloads")
    parser.add_argument("--compile-runs", type=int, default=3)
    parser.add_argument("--trace", default="all", choices=("all", "errors", "off"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="txco-reload-bench-"))
    try:
        ops = work / "OPS"
        generate(ops, args.files)
        (work / "txco.yaml").write_text(CONFIG)
        settings = Settings(ops_dir=ops, config_file=work / "txco.yaml", state_dir=work / "var")
        times = compile_times(settings, args.compile_runs)
        print(
            f"compile aside (in-process)   min={min(times):.3f}s  "
            f"median={statistics.median(times):.3f}s  max={max(times):.3f}s"
        )

        server = Server(
            [
                sys.executable,
                "-m",
                "lmtp.cli",
                "serve",
                "--personalities=lmtp",
                "--lmtp-listen-addrs=127.0.0.1:0",
                "--ops",
                str(ops),
                "--config",
                str(work / "txco.yaml"),
                "--state-dir",
                str(work / "var"),
                f"--trace={args.trace}",
                "--no-watch",
            ]
        )
        if not server.ready.wait(120) or server.address is None:
            raise SystemExit("txco serve did not start:\n" + "\n".join(server.lines))
        stop = threading.Event()
        samples: list[tuple[float, float]] = []
        clients = [
            threading.Thread(target=client_loop, args=(server.address, stop, samples))
            for _ in range(args.clients)
        ]
        for thread in clients:
            thread.start()
        time.sleep(args.baseline)
        windows: list[tuple[float, float]] = []
        built: list[float] = []
        mark = len(server.lines)
        for number in range(args.reloads):
            started = time.monotonic()
            server.proc.send_signal(signal.SIGHUP)
            line, mark = server.wait_for(rf"now serving version {number + 2}\b", mark)
            windows.append((started, time.monotonic()))
            built.append(float(re.search(r"built in ([0-9.]+)s", line).group(1)))
            time.sleep(0.5)
        stop.set()
        for thread in clients:
            thread.join()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(30)

        during = [lat for t, lat in samples if any(a <= t <= b for a, b in windows)]
        # deliveries started before a reload began but still running when it started count
        # as affected too: they share the process with the compile
        overlapped = [lat for t, lat in samples if any(t < a <= t + lat for a, _ in windows)]
        quiet = [lat for t, lat in samples if not any(a - lat <= t <= b for a, b in windows)]
        print(
            "reload wall time (SIGHUP to swap): " + ", ".join(f"{b - a:.3f}s" for a, b in windows)
        )
        print("reload build time (server log):    " + ", ".join(f"{x:.3f}s" for x in built))
        describe("deliveries, no reload", quiet)
        describe("deliveries started in reload", during)
        describe("deliveries a reload began in", overlapped)
        print(
            f"files={args.files} clients={args.clients} trace={args.trace} "
            f"cpus={os.cpu_count()} python={sys.version.split()[0]}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
