"""Full backup into a qcow2 target: cowbackup's qcow2 driver against qemu-storage-daemon's.

Run: .venv/bin/python bench/qcow2_backup_vs_qemu.py [--size 1G] [--rounds 5] [--dir /dev/shm]

The source image is bench/backup_vs_qemu.py's mix (random data, written zeros, holes).  Each round, each
system backs it up (alternating which goes first) into a fresh, empty qcow2 image of the source's size::

    qemu       qemu-img create -f qcow2; qemu-storage-daemon with file+raw source and file+qcow2 target;
               blockdev-backup sync=full; time = command sent -> BLOCK_JOB_COMPLETED
    cowbackup  create_image(); an in-process Daemon with the same nodes; time = blockdev_backup() -> job
               concluded and the target flushed (our metadata is written back on flush)

Every target must compare equal to the source (``qemu-img compare``) and pass ``qemu-img check`` with no
leak.  Prints the median MB/s of each, their ratio (ours / qemu) and the target sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qemu.qmp import QMPClient

from backup_vs_qemu import (
    JOB_ID,
    JOB_TIMEOUT,
    MB,
    BenchError,
    _check_output,
    _qmp_connect,
    allocated,
    make_source,
)
from cowbackup.block.options import parse_size


def _check(source: str, target: str, system: str) -> None:
    cmp = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", source, target], check=False
    )
    if cmp.returncode != 0:
        raise BenchError(f"{system}: WRONG BACKUP, qcow2 target differs from the source")
    out = subprocess.run(
        ["qemu-img", "check", "--output=json", target], capture_output=True, text=True, check=False
    )
    report = json.loads(out.stdout or "{}")
    if out.returncode != 0 or report.get("corruptions", 0) or report.get("leaks", 0):
        raise BenchError(f"{system}: qemu-img check: {out.stdout}{out.stderr}")


async def run_qemu(workdir: str, source: str, target: str) -> float:
    size = str(os.stat(source).st_size)
    rc, out = await _check_output("qemu-img", "create", "-q", "-f", "qcow2", target, size)
    if rc:
        raise BenchError(f"qemu-img create: {out}")
    sock = os.path.join(workdir, "qmp.sock")
    nodes: list[dict[str, Any]] = [
        {"driver": "file", "node-name": "src-file", "filename": source, "read-only": True},
        {"driver": "raw", "node-name": "src", "file": "src-file", "read-only": True},
        {"driver": "file", "node-name": "tgt-file", "filename": target},
        {"driver": "qcow2", "node-name": "tgt", "file": "tgt-file"},
    ]
    argv = ["qemu-storage-daemon"]
    for node in nodes:
        argv += ["--blockdev", json.dumps(node)]
    argv += ["--chardev", f"socket,id=mon,path={sock},server=on,wait=off", "--monitor", "chardev=mon"]
    log = os.path.join(workdir, "qsd.log")
    logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=logfd, stderr=logfd, start_new_session=True)
    finally:
        os.close(logfd)
    qmp = QMPClient("qcow2-bench")
    try:
        await _qmp_connect(qmp, sock, proc, log)
        with qmp.listener(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")) as listener:
            started = time.perf_counter()
            args = {"job-id": JOB_ID, "device": "src", "target": "tgt", "sync": "full"}
            await qmp.execute("blockdev-backup", args)
            event = await asyncio.wait_for(listener.get(), JOB_TIMEOUT)
            seconds = time.perf_counter() - started
        data = event["data"]
        assert isinstance(data, dict)
        if event["event"] != "BLOCK_JOB_COMPLETED" or data.get("error"):
            raise BenchError(f"qemu: backup failed: {event}")
        await qmp.execute("quit")
        await asyncio.wait_for(proc.wait(), 30)
        return seconds
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


async def run_ours(source: str, target: str) -> float:
    from cowbackup.block.drivers.qcow2 import create_image
    from cowbackup.daemon import Daemon
    from cowbackup.jobs.backup import BackupParams

    create_image(target, os.stat(source).st_size)
    daemon = Daemon()
    try:
        await daemon.blockdev_add(
            {"driver": "file", "node-name": "src-file", "filename": source, "read-only": True}
        )
        await daemon.blockdev_add(
            {"driver": "raw", "node-name": "src", "file": "src-file", "read-only": True}
        )
        await daemon.blockdev_add({"driver": "file", "node-name": "tgt-file", "filename": target})
        tgt = await daemon.blockdev_add({"driver": "qcow2", "node-name": "tgt", "file": "tgt-file"})
        started = time.perf_counter()
        job = daemon.blockdev_backup(BackupParams(device="src", target="tgt", sync="full", job_id=JOB_ID))
        await asyncio.wait_for(job.wait_concluded(), JOB_TIMEOUT)
        await tgt.flush()
        return time.perf_counter() - started
    finally:
        await daemon.close()


async def main_async(args: argparse.Namespace, workdir: str) -> int:
    source = os.path.join(workdir, "source.img")
    layout = make_source(source, args.size, seed=7)
    print(f"source: {args.size / 2**20:.0f} MiB, data {layout.data >> 20} MiB, zero {layout.zero >> 20} MiB")
    times: dict[str, list[float]] = {"qemu": [], "cowbackup": []}
    sizes: dict[str, int] = {}
    for rnd in range(args.rounds):
        order = ["qemu", "cowbackup"] if rnd % 2 == 0 else ["cowbackup", "qemu"]
        for system in order:
            target = os.path.join(workdir, f"{system}.qcow2")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            seconds = await (
                run_qemu(workdir, source, target) if system == "qemu" else run_ours(source, target)
            )
            _check(source, target, system)
            times[system].append(seconds)
            sizes[system] = allocated(target)
            rate = args.size / seconds / MB
            print(f"round {rnd} {system:9s} {rate:8.1f} MB/s  target {sizes[system] >> 20} MiB")
    med = {s: args.size / statistics.median(t) / MB for s, t in times.items()}
    print(f"median MB/s: cowbackup {med['cowbackup']:.1f}, qemu {med['qemu']:.1f}")
    print(f"ratio cowbackup/qemu: {med['cowbackup'] / med['qemu']:.2f}")
    print(f"target allocated: cowbackup {sizes['cowbackup'] >> 20} MiB, qemu {sizes['qemu'] >> 20} MiB")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=parse_size, default=parse_size("1G"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default="/dev/shm")
    args = parser.parse_args()
    for tool in ("qemu-img", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="qcow2-bench-", dir=args.dir) as workdir:
        try:
            return asyncio.run(main_async(args, workdir))
        except BenchError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
