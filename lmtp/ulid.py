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


_RANDOM_POOL_BYTES = 4096
# Every 10-bit value as its two base32 digits: a ULID is 13 lookups.
_DIGIT_PAIRS = tuple(_ALPHABET[i >> 5] + _ALPHABET[i & 31] for i in range(1024))
_PAIR_SHIFTS = tuple(range(120, -1, -10))


def _encode_ulid(ms: int, rnd: int) -> str:
    """The low 50 bits of `ms` then `rnd` (80 bits): 26 base32 digits, most significant first."""
    value = (ms & ((1 << 50) - 1)) << _RANDOM_BITS | rnd
    return "".join([_DIGIT_PAIRS[(value >> shift) & 1023] for shift in _PAIR_SHIFTS])


class UlidGenerator:
    """Monotonic within one generator: never goes back, even when the clock does."""

    def __init__(self, clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self._clock_ms = clock_ms
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0
        self._pool = b""  # random bytes drawn ahead: one system call per few hundred ids
        self._used = 0
        os.register_at_fork(after_in_child=self._forget_pool)

    def _forget_pool(self) -> None:
        self._pool = b""  # a forked worker must not repeat its parent's random parts

    def _random(self) -> int:
        if self._used + 10 > len(self._pool):
            self._pool, self._used = os.urandom(_RANDOM_POOL_BYTES), 0
        start, self._used = self._used, self._used + 10
        return int.from_bytes(self._pool[start : start + 10], "big")

    def __call__(self) -> str:
        ms = self._clock_ms()
        with self._lock:
            if ms <= self._last_ms and self._last_random + 1 < _RANDOM_LIMIT:
                ms, rnd = self._last_ms, self._last_random + 1
            else:
                rnd = self._random()
            self._last_ms, self._last_random = ms, rnd
        return _encode_ulid(ms, rnd)


new_ulid = UlidGenerator()
"""A new 26-character ULID from the process-wide generator."""
