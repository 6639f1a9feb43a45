"""The options every node has (QEMU's BlockdevOptionsBase), on every driver: accepted, checked with
QEMU's messages, inherited by inline children, and ``discard`` deciding what a node does with discards.

The messages were taken from qemu-storage-daemon 7.2 ``--blockdev`` (the same QAPI checks as
``blockdev-add``).
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from cowbackup.block.drivers import open_node
from cowbackup.block.drivers.file import FileNode, create_file
from cowbackup.block.errors import BlockError
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode

KiB = 1024
MiB = 1 << 20
C = 64 * KiB


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


BASE = {
    "discard": "unmap",
    "cache": {"direct": False, "no-flush": True},
    "detect-zeroes": "unmap",
    "auto-read-only": True,
}


def driver_options(tmp_path: Path) -> dict[str, dict[str, Any]]:
    create_file(str(tmp_path / "img"), MiB)
    return {
        "file": {"driver": "file", "filename": str(tmp_path / "img")},
        "raw": {"driver": "raw", "file": {"driver": "file", "filename": str(tmp_path / "img")}},
        "null-co": {"driver": "null-co", "size": MiB},
        "memory": {"driver": "memory", "size": MiB},
    }


@pytest.mark.parametrize("driver", ["file", "raw", "null-co", "memory"])
def test_every_driver_takes_the_base_options(tmp_path: Path, driver: str) -> None:
    async def main() -> None:
        graph = BlockGraph()
        opts = {**driver_options(tmp_path)[driver], "node-name": "n", **BASE}
        node = await open_node(graph, opts)
        assert node.discard_unmap and node.cache_no_flush and not node.cache_direct
        assert node.detect_zeroes == "unmap"
        await graph.close_all()

    run(main)


def test_qcow2_takes_the_base_options(tmp_path: Path) -> None:
    from cowbackup.block.drivers.qcow2 import create_image

    create_image(str(tmp_path / "q"), MiB)

    async def main() -> None:
        graph = BlockGraph()
        node = await open_node(
            graph,
            {
                "driver": "qcow2",
                "node-name": "q",
                "file": {"driver": "file", "filename": str(tmp_path / "q")},
                "cache": {"direct": True},
                **{"read-only": True, "force-share": True},
            },
        )
        file = node.children["file"].node
        assert isinstance(file, FileNode)
        # bdrv_inherited_options: cache and read-only come from the parent; discard defaults to unmap.
        assert file.direct and file.read_only and file.discard_unmap
        assert node.read_only and node.cache_direct and not node.discard_unmap
        await graph.close_all()

    run(main)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"discard": "on"}, "Parameter 'discard' does not accept value 'on'"),
        ({"discard": "off"}, "Parameter 'discard' does not accept value 'off'"),
        ({"discard": "foo"}, "Parameter 'discard' does not accept value 'foo'"),
        ({"detect-zeroes": "bad"}, "Parameter 'detect-zeroes' does not accept value 'bad'"),
        (
            {"detect-zeroes": "unmap"},
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
        ),
        ({"cache": {"direct": "maybe"}}, "Parameter 'cache.direct' expects 'on' or 'off'"),
        ({"cache": {"foo": "on"}}, "Parameter 'cache.foo' is unexpected"),
        ({"read-only": "maybe"}, "Parameter 'read-only' expects 'on' or 'off'"),
        ({"force-share": "on"}, "force-share=on can only be used with read-only images"),
    ],
)
def test_bad_values_are_refused_with_qemus_messages(
    tmp_path: Path, extra: dict[str, Any], message: str
) -> None:
    async def main() -> None:
        graph = BlockGraph()
        for opts in driver_options(tmp_path).values():
            with pytest.raises(BlockError) as info:
                await open_node(graph, {**opts, "node-name": "n", **extra})
            assert str(info.value) == message
        assert graph.nodes == {}

    run(main)


def test_qcow2_drops_discards_unless_unmap(tmp_path: Path) -> None:
    from cowbackup.block.drivers.qcow2 import create_image

    async def case(discard: str) -> tuple[int, bytes]:
        path = tmp_path / f"{discard}.qcow2"
        create_image(str(path), MiB)
        graph = BlockGraph()
        node = await open_node(
            graph,
            {
                "driver": "qcow2",
                "node-name": "q",
                "discard": discard,
                "file": {"driver": "file", "filename": str(path)},
            },
        )
        await node.write(0, b"\x5a" * (4 * C))
        bitmap = node.dirty_bitmaps.create("b", C)
        await node.discard(0, 2 * C)
        await node.discard(3 * C, 4 * KiB)  # part of a cluster: nothing deallocated, marked all the same
        data = bytearray(4 * C)
        await node.read(0, data)
        count = bitmap.count()
        await graph.close_all()
        return count, bytes(data)

    async def main() -> None:
        count, data = await case("ignore")
        assert count == 0 and data == b"\x5a" * (4 * C)
        count, data = await case("unmap")
        assert count == 3 * C and data == bytes(2 * C) + b"\x5a" * (2 * C)

    run(main)


def test_filters_and_null_co(tmp_path: Path) -> None:
    """A fault-inject filter drops discards by its own option, as blkdebug does; null-co marks nothing
    even with unmap (QEMU's has no discard, so bdrv_co_pdiscard returns before tracking)."""

    async def main() -> None:
        graph = BlockGraph()
        mem = await open_node(graph, {"driver": "memory", "node-name": "m", "size": MiB, "discard": "unmap"})
        await mem.write(0, b"x" * C)
        filt = await open_node(graph, {"driver": "fault-inject", "node-name": "f", "file": "m"})
        on_filter = filt.dirty_bitmaps.create("b", C)
        await filt.discard(0, C)
        assert on_filter.count() == 0 and await _read(mem, C) == b"x" * C
        null = await open_node(
            graph, {"driver": "null-co", "node-name": "z", "size": MiB, "discard": "unmap"}
        )
        on_null = null.dirty_bitmaps.create("b", C)
        await null.discard(0, C)
        assert on_null.count() == 0
        await graph.close_all()

    run(main)


async def _read(node: BlockNode, n: int) -> bytes:
    buf = bytearray(n)
    await node.read(0, buf)
    return bytes(buf)


def test_auto_read_only_falls_back_when_the_file_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "img"
    create_file(str(path), MiB)
    real_open = os.open

    def no_write(name: Any, flags: int, *args: Any) -> int:
        if name == str(path) and flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", no_write)

    async def main() -> None:
        graph = BlockGraph()
        opts = {"driver": "file", "node-name": "f", "filename": str(path)}
        with pytest.raises(BlockError, match="Permission denied"):
            await open_node(graph, opts)
        node = await open_node(graph, {**opts, "auto-read-only": True})
        assert node.read_only
        await graph.close_all()

    run(main)
