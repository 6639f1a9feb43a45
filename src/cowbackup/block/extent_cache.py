"""A small cache of ranges known to hold data, for drivers whose block status query is costly.

Only *data* is cached, never holes: a stale data answer is harmless (reading a range that became a hole
gives its zeros), a stale hole would make a reader skip real data.  The owner forgets a range before
anything can turn it into a hole (discard, write-zeroes); plain writes never do.

The ranges are disjoint and kept sorted, so a lookup is one bisect.  Past ``capacity`` ranges the one
farthest from the newest is dropped: readers mostly move forward, several at once (NBD clients with many
requests in flight, the copy engine's workers), so the ranges around the newest are the ones asked next.
"""

from __future__ import annotations

import bisect

__all__ = ["DataExtentCache"]


class DataExtentCache:
    """Disjoint ``[start, end)`` ranges known to hold data.  Event-loop thread only."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def lookup(self, offset: int) -> int | None:
        """The end of the cached data range that contains ``offset``, or None."""
        i = bisect.bisect_right(self._starts, offset) - 1
        if i >= 0 and offset < self._ends[i]:
            return self._ends[i]
        return None

    def add(self, start: int, end: int) -> None:
        """Remember that ``[start, end)`` holds data (merged with the ranges it touches)."""
        if start >= end:
            return
        lo = bisect.bisect_left(self._ends, start)  # first range ending at or after start
        hi = bisect.bisect_right(self._starts, end)  # ranges before hi start at or before end
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]
        self._trim(lo)

    def forget(self, start: int, end: int) -> None:
        """Drop what is known about ``[start, end)``; the parts of ranges outside it stay."""
        if start >= end:
            return
        lo = bisect.bisect_right(self._ends, start)  # first range ending after start
        hi = bisect.bisect_left(self._starts, end)  # ranges before hi start before end
        if lo >= hi:
            return
        keep_s: list[int] = []
        keep_e: list[int] = []
        if self._starts[lo] < start:
            keep_s.append(self._starts[lo])
            keep_e.append(start)
        if self._ends[hi - 1] > end:
            keep_s.append(end)
            keep_e.append(self._ends[hi - 1])
        self._starts[lo:hi] = keep_s
        self._ends[lo:hi] = keep_e
        self._trim(lo)  # a range split in two may go over capacity

    def _trim(self, near: int) -> None:
        """Drop ranges at the end farther from index ``near`` while over capacity."""
        while len(self._starts) > self.capacity:
            far = 0 if near >= len(self._starts) // 2 else len(self._starts) - 1
            del self._starts[far], self._ends[far]
            near -= far == 0

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
