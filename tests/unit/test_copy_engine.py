"""The copy engine and the copy-before-write filter, below the job layer."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cowbackup.block import copy as copy_mod
from cowbackup.block import threadpool
from cowbackup.block.bitmap import DirtyBitmap
from cowbackup.block.copy import BlockCopyState, CopyCall, CopyCancelled, CopyError, _BusyClusters
from cowbackup.block.drivers import open_node
from cowbackup.block.drivers.memory import MemoryNode
from cowbackup.block.errors import RequestError
from cowbackup.block.filters.cbw import cbw_append, cbw_drop
from cowbackup.block.filters.fault import FaultNode
from cowbackup.block.graph import BlockGraph, Root
from cowbackup.block.node import BlockNode, Extent, RequestFlags, Status

MiB = 1 << 20
C = 64 * 1024


async def _memory(graph: BlockGraph, name: str, size: int) -> MemoryNode:
    # discard=unmap: the guests' discards must reach the disk (the default, ignore, drops them).
    node = await open_node(graph, {"driver": "memory", "node-name": name, "size": size, "discard": "unmap"})
    assert isinstance(node, MemoryNode)
    return node


async def _setup(size: int = 4 * MiB) -> tuple[BlockGraph, MemoryNode, MemoryNode, Root]:
    graph = BlockGraph()
    src = await _memory(graph, "src", size)
    tgt = await _memory(graph, "tgt", size)
    guest = Root("guest")
    graph.attach(guest, "root", src)
    return graph, src, tgt, guest


def test_insert_filter_repoints_all_parents_and_drop_restores() -> None:
    async def main() -> None:
        graph, src, _tgt, guest = await _setup()
        other = Root("export 'x'")
        graph.attach(other, "root", src)
        filt, _bcs = cbw_append(graph, "src", "tgt", filter_node_name="cbw0")
        assert guest.node is filt and other.node is filt
        assert filt.child is src and graph.get("cbw0") is filt
        await cbw_drop(graph, filt)
        assert {id(guest.node), id(other.node)} == {id(src)}
        assert graph.find("cbw0") is None
        assert [e.parent for e in src.parents] == [guest, other]

    asyncio.run(main())


def test_background_copy_copies_everything_and_keeps_holes() -> None:
    async def main() -> None:
        graph, src, tgt, _guest = await _setup(8 * MiB)
        await src.write(0, os.urandom(MiB))
        await src.write(5 * MiB + 100, b"x" * 5000)
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.bitmap.set_all()
        done: list[int] = []
        bcs.on_progress = done.append
        await bcs.copy(CopyCall(0, src.size, max_workers=4))
        assert tgt.snapshot() == src.snapshot()
        assert sum(done) == 8 * MiB
        assert bcs.remaining() == 0
        # Zero areas of the source were not written as data.
        data = [e async for e in tgt.extents() if e.is_data]
        assert data[0].length == MiB
        await cbw_drop(graph, filt)

    asyncio.run(main())


def test_guest_writes_during_copy_keep_point_in_time() -> None:
    async def main() -> None:
        rng = random.Random(7)
        graph, src, tgt, guest = await _setup(8 * MiB)
        await src.write(0, rng.randbytes(8 * MiB))
        before = src.snapshot()
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.bitmap.set_all()
        expected = bytearray(before)

        async def writer() -> None:
            for _ in range(300):
                off = rng.randrange(0, src.size - 9000)
                kind = rng.randrange(3)
                n = rng.randrange(1, 9000)
                if kind == 0:
                    data = rng.randbytes(n)
                    await guest.node.write(off, data)
                    expected[off : off + n] = data
                elif kind == 1:
                    await guest.node.write_zeroes(off, n)
                    expected[off : off + n] = bytes(n)
                else:
                    await guest.node.discard(off, n)
                    expected[off : off + n] = bytes(n)
                await asyncio.sleep(0)

        await asyncio.gather(writer(), bcs.copy(CopyCall(0, src.size, max_workers=3, max_chunk=C)))
        await cbw_drop(graph, filt)
        assert tgt.snapshot() == before
        assert src.snapshot() == bytes(expected)

    asyncio.run(main())


def test_failed_read_redirties_and_reports_read_error() -> None:
    async def main() -> None:
        graph = BlockGraph()
        await _memory(graph, "mem", 2 * MiB)
        fault = await open_node(graph, {"driver": "fault-inject", "node-name": "src", "file": "mem"})
        assert isinstance(fault, FaultNode)
        await fault.write(0, b"\1" * 2 * MiB)
        await _memory(graph, "tgt", 2 * MiB)
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.bitmap.set_all()
        fault.inject("read", nth=1, errno=errno.EIO)
        with pytest.raises(CopyError) as info:
            await bcs.copy(CopyCall(0, 2 * MiB, max_workers=1, max_chunk=C))
        assert info.value.is_read and info.value.errno == errno.EIO
        assert bcs.bitmap.get(0)
        # A retry copies everything.
        await bcs.copy(CopyCall(0, 2 * MiB))
        assert bcs.remaining() == 0
        await cbw_drop(graph, filt)

    asyncio.run(main())


def test_break_guest_write_fails_the_write_and_keeps_source() -> None:
    async def main() -> None:
        graph = BlockGraph()
        src = await _memory(graph, "src", MiB)
        await src.write(0, b"\2" * MiB)
        await _memory(graph, "mem", MiB)
        fault = await open_node(graph, {"driver": "fault-inject", "node-name": "tgt", "file": "mem"})
        assert isinstance(fault, FaultNode)
        guest = Root("guest")
        graph.attach(guest, "root", src)
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.bitmap.set_all()
        fault.inject("write", nth=1, errno=errno.ENOSPC)
        with pytest.raises(RequestError) as info:
            await guest.node.write(100, b"new")
        assert info.value.errno == errno.ENOSPC
        assert src.snapshot()[100:103] == b"\2\2\2"
        # The cluster is still to be copied; the next write copies it and goes through.
        await guest.node.write(100, b"new")
        assert src.snapshot()[100:103] == b"new"
        await cbw_drop(graph, filt)

    asyncio.run(main())


def test_break_snapshot_lets_the_write_through_and_reports() -> None:
    async def main() -> None:
        graph = BlockGraph()
        src = await _memory(graph, "src", MiB)
        await _memory(graph, "mem", MiB)
        fault = await open_node(graph, {"driver": "fault-inject", "node-name": "tgt", "file": "mem"})
        assert isinstance(fault, FaultNode)
        guest = Root("guest")
        graph.attach(guest, "root", src)
        filt, bcs = cbw_append(graph, "src", "tgt", on_cbw_error="break-snapshot")
        bcs.bitmap.set_all()
        await src.write(0, b"\3" * MiB)
        broken: list[OSError] = []
        filt.on_snapshot_error = broken.append
        fault.inject("any-write", nth=1, errno=errno.EIO)
        await guest.node.write(0, b"guest")
        assert src.snapshot()[:5] == b"guest"
        assert len(broken) == 1 and filt.snapshot_error is not None
        await cbw_drop(graph, filt)

    asyncio.run(main())


def test_cbw_timeout_fails_guest_write_with_etimedout() -> None:
    async def main() -> None:
        graph = BlockGraph()
        src = await _memory(graph, "src", MiB)
        await src.write(0, b"\4" * MiB)
        await _memory(graph, "mem", MiB)
        fault = await open_node(graph, {"driver": "fault-inject", "node-name": "tgt", "file": "mem"})
        assert isinstance(fault, FaultNode)
        guest = Root("guest")
        graph.attach(guest, "root", src)
        filt, bcs = cbw_append(graph, "src", "tgt", cbw_timeout=1)
        bcs.bitmap.set_all()
        rule = fault.inject("any-write", nth=1, stall=True)
        with pytest.raises(RequestError) as info:
            await guest.node.write(0, b"late")
        assert info.value.errno == errno.ETIMEDOUT
        rule.release()
        await cbw_drop(graph, filt)
        assert not filt._background

    asyncio.run(main())


async def _faulty_target(data: bytes) -> tuple[BlockGraph, MemoryNode, MemoryNode, FaultNode, Root]:
    """A memory source holding ``data`` written by a guest, and a memory target ``mem`` under a fault
    filter ``tgt``: (graph, source, target, filter, guest)."""
    graph = BlockGraph()
    src = await _memory(graph, "src", len(data))
    await src.write(0, data)
    tgt = await _memory(graph, "mem", len(data))
    fault = await open_node(graph, {"driver": "fault-inject", "node-name": "tgt", "file": "mem"})
    assert isinstance(fault, FaultNode)
    guest = Root("guest")
    graph.attach(guest, "root", src)
    return graph, src, tgt, fault, guest


def test_overlapping_guest_write_waits_for_copy_in_flight() -> None:
    async def main() -> None:
        graph, src, tgt, fault, guest = await _faulty_target(b"\5" * MiB)
        before = src.snapshot()
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.bitmap.set_all()
        rule = fault.inject("any-write", nth=1, stall=True)
        background = asyncio.ensure_future(bcs.copy(CopyCall(0, C, max_workers=1)))
        await rule.wait_hits(1)
        write = asyncio.ensure_future(guest.node.write(10, b"guest"))
        await asyncio.sleep(0.05)
        assert not write.done() and src.snapshot() == before
        rule.release()
        await asyncio.gather(background, write)
        assert tgt.snapshot()[:C] == before[:C]
        assert src.snapshot()[10:15] == b"guest"
        await cbw_drop(graph, filt)

    asyncio.run(main())


def test_cancelled_call_raises_and_leaves_rest_dirty() -> None:
    async def main() -> None:
        graph = BlockGraph()
        await open_node(
            graph, {"driver": "null-co", "node-name": "src", "size": 64 * MiB, "latency-ns": 1000000}
        )
        await open_node(graph, {"driver": "null-co", "node-name": "tgt", "size": 64 * MiB})
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.bitmap.set_all()
        call = CopyCall(0, 64 * MiB, max_workers=1, max_chunk=C)
        task = asyncio.ensure_future(bcs.copy(call))
        await asyncio.sleep(0.02)
        call.cancel()
        with pytest.raises(CopyCancelled):
            await task
        assert 0 < bcs.remaining() < 64 * MiB
        assert bcs.in_flight_bytes == 0
        await cbw_drop(graph, filt)

    asyncio.run(main())


def test_write_to_copied_clusters_passes_while_an_unrelated_copy_is_in_flight() -> None:
    """The filter's fast path: a write whose clusters are copied (and marked done) neither copies nor
    waits, whatever is in flight elsewhere; a write overlapping the copy in flight waits for it; a write
    to a cluster not copied yet copies it first."""

    async def main() -> None:
        graph, src, tgt, fault, guest = await _faulty_target(os.urandom(MiB))
        before = src.snapshot()
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.bitmap.set_all()
        await guest.node.write(0, b"first")  # copies cluster 0 and marks it done: not the fast path
        assert filt.passed == 0 and not bcs.bitmap.get(0)
        rule = fault.inject("any-write", nth=1, stall=True)
        background = asyncio.ensure_future(bcs.copy(CopyCall(8 * C, C, max_workers=1)))
        await rule.wait_hits(1)
        assert bcs.in_flight_bytes == C
        # Cluster 0 again: straight through, without even suspending.
        write = guest.node.write(100, b"fast")
        with pytest.raises(StopIteration):
            write.send(None)
        assert filt.passed == 1 and src.snapshot()[100:104] == b"fast"
        # Overlapping the stalled copy: waits for it.
        overlapping = asyncio.ensure_future(guest.node.write(8 * C + 5, b"late"))
        await asyncio.sleep(0.02)
        assert (
            not overlapping.done() and src.snapshot()[8 * C + 5 : 8 * C + 9] == before[8 * C + 5 : 8 * C + 9]
        )
        # A cluster not copied yet: its old data goes to the target first.
        await guest.node.write(4 * C + 1, b"new")
        assert tgt.snapshot()[4 * C : 5 * C] == before[4 * C : 5 * C] and not bcs.bitmap.get(4 * C)
        assert filt.passed == 1
        rule.release()
        await asyncio.gather(background, overlapping)
        assert tgt.snapshot()[8 * C : 9 * C] == before[8 * C : 9 * C]
        assert src.snapshot()[8 * C + 5 : 8 * C + 9] == b"late"
        await cbw_drop(graph, filt)

    asyncio.run(main())


def test_speed_limit_paces_background_and_charges_guest_copies() -> None:
    """The limiter's decisions, not wall-clock time: sleeps requested add up to bytes / speed.

    Copies for a guest write never wait but are charged (QEMU's block-copy), so the background copy
    after them waits for their bytes too.
    """

    slept: list[int] = []

    class RecordingState(BlockCopyState):
        async def _sleep(self, call: CopyCall, delay_ns: int) -> None:
            slept.append(delay_ns)
            await super()._sleep(call, delay_ns)

    async def main() -> None:
        graph = BlockGraph()
        src: BlockNode = await _memory(graph, "src", 4 * MiB)
        await src.write(0, b"\6" * 4 * MiB)
        await _memory(graph, "tgt", 4 * MiB)
        guest = Root("guest")
        graph.attach(guest, "root", src)
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs = RecordingState(bcs.source, bcs.target, bcs.cluster_size)
        filt.bcs = bcs
        bcs.bitmap.set_all()
        bcs.set_speed(8 * MiB)  # a 100 ms slice admits about 0.8 MiB
        await guest.node.write(3 * MiB, b"x" * MiB)  # a guest copy never waits ...
        assert slept == []
        assert bcs.ratelimit.calculate_delay() > 0  # ... but 1 MiB overdrew the 0.8 MiB slice
        await bcs.copy(CopyCall(0, 2 * MiB, max_chunk=C))
        # 1 + 2 MiB at 8 MiB/s is 0.375 s of slices, less what the last slice admits for free; the
        # background copy alone would sleep about 0.15 s.
        total = sum(slept) / 1e9
        assert 0.25 < total < 0.5, total
        await cbw_drop(graph, filt)

    asyncio.run(main())


def _count_block_status(monkeypatch: pytest.MonkeyPatch, node: BlockNode) -> list[tuple[int, int]]:
    """Record every block-status query the copy engine sends ``node``."""
    calls: list[tuple[int, int]] = []
    real = node.block_status

    async def counted(offset: int, length: int) -> Extent:
        calls.append((offset, length))
        return await real(offset, length)

    monkeypatch.setattr(node, "block_status", counted)
    return calls


def test_short_dirty_runs_are_copied_without_block_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """An incremental backup's scattered clusters: no status query each, holes and zeros stay sparse."""

    async def main() -> None:
        graph, src, tgt, _guest = await _setup(8 * MiB)
        rng = random.Random(3)
        await src.write(0, rng.randbytes(2 * MiB))
        await src.write_zeroes(C, C)  # written zeros inside the data
        calls = _count_block_status(monkeypatch, src)
        filt, bcs = cbw_append(graph, "src", "tgt")
        # Data clusters, the zero cluster, a run of two, and clusters of the hole after 2 MiB.
        dirty = [0, C, 5 * C, 6 * C, 20 * C, 40 * C, 41 * C, 100 * C]
        for offset in dirty:
            bcs.bitmap.set(offset, C)
        done: list[int] = []
        bcs.on_progress = done.append
        await bcs.copy(CopyCall(0, src.size))
        assert calls == []
        assert sum(done) == len(dirty) * C
        assert bcs.remaining() == 0
        source, target = src.snapshot(), tgt.snapshot()
        expected = bytearray(len(source))
        for offset in dirty:
            expected[offset : offset + C] = source[offset : offset + C]
        assert target == bytes(expected)
        # Only the dirty clusters that hold data were written as data.
        data = {(e.offset, e.length) async for e in tgt.extents() if e.is_data}
        assert data == {(0, C), (5 * C, 2 * C), (20 * C, C)}
        await cbw_drop(graph, filt)

    asyncio.run(main())


def test_long_runs_and_sync_top_ask_block_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """Holes are found by block status, and sync=top must see what is unallocated."""

    async def main() -> None:
        graph, src, tgt, _guest = await _setup(8 * MiB)
        await src.write(0, os.urandom(MiB))
        calls = _count_block_status(monkeypatch, src)
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.bitmap.set_all()
        await bcs.copy(CopyCall(0, src.size, max_chunk=C))
        # Every area is a full chunk, so the status is asked -- once per extent (data, then the hole
        # after 1 MiB), to the end of the disk: the answer is kept for the clusters still to copy.
        assert calls == [(0, src.size), (MiB, src.size - MiB)]
        assert tgt.snapshot() == src.snapshot()
        await cbw_drop(graph, filt)

        calls.clear()
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.skip_unallocated = True
        bcs.bitmap.set(4 * MiB, C)  # one short run: only the status can tell whether it is allocated
        await bcs.copy(CopyCall(0, src.size))
        assert calls == [(4 * MiB, src.size - 4 * MiB)]
        await cbw_drop(graph, filt)

    asyncio.run(main())


def test_pass_cache_answers_only_while_nothing_changed() -> None:
    """The filter's pass cache: a write inside a cluster that passed the full test before is waved
    through without asking the bitmaps again; once the copy bitmap is dirtied there, or ``done`` is
    cleaned, the next write takes the full test -- and copies the old data first where it must."""

    async def main() -> None:
        graph, src, tgt, guest = await _setup()
        await src.write(0, os.urandom(C))
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.bitmap.set_all()
        asked: list[int] = []
        full_test = filt._passes

        def spy(op: str, offset: int, length: int, flags: RequestFlags) -> bool:
            asked.append(offset)
            return full_test(op, offset, length, flags)

        filt._passes = spy  # type: ignore[method-assign]
        await guest.node.write(0, b"a")  # copies cluster 0 and marks it done
        await guest.node.write(1, b"b")  # passes the full test, and is remembered
        await guest.node.write(2, b"c")  # the cache
        await guest.node.write(C - 1, b"d")  # the cache: same cluster
        assert asked == [0, 1] and filt.passed == 3
        # A write across two clusters always takes the full test.
        await guest.node.write(C - 1, b"ef")
        assert asked[-1] == C - 1 and not bcs.bitmap.get(C) and filt.passed == 3
        # The copy bitmap dirtied again (as re-seeding it would): the old data is copied anew.
        asked.clear()
        before = src.snapshot()[:C]
        bcs.bitmap.set(0, C)
        await guest.node.write(3, b"g")
        assert asked == [3] and filt.passed == 3
        assert tgt.snapshot()[:C] == before and not bcs.bitmap.get(0)
        await guest.node.write(4, b"h")
        await guest.node.write(5, b"i")
        assert asked == [3, 4] and filt.passed == 5
        # ``done`` cleaned there: the full test again, which marks it done again.
        assert filt.done is not None
        filt.done.reset(0, C)
        await guest.node.write(6, b"j")
        assert asked == [3, 4, 6] and filt.passed == 5 and filt.done.get(0)
        # Writes past the end are refused as before, whatever the cache holds.
        with pytest.raises(RequestError):
            await guest.node.write(src.size, b"k")
        await cbw_drop(graph, filt)

    asyncio.run(main())


def test_bitmap_change_stamps_move_with_changes_only() -> None:
    """``dirtied``/``cleaned`` move when a granule changes that way, and never repeat across bitmaps."""
    a = DirtyBitmap(MiB, C)
    d0, c0 = a.dirtied, a.cleaned
    a.reset(0, C)  # already clean: nothing changed
    assert (a.dirtied, a.cleaned) == (d0, c0)
    a.set(0, 1)
    assert a.dirtied > d0 and a.cleaned == c0
    d1 = a.dirtied
    a.set(0, C)  # already dirty
    assert a.dirtied == d1
    a.reset(0, C)
    assert a.cleaned > c0 and a.dirtied == d1
    b = DirtyBitmap(MiB, C)
    b.set(C, C)
    a.merge(b)
    assert a.dirtied > d1
    copy = a.copy()
    assert copy.dirtied not in (a.dirtied, a.cleaned) and copy.dirtied > b.dirtied


# -- a guest write's first touch: the whole range claimed as one task, without the copy loop ----------


def _completes_at_once(write: Coroutine[Any, Any, None]) -> None:
    """Run ``write`` to its end without an event-loop turn (memory nodes never suspend)."""
    with pytest.raises(StopIteration):
        write.send(None)


def test_first_touch_copies_its_clusters_as_one_task() -> None:
    async def main() -> None:
        graph, src, tgt, guest = await _setup()
        await src.write(0, os.urandom(src.size))
        before = src.snapshot()
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.bitmap.set_all()
        progress: list[int] = []
        bcs.on_progress = progress.append
        remaining = bcs.remaining()
        _completes_at_once(guest.node.write(3 * C + 100, b"new"))
        assert bcs.whole_calls == 1 and progress == [C] and bcs.remaining() == remaining - C
        assert tgt.snapshot()[3 * C : 4 * C] == before[3 * C : 4 * C]
        assert not bcs.bitmap.get(3 * C) and bcs.settled(3 * C, 4 * C) and bcs.in_flight_bytes == 0
        assert filt.done is not None and filt.done.get(3 * C)
        assert src.snapshot()[3 * C + 100 : 3 * C + 103] == b"new"
        # Across a cluster boundary: both clusters, one task.
        _completes_at_once(guest.node.write(6 * C - 2, b"four"))
        assert bcs.whole_calls == 2 and progress == [C, 2 * C]
        assert tgt.snapshot()[5 * C : 7 * C] == before[5 * C : 7 * C]
        await cbw_drop(graph, filt)

    asyncio.run(main())


def test_first_touch_of_the_partial_last_cluster() -> None:
    async def main() -> None:
        graph, src, tgt, guest = await _setup(2 * C + 1000)
        await src.write(0, os.urandom(src.size))
        before = src.snapshot()
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.bitmap.set_all()
        assert bcs.remaining() == src.size
        await guest.node.write(src.size - 10, b"end")
        assert bcs.whole_calls == 1 and bcs.remaining() == 2 * C
        assert tgt.snapshot()[2 * C :] == before[2 * C :]
        await cbw_drop(graph, filt)

    asyncio.run(main())


def test_first_touch_of_a_zero_cluster_writes_no_data() -> None:
    """With the source's status cached as zero there, nothing is read; the target is zeroed, or left
    alone when it is known to read zeros."""

    async def main() -> None:
        graph, src, tgt, guest = await _setup()
        await src.write(0, os.urandom(C))  # cluster 0 data, the rest a hole
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.bitmap.set_all()
        bcs._status.add(C, src.size, Status.ZERO)  # as a block-status query of the job leaves it
        await tgt.write(2 * C, b"\7" * C)  # not zero, and not known to be
        await guest.node.write(2 * C, b"x")
        bcs.target_is_zero = True
        await tgt.write(4 * C, b"\7" * C)  # never written: the target reads zeros there, we are told
        await guest.node.write(4 * C, b"y")
        assert bcs.whole_calls == 2 and bcs.remaining() == src.size - 2 * C
        target = tgt.snapshot()
        assert target[2 * C : 3 * C] == bytes(C) and target[4 * C : 5 * C] == b"\7" * C
        await cbw_drop(graph, filt)

    asyncio.run(main())


def test_first_touch_is_not_taken_where_the_copy_loop_must_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not all of the range to copy, a cached status that cuts it, sync=top's scan, copy offloading, a
    long range, or a call of the job: the copy loop runs, with the same result."""

    async def main() -> None:
        graph, src, tgt, guest = await _setup(8 * MiB)
        await src.write(0, os.urandom(src.size))
        before = src.snapshot()
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.bitmap.set_all()
        loops: list[int] = []
        real_loop = bcs._copy_dirty_clusters

        async def counted(call: CopyCall) -> bool:
            if call.offset not in loops:  # a call's first pass (the loop makes another to find it done)
                loops.append(call.offset)
            return await real_loop(call)

        monkeypatch.setattr(bcs, "_copy_dirty_clusters", counted)
        await guest.node.write(C, b"a")  # taken
        assert bcs.whole_calls == 1 and loops == []
        await guest.node.write(2 * C - 1, b"bc")  # cluster 1 copied, cluster 2 not
        bcs._status.add(4 * C, 5 * C + 10, Status.DATA | Status.ALLOCATED)
        await guest.node.write(5 * C - 1, b"de")  # the cached extent ends inside cluster 5
        bcs.skip_unallocated = True
        await guest.node.write(8 * C, b"f")
        bcs.skip_unallocated, bcs.use_copy_range = False, True
        await guest.node.write(10 * C, b"g")
        bcs.use_copy_range = False
        await guest.node.write(16 * C, b"\1" * MiB)  # a run long enough to ask its block status
        await bcs.copy(CopyCall(40 * C, C))  # the job's call: the speed limit may make it wait
        assert bcs.whole_calls == 1 and loops == [C, 4 * C, 8 * C, 10 * C, 16 * C, 40 * C]
        target = tgt.snapshot()
        for cluster in (1, 2, 4, 5, 8, 10, *range(16, 32), 40):
            assert target[cluster * C : (cluster + 1) * C] == before[cluster * C : (cluster + 1) * C], cluster
            assert not bcs.bitmap.get(cluster * C)
        assert bcs.in_flight_bytes == 0
        await cbw_drop(graph, filt)

    asyncio.run(main())


def test_first_touch_failures_put_the_cluster_back() -> None:
    """A failed read or target write of a first touch: the write fails (break-guest-write), its cluster
    is to copy again and not busy, and the next write copies it the same way."""

    async def main() -> None:
        graph = BlockGraph()
        mem = await _memory(graph, "mem", MiB)
        await mem.write(0, os.urandom(MiB))
        before = mem.snapshot()
        src = await open_node(graph, {"driver": "fault-inject", "node-name": "src", "file": "mem"})
        tmem = await _memory(graph, "tmem", MiB)
        tgt = await open_node(graph, {"driver": "fault-inject", "node-name": "tgt", "file": "tmem"})
        assert isinstance(src, FaultNode) and isinstance(tgt, FaultNode)
        guest = Root("guest")
        graph.attach(guest, "root", src)
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.bitmap.set_all()
        for node, op, err in ((src, "read", errno.EIO), (tgt, "write", errno.ENOSPC)):
            node.inject(op, nth=1, errno=err)
            with pytest.raises(RequestError) as info:
                await guest.node.write(2 * C, b"new")
            assert info.value.errno == err
            assert bcs.bitmap.get(2 * C) and not bcs.settled(2 * C, 3 * C)
            assert bcs.in_flight_bytes == 0 and bcs.remaining() == MiB
            assert mem.snapshot()[2 * C : 2 * C + 3] == before[2 * C : 2 * C + 3]
        await guest.node.write(2 * C, b"new")
        assert bcs.whole_calls == 3 and bcs.remaining() == MiB - C
        assert tmem.snapshot()[2 * C : 3 * C] == before[2 * C : 3 * C]
        await cbw_drop(graph, filt)

    asyncio.run(main())


def test_write_overlapping_a_first_touch_in_flight_waits_for_it() -> None:
    async def main() -> None:
        graph, src, tgt, fault, guest = await _faulty_target(os.urandom(MiB))
        before = src.snapshot()
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.bitmap.set_all()
        rule = fault.inject("any-write", nth=1, stall=True)
        first = asyncio.ensure_future(guest.node.write(3 * C, b"first"))
        await rule.wait_hits(1)
        assert bcs.whole_calls == 1 and bcs.in_flight_bytes == C and not bcs.settled(3 * C, 4 * C)
        # The same cluster: it must not reach the source before the old data is in the target.
        second = asyncio.ensure_future(guest.node.write(3 * C + 100, b"second"))
        await asyncio.sleep(0.02)
        assert not first.done() and not second.done() and src.snapshot() == before
        rule.release()
        await asyncio.gather(first, second)
        assert bcs.whole_calls == 1 and tgt.snapshot()[3 * C : 4 * C] == before[3 * C : 4 * C]
        assert src.snapshot()[3 * C : 3 * C + 5] == b"first"
        assert src.snapshot()[3 * C + 100 : 3 * C + 106] == b"second"
        await cbw_drop(graph, filt)

    asyncio.run(main())


@settings(max_examples=200, deadline=None)
@given(
    clusters=st.integers(1, 300),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 300), st.integers(1, 300)), max_size=20),
    probes=st.lists(st.tuples(st.integers(0, 320), st.integers(1, 320)), max_size=10),
)
def test_busy_clusters_match_a_set_model(
    clusters: int, ops: list[tuple[bool, int, int]], probes: list[tuple[int, int]]
) -> None:
    """The copy engine's flat "being copied" bits: runs marked and cleared, asked about any range (one
    word, two, many; past the end of the disk)."""
    g = 512
    size = clusters * g - 100  # a partial last cluster
    busy, model = _BusyClusters(size, g), set[int]()
    for value, first, n in ops:
        first = min(first, clusters - 1)
        n = min(n, clusters - first)
        length = min(n * g, size - first * g)
        busy.mark(first * g, length, value)
        model = model | set(range(first, first + n)) if value else model - set(range(first, first + n))
        probes.append((first, n))
    for first, n in [*probes, (0, clusters + 10)]:
        start, end = first * g + 7, (first + n) * g - 3
        want = any(start // g <= c <= (end - 1) // g for c in model)
        assert busy.any(start, end) == want, (start, end)


def test_large_copies_from_a_file_read_on_the_bulk_thread(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of at least OFFLOAD_MIN from a raw-over-file source are read and scanned on the bulk-copy
    thread; the target gets the data, zero clusters stay unwritten, guest writes during the copy keep the
    point in time, and a source that ends early fails the copy as a read error."""
    size = 8 * MiB
    rng = random.Random(11)
    image = bytearray(size)
    image[0:MiB] = rng.randbytes(MiB)
    image[3 * MiB : 3 * MiB + 5000] = b"y" * 5000  # data with zero clusters around it, in one chunk
    path = tmp_path / "src.img"
    path.write_bytes(bytes(image))
    offloaded: list[int] = []
    real = threadpool.run_bulk

    async def counting(func: Any, *args: Any) -> Any:
        offloaded.append(len(args[2]))
        return await real(func, *args)

    monkeypatch.setattr(copy_mod, "run_bulk", counting)

    async def main() -> None:
        graph = BlockGraph()
        await open_node(graph, {"driver": "file", "node-name": "src-file", "filename": str(path)})
        src = await open_node(graph, {"driver": "raw", "node-name": "src", "file": "src-file"})
        tgt = await _memory(graph, "tgt", size)
        guest = Root("guest")
        graph.attach(guest, "root", src)
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.bitmap.set_all()

        async def writer() -> None:
            for _ in range(50):
                off = rng.randrange(0, size - 4096)
                await guest.node.write(off, rng.randbytes(4096))
                await asyncio.sleep(0)

        await asyncio.gather(writer(), bcs.copy(CopyCall(0, size, max_workers=4)))
        assert offloaded and all(n >= copy_mod.OFFLOAD_MIN for n in offloaded)
        assert tgt.snapshot() == bytes(image)
        data = [(e.offset, e.length) async for e in tgt.extents() if e.is_data]
        assert all(off < MiB or 3 * MiB <= off < 3 * MiB + C for off, _ in data)
        await cbw_drop(graph, filt)

        # The file shrinks behind our back: the bulk read hits its end, a read error.
        filt, bcs = cbw_append(graph, "src", "tgt")
        bcs.bitmap.set_all()
        os.truncate(path, 2 * MiB)
        with pytest.raises(CopyError) as info:
            await bcs.copy(CopyCall(4 * MiB, 4 * MiB))
        assert info.value.is_read
        assert bcs.remaining() == 8 * MiB  # every cluster still to copy
        await cbw_drop(graph, filt)

    asyncio.run(main())
