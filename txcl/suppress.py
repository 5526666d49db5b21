"""Per-line suppression of lint findings: `# txcl: ignore[check-id]` (several ids separated by
commas) at the end of the line a finding points at, or alone on the line above it."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from txcl.errors import Problem

_IGNORE: Final = re.compile(r"#\s*txcl:\s*ignore\[([A-Za-z0-9_,\s-]+)\]")


def ignored_checks(line: str) -> frozenset[str]:
    found = _IGNORE.search(line)
    if found is None:
        return frozenset()
    return frozenset(part.strip() for part in found.group(1).split(",") if part.strip())


def unsuppressed(
    problems: Sequence[Problem], read: Callable[[str], str | None] | None = None
) -> list[Problem]:
    """The problems no suppression comment covers. `read(file)` gives a file's text (default:
    read it from disk; None when it cannot be read)."""
    reader = read or read_file
    lines: dict[str, list[str]] = {}
    out = []
    for p in problems:
        if p.pos is None or not p.check or p.pos.line < 1:
            out.append(p)
            continue
        if p.pos.file not in lines:
            text = reader(p.pos.file)
            lines[p.pos.file] = text.splitlines() if text is not None else []
        source = lines[p.pos.file]
        here = source[p.pos.line - 1] if p.pos.line <= len(source) else ""
        above = source[p.pos.line - 2] if 1 < p.pos.line <= len(source) + 1 else ""
        above_covers = above.lstrip().startswith("#") and p.check in ignored_checks(above)
        if p.check in ignored_checks(here) or above_covers:
            continue
        out.append(p)
    return out


def read_file(file: str) -> str | None:
    try:
        return Path(file).read_text("utf-8", "replace")
    except OSError:
        return None
