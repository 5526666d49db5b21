"""How `txco serve` writes its log: one line per record, `<local time>,<ms> <name> <LEVEL>
<message>`, to a stream (standard error).

A server logs a line or two per delivery, so the formatter keeps the text of the current
second and its format built once (`logging.Formatter` makes both again for every line), and
the handler writes each line with one `write`, flushing only a stream that would otherwise
hold it back. The lines are those `logging.basicConfig(format=...)` writes; exceptions and
stack traces are formatted by `logging.Formatter` itself.
"""

from __future__ import annotations

import io
import logging
import time
from typing import TextIO

LINE_FORMAT = "%(asctime)s {name} %(levelname)s %(message)s"


class LineFormatter(logging.Formatter):
    """`logging.Formatter(fmt)` with the default time format (`datefmt` None), faster.

    `fmt` is a %-style format; time is `%(asctime)s` as `logging.Formatter` shows it.
    """

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._fmt_text = fmt
        self._uses_time = self.usesTime()
        # (second, its local time text), replaced whole: threads may share a formatter.
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            cached = (second, time.strftime(self.default_time_format, self.converter(second)))
            self._second = cached
        if not self.default_msec_format:
            return cached[1]
        return self.default_msec_format % (cached[1], record.msecs)

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = record.getMessage()
        if self._uses_time:
            record.asctime = self.formatTime(record)
        return self._fmt_text % record.__dict__


class LineHandler(logging.StreamHandler[TextIO]):
    """A `logging.StreamHandler` that writes a record's line and its end in one `write`
    (under the handler's lock, as every handler emits) and flushes only a stream that does
    not write through to its file: standard error does, and a flush would only take the
    lock again for nothing."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._flush_each = not _writes_through(stream)

    def setStream(self, stream: TextIO) -> TextIO | None:
        old = super().setStream(stream)
        self._flush_each = not _writes_through(stream)
        return old

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            if self._flush_each:
                self.stream.flush()
        except RecursionError:  # as logging.StreamHandler: see its emit
            raise
        except Exception:
            self.handleError(record)


def _writes_through(stream: TextIO) -> bool:
    """Whether a `write` on `stream` reaches its file at once: a text stream that writes
    through to an unbuffered binary one (standard error, from Python 3.9)."""
    return bool(getattr(stream, "write_through", False)) and isinstance(
        getattr(stream, "buffer", None), io.RawIOBase)


def configure(stream: TextIO, name: str = "txco", level: int = logging.INFO) -> None:
    """Log records of `level` and above as lines on `stream`, as `logging.basicConfig`
    does: only when the root logger has no handler yet (a test's capture keeps its own)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = LineHandler(stream)
        handler.setFormatter(LineFormatter(LINE_FORMAT.format(name=name)))
        root.addHandler(handler)
        root.setLevel(level)
    # The line shows none of these record fields: skip finding them (the logging docs'
    # "Optimization" section): the caller's frame, the thread and process names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
