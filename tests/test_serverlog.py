"""txcl.chassis.serverlog: the server's log lines are logging.Formatter's, written whole."""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txcl.chassis import serverlog

FORMAT = serverlog.LINE_FORMAT.format(name="txco")


def record(created: float, level: int = logging.INFO, msg: str = "lmtp delivery %s %d",
           args: Any = ("x", 1), **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord("txco.lmtp", level, "(unknown file)", 0, msg, args, None)
    made.created = created
    made.msecs = int((created - int(created)) * 1000) + 0.0
    made.__dict__.update(extra)
    return made


def twin(made: logging.LogRecord) -> logging.LogRecord:
    return logging.makeLogRecord(dict(made.__dict__))


_TIMES = st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False)
_LEVELS = st.sampled_from([logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, 35])


@settings(max_examples=200, deadline=None)
@given(times=st.lists(_TIMES | st.sampled_from([1.0, 1.999, 2.0, 2.0005]), min_size=1,
                      max_size=12),
       levels=st.lists(_LEVELS, min_size=1, max_size=12), text=st.text(max_size=30))
def test_lines_are_those_of_logging_formatter_in_any_order_of_times(
        times: list[float], levels: list[int], text: str) -> None:
    """One formatter, times going back and forth: its cached second never leaks."""
    fast, reference = serverlog.LineFormatter(FORMAT), logging.Formatter(FORMAT)
    for created, level in zip(times, levels * len(times), strict=False):
        made = record(created, level, "%s <%r> %d%%", (text, text, 7))
        assert fast.format(made) == reference.format(twin(made))


def test_a_mapping_argument_and_no_arguments_format_as_logging_does() -> None:
    fast, reference = serverlog.LineFormatter(FORMAT), logging.Formatter(FORMAT)
    for made in (record(5.5, msg="a %(k)s", args=({"k": "v"},)), record(5.5, msg="100%", args=())):
        made = logging.makeLogRecord(dict(made.__dict__, args=made.args))
        assert fast.format(made) == reference.format(twin(made))


def test_exceptions_and_stacks_format_as_logging_does() -> None:
    fast, reference = serverlog.LineFormatter(FORMAT), logging.Formatter(FORMAT)
    try:
        raise ValueError("boom")
    except ValueError:
        info = sys.exc_info()
    with_exc = record(10.25, logging.ERROR, exc_info=info)
    with_stack = record(10.25, stack_info="Stack (most recent call last):\n  here")
    for made in (with_exc, with_stack):
        line = fast.format(made)
        assert line == reference.format(twin(made))
        assert "boom" in line or "here" in line


def test_an_explicit_date_format_is_logging_s() -> None:
    made = record(1234.5)
    assert serverlog.LineFormatter(FORMAT).formatTime(made, "%H:%M") == \
        logging.Formatter(FORMAT).formatTime(made, "%H:%M")


def test_a_stream_that_holds_lines_back_is_flushed_after_each() -> None:
    raw = io.BytesIO()
    buffered = io.TextIOWrapper(io.BufferedWriter(raw, 1 << 16), encoding="utf-8")
    handler = serverlog.LineHandler(buffered)
    handler.setFormatter(serverlog.LineFormatter("%(message)s"))
    handler.handle(record(1.0, msg="one", args=()))
    assert raw.getvalue() == b"one\n"  # not left in the 64 KiB buffer


def test_lines_from_many_threads_come_whole_and_in_each_thread_s_order(tmp_path: Any) -> None:
    path = tmp_path / "log"
    threads_n, lines_n = 8, 400
    with path.open("w", encoding="utf-8") as stream:
        handler = serverlog.LineHandler(stream)
        handler.setFormatter(serverlog.LineFormatter(FORMAT))
        logger = logging.Logger("txco.test")
        logger.addHandler(handler)
        start = threading.Barrier(threads_n)

        def write(thread: int) -> None:
            start.wait()
            for n in range(lines_n):
                logger.info("thread=%d line=%d %s", thread, n, "x" * (n % 50))

        workers = [threading.Thread(target=write, args=(t,)) for t in range(threads_n)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == threads_n * lines_n
    seen: dict[int, int] = {}
    for line in lines:
        _, _, _, level, text = line.split(" ", 4)
        thread, n, pad = text.split(" ")
        thread_n, line_n = int(thread.removeprefix("thread=")), int(n.removeprefix("line="))
        assert level == "INFO" and pad == "x" * (line_n % 50)
        assert line_n == seen.get(thread_n, -1) + 1  # in order, none lost
        seen[thread_n] = line_n
    assert seen == {t: lines_n - 1 for t in range(threads_n)}


def test_configure_keeps_a_handler_already_there_as_basic_config_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for flag in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, flag, getattr(logging, flag))
    root = logging.getLogger()
    kept = logging.NullHandler()
    monkeypatch.setattr(root, "handlers", [kept])
    serverlog.configure(io.StringIO())
    assert root.handlers == [kept]
    monkeypatch.setattr(root, "handlers", [])
    stream = io.StringIO()
    monkeypatch.setattr(root, "level", root.level)
    serverlog.configure(stream)
    assert [type(h) for h in root.handlers] == [serverlog.LineHandler]
    logging.getLogger("txco.lmtp").info("hello %s", "there")
    line = stream.getvalue()
    assert line.endswith(" txco INFO hello there\n") and line.count("\n") == 1


@pytest.mark.parametrize("unbuffered", [True, False])
def test_each_line_reaches_the_file_at_once(unbuffered: bool) -> None:
    """Standard error's kind of stream (writing through to an unbuffered file) needs no
    flush; one that writes through to a buffer gets one."""
    read, write = os.pipe()
    try:
        binary = io.FileIO(write, "w") if unbuffered else io.BufferedWriter(io.FileIO(write, "w"))
        stream = io.TextIOWrapper(binary, encoding="utf-8", write_through=True)
        handler = serverlog.LineHandler(stream)
        assert handler._flush_each is not unbuffered
        handler.setFormatter(serverlog.LineFormatter("%(message)s"))
        handler.handle(record(1.0, msg="through", args=()))
        assert os.read(read, 100) == b"through\n"
        stream.close()
    finally:
        os.close(read)


def test_standard_error_writes_through() -> None:
    assert serverlog._writes_through(sys.__stderr__)  # type: ignore[arg-type]
