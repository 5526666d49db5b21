"""The `needs` marker: a missing program skips a test with one line on a newcomer's machine,
and fails it under CI (`CI=true`), where nothing may skip silently."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TOOLS, check_tools, tool_problem

REPO = Path(__file__).resolve().parent.parent


def test_a_missing_program_is_named_with_its_package(tmp_path: Path) -> None:
    problem = tool_problem("swaks", path=str(tmp_path))
    if problem is None:  # installed under /usr/sbin or /sbin, which are always searched
        pytest.skip("swaks is in a system folder")
    assert problem == "needs swaks (apt-get install swaks)"


def test_a_present_program_needs_nothing_unless_root_is_missing(tmp_path: Path) -> None:
    for program in TOOLS["postfix"].programs:
        fake = tmp_path / program
        fake.write_text("#!/bin/sh\n")
        fake.chmod(0o755)
    assert tool_problem("postfix", path=str(tmp_path), euid=0) is None
    assert tool_problem("postfix", path=str(tmp_path), euid=1000) == "needs root to run postfix"


def test_outside_ci_a_missing_program_skips_under_ci_it_fails(tmp_path: Path) -> None:
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        _check_postfix_as_a_user(tmp_path, ci=False)
    with pytest.raises(pytest.fail.Exception, match="CI=true, so nothing may skip: needs root"):
        _check_postfix_as_a_user(tmp_path, ci=True)


def _check_postfix_as_a_user(tmp_path: Path, *, ci: bool) -> None:
    for program in TOOLS["postfix"].programs:
        (tmp_path / program).write_text("#!/bin/sh\n")
        (tmp_path / program).chmod(0o755)
    check_tools(("postfix",), ci=ci, path=str(tmp_path), euid=1000)


def test_an_unknown_tool_name_fails_the_test_everywhere() -> None:
    with pytest.raises(pytest.fail.Exception, match="unknown tool"):
        check_tools(("sendmail",), ci=False)


@pytest.mark.parametrize(("ci", "outcome"), [("", "1 skipped"), ("true", "1 error")])
def test_the_marker_through_pytest(tmp_path: Path, ci: str, outcome: str) -> None:
    """A test marked needs("swaks") run by pytest where no swaks can be found."""
    if tool_problem("swaks", path=str(tmp_path / "bin")) is None:
        pytest.skip("swaks is in a system folder")
    test = tmp_path / "test_marked.py"
    test.write_text('import pytest\n\n@pytest.mark.needs("swaks")\ndef test_x():\n    pass\n')
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    needs(*tools): test\n")
    env = {**os.environ, "CI": ci, "PATH": str(tmp_path / "bin")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          str(test)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert outcome in run.stdout, run.stdout + run.stderr
    assert "needs swaks (apt-get install swaks)" in run.stdout
