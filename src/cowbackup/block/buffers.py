"""Copy buffers, reused, under a memory budget.

A fresh ``bytearray`` costs a memset and, for large sizes, page faults and an unmap when it is freed --
for a copy loop moving gigabytes that was the largest cost on the event loop thread.  Reads overwrite
their buffer completely, so a buffer needs no zeroing between uses: the pool keeps freed buffers in
power-of-two size classes and hands them out again.

The budget bounds the bytes handed out at once (QEMU's 128 MiB for block-copy); a request larger than
the budget still passes when nothing else is out, so one huge task cannot dead-lock.  Owned by the event
loop; no locking.
"""

from __future__ import annotations

import asyncio

_MIN_CLASS = 64 * 1024


def _size_class(n: int) -> int:
    return max(_MIN_CLASS, 1 << (n - 1).bit_length())


class BufferPool:
    """Hands out ``memoryview``\\ s of exactly the asked length over reusable buffers."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._free: dict[int, list[bytearray]] = {}
        self._released = asyncio.Condition()

    async def get(self, n: int) -> memoryview:
        """A buffer of ``n`` bytes (contents undefined); waits while the budget is spent."""
        cls = _size_class(n)
        if self.used and self.used + cls > self.budget:
            async with self._released:
                await self._released.wait_for(lambda: not self.used or self.used + cls <= self.budget)
        self.used += cls
        free = self._free.get(cls)
        buf = free.pop() if free else bytearray(cls)
        return memoryview(buf)[:n]

    async def put(self, view: memoryview) -> None:
        """Give a buffer from :meth:`get` back.  The view must not be used afterwards."""
        buf = view.obj
        assert isinstance(buf, bytearray)
        view.release()
        cls = len(buf)
        self.used -= cls
        self._free.setdefault(cls, []).append(buf)
        async with self._released:
            self._released.notify_all()

    def clear(self) -> None:
        """Drop the buffers kept for reuse (they are freed once no view refers to them)."""
        self._free.clear()
