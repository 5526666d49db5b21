"""Log lines that carry data: control characters escaped, repeats of the same error held back.

Anything a sender, a rule author or an op controls (an op's exception message, an address,
a header) may hold CR, LF, ESC or NUL; written raw, it forges a log line or drives the
terminal that shows the log. `escape_controls` makes it one line of plain text.
`RepeatLimiter` lets the same error through once per interval and counts what it held back,
so a message that fails the same way on every retry cannot fill the disk with log lines.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Final

DEFAULT_REPEAT_INTERVAL_S: Final = 10.0
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: object) -> str:
    """`text` (str() of it) with control characters, line and paragraph separators shown as
    `\\xNN` / `\\u2028`: one line that prints as it reads."""
    return _CONTROLS.sub(_escape, str(text))


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class RepeatLimiter:
    """`allow(key)`: True for a key's first line in an interval; after that False until the
    interval has passed. `held(key)` then says how many lines were held back meanwhile (to
    note on the next line let through). Bounded: at most `max_keys` keys are tracked."""

    def __init__(
        self,
        interval_s: float = DEFAULT_REPEAT_INTERVAL_S,
        *,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[object, tuple[float, int]] = {}  # key -> (let through at, held)

    def allow(self, key: object) -> tuple[bool, int]:
        """(let this line through?, lines of this key held back since the last one let through)."""
        if self.interval_s <= 0:
            return True, 0
        now = self._clock()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last[0] < self.interval_s:
                self._seen[key] = (last[0], last[1] + 1)
                return False, 0
            if last is None and len(self._seen) >= self._max_keys:
                self._seen.clear()
            self._seen[key] = (now, 0)
            return True, last[1] if last else 0
