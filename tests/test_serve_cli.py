"""`txco serve`, `txco route` and `txco hostnames` as an operator runs them: a real process,
real rules, real clients (smtplib.LMTP over TCP and a Unix socket, and swaks)."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Server, txco_argv, unrid

OPS = {
    "acme/_mail/0/accept.txcl": 'SET @lmtp.res.code = 250\nSET @lmtp.res.msg = "queued"\n',
    "beta/_mail/0/reject.txcl": 'SET @lmtp.res.code = 550\nSET @lmtp.res.msg = "no such user"\n',
}
CONFIG = """
ingress:
  lmtp:
    verified_domains:
      acme.example: {tenant: acme}
      beta.example: {tenant: beta}
      gamma.example: {tenant: gamma}
"""
MESSAGE = b"From: alice@example.com\r\nSubject: hello\r\n\r\n.a dotted line\r\nbye\r\n"


def run_txco(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*txco_argv(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def deliver(client: smtplib.LMTP, rcpts: list[str], body: bytes = MESSAGE, *, ran: bool = True
            ) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    """(RCPT replies, DATA replies): one DATA reply per accepted RCPT, each without the
    request id it ends with (`ran=False`: replies as they came, for deliveries that no
    stack answered)."""
    client.ehlo("client.example")
    assert client.mail("alice@example.com")[0] == 250
    rcpt_replies = [client.rcpt(r) for r in rcpts]
    accepted = sum(1 for code, _ in rcpt_replies if code == 250)
    data_replies = [client.data(body)] + [client.getreply() for _ in range(accepted - 1)]
    return rcpt_replies, unrid(data_replies) if ran else data_replies


def test_each_recipient_gets_its_own_verdict_over_tcp_and_unix_socket(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(tmp_path, OPS, CONFIG)
    rcpts = ["support@acme.example", "bob@beta.example", "who@nowhere.example",
             "carol@gamma.example", "dave@acme.example"]
    for unix in (False, True):
        with server.lmtp(unix=unix) as client:
            rcpt_replies, data_replies = deliver(client, rcpts)
        assert rcpt_replies[2] == (550, b"5.1.1 no rule accepted this recipient")
        assert [code for code, _ in data_replies] == [250, 550, 550, 250]
        assert data_replies[0][1].endswith(b"queued")
        assert data_replies[1][1].endswith(b"no such user")
        assert data_replies[2] == (550, b"5.1.1 no rule accepted this recipient")
    server.wait_for_log(r"lmtp delivery client=unix rcpts=4 size=\d+ replies=250,550,550,250")
    server.wait_for_log(r"lmtp group rid=\w+ stack=acme/_mail ingress=domain:acme.example "
                        r"from=<alice@example.com> rcpts=2 codes=250,250")
    assert len([line for line in server.log if "lmtp delivery " in line]) == 2


@pytest.mark.needs("swaks")
def test_swaks_delivers_over_lmtp(serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(tmp_path, OPS, CONFIG)
    result = subprocess.run(
        ["swaks", "--protocol", "LMTP", "--server", f"{server.host}:{server.port}",
         "--from", "alice@example.com", "--to", "support@acme.example,bob@beta.example",
         "--header", "Subject: wifi keeps dropping", "--body", ".test\n..two dots"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    replies = [line for line in result.stdout.splitlines() if line.startswith("<")]
    assert any("250 2.0.0 queued" in line for line in replies), result.stdout
    assert any("550 5." in line and "no such user" in line for line in replies), result.stdout


def test_flags_set_the_limits_and_timeouts(serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(tmp_path, OPS, CONFIG, "--lmtp-max-recipients=2", "--lmtp-max-msg-bytes=200",
                   "--lmtp-read-timeout=400ms", "--lmtp-hostname=mx.test.example")
    with server.lmtp() as client:
        assert client.ehlo("c")[1].splitlines()[-1] == b"SIZE 200"
        client.mail("alice@example.com")
        assert client.rcpt("a@acme.example")[0] == 250
        assert client.rcpt("b@acme.example")[0] == 250
        assert client.rcpt("c@acme.example") == (452, b"4.5.3 too many recipients")
        assert [client.data(b"x" * 300 + b"\r\n"), client.getreply()] == [
            (552, b"5.3.4 message too large")] * 2
    sock = socket.create_connection((server.host, server.port), timeout=5)
    with sock:
        data = b""
        while data.count(b"\r\n") < 2:
            chunk = sock.recv(512)
            if not chunk:
                break
            data += chunk
    assert data == (b"220 mx.test.example LMTP txco ready\r\n"
                    b"421 4.4.2 mx.test.example no command within 0.4s, closing\r\n")


def test_sigterm_stops_cleanly_and_removes_the_socket(serve: Callable[..., Server],
                                                      tmp_path: Path) -> None:
    server = serve(tmp_path, OPS, CONFIG)
    assert server.unix_path and Path(server.unix_path).is_socket()
    assert server.stop(signal.SIGTERM) == 0
    assert not Path(server.unix_path).exists()
    assert "lmtp stopped" in server.stderr()
    assert "Traceback" not in server.stderr()


def test_sigint_stops_cleanly_too(serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(tmp_path, OPS, CONFIG)
    assert server.stop(signal.SIGINT) == 0
    assert "Traceback" not in server.stderr()


def test_a_second_server_does_not_steal_a_live_socket(serve: Callable[..., Server],
                                                     tmp_path: Path) -> None:
    first = serve(tmp_path, OPS, CONFIG)
    second = tmp_path / "second"
    second.mkdir()
    (second / "OPS").mkdir()
    result = run_txco("serve", "--personalities=lmtp", f"--lmtp-listen-addrs=unix:{first.unix_path}",
                      "--ops", "OPS", cwd=second)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"txco: error: cannot listen on unix:{first.unix_path}: another server is listening there")
    with first.lmtp(unix=True) as client:
        assert client.noop()[0] == 250


def test_a_stale_socket_from_a_crash_is_replaced(serve: Callable[..., Server],
                                                 tmp_path: Path) -> None:
    first = serve(tmp_path, OPS, CONFIG)
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert Path(first.unix_path).is_socket()  # left behind
    again = tmp_path / "again"
    again.mkdir()
    restarted = serve(again, OPS, CONFIG, "--personalities=lmtp",
                      f"--lmtp-listen-addrs=unix:{first.unix_path}")
    with restarted.lmtp(unix=True) as client:
        _, data_replies = deliver(client, ["a@acme.example"])
    assert data_replies[0][0] == 250


@pytest.mark.parametrize(("args", "message"), [
    pytest.param(["--personalities=cron,tcp"],
                 "txco: warning: personalities not in this build, skipped: cron, tcp\n"
                 "txco: error: nothing to run: add lmtp to --personalities "
                 "(e.g. --personalities=lmtp)", id="no runnable personality"),
    pytest.param([], "txco: warning: personalities not in this build, skipped: cron, tcp, web, "
                 "admin\ntxco: error: nothing to run: add lmtp to --personalities "
                 "(e.g. --personalities=lmtp)", id="the seed's default"),
    pytest.param(["--personalities=lmtp", "--lmtp-listen-addrs="],
                 "txco: error: nothing to run: the lmtp head is disabled (--lmtp-listen-addrs is "
                 "empty) and no other personality runs", id="head disabled"),
    pytest.param(["--personalities=lmtp", "--lmtp-data-timeout=soon"],
                 "txco: error: --lmtp-data-timeout: 'soon' is not a duration "
                 "(examples: 30s, 500ms, 2m)", id="bad duration"),
    pytest.param(["--personalities=lmtp", "--lmtp-listen-addrs=localhost"],
                 "txco: error: --lmtp-listen-addrs: 'localhost' has no port (use :port, "
                 "host:port, [::1]:port or unix:/path)", id="bad address"),
    pytest.param(["--personalities=lmtp", "--ops", "nowhere"],
                 "txco: error: --ops nowhere: no such directory", id="no OPS"),
])
def test_usage_and_config_errors_exit_2_with_one_clear_message(tmp_path: Path, args: list[str],
                                                               message: str) -> None:
    (tmp_path / "OPS").mkdir()
    (tmp_path / "bad.yaml").write_text(
        "ingress:\n  lmtp:\n    verified_domains:\n      beta.example:\n"
        "        tenant: beta\n        stack: alpha/inbound\n")
    result = run_txco("serve", "--lmtp-listen-addrs=127.0.0.1:0", *args, cwd=tmp_path)
    assert (result.returncode, result.stderr.strip()) == (2, message)


def test_a_bad_config_file_stops_the_start_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "OPS").mkdir()
    (tmp_path / "bad.yaml").write_text(
        "ingress:\n  lmtp:\n    verified_domains:\n      beta.example:\n"
        "        tenant: beta\n        stack: alpha/inbound\n")
    result = run_txco("serve", "--personalities=lmtp", "--lmtp-listen-addrs=127.0.0.1:0",
                      "--config", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert ("bad.yaml: ingress.lmtp.verified_domains['beta.example'].stack: 'alpha/inbound' "
            "belongs to tenant 'alpha', but the entry's tenant is 'beta'") in result.stderr
    assert "Traceback" not in result.stderr


def test_a_stack_that_does_not_compile_is_reported_with_its_position_and_not_served(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    broken = {**OPS, "beta/_mail/0/broken.txcl": "WHEN @lmtp.msg.subject =~ /unterminated\n"}
    server = serve(tmp_path, broken, CONFIG)
    server.wait_for_log(r"beta/_mail/0/broken.txcl:1:27: txcl_parse_error: unterminated regex")
    with server.lmtp() as client:
        _, data_replies = deliver(client, ["a@acme.example", "b@beta.example"])
    # a stack that does not compile tempfails: the mail waits at Postfix until it is fixed
    assert [code for code, _ in data_replies] == [250, 451]


def test_route_explains_each_step(tmp_path: Path) -> None:
    (tmp_path / "txco.yaml").write_text(CONFIG)
    routed = run_txco("route", "support@acme.example", cwd=tmp_path)
    assert routed.returncode == 0
    assert routed.stdout.splitlines()[-1] == (
        "=> acme acme/_mail (to acme/_mail/0, ingress domain:acme.example)")
    by_host = run_txco("route", "acme.support+monday@chassis.example",
                       "--lmtp-default-hosts=chassis.example", cwd=tmp_path)
    assert by_host.stdout.splitlines()[-1] == (
        "=> acme acme/support (to acme/support/0, ingress default-host:chassis.example)")
    unrouted = run_txco("route", "who@nowhere.example", cwd=tmp_path)
    assert unrouted.returncode == 1
    assert unrouted.stdout.splitlines()[-1] == (
        "=> unrouted: 550 5.1.1 no rule accepted this recipient")


def test_hostnames_add_list_verify_remove_and_routing_sees_them(tmp_path: Path) -> None:
    def txco(*args: str) -> subprocess.CompletedProcess[str]:
        return run_txco(*args, cwd=tmp_path)

    assert txco("hostnames", "add", "Mail.Delta.Example", "delta").stdout == (
        "mail.delta.example -> delta/_mail (unverified)\n")
    assert txco("hostnames", "list").stdout == (
        "mail.delta.example\tdelta\tdelta/_mail\tunverified\n")
    strict = ("route", "x@mail.delta.example", "--require-hostname-verification")
    assert txco(*strict).returncode == 1
    assert txco("route", "x@mail.delta.example").returncode == 0
    assert txco("hostnames", "verify", "mail.delta.example").returncode == 0
    assert txco(*strict).stdout.splitlines()[-1] == (
        "=> delta delta/_mail (to delta/_mail/0, ingress hostname:mail.delta.example)")
    assert txco("hostnames", "remove", "mail.delta.example").returncode == 0
    missing = txco("hostnames", "remove", "mail.delta.example")
    assert missing.returncode == 1 and "no hostname 'mail.delta.example'" in missing.stderr
    bad = txco("hostnames", "add", "x.example", "delta", "--stack", "other/_mail")
    assert (bad.returncode, bad.stderr.strip()) == (
        2, "txco: error: --stack 'other/_mail' must be delta/<stack> "
           "(stack names match [a-z_][a-z0-9_-]*)")


def test_workers_share_the_listeners_and_sighup_and_sigterm_reach_them_all(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(tmp_path, OPS, CONFIG, "--workers=2", "--no-watch")
    server.wait_for_log(r"serving with 2 workers \(pids \d+ \d+\)")
    deadline = time.monotonic() + 10
    while len([line for line in server.log if "lmtp listening on" in line]) < 2:
        assert time.monotonic() < deadline, server.stderr()
        time.sleep(0.02)
    for unix in (False, True):
        with server.lmtp(unix=unix) as client:
            _, data_replies = deliver(client, ["support@acme.example", "bob@beta.example"])
        assert [code for code, _ in data_replies] == [250, 550]
    (tmp_path / "OPS" / "acme/_mail/0/accept.txcl").write_text(
        'SET @lmtp.res.code = 250\nSET @lmtp.res.msg = "queued by v2"\n')
    server.proc.send_signal(signal.SIGHUP)
    while len([line for line in server.log if "now serving version 2" in line]) < 2:
        assert time.monotonic() < deadline + 10, server.stderr()
        time.sleep(0.02)
    clients = [server.lmtp(unix=i % 2 == 1) for i in range(6)]  # open at once: both workers
    for client in clients:
        with client:
            _, data_replies = deliver(client, ["support@acme.example"])
        assert data_replies == [(250, b"2.0.0 queued by v2")]
    assert server.stop(signal.SIGTERM) == 0
    assert not Path(server.unix_path).exists()
    assert server.stderr().count("lmtp stopped") == 2
    assert "Traceback" not in server.stderr()


def test_a_worker_that_dies_is_replaced(serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(tmp_path, OPS, CONFIG, "--workers=2", "--no-watch")
    pids = server.wait_for_log(r"serving with 2 workers").rpartition("pids ")[2].rstrip(")").split()
    os.kill(int(pids[0]), signal.SIGKILL)
    server.wait_for_log(rf"worker {pids[0]} exited \(status -9\); starting another")
    for _ in range(4):
        with server.lmtp() as client:
            _, data_replies = deliver(client, ["support@acme.example"])
        assert data_replies == [(250, b"2.0.0 queued")]
    assert server.stop(signal.SIGTERM) == 0


def test_the_parent_counts_ready_workers_until_all_are_or_none_can_be() -> None:
    from txcl.chassis.supervisor import _count_ready

    read, write = os.pipe()
    os.write(write, b"..")
    assert _count_ready(read, 2, timeout=5) == 2
    os.close(write)
    read, write = os.pipe()
    os.write(write, b".")
    os.close(write)  # the other worker died before it was ready: end-of-file
    assert _count_ready(read, 2, timeout=5) == 1
    read, write = os.pipe()
    started = time.monotonic()
    assert _count_ready(read, 2, timeout=0.2) == 0  # a worker still loading: give up waiting
    assert time.monotonic() - started >= 0.2
    os.close(write)


def test_workers_die_with_their_parent_even_when_it_is_killed(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(tmp_path, OPS, CONFIG, "--workers=2", "--no-watch")
    pids = server.wait_for_log(r"serving with 2 workers").rpartition("pids ")[2].rstrip(")").split()
    server.proc.kill()
    server.proc.wait(10)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and _not_a_zombie(pid) for pid in pids):
        assert time.monotonic() < deadline, f"orphaned workers still run: {pids}"
        time.sleep(0.05)


def _not_a_zombie(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_workers_that_cannot_load_the_config_stop_the_server_with_status_2(
        tmp_path: Path) -> None:
    (tmp_path / "OPS").mkdir()
    (tmp_path / "txco.yaml").write_text("ingress: [not, a, mapping\n")
    result = run_txco("serve", "--personalities=lmtp", "--workers=2", "--ops", "OPS",
                      "--config", "txco.yaml", "--lmtp-listen-addrs=127.0.0.1:0", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "txco: error: cannot load" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_unix_socket_is_open_to_its_group_so_the_folder_decides_who_connects(serve, tmp_path):
    import os
    import stat

    old = os.umask(0o022)  # the usual umask would leave the group without write permission
    try:
        server = serve(tmp_path, {"acme/_mail/0/a.txcl": "SET @lmtp.res.code = 250\n"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(server.unix_path).st_mode) == 0o660


def test_a_symlink_loop_keeps_out_only_its_stack_and_the_watcher_sees_it_come_and_go(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    ops = tmp_path / "OPS"
    for relative, text in OPS.items():
        (ops / relative).parent.mkdir(parents=True, exist_ok=True)
        (ops / relative).write_text(text)
    beta_loop = ops / "beta/_mail/0/loop.txcl"
    beta_loop.symlink_to("loop.txcl")  # a file that is a link to itself
    server = serve(tmp_path, ops, CONFIG, "--watch-interval=0.05")
    server.wait_for_log(rf"not served: txcl_load_error: {beta_loop}: a symlink loop")
    with server.lmtp() as client:
        _, replies = deliver(client, ["support@acme.example", "bob@beta.example"])
    assert [code for code, _ in replies] == [250, 451]
    assert str(beta_loop) in (tmp_path / "var" / "status.json").read_text()

    gamma = ops / "gamma/_mail"  # a stage folder and a sibling that lead to each other
    gamma.mkdir(parents=True)
    (gamma / "0").symlink_to("1")
    (gamma / "1").symlink_to("0")
    server.wait_for_log(rf"{gamma / '0'}: a symlink loop")
    server.wait_for_log(r"reload \(watch\): stack gamma/_mail FAILED; not served")
    beta_loop.unlink()
    (gamma / "0").unlink()
    (gamma / "1").unlink()
    server.wait_for_log(r"reload \(watch\): now serving version 3")
    with server.lmtp() as client:
        _, replies = deliver(client, ["bob@beta.example"])
    assert replies == [(550, b"5.1.1 no such user")]  # beta's own rule: its stack serves
    assert server.stderr().count("stack gamma/_mail FAILED") == 1  # noticed once, no retries
    assert server.stop() == 0
    assert "Traceback" not in server.stderr()


NAP_OP = """\
import pathlib
import time


