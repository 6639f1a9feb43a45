"""``cowbackup demo``: live backups of a disk that is being written to, verified byte for byte.

What a new user runs first (the README's Quick start).  It builds a disk image with data, zero runs and
holes, keeps a copy of it as the reference, then backs it up at a limited speed while several writers
hammer the disk through the same graph a VM's writes would take (random writes, aligned and not,
write-zeroes, discards).  At the end it checks the two promises:

1. the backup equals the disk as it was when the backup started;
2. the disk holds every write that was acknowledged.

Then the nightly routine of a repository, with writers running again: a fresh encrypted repository, a
live full backup into it bound to a dirty bitmap, more writes, a live incremental that reads only what
changed, exactly as ``backup --qmp NODE --repo`` does it (over QMP, in this process); both snapshots are
restored and compared with the disk at their instants, and ``verify --read-data`` must be clean.

Writers own interleaved 1 MiB stripes, so the expected final disk is exact even with concurrent writers,
while their requests still share the backup's clusters and race with the background copy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import random
import shutil
import tempfile
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from cowbackup.block.drivers.file import create_file
from cowbackup.block.drivers.memory import MemoryNode
from cowbackup.block.graph import Root
from cowbackup.block.node import BlockNode
from cowbackup.cli import argtypes
from cowbackup.cli.errors import EXIT_FAILED, EXIT_OK
from cowbackup.cli.live_repo import live_backup
from cowbackup.daemon import Daemon
from cowbackup.jobs.backup import BackupParams
from cowbackup.qmp.server import QMPServer
from cowbackup.repo.backends import open_store
from cowbackup.repo.manifest import Manifest
from cowbackup.repo.reader import restore_disk
from cowbackup.repo.repository import Repository
from cowbackup.repo.verify import verify
from cowbackup.repo.workers import utc_now

MiB = 1024 * 1024
STRIPE = MiB
#: Requests per writer during each repository backup: a few, so that the incremental reads a part.
REPO_PHASE_WRITES = 6


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
    disk: Root,
    shadow: bytearray,
    index: int,
    count: int,
    stop: asyncio.Event,
    rng: random.Random,
    *,
    start: asyncio.Event | None = None,
    limit: int = 0,
) -> int:
    """Write, write zeros and discard in this writer's stripes until ``stop`` (after ``start``, and at
    most ``limit`` requests if given); the number of requests."""
    size = len(shadow)
    stripes = [s for s in range(0, size, STRIPE) if (s // STRIPE) % count == index]
    done = 0
    if start is not None:
        await start.wait()
    while not stop.is_set() and (not limit or done < limit):
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


def _set(event: asyncio.Event, _job_event: object) -> None:
    event.set()


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


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
        await daemon.blockdev_add(
            {"driver": "file", "node-name": "disk", "filename": src_path, "discard": "unmap"}
        )
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
        disk_ok = disk_now == bytes(shadow)

        repo_rows = await _repository_phase(args, daemon, workdir, vm, shadow, rng, console)
    finally:
        await daemon.close()

    backup_ok = error is None and backup_now == reference
    table = Table(title="live backup, verified")
    table.add_column("what")
    table.add_column("result")
    table.add_row("disk size", f"{args.size / MiB:.0f} MiB")
    table.add_row("backup time", f"{elapsed:.2f} s at a {args.speed / MiB:.0f} MiB/s limit")
    table.add_row("writes during the backup", f"{writes} (writes, write-zeroes, discards)")
    table.add_row("target allocated", f"{os.stat(tgt_path).st_blocks * 512 / MiB:.1f} MiB")
    table.add_row("backup == disk at start", "[green]yes" if backup_ok else f"[red]NO {error or ''}")
    table.add_row("disk holds every write", "[green]yes" if disk_ok else "[red]NO")
    repo_ok = all(ok for _what, _result, ok in repo_rows)
    for what, result, ok in repo_rows:
        table.add_row(what, f"[green]{result}" if ok else f"[red]{result}")
    console.print(table)
    return EXIT_OK if backup_ok and disk_ok and repo_ok else EXIT_FAILED


async def _repository_phase(
    args: argparse.Namespace,
    daemon: Daemon,
    workdir: str,
    vm: Root,
    shadow: bytearray,
    rng: random.Random,
    console: Console,
) -> list[tuple[str, str, bool]]:
    """A full and an incremental live backup into a new repository while writers write; each restored and
    compared with the disk at its instant; then verify.  Rows for the result table."""
    repo_path = os.path.join(workdir, "repo")
    password = os.path.join(workdir, "passphrase")
    await asyncio.to_thread(_write_file, password, b"demo passphrase\n")
    repo = await asyncio.to_thread(
        Repository.create,
        open_store(repo_path, "none"),
        chunk_size=MiB,
        encryption="repokey",
        level=3,
        passphrase=b"demo passphrase",
        created=utc_now(),
    )
    qmp_path = os.path.join(workdir, "qmp.sock")
    qmp = QMPServer(daemon)
    await qmp.listen_unix(qmp_path)
    os.environ.setdefault("COWBACKUP_CACHE_DIR", os.path.join(workdir, "cache"))
    rows: list[tuple[str, str, bool]] = []
    instants: list[tuple[Manifest, bytes]] = []
    try:
        for incremental in (False, True):
            # The instant: the disk as the backup will see it (writers paused, then started again).
            instant = await _read_all(daemon.graph.get("disk"))
            stop, job_created = asyncio.Event(), asyncio.Event()
            # The writers start the moment the job exists (the snapshot's instant): every write of
            # theirs comes after it, so ``instant`` is exactly what the snapshot must hold.
            unsubscribe = daemon.jobs.events.subscribe(functools.partial(_set, job_created))
            writers = [
                asyncio.ensure_future(
                    _writer(
                        vm,
                        shadow,
                        i,
                        args.writers,
                        stop,
                        random.Random(rng.random()),
                        start=job_created,
                        limit=REPO_PHASE_WRITES,
                    )
                )
                for i in range(args.writers)
            ]
            options = argparse.Namespace(
                qmp=qmp_path, source="disk", node=[], disk="disk0", repo=repo_path, name="demo/vm",
                tag=[], bitmap="demo", incremental=incremental, fallback_full=False, job_id=None,
                speed=args.speed, sync_level="none", json=False, nbd_socket=None, scratch_dir=None,
                password_file=password, audit=0.0,
            )  # fmt: skip
            try:
                with console.status(
                    f"{'incremental' if incremental else 'full'} backup into the repository..."
                ):
                    snap = await live_backup(options, repo)
            finally:
                unsubscribe()
                stop.set()
                job_created.set()
                await asyncio.gather(*writers)
            instants.append((snap, instant))
        for snap, instant in instants:
            target = MemoryNode("restored", len(instant))
            await restore_disk(repo, snap.disk(None), target, target_reads_zero=True)
            how = snap.disks[0].changes.get("method")
            stats = snap.stats
            read = stats.get("data_bytes", 0) + stats.get("zero_bytes", 0)
            rows.append(
                (
                    f"repository snapshot {snap.id[:8]} ({'incremental' if how == 'bitmap' else 'full'})",
                    f"{read / MiB:.0f} MiB read, {stats.get('new_stored_bytes', 0) / MiB:.1f} MiB stored; "
                    + (
                        "restores to the disk at its instant"
                        if target.snapshot() == instant
                        else "RESTORE DIFFERS"
                    ),
                    target.snapshot() == instant,
                )
            )
        report = await asyncio.to_thread(verify, repo, None, read_data=100.0)
        rows.append(
            ("verify --read-data", "clean" if report.ok else f"{len(report.bad)} bad object(s)", report.ok)
        )
    finally:
        await qmp.close()
    return rows
