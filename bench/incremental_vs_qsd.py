"""Incremental backup against a full one, ``cowbackup daemon`` and ``qemu-storage-daemon`` in the same run.

Run: .venv/bin/python bench/incremental_vs_qsd.py [--size 4G] [--dirty 0.01] [--rounds 3] [--json]

The goal (issue #6): the cost of an incremental backup grows with the changed data, so on a 4 GiB image with
1% of it dirty an incremental takes at most ~2% of the time of a full backup.

One source image is made once in ``--dir`` (daemon_vs_qsd.py's generator: 50% random data, 20% written
zeros, 30% holes, in MiB runs).  Each turn, one system gets a fresh extent-preserving copy of it
(``live.raw``) and one daemon started with daemon_vs_qsd.py's options (``file``+``raw`` node ``src``, a
writable NBD export of it, a QMP monitor), then::

    full         transaction [block-dirty-bitmap-add src/bm0 granularity=64K,
                              blockdev-backup sync=full]          -> fresh sparse full.raw
                 timed: command sent -> BLOCK_JOB_COMPLETED; then cmp full.raw live.raw (no guest I/O ran)
    dirty        --dirty of the 64 KiB clusters, chosen with --seed, each rewritten whole with random
                 bytes through the NBD export (our NBD client, the same offsets and bytes for both
                 systems); then x-debug-block-dirty-bitmap-sha256 of bm0 must be the hash of exactly
                 those clusters
    incremental  blockdev-backup sync=incremental bitmap=bm0      -> fresh sparse incr.raw
                 timed the same way; the event's ``len`` must be the dirty bytes; bm0 must be empty
                 afterwards (on success its successor, which saw no write, takes its place); then every
                 dirty cluster of incr.raw must equal live.raw's and every other cluster must be zeros

Targets are added with ``blockdev-add`` as ``{"driver": "file", "discard": "unmap", "detect-zeroes":
"unmap"}`` (what daemon_vs_qsd.py uses) and removed after their job.  Rounds alternate which system goes
first, after ``--warmup`` uncounted ones.  A wrong target or bitmap stops the benchmark with exit status 1.
Everything it made -- files, sockets, processes -- is removed on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from cowbackup.cli.argtypes import positive_int
from cowbackup.nbd.client_conn import NBDClient
from cowbackup.nbd.uri import parse_uri
from daemon_vs_qsd import (
    CLUSTER,
    EXPORT,
    JOB_TIMEOUT,
    MB,
    STOP_TIMEOUT,
    SYSTEMS,
    BenchError,
    Config,
    DaemonProc,
    Layout,
    MiB,
    _image_size,
    _interrupt,
    _progress,
    _size,
    copy_extents,
    create_sparse,
    make_source,
    same_bytes,
)

JOB_ID = "inc0"
BITMAP = "bm0"
#: The bitmap's granularity, and the size of each guest write (whole clusters: every write dirties one
#: granule and the incremental copies exactly what was written).
GRANULARITY = CLUSTER
#: NBD writes in flight while dirtying the image.
WRITE_DEPTH = 16
#: The issue's goal for incremental time / full time is 2% at 1% dirty: twice the dirty share.
GOAL_PER_DIRTY = 2.0


@dataclasses.dataclass(frozen=True)
class Metric:
    """One number each turn records, under ``key``."""

    key: str
    unit: str
    higher_is_better: bool


METRICS = (
    Metric("full s", "s", False),
    Metric("full MB/s", "MB/s", True),
    Metric("incr s", "s", False),
    Metric("incr/full", "ratio", False),
    Metric("incr MB/s", "MB/s", True),
    Metric("incr len", "MiB", False),
    Metric("dirty", "MiB", False),
)


@dataclasses.dataclass
class Sample:
    """One measurement: ``metric`` is a :attr:`Metric.key`."""

    system: str
    round: int
    metric: str
    value: float


@dataclasses.dataclass(frozen=True)
class DirtyPlan:
    """Which clusters the guest rewrites (in the order it writes them) and the bytes it writes there."""

    offsets: tuple[int, ...]
    seed: int

    @property
    def dirty_bytes(self) -> int:
        return len(self.offsets) * GRANULARITY

    def data(self) -> list[bytes]:
        """The payload of each write, the same for every system and round."""
        rng = random.Random(self.seed)
        return [rng.randbytes(GRANULARITY) for _ in self.offsets]

    def bitmap_sha256(self, size: int) -> str:
        """The x-debug-block-dirty-bitmap-sha256 a bitmap holding exactly these clusters must give.

        Both daemons hash level 0 of the bitmap as 64-bit little-endian words, bit ``i`` = granule ``i``:
        as bytes, bit ``i % 8`` of byte ``i // 8``, padded with zeros to whole words.
        """
        granules = -(-size // GRANULARITY)
        bits = bytearray(-(-granules // 64) * 8)
        for offset in self.offsets:
            g = offset // GRANULARITY
            bits[g // 8] |= 1 << (g % 8)
        return hashlib.sha256(bits).hexdigest()


def make_plan(size: int, share: float, seed: int) -> DirtyPlan:
    """``share`` of the image's clusters (at least one), chosen at random with ``seed``."""
    clusters = size // GRANULARITY
    count = max(1, round(clusters * share))
    rng = random.Random(seed)
    return DirtyPlan(tuple(c * GRANULARITY for c in rng.sample(range(clusters), count)), seed + 1)


