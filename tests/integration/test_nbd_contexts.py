"""``qemu:allocation-depth`` and ``qemu:dirty-bitmap:NAME`` over NBD, read by nbdinfo and qemu-img.

The allocation depth of a qcow2 chain is compared with what ``qemu-nbd -A`` says of the same chain.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from cowbackup.block.bitmap import DirtyBitmap
from cowbackup.daemon import Daemon
from cowbackup.nbd.contexts import ALLOCATION_DEPTH, allocation_depth, dirty_bitmap_status
from cowbackup.nbd.listener import NBDServer

from .nbd_peers import start_peer
from .nbd_server_fixtures import acheck_tool, check_tool, serve

KiB = 1024
MiB = 1024 * KiB


def _chain(workdir: Path) -> Path:
    """base.qcow2 <- mid.qcow2 <- top.qcow2 with data at every depth, zeros and holes."""
    base, mid, top = workdir / "base.qcow2", workdir / "mid.qcow2", workdir / "top.qcow2"
    check_tool("qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M")
    check_tool("qemu-io", "-c", "write -P 1 0 64k", "-c", "write -P 1 3M 128k", str(base))
    check_tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(mid))
    check_tool("qemu-io", "-c", "write -P 2 64k 64k", "-c", "write -z 3M 64k", str(mid))
    check_tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    check_tool("qemu-io", "-c", "write -P 3 1M 64k", "-c", "write -z 2M 64k", str(top))
    return top


def _map(uri: str, context: str) -> list[tuple[int, int, int]]:
    entries: list[dict[str, Any]] = json.loads(check_tool("nbdinfo", f"--map={context}", "--json", uri))
    merged: list[tuple[int, int, int]] = []
    for e in entries:
        if merged and merged[-1][2] == e["type"] and merged[-1][0] + merged[-1][1] == e["offset"]:
            merged[-1] = (merged[-1][0], merged[-1][1] + e["length"], e["type"])
        else:
            merged.append((e["offset"], e["length"], e["type"]))
    return merged


def test_allocation_depth_and_dirty_bitmap_contexts(workdir: Path) -> None:
    top = _chain(workdir)
    argv = ["qemu-nbd", "-f", "qcow2", "--allocation-depth", "--read-only", "--persistent", str(top)]
    with start_peer("qemu-nbd", argv, workdir) as peer:
        expected_depth = _map(peer.uri(), ALLOCATION_DEPTH)
    assert {depth for _, _, depth in expected_depth} == {0, 1, 2, 3}

    bits = DirtyBitmap(4 * MiB, 64 * KiB)
    bits.set(0, 64 * KiB)
    bits.set(1 * MiB + 1, 10)  # one granule
    bits.set(3 * MiB, 1 * MiB)  # to the end
    socket = workdir / "ours.sock"

    async def main() -> None:
        daemon = Daemon()
        server = NBDServer(daemon.graph)
        try:
            await daemon.blockdev_add(
                {
                    "driver": "qcow2",
                    "node-name": "top",
                    "read-only": True,
                    "file": {"driver": "file", "filename": str(top)},
                }
            )
            server.add_export(
                "",
                "top",
                contexts={
                    ALLOCATION_DEPTH: allocation_depth,
                    "qemu:dirty-bitmap:b0": dirty_bitmap_status(lambda: bits),
                },
            )
            await server.listen_unix(str(socket))
            uri = f"nbd+unix:///?socket={socket}"
            listing = await acheck_tool("nbdinfo", "--list", "--json", uri)
            contexts = json.loads(listing)["exports"][0]["contexts"]
            assert contexts == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]
            ours = await asyncio.to_thread(_map, uri, ALLOCATION_DEPTH)
            assert ours == expected_depth
            dirty = await asyncio.to_thread(_map, uri, "qemu:dirty-bitmap:b0")
            assert dirty == [
                (0, 64 * KiB, 1),
                (64 * KiB, MiB - 64 * KiB, 0),
                (MiB, 64 * KiB, 1),
                (MiB + 64 * KiB, 2 * MiB - 64 * KiB, 0),
                (3 * MiB, MiB, 1),
            ]
            # qemu-img reads a bitmap through x-dirty-bitmap: dirty areas show as not data.
            opts = f"driver=nbd,server.type=unix,server.path={socket},x-dirty-bitmap=qemu:dirty-bitmap:b0"
            qmap = json.loads(await acheck_tool("qemu-img", "map", "--output=json", "--image-opts", opts))
            clean_or_dirty = [(e["start"], e["length"], e["data"]) for e in qmap]
            assert (0, 64 * KiB, False) in clean_or_dirty
            assert (3 * MiB, MiB, False) in clean_or_dirty
        finally:
            await server.close()
            await daemon.close()

    asyncio.run(main())


def test_serve_offers_allocation_depth_like_qemu_nbd(workdir: Path) -> None:
    """``cowbackup serve -A`` on a sparse raw image: depth 1 everywhere, as ``qemu-nbd -A`` says."""
    image = workdir / "disk.raw"
    with image.open("wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"\x17" * 64 * KiB)
    argv = ["qemu-nbd", "-f", "raw", "--allocation-depth", "--read-only", "--persistent", str(image)]
    with start_peer("qemu-nbd", argv, workdir) as peer:
        expected = _map(peer.uri(), ALLOCATION_DEPTH)
    with serve(image, workdir, "--read-only", "-A") as served:
        assert _map(served.uri, ALLOCATION_DEPTH) == expected == [(0, 4 * MiB, 1)]
    with serve(image, workdir, "--read-only") as served:
        listing = json.loads(check_tool("nbdinfo", "--list", "--json", served.uri))
        assert listing["exports"][0]["contexts"] == ["base:allocation"]
