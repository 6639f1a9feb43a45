"""``base:allocation`` of an exported qcow2 overlay covers its backing chain, as QEMU's server does.

A range the overlay leaves to its backing file is that file's data (or hole), not a hole of the overlay:
qemu-img (compare, convert) takes an NBD hole for zeros, so reporting one there would lose data.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from cowbackup.daemon import Daemon
from cowbackup.nbd.listener import NBDServer

from .nbd_server_fixtures import check_tool, nbdinfo_map

MiB = 1 << 20


def test_an_overlay_export_reports_its_backing_files_data(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(8 * MiB)
        f.write(b"\x5a" * MiB)  # data at [0, 1M); a hole after it
    top = tmp_path / "top.qcow2"
    check_tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    check_tool("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 2M 1M", "-c", "write -z 4M 1M", str(top))
    extents = asyncio.run(_served_map(top, tmp_path / "nbd.sock"))
    # Data where the backing file or the overlay holds it; the zeros written in the overlay and the
    # backing file's hole read as zeros (holes).
    assert extents == [
        (0, MiB, True),
        (MiB, 2 * MiB, False),
        (2 * MiB, 3 * MiB, True),
        (3 * MiB, 8 * MiB, False),
    ]


async def _served_map(image: Path, sock: Path) -> list[tuple[int, int, bool]]:
    daemon = Daemon()
    server = NBDServer(daemon.graph)
    try:
        file = {"driver": "file", "filename": str(image)}
        await daemon.blockdev_add({"driver": "qcow2", "node-name": "top", "read-only": True, "file": file})
        server.add_export("top", "top", writable=False)
        await server.listen_unix(str(sock))
        uri = f"nbd+unix:///top?socket={sock}"
        await asyncio.to_thread(
            check_tool, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), uri
        )
        return await asyncio.to_thread(nbdinfo_map, uri)
    finally:
        await server.close()
        await daemon.close()
