"""The ``raw`` format driver: windows onto a child, QEMU's errors, forwarding."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from cowbackup.block.drivers import open_node
from cowbackup.block.drivers.file import FileNode, create_file
from cowbackup.block.drivers.raw import RawNode
from cowbackup.block.errors import BlockError, RequestError
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode, RequestFlags

KiB = 1024


def run(func: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(func())


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


def file_ref(path: Path, **opts: Any) -> dict[str, Any]:
    return {"driver": "file", "filename": str(path), **opts}


async def open_raw(graph: BlockGraph, file: Any, **opts: Any) -> RawNode:
    node = await open_node(graph, {"driver": "raw", "node-name": "raw", "file": file, **opts})
    assert isinstance(node, RawNode)
    return node


def test_window_forwards_with_offset(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(pattern(64 * KiB))
    expect = bytearray(pattern(64 * KiB))

    async def main() -> None:
        graph = BlockGraph()
        raw = await open_raw(graph, file_ref(path), offset=4096, size=8192)
        assert raw.size == 8192
        assert raw.describe() == {"file": str(path)}
        buf = bytearray(8192)
        await raw.read(0, buf)
        assert buf == expect[4096:12288]
        await raw.write(10, b"hello", RequestFlags.FUA)
        expect[4106:4111] = b"hello"
        await raw.write_zeroes(4096, 4096)
        expect[8192:12288] = bytes(4096)
        await raw.flush()
        with pytest.raises(RequestError) as info:
            await raw.read(8190, bytearray(4))  # past the window, though inside the file
        assert info.value.errno == errno.EINVAL
        await graph.close_all()

    run(main)
    assert path.read_bytes() == expect


def test_default_size_block_status_and_zero_init(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    create_file(str(path), 256 * KiB)

    async def main() -> None:
        graph = BlockGraph()
        file = await open_node(graph, {**file_ref(path), "node-name": "file", "discard": "unmap"})
        whole = await open_raw(graph, "file")
        assert whole.size == 256 * KiB
        assert whole.known_zero_init
        await whole.write(64 * KiB, pattern(64 * KiB))
        shifted = await open_node(
            graph,
            {"driver": "raw", "node-name": "part", "file": "file", "offset": 64 * KiB, "discard": "unmap"},
        )
        assert shifted.size == 192 * KiB
        assert not getattr(shifted, "known_zero_init")  # noqa: B009 -- the copy engine reads it like this
        ext = await shifted.block_status(0, 192 * KiB)
        assert (ext.offset, ext.length, ext.is_data) == (0, 64 * KiB, True)
        ext = await shifted.block_status(64 * KiB, 128 * KiB)
        assert (ext.offset, ext.length, ext.is_data, ext.is_zero) == (64 * KiB, 128 * KiB, False, True)
        await shifted.discard(0, 4 * KiB)
        ext = await file.block_status(64 * KiB, 4 * KiB)
        assert not ext.is_data
        # Both raw nodes use the file by name: it stays when they go.
        await graph.remove("raw")
        await graph.remove("part")
        assert list(graph.nodes) == ["file"]
        await graph.close_all()

    run(main)


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"offset": 70000}, "Offset (70000) cannot be greater than size of the containing file (65536)"),
        (
            {"offset": 512, "size": 65536},
            "The sum of offset (512) and size (65536) has to be smaller or equal to the "
            " actual size of the containing file (65536)",
        ),
        ({"size": 1000}, "Specified size is not multiple of 512"),
        ({"offset": -1}, "Parameter 'offset' expects a value of at least 0"),
        ({"size": "lots"}, "Parameter 'size' expects a number"),
        ({"bogus": 1}, "Parameter 'bogus' is unexpected"),
    ],
)
def test_errors_remove_the_inline_child(tmp_path: Path, opts: dict[str, Any], message: str) -> None:
    path = tmp_path / "disk"
    create_file(str(path), 64 * KiB)

    async def main() -> None:
        graph = BlockGraph()
        with pytest.raises(BlockError) as info:
            await open_raw(graph, file_ref(path), **opts)
        assert str(info.value) == message
        assert graph.nodes == {}

    run(main)


def test_missing_file_and_unknown_child() -> None:
    async def main() -> None:
        graph = BlockGraph()
        with pytest.raises(BlockError, match="Parameter 'file' is missing"):
            await open_node(graph, {"driver": "raw", "node-name": "raw"})
        with pytest.raises(BlockError, match="Cannot find device='nope' nor node-name='nope'"):
            await open_raw(graph, "nope")

    run(main)


def test_inline_child_inherits_read_only_cache_discard(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    create_file(str(path), 64 * KiB)

    async def main() -> None:
        graph = BlockGraph()
        raw = await open_raw(
            graph,
            file_ref(path, cache={"no-flush": True}),
            **{"read-only": True, "cache": {"direct": True}},
        )
        child = raw.child
        assert isinstance(child, FileNode)
        assert child.implicit
        assert child.read_only
        # QEMU's bdrv_inherited_options: an inline child's discard defaults to unmap, whatever the
        # parent's (the parent drops what it ignores before the child sees it).
        assert not raw.discard_unmap and child.discard_unmap
        assert child.direct
        assert child.no_flush
        assert raw.read_only
        with pytest.raises(RequestError) as info:
            await raw.write(0, b"x")
        assert info.value.errno == errno.EPERM
        await graph.remove("raw")
        assert graph.nodes == {}  # the implicit child went with its parent
        # A child given by name keeps its own options; the raw node takes discard and cache for itself.
        named = await open_node(graph, {**file_ref(path), "node-name": "file"})
        raw = await open_raw(graph, "file", discard="unmap", cache={"direct": True})
        assert raw.discard_unmap and raw.cache_direct
        assert isinstance(named, FileNode) and not named.discard_unmap and not named.direct
        await graph.close_all()

    run(main)


def test_discard_is_dropped_by_the_node_that_ignores_it(tmp_path: Path) -> None:
    """QEMU's bdrv_co_pdiscard: the node that receives a discard drops it unless it was opened with
    discard=unmap -- no change, no dirty bitmap marked; a raw node with unmap marks its own bitmaps and
    passes the discard on, for its child to decide the same way."""
    path = tmp_path / "disk"
    path.write_bytes(pattern(256 * KiB))

    async def case(raw_discard: str, file_discard: str) -> tuple[int, int, bool]:
        graph = BlockGraph()
        file = await open_node(graph, {**file_ref(path), "node-name": "file", "discard": file_discard})
        raw = await open_raw(graph, "file", discard=raw_discard)
        on_raw = raw.dirty_bitmaps.create("r", 64 * KiB)
        on_file = file.dirty_bitmaps.create("f", 64 * KiB)
        await raw.discard(0, 128 * KiB)
        ext = await file.block_status(0, 128 * KiB)
        counts = on_raw.count(), on_file.count(), ext.is_data
        await graph.close_all()
        return counts

    async def main() -> None:
        assert await case("ignore", "ignore") == (0, 0, True)
        assert await case("ignore", "unmap") == (0, 0, True)
        assert await case("unmap", "ignore") == (128 * KiB, 0, True)
        assert await case("unmap", "unmap") == (128 * KiB, 128 * KiB, False)

    run(main)


def test_limits_follow_the_child(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(pattern(64 * KiB))
    expect = bytearray(pattern(64 * KiB))

    async def main() -> None:
        graph = BlockGraph()
        try:
            file = await open_node(graph, {**file_ref(path), "node-name": "file", "cache": {"direct": True}})
        except BlockError as err:
            pytest.skip(f"no O_DIRECT here: {err}")
        assert file.limits.request_alignment == 4096
        aligned = await open_raw(graph, "file", offset=8192)
        assert aligned.limits.request_alignment == 4096
        assert aligned.limits.max_transfer == file.limits.max_transfer
        # A window not aligned to the child's blocks must not pad beyond itself: the child pads instead.
        odd: BlockNode = await open_node(
            graph, {"driver": "raw", "node-name": "odd", "file": "file", "offset": 512, "size": 1024}
        )
        assert odd.limits.request_alignment == 1
        await odd.write(100, b"z" * 900)
        expect[612:1512] = b"z" * 900
        with pytest.raises(RequestError):
            await odd.write(1000, b"z" * 100)  # 1000 + 100 > 1024
        await graph.close_all()

    run(main)
    assert path.read_bytes() == expect


def test_raw_over_memory() -> None:
    async def main() -> None:
        graph = BlockGraph()
        raw = await open_raw(graph, {"driver": "memory", "size": 1 << 20}, offset=1 << 19)
        await raw.write(0, b"abc")
        mem = raw.child
        buf = bytearray(3)
        await mem.read(1 << 19, buf)
        assert buf == b"abc"
        assert raw.describe() == {"file": mem.node_name}
        await graph.close_all()

    run(main)


def test_data_path_keeps_the_raw_nodes_checks_count_and_bitmaps() -> None:
    """Reads and writes go straight to the child's request path; what is the raw node's stays."""

    async def main() -> None:
        graph = BlockGraph()
        raw = await open_raw(graph, {"driver": "memory", "size": 1 << 20}, offset=4 * KiB, size=8 * KiB)
        on_raw = raw.dirty_bitmaps.create("r", 512)
        on_child = raw.child.dirty_bitmaps.create("c", 512)
        await raw.write(1000, b"x" * 100)
        assert list(on_raw.bits.dirty_areas()) == [(512, 1024)]
        assert list(on_child.bits.dirty_areas()) == [(4096 + 512, 1024)]
        with pytest.raises(RequestError) as info:
            await raw.write(8 * KiB - 1, b"xy")  # past the window, inside the child
        assert info.value.errno == errno.EINVAL
        with pytest.raises(RequestError):
            await raw.read(8 * KiB, bytearray(1))
        # The raw node counts its requests (drain) and keeps its read-only flag.
        write = asyncio.ensure_future(raw.write(0, b"y" * KiB))
        await asyncio.sleep(0)
        raw.read_only = True
        with pytest.raises(RequestError) as info:
            await raw.write(0, b"z")
        assert info.value.errno == errno.EPERM
        await raw.drain()
        await write
        assert raw.in_flight == 0
        # detect-zeroes is the raw node's own option: all-zero writes become write-zeroes there.
        raw.read_only = False
        raw.detect_zeroes = "on"
        await raw.write(2 * KiB, bytes(KiB))
        buf = bytearray(KiB)
        await raw.read(2 * KiB, buf)
        assert buf == bytes(KiB)
        await graph.close_all()

    run(main)