def empty_sha256(size: int) -> str:
    return DirtyPlan((), 0).bitmap_sha256(size)


def check_incremental_target(live: str, target: str, plan: DirtyPlan) -> int:
    """Every dirty cluster of ``target`` must equal ``live``'s, every other cluster read as zeros.

    Only the target's allocated extents are read for the second part (holes read as zeros).  Returns the
    target's allocated bytes.  Raises BenchError on the first wrong cluster.
    """
    dirty = set(plan.offsets)
    zero = bytes(GRANULARITY)
    with open(live, "rb") as fl, open(target, "rb") as ft:
        for offset in sorted(dirty):
            if os.pread(ft.fileno(), GRANULARITY, offset) != os.pread(fl.fileno(), GRANULARITY, offset):
                raise BenchError(f"WRONG INCREMENTAL: dirty cluster at {offset} differs from the image")
        fd = ft.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            cluster = start - start % GRANULARITY
            while cluster < end:
                if cluster not in dirty and os.pread(fd, GRANULARITY, cluster) != zero:
                    raise BenchError(f"WRONG INCREMENTAL: clean cluster at {cluster} holds data")
                cluster += GRANULARITY
            pos = end
        return os.fstat(fd).st_blocks * 512


# ---------------------------------------------------------------------- one turn


