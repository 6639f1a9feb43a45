"""The guest's write latency while a live backup pushes into a repository, against a backup to a file.
Issue #13: "the guest's write latency during such a backup stays within the bounds of a backup to a file".

Run: .venv/bin/python bench/push_latency.py [--size 1G] [--rounds 5] [--runtime 5] [--dir /dev/shm]

One source image is made once in ``--dir`` (daemon_vs_qsd.py's generator: 50% random data, 20% written
zeros, 30% holes, in 64 KiB-1 MiB runs).  Each round, every scenario (in alternating order) gets a
fresh extent-preserving copy of it, served by ``cowbackup daemon`` with the usual stack (raw over file, a
writable NBD export), and fio's nbd engine writes 4 KiB at random offsets, QD1, for ``--runtime`` s::

    none        no backup: the daemon's own latency
    file        blockdev-backup sync=full into a sparse raw file (64 KiB clusters), --speed (slow: most
                guest writes find their cluster not copied yet, and copy it first)
    repo-64K    cowbackup backup --qmp ... --repo into a fresh repository with 64 KiB chunks (push mode:
                the job writes into a cowbackup-repo node; a chunk is the job's cluster), --speed
    repo-4M     the same with the default 4 MiB chunks: a first write to a chunk copies 4 MiB first

The backups are cancelled after fio (a repository backup by SIGINT: nothing is committed), unless the
guest's writes copied every cluster first (likely with 4 MiB chunks): the table says so.  Reported:
IOPS, p50 and p99 completion latency (fio's clat) per scenario, medians over the rounds, and the ratio of
each repository scenario to ``file`` (latency: lower is better; the goal is <= 1.0 at the same cluster
size).  A tool that fails stops the benchmark with exit status 1; everything made is removed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from cowbackup.cli.argtypes import positive_int
from daemon_vs_qsd import (
    EXPORT,
    JOB_TIMEOUT,
    BenchError,
    Config,
    DaemonProc,
    MiB,
    _image_size,
    _interrupt,
    _load_json,
    _progress,
    _size,
    copy_extents,
    create_sparse,
    make_source,
    run_tool,
)

SCENARIOS = ("none", "file", "repo-64K", "repo-4M")
JOB_ID = "bench-push"
PASSWORD = "bench push latency"


class Round:
    """One scenario of one round: a fresh image, a daemon, a backup (or none) and fio during it."""

    def __init__(self, args: argparse.Namespace, source: str, scenario: str) -> None:
        self.args = args
        self.source = source
        self.scenario = scenario
        self.work = args.workdir
        self.live = os.path.join(self.work, "live.raw")
        self.target = os.path.join(self.work, "target.raw")
        self.repo = os.path.join(self.work, "repo")
        self.cfg = Config(self.work, source, args.size, args.runtime, 0, args.speed, 0, "", None)
        self.env = dict(os.environ, COWBACKUP_PASSWORD=PASSWORD, COWBACKUP_CACHE_DIR=self.work + "/cache")

    async def run(self) -> dict[str, float]:
        copy_extents(self.source, self.live)
        try:
            async with DaemonProc(self.cfg, "cowbackup", self.live) as d:
                if self.scenario == "none":
                    return await self.fio(d)
                if self.scenario == "file":
                    return await self.during_file_backup(d)
                return await self.during_repo_backup(d, self.scenario.removeprefix("repo-"))
        finally:
            for path in (self.live, self.target):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            for tree in (self.repo, self.work + "/cache"):
                shutil.rmtree(tree, ignore_errors=True)

    async def during_file_backup(self, d: DaemonProc) -> dict[str, float]:
        create_sparse(self.target, self.args.size)
        node = {"driver": "file", "node-name": "tgt", "filename": self.target}
        await d.qmp.execute("blockdev-add", node)
        backup = {
            "job-id": JOB_ID,
            "device": EXPORT,
            "target": "tgt",
            "sync": "full",
            "speed": self.args.speed,
        }
        await d.qmp.execute("blockdev-backup", backup)
        result = await self.fio(d)
        # The guest's first writes may have copied every cluster (the job is done then): that is part
        # of the result, reported as "finished".
        result["finished"] = float(JOB_ID not in await d.jobs())
        if not result["finished"]:
            await d.qmp.execute("job-cancel", {"id": JOB_ID})
        deadline = time.monotonic() + JOB_TIMEOUT
        while JOB_ID in await d.jobs():
            if time.monotonic() > deadline:
                raise BenchError("the cancelled file backup did not go away")
            await asyncio.sleep(0.01)
        await d.qmp.execute("blockdev-del", {"node-name": "tgt"})
        return result

    async def during_repo_backup(self, d: DaemonProc, chunk: str) -> dict[str, float]:
        init = [sys.executable, "-m", "cowbackup", "repo", "init", self.repo, "--chunk-size", chunk]
        await asyncio.to_thread(subprocess.run, init, env=self.env, check=True, capture_output=True)
        argv = [sys.executable, "-m", "cowbackup", "backup", "--qmp", d.qmp_sock, EXPORT, "--repo", self.repo]
        argv += ["--name", "vm", "--speed", str(self.args.speed), "--json"]
        proc = await asyncio.create_subprocess_exec(
            *argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            while True:  # the job exists from the "start" line on
                line = await asyncio.wait_for(proc.stdout.readline(), JOB_TIMEOUT)
                if not line:
                    raise BenchError(f"the repository backup ended before it started: {await _stderr(proc)}")
                if b'"type": "start"' in line:
                    break
            result = await self.fio(d)
            result["finished"] = float(proc.returncode is not None)
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)  # cancels the job: nothing is committed
            _, err = await asyncio.wait_for(proc.communicate(), JOB_TIMEOUT)
            if proc.returncode not in (0, 130):
                raise BenchError(f"the repository backup failed ({proc.returncode}): {err.decode()[-2000:]}")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return result

    async def fio(self, d: DaemonProc) -> dict[str, float]:
        out = os.path.join(self.work, "fio.json")
        argv = [
            "fio",
            "--name=guest",
            "--ioengine=nbd",
            f"--uri={d.uri}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=1",
            "--time_based",
            f"--runtime={self.args.runtime}",
            "--norandommap",
            "--output-format=json",
            f"--output={out}",
        ]
        try:
            await run_tool(argv, self.args.runtime + 60)
            doc = _load_json(out)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out)
        d.check_alive()
        write = doc["jobs"][0]["write"]
        if not write.get("total_ios"):
            raise BenchError(f"{self.scenario}: fio did no I/O")
        pct = write["clat_ns"]["percentile"]
        return {
            "IOPS": float(write["iops"]),
            "p50 us": float(pct["50.000000"]) / 1000,
            "p99 us": float(pct["99.000000"]) / 1000,
            "p99.9 us": float(pct["99.900000"]) / 1000,
        }


async def _stderr(proc: asyncio.subprocess.Process) -> str:
    assert proc.stderr is not None
    return (await proc.stderr.read()).decode(errors="replace")[-2000:]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=_image_size, default=1024 * MiB, help="disk size (default 1G)")
    p.add_argument("--rounds", type=positive_int, default=5, help="counted rounds (default 5)")
    p.add_argument("--runtime", type=positive_int, default=5, help="fio seconds per scenario (default 5)")
    p.add_argument("--speed", type=_size, default=MiB, help="backup speed limit, bytes/s (default 1M)")
    p.add_argument("--dir", default="/dev/shm", help="where images and repositories go (default /dev/shm)")
    p.add_argument("--seed", type=int, default=1, help="seed of the source image (default 1)")
    p.add_argument("--only", choices=SCENARIOS, action="append", help="run only this scenario (repeatable)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    return p


def print_table(summary: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    metrics = ("IOPS", "p50 us", "p99 us", "p99.9 us")
    print(f"\n4 KiB random writes, QD1, {args.runtime} s, during a backup at {args.speed / MiB:g} MiB/s "
          f"({args.size / MiB:.0f} MiB disk, medians of {args.rounds})")  # fmt: skip
    print(
        f"{'scenario':<10}"
        + "".join(f"{m:>12}" for m in metrics)
        + "".join(f"{m + ' /file':>16}" for m in metrics)
    )
    for scenario, row in summary.items():
        line = f"{scenario:<10}" + "".join(f"{row[m]:12.1f}" for m in metrics)
        base = summary.get("file")
        if base is not None and scenario.startswith("repo"):
            line += "".join(f"{row[m] / base[m]:16.2f}" for m in metrics)
        if row.get("finished"):
            line += "   (the backup finished during fio: every cluster copied)"
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scenarios = [s for s in SCENARIOS if args.only is None or s in args.only]
    signal.signal(signal.SIGTERM, _interrupt)
    args.workdir = tempfile.mkdtemp(prefix="cowbackup-pushlat-", dir=args.dir)
    try:
        source = os.path.join(args.workdir, "source.raw")
        make_source(source, args.size, args.seed, 64 * 1024, MiB)
        results: dict[str, list[dict[str, float]]] = {s: [] for s in scenarios}
        for rnd in range(1, args.rounds + 1):
            for scenario in scenarios if rnd % 2 else scenarios[::-1]:
                row = asyncio.run(Round(args, source, scenario).run())
                numbers = "  ".join(f"{m} {v:9.1f}" for m, v in row.items())
                _progress(f"round {rnd}/{args.rounds} {scenario:<9} {numbers}")
                results[scenario].append(row)
        summary = {
            s: {m: statistics.median(r[m] for r in rows) for m in rows[0]} for s, rows in results.items()
        }
        if args.json:
            print(json.dumps({"config": {k: v for k, v in vars(args).items() if k != "workdir"},
                              "results": results, "summary": summary}, indent=2))  # fmt: skip
        else:
            print_table(summary, args)
        return 0
    except BenchError as err:
        _progress(f"push_latency: {err}")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
