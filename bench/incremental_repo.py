"""Live incremental backups into the repository, from ``cowbackup daemon`` and ``qemu-storage-daemon``,
against restic; then instant restore.  Issue #13's benchmark.

Run: .venv/bin/python bench/incremental_repo.py [--size 4G] [--rounds 3] [--dir /dev/shm] [--json]

One source image is made once in ``--dir`` (daemon_vs_qsd.py's generator: 50% random data, 20% written
zeros, 30% holes, in MiB runs), and two write plans: 1% and 10% of the image's 64 KiB clusters, chosen at
random (``--seed``), each rewritten whole with random bytes -- the same offsets and bytes for every system.
Each round, in alternating order, every system gets a fresh extent-preserving copy of the source
(``live.raw``) and a fresh repository, then::

    qemu / cowbackup   a daemon started with the tests' options (file node ``disk``, discard=unmap, a
                       writable NBD export of it, two QMP monitors); then, each timed as a whole CLI run:
      full             cowbackup backup --qmp QMP disk --repo R --name vm --bitmap cb --json
                       [--nbd-socket NBD: qemu-storage-daemon is read in pull mode over its NBD server]
      incr 1%          the 1% plan written through the NBD export (our NBD client, 16 writes in flight,
                       flush), then the same command with --incremental; it must say method "bitmap" and
                       have read exactly the written chunks (data + zero bytes)
      incr 10%         the 10% plan (other clusters, other bytes), then --incremental again
    restic             the same writes straight into live.raw (pwrite), ``restic backup live.raw`` into a
                       local repository after each stage (it reads the whole file every time)

The repository's chunk size is ``--chunk-size`` (default 64K, the clusters the plans rewrite: with 4 MiB
chunks a random 1% of 64 KiB clusters touches about half the chunks, and no incremental could be
proportional to the change).  After the cowbackup turn, its last snapshot is restored::

    plain              cowbackup restore --repo R latest plain.raw; timed; must equal live.raw
    instant            cowbackup restore --repo R latest inst.raw --serve --socket S: time to the URI
                       (its first stdout line); then one 4 KiB read, over our NBD client, of a data cluster
                       in the image's last quarter (not restored yet: the background copy starts at the
                       front) -- its latency alone, and start -> read returned; it must hold live.raw's
                       bytes.  Then the time until "restore complete" on stderr; inst.raw must equal
                       live.raw.  restore speed ratio = plain time / instant background time.

Goals (issue #13): incr 1% <= 5% of restic's incremental time at 1%, from either daemon; incr 10% / incr
1% about 10x; the first read <= 50 ms; the background restore >= 0.9x a plain restore.  The table shows
medians (min-max).  A wrong backup or restore stops the benchmark with exit status 1.  Everything it made
-- files, sockets, processes -- is removed on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from cowbackup.cli.argtypes import positive_int
from cowbackup.nbd.client_conn import NBDClient
from cowbackup.nbd.uri import parse_uri
from daemon_vs_qsd import (
    BenchError,
    Layout,
    MiB,
    _image_size,
    _interrupt,
    _progress,
    _size,
    _tail,
    copy_extents,
    make_source,
)

SYSTEMS = ("qemu", "cowbackup", "restic")
DAEMONS = ("qemu", "cowbackup")
CLUSTER = 64 * 1024
SHARES = {"1%": 0.01, "10%": 0.10}
WRITE_DEPTH = 16
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
RUN_TIMEOUT = 1800.0
READ_SIZE = 4096
PASSWORD = "bench secret"
#: The issue's goals.
GOAL_VS_RESTIC = 0.05
GOAL_PROPORTIONAL = 10.0
GOAL_FIRST_READ_MS = 50.0
GOAL_RESTORE_SPEED = 0.9


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which clusters one stage rewrites, and the bytes it writes there."""

    name: str
    offsets: tuple[int, ...]
    data: tuple[bytes, ...]

    def chunks(self, chunk_size: int) -> set[int]:
        return {o // chunk_size for o in self.offsets}


def make_plans(size: int, seed: int) -> list[Plan]:
    """The 1% and 10% plans, on disjoint clusters (so the second stage's change is its own)."""
    rng = random.Random(seed)
    clusters = size // CLUSTER
    counts = [max(1, round(clusters * share)) for share in SHARES.values()]
    picked = rng.sample(range(clusters), min(clusters, sum(counts)))
    plans = []
    start = 0
    for name, count in zip(SHARES, counts, strict=True):
        offsets = tuple(c * CLUSTER for c in picked[start : start + count])
        start += count
        plans.append(Plan(name, offsets, tuple(rng.randbytes(CLUSTER) for _ in offsets)))
    return plans


@dataclasses.dataclass
class Sample:
    system: str
    round: int
    metric: str
    value: float


# ---------------------------------------------------------------------- processes


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cowbackup", *args]


def run(argv: Sequence[str], env: dict[str, str], what: str) -> tuple[float, str]:
    """Run ``argv`` to completion; (seconds, stdout).  BenchError if it fails."""
    started = time.perf_counter()
    proc = subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(f"{what} exited with {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
    return seconds, proc.stdout


def same_bytes(a: str, b: str) -> bool:
    rc = subprocess.run(["cmp", "-s", a, b], check=False).returncode
    if rc > 1:
        raise BenchError(f"cmp {a} {b} failed with {rc}")
    return rc == 0


class Daemon:
    """One daemon with the tests' options (tests/integration/test_live_backup.py's daemon_argv)."""

    def __init__(self, system: str, image: str, workdir: str, qsd: str) -> None:
        self.system = system
        self.nbd = os.path.join(workdir, "nbd.sock")
        self.qmp = os.path.join(workdir, "qmp0.sock")
        self.pidfile = os.path.join(workdir, "daemon.pid")
        self.log = os.path.join(workdir, f"{system}.log")
        self.uri = f"nbd+unix:///disk?socket={self.nbd}"
        options = [
            "--blockdev",
            f"driver=file,node-name=disk,filename={image},discard=unmap",
            "--nbd-server",
            f"addr.type=unix,addr.path={self.nbd}",
            "--export",
            "type=nbd,id=e,node-name=disk,name=disk,writable=on",
        ]
        for n in (0, 1):
            sock = os.path.join(workdir, f"qmp{n}.sock")
            options += [
                "--chardev",
                f"socket,id=m{n},path={sock},server=on,wait=off",
                "--monitor",
                f"chardev=m{n}",
            ]
        options += ["--pidfile", self.pidfile]
        self.argv = [qsd, *options] if system == "qemu" else cli("daemon", *options)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Daemon:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        # Ready once the pidfile names it (both write it after their options are set up).
        while not (os.path.exists(self.pidfile) and os.path.getsize(self.pidfile) > 0):
            if self.proc.poll() is not None:
                self.stop()
                raise BenchError(f"{self.system} exited: {_tail(self.log)}")
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"{self.system} not ready after {START_TIMEOUT} s: {_tail(self.log)}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _nbd_write(uri: str, plan: Plan) -> None:
    client = await NBDClient.connect(parse_uri(uri))
    try:
        slots = asyncio.Semaphore(WRITE_DEPTH)

        async def write(offset: int, data: bytes) -> None:
            async with slots:
                await client.write(offset, data)

        await asyncio.gather(*(write(o, d) for o, d in zip(plan.offsets, plan.data, strict=True)))
        await client.flush()
    finally:
        await client.close()


def file_write(path: str, plan: Plan) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for offset, data in zip(plan.offsets, plan.data, strict=True):
            os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- turns


class Turn:
    """One system's turn in one round: full backup, then the 1% and 10% stages with an incremental each."""

    def __init__(
        self, args: argparse.Namespace, source: str, plans: list[Plan], system: str, rnd: int
    ) -> None:
        self.args = args
        self.source = source
        self.plans = plans
        self.system = system
        self.rnd = rnd
        self.label = f"round {rnd}/{args.rounds}" if rnd > 0 else "warm-up"
        self.samples: list[Sample] = []
        self.dir = tempfile.mkdtemp(prefix=f"{system}-", dir=args.workdir)
        self.live = os.path.join(self.dir, "live.raw")
        self.repo = os.path.join(self.dir, "repo")
        self.env = dict(os.environ)
        self.env.update(
            COWBACKUP_PASSWORD=PASSWORD,
            COWBACKUP_CACHE_DIR=os.path.join(self.dir, "cache"),
            COWBACKUP_KEYS_DIR=os.path.join(self.dir, "keys"),
            RESTIC_PASSWORD=PASSWORD,
            RESTIC_CACHE_DIR=os.path.join(self.dir, "restic-cache"),
        )

    def record(self, metric: str, value: float) -> None:
        self.samples.append(Sample(self.system, self.rnd, metric, value))

    def report(self, step: str, text: str) -> None:
        _progress(f"{self.label:<11} {self.system:<9} {step:<10} {text}")

    def run(self) -> None:
        try:
            copy_extents(self.source, self.live)
            if self.system == "restic":
                self.restic()
            else:
                self.daemon()
                if self.system == "cowbackup":
                    self.restores()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def restic(self) -> None:
        run(["restic", "-r", self.repo, "init"], self.env, "restic init")
        backup = ["restic", "-r", self.repo, "backup", "--json", self.live]
        seconds, _ = run(backup, self.env, "restic backup")
        self.record("full s", seconds)
        self.report("full", f"{seconds:7.3f} s")
        for plan in self.plans:
            file_write(self.live, plan)
            seconds, out = run(backup, self.env, "restic backup")
            summary = json.loads(out.strip().splitlines()[-1])
            self.record(f"incr {plan.name} s", seconds)
            added = summary.get("data_added", 0) / MiB
            self.report(f"incr {plan.name}", f"{seconds:7.3f} s, {added:.1f} MiB added")

    def _backup(self, d: Daemon, *extra: str) -> tuple[float, dict[str, Any]]:
        argv = cli("backup", "--qmp", d.qmp, "disk", "--repo", self.repo, "--name", "vm", "--bitmap", "cb")
        argv += ["--json", *extra]
        if self.system == "qemu":
            argv += ["--nbd-socket", d.nbd]
        seconds, out = run(argv, self.env, f"{self.system}: cowbackup backup")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return seconds, result

    def daemon(self) -> None:
        chunk = self.args.chunk_size
        run(cli("repo", "init", self.repo, "--chunk-size", str(chunk)), self.env, "repo init")
        with Daemon(self.system, self.live, self.dir, self.args.qemu_storage_daemon) as d:
            seconds, result = self._backup(d)
            self.record("full s", seconds)
            self.record("full own s", float(result["seconds"]))
            self.report(
                "full", f"{seconds:7.3f} s ({result['changes']['method']}; own {result['seconds']:.3f} s)"
            )
            for plan in self.plans:
                asyncio.run(_nbd_write(d.uri, plan))
                parent = result
                seconds, result = self._backup(d, "--incremental")
                method = result["changes"]["method"]
                if method != "bitmap":
                    raise BenchError(
                        f"{self.system}: incremental {plan.name} was {method}: {result['changes']}"
                    )
                stats = result["stats"]
                read = stats["data_bytes"] + stats["zero_bytes"]
                # The parent bitmap's generation marker (its canary granules) reads as dirty too.
                canary = {o // chunk for o in parent["changes"]["tracking"]["canary"]["offsets"]}
                expected = len(plan.chunks(chunk) | canary) * chunk
                if read != expected:
                    raise BenchError(
                        f"{self.system}: incremental {plan.name} read {read} bytes, not {expected}"
                    )
                self.record(f"incr {plan.name} s", seconds)
                self.record(f"incr {plan.name} own s", float(result["seconds"]))
                self.report(
                    f"incr {plan.name}",
                    f"{seconds:7.3f} s, {read / MiB:.1f} MiB read (own {result['seconds']:.3f} s)",
                )

    def restores(self) -> None:
        """The last snapshot, restored plainly and instantly; both must equal live.raw."""
        plain = os.path.join(self.dir, "plain.raw")
        seconds, _ = run(cli("restore", "--repo", self.repo, "latest", plain), self.env, "restore")
        if not same_bytes(plain, self.live):
            raise BenchError("WRONG RESTORE: plain.raw differs from the disk")
        os.unlink(plain)  # tmpfs is RAM
        self.record("plain restore s", seconds)
        self.report("restore", f"{seconds:7.3f} s plain")
        inst = instant_restore(self, self.read_offset())
        self.record("uri ms", inst["uri"] * 1000)
        self.record("first read ms", inst["read"] * 1000)
        self.record("start->read ms", inst["start_to_read"] * 1000)
        self.record("instant restore s", inst["complete"])
        self.record("restore speed", seconds / inst["complete"])
        self.report(
            "instant",
            f"URI {inst['uri'] * 1000:.0f} ms, read {inst['read'] * 1000:.1f} ms "
            f"(start->read {inst['start_to_read'] * 1000:.0f} ms), complete {inst['complete']:.3f} s",
        )

    def read_offset(self) -> int:
        """A cluster of the last quarter that holds data (the 10% plan rewrote it)."""
        size = self.args.size
        late = [o for plan in self.plans for o in plan.offsets if o >= size * 3 // 4]
        return min(late) if late else max(self.plans[-1].offsets)


def instant_restore(turn: Turn, offset: int) -> dict[str, float]:
    target = os.path.join(turn.dir, "inst.raw")
    sock = os.path.join(turn.dir, "restore.sock")
    argv = cli("restore", "--repo", turn.repo, "latest", target, "--serve", "--socket", sock)
    complete = threading.Event()
    lines: list[str] = []
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=turn.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    done_at = [0.0]

    def watch() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "restore complete" in line and not complete.is_set():
                done_at[0] = time.perf_counter()
                complete.set()
        complete.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        uri_s = time.perf_counter() - started
        if not uri:
            raise BenchError(f"restore --serve printed no URI: {''.join(lines)[-2000:]}")
        read_s, data = asyncio.run(_timed_read(uri, offset))
        start_to_read = time.perf_counter() - started
        with open(turn.live, "rb") as f:
            if data != os.pread(f.fileno(), READ_SIZE, offset):
                raise BenchError(f"WRONG INSTANT RESTORE: the read at {offset} differs from the disk")
        if not complete.wait(RUN_TIMEOUT) or not done_at[0]:
            raise BenchError(f"restore --serve never said 'restore complete': {''.join(lines)[-2000:]}")
        complete_s = done_at[0] - started
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        watcher.join(STOP_TIMEOUT)
    if not same_bytes(target, turn.live):
        raise BenchError("WRONG INSTANT RESTORE: inst.raw differs from the disk")
    os.unlink(target)
    return {"uri": uri_s, "read": read_s, "start_to_read": start_to_read, "complete": complete_s}


async def _timed_read(uri: str, offset: int) -> tuple[float, bytes]:
    """Connect, then time one 4 KiB read alone."""
    client = await NBDClient.connect(parse_uri(uri))
    try:
        buf = bytearray(READ_SIZE)
        started = time.perf_counter()
        await client.read(offset, buf)
        return time.perf_counter() - started, bytes(buf)
    finally:
        await client.close()


# ---------------------------------------------------------------------- report


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Median / min / max of every (system, metric), and the goals."""
    table: dict[str, dict[str, Any]] = {}
    for s in samples:
        table.setdefault(s.metric, {}).setdefault(s.system, []).append(s.value)
    stats: dict[str, dict[str, Any]] = {
        metric: {
            system: {"runs": len(v), "median": statistics.median(v), "min": min(v), "max": max(v)}
            for system, v in by_system.items()
        }
        for metric, by_system in table.items()
    }

    def med(metric: str, system: str) -> float | None:
        entry = stats.get(metric, {}).get(system)
        return None if entry is None else float(entry["median"])

    goals: list[dict[str, Any]] = []

    def goal(name: str, value: float, want: str, met: bool) -> None:
        goals.append({"goal": name, "value": value, "want": want, "met": met})

    restic1 = med("incr 1% s", "restic")
    # The goals on the whole CLI run; "own" is the command's own "seconds" (its job, without Python's
    # start-up and the repository's opening), shown too: the fixed cost is what keeps 10%/1% below 10x.
    for system in DAEMONS:
        for own in ("", " own"):
            one, ten = med(f"incr 1%{own} s", system), med(f"incr 10%{own} s", system)
            if one is not None and restic1:
                ratio = one / restic1
                goal(
                    f"{system} incr 1%{own} / restic", ratio, f"<= {GOAL_VS_RESTIC}", ratio <= GOAL_VS_RESTIC
                )
            if one and ten is not None:
                ratio = ten / one
                # "About 10x": proportional, neither swamped by a fixed cost nor worse than linear.
                near = 0.7 * GOAL_PROPORTIONAL <= ratio <= 1.3 * GOAL_PROPORTIONAL
                goal(f"{system} incr 10% / 1%{own}", ratio, f"~ {GOAL_PROPORTIONAL:g}", near)
    # A line through the two points: time = fixed + per-share * share; the fixed part is what a
    # proportional cost would not have.
    fit: dict[str, dict[str, float]] = {}
    for system in DAEMONS:
        for own in ("", " own"):
            one, ten = med(f"incr 1%{own} s", system), med(f"incr 10%{own} s", system)
            if one is not None and ten is not None:
                per = (ten - one) / 9
                fit[f"{system}{own}"] = {"fixed s": one - per, "per 1% s": per}
    first = med("first read ms", "cowbackup")
    if first is not None:
        goal("instant first 4 KiB read ms", first, f"<= {GOAL_FIRST_READ_MS:g}", first <= GOAL_FIRST_READ_MS)
    speed = med("restore speed", "cowbackup")
    if speed is not None:
        goal(
            "background / plain restore speed", speed, f">= {GOAL_RESTORE_SPEED}", speed >= GOAL_RESTORE_SPEED
        )
    return {"metrics": stats, "goals": goals, "fit": fit}


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return f"{'-':>24}"
    return f"{entry['median']:>9.3f} ({entry['min']:.3f}-{entry['max']:.3f})".rjust(24)


def print_table(summary: dict[str, Any], layout: Layout, plans: list[Plan], args: argparse.Namespace) -> None:
    counts = ", ".join(f"{p.name} = {len(p.offsets)} clusters" for p in plans)
    print(
        f"disk: {args.size / MiB:.0f} MiB in {args.dir}: data {layout.data / MiB:.0f} + written zeros "
        f"{layout.zero / MiB:.0f} + holes {layout.hole / MiB:.0f} MiB; rewritten 64 KiB clusters: {counts}; "
        f"repository chunk {args.chunk_size // 1024} KiB; medians (min-max) of {args.rounds} round(s)"
    )
    header = f"{'metric':<18}" + "".join(f"{s:>24}" for s in SYSTEMS)
    print(header)
    print("-" * len(header))
    for metric, by_system in summary["metrics"].items():
        print(f"{metric:<18}" + "".join(_cell(by_system.get(s)) for s in SYSTEMS))
    print()
    for g in summary["goals"]:
        verdict = "ok" if g["met"] else "MISSED"
        print(f"goal {g['goal']:<34} {g['value']:>9.3f}  want {g['want']:<8} {verdict}")
    for key, line in summary["fit"].items():
        print(
            f"incremental {key:<14} = {line['fixed s']:.3f} s fixed + {line['per 1% s']:.3f} s per 1% dirty"
        )
    print(
        "s: wall time of the whole CLI run (process start to exit: Python start, repository open, QMP\n"
        "set-up and teardown included); own s: the command's own 'seconds'; restic: 'restic backup' of\n"
        "the image file.  uri ms: restore --serve start to its URI; first read ms: one 4 KiB read of a\n"
        "chunk not restored yet (after connecting); restore speed: plain restore time / time until the\n"
        "background copy said 'restore complete' (both from process start)."
    )


# ---------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Live incremental backups into the repository vs restic; instant restore."
    )
    p.add_argument("--size", type=_image_size, default=4 << 30, help="disk size (default 4G)")
    p.add_argument("--rounds", type=positive_int, default=3, help="counted rounds (default 3)")
    p.add_argument("--dir", default="/dev/shm", help="where images and repositories go (default /dev/shm)")
    p.add_argument("--warmup", type=int, default=0, help="uncounted rounds first (default 0)")
    p.add_argument("--seed", type=int, default=1, help="seed of the disk and of the writes (default 1)")
    p.add_argument("--chunk-size", type=_size, default=CLUSTER, help="repository chunk size (default 64K)")
    p.add_argument("--only", choices=SYSTEMS, action="append", help="run only this system (repeatable)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--qemu-storage-daemon", default="qemu-storage-daemon", help="daemon binary to use")
    return p


def missing_tools(systems: Sequence[str], qsd: str) -> list[str]:
    needed = {"cmp": "diffutils"}
    if "restic" in systems:
        needed["restic"] = "restic"
    if "qemu" in systems:
        needed[qsd] = "qemu-system-common"
    return [f"{tool} (Debian: {pkg})" for tool, pkg in needed.items() if shutil.which(tool) is None]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    systems = [s for s in SYSTEMS if args.only is None or s in args.only]
    missing = missing_tools(systems, args.qemu_storage_daemon)
    if missing:
        _progress(f"incremental_repo: missing {'; '.join(missing)}")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # clean up as on Ctrl-C
    args.workdir = tempfile.mkdtemp(prefix="cowbackup-increpo-", dir=args.dir)
    try:
        source = os.path.join(args.workdir, "source.raw")
        started = time.perf_counter()
        layout = make_source(source, args.size, args.seed)
        plans = make_plans(args.size, args.seed)
        _progress(
            f"source {source}: {args.size / MiB:.0f} MiB, data {layout.data / MiB:.0f} / zeros "
            f"{layout.zero / MiB:.0f} / holes {layout.hole / MiB:.0f} MiB "
            f"({time.perf_counter() - started:.1f} s)"
        )
        samples: list[Sample] = []
        for rnd in range(1 - args.warmup, args.rounds + 1):
            # Alternate the order, so no system always runs first (or last) in a round.
            for system in systems if rnd % 2 else systems[::-1]:
                turn = Turn(args, source, plans, system, rnd)
                turn.run()
                if rnd > 0:
                    samples += turn.samples
        summary = summarize(samples)
        if args.json:
            config = {k: v for k, v in vars(args).items() if k != "workdir"}
            doc = {
                "config": config,
                "layout": dataclasses.asdict(layout),
                "clusters": {p.name: len(p.offsets) for p in plans},
                "samples": [dataclasses.asdict(s) for s in samples],
                "summary": summary,
            }
            print(json.dumps(doc, indent=2))
        else:
            print_table(summary, layout, plans, args)
        return 0
    except BenchError as err:
        _progress(f"incremental_repo: FAILED: {err}")
        return 1
    except KeyboardInterrupt:
        _progress("incremental_repo: interrupted")
        return 130
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
