"""lmtp.ulid: request ids that sort by arrival."""

from __future__ import annotations

import re

from lmtp.ulid import new_ulid, ulid_time_ms

ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}\Z")


def test_shape_and_time_round_trip():
    rid = new_ulid(now_ms=1_779_717_600_000)
    assert ULID.match(rid)
    assert ulid_time_ms(rid) == 1_779_717_600_000


def test_ids_in_one_millisecond_still_increase():
    ids = [new_ulid(now_ms=1_800_000_000_000) for _ in range(1000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_ids_sort_by_time():
    early, late = new_ulid(now_ms=1_900_000_000_000), new_ulid(now_ms=1_900_000_000_001)
    assert early < late


def test_a_clock_that_steps_back_does_not_break_the_order():
    first = new_ulid(now_ms=2_000_000_000_000)
    second = new_ulid(now_ms=1_999_999_999_000)
    assert first < second
