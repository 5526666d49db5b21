"""ULIDs for request ids: 48-bit millisecond time + 80 random bits, Crockford base32.

Sortable by creation time, so `requests/<rid>/` folders list in arrival order. Ids made in
the same millisecond by this process increase monotonically (the random part is bumped),
which keeps that order exact under load.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_BITS = 80
_RANDOM_LIMIT = 1 << _RANDOM_BITS


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


class UlidGenerator:
    """Monotonic within one generator: never goes back, even when the clock does."""

    def __init__(self, clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self._clock_ms = clock_ms
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0

    def __call__(self) -> str:
        ms = self._clock_ms()
        with self._lock:
            if ms <= self._last_ms and self._last_random + 1 < _RANDOM_LIMIT:
                ms, rnd = self._last_ms, self._last_random + 1
            else:
                rnd = int.from_bytes(os.urandom(10), "big")
            self._last_ms, self._last_random = ms, rnd
        return _encode(ms, 10) + _encode(rnd, 16)


new_ulid = UlidGenerator()
"""A new 26-character ULID from the process-wide generator."""
