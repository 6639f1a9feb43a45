"""Pull-mode building blocks: ``copy-before-write`` opened with blockdev-add, and ``snapshot-access``.

The graph of every test, built with the same options a QMP client would send::

    guest (Root) ──> cbw ──file──> src (memory, 1 MiB)      <- the guest's edge was on src; cbw took it over
                      │ └─target─> tgt (memory, the scratch)
    snap ──file──────┘
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from cowbackup.block.drivers import open_node
from cowbackup.block.drivers.memory import MemoryNode
from cowbackup.block.errors import BlockError, RequestError
from cowbackup.block.filters.cbw import CopyBeforeWriteNode
from cowbackup.block.filters.fault import fault_append
from cowbackup.block.filters.snapshot_access import SnapshotAccessNode
from cowbackup.block.graph import BlockGraph, Root
from cowbackup.block.node import BlockNode

KiB = 1024
C = 64 * KiB
SIZE = 16 * C


class Setup:
    def __init__(self, graph: BlockGraph, src: MemoryNode, tgt: MemoryNode, guest: Root) -> None:
        self.graph = graph
        self.src = src
        self.tgt = tgt
        self.guest = guest
        self.original = b""

    @property
    def cbw(self) -> CopyBeforeWriteNode:
        node = self.graph.get("cbw")
        assert isinstance(node, CopyBeforeWriteNode)
        return node

    @property
    def snap(self) -> SnapshotAccessNode:
        node = self.graph.get("snap")
        assert isinstance(node, SnapshotAccessNode)
        return node

    async def add(self, options: dict[str, Any]) -> BlockNode:
        return await open_node(self.graph, options)

    async def fleece(self, file: str = "src", **cbw: Any) -> None:
        """Add cbw over ``file`` and snap over cbw; remember the disk as it was then."""
        self.original = self.src.snapshot()
        options = {"driver": "copy-before-write", "node-name": "cbw", "file": file, "target": "tgt"}
        await self.add({**options, **cbw})
        await self.add({"driver": "snapshot-access", "node-name": "snap", "file": "cbw", "discard": "unmap"})

    async def read_snap(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.snap.read(offset, buf)
        return bytes(buf)


async def _setup() -> Setup:
    graph = BlockGraph()
    src = await open_node(graph, {"driver": "memory", "node-name": "src", "size": SIZE, "discard": "unmap"})
    tgt = await open_node(graph, {"driver": "memory", "node-name": "tgt", "size": SIZE, "discard": "unmap"})
    assert isinstance(src, MemoryNode) and isinstance(tgt, MemoryNode)
    await src.write(0, os.urandom(SIZE // 2))  # the second half stays zeros
    guest = Root("guest")
    graph.attach(guest, "root", src)
    return Setup(graph, src, tgt, guest)


def run(test: Callable[[Setup], Awaitable[None]]) -> None:
    async def main() -> None:
        await test(await _setup())

    asyncio.run(main())


def test_guest_writes_go_through_the_filter_and_the_snapshot_stays() -> None:
    async def test(s: Setup) -> None:
        await s.fleece()
        assert s.guest.node is s.cbw and s.cbw.child is s.src
        await s.guest.node.write(C + 100, b"new" * 1000)
        await s.guest.node.write_zeroes(5 * C, 3 * C)
        await s.guest.node.discard(12 * C, C)
        assert await s.read_snap(0, SIZE) == s.original
        assert await s.read_snap(C + 50, 7) == s.original[C + 50 : C + 57]
        # The old data of exactly the touched clusters is in the scratch target.
        tgt = s.tgt.snapshot()
        for n in (1, 5, 6, 7, 12):
            assert tgt[n * C : (n + 1) * C] == s.original[n * C : (n + 1) * C]
        assert s.src.snapshot()[C + 100 : C + 103] == b"new"

    run(test)


def test_writes_to_the_snapshot_are_refused() -> None:
    async def test(s: Setup) -> None:
        await s.fleece()
        with pytest.raises(RequestError) as info:
            await s.snap.write(0, b"x")
        assert info.value.errno == errno.ENOTSUP
        with pytest.raises(RequestError) as info:
            await s.snap.write_zeroes(0, C)
        assert info.value.errno == errno.ENOTSUP
        assert s.src.snapshot() == s.original

    run(test)


def test_bitmap_limits_what_is_copied_and_readable() -> None:
    async def test(s: Setup) -> None:
        bm = s.src.dirty_bitmaps.create("b", 4 * KiB)
        bm.bits.set(2 * C + 4 * KiB, 4 * KiB)  # inside cluster 2: the whole cluster is in the snapshot
        bm.bits.set(9 * C, 2 * C)
        await s.fleece(bitmap={"node": "src", "name": "b"})
        bm.bits.set(0, SIZE)  # later changes to the named bitmap do not matter
        assert await s.read_snap(2 * C, C) == s.original[2 * C : 3 * C]
        assert await s.read_snap(9 * C, 2 * C) == s.original[9 * C : 11 * C]
        for offset, length in ((0, 1), (3 * C - 1, 2), (8 * C, 2 * C), (11 * C, 1)):
            with pytest.raises(RequestError) as info:
                await s.read_snap(offset, length)
            assert info.value.errno == errno.EACCES
        with pytest.raises(RequestError) as info:
            await s.snap.block_status(0, SIZE)
        assert info.value.errno == errno.EACCES
        # A write outside the bitmap copies nothing; inside, it saves the old data.
        await s.guest.node.write(0, b"\xff" * 2 * C)
        await s.guest.node.write(9 * C, b"\xee" * C)
        tgt = s.tgt.snapshot()
        assert tgt[: 2 * C] == bytes(2 * C)
        assert tgt[9 * C : 10 * C] == s.original[9 * C : 10 * C]
        assert await s.read_snap(9 * C, 2 * C) == s.original[9 * C : 11 * C]

    run(test)


def test_discard_frees_scratch_and_stops_copies() -> None:
    async def test(s: Setup) -> None:
        await s.fleece()
        await s.guest.node.write(2 * C, b"\x01" * 2 * C)  # clusters 2 and 3 copied to the scratch
        assert s.tgt.snapshot()[2 * C : 4 * C] == s.original[2 * C : 4 * C]
        await s.snap.discard(2 * C - 1, 3 * C + 2)  # inward: clusters 2, 3 and 4
        assert s.tgt.snapshot()[2 * C : 4 * C] == bytes(2 * C)  # memory discards read as zeros
        for offset in (2 * C, 4 * C):
            with pytest.raises(RequestError) as info:
                await s.read_snap(offset, 1)
            assert info.value.errno == errno.EACCES
        # The partial clusters at both ends were kept, and cluster 4 is no longer copied.
        assert await s.read_snap(C, C) == s.original[C : 2 * C]
        assert await s.read_snap(5 * C, C) == s.original[5 * C : 6 * C]
        await s.guest.node.write(4 * C, b"\x02" * C)
        assert s.tgt.snapshot()[4 * C : 5 * C] == bytes(C)
        assert s.cbw.bcs is not None and not s.cbw.bcs.bitmap.get(4 * C)

    run(test)


def test_discard_without_unmap_does_nothing() -> None:
    async def test(s: Setup) -> None:
        s.original = s.src.snapshot()
        await s.add({"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "tgt"})
        await s.add({"driver": "snapshot-access", "node-name": "snap", "file": "cbw"})
        await s.snap.discard(0, SIZE)
        assert await s.read_snap(0, SIZE) == s.original
        assert s.cbw.bcs is not None and s.cbw.bcs.bitmap.count() == SIZE

    run(test)


def test_block_status_reports_the_view() -> None:
    async def test(s: Setup) -> None:
        await s.fleece()
        half = SIZE // 2
        ext = await s.snap.block_status(half, half)
        assert ext.is_zero and not ext.is_data
        await s.guest.node.write(half + C, os.urandom(C))  # data where the snapshot has zeros
        ext = await s.snap.block_status(half, half)
        assert ext.is_zero and not ext.is_data and ext.length == C
        ext = await s.snap.block_status(half + C, C)
        assert ext.is_zero and not ext.is_data  # from the scratch, where the copy wrote zeros
        assert await s.read_snap(half, half) == bytes(half)
        ext = await s.snap.block_status(0, half)
        assert ext.is_data

    run(test)


def test_snapshot_read_holds_off_a_racing_guest_write() -> None:
    """A snapshot read of the source is stalled; a guest write to the same cluster saves the old data but
    does not reach the source until the read has finished."""

    async def test(s: Setup) -> None:
        fault = fault_append(s.graph, s.src, "slow")
        await s.fleece(file="slow")
        assert s.guest.node is s.cbw
        stall = fault.inject("read", stall=True)
        reader = asyncio.ensure_future(s.read_snap(3 * C, C))
        await stall.wait_hits(1)
        writer = asyncio.ensure_future(s.guest.node.write(3 * C, b"\x09" * C))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not writer.done()
        assert s.src.snapshot()[3 * C : 4 * C] == s.original[3 * C : 4 * C]
        assert s.tgt.snapshot()[3 * C : 4 * C] == s.original[3 * C : 4 * C]  # copied, then held
        stall.release()
        assert await reader == s.original[3 * C : 4 * C]
        await writer
        assert s.src.snapshot()[3 * C : 4 * C] == b"\x09" * C
        assert await s.read_snap(3 * C, C) == s.original[3 * C : 4 * C]  # now from the scratch

    run(test)


def test_break_snapshot_lets_the_guest_write_and_fails_reads() -> None:
    async def test(s: Setup) -> None:
        fault = fault_append(s.graph, s.tgt, "tgtf")
        fault.inject("any-write", errno=errno.ENOSPC)
        s.original = s.src.snapshot()
        await s.add(
            {
                "driver": "copy-before-write",
                "node-name": "cbw",
                "file": "src",
                "target": "tgtf",
                "on-cbw-error": "break-snapshot",
            }
        )
        await s.add({"driver": "snapshot-access", "node-name": "snap", "file": "cbw"})
        await s.guest.node.write(0, b"\x07" * C)
        assert s.src.snapshot()[:C] == b"\x07" * C
        with pytest.raises(RequestError) as info:
            await s.read_snap(8 * C, C)
        assert info.value.errno == errno.EACCES

    run(test)


def test_break_guest_write_fails_the_write_and_keeps_the_snapshot() -> None:
    async def test(s: Setup) -> None:
        fault = fault_append(s.graph, s.tgt, "tgtf")
        fault.inject("any-write", errno=errno.ENOSPC)
        s.original = s.src.snapshot()
        await s.add({"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "tgtf"})
        await s.add({"driver": "snapshot-access", "node-name": "snap", "file": "cbw"})
        with pytest.raises(RequestError) as info:
            await s.guest.node.write(0, b"\x07" * C)
        assert info.value.errno == errno.ENOSPC
        assert s.src.snapshot() == s.original
        assert await s.read_snap(0, SIZE) == s.original

    run(test)


def test_blockdev_del_in_reverse_order_and_busy_refusals() -> None:
    async def test(s: Setup) -> None:
        await s.fleece()
        export = Root("export 'snap'")
        s.graph.attach(export, "root", s.snap)
        for name, user in (("snap", "export 'snap'"), ("cbw", "node 'snap' (file)"), ("tgt", "node 'cbw'")):
            with pytest.raises(BlockError) as refused:
                await s.graph.remove(name)
            assert str(refused.value).startswith(f"Node '{name}' is busy: node is used by {user}")
        assert export.child is not None
        s.graph.detach(export.child)
        await s.graph.remove("snap")
        await s.guest.node.write(0, b"\x05" * C)  # still through the filter
        assert s.tgt.snapshot()[:C] == s.original[:C]
        await s.graph.remove("cbw")
        assert s.guest.node is s.src and [e.parent for e in s.src.parents] == [s.guest]
        await s.graph.remove("tgt")
        await s.guest.node.write(C, b"\x06" * C)  # straight to the source now
        assert sorted(s.graph.nodes) == ["src"]

    run(test)


def test_snapshot_access_over_a_node_without_a_snapshot() -> None:
    async def test(s: Setup) -> None:
        await s.add({"driver": "snapshot-access", "node-name": "snap", "file": "src"})
        with pytest.raises(RequestError) as info:
            await s.read_snap(0, 1)
        assert info.value.errno == errno.ENOTSUP

    run(test)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"on-cbw-error": "x"}, "Parameter 'on-cbw-error' does not accept value 'x'"),
        ({"cbw-timeout": -1}, "Parameter 'cbw-timeout' expects a value of at least 0"),
        ({"cbw-timeout": 1 << 32}, "Parameter 'cbw-timeout' expects uint32_t"),
        ({"bitmap": {"node": "nope", "name": "b"}}, "Node 'nope' not found"),
        ({"bitmap": {"node": "src", "name": "nope"}}, "Dirty bitmap 'nope' not found"),
        ({"bitmap": {"node": "src"}}, "Parameter 'bitmap.name' is missing"),
        ({"bitmap": {"node": "src", "name": "b", "x": 1}}, "Parameter 'bitmap.x' is unexpected"),
        ({"bogus": 1}, "Parameter 'bogus' is unexpected"),
        (
            {"bitmap": {"node": "tgt", "name": "bad"}},
            "Cannot create block-copy-state: Failed to merge bitmap 'bad' to internal copy-bitmap: "
            "Bitmap 'bad' is inconsistent and cannot be used",
        ),
    ],
)
def test_refused_options_leave_the_graph_alone(extra: dict[str, Any], message: str) -> None:
    async def test(s: Setup) -> None:
        s.tgt.dirty_bitmaps.create("bad", C).inconsistent = True
        with pytest.raises(BlockError) as info:
            await s.fleece(**extra)
        assert str(info.value) == message
        assert s.guest.node is s.src and s.graph.find("cbw") is None
        assert [e.parent for e in s.src.parents] == [s.guest]

    run(test)
