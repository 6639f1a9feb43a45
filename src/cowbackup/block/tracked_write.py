"""Write-type requests in flight on a node, tracked so that overlapping read-modify-write cycles serialise.

The node's request path (``BlockNode._track_write`` in :mod:`cowbackup.block.node`) makes one for each
write, write-zeroes and discard while the node's alignment is above 1, and waits on those it must follow.
"""

from __future__ import annotations

import asyncio


class TrackedWrite:
    """A write-type request in flight, for serialising read-modify-write cycles.

    ``start``/``end`` are the aligned bounds of the request.  Owned by the node's request path; lives
    from the request's start until its completion.  The event is made only when a request waits for
    this one (rarely): most writes never need it.
    """

    __slots__ = ("_done", "end", "serialising", "start")

    def __init__(self, start: int, end: int, serialising: bool) -> None:
        self.start = start
        self.end = end
        self.serialising = serialising
        self._done: asyncio.Event | None = None

    def must_follow(self, earlier: TrackedWrite) -> bool:
        """This request overlaps ``earlier`` and one of them is serialising."""
        return (
            self.start < earlier.end
            and earlier.start < self.end
            and (self.serialising or earlier.serialising)
        )

    async def wait(self) -> None:
        """Wait until this request completes (it is still in flight when this is called)."""
        if self._done is None:
            self._done = asyncio.Event()
        await self._done.wait()

    def complete(self) -> None:
        if self._done is not None:
            self._done.set()
