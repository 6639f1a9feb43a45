"""The generic request path of :class:`BlockNode`: validation, alignment, splitting, tracking, observers.

Most tests use ``Recorder``, a test driver that keeps its data in a bytearray, logs every hook call, checks
the generic layer's promises (in range, aligned, within the limits) and can yield or block inside a hook
so that requests interleave.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cowbackup.block.drivers import open_node
from cowbackup.block.drivers.file import FileNode
from cowbackup.block.errors import RequestError
from cowbackup.block.filters.fault import fault_append
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode, Extent, RequestFlags, Status

KiB = 1024


def run(func: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(func())


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


class Recorder(BlockNode):
    """A bytearray disk that records hook calls as ``(op, offset, length)``."""

    driver_name = "recorder"

    def __init__(self, size: int, *, align: int = 1, max_transfer: int = 1 << 20, max_zeroes: int = 1 << 20):
        super().__init__("rec")
        self._size = size
        self.data = bytearray(size)
        self.limits.request_alignment = align
        self.limits.max_transfer = max_transfer
        self.limits.max_zeroes = max_zeroes
        self.limits.max_discard = max_zeroes
        self.calls: list[tuple[str, int, int]] = []
        #: Yield to the loop inside each hook, so that concurrent requests interleave.
        self.yield_in_hooks = False
        #: When set, hooks wait for it (a request stuck in the driver).
        self.gate: asyncio.Event | None = None

    async def _hook(self, op: str, offset: int, length: int, limit: int) -> None:
        align = self.limits.request_alignment
        assert offset % align == 0, (op, offset)
        assert length % align == 0, (op, length)
        assert 0 < length <= limit, (op, length)
        assert offset + length <= self._size, (op, offset, length)
        self.calls.append((op, offset, length))
        if self.gate is not None:
            await self.gate.wait()
        if self.yield_in_hooks:
            await asyncio.sleep(0)

    async def _do_read(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset : offset + len(buf)]  # copy first: the data is old once we yield
        await self._hook("read", offset, len(buf), self.limits.max_transfer)

    async def _do_write(self, offset: int, data: memoryview, flags: RequestFlags) -> None:
        saved = bytes(data)
        await self._hook("write", offset, len(data), self.limits.max_transfer)
        self.data[offset : offset + len(saved)] = saved

    async def _do_write_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        await self._hook(
            "zero" + ("-unmap" if flags & RequestFlags.MAY_UNMAP else ""), offset, length, 1 << 40
        )
        self.data[offset : offset + length] = bytes(length)

    async def _do_discard(self, offset: int, length: int) -> None:
        await self._hook("discard", offset, length, self.limits.max_discard)

    async def _do_flush(self) -> None:
        self.calls.append(("flush", 0, 0))

    async def _do_block_status(self, offset: int, length: int) -> Extent:
        # Deliberately answers longer than asked: the generic layer must clamp.
        return Extent(offset, length + 4096, Status.DATA | Status.ALLOCATED)


async def errno_of(call: Coroutine[Any, Any, Any]) -> int:
    try:
        await call
    except RequestError as err:
        return err.errno or -1
    return 0


# ---------------------------------------------------------------------- validation


def test_validation() -> None:
    async def main() -> None:
        node = Recorder(64 * KiB)
        buf = bytearray(10)
        assert await errno_of(node.read(-1, buf)) == errno.EINVAL
        assert await errno_of(node.read(64 * KiB - 9, buf)) == errno.EINVAL
        assert await errno_of(node.write(64 * KiB, b"x")) == errno.EINVAL
        assert await errno_of(node.write_zeroes(0, -5)) == errno.EINVAL
        assert await errno_of(node.discard(60 * KiB, 8 * KiB)) == errno.EINVAL
        assert await errno_of(node.block_status(64 * KiB, 1)) == errno.EINVAL
        assert await errno_of(node.block_status(0, 0)) == errno.EINVAL
        await node.read(64 * KiB, bytearray())  # empty at the very end: fine, nothing happens
        await node.write(0, b"")
        assert node.calls == []
        node.read_only = True
        assert await errno_of(node.write(0, b"x")) == errno.EPERM
        assert await errno_of(node.write_zeroes(0, 1)) == errno.EPERM
        assert await errno_of(node.discard(0, 1)) == errno.EPERM
        await node.read(0, buf)  # reads still work
        await node.close()
        await node.close()
        assert await errno_of(node.read(0, buf)) == errno.EBADF
        assert await errno_of(node.flush()) == errno.EBADF

    run(main)


def test_block_status_is_clamped() -> None:
    async def main() -> None:
        node = Recorder(10000)
        ext = await node.block_status(1000, 2000)
        assert (ext.offset, ext.length) == (1000, 2000)
        ext = await node.block_status(9000, 5000)  # clamped to the size
        assert (ext.offset, ext.length) == (9000, 1000)
        assert [(e.offset, e.length) async for e in node.extents(0, 6000)] == [(0, 6000)]

    run(main)


# ---------------------------------------------------------------------- alignment


def test_unaligned_read_and_write_are_padded() -> None:
    async def main() -> None:
        node = Recorder(64 * KiB, align=4096)
        node.data[:] = pattern(64 * KiB)
        buf = bytearray(100)
        await node.read(4000, buf)  # crosses a block boundary
        assert buf == pattern(64 * KiB)[4000:4100]
        assert node.calls == [("read", 0, 8192)]
        node.calls.clear()
        await node.write(5000, b"w" * 10000)
        # Only the partial head and tail blocks are read; one aligned write covers everything.
        assert node.calls == [("read", 4096, 4096), ("read", 12288, 4096), ("write", 4096, 12288)]
        expect = bytearray(pattern(64 * KiB))
        expect[5000:15000] = b"w" * 10000
        assert node.data == expect

    run(main)


def test_unaligned_write_zeroes_and_discard() -> None:
    async def main() -> None:
        node = Recorder(64 * KiB, align=4096)
        node.data[:] = b"\xff" * (64 * KiB)
        await node.write_zeroes(1000, 10000, RequestFlags.MAY_UNMAP)
        assert node.calls == [
            ("read", 0, 4096),
            ("write", 0, 4096),
            ("zero-unmap", 4096, 4096),
            ("read", 8192, 4096),
            ("write", 8192, 4096),
        ]
        assert node.data[1000:11000] == bytes(10000)
        assert node.data[:1000] == b"\xff" * 1000
        assert node.data[11000:12288] == b"\xff" * 1288
        node.calls.clear()
        await node.write_zeroes(20000, 100)  # inside one block
        assert node.calls == [("read", 16384, 4096), ("write", 16384, 4096)]
        node.calls.clear()
        await node.discard(1000, 10000)  # edges dropped, not zeroed
        await node.discard(30000, 100)  # nothing aligned inside: no call at all
        assert node.calls == [("discard", 4096, 4096)]

    run(main)


def test_concurrent_unaligned_writes_to_one_block_both_survive() -> None:
    async def main() -> None:
        node = Recorder(16 * KiB, align=4096)
        node.yield_in_hooks = True
        writes = [node.write(100 * i + 7, bytes([65 + i]) * 50) for i in range(8)]
        await asyncio.gather(*writes, node.write(4096, b"B" * 4096), node.write(4000, b"C" * 200))
        expect = bytearray(16 * KiB)
        for i in range(8):
            expect[100 * i + 7 : 100 * i + 57] = bytes([65 + i]) * 50
        expect[4096:8192] = b"B" * 4096
        expect[4000:4200] = b"C" * 200
        assert node.data == expect

    run(main)


def test_concurrent_unaligned_writes_on_a_direct_file(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(bytes(64 * KiB))

    async def main() -> None:
        graph = BlockGraph()
        try:
            node = await open_node(
                graph, {"driver": "file", "node-name": "f", "filename": str(path), "cache": {"direct": True}}
            )
        except Exception as err:  # any failure to get O_DIRECT means "not here"
            pytest.skip(f"no O_DIRECT here: {err}")
        assert isinstance(node, FileNode)
        assert node.limits.request_alignment == 4096
        await asyncio.gather(*(node.write(512 * i + 3, bytes([i + 1]) * 500) for i in range(32)))
        await graph.close_all()

    run(main)
    data = path.read_bytes()
    for i in range(32):
        assert data[512 * i + 3 : 512 * i + 503] == bytes([i + 1]) * 500


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 24 * KiB), min_size=2, max_size=12, unique=True),
    st.sampled_from([1, 512, 4096]),
    st.booleans(),
)
def test_concurrent_disjoint_writes_never_lose_bytes(cuts: list[int], align: int, zeroes: bool) -> None:
    """Writes to disjoint byte ranges, run all at once, land exactly, whatever blocks they share."""
    size = 24 * KiB
    cuts.sort()
    segments = list(zip(cuts[::2], cuts[1::2], strict=False))

    async def main() -> None:
        node = Recorder(size, align=align, max_transfer=8192, max_zeroes=4096)
        node.yield_in_hooks = True
        node.data[:] = b"\xee" * size
        model = bytearray(node.data)
        calls = []
        for i, (start, end) in enumerate(segments):
            if zeroes and i % 2:
                calls.append(node.write_zeroes(start, end - start))
                model[start:end] = bytes(end - start)
            else:
                calls.append(node.write(start, pattern(end - start, i)))
                model[start:end] = pattern(end - start, i)
        await asyncio.gather(*calls)
        assert node.data == model
        assert node.in_flight == 0

    run(main)


# ---------------------------------------------------------------------- splitting


def test_split_at_max_transfer_and_max_zeroes() -> None:
    async def main() -> None:
        node = Recorder(64 * KiB, max_transfer=8192, max_zeroes=16384)
        await node.read(100, bytearray(20000))
        assert node.calls == [("read", 100, 8192), ("read", 8292, 8192), ("read", 16484, 3616)]
        node.calls.clear()
        await node.write(0, pattern(20000))
        assert node.calls == [("write", 0, 8192), ("write", 8192, 8192), ("write", 16384, 3616)]
        assert node.data[:20000] == pattern(20000)
        node.calls.clear()
        await node.write_zeroes(0, 40000)
        assert node.calls == [("zero", 0, 16384), ("zero", 16384, 16384), ("zero", 32768, 7232)]
        node.calls.clear()
        await node.discard(0, 40000)
        assert node.calls == [("discard", 0, 16384), ("discard", 16384, 16384), ("discard", 32768, 7232)]

    run(main)


def test_split_and_padding_together() -> None:
    async def main() -> None:
        node = Recorder(64 * KiB, align=4096, max_transfer=8192)
        await node.write(1, pattern(20000))
        assert node.calls == [
            ("read", 0, 4096),
            ("read", 16384, 4096),
            ("write", 0, 8192),
            ("write", 8192, 8192),
            ("write", 16384, 4096),
        ]
        assert node.data[1:20001] == pattern(20000)

    run(main)


# ---------------------------------------------------------------------- tracking and drain


def test_drain_waits_for_a_request_stuck_in_the_driver() -> None:
    async def main() -> None:
        node = Recorder(64 * KiB)
        await node.drain()  # idle: returns at once
        node.gate = asyncio.Event()
        reader = asyncio.create_task(node.read(0, bytearray(10)))
        writer = asyncio.create_task(node.write(0, b"x"))
        await asyncio.sleep(0)
        assert node.in_flight == 2
        drained = asyncio.create_task(node.drain())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not drained.done()
        node.gate.set()
        await asyncio.gather(reader, writer, drained)
        assert node.in_flight == 0
        await node.drain()

    run(main)


def test_drain_waits_for_a_stalled_filter() -> None:
    async def main() -> None:
        graph = BlockGraph()
        mem = await open_node(graph, {"driver": "memory", "node-name": "mem", "size": 1 << 20})
        fault = fault_append(graph, mem, "fault")
        rule = fault.inject("any-write", stall=True)
        task = asyncio.create_task(fault.write_zeroes(0, 4096))
        await rule.wait_hits()
        drained = asyncio.create_task(fault.drain())
        await asyncio.sleep(0)
        assert not drained.done()
        rule.release()
        await asyncio.gather(task, drained)

    run(main)


def test_cancelled_waiter_does_not_leak_in_flight() -> None:
    async def main() -> None:
        node = Recorder(16 * KiB, align=4096)
        node.gate = asyncio.Event()
        first = asyncio.create_task(node.write(10, b"a"))  # read-modify-write, stuck in the driver
        await asyncio.sleep(0)
        second = asyncio.create_task(node.write(20, b"b"))  # waits for the first (same block)
        await asyncio.sleep(0)
        assert node.in_flight == 2
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert node.in_flight == 1
        node.gate.set()
        await first
        await asyncio.wait_for(node.drain(), 1)
        assert node.data[10:11] == b"a"

    run(main)


# ---------------------------------------------------------------------- observers and detect-zeroes


def test_write_observers() -> None:
    async def main() -> None:
        node = Recorder(64 * KiB, align=4096)
        seen: list[tuple[int, int]] = []
        node.write_observers.append(lambda offset, length: seen.append((offset, length)))
        await node.write(100, b"x" * 10)
        await node.write_zeroes(5000, 3000)
        await node.discard(1000, 10000)
        await node.read(0, bytearray(10))
        await node.flush()
        node.gate = asyncio.Event()
        task = asyncio.create_task(node.write(8192, b"y"))
        await asyncio.sleep(0)
        assert seen == [(100, 10), (5000, 3000), (4096, 4096)]  # not yet: the write is in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # A failed write is still reported (QEMU marks the bitmap dirty either way).
        assert seen[-1] == (8192, 1)

    run(main)


@pytest.mark.parametrize(
    ("mode", "expect"),
    [("off", [("write", 0, 8192)]), ("on", [("zero", 0, 8192)]), ("unmap", [("zero-unmap", 0, 8192)])],
)
def test_detect_zeroes(mode: str, expect: list[tuple[str, int, int]]) -> None:
    async def main() -> None:
        node = Recorder(64 * KiB)
        node.detect_zeroes = mode
        node.data[:] = b"\x01" * (64 * KiB)
        seen: list[tuple[int, int]] = []
        node.write_observers.append(lambda offset, length: seen.append((offset, length)))
        await node.write(0, bytes(8192))
        await node.write(100, b"\x00\x00\x07")  # not all zero: a plain write
        assert node.calls == [*expect, ("write", 100, 3)]
        assert node.data[:100] == bytes(100)
        assert seen == [(0, 8192), (100, 3)]

    run(main)


def test_detect_zeroes_unmap_punches_holes_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(pattern(128 * KiB))

    async def main() -> None:
        graph = BlockGraph()
        opts = {"driver": "file", "filename": str(path), "discard": "unmap", "detect-zeroes": "unmap"}
        node = await open_node(graph, {**opts, "node-name": "f"})
        await node.write(64 * KiB, bytes(64 * KiB))
        ext = await node.block_status(64 * KiB, 64 * KiB)
        assert ext.is_zero
        assert not ext.is_data
        await graph.close_all()

    run(main)
    assert path.read_bytes() == pattern(128 * KiB)[: 64 * KiB] + bytes(64 * KiB)


def test_null_and_memory_through_the_generic_layer() -> None:
    async def main() -> None:
        graph = BlockGraph()
        null = await open_node(
            graph, {"driver": "null-co", "node-name": "n", "size": 1 << 20, "read-zeroes": True}
        )
        buf = bytearray(b"\xff" * 5000)
        await null.read(123, buf)
        assert buf == bytes(5000)
        mem = await open_node(graph, {"driver": "memory", "node-name": "m", "size": 1 << 20})
        await mem.write(4096, pattern(8192))
        await mem.write_zeroes(4096, 4096)
        out = bytearray(8192)
        await mem.read(4096, out)
        assert out == bytes(4096) + pattern(8192)[4096:]
        await graph.close_all()

    run(main)
