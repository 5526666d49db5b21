"""Micro-benchmark of parse_message on bench/lmtp's messages (what `smtp-source -l SIZE`
sends), with the needs of bench/lmtp's stack plus the trace's, and with every field.

usage: .venv/bin/python bench/message_bench.py [--root TREE] [SIZE ...]  (default 1024 102400)
--root imports `lmtp` from another checkout (e.g. /work/main) for a before/after comparison;
alternate the two runs, the machine is shared.
"""

from __future__ import annotations

import sys
import time
import timeit
from functools import partial
from pathlib import Path


def smtp_source_message(size: int) -> bytes:
    """Headers as smtp-source writes them, then `size` bytes of numbered lines of X."""
    head = (b"From: <alice@client.example>\r\nTo: <user@acme.example>\r\n"
            b"Date: Wed,  2 Dec 2026 10:23:45 +0000 (UTC)\r\n"
            b"Message-Id: <4ba8.0006.04f5@bench.example>\r\n"
            b"Subject: Re: [#1234] wifi keeps dropping\r\n\r\n")
    lines = []
    left = size
    number = 1
    while left > 0:
        width = min(78, left)
        lines.append(str(number % 10).encode() + b"X" * (width - 1) + b"\r\n")
        left -= width + 2
        number += 1
    return head + b"".join(lines)


def main(argv: list[str]) -> None:
    root = Path(__file__).resolve().parent.parent
    if argv[:1] == ["--root"]:
        root, argv = Path(argv[1]), argv[2:]
    sys.path.insert(0, str(root))
    from lmtp.message import EVERYTHING, MessageNeeds, parse_message

    # bench/lmtp's stack reads these; the trace adds id, date, subject and every header.
    bench_needs = MessageNeeds(frozenset({"id", "date", "subject", "headers", "from", "text"}))
    for size in [int(arg) for arg in argv] or [1024, 102400]:
        data = smtp_source_message(size)
        for label, needs in (("bench needs", bench_needs), ("everything", EVERYTHING)):
            number = max(20, 2_000_000 // max(size, 1000))
            run = partial(parse_message, data, needs)
            best = min(timeit.repeat(run, timer=time.thread_time, number=number, repeat=5))
            print(f"{root.name:>6} {size:>7} B  {label:<12} {best / number * 1e6:9.1f} µs/msg")


if __name__ == "__main__":
    main(sys.argv[1:])
