"""A writer killed (SIGKILL) after writing to an image with persistent bitmaps leaves them marked in_use:
qemu-img shows the ``in-use`` flag, our reader reports them inconsistent, and the image is still clean."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cowbackup.block.bitmap import DirtyBitmap
from cowbackup.block.drivers import open_node
from cowbackup.block.drivers.qcow2 import Qcow2Node, StoredBitmap
from cowbackup.block.errors import BlockError
from cowbackup.block.graph import BlockGraph

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")

_WRITER = r"""
import asyncio, sys, time
from cowbackup.block.drivers import open_node
from cowbackup.block.graph import BlockGraph

async def main(path):
    graph = BlockGraph()
    node = await open_node(graph, {"driver": "qcow2", "node-name": "q",
                                   "file": {"driver": "file", "filename": path}})
    await node.write(1 << 20, b"\x42" * 4096)
    print("written", flush=True)
    while True:
        await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1]))
"""


def _qemu_img(*args: str | Path) -> str:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, check=True).stdout


def _bitmap_flags(img: Path) -> dict[str, list[str]]:
    info = json.loads(_qemu_img("info", "--output=json", img))
    return {b["name"]: b["flags"] for b in info["format-specific"]["data"].get("bitmaps", [])}


async def _open(graph: BlockGraph, img: Path, read_only: bool) -> Qcow2Node:
    node = await open_node(
        graph,
        {
            "driver": "qcow2",
            "node-name": "q",
            "read-only": read_only,
            "file": {"driver": "file", "filename": str(img)},
        },
    )
    assert isinstance(node, Qcow2Node)
    return node


def test_killed_writer_leaves_bitmaps_in_use(tmp_path: Path) -> None:
    img = tmp_path / "img.qcow2"
    _qemu_img("create", "-f", "qcow2", img, "8M")
    _qemu_img("bitmap", "--add", img, "tracked")
    _qemu_img("bitmap", "--add", "--disable", img, "frozen")
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(img)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == "written\n", child.stderr.read() if child.stderr else ""
    finally:
        child.kill()
        child.communicate()
    assert child.returncode == -9
    assert _bitmap_flags(img) == {"tracked": ["in-use", "auto"], "frozen": ["in-use"]}
    check = json.loads(
        subprocess.run(
            ["qemu-img", "check", "--output=json", str(img)], capture_output=True, text=True
        ).stdout
    )
    assert check.get("corruptions", 0) == 0, check

    async def reopen() -> None:
        graph = BlockGraph()
        node = await _open(graph, img, read_only=True)
        got = {sb.name: sb for sb in node.stored_bitmaps()}
        assert {name: sb.inconsistent for name, sb in got.items()} == {"tracked": True, "frozen": True}
        assert all(sb.bitmap.is_empty() for sb in got.values())
        await graph.close_all()
        # Read-write: inconsistent bitmaps are kept as they are (still in_use), and may be removed.
        graph = BlockGraph()
        node = await _open(graph, img, read_only=False)
        await node.write(0, b"\x01" * 512)
        fresh = DirtyBitmap(node.size, 65536)
        await node.store_bitmaps([*node.stored_bitmaps(), StoredBitmap("fresh", fresh)])
        await node.remove_stored_bitmap("frozen")
        with pytest.raises(BlockError):
            await node.remove_stored_bitmap("frozen")
        await graph.close_all()

    asyncio.run(reopen())
    assert _bitmap_flags(img) == {"tracked": ["in-use", "auto"], "fresh": ["auto"]}
    # QEMU can clear the inconsistent one the usual way.
    _qemu_img("bitmap", "--remove", img, "tracked")
    assert _bitmap_flags(img) == {"fresh": ["auto"]}
    _qemu_img("check", img)