def nap(envelope, args, ctx):
    pathlib.Path(args["mark"]).touch()
    time.sleep(args["seconds"])
    return {}
"""


@pytest.mark.parametrize("workers", ["--workers=1", "--workers=2"])
def test_sigterm_ends_the_process_while_an_op_thread_still_sleeps(
        serve: Callable[..., Server], tmp_path: Path, workers: str) -> None:
    (tmp_path / "nap_ops.py").write_text(NAP_OP)
    mark = tmp_path / "op-started"
    rule = (f'WITH timeout = "600s"\nWITH mark = "{mark}"\nWITH seconds = 300\n'
            'EXEC "op://NAP"\nSET @lmtp.res.code = 250\n')
    config = CONFIG + "ops:\n  NAP: {python: \"nap_ops:nap\", path: \".\"}\n"
    server = serve(tmp_path, {"acme/_mail/0/nap.txcl": rule}, config, workers,
                   "--lmtp-resp-timeout=2s", "--no-watch")
    replies: list[list[tuple[int, bytes]]] = []

    def client() -> None:
        lmtp = server.lmtp(timeout=30)
        try:
            replies.append(deliver(lmtp, ["support@acme.example"], ran=False)[1])
        finally:
            lmtp.close()  # no QUIT: the server says 421 and closes after the reply

    sender = threading.Thread(target=client)
    sender.start()
    deadline = time.monotonic() + 10
    while not mark.exists():  # the op is asleep in its worker thread
        assert time.monotonic() < deadline, server.stderr()
        time.sleep(0.02)
    stopped_at = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout=15) == 0
    took = time.monotonic() - stopped_at
    sender.join(10)
    assert replies and replies[0][0][0] == 451, replies  # answered, never a false 250
    assert b"(rid " not in replies[0][0][1]  # cut before its stack answered: no trace
    assert took < 10, f"{took:.1f}s after SIGTERM:\n{server.stderr()}"
    assert "lmtp stopped" in server.stderr()
    # The op sleeps on a daemon thread of its own (txcl.ops.OpThreads): it holds no exit.
    assert "Traceback" not in server.stderr()


@pytest.mark.parametrize("workers", ["--workers=1", "--workers=2"])
def test_recipients_refused_at_rcpt_are_logged_and_counted_by_reason_in_status(
        serve: Callable[..., Server], tmp_path: Path, workers: str) -> None:
    import json

    assert run_txco("hostnames", "--state-dir", str(tmp_path / "var"), "add",
                    "mail.delta.example", "delta", cwd=tmp_path).returncode == 0  # unverified
    server = serve(tmp_path, OPS, CONFIG, workers, "--lmtp-max-recipients=2",
                   "--require-hostname-verification")
    refusals = [  # (RCPT argument, reply code, reason)
        ("<who@nowhere.example>", 550, "no_route"),
        ("<x@mail.delta.example>", 550, "hostname_unverified"),
        ("<not an address>", 501, "syntax"),
        ("<j\u00f6se@acme.example>", 553, "needs_smtputf8"),
        ("<a@acme.example> NOTIFY=NEVER", 555, "unsupported_parameter"),
        ("<c@acme.example>", 452, "too_many_recipients"),  # last: after two accepted
    ]
    clients = [server.lmtp(unix=unix) for unix in (False, True)]  # open at once: one each
    for client in clients:
        with client:
            client.ehlo("client.example")
            assert client.mail("alice@example.com")[0] == 250
            for argument, code, _ in refusals:
                if code == 452:  # the limit is reached
                    for address in ("support@acme.example", "dave@acme.example"):
                        assert client.rcpt(address)[0] == 250
                client.send(f"RCPT TO:{argument}\r\n".encode())
                assert client.getreply()[0] == code, argument
    from lmtp.session import REFUSALS

    for _, code, reason in refusals:  # a line for each, with why and the reply's code
        pattern = re.compile(rf"lmtp rcpt refused at RCPT: <.*> \S+: {REFUSALS[reason]} "
                             rf"\({code} \d\.\d\.\d\)$")
        deadline = time.monotonic() + 10  # the stderr reader may be behind the replies
        while len(lines := [line for line in server.log if pattern.search(line)]) < 2:
            assert time.monotonic() < deadline, (reason, server.stderr())
            time.sleep(0.05)
        assert len(lines) == 2, (reason, server.stderr())
    expected = {reason: 2 for _, _, reason in refusals} | {"routing_failed": 0}
    status = tmp_path / "var" / "status.json"
    deadline = time.monotonic() + 15  # rewritten within seconds of a change
    while json.loads(status.read_text()).get("counters", {}).get("rcpt_refused") != expected:
        assert time.monotonic() < deadline, status.read_text()
        time.sleep(0.1)
    shown = run_txco("status", "--state-dir", str(tmp_path / "var"), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert ("rcpt refused: hostname_unverified 2, needs_smtputf8 2, no_route 2, "
            "routing_failed 0, syntax 2, too_many_recipients 2, unsupported_parameter 2"
            ) in shown.stdout
    assert server.stop() == 0
