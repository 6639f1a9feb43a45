"""Instant restore: a disk that is usable at once while a snapshot is copied into it behind the scenes.

:class:`InstantRestoreNode` is a filter over the restore TARGET; its ``source`` is the snapshot (a
:class:`~cowbackup.repo.snapshot_node.SnapshotNode`).  It keeps one bit per chunk -- restored or not --
and is copy-before-write's mirror image, *copy-before-read*::

    read      chunks not restored yet are copied from the snapshot first, then the read goes to TARGET
    write     a chunk the write covers whole needs no copy: it is claimed (readers of it wait) and
              written, then counts as restored; a chunk it covers in part is copied first
    (zeros, discard) like a write
    status    a chunk not restored yet answers as the snapshot does (its zero chunks are holes)

:func:`restore_in_background` copies every chunk not restored yet, a few at a time, under a speed limit;
a read or a write never waits for it, only for the chunks it touches.  When every chunk is restored the
filter passes everything straight to TARGET.  One asyncio loop owns the state (no locks); a chunk being
copied or claimed has a future, which the requests that need it await.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from cowbackup.block.node import NO_FLAGS, BlockNode, Buffer, Extent, FilterNode, RequestFlags
from cowbackup.block.ratelimit import RateLimit
from cowbackup.repo.snapshot_node import SnapshotNode

#: Called with the bytes just restored by the background copy.
Progress = Callable[[int], None]


class InstantRestoreNode(FilterNode):
    driver_name = "instant-restore"
    reads_unchanged = False  # a read may have to wait for its chunks

    def __init__(
        self, node_name: str, source: BlockNode, chunk_size: int, *, target_reads_zero: bool
    ) -> None:
        super().__init__(node_name)
        self.source = source
        self.chunk_size = chunk_size
        self.target_reads_zero = target_reads_zero
        self._size = source.size
        count = -(-source.size // chunk_size)
        #: 1 where the chunk is in TARGET (restored, or written whole by a client).
        self.restored = bytearray(count)
        self.remaining = count
        #: Chunks being copied or claimed by a covering write: whoever needs them waits for the future.
        self._busy: dict[int, asyncio.Future[None]] = {}

    @property
    def size(self) -> int:
        return self.source.size  # TARGET may be larger (a block device): the disk is the snapshot's size

    def refresh_limits(self) -> None:
        super().refresh_limits()
        self._size = self.source.size

    @property
    def complete(self) -> bool:
        return self.remaining == 0

    def is_restored(self, position: int) -> bool:
        """True once chunk ``position`` is in TARGET for good (not being copied or claimed)."""
        return bool(self.restored[position]) and position not in self._busy

    def _range(self, offset: int, length: int) -> range:
        return range(offset // self.chunk_size, -(-(offset + length) // self.chunk_size))

    def _passes(self, op: str, offset: int, length: int, flags: RequestFlags) -> bool:
        if self.remaining == 0:
            return True
        span = self._range(offset, length)
        return 0 not in self.restored[span.start : span.stop] and not any(p in self._busy for p in span)

    async def _intercept(self, op: str, offset: int | None, length: int, flags: RequestFlags) -> None:
        if op == "read" and offset is not None:
            await self._ensure_all(self._range(offset, length))

    async def _ensure_all(self, positions: range) -> None:
        missing = [p for p in positions if not self.restored[p] or p in self._busy]
        if missing:
            await asyncio.gather(*(self.ensure(p) for p in missing))

    async def ensure(self, position: int) -> None:
        """Return once chunk ``position`` is in TARGET (copying it now unless it is or is being)."""
        while True:
            busy = self._busy.get(position)
            if busy is not None:
                await asyncio.shield(busy)
                continue
            if self.restored[position]:
                return
            await self._hold(position, self._copy(position))
            return

    async def _hold(self, position: int, work: Awaitable[None]) -> None:
        """Run ``work`` as the only user of chunk ``position``; it counts as restored if ``work`` ends
        normally.  Others that need the chunk wait meanwhile."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._busy[position] = future
        try:
            await work
            if not self.restored[position]:
                self.restored[position] = 1
                self.remaining -= 1
        finally:
            del self._busy[position]
            future.set_result(None)

    async def _copy(self, position: int) -> None:
        offset = position * self.chunk_size
        length = min(self.chunk_size, self._size - offset)
        if isinstance(self.source, SnapshotNode):
            # The chunk's plaintext as the repository gives it: no block status, no cache, no copy.
            data = await self.source.fetch_chunk(position)
            if data is not None:
                await self.child.write(offset, data)
            elif not self.target_reads_zero:
                await self.child.write_zeroes(offset, length, RequestFlags.MAY_UNMAP)
            return
        ext = await self.source.block_status(offset, length)
        if ext.is_zero and ext.length == length:
            if not self.target_reads_zero:
                await self.child.write_zeroes(offset, length, RequestFlags.MAY_UNMAP)
            return
        buf = bytearray(length)
        await self.source.read(offset, buf)
        await self.child.write(offset, buf)

    async def _write_through(self, offset: int, length: int, call: Callable[[], Awaitable[None]]) -> None:
        """A write, write-zeroes or discard: chunks it touches in part are copied first; chunks it covers
        whole are claimed for its duration instead (their old data does not matter any more)."""
        if self.remaining == 0:
            await call()
            return
        span = self._range(offset, length)
        cs = self.chunk_size
        whole = [p for p in span if p * cs >= offset and min((p + 1) * cs, self._size) <= offset + length]
        partial = [p for p in span if p not in whole]
        await asyncio.gather(*(self.ensure(p) for p in partial))
        # Copies or claims in flight on the whole chunks finish first -- all of them at once: between
        # waiting for one and claiming, another could start (the background copy), and the claims below
        # must be taken with no await in between.
        while busy := [self._busy[p] for p in whole if p in self._busy]:
            await asyncio.gather(*(asyncio.shield(b) for b in busy))
        claims = [p for p in whole if not self.restored[p]]
        loop = asyncio.get_running_loop()
        futures = {p: loop.create_future() for p in claims}
        self._busy.update(futures)
        try:
            await call()
            for p in claims:
                self.restored[p] = 1
                self.remaining -= 1
        finally:
            for p, future in futures.items():
                del self._busy[p]
                future.set_result(None)

    async def write(self, offset: int, data: Buffer, flags: RequestFlags = NO_FLAGS) -> None:
        length = memoryview(data).nbytes
        await self._write_through(
            offset, length, lambda: super(InstantRestoreNode, self).write(offset, data, flags)
        )

    async def write_zeroes(self, offset: int, length: int, flags: RequestFlags = NO_FLAGS) -> None:
        call = lambda: super(InstantRestoreNode, self).write_zeroes(offset, length, flags)  # noqa: E731
        await self._write_through(offset, length, call)

    async def discard(self, offset: int, length: int) -> None:
        await self._write_through(
            offset, length, lambda: super(InstantRestoreNode, self).discard(offset, length)
        )

    async def block_status(self, offset: int, length: int) -> Extent:
        if self.remaining == 0:
            return await super().block_status(offset, length)
        position = offset // self.chunk_size
        end = min(offset + length, (position + 1) * self.chunk_size)
        if self.restored[position] and position not in self._busy:
            return await super().block_status(offset, end - offset)
        return await self.source.block_status(offset, end - offset)


async def restore_in_background(
    node: InstantRestoreNode,
    *,
    speed: int = 0,
    workers: int = 0,
    progress: Progress | None = None,
) -> None:
    """Copy every chunk not restored yet, ``workers`` at a time (default: 64 MiB of chunks in flight, 4 to
    32 of them), at most ``speed`` bytes per second (0: no limit; QEMU's slices: a copy waits for the
    limit before it starts)."""
    workers = workers or max(4, min(32, (64 << 20) // node.chunk_size))
    limit = RateLimit(speed)
    report = progress or (lambda _n: None)
    window = asyncio.Semaphore(workers)
    cs = node.chunk_size

    async def one(position: int) -> None:
        try:
            already = node.is_restored(position)
            await node.ensure(position)
            if not already:
                report(min(cs, node.size - position * cs))
        finally:
            window.release()

    async with asyncio.TaskGroup() as tasks:
        for position in range(len(node.restored)):
            if node.restored[position]:
                continue
            await window.acquire()
            delay = limit.calculate_delay()
            if delay:  # the slice's quota is spent: its end admits the next copy
                await asyncio.sleep(delay / 1e9)
            limit.account(min(cs, node.size - position * cs))
            tasks.create_task(one(position))
