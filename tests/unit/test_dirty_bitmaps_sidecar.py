"""Persistent bitmaps of raw images in a sidecar file: stored on close, in use while open, inconsistent
after a crash, one layer per driver, atomic rewrites, clear errors for a damaged sidecar."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cowbackup.block.bitmap_sidecar import SUFFIX
from cowbackup.block.dirty_bitmaps import BitmapError
from cowbackup.block.drivers.file import create_file
from cowbackup.block.errors import BlockError
from cowbackup.block.node import BlockNode
from cowbackup.daemon import Daemon
from cowbackup.jobs.backup import BackupParams
from cowbackup.qmp.commands.bitmaps import (
    BitmapAddArgs,
    BitmapRef,
    add_prepare,
    clear_prepare,
    remove_prepare,
    store_all,
)

T = TypeVar("T")
C = 64 * 1024
SIZE = 16 * C


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20.0))


def side(image: Path) -> Path:
    return Path(str(image) + SUFFIX)


def sidecar(image: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(side(image).read_text())
    return doc


def side_bytes(image: Path) -> bytes | None:
    """The sidecar's bytes, None if there is none (a plain helper: the tests' coroutines stay free of
    blocking path calls)."""
    return side(image).read_bytes() if side(image).exists() else None


async def open_disk(image: Path, **opts: Any) -> tuple[Daemon, BlockNode]:
    d = Daemon()
    node = await d.blockdev_add({"driver": "file", "node-name": "disk", "filename": str(image), **opts})
    return d, node


async def add(d: Daemon, name: str, node: str = "disk", **kw: Any) -> None:
    """block-dirty-bitmap-add persistent=true as the command runs it: prepare, store, commit."""
    undo = add_prepare(d.graph, BitmapAddArgs(node, name, persistent=True, **kw))
    assert undo.store is not None
    await undo.store.save()
    undo.commit()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    create_file(str(tmp_path / "disk.img"), SIZE)
    return tmp_path / "disk.img"


def test_a_clean_close_keeps_bits_state_and_order(image: Path) -> None:
    async def main() -> None:
        d, node = await open_disk(image)
        await add(d, "a")
        await add(d, "off", granularity=4096, disabled=True)
        add_prepare(d.graph, BitmapAddArgs("disk", "volatile")).commit()
        assert sidecar(image)["layers"]["file"]["in-use"] is True
        await node.write(3 * C + 1, b"x")
        await node.write_zeroes(9 * C, 2 * C)
        await d.close()
        layer = sidecar(image)["layers"]["file"]
        assert layer["in-use"] is False and layer["image-size"] == SIZE
        assert [e["name"] for e in layer["bitmaps"]] == ["off", "a"]

        d, node = await open_disk(image)
        assert [bm.name for bm in node.dirty_bitmaps] == ["off", "a"]
        a = node.dirty_bitmaps.find("a")
        assert a is not None and a.persistent and a.recording and not a.inconsistent
        assert [off // C for off in range(0, SIZE, C) if a.bits.get(off)] == [3, 9, 10]
        off = node.dirty_bitmaps.find("off")
        assert off is not None and not off.recording and off.count() == 0 and off.granularity == 4096
        assert sidecar(image)["layers"]["file"]["in-use"] is True  # open again
        await d.close()

    run(main())


def test_bitmaps_left_in_use_load_inconsistent_and_can_only_be_removed(image: Path) -> None:
    async def main() -> None:
        d, node = await open_disk(image)
        await add(d, "b0")
        await node.write(0, b"y" * C)
        # The daemon dies here: nothing is stored, the sidecar still says "in-use".

        d2, node2 = await open_disk(image)
        bm = node2.dirty_bitmaps.find("b0")
        assert bm is not None and bm.inconsistent and bm.info()["inconsistent"] is True
        await d2.blockdev_add({"driver": "null-co", "node-name": "tgt", "size": SIZE})
        params = BackupParams("disk", "tgt", "incremental", bitmap="b0")
        with pytest.raises(BlockError, match=r"^Bitmap 'b0' is inconsistent and cannot be used$"):
            d2.blockdev_backup(params)
        with pytest.raises(BitmapError, match="inconsistent"):
            clear_prepare(d2.graph, BitmapRef("disk", "b0"))
        await d2.close()
        assert sidecar(image)["layers"]["file"]["bitmaps"][0]["inconsistent"] is True  # still, after a close

        d3, node3 = await open_disk(image)
        bm = node3.dirty_bitmaps.find("b0")
        assert bm is not None and bm.inconsistent
        undo = remove_prepare(d3.graph, BitmapRef("disk", "b0"))
        await node3.dirty_bitmaps.remove_stored("b0")
        undo.commit()
        assert side_bytes(image) is None
        await d3.close()
        del d, node

    run(main())


def test_raw_and_file_layers_are_kept_apart(image: Path) -> None:
    async def main() -> None:
        d = Daemon()
        await d.blockdev_add(
            {
                "driver": "raw",
                "node-name": "raw",
                "file": {"driver": "file", "node-name": "f", "filename": str(image)},
            }
        )
        await add(d, "on-raw", node="raw")
        await add(d, "on-file", node="f")
        await d.close()
        assert set(sidecar(image)["layers"]) == {"raw", "file"}

        d, node = await open_disk(image)  # the file layer only
        assert [bm.name for bm in node.dirty_bitmaps] == ["on-file"]
        await d.close()

    run(main())


def test_a_read_only_node_loads_read_only_bitmaps_and_stores_nothing(image: Path) -> None:
    async def main() -> None:
        d, _ = await open_disk(image)
        await add(d, "a")
        await d.close()
        before = side_bytes(image)
        d, node = await open_disk(image, **{"read-only": True})
        bm = node.dirty_bitmaps.find("a")
        assert bm is not None and bm.readonly
        with pytest.raises(BitmapError, match="read-only"):
            await add(d, "b")
        await d.close()
        assert side_bytes(image) == before

    run(main())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "Cannot read persistent bitmaps"),
        ('{"format": "other", "version": 1}', "is not a version 1 cowbackup-dirty-bitmaps file"),
        ('{"format": "cowbackup-dirty-bitmaps", "version": 1, "layers": {"file": {}}}', "Malformed"),
    ],
)
def test_a_damaged_sidecar_refuses_the_node_clearly(image: Path, content: str, message: str) -> None:
    side(image).write_text(content)

    async def main() -> None:
        d = Daemon()
        with pytest.raises(BitmapError, match=message):
            await d.blockdev_add({"driver": "file", "node-name": "disk", "filename": str(image)})
        assert d.graph.find("disk") is None
        await d.close()

    run(main())


def test_a_removal_leaves_the_store_only_once_committed(image: Path) -> None:
    async def main() -> None:
        d, node = await open_disk(image)
        await add(d, "a")
        before = side_bytes(image)
        undo = remove_prepare(d.graph, BitmapRef("disk", "a"))
        # Prepare does no I/O: a transaction prepares every action in one step of the event loop.
        assert side_bytes(image) == before
        undo.abort()
        bm = node.dirty_bitmaps.find("a")
        assert bm is not None and not bm.busy
        assert [e["name"] for e in sidecar(image)["layers"]["file"]["bitmaps"]] == ["a"]

        undo = remove_prepare(d.graph, BitmapRef("disk", "a"))
        undo.commit()
        await store_all([undo])
        assert node.dirty_bitmaps.find("a") is None
        assert side_bytes(image) is None
        await d.close()

    run(main())
