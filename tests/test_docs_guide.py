"""docs/txcl.md "Debugging rules" is real: its commands run, in order, in a copy of the
example with a live `txco serve`, after the delivery the incident is about."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from conftest import Server

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "inbound-support-mailbox"
_BLOCK = re.compile(r"```(console|yaml)\n(.*?)```", re.S)
_EXIT = re.compile(r"\s+# exit (\d+)$")


def _guide() -> list[tuple[str, str]]:
    text = (REPO / "docs" / "txcl.md").read_text("utf-8")
    section = text.split("## Debugging rules\n", 1)[1].split("\n## ", 1)[0]
    return _BLOCK.findall(section)


def test_the_guide_walks_explain_trace_edit_replay_case_coverage() -> None:
    commands = [line for lang, body in _guide() if lang == "console" for line in body.splitlines()]
    words = [c.split()[1:3] for c in commands]
    assert words[0][:1] == ["txcl"] and "--explain" in commands[0]
    assert any(w[0] == "txco" and "--explain" in c for w, c in zip(words, commands, strict=True))
    assert any("replay" in c for c in commands) and "--coverage" in commands[-1]


def test_every_command_of_the_guide_runs(serve: Callable[..., Server], tmp_path: Path) -> None:
    for name in ("OPS", "ops", "samples"):
        shutil.copytree(EXAMPLE / name, tmp_path / name)
    server = serve(tmp_path, tmp_path / "OPS", (EXAMPLE / "txco.yaml").read_text())
    with server.lmtp() as client:  # the incident: mail to billing@ is refused
        client.ehlo_or_helo_if_needed()
        client.mail("maria.keller@kellerbau.example")
        assert client.rcpt("billing@acme.example")[0] == 250
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(smtplib.quotedata((EXAMPLE / "samples" / "billing.eml").read_text()).encode() + b"\r\n.\r\n")
        assert client.getreply()[0] == 550
    deadline = time.monotonic() + 15
    while not list((tmp_path / "var" / "requests").glob("[0-9A-Z]*")):
        assert time.monotonic() < deadline, "no trace written"
        time.sleep(0.05)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    ran = 0
    for lang, body in _guide():
        if lang == "yaml":
            first, _, rest = body.partition("\n")
            path = tmp_path / first.removeprefix("# ").strip()
            path.write_text(rest)
            continue
        for line in body.splitlines():
            assert line.startswith("$ "), line
            command = line[2:]
            found = _EXIT.search(command)
            want = int(found.group(1)) if found else 0
            run = subprocess.run(
                ["bash", "-c", _EXIT.sub("", command)], cwd=tmp_path, env=env,
                capture_output=True, text=True, timeout=120,
            )
            assert run.returncode == want, f"{command}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
            ran += 1
            if "--explain" in command:
                assert '["billing@acme.example"]' in run.stdout and "not fired" in run.stdout
            if "replay" in command:
                assert "550 5.1.1 no such mailbox  ≠  250 2.0.0" in run.stdout
                assert "op TICKET: the trace holds no answer" in run.stdout
    assert ran == 7
