"""The speed limit counts copies made for guest writes: a backup's duration under writes, against QEMU's.

QEMU charges every copy to the job's rate limit (block/block-copy.c): background copies wait for it,
copies made before a guest write do not wait but are counted, so a guest writing during a speed-limited
backup does not make the job end early.  Here both daemons (test_qmp_differential's) back up the same
24 MiB of random data with ``speed`` = 8 MiB/s (3 s) while qemu-io writes 4 KiB into each cluster of the
last third through the NBD export, long before the job gets there.  Had those 8 MiB of guest copies gone
uncounted, the job would end after about 2 s; counted, it takes about 3 s, on both.  Times are taken from
``blockdev-backup`` sent to ``BLOCK_JOB_COMPLETED`` received; the bounds leave room for a loaded machine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import IO

import pytest

from .nbd_peers import require
from .test_qmp_differential import QSD, Backend, daemon, event_is, events_until

MiB = 1024 * 1024
C = 64 * 1024
SIZE = 24 * MiB
SPEED = 8 * MiB
#: Clusters written during the job: the last third of the disk.
WRITTEN = range(2 * SIZE // 3 // C, SIZE // C)

pytestmark = pytest.mark.skipif(shutil.which(QSD) is None, reason=f"{QSD} is not installed")


async def _export(b: Backend) -> str:
    sock = str(b.workdir / f"{b.kind}-nbd.sock")
    await b.client.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    await b.client.execute(
        "block-export-add", {"type": "nbd", "id": "e", "node-name": "src", "writable": True}
    )
    return f"nbd+unix:///src?socket={sock}"


async def _write_during_backup(b: Backend) -> tuple[float, float]:
    """(job seconds, seconds until qemu-io was done), both from the backup command."""
    c = b.client
    uri = await _export(b)
    argv = ["qemu-io", "-f", "raw"]
    for n in WRITTEN:
        argv += ["-c", f"write -P 0x5a {n * C + 512} 4096"]
    start = time.monotonic()
    await c.execute(
        "blockdev-backup",
        {
            "job-id": "b",
            "device": "src",
            "target": "tgt0",
            "sync": "full",
            "speed": SPEED,
            "x-perf": {"max-chunk": MiB},
        },
    )
    proc = await asyncio.create_subprocess_exec(
        *argv, uri, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    writes_done = time.monotonic() - start
    assert proc.returncode == 0 and b"failed" not in out, out.decode()
    events = await asyncio.wait_for(events_until(c, event_is("BLOCK_JOB_COMPLETED")), 30)
    job = time.monotonic() - start
    assert "error" not in events[-1][1], events[-1]
    return job, writes_done


def test_guest_copies_count_against_the_speed_limit(workdir: Path) -> None:
    require("qemu-io")
    source = workdir / "src.img"
    source.write_bytes(os.urandom(SIZE))

    async def one(kind: str, log: IO[bytes]) -> tuple[float, float]:
        async with daemon(kind, workdir, source, log) as backend:
            return await _write_during_backup(backend)

    seen: dict[str, tuple[float, float]] = {}
    for kind in ("qemu", "ours"):
        for n in (0, 1):
            with open(workdir / f"tgt{n}-{kind}.img", "wb") as f:
                f.truncate(SIZE)
        with open(workdir / f"{kind}.log", "wb") as log:
            seen[kind] = asyncio.run(one(kind, log))
    # The guest's writes landed before the job reached the last third (about 2 s in).
    for kind, (_, writes_done) in seen.items():
        assert writes_done < 1.5, (kind, seen)
    ours, qemu = seen["ours"][0], seen["qemu"][0]
    # Without the charge ours took about 2/3 of QEMU's time.
    assert 0.85 < ours / qemu < 1.25, seen
    assert ours > 0.85 * SIZE / SPEED, seen
