"""txcl.chassis: a second head can use it without the LMTP head."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def test_the_chassis_imports_no_head() -> None:
    code = (
        "import sys, txcl.chassis.supervisor, txcl.chassis.reload, txcl.chassis.status, "
        "txcl.chassis.config, txcl.chassis.balance; "
        "print(sorted(m for m in sys.modules if m == 'lmtp' or m.startswith('lmtp.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# A second head, written against txcl.chassis alone: each line a client sends gets one line
# back, from `ingress.echo.greeting` and the serving runtime's version.
ECHO_HEAD = '''
import asyncio
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from txcl.chassis.config import ConfigError
from txcl.chassis.supervisor import ServeOptions, serve


@dataclass(frozen=True)
class Places:
    ops_dir: Path
    config_file: Path
    state_dir: Path


class EchoServer:
    grace_s = 1.0

    def __init__(self, holder, sock):
        self.holder, self.sock, self.bound, self._server = holder, sock, [], None

    async def start(self, *, accept=True):
        sock = self.sock or socket.create_server(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self.answer, sock=sock, start_serving=accept)
        self.bound.append("%s:%d" % sock.getsockname()[:2])

    async def accept_connections(self):
        await self._server.start_serving()

    async def answer(self, reader, writer):
        while await reader.readline():
            runtime = self.holder.current
            writer.write(b"%s v%d\\n" % (runtime.heads["echo"].encode(), runtime.version))
        writer.close()

    async def close(self, grace):
        self._server.close()


class EchoHead:
    name = "echo"

    def build(self, engine):
        greeting = engine.config.section("echo").get("greeting", "hello")
        if not isinstance(greeting, str):
            raise ConfigError(f"{engine.config.name}: ingress.echo.greeting must be text")
        return greeting

    def bind(self):
        return socket.create_server(("127.0.0.1", 0))

    def release(self, bound):
        bound.close()

    def server(self, holder, inherited=None, slot=None):
        return EchoServer(holder, None if inherited is None else inherited.dup())


class Writer:
    def close(self):
        pass


assert not [m for m in sys.modules if m.split(".")[0] == "lmtp"], "the chassis imported lmtp"
root = Path(sys.argv[1])
import logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
sys.exit(serve(ServeOptions(heads=(EchoHead(),), settings=Places(root / "OPS", root / "txco.yaml",
                            root / "var"), open_trace_writer=Writer), workers=int(sys.argv[2])))
'''


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_head_runs_on_the_chassis_alone(tmp_path: Path, workers: int) -> None:
    (tmp_path / "OPS" / "acme" / "_mail" / "0").mkdir(parents=True)
    (tmp_path / "OPS" / "acme" / "_mail" / "0" / "a.txcl").write_text("SET ticket.n = 1\n")
    config = tmp_path / "txco.yaml"
    config.write_text("ingress: {echo: {greeting: hi}}\n")
    (tmp_path / "echo_head.py").write_text(ECHO_HEAD)
    log = tmp_path / "echo.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, str(tmp_path / "echo_head.py"), str(tmp_path),
                                 str(workers)], stderr=sink, stdin=subprocess.DEVNULL)
    try:
        listening = _wait_for(log, r"echo listening on 127\.0\.0\.1:(\d+)", proc)
        port = int(listening.group(1))
        assert _ask(port) == b"hi v1\n"
        config.write_text("ingress: {echo: {greeting: 5}}\n")  # refused: v1 keeps serving
        proc.send_signal(signal.SIGHUP)
        _wait_for(log, r"ingress\.echo\.greeting must be text", proc)
        assert _ask(port) == b"hi v1\n"
        config.write_text("ingress: {echo: {greeting: hey}}\n")
        proc.send_signal(signal.SIGHUP)
        _wait_for(log, r"now serving version 2", proc)
        if workers == 2:
            _wait_for(log, r"now serving version 2[\s\S]*now serving version 2", proc)
        assert _ask(port) == b"hey v2\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert log.read_text().count("echo stopped") == workers
    assert "Traceback" not in log.read_text()


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen[bytes]) -> re.Match[str]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text())
        if found:
            return found
        assert proc.poll() is None, log.read_text()
        time.sleep(0.02)
    raise AssertionError(f"no {pattern!r} in:\n{log.read_text()}")


def _ask(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"ping\n")
        return conn.makefile("rb").readline()


def test_counters_are_summed_over_workers_that_each_count_in_their_own_row() -> None:
    import os

    from txcl.chassis.status import Counters

    counters = Counters()
    refused = counters.counter("rcpt_refused", "no_route")
    assert counters.counter("rcpt_refused", "no_route") == refused  # registered once
    other = counters.counter("rcpt_refused", "syntax")
    counters.add(refused)
    assert counters.snapshot() == {"rcpt_refused": {"no_route": 1, "syntax": 0}}
    counters.share(3)  # the parent of --workers, before forking
    pids = []
    for row in (1, 2):
        pid = os.fork()
        if pid == 0:  # a worker: counts in its own row, seen by every process
            counters.use_row(row)
            counters.add(refused, row)
            counters.add(other)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    assert counters.snapshot() == {"rcpt_refused": {"no_route": 3, "syntax": 2}}
