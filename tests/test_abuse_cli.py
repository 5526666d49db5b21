"""Hostile files given to `txcl` and `txco` (issue 13, item 10; terminals: item 8).

Each case runs the real command as a subprocess: the answer is one clear line on stderr
naming the file and what is wrong, the usual error exit code, never a traceback, never a hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import txco_argv

pytestmark = pytest.mark.abuse

RULE = 'WHEN @lmtp.rcpt.0 =~ /^support@/\nSET @lmtp.res.code = 250\n'
ENVELOPE = {"_txc": {"src": "lmtp", "lmtp": {"rcpt": ["support@acme.example"]}}}
# A hang is the failure these tests look for: a command that has not answered by then hangs.
HANG = 30


def txcl(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "txcl.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=HANG)


def txco(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*txco_argv(), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=HANG)


def refused(done: subprocess.CompletedProcess[str], *says: str, code: int = 2) -> None:
    """Exit `code`, no traceback, and stderr's first line says every one of `says`."""
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    first = done.stderr.strip().splitlines()[0] if done.stderr.strip() else ""
    for text in says:
        assert text in first, (text, done.stderr)


@pytest.fixture
def rule(tmp_path: Path) -> Path:
    path = tmp_path / "rule.txcl"
    path.write_text(RULE)
    return path


# --- envelopes: deep, cyclic, enormous -------------------------------------------------------


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_a_3000_deep_envelope_is_refused_naming_the_file(tmp_path: Path, rule: Path,
                                                         opening: str) -> None:
    closing = "]" if opening == "[" else "}"
    envelope = tmp_path / "deep.json"
    envelope.write_text(opening * 3000 + "1" + closing * 3000)
    refused(txcl("test", rule, envelope), str(envelope), "nested more than")


def test_an_envelope_nested_within_the_recursion_limit_is_refused_too(tmp_path: Path,
                                                                      rule: Path) -> None:
    envelope = tmp_path / "deep.json"
    inner = '{"a":' * 500 + "1" + "}" * 500
    envelope.write_text(json.dumps(ENVELOPE)[:-1] + ', "deep": ' + inner + "}")
    refused(txcl("test", rule, envelope), str(envelope), "nested more than 100 levels")


def test_a_deep_envelope_on_stdin_is_refused(rule: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "txcl.cli", "test", str(rule), "-"],
                          input="[" * 3000 + "]" * 3000, capture_output=True, text=True,
                          timeout=HANG)
    refused(done, "-: nested more than")


def test_a_cyclic_or_enormous_case_envelope_is_a_clear_case_failure(tmp_path: Path) -> None:
    # YAML aliases build shared and cyclic data: what a program could also pass in.
    stack = tmp_path / "OPS" / "acme" / "_mail"
    (stack / "0").mkdir(parents=True)
    (stack / "0" / "r.txcl").write_text(RULE)
    (stack / "tests").mkdir()
    (stack / "tests" / "cyclic.yaml").write_text(
        "name: cyclic\ninput:\n  envelope: &e {_txc: {src: lmtp, loop: *e}}\n")
    laughs = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 8))
    (stack / "tests" / "laughs.yaml").write_text(
        "name: laughs\ninput:\n  envelope:\n    _txc: {src: lmtp}\n    x:\n"
        + "".join("      " + line + "\n" for line in laughs.splitlines()))
    done = txcl("test", tmp_path / "OPS")
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "cyclic.yaml" in done.stdout and "nested more than 100 levels deep (or cyclic)" in done.stdout
    assert "laughs.yaml" in done.stdout and "too large: more than" in done.stdout


# --- FIFOs, devices and folders where a file belongs; sizes ------------------------------------


def _named_fifo(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    os.mkfifo(path)
    return path


NOT_REGULAR = {"device": "a character device", "fifo": "a FIFO", "folder": "a folder"}


def _not_regular(folder: Path, kind: str, name: str) -> Path:
    """`folder/name` made a device (a symlink to /dev/zero), a FIFO or a folder."""
    path = folder / name
    if kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)  # reading it would wait for a writer for ever
    else:
        path.mkdir()
    return path


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_rule_file_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    envelope = tmp_path / "env.json"
    envelope.write_text(json.dumps(ENVELOPE))
    rule = _not_regular(tmp_path, kind, "rule.txcl")
    says = f"{rule}: not a regular file: {NOT_REGULAR[kind]}"
    refused(txcl("test", rule, envelope), says, code=1)  # a load problem, as in a tree
    refused(txcl("lint", rule), says)
    refused(txcl("fmt", rule), says)


