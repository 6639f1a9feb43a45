"""Throughput and memory of a full backup: cowbackup's engine against QEMU's (qemu-storage-daemon).

Run: .venv/bin/python bench/backup_vs_qemu.py [--size 1G] [--rounds 5] [--dir /dev/shm] [--json]

One source image is made with a deterministic mix of MiB-scale runs -- random data, written zeros (which
the file system allocates) and holes -- and both systems back it up ``--rounds`` times, alternating which
goes first.  Both read the same page-cached file; each run gets a fresh sparse target::

    qemu       qemu-storage-daemon: file+raw source (read-only), file target with discard=unmap and
               detect-zeroes=unmap (as drive-backup opens it); blockdev-backup sync=full over QMP;
               time = command sent -> BLOCK_JOB_COMPLETED received; RSS = VmHWM before quit
    cowbackup  a fresh "python this-script _driver" process: the same three nodes through
               Daemon.blockdev_add; time = blockdev_backup() -> job concluded; RSS = its own VmHWM
    cli        (--with-cli) the one-shot "cowbackup backup --json" path, run in the driver process

After every run the target must equal the source byte for byte (``qemu-img compare``) or the benchmark
fails.  Everything it made -- files, sockets, processes -- is removed on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.protocol import ConnectError

from cowbackup.block.options import parse_size
from cowbackup.cli.argtypes import positive_int

KiB = 1024
MiB = 1024 * KiB
MB = 1000 * 1000

#: Shares of the source image, in MiB units: random data, written zeros, holes.
MIX = {"data": 0.5, "zero": 0.2, "hole": 0.3}
#: Longest run of one kind, in MiB (runs are 1..MAX_RUN_MIB long).
MAX_RUN_MIB = 8
#: Longest a single backup may take before the benchmark gives up.
JOB_TIMEOUT = 900.0
#: How long qemu-storage-daemon may take to open its monitor socket.
START_TIMEOUT = 10.0
#: Prefix of the driver's result line on its stdout.
RESULT_MARK = "BENCH-RESULT "
DRIVER_COMMAND = "_driver"
SCRIPT = os.path.abspath(__file__)
JOB_ID = "bench0"


class BenchError(Exception):
    """The benchmark cannot go on: a tool failed, a job failed, or a backup differs from its source."""


@dataclasses.dataclass
class Layout:
    """What the source image holds, in bytes."""

    size: int
    data: int = 0
    zero: int = 0
    hole: int = 0
    runs: int = 0

    @property
    def allocated(self) -> int:
        return self.data + self.zero


@dataclasses.dataclass
class Run:
    """One backup by one system."""

    system: str
    round: int
    seconds: float
    rss: int
    target_allocated: int
    #: Wall time of the whole driver process (interpreter start included); 0 for qemu.
    wall: float = 0.0

    def mbps(self, size: int) -> float:
        return size / self.seconds / MB


@dataclasses.dataclass
class Perf:
    """``--workers`` / ``--max-chunk``: 0 leaves each system's default."""

    workers: int = 0
    max_chunk: int = 0


# ---------------------------------------------------------------------- the source image


