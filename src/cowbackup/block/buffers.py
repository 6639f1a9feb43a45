"""Copy buffers, reused, under a memory budget.

A fresh ``bytearray`` costs a memset and, for large sizes, page faults and an unmap when it is freed --
for a copy loop moving gigabytes that was the largest cost on the event loop thread.  Reads overwrite
their buffer completely, so a buffer needs no zeroing between uses: the pool keeps freed buffers in
power-of-two size classes and hands them out again.

:class:`BufferCache` is the free list alone, for callers with a bound of their own (an NBD connection
receiving WRITE payloads has its limit on requests in flight).  :class:`BufferPool` adds a budget: it
bounds the bytes handed out at once (QEMU's 128 MiB for block-copy); a request larger than the budget
still passes when nothing else is out, so one huge task cannot dead-lock.  Both are owned by the event
loop; no locking.

A buffer goes back only when nothing can still read or write it: a request cancelled while a pool
thread was doing I/O on its buffer must drop the buffer, not give it back.
"""

from __future__ import annotations

import asyncio

_MIN_CLASS = 64 * 1024


def _size_class(n: int) -> int:
    return max(_MIN_CLASS, 1 << (n - 1).bit_length())


class BufferCache:
    """``memoryview``\\ s of exactly the asked length over buffers reused by size class.

    At most ``max_kept`` bytes of freed buffers are kept; beyond that a freed buffer is simply dropped.
    """

    def __init__(self, max_kept: int) -> None:
        self.max_kept = max_kept
        self.kept = 0
        self._free: dict[int, list[bytearray]] = {}

    def take(self, n: int) -> memoryview:
        """A buffer of ``n`` bytes (contents undefined)."""
        cls = _size_class(n)
        free = self._free.get(cls)
        if free:
            self.kept -= cls
            view = memoryview(free.pop())
        else:
            view = memoryview(bytearray(cls))
        return view if n == cls else view[:n]

    def give(self, view: memoryview) -> None:
        """Give back a buffer from :meth:`take`; the view must not be used afterwards."""
        buf = view.obj
        assert isinstance(buf, bytearray)
        view.release()
        cls = len(buf)
        if self.kept + cls <= self.max_kept:
            self.kept += cls
            free = self._free.get(cls)
            if free is None:
                free = self._free[cls] = []
            free.append(buf)

    def clear(self) -> None:
        """Drop the buffers kept for reuse (they are freed once no view refers to them)."""
        self._free.clear()
        self.kept = 0


class BufferPool:
    """A :class:`BufferCache` under a budget on the bytes handed out at once."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        # Everything handed out comes back, so the free list never holds more than the budget.
        self._cache = BufferCache(max_kept=budget + _size_class(budget))
        # Set when a buffer comes back, for the getters waiting then; made by the first of them, so
        # that giving back a buffer nobody waits for costs nothing (a copy per cluster gives one back).
        self._released: asyncio.Event | None = None

    async def get(self, n: int) -> memoryview:
        """A buffer of ``n`` bytes (contents undefined); waits while the budget is spent."""
        while (buf := self.get_nowait(n)) is None:
            if self._released is None:
                self._released = asyncio.Event()
            await self._released.wait()
        return buf

    def get_nowait(self, n: int) -> memoryview | None:
        """:meth:`get` without the wait: None while the budget is spent."""
        cls = _size_class(n)
        if self.used and self.used + cls > self.budget:
            return None
        self.used += cls
        return self._cache.take(n)

    def put(self, view: memoryview) -> None:
        """Give a buffer from :meth:`get` back.  The view must not be used afterwards."""
        self.used -= _size_class(len(view))
        self._cache.give(view)
        self._wake()

    def drop(self, view: memoryview) -> None:
        """Account for a buffer from :meth:`get` that must not be reused (something may still use it)."""
        self.used -= _size_class(len(view))
        self._wake()

    def _wake(self) -> None:
        # Every waiter looks at the budget again (those that still do not fit wait for the next one).
        if self._released is not None:
            self._released.set()
            self._released = None

    def clear(self) -> None:
        """Drop the buffers kept for reuse (they are freed once no view refers to them)."""
        self._cache.clear()
