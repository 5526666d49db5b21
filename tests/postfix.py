"""A private Postfix instance for end-to-end tests, never touching the system's Postfix.

The instance has its own config, queue and data directories under a work directory,
listens for SMTP on loopback only at an unprivileged port, hands every recipient of the
test domains to one LMTP target (``lmtp:unix:/path`` or ``lmtp:inet:127.0.0.1:PORT``),
relays nothing anywhere else, and writes its log to ``<workdir>/maillog`` (postlogd),
which is what the tests read.

What a private instance needs (found by experiment, Postfix 3.7):

* root, for ``postfix -c DIR start``; as root neither ``postfix`` nor ``postqueue``
  require the directory to be listed in the default main.cf's
  ``alternate_config_directories``.
* every directory from ``/`` to the queue and to the LMTP socket must be traversable
  by the ``postfix`` user: pytest's ``tmp_path`` lives under a 0700 directory, so the
  work directory comes from :func:`public_tmpdir` instead.
* the LMTP socket must be writable by the ``postfix`` user: :func:`socket_dir` makes a
  setgid directory of group ``postfix`` and :data:`SERVER_UMASK` makes a server started
  in it create a group-writable socket (the seed's recipe for socket permissions).
* ``postfix start`` is 2-3 s slower on a just-written config; see :func:`backdate`.
* no chroot (Debian's master.cf chroots most services into /var/spool/postfix, where
  the socket path would not resolve), hence a master.cf written here.
* ``maillog_file`` must sit under one of ``maillog_file_prefixes``, and master.cf needs
  the ``postlog`` unix-dgram service.
* recipients go through ``local_transport`` (or ``mailbox_transport`` as in the seed's
  recipe) with ``local_recipient_maps`` empty, so smtpd accepts any local part.
  ``local_transport`` lets qmgr put several recipients into one LMTP transaction;
  ``mailbox_transport`` passes through local(8), one recipient per transaction.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SERVER_UMASK = 0o007
"""Umask for an LMTP server started in :func:`socket_dir`: its socket is group-writable."""

Transport = Literal["local_transport", "mailbox_transport"]

POSTFIX_TIMEOUT_S = 20.0

# Every service chroot-free ("n" in the fifth column); only what a loopback test needs.
MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:{port} inet n  -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

DELIVERY_LINE = re.compile(
    r"postfix/(?P<agent>[\w-]+)\[\d+\]: (?P<queue_id>[0-9A-F]+): to=<(?P<rcpt>[^>]*)>,"
    r".*? dsn=(?P<dsn>[\d.]+), status=(?P<status>\w+) \((?P<text>.*)\)$",
    re.MULTILINE,
)


@dataclass(frozen=True)
class Delivery:
    """One delivery attempt for one recipient, as Postfix logged it."""

    queue_id: str
    rcpt: str
    status: str  # sent | bounced | deferred
    dsn: str  # "2.0.0", "5.1.1", ...
    text: str  # the reply text in parentheses, e.g. "250 2.0.0 queued"


@dataclass(frozen=True)
class Postfix:
    """A running private Postfix instance (see :func:`private_postfix`)."""

    root: Path
    config_dir: Path
    queue_dir: Path
    smtp_port: int
    maillog: Path

    def send(
        self, sender: str, rcpts: Sequence[str], message: bytes
    ) -> dict[str, tuple[int, bytes]]:
        """Submit one message over SMTP; return the recipients smtpd refused."""
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=POSTFIX_TIMEOUT_S) as client:
            return client.sendmail(sender, list(rcpts), message)

    def flush(self) -> None:
        """``postqueue -f``: attempt delivery of all queued mail now."""
        self._run("postqueue", "-c", str(self.config_dir), "-f")

    def queue(self) -> list[dict[str, Any]]:
        """``postqueue -j``: the queued messages, one JSON object each."""
        out = self._run("postqueue", "-c", str(self.config_dir), "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_for_queued(self, rcpt: str, queue_name: str, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until the one queued message for ``rcpt`` sits in ``queue_name``; return it.

        A delivery's log line comes before qmgr moves the file, so read the queue, not the log.
        """
        deadline = time.monotonic() + timeout
        while True:
            entries = [m for m in self.queue() if rcpt in {r["address"] for r in m["recipients"]}]
            if len(entries) == 1 and entries[0]["queue_name"] == queue_name:
                return entries[0]
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{rcpt} not (only) in the {queue_name} queue after {timeout}s: {entries}"
                )
            time.sleep(0.05)

    def wait_for_empty_queue(self, timeout: float = 10.0) -> None:
        """Wait until nothing is queued (bounce notices included)."""
        deadline = time.monotonic() + timeout
        while queued := self.queue():
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue not empty after {timeout}s: {queued}")
            time.sleep(0.05)

    def log(self, since: int = 0) -> str:
        """Postfix's own log from byte offset ``since`` (use :meth:`mark` for an offset)."""
        try:
            with self.maillog.open("rb") as fh:
                fh.seek(since)
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """The log's current size: pass it as ``since`` to look only at what follows."""
        try:
            return self.maillog.stat().st_size
        except FileNotFoundError:
            return 0

    def deliveries(self, since: int = 0) -> list[Delivery]:
        """Every per-recipient delivery result logged since ``since``."""
        return [
            Delivery(m["queue_id"], m["rcpt"], m["status"], m["dsn"], m["text"])
            for m in DELIVERY_LINE.finditer(self.log(since))
        ]

    def wait_for_log(self, pattern: str, timeout: float = 10.0, since: int = 0) -> re.Match[str]:
        """Wait until the log (from ``since``) matches ``pattern``; fail with its tail."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.log(since))
            if found:
                return found
            if time.monotonic() > deadline:
                tail = "\n".join(self.log(since).splitlines()[-30:])
                raise TimeoutError(
                    f"no line matching {pattern!r} in {self.maillog} within {timeout}s:\n{tail}"
                )
            time.sleep(0.05)

    def wait_for_delivery(
        self, rcpt: str, status: str, timeout: float = 10.0, since: int = 0
    ) -> Delivery:
        """Wait for a delivery line for ``rcpt`` with ``status``; return it parsed."""
        self.wait_for_log(rf"to=<{re.escape(rcpt)}>,.* status={re.escape(status)} ", timeout, since)
        return next(d for d in self.deliveries(since) if d.rcpt == rcpt and d.status == status)

    def master_pid(self) -> int | None:
        """The master daemon's pid while it runs, else None."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def stop(self) -> None:
        """Stop the instance and wait (bounded) for its master to exit; idempotent."""
        pid = self.master_pid()
        if pid is None:
            return
        subprocess.run(
            ["postfix", "-c", str(self.config_dir), "stop"],
            capture_output=True,
            timeout=POSTFIX_TIMEOUT_S,
        )
        if _wait_dead(pid, timeout=5.0):
            return
        subprocess.run(
            ["postfix", "-c", str(self.config_dir), "abort"],
            capture_output=True,
            timeout=POSTFIX_TIMEOUT_S,
        )
        if not _wait_dead(pid, timeout=2.0):
            os.kill(pid, signal.SIGKILL)
            _wait_dead(pid, timeout=2.0)

    def _run(self, *argv: str) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=POSTFIX_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done.stdout


