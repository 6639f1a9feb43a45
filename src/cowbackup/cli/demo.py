"""``cowbackup demo``: a live backup of a disk that is being written to, verified byte for byte.

What a new user runs first (the README's Quick start).  It builds a disk image with data, zero runs and
holes, keeps a copy of it as the reference, then backs it up at a limited speed while several writers
hammer the disk through the same graph a VM's writes would take (random writes, aligned and not,
write-zeroes, discards).  At the end it checks the two promises:

1. the backup equals the disk as it was when the backup started;
2. the disk holds every write that was acknowledged.

Writers own interleaved 1 MiB stripes, so the expected final disk is exact even with concurrent writers,
while their requests still share the backup's clusters and race with the background copy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import tempfile
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from cowbackup.block.drivers.file import create_file
from cowbackup.block.graph import Root
from cowbackup.block.node import BlockNode
from cowbackup.cli import argtypes
from cowbackup.cli.errors import EXIT_FAILED, EXIT_OK
from cowbackup.daemon import Daemon
from cowbackup.jobs.backup import BackupParams

MiB = 1024 * 1024
STRIPE = MiB


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="live backup of a disk under writes, verified")
    p.add_argument("--size", type=argtypes.size, default=256 * MiB, help="disk size (default 256M)")
    p.add_argument(
        "--speed", type=argtypes.size, default=128 * MiB, help="backup speed limit (default 128M/s)"
    )
    p.add_argument("--writers", type=int, default=4, help="concurrent writers (default 4)")
    p.add_argument("--dir", default=None, help="where to put the images (default: a temp dir in /dev/shm)")
    p.add_argument("--keep", action="store_true", help="keep the images")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    base = args.dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    workdir = tempfile.mkdtemp(prefix="cowbackup-demo-", dir=base)
    try:
        return asyncio.run(_demo(args, workdir))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _make_disk(path: str, size: int, rng: random.Random) -> None:
    """Data in every 4th MiB, explicit zero runs in some, holes in the rest."""
    create_file(path, size)
    with open(path, "r+b") as f:
        for off in range(0, size, MiB):
            kind = (off // MiB) % 4
            n = min(MiB, size - off)
            if kind == 0:
                f.seek(off)
                f.write(rng.randbytes(n))
            elif kind == 1:
                f.seek(off)
                f.write(bytes(n))
            elif kind == 2:
                f.seek(off + n // 2)
                f.write(rng.randbytes(n // 4))


async def _writer(
    disk: Root, shadow: bytearray, index: int, count: int, stop: asyncio.Event, rng: random.Random
) -> int:
    size = len(shadow)
    stripes = [s for s in range(0, size, STRIPE) if (s // STRIPE) % count == index]
    done = 0
    while not stop.is_set():
        stripe = rng.choice(stripes)
        end = min(stripe + STRIPE, size)
        off = rng.randrange(stripe, end)
        n = rng.randrange(1, min(end - off, 256 * 1024) + 1)
        kind = rng.random()
        node: BlockNode = disk.node
        if kind < 0.7:
            data = rng.randbytes(n)
            await node.write(off, data)
            shadow[off : off + n] = data
        elif kind < 0.85:
            await node.write_zeroes(off, n)
            shadow[off : off + n] = bytes(n)
        else:
            # Discard on a file punches a hole; the bytes read back as zeros (aligned part only).
            await node.discard(off, n)
            after = bytearray(n)
            await node.read(off, after)
            shadow[off : off + n] = after
        done += 1
        await asyncio.sleep(0)
    return done


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def _read_all(node: BlockNode) -> bytes:
    buf = bytearray(node.size)
    await node.read(0, buf)
    return bytes(buf)


async def _demo(args: argparse.Namespace, workdir: str) -> int:
    console = Console(stderr=True)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    src_path = os.path.join(workdir, "disk.img")
    tgt_path = os.path.join(workdir, "backup.img")
    console.print(f"[bold]cowbackup demo[/]: {args.size // MiB} MiB disk in {workdir}, seed {seed}")
    _make_disk(src_path, args.size, rng)
    reference = await asyncio.to_thread(_read_file, src_path)
    shadow = bytearray(reference)
    create_file(tgt_path, args.size)

    daemon = Daemon()
    try:
        await daemon.blockdev_add({"driver": "file", "node-name": "disk", "filename": src_path})
        await daemon.blockdev_add({"driver": "file", "node-name": "backup", "filename": tgt_path})
        vm = Root("demo writers")
        daemon.graph.attach(vm, "root", daemon.graph.get("disk"))
        started = time.monotonic()
        job = daemon.blockdev_backup(
            BackupParams(device="disk", target="backup", sync="full", speed=args.speed)
        )
        stop = asyncio.Event()
        writers = [
            asyncio.ensure_future(_writer(vm, shadow, i, args.writers, stop, random.Random(rng.random())))
            for i in range(args.writers)
        ]
        with console.status("backing up while writers write...") as status:
            while job.status.value not in ("concluded", "null"):
                percent = job.progress_current * 100 // max(job.progress_total, 1)
                status.update(f"backing up while writers write... {percent}%")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(job.wait_concluded(), 0.2)
        elapsed = time.monotonic() - started
        stop.set()
        writes = sum(await asyncio.gather(*writers))
        error = job.error
        disk_now = await _read_all(daemon.graph.get("disk"))
        backup_now = await _read_all(daemon.graph.get("backup"))
    finally:
        await daemon.close()

    backup_ok = error is None and backup_now == reference
    disk_ok = disk_now == bytes(shadow)
    table = Table(title="live backup, verified")
    table.add_column("what")
    table.add_column("result")
    table.add_row("disk size", f"{args.size / MiB:.0f} MiB")
    table.add_row("backup time", f"{elapsed:.2f} s at a {args.speed / MiB:.0f} MiB/s limit")
    table.add_row("writes during the backup", f"{writes} (writes, write-zeroes, discards)")
    table.add_row("target allocated", f"{os.stat(tgt_path).st_blocks * 512 / MiB:.1f} MiB")
    table.add_row("backup == disk at start", "[green]yes" if backup_ok else f"[red]NO {error or ''}")
    table.add_row("disk holds every write", "[green]yes" if disk_ok else "[red]NO")
    console.print(table)
    return EXIT_OK if backup_ok and disk_ok else EXIT_FAILED
