"""The bitmap store protocol: coroutines whose blocking calls leave the event loop, rewrites of one
sidecar that never lose a layer, and the qcow2 store behind the registry (load, add, remove, close,
QEMU's checks and messages)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cowbackup.block.bitmap_sidecar import SUFFIX
from cowbackup.block.dirty_bitmaps import BitmapError
from cowbackup.block.drivers.file import create_file
from cowbackup.block.drivers.qcow2 import create_image
from cowbackup.block.drivers.qcow2.node import Qcow2Node
from cowbackup.daemon import Daemon
from cowbackup.qmp.commands.bitmaps import (
    BitmapAddArgs,
    BitmapMergeArgs,
    BitmapRef,
    add_prepare,
    merge_prepare,
    remove_prepare,
    store_all,
)

C = 64 * 1024
SIZE = 16 * C
T = TypeVar("T")


def read_json(path: Path) -> Any:
    """A plain helper: the tests' coroutines stay free of blocking path calls."""
    return json.loads(path.read_text())


def read_bytes(path: Path) -> bytes:
    return path.read_bytes()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def add(d: Daemon, node: str, name: str, **kw: Any) -> None:
    undo = add_prepare(d.graph, BitmapAddArgs(node, name, persistent=True, **kw))
    assert undo.store is not None
    await undo.store.save()
    undo.commit()


def test_sidecar_io_runs_in_the_thread_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "disk.img"
    create_file(str(image), SIZE)
    threads: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        threads.append(threading.get_ident())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    async def main() -> None:
        d = Daemon()
        await d.blockdev_add({"driver": "file", "node-name": "disk", "filename": str(image)})
        await add(d, "disk", "a")
        await d.close()

    run(main())
    assert threads and threading.get_ident() not in threads  # add and close both fsynced, off the loop


def test_concurrent_rewrites_of_one_sidecar_keep_every_layer(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    create_file(str(image), SIZE)

    async def main() -> None:
        d = Daemon()
        await d.blockdev_add(
            {
                "driver": "raw",
                "node-name": "raw",
                "file": {"driver": "file", "node-name": "f", "filename": str(image)},
            }
        )
        # Both layers are rewritten at the same time; each rewrite reads the file the other writes.
        await asyncio.gather(add(d, "raw", "on-raw"), add(d, "f", "on-file"), add(d, "raw", "second"))
        doc = read_json(Path(str(image) + SUFFIX))
        assert {layer: [b["name"] for b in v["bitmaps"]] for layer, v in doc["layers"].items()} == {
            "raw": ["second", "on-raw"],
            "file": ["on-file"],
        }
        await d.close()

    run(main())


@pytest.fixture
def qcow2(tmp_path: Path) -> Path:
    path = tmp_path / "disk.qcow2"
    create_image(str(path), SIZE)
    return path


async def open_qcow2(image: Path, **opts: Any) -> tuple[Daemon, Qcow2Node]:
    d = Daemon()
    node = await d.blockdev_add(
        {"driver": "qcow2", "node-name": "disk", "file": {"driver": "file", "filename": str(image)}, **opts}
    )
    assert isinstance(node, Qcow2Node)
    return d, node


def test_qcow2_bitmaps_reach_the_image_and_come_back(qcow2: Path) -> None:
    async def main() -> None:
        d, node = await open_qcow2(qcow2)
        await add(d, "disk", "a")
        await add(d, "disk", "b", granularity=4096, disabled=True)
        assert [sb.name for sb in node.stored_bitmaps()] == ["b", "a"]  # QEMU's order: newest first
        await node.write(3 * C, b"x" * 10)
        merge_prepare(d.graph, BitmapMergeArgs("disk", "b", (BitmapRef("disk", "a"),)))
        undo = remove_prepare(d.graph, BitmapRef("disk", "a"))
        undo.commit()
        await store_all([undo])
        assert [sb.name for sb in node.stored_bitmaps()] == ["b"]
        await d.close()

        d, node = await open_qcow2(qcow2)
        b = node.dirty_bitmaps.find("b")
        assert b is not None and b.persistent and not b.recording and not b.inconsistent
        assert b.granularity == 4096 and b.count() == C  # the merge reached the image at close
        assert node.dirty_bitmaps.find("a") is None
        await node.write(9 * C, b"y")
        # The daemon dies here: the image says in use, so the next open finds b inconsistent.

        d2, node2 = await open_qcow2(qcow2, **{"read-only": True})
        b2 = node2.dirty_bitmaps.find("b")
        assert b2 is not None and b2.inconsistent and b2.readonly and b2.count() == 0
        await d2.close()
        await d.close()

    run(main())


def test_qcow2_persistent_bitmap_checks_are_qemus(qcow2: Path) -> None:
    async def main() -> None:
        d, _ = await open_qcow2(qcow2)
        with pytest.raises(BitmapError) as err:
            await add(d, "disk", "x" * 1024)
        name = "x" * 1024
        assert str(err.value) == (
            f"Can't make bitmap '{name}' persistent in 'disk': Name length exceeds maximum (1023 characters)"
        )
        await d.close()

        d, _ = await open_qcow2(qcow2, **{"read-only": True})
        with pytest.raises(BitmapError, match=r"^Can't make bitmap 'r' persistent in 'disk': .*read-only"):
            await add(d, "disk", "r")
        await d.close()

    run(main())


def test_a_qcow2_image_without_bitmaps_is_not_touched_at_close(qcow2: Path) -> None:
    async def main() -> None:
        before = read_bytes(qcow2)
        d, node = await open_qcow2(qcow2)
        add_prepare(d.graph, BitmapAddArgs("disk", "volatile")).commit()
        assert node.dirty_bitmaps.find("volatile") is not None
        await d.close()
        assert read_bytes(qcow2) == before

    run(main())
