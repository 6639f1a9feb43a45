"""A bounded map of byte ranges to values, for caching block status answers.

Two users:

* the ``file`` driver caches the ranges SEEK_DATA/SEEK_HOLE found to hold *data* (never holes: a stale
  data answer is harmless, reading a range that became a hole gives its zeros; a stale hole would make a
  reader skip real data).  It forgets a range before anything can turn it into a hole.
* the copy engine caches the source's whole status (data, zero, unallocated), which it only consults for
  clusters still to copy: those have not been written since the backup started, so the answer holds.

The ranges are disjoint and kept sorted, so a lookup is one bisect; neighbours with equal values merge.
Past ``capacity`` ranges the one farthest from the newest is dropped: readers mostly move forward, several
at once (NBD clients with many requests in flight, the copy engine's workers), so the ranges around the
newest are the ones asked next.
"""

from __future__ import annotations

import bisect
from typing import Generic, TypeVar

__all__ = ["ExtentCache"]

V = TypeVar("V")


class ExtentCache(Generic[V]):
    """Disjoint ``[start, end)`` ranges, each with a value.  Event-loop thread only."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._values: list[V] = []

    def __len__(self) -> int:
        return len(self._starts)

    def lookup(self, offset: int) -> tuple[int, V] | None:
        """``(end, value)`` of the cached range that contains ``offset``, or None."""
        i = bisect.bisect_right(self._starts, offset) - 1
        if i >= 0 and offset < self._ends[i]:
            return self._ends[i], self._values[i]
        return None

    def add(self, start: int, end: int, value: V) -> None:
        """Cache ``[start, end) -> value``, replacing what was known there."""
        if start >= end:
            return
        self.forget(start, end)
        i = bisect.bisect_left(self._starts, start)
        # Merge with a neighbour that touches and has the same value.
        if i > 0 and self._ends[i - 1] == start and self._values[i - 1] == value:
            i -= 1
            start = self._starts[i]
            self._remove(i)
        if i < len(self._starts) and self._starts[i] == end and self._values[i] == value:
            end = self._ends[i]
            self._remove(i)
        self._starts.insert(i, start)
        self._ends.insert(i, end)
        self._values.insert(i, value)
        self._trim(i)

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
        keep_v: list[V] = []
        if self._starts[lo] < start:
            keep_s.append(self._starts[lo])
            keep_e.append(start)
            keep_v.append(self._values[lo])
        if self._ends[hi - 1] > end:
            keep_s.append(end)
            keep_e.append(self._ends[hi - 1])
            keep_v.append(self._values[hi - 1])
        self._starts[lo:hi] = keep_s
        self._ends[lo:hi] = keep_e
        self._values[lo:hi] = keep_v
        self._trim(lo)  # a range split in two may go over capacity

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self._values.clear()

    def _remove(self, i: int) -> None:
        del self._starts[i], self._ends[i], self._values[i]

    def _trim(self, near: int) -> None:
        """Drop ranges at the end farther from index ``near`` while over capacity."""
        while len(self._starts) > self.capacity:
            far = 0 if near >= len(self._starts) // 2 else len(self._starts) - 1
            self._remove(far)
            near -= far == 0