def main_cf(root: Path, lmtp_target: str, domains: Sequence[str], transport: Transport) -> str:
    """The instance's main.cf: local delivery of ``domains`` to ``lmtp_target``, nothing else."""
    if not lmtp_target.startswith(("lmtp:unix:", "lmtp:inet:")):
        raise ValueError(
            f"not an LMTP target (lmtp:unix:/path or lmtp:inet:host:port): {lmtp_target!r}"
        )
    if transport == "local_transport":
        delivery = f"local_transport = {lmtp_target}"
    else:
        delivery = f"local_transport = local\nmailbox_transport = {lmtp_target}"
    return f"""\
# Generated by tests/postfix.py: a private, loopback-only instance.
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
myhostname = postfix-e2e.localdomain
mydomain = localdomain
myorigin = $myhostname
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
mydestination = {", ".join(domains)}
local_recipient_maps =
alias_maps =
alias_database =
{delivery}
lmtp_destination_recipient_limit = 50
lmtp_connect_timeout = 5s
relayhost =
default_transport = error:this test instance delivers only to its LMTP target
relay_transport = error:this test instance delivers only to its LMTP target
# Deferred mail waits for `postqueue -f` (which ignores these), never for a timer, so a
# test sees exactly when a retry happens.
queue_run_delay = 1h
minimal_backoff_time = 1h
maximal_backoff_time = 2h
biff = no
"""


