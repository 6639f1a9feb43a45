"""Byte-rate limiter with QEMU's semantics (include/qemu/ratelimit.h, as used by block-copy for ``speed``).

Time is cut into slices of 100 ms. Each slice may admit ``quota = max(1, speed * 0.1 s)`` bytes. A copy
asks ``calculate_delay()`` before it starts; if the current slice still has quota the answer is 0 and the
copy charges its bytes with ``account()`` -- charging happens at admission, so one large copy may overdraw
the slice. An overdrawn slice is stretched to ``dispatched / quota`` slices, and every caller waits until
the stretched slice ends::

    slice_start                       slice_start + 100ms        slice_end = start + dispatched/quota * 100ms
        |---- admitted, admitted -------------|------------ waiting ------------|  next slice starts at
                        ^ dispatched >= quota                                      the first call after end

``speed == 0`` means unlimited: every delay is 0 and nothing is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["SLICE_NS", "RateLimit"]

NS_PER_SEC = 1_000_000_000

# QEMU's BLOCK_COPY_SLICE_TIME.
SLICE_NS = 100_000_000


class RateLimit:
    """Admission control for ``speed`` bytes per second.

    ``clock`` returns nanoseconds on a monotonic scale (``time.monotonic_ns`` by default); every method
    also takes an explicit ``now_ns`` so that tests control time. Owned by one event loop; no locking.
    """

    def __init__(self, speed: int = 0, *, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        # -1 so that the first call always opens a slice, even with a test clock that starts at 0.
        self._slice_start = -1
        self._slice_end = -1
        self._dispatched = 0
        self._speed = 0
        self._quota = 0
        self.set_speed(speed)

    @property
    def speed(self) -> int:
        """The limit in bytes per second; 0 = unlimited."""
        return self._speed

    @property
    def slice_quota(self) -> int:
        """Bytes admitted per 100 ms slice; 0 when unlimited."""
        return self._quota

    def set_speed(self, speed: int) -> None:
        """Change the limit; takes effect for the next admission. The current slice is kept.

        Raises ``ValueError`` for a negative speed (the job layer reports the QMP error before this).
        """
        if speed < 0:
            raise ValueError(f"speed must be non-negative, got {speed}")
        self._speed = speed
        # QEMU computes speed * slice_ns / 1e9 in floating point and truncates; integer arithmetic gives
        # the same answer without float rounding for huge speeds.
        self._quota = 0 if speed == 0 else max(speed * SLICE_NS // NS_PER_SEC, 1)

    def calculate_delay(self, now_ns: int | None = None) -> int:
        """Nanoseconds to wait before the next admission; 0 if the current slice still has quota."""
        return self._charge(0, now_ns)

    def account(self, nbytes: int, now_ns: int | None = None) -> None:
        """Charge ``nbytes`` to the current slice (opening a new one if the last has ended)."""
        self._charge(nbytes, now_ns)

    def _charge(self, nbytes: int, now_ns: int | None) -> int:
        if self._quota == 0:
            return 0
        now = self._clock() if now_ns is None else now_ns
        if self._slice_end < now:
            # The previous (possibly stretched) slice is over: start accounting afresh.
            self._slice_start = now
            self._slice_end = now + SLICE_NS
            self._dispatched = 0
        self._dispatched += nbytes
        if self._dispatched < self._quota:
            return 0
        # Quota exceeded: stretch the slice by the overdraft and make everyone wait for its end.
        self._slice_end = self._slice_start + self._dispatched * SLICE_NS // self._quota
        return self._slice_end - now
