"""Messages that teach (issue 16.7), through the real CLI: `txcl test` shows compile errors
with the source line and caret as `txcl lint` does; RE2 refusals speak of the regex as
written, with the caret under what RE2 names; misspelt keywords get a did-you-mean; a NOT
that cannot start NOT IN says how to negate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from txcl.cli import main


def stage(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "OPS" / "acme" / "mail" / "0"
    folder.mkdir(parents=True)
    (folder / "10-rule.txcl").write_text(text)
    return tmp_path / "OPS"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


BAD_REGEX = "WHEN @lmtp.rcpt.0 =~ /^(a)\\1@/i\nSET @lmtp.res.code = 250\n"
CARET_UNDER_BACKREFERENCE = (
    "    WHEN @lmtp.rcpt.0 =~ /^(a)\\1@/i\n"  # the \1 is at column 27
    "                              ^\n"
)


@pytest.mark.parametrize(("command", "code"), [("test", "compile_error"), ("lint", "lint_error")])
def test_a_compile_error_shows_its_line_and_a_caret_under_what_re2_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, code: str
) -> None:
    ops = stage(tmp_path, BAD_REGEX)
    status, out, err = run(capsys, command, str(ops))
    assert status == 1
    rule = ops / "acme" / "mail" / "0" / "10-rule.txcl"
    shown = err if command == "test" else out  # test reports load problems on stderr
    assert (
        f"{rule}:1:27: txcl_{code}: RE2 cannot compile /^(a)\\1@/i: "
        "invalid escape sequence: \\1 (backreferences are not supported by RE2"
    ) in shown
    assert CARET_UNDER_BACKREFERENCE in shown


def test_a_misspelt_keyword_gets_a_did_you_mean_under_lint_and_test(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ops = stage(tmp_path, 'WHN @lmtp.rcpt.0 == "a@b"\nSET @lmtp.res.code = 250\n')
    _, out, _ = run(capsys, "lint", str(ops))
    assert ":1:1: txcl_lint_error: 'WHN' is not a keyword (did you mean WHEN?);" in out
    code, _, err = run(capsys, "test", str(ops))
    assert code == 1
    assert ":1:1: txcl_parse_error: 'WHN' is not a keyword (did you mean WHEN?);" in err
    assert "    WHN @lmtp.rcpt.0" in err


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "WHEN @a == 1 ADN @b == 2",
            ":1:14: txcl_lint_error: 'ADN' is not a keyword (did you mean AND?)",
        ),
        ("WHEN @a IM [1]", ":1:9: txcl_lint_error: 'IM' is not a keyword (did you mean IN?)"),
        ("SETT @a = 1", ":1:1: txcl_lint_error: 'SETT' is not a keyword (did you mean SET?)"),
        (  # the regex as written: no (?im) prefix
            "WHEN @lmtp.msg.subject =~ /re: (x/im",
            ":1:27: txcl_lint_error: RE2 cannot compile /re: (x/im: missing ): re: (x [compile]",
        ),
        (
            "WHEN @a NOT == 1",
            ":1:13: txcl_lint_error: NOT after a value starts NOT IN; to negate a comparison, "
            "put NOT first (NOT @a == 1); expected IN, found '=='",
        ),
    ],
)
def test_lint_hints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    ops = stage(tmp_path, f"{line}\nSET x.y = 1\n")
    _, out, _ = run(capsys, "lint", str(ops))
    assert message in out


def test_not_in_lints_clean_and_runs(tmp_path: Path) -> None:
    ops = stage(
        tmp_path,
        'WHEN @lmtp.rcpt NOT IN ["spam@acme.example"]\nSET @lmtp.res.code = 250\n',
    )
    done = subprocess.run(
        [sys.executable, "-m", "txcl.cli", "lint", str(ops)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 error(s), 0 warning(s)" in done.stdout