@contextlib.contextmanager
def private_postfix(
    workdir: Path,
    lmtp_target: str,
    domains: Sequence[str],
    *,
    transport: Transport = "local_transport",
) -> Iterator[Postfix]:
    """Start a private Postfix under ``workdir`` delivering ``domains`` to ``lmtp_target``.

    ``workdir`` must be traversable by the ``postfix`` user (see :func:`public_tmpdir`).
    The instance is stopped when the block exits, also on failure.
    """
    root = workdir / "postfix"
    config_dir, queue_dir, data_dir = root / "etc", root / "queue", root / "data"
    for path in (config_dir, queue_dir, data_dir):
        path.mkdir(parents=True)
    for path in (root, config_dir, queue_dir):
        path.chmod(0o755)
    shutil.chown(data_dir, user="postfix")
    port = free_port()
    (config_dir / "main.cf").write_text(main_cf(root, lmtp_target, domains, transport))
    (config_dir / "master.cf").write_text(MASTER_CF.format(port=port))
    instance = Postfix(root, config_dir, queue_dir, port, root / "maillog")
    try:
        backdate(config_dir / "main.cf", config_dir / "master.cf")
        started = subprocess.run(
            ["postfix", "-c", str(config_dir), "start"],
            capture_output=True,
            text=True,
            timeout=POSTFIX_TIMEOUT_S,
        )
        if started.returncode != 0:
            raise RuntimeError(f"postfix start failed: {started.stderr.strip()}\n{instance.log()}")
        wait_for_port("127.0.0.1", port, timeout=POSTFIX_TIMEOUT_S)
        yield instance
    finally:
        instance.stop()


def backdate(*paths: Path, seconds: float = 60.0) -> None:
    """Set the files' mtime into the past.

    On a config written less than a second or so ago, `postfix start` takes 2-3 s
    longer (measured with Postfix 3.7: 3.1 s against 0.9 s); tests write theirs fresh.
    """
    then = time.time() - seconds
    for path in paths:
        os.utime(path, (then, then))


@contextlib.contextmanager
def public_tmpdir(prefix: str = "txco-e2e-") -> Iterator[Path]:
    """A fresh directory under /tmp that other users may traverse (0755); removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def socket_dir(parent: Path, name: str = "run") -> Path:
    """A directory for an LMTP socket that Postfix may connect to.

    setgid and group ``postfix``: a socket created in it by a server running with
    :data:`SERVER_UMASK` belongs to group ``postfix`` and is group-writable.
    """
    path = parent / name
    path.mkdir()
    os.chown(path, 0, grp.getgrnam("postfix").gr_gid)
    path.chmod(0o2770)
    return path


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Wait until something accepts TCP connections at host:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from err
            time.sleep(0.05)


def wait_for_unix_socket(path: Path, timeout: float) -> None:
    """Wait until something accepts connections on the Unix socket at ``path``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(1.0)
                sock.connect(str(path))
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {path} after {timeout}s") from err
            time.sleep(0.05)


@contextlib.contextmanager
def server_process(
    argv: Sequence[str], *, listen: str, log_path: Path, timeout: float = 15.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Run an LMTP server (``argv``) until the block exits; wait until ``listen`` accepts.

    ``listen`` is ``unix:/path`` or ``host:port``. The server runs with
    :data:`SERVER_UMASK` in its own session, output appended to ``log_path``. If it exits
    before listening, the error says so and shows its output.
    """
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            umask=SERVER_UMASK,
            start_new_session=True,
        )
    try:
        _wait_listening(proc, listen, log_path, timeout)
        yield proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM, then (bounded) SIGKILL to the process group it leads; reaps it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


def _wait_listening(
    proc: subprocess.Popen[bytes], listen: str, log_path: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            output = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(
                f"{' '.join(map(str, proc.args))} exited with {proc.returncode} before listening on {listen}:\n{output}"
            )
        remaining = deadline - time.monotonic()
        try:
            if listen.startswith("unix:"):
                wait_for_unix_socket(
                    Path(listen.removeprefix("unix:")), timeout=min(0.2, max(remaining, 0))
                )
            else:
                host, _, port = listen.rpartition(":")
                wait_for_port(host or "127.0.0.1", int(port), timeout=min(0.2, max(remaining, 0)))
            return
        except TimeoutError:
            if remaining <= 0:
                raise TimeoutError(
                    f"{proc.args!r} not listening on {listen} after {timeout}s"
                ) from None


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
