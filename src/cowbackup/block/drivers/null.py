"""``null-co``: a device that stores nothing (QEMU's null-co), for tests and benchmarks.

Options: ``size`` (default 1 GiB), ``read-zeroes`` (default off: reads leave the buffer untouched, as
QEMU's does, which is fastest for benchmarks), ``latency-ns`` (each request sleeps this long first, to
make timing-dependent tests deterministic).  Writes are accepted and dropped.  Every node's options
(:mod:`cowbackup.block.drivers`) are accepted too; ``cache.*`` and ``force-share`` do nothing here, and
discards are always dropped -- they mark no dirty bitmap even with ``discard=unmap``, as QEMU's null-co
has no discard of its own (checked against qemu-storage-daemon 7.2).
"""

from __future__ import annotations

import asyncio

from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode, Extent, RequestFlags, Status
from cowbackup.block.options import Options


class NullNode(BlockNode):
    driver_name = "null-co"

    def __init__(self, node_name: str, size: int, *, read_zeroes: bool, latency_ns: int) -> None:
        super().__init__(node_name)
        self._size = size
        self.read_zeroes = read_zeroes
        self.latency_ns = latency_ns

    async def _latency(self) -> None:
        if self.latency_ns:
            await asyncio.sleep(self.latency_ns / 1e9)

    async def _do_read(self, offset: int, buf: memoryview) -> None:
        await self._latency()
        if self.read_zeroes:
            buf[:] = bytes(len(buf))

    async def _do_write(self, offset: int, data: memoryview, flags: RequestFlags) -> None:
        await self._latency()

    async def _do_write_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        await self._latency()

    def discards_change_data(self) -> bool:
        # QEMU's null-co has no discard of its own, and bdrv_co_pdiscard drops a discard for such a
        # driver before tracking it, even with discard=unmap: no latency, no dirty bitmap marked.
        return False

    async def _do_flush(self) -> None:
        await self._latency()

    async def _do_block_status(self, offset: int, length: int) -> Extent:
        await self._latency()
        return Extent(offset, length, Status.ZERO if self.read_zeroes else Status.DATA)

    def describe(self) -> dict[str, object]:
        return {"file": "null-co://"}


async def open_node(graph: BlockGraph, node_name: str, opts: Options) -> BlockNode:
    size = opts.get_int("size", 1 << 30, minimum=0)
    read_zeroes = opts.get_bool("read-zeroes", False)
    latency_ns = opts.get_int("latency-ns", 0, minimum=0)
    node = NullNode(node_name, size, read_zeroes=read_zeroes, latency_ns=latency_ns)
    return node
