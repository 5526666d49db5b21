"""The examples in the user documents are real: every TXCL block parses and compiles.

A fenced block marked ```txcl in docs/txcl.md or docs/lmtp.md must parse and compile as a
rule file. A block marked ```txcl-error shows a mistake: it must fail to load, and when a
```text block follows it directly, that block's first line is the error's first line, as
the loader prints it for a file named rule.txcl. Quoted stack test cases (```yaml blocks
holding `- name:`) must appear word for word in the example's tests, so the docs cannot
drift from the code.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from txcl.compiler import compile_file
from txcl.errors import TxclError
from txcl.parser import parse

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "docs" / "txcl.md", REPO / "docs" / "lmtp.md"]
EXAMPLE_TESTS = REPO / "examples" / "inbound-support-mailbox" / "OPS" / "acme" / "support" / "tests"
RULE_NAME = "rule.txcl"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[ \t]*$")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # of the opening fence
    lang: str
    text: str
    following_text: str | None  # the ```text block right after it, if any

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with the ```text block that follows it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    raw: list[tuple[int, int, str, str]] = []  # (open line, close line, lang, text)
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent = opening["indent"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
        raw.append((i + 1, end + 1, opening["lang"], "\n".join(body) + "\n"))
        i = end + 1
    blocks = []
    for index, (start, end, lang, text) in enumerate(raw):
        following = None
        if index + 1 < len(raw):
            next_start, _, next_lang, next_text = raw[index + 1]
            between = lines[end : next_start - 1]
            if next_lang == "text" and all(not line.strip() for line in between):
                following = next_text
        blocks.append(Block(path.name, start, lang, text, following))
    return blocks


def _blocks(*langs: str) -> list[Block]:
    return [b for doc in DOCS if doc.exists() for b in fenced_blocks(doc) if b.lang in langs]


def load(text: str) -> None:
    """Parse and compile one rule file; raises TxclError when it would not load."""
    compile_file(parse(text, RULE_NAME))


def test_the_language_reference_has_its_examples() -> None:
    langs = [b.lang for b in fenced_blocks(DOCS[0])]
    assert langs.count("txcl") >= 18
    assert langs.count("txcl-error") >= 8


@pytest.mark.parametrize("block", _blocks("txcl"), ids=lambda b: b.id)
def test_txcl_example_loads(block: Block) -> None:
    try:
        load(block.text)
    except TxclError as err:
        pytest.fail(f"{block.id}: the example does not load:\n{err}")


@pytest.mark.parametrize("block", _blocks("txcl-error"), ids=lambda b: b.id)
def test_txcl_error_example_fails_as_shown(block: Block) -> None:
    with pytest.raises(TxclError) as err:
        load(block.text)
    if block.following_text is not None:
        shown = block.following_text.splitlines()[0]
        assert str(err.value).splitlines()[0] == shown


def _case_blocks() -> list[Block]:
    return [b for b in _blocks("yaml") if "- name:" in b.text]


@pytest.mark.parametrize("block", _blocks("yaml"), ids=lambda b: b.id)
def test_yaml_example_is_yaml(block: Block) -> None:
    yaml.safe_load(block.text)


@pytest.mark.parametrize("block", _case_blocks(), ids=lambda b: b.id)
def test_quoted_test_case_is_in_the_example(block: Block) -> None:
    sources = [p.read_text(encoding="utf-8") for p in sorted(EXAMPLE_TESTS.glob("*.yaml"))]
    assert any(block.text in source for source in sources), (
        f"{block.id}: this test case is not (any more) in {EXAMPLE_TESTS}"
    )


def test_fenced_blocks_finds_indented_blocks_and_the_text_after_them(tmp_path: Path) -> None:
    doc = tmp_path / "probe.md"
    doc.write_text(
        "- item\n\n  ```txcl-error\n  WHEN\n  ```\n\n  ```text\n  rule.txcl:1:5: x\n  ```\n",
        encoding="utf-8",
    )
    block, text = fenced_blocks(doc)
    assert (block.lang, block.text, block.following_text) == ("txcl-error", "WHEN\n", "rule.txcl:1:5: x\n")
    assert text.lang == "text"


# --- docs/lmtp.md states what the code does ---------------------------------------------------

LMTP_DOC = REPO / "docs" / "lmtp.md"


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after `heading`."""
    section = text[text.index(heading) :]
    rows = []
    started = False
    for line in section.splitlines()[1:]:
        if line.startswith("|"):
            started = True
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif started:
            break
    return rows[2:]  # without the header and the |---| line


def _serve_parser() -> argparse.ArgumentParser:
    from lmtp.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    return commands.choices["serve"]


def test_every_serve_flag_is_in_the_quick_reference_with_its_default() -> None:
    rows = _table_rows(LMTP_DOC.read_text(encoding="utf-8"), "## Quick reference")
    documented = {row[0].strip("`").split()[0]: row[1] for row in rows}
    for action in _serve_parser()._actions:
        flags = [f for f in action.option_strings if f.startswith("--") and f != "--help"]
        if not flags:
            continue
        flag = flags[0]
        assert flag in documented, f"{flag} is missing from the quick reference"
        if isinstance(action.default, str) and action.default:
            shown = (f"`{action.default}`", f"`./{action.default}`")  # `./OPS`: a folder
            assert any(s in documented[flag] for s in shown), (flag, action.default)
    assert set(documented) <= {
        f for a in _serve_parser()._actions for f in a.option_strings
    }, "the quick reference names a flag txco serve does not have"


def test_enhanced_status_table_is_the_code_table() -> None:
    from lmtp.verdicts import ENHANCED

    rows = _table_rows(LMTP_DOC.read_text(encoding="utf-8"), "### Enhanced status codes")
    documented = {}
    for row in rows:
        for code, enhanced in ((row[0], row[1]), (row[3], row[4])):
            if code:
                documented[int(code)] = enhanced
    assert documented == dict(ENHANCED)


def test_fixed_reply_lines_are_quoted_exactly() -> None:
    from lmtp import session, verdicts

    text = LMTP_DOC.read_text(encoding="utf-8")
    for line in (
        session.R_NO_RULE,
        session.R_TOO_LARGE,
        session.R_TOO_MANY_RCPTS,
        verdicts.DEFAULT_DENY.line,
        verdicts.RUN_FAILED.line,
    ):
        assert line in text, line