def test_dev_zero_itself_is_not_a_rule_file(tmp_path: Path) -> None:
    envelope = tmp_path / "env.json"
    envelope.write_text(json.dumps(ENVELOPE))
    refused(txcl("test", "/dev/zero", envelope), "/dev/zero: not a .txcl file", code=1)
    refused(txcl("lint", "/dev/zero"), "/dev/zero: not a regular file: a character device")
    refused(txcl("fmt", "/dev/zero"), "/dev/zero: not a regular file: a character device")


@pytest.mark.parametrize("kind", NOT_REGULAR)
def test_an_envelope_or_message_that_is_not_a_regular_file_is_refused(tmp_path: Path, rule: Path,
                                                                     kind: str) -> None:
    for name in ("env.json", "msg.eml"):
        path = _not_regular(tmp_path, kind, name)
        refused(txcl("test", rule, path, "--rcpt", "a@acme.example"),
                f"{path}: not a regular file: {NOT_REGULAR[kind]}")


@pytest.mark.parametrize("kind", NOT_REGULAR)
def test_test_case_inputs_that_are_not_regular_files_fail_clearly(tmp_path: Path,
                                                                  kind: str) -> None:
    stack = tmp_path / "OPS" / "acme" / "_mail"
    (stack / "0").mkdir(parents=True)
    (stack / "0" / "r.txcl").write_text(RULE)
    tests = stack / "tests"
    tests.mkdir()
    # a case may name a file outside the tree (/dev/zero itself), or one in tests/ (the loader
    # refuses a symlink in tests/ that leads out, so a device is named directly)
    envelope = _not_regular(tmp_path, kind, "env.json")
    message = Path("/dev/zero") if kind == "device" else _not_regular(tests, kind, "msg.eml")
    (tests / "by-file.yaml").write_text(f"name: by file\ninput: {{envelope_file: {envelope}}}\n")
    (tests / "by-message.yaml").write_text(
        f"name: by message\ninput: {{eml: {message}, rcpt: a@acme.example}}\n")
    done = txcl("test", tmp_path / "OPS")
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert f"{envelope}: not a regular file: {NOT_REGULAR[kind]}" in done.stdout
    assert f"{message}: not a regular file: {NOT_REGULAR[kind]}" in done.stdout
    assert "0 passed, 2 failed" in done.stdout


