"""Limits on clients, through a real `txco serve` (issue 13, item 7): connections in total
and per client address, commands per session, a read timeout that measures whole commands,
and an accept loop at the descriptor limit that neither spins nor floods the log."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Server, txco_argv

ACCEPT = {"acme/_mail/0/accept.txcl": "SET @lmtp.res.code = 250\n"}
CONFIG = "ingress: {lmtp: {verified_domains: {acme.example: {tenant: acme}}}}\n"


def connect(server: Server, timeout: float = 10.0) -> socket.socket:
    assert server.host and server.port
    return socket.create_connection((server.host, server.port), timeout=timeout)


def lines_until_closed(sock: socket.socket) -> list[bytes]:
    """Every reply line the server sends until it closes the connection."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data.splitlines()


@contextlib.contextmanager
def connections(server: Server, count: int) -> Iterator[list[socket.socket]]:
    socks = []
    try:
        for _ in range(count):
            sock = connect(server)
            assert sock.recv(512).startswith(b"220 ")
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def one_more(server: Server) -> bytes:
    """The only line a further connection gets before the server closes it."""
    with connect(server) as extra:
        [line] = lines_until_closed(extra)
    return line


def test_connections_over_the_total_get_421_and_are_closed(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(tmp_path, ACCEPT, CONFIG, "--lmtp-max-connections=3",
                   "--lmtp-hostname=lmtp.test")
    with connections(server, 3):
        assert one_more(server) == b"421 4.7.0 lmtp.test too many connections, try again later"
    # the sessions that closed made room again (once the server has seen them go)
    deadline = time.monotonic() + 10
    while True:
        with connect(server) as again:
            greeting = again.recv(512)
        if greeting.startswith(b"220 ") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert greeting.startswith(b"220 ")


def test_connections_over_the_per_address_cap_get_421(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(tmp_path, ACCEPT, CONFIG, "--lmtp-max-connections-per-ip=2")
    with connections(server, 2):
        assert one_more(server).endswith(b" too many connections from your address, "
                                         b"try again later")
        # a Unix-socket client has no address: only the total counts for it
        with server.lmtp(unix=True) as client:
            assert client.noop()[0] == 250


def test_a_session_that_sends_only_junk_commands_gets_421(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(tmp_path, ACCEPT, CONFIG, "--lmtp-max-commands=50")
    with connect(server) as sock:
        assert sock.recv(512).startswith(b"220 ")
        sock.sendall(b"NOOP\r\nRSET\r\nVRFY x\r\n" * 40)
        lines = lines_until_closed(sock)
    assert lines[:50] == [b"250 2.0.0 OK", b"250 2.0.0 OK",
                          b"252 2.5.0 cannot VRFY, but will take the message and try delivery",
                          ] * 16 + [b"250 2.0.0 OK", b"250 2.0.0 OK"]
    assert lines[50:] == [b"421 4.7.0 " + lines[-1].split()[2] + b" too many commands, closing"]


def test_the_command_count_starts_again_after_each_delivery(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(tmp_path, ACCEPT, CONFIG, "--lmtp-max-commands=8")
    with server.lmtp() as client:
        client.ehlo("c")
        for _ in range(5):  # 5 commands (NOOP, MAIL, RCPT, DATA) per delivery: never 8
            assert client.noop()[0] == 250
            assert client.sendmail("a@example.com", ["x@acme.example"], b"hi\r\n") == {}


def test_a_command_trickled_byte_by_byte_times_out_like_silence(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(tmp_path, ACCEPT, CONFIG, "--lmtp-read-timeout=1s")
    with connect(server) as sock:
        assert sock.recv(512).startswith(b"220 ")
        started = time.monotonic()
        sock.settimeout(0.3)
        received = b""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for byte in b"NOOP " + b"x" * 40:  # one byte every 0.3 s: never a whole line
                sock.sendall(bytes([byte]))
                with contextlib.suppress(TimeoutError):
                    received += sock.recv(512)
                if received:
                    break
        elapsed = time.monotonic() - started
    assert received.startswith(b"421 4.4.2 ") and b"no command within 1s" in received
    assert elapsed < 4


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_accepting_at_the_descriptor_limit_backs_off_and_logs_once_per_interval(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    # (the file watcher has its own trouble without descriptors: not this test's subject)
    server = serve(tmp_path, ACCEPT, CONFIG, "--no-watch")
    pid = server.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (_open_fds(pid) + 4, hard))
    clients = []
    try:
        for _ in range(12):  # more than the server has descriptors for
            clients.append(connect(server))
        server.wait_for_log(r"cannot accept connections")
        cpu_before = _cpu_seconds(pid)
        time.sleep(2.5)
        cpu = _cpu_seconds(pid) - cpu_before
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    lines = [line for line in server.log if "cannot accept" in line]
    assert len(lines) <= 2, lines
    assert not any("Traceback" in line for line in server.log), server.stderr()
    assert cpu < 1.0, f"the accept loop spun: {cpu:.2f}s of CPU in 2.5s"
    # with descriptors back, the waiting clients are served
    for sock in clients:
        sock.settimeout(10)
        assert sock.recv(512).startswith(b"220 ")
        sock.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("flag", ["--lmtp-max-connections=0", "--lmtp-max-commands=x",
                                  "--lmtp-max-connections-per-ip=-1"])
def test_the_limits_must_be_positive_numbers(flag: str, tmp_path: Path) -> None:
    (tmp_path / "OPS").mkdir()
    proc = subprocess.run([*txco_argv(), "serve", "--ops", str(tmp_path / "OPS"),
                           "--personalities=lmtp", flag], capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert proc.returncode == 2
    assert flag.split("=")[0] in proc.stderr
