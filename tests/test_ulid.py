"""lmtp.ulid: request ids that sort by arrival."""

from __future__ import annotations

import os
import re
import time

from hypothesis import given
from hypothesis import strategies as st

from lmtp.ulid import UlidGenerator, _encode_ulid, new_ulid

ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}\Z")
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid_time_ms(ulid: str) -> int:
    """The millisecond timestamp a ULID carries: its first 10 characters, base 32."""
    value = 0
    for char in ulid[:10]:
        value = value * 32 + CROCKFORD.index(char)
    return value


def fixed_clock(*times_ms: int) -> UlidGenerator:
    ticks = iter(times_ms)
    return UlidGenerator(clock_ms=lambda: next(ticks))


def test_shape_and_time_round_trip():
    rid = fixed_clock(1_779_717_600_000)()
    assert ULID.match(rid)
    assert ulid_time_ms(rid) == 1_779_717_600_000


def test_process_wide_generator_uses_the_wall_clock():
    before = time.time_ns() // 1_000_000
    rid = new_ulid()
    assert ULID.match(rid)
    assert before <= ulid_time_ms(rid) <= time.time_ns() // 1_000_000 + 1


def test_ids_in_one_millisecond_still_increase():
    make = UlidGenerator(clock_ms=lambda: 1_800_000_000_000)
    ids = [make() for _ in range(1000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_ids_sort_by_time():
    make = fixed_clock(1_900_000_000_000, 1_900_000_000_001)
    early, late = make(), make()
    assert early < late
    assert ulid_time_ms(late) - ulid_time_ms(early) == 1


def test_a_clock_that_steps_back_does_not_break_the_order():
    make = fixed_clock(2_000_000_000_000, 1_999_999_999_000)
    first, second = make(), make()
    assert first < second


def reference_encoding(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(CROCKFORD[digit])
    return "".join(reversed(chars))


@given(st.integers(0, (1 << 50) - 1), st.integers(0, (1 << 80) - 1))
def test_the_one_pass_encoding_is_base32_digit_by_digit(ms: int, rnd: int) -> None:
    assert _encode_ulid(ms, rnd) == reference_encoding(ms, 10) + reference_encoding(rnd, 16)


def test_a_forked_worker_draws_random_parts_of_its_own() -> None:
    make = UlidGenerator(clock_ms=lambda: 1_800_000_000_000 + time.monotonic_ns())
    make()  # the parent's pool is filled now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id's random part, and leave at once
        os.write(write, make()[10:].encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    parent = make()[10:]
    assert len(child) == 16 and child != parent