def test_fmt_applies_the_rule_file_size_limit(tmp_path: Path) -> None:
    from txcl.loader import MAX_RULE_FILE_BYTES

    big = tmp_path / "big.txcl"
    big.write_text(RULE * (MAX_RULE_FILE_BYTES // len(RULE) + 1))
    refused(txcl("fmt", big), str(big), "the limit is 1 MiB")
    refused(txcl("fmt", "--check", tmp_path), str(big), "the limit is 1 MiB")


# --- symlink loops and symlinks out of the tree --------------------------------------------


@pytest.fixture
def looping_tree(tmp_path: Path) -> Path:
    """An OPS tree whose stage holds a two-link loop, a self loop and a folder link outside."""
    stage = tmp_path / "OPS" / "acme" / "_mail" / "0"
    stage.mkdir(parents=True)
    (stage / "r.txcl").write_text(RULE)
    (stage / "a.txcl").symlink_to("b.txcl")
    (stage / "b.txcl").symlink_to("a.txcl")
    (stage / "self").symlink_to("self")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txcl").write_text("SET @lmtp.res.code = 550\n")
    (stage / "out").symlink_to(outside)
    (stage.parent / "tests").mkdir()
    (stage.parent / "tests" / "loop.yaml").symlink_to("loop.yaml")
    return tmp_path / "OPS"


@pytest.mark.parametrize("command", ["lint", "test"])
@pytest.mark.parametrize("level", ["OPS", "OPS/acme/_mail", "OPS/acme/_mail/0"])
def test_symlink_loops_and_links_out_are_reported_not_followed(looping_tree: Path, command: str,
                                                               level: str) -> None:
    target = looping_tree.parent / level
    done = txcl(command, target)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, (done.stdout, done.stderr)
    said = done.stdout + done.stderr
    stage = looping_tree / "acme" / "_mail" / "0"
    for name in ("a.txcl", "b.txcl", "self"):
        assert f"{stage / name}: a symlink loop" in said
    assert f"{stage / 'out'}: a symlink that leads out of " in said
    assert "secret" not in said


@pytest.mark.parametrize("command", ["lint", "test", "fmt"])
def test_a_looping_symlink_given_as_the_target_is_one_clear_error(looping_tree: Path,
                                                                  command: str) -> None:
    loop = looping_tree / "acme" / "_mail" / "0" / "a.txcl"
    envelope = looping_tree.parent / "env.json"
    envelope.write_text(json.dumps(ENVELOPE))
    done = txcl(command, loop, *([envelope] if command == "test" else []))
    refused(done, str(loop), "a symlink loop", code=1 if command == "test" else 2)


def test_fmt_of_a_tree_reports_loops_and_does_not_leave_it(looping_tree: Path) -> None:
    done = txcl("fmt", "--check", looping_tree)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert f"{looping_tree / 'acme/_mail/0/a.txcl'}: cannot be read: a symlink loop" in done.stderr
    assert "secret" not in done.stdout + done.stderr


# --- state files: status.json and a trace's summary.json -------------------------------------

NOT_OBJECTS = {
    "list": ("[1, 2]", "not a JSON object but a list"),
    "string": ('"stopped"', "not a JSON object but a string"),
    "truncated": ('{"rid": "01J', "not valid JSON"),
    "deep": ("[" * 3000 + "]" * 3000, "nested more than 100 levels deep"),
}


@pytest.mark.parametrize("kind", NOT_OBJECTS)
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_status_json_that_is_not_an_object_is_one_clear_error(tmp_path: Path, kind: str,
                                                                 json_flag: list[str]) -> None:
    text, says = NOT_OBJECTS[kind]
    (tmp_path / "status.json").write_text(text)
    refused(txco("status", "--state-dir", tmp_path, *json_flag), str(tmp_path / "status.json"),
            says)


def _trace_with(state: Path, summary: str) -> Path:
    folder = state / "requests" / "01J0000000000000000000000"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(summary)
    return folder


@pytest.mark.parametrize("kind", NOT_OBJECTS)
def test_a_summary_json_that_is_not_an_object_is_named_by_txco_trace(tmp_path: Path,
                                                                    kind: str) -> None:
    text, says = NOT_OBJECTS[kind]
    folder = _trace_with(tmp_path, text)
    for flags in ([], ["--json"], ["01J"]):
        refused(txco("trace", "--state-dir", tmp_path, *flags), str(folder / "summary.json"), says)
    for flags in ([], ["--json"]):
        listed = txco("trace", "--list", "--state-dir", tmp_path, *flags)
        assert "Traceback" not in listed.stderr, listed.stderr
        assert listed.returncode == 0 and "unreadable summary" in listed.stdout


@pytest.mark.parametrize("command", [["trace"], ["trace", "--list"], ["status"]])
def test_records_holding_values_of_the_wrong_kind_are_one_clear_error(tmp_path: Path,
                                                                      command: list[str]) -> None:
    folder = _trace_with(tmp_path, '{"recipients": "250", "route": [], "elapsed_s": "x"}')
    (folder / "response.json").write_text('{"replies": [1]}')
    (tmp_path / "status.json").write_text(f'{{"last_reload": "ok", "pid": {os.getpid()}}}')
    where = {"trace": folder, "status": tmp_path / "status.json"}[command[0]]
    if command == ["trace", "--list"]:
        where = tmp_path / "requests"
    refused(txco(*command, "--state-dir", tmp_path), f"txco: {where}: a value of an unexpected kind")


# --- txco hostnames and the hostname database -----------------------------------------------


@pytest.mark.parametrize(("hostname", "says"), [
    ("", "hostname must not be empty"),
    ("../etc", "a slash is not allowed"),
    ("a/b.example", "a slash is not allowed"),
    ("a b.example", "white space is not allowed"),
    ("acme.example\nforged 250 ok", "white space is not allowed"),
    ("ac\x1b[2Jme.example", "the control character \\e is not allowed"),
    ("a..example", "an empty label"),
    ("a_b.example", "not a valid domain name"),
])
def test_hostnames_add_refuses_what_is_not_a_dns_name(tmp_path: Path, hostname: str,
                                                      says: str) -> None:
    done = txco("hostnames", "--state-dir", tmp_path, "add", hostname, "acme")
    refused(done, "txco: error: ", says)
    assert "\x1b" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert txco("hostnames", "--state-dir", tmp_path, "list").stdout == ""


def test_an_idna_hostname_is_stored_once_and_routes_by_either_spelling(tmp_path: Path) -> None:
    added = txco("hostnames", "--state-dir", tmp_path, "add", "XN--JSE-SNA.Example", "acme")
    assert added.returncode == 0 and added.stdout == "jöse.example -> acme/_mail (unverified)\n"
    again = txco("hostnames", "--state-dir", tmp_path, "add", "jöse.example", "acme")
    assert again.returncode == 0
    listed = txco("hostnames", "--state-dir", tmp_path, "list")
    assert listed.stdout == "jöse.example\tacme\tacme/_mail\tunverified\n"
    for address in ("x@jöse.example", "x@xn--jse-sna.example"):
        routed = txco("route", address, "--state-dir", tmp_path, cwd=tmp_path)
        assert routed.returncode == 0, routed.stdout + routed.stderr
        assert routed.stdout.splitlines()[-1].startswith("=> acme acme/_mail")


@pytest.mark.parametrize("command", [["hostnames", "list"], ["hostnames", "add", "a.example", "acme"],
                                     ["hostnames", "remove", "a.example"], ["route", "x@a.example"]])
def test_a_corrupt_hostname_database_is_one_clear_error(tmp_path: Path, command: list[str]) -> None:
    db = tmp_path / "var" / "chassis.sqlite3"
    db.parent.mkdir()
    db.write_bytes(bytes(range(256)) * 64)
    refused(txco(*command, cwd=tmp_path), f"{db.relative_to(tmp_path)}: not a usable hostname "
            "database")


def test_hostnames_list_and_route_escape_control_characters_of_old_rows(tmp_path: Path) -> None:
    import sqlite3

    assert txco("hostnames", "--state-dir", tmp_path, "add", "acme.example", "acme").returncode == 0
    conn = sqlite3.connect(tmp_path / "chassis.sqlite3")
    with conn:  # a row written before hostnames were checked
        conn.execute("UPDATE tenant_hostnames SET hostname = ?", ("ac\x1b]0;pwned\x07me.example",))
    conn.close()
    listed = txco("hostnames", "--state-dir", tmp_path, "list")
    assert listed.stdout == "ac\\e]0;pwned\\x07me.example\tacme\tacme/_mail\tunverified\n"
    routed = txco("route", "x\x1b[2J@acme.example", "--state-dir", tmp_path, cwd=tmp_path)
    assert "\x1b" not in routed.stdout and "no entry" in routed.stdout


# --- terminals: data with control characters is shown escaped ------------------------------

HOSTILE_RCPT = '"a\x1b]0;owned\x07b\x00c\x9bd"@acme.example'
SHOWN_RCPT = '"a\\e]0;owned\\x07b\\x00c\\x9bd"@acme.example'
WIRE_RCPT = '"a\x1b[2J\x00b"@acme.example'  # ASCII: no SMTPUTF8 for a C1 control


def _no_raw_controls(text: str) -> None:
    assert not any(c in text for c in "\x1b\x00\x07\x9b\r"), repr(text)


def test_txcl_test_shows_control_characters_of_the_envelope_escaped(tmp_path: Path,
                                                                   rule: Path) -> None:
    envelope = tmp_path / "env.json"
    envelope.write_text(json.dumps({"_txc": {"src": "lmtp", "lmtp": {
        "rcpt": [HOSTILE_RCPT], "transaction_rcpt": [HOSTILE_RCPT]}}}))
    shown = txcl("test", rule, envelope)
    assert shown.returncode == 0, shown.stderr
    _no_raw_controls(shown.stdout)
    assert SHOWN_RCPT in shown.stdout


def test_txco_trace_shows_control_characters_from_a_delivery_escaped(serve, tmp_path: Path) -> None:
    # The server refuses a local part with control characters (501, before any log names
    # it); a header's control characters still reach the trace, and must not reach a terminal.
    server = serve(tmp_path, {"acme/_mail/0/accept.txcl":
                               "SET tag.subject = @lmtp.msg.subject\nSET @lmtp.res.code = 250\n"},
                   "ingress: {lmtp: {verified_domains: {acme.example: {tenant: acme}}}}\n")
    with server.lmtp() as client:
        client.ehlo("client.example")
        assert client.mail("sender@example.com")[0] == 250
        assert client.rcpt(WIRE_RCPT)[0] == 501
        assert client.rcpt("ann@acme.example")[0] == 250
        replies = client.data(b"Subject: a\x1b[2J\x07b\r\n\r\nbody\r\n")
    assert replies[0] == 250, replies
    for flags in ([], ["--list"]):
        shown = txco("trace", "--state-dir", server.state_dir, *flags)
        assert shown.returncode == 0, shown.stderr
        _no_raw_controls(shown.stdout)
    assert "a\\u001b[2J" in txco("trace", "--state-dir", server.state_dir).stdout


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_config_file_that_is_not_a_regular_file_is_refused(tmp_path: Path, rule: Path,
                                                            kind: str) -> None:
    config = Path("/dev/zero") if kind == "device" else _named_fifo(tmp_path, "txco.yaml")
    says = "a character device" if kind == "device" else "a FIFO"
    refused(txco("route", "x@acme.example", "--config", config, cwd=tmp_path), str(config), says)
    refused(txcl("lint", rule, "--config", config), str(config), says)


def test_the_json_views_escape_c1_controls_and_stay_the_same_json(tmp_path: Path) -> None:
    hostile = "a\x9b2Jb\u202ec\x7f"
    folder = _trace_with(tmp_path, json.dumps({"rid": "01J", "src": hostile}))
    (tmp_path / "status.json").write_text(json.dumps({"version": hostile, "pid": os.getpid()}))
    for command in (["trace", "--json"], ["trace", "--list", "--json"], ["status", "--json"],
                    ["trace"], ["trace", "--list"], ["status"]):
        shown = txco(*command, "--state-dir", tmp_path)
        assert shown.returncode == 0, (command, shown.stderr)
        assert not any(c in shown.stdout for c in "\x9b\u202e\x7f"), (command, shown.stdout)
        if "--json" in command:
            assert hostile in json.dumps(json.loads(shown.stdout), ensure_ascii=False)
    assert folder.is_dir()


def test_txco_serve_starts_with_a_symlink_loop_in_one_tenants_stage(serve, tmp_path: Path) -> None:
    # issue 13.4: the loop stopped the server from starting (an OSError traceback)
    ops = tmp_path / "OPS"
    for tenant in ("acme", "beta"):
        (ops / tenant / "_mail" / "0").mkdir(parents=True)
        (ops / tenant / "_mail" / "0" / "ok.txcl").write_text("SET @lmtp.res.code = 250\n")
    (ops / "acme" / "_mail" / "0" / "loop.txcl").symlink_to("loop.txcl")
    server = serve(tmp_path, ops, "ingress: {lmtp: {verified_domains: {acme.example: "
                   "{tenant: acme}, beta.example: {tenant: beta}}}}\n")
    server.wait_for_log(r"acme/_mail/0/loop.txcl: a symlink loop")
    with server.lmtp() as client:
        client.ehlo("client.example")
        assert client.mail("sender@example.com")[0] == 250
        assert client.rcpt("a@acme.example")[0] == 250
        assert client.rcpt("b@beta.example")[0] == 250
        first = client.data(b"Subject: hi\r\n\r\nbody\r\n")
        replies = [first[0], client.getreply()[0]]
    assert replies == [451, 250]  # the looping stack waits at Postfix; the other is served
    assert "Traceback" not in server.stderr()
