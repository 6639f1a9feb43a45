"""How a qcow2 image file grows: FileNode.grow / truncate, room grown ahead and trimmed at close, and
block status that answers a fresh image in one extent (so the copy engine knows it reads as zeros)."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from cowbackup.block.drivers import open_node
from cowbackup.block.drivers.file import FileNode
from cowbackup.block.drivers.qcow2 import create_image
from cowbackup.block.errors import RequestError
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import Status

from .helpers import KiB, MiB, check_clean, needs_qemu_img, open_qcow2, pattern


def test_file_grow_and_truncate(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")

    async def run() -> None:
        graph = BlockGraph()
        node = await open_node(graph, {"driver": "file", "node-name": "f", "filename": str(path)})
        assert isinstance(node, FileNode)
        await asyncio.gather(node.grow(1 * MiB), node.grow(4096), node.grow(2 * MiB))
        assert node.size == path.stat().st_size == 2 * MiB  # a smaller grow never shrinks
        buf = bytearray(4)
        await node.read(2 * MiB - 4, buf)
        assert buf == bytes(4)
        await node.truncate(10)
        assert node.size == path.stat().st_size == 10
        with pytest.raises(RequestError):
            await node.read(8, bytearray(4))
        await graph.close_all()
        graph = BlockGraph()
        ro = await open_node(
            graph, {"driver": "file", "node-name": "r", "filename": str(path), "read-only": True}
        )
        assert isinstance(ro, FileNode)
        for call in (ro.grow(1 * MiB), ro.truncate(0)):
            with pytest.raises(RequestError) as info:
                await call
            assert info.value.errno == errno.EPERM
        await graph.close_all()

    asyncio.run(run())


@needs_qemu_img
def test_room_grown_ahead_is_trimmed_at_close(tmp_path: Path) -> None:
    img = tmp_path / "img.qcow2"
    create_image(str(img), 64 * MiB)
    data = pattern(3 * MiB)

    async def run() -> None:
        graph = BlockGraph()
        node = await open_qcow2(graph, img)
        await asyncio.gather(*(node.write(i * 4 * MiB, data) for i in range(8)))
        rc = node.meta.refcounts
        assert rc is not None
        assert node.file.size > rc.high * node.cluster_size  # grown ahead of the allocations
        await graph.close_all()

    asyncio.run(run())
    report = check_clean(img)
    # The file ends with the last allocated cluster: data, four L2 tables' worth of metadata, no hole.
    assert img.stat().st_size == report["image-end-offset"]


@needs_qemu_img
def test_fresh_image_is_one_zero_extent(tmp_path: Path) -> None:
    img = tmp_path / "big.qcow2"
    size = 4 * 1024 * MiB  # eight L2 tables' worth with 64 KiB clusters
    create_image(str(img), size)

    async def run() -> None:
        graph = BlockGraph()
        node = await open_qcow2(graph, img)
        ext = await node.block_status(0, size)
        assert (ext.length, ext.flags) == (size, Status.ZERO)  # zeros, allocated in no layer (as QEMU)
        await node.write(3 * 512 * MiB + 5 * KiB, b"x")
        first = await node.block_status(0, size)
        assert first.length == 3 * 512 * MiB and first.flags & Status.ZERO
        tail = await node.block_status(4 * 512 * MiB, size - 4 * 512 * MiB)
        assert tail.length == size - 4 * 512 * MiB and tail.flags & Status.ZERO
        await graph.close_all()

    asyncio.run(run())
