"""ULIDs for request ids: 48-bit millisecond time + 80 random bits, Crockford base32.

Sortable by creation time, so `requests/<rid>/` folders list in arrival order. Ids made in
the same millisecond by this process increase monotonically (the random part is bumped),
which keeps that order exact under load.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_BITS = 80
_RANDOM_LIMIT = 1 << _RANDOM_BITS

_lock = threading.Lock()
_last_ms = -1
_last_random = 0


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def new_ulid(now_ms: int | None = None) -> str:
    """A new 26-character ULID; `now_ms` (milliseconds since the epoch) is for tests."""
    global _last_ms, _last_random
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    with _lock:
        if ms <= _last_ms and _last_random + 1 < _RANDOM_LIMIT:
            ms = _last_ms
            rnd = _last_random + 1
        else:
            rnd = int.from_bytes(os.urandom(10), "big")
        _last_ms, _last_random = ms, rnd
    return _encode(ms, 10) + _encode(rnd, 16)


def ulid_time_ms(ulid: str) -> int:
    """The millisecond timestamp a ULID carries."""
    value = 0
    for char in ulid[:10].upper():
        value = value * 32 + _ALPHABET.index(char)
    return value
