"""``blockdev-backup compress=true`` over QMP: a qcow2 target gets compressed clusters, passes qemu-img check
and compares identical to the source; a target that cannot compress is refused with QEMU's message."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from cowbackup.block.drivers.qcow2 import create_image
from cowbackup.daemon import Daemon
from cowbackup.qmp.server import QMPServer

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")

MiB = 1024 * 1024
SIZE = 16 * MiB


def _qemu_img(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, check=check)


def _make_source(path: Path) -> None:
    """Compressible text in most clusters, a random (incompressible) MiB, a hole and a partial cluster."""
    rnd = random.Random(7)
    words = [b"backup", b"cluster", b"qcow2", b"snapshot", b"bitmap", b"\n"]
    data = bytearray(b" ".join(rnd.choice(words) for _ in range(2 * SIZE // 7))[:SIZE])
    data[4 * MiB : 5 * MiB] = rnd.randbytes(MiB)
    data[8 * MiB : 10 * MiB] = bytes(2 * MiB)
    data[12 * MiB + 100 : 12 * MiB + 200] = bytes(100)
    path.write_bytes(data)


async def _backup(sock: Path, src: Path, tgt: Path, target_driver: str) -> dict[str, Any]:
    daemon = Daemon()
    server = QMPServer(daemon)
    await server.listen_unix(str(sock))
    client = QMPClient("t")
    try:
        await client.connect(str(sock))
        await client.execute(
            "blockdev-add",
            {"driver": "raw", "node-name": "src", "file": {"driver": "file", "filename": str(src)}},
        )
        await client.execute(
            "blockdev-add",
            {"driver": target_driver, "node-name": "tgt", "file": {"driver": "file", "filename": str(tgt)}},
        )
        args = {"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "compress": True}
        try:
            await client.execute("blockdev-backup", args)
        except ExecuteError as err:
            return {"error": str(err)}
        while True:
            event: Any = await client.events.get()
            if event["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"):
                data: dict[str, Any] = event["data"]
                return data
    finally:
        await client.disconnect()
        await server.close()
        await daemon.close()


def test_compressed_backup_into_qcow2(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    _make_source(src)
    tgt = tmp_path / "tgt.qcow2"
    create_image(str(tgt), SIZE)
    done = asyncio.run(asyncio.wait_for(_backup(tmp_path / "qmp.sock", src, tgt, "qcow2"), 120))
    assert "error" not in done and done["offset"] == SIZE, done
    check = json.loads(_qemu_img("check", "--output=json", tgt).stdout)
    assert check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0, check
    compressed = check["compressed-clusters"]
    allocated = check["allocated-clusters"]
    # Every compressible data cluster is stored compressed; the random MiB (16 clusters) is not.
    assert compressed >= allocated - 16 - 2 and compressed > 150, check
    cmp = _qemu_img("compare", "-f", "qcow2", "-F", "raw", tgt, src, check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    # Text compresses about 3:1: the image is far smaller than the 14 MiB of data.
    assert tgt.stat().st_size < 8 * MiB


def test_compress_refused_on_raw_target(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(MiB))
    tgt = tmp_path / "tgt.raw"
    tgt.write_bytes(bytes(MiB))
    done = asyncio.run(asyncio.wait_for(_backup(tmp_path / "qmp.sock", src, tgt, "raw"), 60))
    assert done == {"error": "Compression is not supported for this drive tgt"}