class Turn:
    """One system's turn in one round: a daemon, a full backup, the guest's writes, an incremental."""

    def __init__(self, cfg: Config, args: argparse.Namespace, plan: DirtyPlan, system: str, rnd: int) -> None:
        self.cfg = cfg
        self.args = args
        self.plan = plan
        self.system = system
        self.rnd = rnd
        self.label = f"round {rnd}/{args.rounds}" if rnd > 0 else "warm-up"
        self.samples: list[Sample] = []
        self.live = os.path.join(cfg.workdir, "live.raw")
        self.full_target = os.path.join(cfg.workdir, "full.raw")
        self.incr_target = os.path.join(cfg.workdir, "incr.raw")

    def record(self, metric: str, value: float) -> None:
        self.samples.append(Sample(self.system, self.rnd, metric, value))

    def report(self, step: str, text: str) -> None:
        _progress(f"{self.label:<11} {self.system:<9} {step:<11} {text}")

    async def run(self) -> None:
        copy_extents(self.cfg.source, self.live)
        try:
            async with DaemonProc(self.cfg, self.system, self.live) as d:
                full_s = await self.full(d)
                await self.dirty(d)
                incr_s = await self.incremental(d)
            allocated = check_incremental_target(self.live, self.incr_target, self.plan)
            ratio = incr_s / full_s
            self.record("incr/full", ratio)
            self.report(
                "check",
                f"incremental target ok ({allocated / MiB:.1f} MiB allocated); incr/full {100 * ratio:.2f}%",
            )
        finally:
            for path in (self.live, self.full_target, self.incr_target):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def _perf(self) -> dict[str, Any]:
        return {"x-perf": {"max-chunk": self.args.max_chunk}} if self.args.max_chunk else {}

    async def _add_target(self, d: DaemonProc, path: str) -> None:
        create_sparse(path, self.cfg.size)
        node = {
            "driver": "file",
            "node-name": "tgt",
            "filename": path,
            "discard": "unmap",
            "detect-zeroes": "unmap",
        }
        await d.qmp.execute("blockdev-add", node)

    async def _del_target(self, d: DaemonProc) -> None:
        """Wait until the concluded job is gone (auto-dismiss), then close the target node."""
        deadline = time.monotonic() + STOP_TIMEOUT
        while JOB_ID in await d.jobs():
            if time.monotonic() > deadline:
                raise BenchError(f"{self.system}: job {JOB_ID} still listed {STOP_TIMEOUT} s after it ended")
            await asyncio.sleep(0.01)
        await d.qmp.execute("blockdev-del", {"node-name": "tgt"})

    async def _timed_job(self, d: DaemonProc, command: str, args: dict[str, Any]) -> tuple[float, int]:
        """Send ``command`` (which starts job JOB_ID); seconds until BLOCK_JOB_COMPLETED, and its ``len``."""
        with d.qmp.listener(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")) as listener:
            started = time.perf_counter()
            await d.qmp.execute(command, args)
            while True:
                event = await asyncio.wait_for(listener.get(), JOB_TIMEOUT)
                data = event["data"]
                if isinstance(data, dict) and data.get("device") == JOB_ID:
                    break
            seconds = time.perf_counter() - started
        if event["event"] != "BLOCK_JOB_COMPLETED" or data.get("error"):
            raise BenchError(f"{self.system}: {command} failed: {event['event']} {data.get('error', '')}")
        return seconds, int(data["len"])

    async def _bitmap_sha256(self, d: DaemonProc) -> str:
        reply = await d.qmp.execute("x-debug-block-dirty-bitmap-sha256", {"node": EXPORT, "name": BITMAP})
        assert isinstance(reply, dict)
        return str(reply["sha256"])

    async def full(self, d: DaemonProc) -> float:
        """The bitmap and the full backup in one transaction: the bitmap starts at the backup's instant."""
        await self._add_target(d, self.full_target)
        backup = {"job-id": JOB_ID, "device": EXPORT, "target": "tgt", "sync": "full", **self._perf()}
        actions = [
            {
                "type": "block-dirty-bitmap-add",
                "data": {"node": EXPORT, "name": BITMAP, "granularity": GRANULARITY},
            },
            {"type": "blockdev-backup", "data": backup},
        ]
        seconds, length = await self._timed_job(d, "transaction", {"actions": actions})
        await self._del_target(d)
        if length != self.cfg.size:
            raise BenchError(f"{self.system}: full backup len {length}, expected {self.cfg.size}")
        # No guest I/O ran: the image still is the snapshot.
        if not await same_bytes(self.full_target, self.live):
            raise BenchError(f"{self.system}: WRONG FULL BACKUP, the target differs from its source")
        os.unlink(self.full_target)  # tmpfs is RAM: free it before the next target
        mbps = self.cfg.size / seconds / MB
        self.record("full s", seconds)
        self.record("full MB/s", mbps)
        self.report("full", f"{seconds:7.3f} s {mbps:8.0f} MB/s  target ok")
        return seconds

    async def dirty(self, d: DaemonProc) -> None:
        """Rewrite the plan's clusters through the NBD export; bm0 must then hold exactly them."""
        client = await NBDClient.connect(parse_uri(d.uri))
        try:
            slots = asyncio.Semaphore(WRITE_DEPTH)

            async def write(offset: int, data: bytes) -> None:
                async with slots:
                    await client.write(offset, data)

            await asyncio.gather(
                *(write(o, b) for o, b in zip(self.plan.offsets, self.plan.data(), strict=True))
            )
            await client.flush()
        finally:
            await client.close()
        d.check_alive()
        if await self._bitmap_sha256(d) != self.plan.bitmap_sha256(self.cfg.size):
            raise BenchError(f"{self.system}: bitmap {BITMAP} does not hold exactly the clusters written")

    async def incremental(self, d: DaemonProc) -> float:
        await self._add_target(d, self.incr_target)
        args = {
            "job-id": JOB_ID,
            "device": EXPORT,
            "target": "tgt",
            "sync": "incremental",
            "bitmap": BITMAP,
            **self._perf(),
        }
        seconds, length = await self._timed_job(d, "blockdev-backup", args)
        await self._del_target(d)
        if length != self.plan.dirty_bytes:
            raise BenchError(
                f"{self.system}: incremental len {length}, expected {self.plan.dirty_bytes} dirty bytes"
            )
        # On success the successor (no write since the job started) replaced the bitmap: it is empty.
        if await self._bitmap_sha256(d) != empty_sha256(self.cfg.size):
            raise BenchError(f"{self.system}: bitmap {BITMAP} is not empty after the incremental backup")
        self.record("incr s", seconds)
        self.record("incr MB/s", length / seconds / MB)
        self.record("incr len", length / MiB)
        self.record("dirty", self.plan.dirty_bytes / MiB)
        self.report("incremental", f"{seconds:7.3f} s {length / MiB:8.1f} MiB copied (len)")
        return seconds


async def run_rounds(cfg: Config, args: argparse.Namespace, plan: DirtyPlan) -> list[Sample]:
    systems = list(SYSTEMS) if args.only is None else [args.only]
    samples: list[Sample] = []
    # Warm-up rounds (numbered <= 0) run and check like the others but do not count.
    for rnd in range(1 - args.warmup, args.rounds + 1):
        # Alternate who goes first, so neither always profits from (or pays for) the other's leftovers.
        order = systems if rnd % 2 else systems[::-1]
        for system in order:
            turn = Turn(cfg, args, plan, system, rnd)
            await turn.run()
            if rnd > 0:
                samples += turn.samples
    return samples


# ---------------------------------------------------------------------- report


def summarize(samples: list[Sample], goal: float) -> dict[str, Any]:
    """Per metric: each system's median / min / max and, with both systems, ``cowbackup / qemu``;
    whether each system's median ``incr/full`` is at most ``goal``."""
    summary: dict[str, Any] = {}
    for metric in METRICS:
        mine = [s for s in samples if s.metric == metric.key]
        if not mine:
            continue
        entry: dict[str, Any] = {"unit": metric.unit, "higher_is_better": metric.higher_is_better}
        for system in SYSTEMS:
            values = [s.value for s in mine if s.system == system]
            if values:
                entry[system] = {
                    "runs": len(values),
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                }
        if all(system in entry for system in SYSTEMS):
            qemu = {s.round: s.value for s in mine if s.system == "qemu"}
            ours = {s.round: s.value for s in mine if s.system == "cowbackup"}
            entry["ratio_of_medians"] = entry["cowbackup"]["median"] / entry["qemu"]["median"]
            entry["median_paired_ratio"] = statistics.median(ours[r] / qemu[r] for r in ours if r in qemu)
        if metric.key == "incr/full":
            entry["goal"] = f"<= {goal:g}"
            entry["goal_met"] = {s: entry[s]["median"] <= goal for s in SYSTEMS if s in entry}
        summary[metric.key] = entry
    return summary


def _number(value: float) -> str:
    if value < 1:
        return f"{value:.4f}"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def print_table(summary: dict[str, Any], layout: Layout, plan: DirtyPlan, args: argparse.Namespace) -> None:
    chunk = f"x-perf.max-chunk {args.max_chunk / MiB:g} MiB" if args.max_chunk else "no x-perf"
    print(
        f"source: {args.size / MiB:.0f} MiB in {args.dir}: data {layout.data / MiB:.0f} + written zeros "
        f"{layout.zero / MiB:.0f} + holes {layout.hole / MiB:.0f} MiB; dirty {len(plan.offsets)} clusters "
        f"of {GRANULARITY // 1024} KiB = {plan.dirty_bytes / MiB:.1f} MiB ({100 * args.dirty:g}%); {chunk}; "
        f"medians of {args.rounds} round(s)"
    )
    # A full backup that skips zeros writes only the source's data: at equal write speed per byte, the
    # incremental cannot go below this share of it.
    print(
        f"dirty / source data = {100 * plan.dirty_bytes / layout.data:.2f}% "
        "(the incr/full floor when a full backup writes only data)"
    )
    header = (
        f"{'metric':<10} {'qemu':>9} {'min-max':>17} {'cowbackup':>9} {'min-max':>17} "
        f"{'ratio':>6} {'paired':>6}"
    )
    print(header)
    print("-" * len(header))
    for key, entry in summary.items():
        cells = []
        for system in SYSTEMS:
            s = entry.get(system)
            if s is None:
                cells += [f"{'-':>9}", f"{'':>17}"]
            else:
                spread = f"{_number(s['min'])}-{_number(s['max'])}"
                cells += [f"{_number(s['median']):>9}", f"{spread:>17}"]
        line = f"{key:<10} {' '.join(cells)}"
        if "ratio_of_medians" in entry:
            line += f" {entry['ratio_of_medians']:>6.2f} {entry['median_paired_ratio']:>6.2f}"
        print(line)
    goal = summary.get("incr/full")
    if goal:
        verdicts = ", ".join(
            f"{s} {100 * goal[s]['median']:.2f}% {'ok' if met else 'MISSED'}"
            for s, met in goal["goal_met"].items()
        )
        print(f"goal incr/full {goal['goal']} (twice the dirty share): {verdicts}")
    print(
        "s: command sent -> BLOCK_JOB_COMPLETED; full MB/s of the virtual size, incr MB/s of the bytes "
        "copied (len);\nratio = cowbackup / qemu of the medians; paired = median of the per-round ratios; "
        "MB = 10^6 B."
    )


# ---------------------------------------------------------------------- command line


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid share '{text}' (example: 0.01 for 1%)") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"--dirty must be in (0, 1], not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Incremental vs full backup time, 'cowbackup daemon' and qemu-storage-daemon."
    )
    p.add_argument("--size", type=_image_size, default=4 << 30, help="source size (default 4G)")
    p.add_argument("--dirty", type=_share, default=0.01, help="share of clusters rewritten (default 0.01)")
    p.add_argument("--rounds", type=positive_int, default=3, help="counted rounds (default 3)")
    p.add_argument("--dir", default="/dev/shm", help="where the images go (default /dev/shm)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted rounds first (default 1)")
    p.add_argument("--seed", type=int, default=1, help="seed of the source and of the writes (default 1)")
    p.add_argument(
        "--max-chunk", type=_size, default=0, help="x-perf.max-chunk of both backups (default 0: not sent)"
    )
    p.add_argument("--only", choices=SYSTEMS, help="run only one system")
    p.add_argument("--keep", action="store_true", help="keep the work directory (source image) at exit")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument(
        "--profile", metavar="FILE", help="run our daemon under cProfile into FILE (the last turn wins)"
    )
    p.add_argument("--qemu-storage-daemon", default="qemu-storage-daemon", help="daemon binary to use")
    return p


