"""``memory``: a disk held in a bytearray, for tests and demos.

Options: ``size`` (bytes, required) and every node's (:mod:`cowbackup.block.drivers`): with
``discard=unmap`` discards reach the driver (the default, ``ignore``, drops them).  Discard and
write-zeroes zero the bytes and mark the range unallocated, so block status reports holes the way a
sparse file would; the allocation map has 4 KiB granularity.
"""

from __future__ import annotations

from cowbackup.block.bitmap import DirtyBitmap
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode, Extent, RequestFlags, Status
from cowbackup.block.options import Options

_MAP_GRANULE = 4096


class MemoryNode(BlockNode):
    driver_name = "memory"

    def __init__(self, node_name: str, size: int, *, read_only: bool = False) -> None:
        super().__init__(node_name, read_only=read_only)
        self._size = size
        self.data = bytearray(size)
        # Set bits are allocated (written with data) granules; the rest read as zeros.
        self.allocated = DirtyBitmap(size, _MAP_GRANULE)

    async def _do_read(self, offset: int, buf: memoryview) -> None:
        buf[:] = memoryview(self.data)[offset : offset + len(buf)]

    async def _do_write(self, offset: int, data: memoryview, flags: RequestFlags) -> None:
        self.data[offset : offset + len(data)] = data
        self.allocated.set(offset, len(data))

    def _zero(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)
        self.allocated.reset_inward(offset, length)

    async def _do_write_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        self._zero(offset, length)

    async def _do_discard(self, offset: int, length: int) -> None:
        self._zero(offset, length)

    async def _do_block_status(self, offset: int, length: int) -> Extent:
        end = offset + length
        if self.allocated.get(offset):
            stop = self.allocated.next_clean(offset, end)
            return Extent(offset, (end if stop is None else stop) - offset, Status.DATA | Status.ALLOCATED)
        stop = self.allocated.next_dirty(offset, end)
        stop = end if stop is None else stop
        # A granule only partly zeroed is still allocated; report holes only where truly zero.
        return Extent(offset, stop - offset, Status.ZERO)

    def snapshot(self) -> bytes:
        """A copy of the contents (tests compare against it)."""
        return bytes(self.data)


async def open_node(graph: BlockGraph, node_name: str, opts: Options) -> BlockNode:
    size = opts.get_int("size", minimum=0)
    return MemoryNode(node_name, size, read_only=opts.base.read_only)
