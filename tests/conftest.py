"""Shared fixtures: a real `txco serve` subprocess on a free port and a Unix socket.

    def test_x(serve, tmp_path):
        server = serve(tmp_path, {"acme/_mail/0/accept.txcl": 'SET @lmtp.res.code = 250\\n'},
                       "ingress: {lmtp: {verified_domains: {acme.example: {tenant: acme}}}}\\n",
                       "--lmtp-max-recipients=3")
        with server.lmtp() as client: ...          # smtplib.LMTP over TCP
        with server.lmtp(unix=True) as client: ...  # ... or over the Unix socket
        assert server.stop() == 0                   # SIGTERM; the exit code

`ops_tree` is a {relative path: text} mapping written under `<tmp_path>/OPS`, or the path of
an existing OPS folder. Extra flags are passed through; give your own `--lmtp-listen-addrs`
or `--personalities` to replace the fixture's. Every server still running at the end of
the test is stopped.

Tests that run other programs say so with `@pytest.mark.needs("swaks")` (see TOOLS): on a
machine without the program they are skipped with a one-line reason, except under CI
(`CI=true`, as `.ci/run` runs), where a missing program fails the test: CI installs them
all, so there nothing skips silently.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# --- the request id in reply texts ----------------------------------------------------------

# A recipient's reply after DATA ends with " (rid <ULID>)" (--lmtp-reply-rid, on by default).
RID_SUFFIX = re.compile(r" \(rid ([0-9A-HJKMNP-TV-Z]{26})\)\Z")

Reply = str | bytes | tuple[int, bytes] | tuple[int, str]


def rid_of(reply: Reply) -> str:
    """The request id a reply line (or smtplib's (code, text)) ends with; fails if none."""
    text = reply[1] if isinstance(reply, tuple) else reply
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    found = RID_SUFFIX.search(text)
    assert found, f"no (rid ...) at the end of {reply!r}"
    return found.group(1)


def unrid(reply: Any) -> Any:
    """The reply (a line, smtplib's (code, text), or a list of either) without the request
    id it must end with: what the rules decided, for comparing with an expected text."""
    if isinstance(reply, list):
        return [unrid(r) for r in reply]
    rid_of(reply)
    if isinstance(reply, tuple):
        return (reply[0], unrid(reply[1]))
    if isinstance(reply, bytes):
        return RID_SUFFIX.sub("", reply.decode("utf-8", "surrogateescape")).encode(
            "utf-8", "surrogateescape")
    return RID_SUFFIX.sub("", reply)


# --- tests that need other programs ---------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    programs: tuple[str, ...]
    package: str  # the Debian package that installs them
    needs_root: bool = False


TOOLS: dict[str, Tool] = {
    "swaks": Tool(("swaks",), "swaks"),
    # A private Postfix instance (tests/postfix.py) is started with `postfix -c DIR start`.
    "postfix": Tool(("postfix", "postqueue"), "postfix", needs_root=True),
    "smtp-source": Tool(("smtp-source",), "postfix"),
    "dovecot": Tool(("dovecot",), "dovecot-lmtpd"),
}
# Where Debian puts Postfix's and Dovecot's programs, which a user's PATH often lacks.
_SYSTEM_PATH = os.pathsep.join(("/usr/local/sbin", "/usr/sbin", "/sbin"))


def tool_problem(name: str, *, path: str | None = None, euid: int | None = None) -> str | None:
    """Why the tool `name` cannot be used here (one line), or None when it can."""
    tool = TOOLS[name]
    search = os.pathsep.join(filter(None, (os.environ.get("PATH", "") if path is None else path,
                                           _SYSTEM_PATH)))
    missing = [p for p in tool.programs if shutil.which(p, path=search) is None]
    if missing:
        return f"needs {' and '.join(missing)} (apt-get install {tool.package})"
    if tool.needs_root and (os.geteuid() if euid is None else euid) != 0:
        return f"needs root to run {name}"
    return None


def check_tools(names: tuple[str, ...], *, ci: bool, path: str | None = None,
                euid: int | None = None) -> None:
    """Skip the running test when a tool it needs is missing; fail it instead under CI."""
    unknown = [name for name in names if name not in TOOLS]
    if unknown:
        pytest.fail(f"@pytest.mark.needs: unknown tool(s) {unknown}; known: {sorted(TOOLS)}",
                    pytrace=False)
    problems = [p for name in names if (p := tool_problem(name, path=path, euid=euid))]
    if not problems:
        return
    reason = "; ".join(problems)
    if ci:
        pytest.fail(f"CI=true, so nothing may skip: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        check_tools(tuple(mark.args), ci=os.environ.get("CI", "").lower() == "true")


# --- a real `txco serve` ------------------------------------------------------------------------

START_TIMEOUT_S = 20.0
_LISTENING = re.compile(r"lmtp listening on (.*)$")


@dataclass
class Server:
    """A running `txco serve`. `log` collects its stderr lines as they come."""

    host: str | None
    port: int | None
    unix_path: str | None
    state_dir: Path
    proc: subprocess.Popen
    log: list[str] = field(default_factory=list)

    def lmtp(self, *, unix: bool = False, timeout: float = 10.0) -> smtplib.LMTP:
        """A connected smtplib.LMTP client (greeting read)."""
        if unix:
            assert self.unix_path, "this server has no Unix socket"
            return smtplib.LMTP(self.unix_path, timeout=timeout)
        assert self.host and self.port, "this server has no TCP listener"
        return smtplib.LMTP(self.host, self.port, timeout=timeout)

    def stderr(self) -> str:
        return "\n".join(self.log)

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> str:
        """The first stderr line matching `pattern` (a regex), waiting for it to appear."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.log):
                if regex.search(line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r}; stderr:\n{self.stderr()}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the server and wait for it; its exit code (killed after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"txco serve ignored signal {signum}:\n{self.stderr()}") from None
        return self.proc.returncode


def txco_argv() -> list[str]:
    """How to run `txco` with this interpreter (works without the console script too)."""
    return [sys.executable, "-m", "lmtp.cli"]


def _write_ops(root: Path, tree: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for relative, text in tree.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _socket_path(tmp_path: Path) -> str:
    path = tmp_path / "lmtp.sock"
    if len(str(path)) < 100:
        return str(path)
    return os.path.join(tempfile.mkdtemp(prefix="txco-"), "lmtp.sock")


def _parse_bound(text: str) -> tuple[str | None, int | None, str | None]:
    host = port = unix = None
    for item in text.split(", "):
        if item.startswith("unix:"):
            unix = unix or item[len("unix:"):]
        elif host is None:
            h, _, p = item.rpartition(":")
            host, port = h.strip("[]"), int(p)
    return host, port, unix


def start_server(tmp_path: Path, ops_tree: dict[str, str] | Path | str, config_yaml: str = "",
                 *extra_flags: str) -> Server:
    """Start `txco serve` and return once it has listened and sent its greeting."""
    ops = Path(ops_tree) if isinstance(ops_tree, str | Path) else _write_ops(
        tmp_path / "OPS", ops_tree)
    state_dir = tmp_path / "var"
    argv = [*txco_argv(), "serve", "--ops", str(ops), "--state-dir", str(state_dir)]
    if not any(f.startswith("--personalities") for f in extra_flags):
        argv.append("--personalities=lmtp")
    if not any(f.startswith("--lmtp-listen-addrs") for f in extra_flags):
        argv.append(f"--lmtp-listen-addrs=127.0.0.1:0,unix:{_socket_path(tmp_path)}")
    if config_yaml:
        config = tmp_path / "txco.yaml"
        config.write_text(config_yaml)
        argv += ["--config", str(config)]
    argv += extra_flags
    proc = subprocess.Popen(argv, cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server = Server(None, None, None, state_dir, proc)
    ready = threading.Event()

    def collect() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.rstrip("\n")
            server.log.append(line)
            match = _LISTENING.search(line)
            if match and not ready.is_set():
                server.host, server.port, server.unix_path = _parse_bound(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=collect, daemon=True).start()
    if not ready.wait(START_TIMEOUT_S) or server.host is None and server.unix_path is None:
        server.stop()
        raise RuntimeError(f"txco serve did not start (exit {proc.poll()}):\n{server.stderr()}")
    _wait_for_greeting(server)
    if any("found version 1" in line for line in list(server.log)):  # it listens, then compiles:
        server.wait_for_log("compiled version 1", START_TIMEOUT_S)  # an edit now is a reload's
    return server


def _wait_for_greeting(server: Server) -> None:
    if server.host is not None:
        sock = socket.create_connection((server.host, server.port), timeout=START_TIMEOUT_S)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(START_TIMEOUT_S)
        sock.connect(server.unix_path)
    with sock:
        greeting = sock.recv(512)
    if not greeting.startswith(b"220 "):
        raise RuntimeError(f"unexpected greeting {greeting!r}:\n{server.stderr()}")


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    """A factory: `serve(tmp_path, ops_tree, config_yaml="", *extra_flags) -> Server`."""
    started: list[Server] = []

    def start(tmp_path: Path, ops_tree: dict[str, str] | Path | str, config_yaml: str = "",
              *extra_flags: str) -> Server:
        server = start_server(tmp_path, ops_tree, config_yaml, *extra_flags)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(autouse=True)
def _private_compile_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`txcl lint` and `txcl test` cache under $XDG_CACHE_HOME: the session's, not the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