def missing_tools(args: argparse.Namespace) -> list[str]:
    """What is missing, with the Debian package that brings it."""
    needed = {"cmp": "diffutils"}
    if args.only != "cowbackup":
        needed[args.qemu_storage_daemon] = "qemu-system-common"
    return [f"{tool} (Debian: {pkg})" for tool, pkg in needed.items() if shutil.which(tool) is None]


async def _main_async(cfg: Config, args: argparse.Namespace, plan: DirtyPlan) -> list[Sample]:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run_rounds(cfg, args, plan)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_tools(args)
    if missing:
        _progress(f"incremental_vs_qsd: missing {'; '.join(missing)}")
        return 2
    # SIGTERM cleans up like Ctrl-C (inside the event loop, _main_async routes it to a task cancel).
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = tempfile.mkdtemp(prefix="cowbackup-incbench-", dir=args.dir)
    try:
        source = os.path.join(workdir, "source.raw")
        started = time.perf_counter()
        layout = make_source(source, args.size, args.seed)
        plan = make_plan(args.size, args.dirty, args.seed)
        _progress(
            f"source {source}: {args.size / MiB:.0f} MiB, data {layout.data / MiB:.0f} / zeros "
            f"{layout.zero / MiB:.0f} / holes {layout.hole / MiB:.0f} MiB; {len(plan.offsets)} dirty "
            f"clusters ({time.perf_counter() - started:.1f} s)"
        )
        profile = os.path.abspath(args.profile) if args.profile else None
        # daemon_vs_qsd's Config: its fio and cbw settings are unused here.
        cfg = Config(
            workdir,
            source,
            args.size,
            runtime=0,
            cbw_writes=0,
            speed=0,
            max_chunk=0,
            qemu_storage_daemon=args.qemu_storage_daemon,
            profile=profile,
        )
        samples = asyncio.run(_main_async(cfg, args, plan))
        signal.signal(signal.SIGTERM, _interrupt)  # the loop's removal reset it to the default
        summary = summarize(samples, GOAL_PER_DIRTY * args.dirty)
        if args.json:
            doc = {
                "config": vars(args),
                "layout": dataclasses.asdict(layout),
                "dirty_clusters": len(plan.offsets),
                "dirty_bytes": plan.dirty_bytes,
                "dirty_share_of_data": plan.dirty_bytes / layout.data,
                "samples": [dataclasses.asdict(s) for s in samples],
                "summary": summary,
            }
            print(json.dumps(doc, indent=2))
        else:
            print_table(summary, layout, plan, args)
        return 0
    except BenchError as err:
        _progress(f"incremental_vs_qsd: FAILED: {err}")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        _progress("incremental_vs_qsd: interrupted")
        return 130
    finally:
        if args.keep:
            _progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
