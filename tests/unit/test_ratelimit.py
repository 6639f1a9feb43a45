"""RateLimit against QEMU's ratelimit.h semantics, with an injected clock."""

from __future__ import annotations

import pytest

from cowbackup.block.ratelimit import SLICE_NS, RateLimit

MS = 1_000_000


def test_unlimited() -> None:
    limit = RateLimit()
    assert limit.slice_quota == 0
    limit.account(10**12, now_ns=0)
    assert limit.calculate_delay(now_ns=1) == 0


@pytest.mark.parametrize(
    ("speed", "quota"),
    [(1, 1), (9, 1), (10, 1), (15, 1), (100, 10), (65536, 6553), (262144, 26214), (10**12, 10**11)],
)
def test_quota_per_slice(speed: int, quota: int) -> None:
    assert RateLimit(speed).slice_quota == quota


def test_admission_within_slice() -> None:
    limit = RateLimit(1_000_000)  # 100_000 bytes per 100 ms slice
    t0 = 5 * SLICE_NS
    assert limit.calculate_delay(now_ns=t0) == 0
    limit.account(60_000, now_ns=t0)
    assert limit.calculate_delay(now_ns=t0 + 10 * MS) == 0
    limit.account(39_999, now_ns=t0 + 10 * MS)
    assert limit.calculate_delay(now_ns=t0 + 20 * MS) == 0  # 99_999 < quota


def test_overdraft_stretches_slice() -> None:
    limit = RateLimit(1_000_000)
    t0 = 1_000
    limit.account(60_000, now_ns=t0)
    limit.account(90_000, now_ns=t0 + 10 * MS)  # 150_000 dispatched = 1.5 slices
    assert limit.calculate_delay(now_ns=t0 + 20 * MS) == 150 * MS - 20 * MS
    assert limit.calculate_delay(now_ns=t0 + 149 * MS) == 1 * MS
    # At the stretched end the slice is not over yet (QEMU compares end < now), and it is still exhausted.
    assert limit.calculate_delay(now_ns=t0 + 150 * MS) == 0
    # Just after, a fresh slice starts with an empty account.
    assert limit.calculate_delay(now_ns=t0 + 150 * MS + 1) == 0
    limit.account(99_999, now_ns=t0 + 151 * MS)
    assert limit.calculate_delay(now_ns=t0 + 152 * MS) == 0
    limit.account(1, now_ns=t0 + 152 * MS)
    # Exactly the quota: 1 slice from the new slice's start (t0 + 150ms + 1).
    assert limit.calculate_delay(now_ns=t0 + 152 * MS) == 100 * MS + 1 - 2 * MS


def test_exact_quota_means_wait() -> None:
    limit = RateLimit(1_000_000)
    limit.account(100_000, now_ns=0)
    assert limit.calculate_delay(now_ns=0) == SLICE_NS


def test_one_big_request_is_admitted_then_waits() -> None:
    """A 1 MiB chunk under 64 KiB/s: admitted at once, then ~16 s of silence (QEMU test 185 pattern)."""
    limit = RateLimit(65536)
    assert limit.calculate_delay(now_ns=0) == 0
    limit.account(1 << 20, now_ns=0)
    delay = limit.calculate_delay(now_ns=0)
    assert delay == (1 << 20) * SLICE_NS // 6553
    assert 15 * 10**9 < delay < 17 * 10**9


def test_set_speed_keeps_slice() -> None:
    limit = RateLimit(1_000_000)
    limit.account(100_000, now_ns=0)
    limit.set_speed(2_000_000)  # quota 200_000: the same dispatch no longer exceeds it
    assert limit.speed == 2_000_000
    assert limit.calculate_delay(now_ns=1) == 0
    limit.set_speed(0)
    assert limit.calculate_delay(now_ns=2) == 0
    with pytest.raises(ValueError, match="non-negative"):
        limit.set_speed(-1)


def test_injected_clock() -> None:
    now = [10 * SLICE_NS]
    limit = RateLimit(1_000_000, clock=lambda: now[0])
    limit.account(200_000)
    assert limit.calculate_delay() == 2 * SLICE_NS
    now[0] += 2 * SLICE_NS + 1
    assert limit.calculate_delay() == 0


def test_default_clock() -> None:
    limit = RateLimit(1_000_000)
    limit.account(300_000)
    delay = limit.calculate_delay()
    assert 0 < delay <= 3 * SLICE_NS