def make_source(path: str, size: int, seed: int) -> Layout:
    """Write the source image: runs of random data, written zeros and holes in the ``MIX`` shares.

    The shares are exact in MiB units; the order and run lengths come from ``seed``.
    """
    rng = random.Random(seed)
    units = size // MiB
    left = {kind: round(units * share) for kind, share in MIX.items() if kind != "hole"}
    left["hole"] = units - sum(left.values())
    layout = Layout(size)
    zeros = bytes(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        offset = 0
        while offset < size:
            kinds = [kind for kind, n in left.items() if n > 0]
            kind = rng.choices(kinds, weights=[left[k] for k in kinds])[0]
            n = min(rng.randint(1, MAX_RUN_MIB), left[kind])
            left[kind] -= n
            layout.runs += 1
            for _ in range(n):
                if kind == "data":
                    os.pwrite(fd, rng.randbytes(MiB), offset)
                elif kind == "zero":
                    os.pwrite(fd, zeros, offset)
                offset += MiB
            setattr(layout, kind, getattr(layout, kind) + n * MiB)
    finally:
        os.close(fd)
    return layout


def create_sparse(path: str, size: int) -> None:
    """A fresh target: one hole of ``size`` bytes (what ``truncate -s`` and the CLI's create_file make)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def vm_hwm(pid: int | str) -> int:
    """Peak resident set size of a live process, in bytes (``VmHWM`` of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    raise BenchError(f"no VmHWM in /proc/{pid}/status")


async def _check_output(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(errors="replace")


async def verify(source: str, target: str, system: str) -> None:
    """Fail loudly unless ``target`` has the size and every byte of ``source``."""
    src_size, tgt_size = os.stat(source).st_size, os.stat(target).st_size
    if src_size != tgt_size:
        raise BenchError(f"{system}: target is {tgt_size} bytes, source {src_size}")
    rc, out = await _check_output("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", source, target)
    if rc != 0:
        _, detail = await _check_output("qemu-img", "compare", "-f", "raw", "-F", "raw", source, target)
        raise BenchError(f"{system}: WRONG BACKUP, target differs from source: {detail.strip() or out}")


# ---------------------------------------------------------------------- qemu


def _qsd_argv(binary: str, source: str, target: str, sock: str) -> list[str]:
    # JSON syntax, so that no file name needs comma escaping.
    nodes: list[dict[str, Any]] = [
        {"driver": "file", "node-name": "src-file", "filename": source, "read-only": True},
        {"driver": "raw", "node-name": "src", "file": "src-file", "read-only": True},
        {
            "driver": "file",
            "node-name": "tgt",
            "filename": target,
            "discard": "unmap",
            "detect-zeroes": "unmap",
        },
    ]
    argv = [binary]
    for node in nodes:
        argv += ["--blockdev", json.dumps(node)]
    argv += ["--chardev", f"socket,id=mon,path={sock},server=on,wait=off", "--monitor", "chardev=mon"]
    return argv


def _tail(path: str, lines: int = 10) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).strip()
    except OSError:
        return ""


async def _qmp_connect(qmp: QMPClient, sock: str, proc: asyncio.subprocess.Process, log: str) -> None:
    """Connect once the daemon listens; polls with a deadline and gives up if the daemon exits."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.returncode is not None:
            raise BenchError(f"qemu-storage-daemon exited with {proc.returncode}: {_tail(log)}")
        try:
            await qmp.connect(sock)
            return
        except ConnectError as err:
            if time.monotonic() > deadline:
                raise BenchError(f"no QMP monitor at {sock} after {START_TIMEOUT} s: {err}") from err
        await asyncio.sleep(0.01)


async def run_qemu(binary: str, workdir: str, source: str, target: str, perf: Perf, rnd: int) -> Run:
    sock = os.path.join(workdir, "qmp.sock")
    log = os.path.join(workdir, "qsd.log")
    logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        proc = await asyncio.create_subprocess_exec(
            *_qsd_argv(binary, source, target, sock),
            stdin=subprocess.DEVNULL,
            stdout=logfd,
            stderr=logfd,
            start_new_session=True,  # our finally stops it, not the terminal's Ctrl-C
        )
    finally:
        os.close(logfd)
    qmp = QMPClient("cowbackup-bench")
    try:
        await _qmp_connect(qmp, sock, proc, log)
        args: dict[str, Any] = {"job-id": JOB_ID, "device": "src", "target": "tgt", "sync": "full"}
        x_perf = {}
        if perf.workers:
            x_perf["max-workers"] = perf.workers
        if perf.max_chunk:
            x_perf["max-chunk"] = perf.max_chunk
        if x_perf:
            args["x-perf"] = x_perf
        with qmp.listener(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")) as listener:
            started = time.perf_counter()
            await qmp.execute("blockdev-backup", args)
            while True:
                event = await asyncio.wait_for(listener.get(), JOB_TIMEOUT)
                data = event["data"]
                if isinstance(data, dict) and data.get("device") == JOB_ID:
                    break
            seconds = time.perf_counter() - started
        if event["event"] != "BLOCK_JOB_COMPLETED" or data.get("error"):
            raise BenchError(f"qemu: backup failed: {event['event']} {data.get('error', '')}")
        rss = vm_hwm(proc.pid)
        await qmp.execute("quit")
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            raise BenchError("qemu-storage-daemon did not quit") from None
        return Run("qemu", rnd, seconds, rss, allocated(target))
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


# ---------------------------------------------------------------------- cowbackup (driver process)


async def _drive_engine(source: str, target: str, perf: Perf) -> float:
    """Back up with an in-process Daemon, nodes opened as qemu-storage-daemon opens them; job seconds."""
    from cowbackup.daemon import Daemon
    from cowbackup.jobs.backup import BackupParams, BackupPerf
    from cowbackup.jobs.events import Event

    daemon = Daemon()
    try:
        await daemon.blockdev_add(
            {"driver": "file", "node-name": "src-file", "filename": source, "read-only": True}
        )
        await daemon.blockdev_add(
            {"driver": "raw", "node-name": "src", "file": "src-file", "read-only": True}
        )
        await daemon.blockdev_add(
            {
                "driver": "file",
                "node-name": "tgt",
                "filename": target,
                "discard": "unmap",
                "detect-zeroes": "unmap",
            }
        )
        bperf = BackupPerf()
        if perf.workers:
            bperf.max_workers = perf.workers
        bperf.max_chunk = perf.max_chunk
        params = BackupParams(device="src", target="tgt", sync="full", job_id=JOB_ID, perf=bperf)
        outcome: list[Event] = []
        unsubscribe = daemon.jobs.events.subscribe(
            lambda e: outcome.append(e) if e.name.startswith("BLOCK_JOB_C") else None
        )
        try:
            started = time.perf_counter()
            job = daemon.blockdev_backup(params)
            await asyncio.wait_for(job.wait_concluded(), JOB_TIMEOUT)
            seconds = time.perf_counter() - started
        finally:
            unsubscribe()
        if not outcome or outcome[-1].name != "BLOCK_JOB_COMPLETED" or outcome[-1].data.get("error"):
            detail = f"{outcome[-1].name} {outcome[-1].data.get('error', '')}" if outcome else "no event"
            raise BenchError(f"cowbackup: backup failed: {detail}")
        return seconds
    finally:
        await daemon.close()


def _drive_cli(source: str, target: str, perf: Perf) -> float:
    """Run the one-shot CLI in this process; the job seconds from its JSON result line."""
    import io

    from cowbackup.cli.main import main as cli_main

    argv = ["backup", source, target, "--force", "--json"]
    if perf.workers:
        argv += ["--workers", str(perf.workers)]
    if perf.max_chunk:
        argv += ["--max-chunk", str(perf.max_chunk)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(argv)
    if rc != 0:
        raise BenchError(f"cowbackup backup exited with {rc}")
    for line in out.getvalue().splitlines():
        obj = json.loads(line)
        if obj.get("type") == "result":
            return float(obj["seconds"])
    raise BenchError("cowbackup backup printed no result line")


def driver_main(argv: Sequence[str]) -> int:
    """``_driver MODE SOURCE TARGET``: one backup in this process, then a result line on stdout."""
    p = argparse.ArgumentParser(prog=f"backup_vs_qemu.py {DRIVER_COMMAND}")
    p.add_argument("mode", choices=("engine", "cli"))
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--max-chunk", type=int, default=0)
    p.add_argument("--profile", metavar="FILE", help="write a cProfile of the run to FILE")
    args = p.parse_args(argv)
    perf = Perf(args.workers, args.max_chunk)
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    if args.mode == "engine":
        seconds = asyncio.run(_drive_engine(args.source, args.target, perf))
    else:
        seconds = _drive_cli(args.source, args.target, perf)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KiB
    result = {"seconds": seconds, "rss": max(vm_hwm("self"), maxrss)}
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    return 0


async def run_ours(mode: str, source: str, target: str, perf: Perf, rnd: int, profile: str | None) -> Run:
    argv = [sys.executable, SCRIPT, DRIVER_COMMAND, mode, source, target]
    argv += ["--workers", str(perf.workers), "--max-chunk", str(perf.max_chunk)]
    if profile:
        argv += ["--profile", profile]
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), JOB_TIMEOUT + 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    wall = time.perf_counter() - started
    name = "cowbackup" if mode == "engine" else "cli"
    lines = [ln for ln in out.decode().splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise BenchError(
            f"{name}: driver exited with {proc.returncode}: {err.decode(errors='replace')[-2000:]}"
        )
    result = json.loads(lines[-1][len(RESULT_MARK) :])
    return Run(name, rnd, float(result["seconds"]), int(result["rss"]), allocated(target), wall)


# ---------------------------------------------------------------------- rounds and report


async def run_rounds(args: argparse.Namespace, workdir: str, source: str, layout: Layout) -> list[Run]:
    systems = ["qemu", "cowbackup"] if args.only is None else [args.only]
    if args.with_cli:
        systems.append("cli")
    perf = Perf(args.workers, args.max_chunk)
    runs: list[Run] = []
    # Warm-up rounds (numbered <= 0) run and verify like the others but do not count: the first backups
    # after boot touch memory the kernel (or the hypervisor) has never handed out, and are much slower.
    for rnd in range(1 - args.warmup, args.rounds + 1):
        # Alternate who goes first, so neither always profits from (or pays for) the other's leftovers.
        order = systems if rnd % 2 else systems[::-1]
        label = f"round {rnd}/{args.rounds}" if rnd > 0 else "warm-up"
        for system in order:
            target = os.path.join(workdir, f"target-{system}.raw")
            create_sparse(target, layout.size)
            if system == "qemu":
                run = await run_qemu(args.qemu_storage_daemon, workdir, source, target, perf, rnd)
            else:
                mode = "engine" if system == "cowbackup" else "cli"
                run = await run_ours(mode, source, target, perf, rnd, args.profile)
            await verify(source, target, system)
            os.unlink(target)
            if rnd > 0:
                runs.append(run)
            _progress(
                f"{label:<11} {system:<9} {run.seconds:7.3f} s "
                f"{run.mbps(layout.size):8.0f} MB/s  rss {run.rss / MiB:6.1f} MiB  "
                f"target {run.target_allocated / MiB:7.1f} MiB  ok"
            )
    return runs


def _progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def summarize(runs: list[Run], layout: Layout) -> dict[str, Any]:
    systems: dict[str, Any] = {}
    for name in dict.fromkeys(r.system for r in runs):
        mine = [r for r in runs if r.system == name]
        rates = [r.mbps(layout.size) for r in mine]
        systems[name] = {
            "runs": len(mine),
            "median_mbps": statistics.median(rates),
            "min_mbps": min(rates),
            "max_mbps": max(rates),
            "median_seconds": statistics.median(r.seconds for r in mine),
            "median_rss": statistics.median(r.rss for r in mine),
            "median_target_allocated": statistics.median(r.target_allocated for r in mine),
        }
        if name != "qemu":
            systems[name]["median_wall"] = statistics.median(r.wall for r in mine)
    summary: dict[str, Any] = {"systems": systems}
    if "qemu" in systems and "cowbackup" in systems:
        summary["ratio_of_medians"] = systems["cowbackup"]["median_mbps"] / systems["qemu"]["median_mbps"]
        paired = [
            o.mbps(layout.size) / q.mbps(layout.size)
            for o in runs
            if o.system == "cowbackup"
            for q in runs
            if q.system == "qemu" and q.round == o.round
        ]
        summary["median_paired_ratio"] = statistics.median(paired)
    return summary


def print_table(summary: dict[str, Any], layout: Layout, args: argparse.Namespace) -> None:
    print(
        f"source: {layout.size / MiB:.0f} MiB in {layout.runs} runs; "
        f"allocated {layout.allocated / MiB:.0f} MiB "
        f"(data {layout.data / MiB:.0f} MiB + written zeros {layout.zero / MiB:.0f} MiB), "
        f"holes {layout.hole / MiB:.0f} MiB; dir {args.dir}; MB = 10^6 bytes"
    )
    header = (
        f"{'system':<10} {'runs':>4} {'median MB/s':>12} {'min':>8} {'max':>8} {'median s':>9} "
        f"{'peak RSS MiB':>13} {'target MiB':>11} {'src alloc MiB':>14} {'data MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, s in summary["systems"].items():
        print(
            f"{name:<10} {s['runs']:>4} {s['median_mbps']:>12.0f} "
            f"{s['min_mbps']:>8.0f} {s['max_mbps']:>8.0f} "
            f"{s['median_seconds']:>9.3f} {s['median_rss'] / MiB:>13.1f} "
            f"{s['median_target_allocated'] / MiB:>11.1f} {layout.allocated / MiB:>14.0f} "
            f"{layout.data / MiB:>9.0f}"
        )
    if "ratio_of_medians" in summary:
        print(f"ratio (cowbackup / qemu, median MB/s): {summary['ratio_of_medians']:.2f}")
        print(f"ratio (cowbackup / qemu, median of per-round ratios): {summary['median_paired_ratio']:.2f}")


# ---------------------------------------------------------------------- command line


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size '{text}' (examples: 256M, 1G)") from None
    return value


def _image_size(text: str) -> int:
    value = _size(text)
    if value < MiB or value % MiB:
        raise argparse.ArgumentTypeError(f"--size must be a positive multiple of 1 MiB, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Compare cowbackup's backup engine with QEMU's on one source image (sync=full)."
    )
    p.add_argument("--size", type=_image_size, default=1 << 30, help="source size (default 1G)")
    p.add_argument("--rounds", type=positive_int, default=5, help="backups per system (default 5)")
    p.add_argument("--dir", default="/dev/shm", help="where the images go (default /dev/shm)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted rounds first (default 1)")
    p.add_argument("--seed", type=int, default=1, help="seed of the source layout and data (default 1)")
    p.add_argument("--workers", type=positive_int, default=0, help="parallel copy tasks (x-perf max-workers)")
    p.add_argument("--max-chunk", type=_size, default=0, help="largest copy (x-perf max-chunk), e.g. 1M")
    p.add_argument("--only", choices=("ours", "qemu"), help="run only one system")
    p.add_argument("--with-cli", action="store_true", help="also time the 'cowbackup backup' CLI path")
    p.add_argument("--keep", action="store_true", help="keep the work directory (source image) at exit")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--profile", metavar="FILE", help="cProfile our runs into FILE (the last run wins)")
    p.add_argument("--qemu-storage-daemon", default="qemu-storage-daemon", help="daemon binary to use")
    return p


async def _main_async(args: argparse.Namespace, workdir: str, source: str, layout: Layout) -> list[Run]:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run_rounds(args, workdir, source, layout)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [DRIVER_COMMAND]:
        return driver_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.only == "ours":
        args.only = "cowbackup"
    for tool in ("qemu-img", *([args.qemu_storage_daemon] if args.only != "cowbackup" else [])):
        if shutil.which(tool) is None:
            _progress(f"backup_vs_qemu: '{tool}' not found")
            return 2
    # SIGTERM cleans up like Ctrl-C (inside the event loop, _main_async routes it to a task cancel).
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = tempfile.mkdtemp(prefix="cowbackup-bench-", dir=args.dir)
    try:
        source = os.path.join(workdir, "source.raw")
        started = time.perf_counter()
        layout = make_source(source, args.size, args.seed)
        _progress(
            f"source {source}: {layout.size / MiB:.0f} MiB, data {layout.data / MiB:.0f} / zeros "
            f"{layout.zero / MiB:.0f} / holes {layout.hole / MiB:.0f} MiB, allocated "
            f"{allocated(source) / MiB:.0f} MiB ({time.perf_counter() - started:.1f} s)"
        )
        runs = asyncio.run(_main_async(args, workdir, source, layout))
        signal.signal(signal.SIGTERM, _interrupt)  # the loop's removal reset it to the default
        summary = summarize(runs, layout)
        if args.json:
            doc = {
                "layout": {**dataclasses.asdict(layout), "allocated": layout.allocated},
                "config": {k: v for k, v in vars(args).items() if k != "profile"},
                "runs": [{**dataclasses.asdict(r), "mbps": r.mbps(layout.size)} for r in runs],
                "summary": summary,
            }
            print(json.dumps(doc, indent=2))
        else:
            print_table(summary, layout, args)
        return 0
    except BenchError as err:
        _progress(f"backup_vs_qemu: FAILED: {err}")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        _progress("backup_vs_qemu: interrupted")
        return 130
    finally:
        if args.keep:
            _progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
