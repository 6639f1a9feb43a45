"""``cowbackup daemon`` against ``qemu-storage-daemon``: full backup, and copy-before-write under guest load.

Run: .venv/bin/python bench/daemon_vs_qsd.py [--size 1G] [--rounds 3] [--dir /dev/shm] [--json]

One source image is made once in ``--dir`` (backup_vs_qemu.py's mix in MiB runs: 50% random data, 20%
written zeros, 30% holes).  Each turn, one system gets a fresh extent-preserving copy of it (``live.raw``)
and one daemon process started with the same options for both::

    --blockdev {"driver": "file", "node-name": "src-file", "filename": LIVE}
    --blockdev {"driver": "raw", "node-name": "src", "file": "src-file"}
    --nbd-server addr.type=unix,addr.path=NBD.sock
    --export type=nbd,id=exp0,node-name=src,name=src,writable=on
    --chardev socket,id=mon0,path=QMP.sock,server=on,wait=off --monitor chardev=mon0

    qemu       qemu-storage-daemon OPTIONS
    cowbackup  python -m cowbackup daemon OPTIONS

Both are driven with the ``qemu.qmp`` client.  Every backup gets a fresh sparse target, added over QMP as
``{"driver": "file", "discard": "unmap", "detect-zeroes": "unmap"}`` and deleted after the job::

    full-backup   blockdev-backup sync=full, no guest I/O; MB/s of the virtual size, command sent ->
                  BLOCK_JOB_COMPLETED received; then the target must equal live.raw (cmp)
    base-qdN      fio --ioengine=nbd 4 KiB random writes to the export for --runtime s, no job: IOPS, p99
    read-qdN      the same with random reads
    sync-qd1      the same random writes at queue depth 1, each followed by a flush (fio --fsync=1: what
                  a guest's O_DIRECT write + fsync sends), no job
    cbw-qdN       fio's same random writes while a slow backup runs (speed --speed, x-perf.max-chunk
                  --max-chunk), but a fixed number of them, --cbw-writes (default: one per two 64 KiB
                  clusters), the same offsets for both systems: most land on a cluster not yet copied
                  and wait for its copy-before-write (~79% with the default), whichever system is faster.
                  (A time-based run would let the faster system touch every cluster early and then write
                  without copies.)  Then job-cancel, or the job finished if every cluster was copied
    steady-qdN    that time-based run, on purpose: the steady state of a long backup (most writes land
                  on clusters already copied); checked as cbw-qdN
    seq-write     nbdcopy --connections=1 --flush SOURCE EXPORT, MB/s; then the image must equal SOURCE
    seq-read      nbdcopy --connections=1 EXPORT null:, MB/s

The image's runs are 64 KiB-1 MiB (--min-run, --max-run); --tests picks a subset.

After each cbw run, every 64 KiB cluster of the target must hold either the snapshot's data or zeros (not
yet copied), and every cluster the guest changed must hold the snapshot's data: a difference stops the
benchmark with exit status 1.  Rounds alternate which system goes first, after ``--warmup`` uncounted ones.

Everything it made -- files, sockets, processes -- is removed on exit, Ctrl-C included.
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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.protocol import ConnectError

from cowbackup.block.options import parse_size
from cowbackup.cli.argtypes import positive_int

# The test suite's certificate maker (a CA, server and client certificates, as tls-creds-x509 reads them).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from integration.nbd_peers import make_tls_creds

KiB = 1024
MiB = 1024 * KiB
MB = 1000 * 1000

SYSTEMS = ("qemu", "cowbackup")
#: Shares of the source image, in MiB units, as in backup_vs_qemu.py: random data, written zeros, holes.
MIX = {"data": 0.5, "zero": 0.2, "hole": 0.3}
#: Default shortest and longest run of one kind (data, zeros, hole): a fragmented disk, as guests make.
MIN_RUN = 64 * 1024
MAX_RUN = 1024 * 1024
#: The backup cluster both systems use for a file target without a cluster size (QEMU's default).
CLUSTER = 64 * KiB
#: fio's random writes: block size and queue depths.  No ramp time: the first writes are the ones that
#: find most clusters not yet copied.
FIO_BLOCK = "4k"
FIO_DEPTHS = (1, 16)
#: How long a daemon may take to open its monitor, to quit, and a full backup to finish.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
JOB_TIMEOUT = 900.0
JOB_ID = "bench0"
EXPORT = "src"

#: fio tests: base = random writes, read = random reads, no job; cbw = a fixed number of random writes
#: during a slow backup (first touch), steady = random writes for --runtime s during one (steady state);
#: sync = random writes each followed by a flush (a guest's O_DIRECT write + fsync), no job.
FIO_KINDS = ("base", "read", "cbw", "steady")
FIO_TESTS = (*(f"{kind}-qd{qd}" for kind in FIO_KINDS for qd in FIO_DEPTHS), "sync-qd1")
#: nbdcopy tests: the source image into the export, the export to null:.
SEQ_TESTS = ("seq-write", "seq-read")
TESTS = ("full-backup", *FIO_TESTS, *SEQ_TESTS)
TRANSPORTS = ("unix", "tcp", "tls")


class BenchError(Exception):
    """The benchmark cannot go on: a tool, daemon or job failed, or a backup holds wrong data."""


@dataclasses.dataclass(frozen=True)
class Metric:
    """One number a test reports; ``goal`` is the ``cowbackup / qemu`` ratio asked for."""

    test: str
    unit: str
    higher_is_better: bool

    @property
    def key(self) -> str:
        return f"{self.test} {self.unit}"

    @property
    def goal(self) -> str:
        return ">= 1.0" if self.higher_is_better else "<= 1.0"

    def met(self, ratio: float) -> bool:
        return ratio >= 1.0 if self.higher_is_better else ratio <= 1.0


METRICS = (
    [Metric("full-backup", "MB/s", True)]
    + [m for t in FIO_TESTS for m in (Metric(t, "IOPS", True), Metric(t, "p99 us", False))]
    + [Metric(t, "MB/s", True) for t in SEQ_TESTS]
)


@dataclasses.dataclass
class Sample:
    """One measurement: ``metric`` is a :attr:`Metric.key`."""

    system: str
    round: int
    metric: str
    value: float


@dataclasses.dataclass
class Layout:
    """What the source image holds, in bytes."""

    size: int
    data: int = 0
    zero: int = 0
    hole: int = 0


@dataclasses.dataclass
class Config:
    """What every turn needs; from the command line."""

    workdir: str
    source: str
    size: int
    runtime: int
    cbw_writes: int
    speed: int
    max_chunk: int
    qemu_storage_daemon: str
    profile: str | None
    tests: tuple[str, ...] = TESTS
    transport: str = "unix"
    tls_dir: str | None = None


# ---------------------------------------------------------------------- images


def make_source(path: str, size: int, seed: int, min_run: int = MiB, max_run: int = 8 * MiB) -> Layout:
    """Runs of random data, written zeros (allocated) and holes in the ``MIX`` shares, exact in units of
    ``min_run``; each run is ``min_run``..``max_run`` long (a multiple of ``min_run``).  The defaults
    are the MiB runs of the other benchmarks; this one's command line asks for 64 KiB-1 MiB."""
    rng = random.Random(seed)
    unit = min_run
    units = size // unit
    left = {kind: round(units * share) for kind, share in MIX.items() if kind != "hole"}
    left["hole"] = units - sum(left.values())
    layout = Layout(size)
    zeros = bytes(unit)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        offset = 0
        while offset < size:
            kinds = [kind for kind, n in left.items() if n > 0]
            kind = rng.choices(kinds, weights=[left[k] for k in kinds])[0]
            n = min(rng.randint(1, max(1, max_run // unit)), left[kind])
            left[kind] -= n
            for _ in range(n):
                if kind != "hole":
                    os.pwrite(fd, rng.randbytes(unit) if kind == "data" else zeros, offset)
                offset += unit
            setattr(layout, kind, getattr(layout, kind) + n * unit)
    finally:
        os.close(fd)
    return layout


def copy_extents(source: str, dest: str) -> None:
    """Copy ``source`` keeping its holes and its allocated zeros (``shutil.copyfile`` fills the holes)."""
    size = os.stat(source).st_size
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(dst, size)
            offset = 0
            while offset < size:
                try:
                    start = os.lseek(src, offset, os.SEEK_DATA)
                except OSError:  # ENXIO: only a hole is left
                    break
                end = os.lseek(src, start, os.SEEK_HOLE)
                while start < end:
                    n = os.copy_file_range(src, dst, end - start, start, start)
                    if n <= 0:
                        raise BenchError(f"copy_file_range {source} -> {dest} stopped at {start}")
                    start += n
                offset = end
        finally:
            os.close(dst)
    finally:
        os.close(src)


def create_sparse(path: str, size: int) -> None:
    """A fresh target: one hole of ``size`` bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def check_cbw_target(snapshot: str, live: str, target: str) -> tuple[int, int]:
    """Check a cancelled backup's target against the snapshot and the image the guest wrote to.

    Every cluster of the target must be the snapshot's or zeros (not yet copied); every cluster the guest
    changed must be the snapshot's.  Returns (clusters the guest changed, clusters holding copied data).
    """
    zero = bytes(CLUSTER)
    changed = copied = 0
    with open(snapshot, "rb") as fs, open(live, "rb") as fl, open(target, "rb") as ft:
        offset = 0
        while True:
            s, lv, t = fs.read(MiB), fl.read(MiB), ft.read(MiB)
            if not s:
                break
            if s == lv and t == s:
                copied += len(s) // CLUSTER
                offset += len(s)
                continue
            for i in range(0, len(s), CLUSTER):
                sc, lc, tc = s[i : i + CLUSTER], lv[i : i + CLUSTER], t[i : i + CLUSTER]
                if sc != lc:
                    changed += 1
                    if tc != sc:
                        raise BenchError(
                            f"WRONG CBW: guest wrote cluster at {offset + i} before its old data was copied"
                        )
                elif tc != sc and tc != zero:
                    raise BenchError(f"WRONG CBW: target cluster at {offset + i} is neither snapshot nor 0")
                if tc == sc:
                    copied += 1
            offset += len(s)
    return changed, copied


# ---------------------------------------------------------------------- tools


def _progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _tail(path: str, lines: int = 10) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).strip()
    except OSError:
        return ""


async def run_tool(argv: Sequence[str], limit: float) -> bytes:
    """Run a client to completion in its own session (Ctrl-C kills it); stdout.  BenchError if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        raise BenchError(f"{argv[0]} took longer than {limit:.0f} s: {' '.join(argv)}") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        detail = (err or out).decode(errors="replace").strip()[-2000:]
        raise BenchError(f"{' '.join(argv)} exited with {proc.returncode}: {detail}")
    return out


async def same_bytes(a: str, b: str) -> bool:
    proc = await asyncio.create_subprocess_exec("cmp", "-s", a, b, start_new_session=True)
    try:
        rc = await asyncio.wait_for(proc.wait(), JOB_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if rc > 1:
        raise BenchError(f"cmp {a} {b} failed with {rc}")
    return rc == 0


def _load_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def free_port() -> int:
    """A TCP port of 127.0.0.1 nobody listens on now (the daemon binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def daemon_options(image: str, nbd_server: str, qmp_sock: str, tls_dir: str | None) -> list[str]:
    """The command line both daemons get (JSON for the nodes, so no file name needs comma escaping)."""
    nodes: list[dict[str, Any]] = [
        {"driver": "file", "node-name": "src-file", "filename": image},
        {"driver": "raw", "node-name": EXPORT, "file": "src-file"},
    ]
    argv: list[str] = []
    if tls_dir is not None:
        argv += ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={tls_dir},verify-peer=off"]
    for node in nodes:
        argv += ["--blockdev", json.dumps(node)]
    argv += ["--nbd-server", nbd_server]
    argv += ["--export", f"type=nbd,id=exp0,node-name={EXPORT},name={EXPORT},writable=on"]
    argv += ["--chardev", f"socket,id=mon0,path={qmp_sock},server=on,wait=off", "--monitor", "chardev=mon0"]
    return argv


class DaemonProc:
    """One daemon process of one system, connected over QMP; ``async with`` always stops it.

    ::

        async with DaemonProc(cfg, "cowbackup", image) as d:   # started, QMP connected
            await d.qmp.execute("query-jobs")
                                                               # quit, SIGKILL after STOP_TIMEOUT
    """

    def __init__(self, cfg: Config, system: str, image: str) -> None:
        self.system = system
        self.nbd_sock = os.path.join(cfg.workdir, f"{system}-nbd.sock")
        self.qmp_sock = os.path.join(cfg.workdir, f"{system}-qmp.sock")
        self.log = os.path.join(cfg.workdir, f"{system}.log")
        if cfg.transport == "unix":
            self.uri = f"nbd+unix:///{EXPORT}?socket={self.nbd_sock}"
            server = f"addr.type=unix,addr.path={self.nbd_sock}"
        else:
            port = free_port()
            server = f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}"
            if cfg.tls_dir is None:
                self.uri = f"nbd://127.0.0.1:{port}/{EXPORT}"
            else:
                server += ",tls-creds=tls0"
                self.uri = f"nbds://localhost:{port}/{EXPORT}?tls-certificates={cfg.tls_dir}"
        options = daemon_options(image, server, self.qmp_sock, cfg.tls_dir)
        if system == "qemu":
            self.argv = [cfg.qemu_storage_daemon, *options]
        else:
            prof = ["-m", "cProfile", "-o", cfg.profile] if cfg.profile else []
            self.argv = [sys.executable, *prof, "-m", "cowbackup", "daemon", *options]
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp = QMPClient(f"bench-{system}")

    async def __aenter__(self) -> DaemonProc:
        logfd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logfd,
                stderr=logfd,
                start_new_session=True,  # our __aexit__ stops it, not the terminal's Ctrl-C
            )
        finally:
            os.close(logfd)
        try:
            await self._connect()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _connect(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.returncode is not None:
                raise BenchError(f"{self.system} exited with {self.proc.returncode}: {_tail(self.log)}")
            try:
                await self.qmp.connect(self.qmp_sock)
                return
            except ConnectError as err:
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{self.system}: no QMP at {self.qmp_sock} after {START_TIMEOUT} s"
                    ) from err
            await asyncio.sleep(0.01)

    async def jobs(self) -> dict[str, str]:
        """``query-jobs``: each job's status by id."""
        reply = await self.qmp.execute("query-jobs")
        assert isinstance(reply, list)
        return {str(j["id"]): str(j["status"]) for j in reply}

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise BenchError(f"{self.system} died with {self.proc.returncode}: {_tail(self.log)}")

    async def stop(self) -> None:
        """QMP quit (so a profiled daemon writes its profile), then SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.returncode is None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.qmp.execute("quit"), STOP_TIMEOUT)
                try:
                    await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
                except TimeoutError:
                    _progress(f"{self.system} did not quit within {STOP_TIMEOUT} s, killing it")
        finally:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            for path in (self.nbd_sock, self.qmp_sock):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


# ---------------------------------------------------------------------- tests


class Turn:
    """One system's turn in one round: one daemon, every test, the samples they give."""

    def __init__(self, cfg: Config, system: str, rnd: int, label: str) -> None:
        self.cfg = cfg
        self.system = system
        self.rnd = rnd
        self.label = label
        self.samples: list[Sample] = []
        self.live = os.path.join(cfg.workdir, "live.raw")
        self.target = os.path.join(cfg.workdir, "target.raw")
        self.snapshot = os.path.join(cfg.workdir, "snapshot.raw")

    def record(self, test: str, unit: str, value: float) -> None:
        self.samples.append(Sample(self.system, self.rnd, f"{test} {unit}", value))

    def report(self, test: str, text: str) -> None:
        _progress(f"{self.label:<11} {self.system:<9} {test:<11} {text}")

    async def run(self) -> None:
        copy_extents(self.cfg.source, self.live)
        try:
            async with DaemonProc(self.cfg, self.system, self.live) as d:
                wanted = self.cfg.tests
                if "full-backup" in wanted:
                    await self.full_backup(d)
                for kind in FIO_KINDS:
                    for qd in FIO_DEPTHS:
                        test = f"{kind}-qd{qd}"
                        if test not in wanted:
                            continue
                        if kind in ("base", "read"):
                            await self.fio(d, test)
                        else:
                            await self.cbw(d, qd, steady=kind == "steady")
                if "sync-qd1" in wanted:
                    await self.fio(d, "sync-qd1")
                for test in SEQ_TESTS:
                    if test in wanted:
                        await self.nbdcopy(d, test)
        finally:
            for path in (self.live, self.target, self.snapshot):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    async def add_target(self, d: DaemonProc) -> None:
        create_sparse(self.target, self.cfg.size)
        node = {
            "driver": "file",
            "node-name": "tgt",
            "filename": self.target,
            "discard": "unmap",
            "detect-zeroes": "unmap",
        }
        await d.qmp.execute("blockdev-add", node)

    async def del_target(self, d: DaemonProc) -> None:
        """Wait until the concluded job is gone (auto-dismiss), then close the target node."""
        deadline = time.monotonic() + STOP_TIMEOUT
        while JOB_ID in await d.jobs():
            if time.monotonic() > deadline:
                raise BenchError(f"{self.system}: job {JOB_ID} still listed {STOP_TIMEOUT} s after it ended")
            await asyncio.sleep(0.01)
        await d.qmp.execute("blockdev-del", {"node-name": "tgt"})

    def backup_args(self, slow: bool) -> dict[str, Any]:
        args: dict[str, Any] = {"job-id": JOB_ID, "device": EXPORT, "target": "tgt", "sync": "full"}
        if slow:
            args["speed"] = self.cfg.speed
        if self.cfg.max_chunk:
            args["x-perf"] = {"max-chunk": self.cfg.max_chunk}
        return args

    async def full_backup(self, d: DaemonProc) -> None:
        await self.add_target(d)
        with d.qmp.listener(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")) as listener:
            started = time.perf_counter()
            await d.qmp.execute("blockdev-backup", self.backup_args(slow=False))
            while True:
                event = await asyncio.wait_for(listener.get(), JOB_TIMEOUT)
                data = event["data"]
                if isinstance(data, dict) and data.get("device") == JOB_ID:
                    break
            seconds = time.perf_counter() - started
        if event["event"] != "BLOCK_JOB_COMPLETED" or data.get("error"):
            raise BenchError(f"{self.system}: backup failed: {event['event']} {data.get('error', '')}")
        await self.del_target(d)
        # No guest I/O ran: the image still is the snapshot.
        if not await same_bytes(self.target, self.live):
            raise BenchError(f"{self.system}: WRONG BACKUP, the target differs from its source")
        mbps = self.cfg.size / seconds / MB
        self.record("full-backup", "MB/s", mbps)
        self.report("full-backup", f"{seconds:7.3f} s {mbps:8.0f} MB/s  target ok")

    async def fio(self, d: DaemonProc, test: str, writes: int = 0) -> int:
        """One fio job, ``writes`` writes or else time-based; records IOPS and p99, returns the requests.

        ``read-*`` tests read, the others write."""
        depth = test.rpartition("-qd")[2]
        rw = "randread" if test.startswith("read-") else "randwrite"
        amount = [f"--number_ios={writes}"] if writes else ["--time_based", f"--runtime={self.cfg.runtime}"]
        if test.startswith("sync-"):
            amount.append("--fsync=1")
        out = os.path.join(self.cfg.workdir, "fio.json")
        argv = [
            "fio",
            f"--name={test}",
            "--ioengine=nbd",
            f"--uri={d.uri}",
            f"--rw={rw}",
            f"--bs={FIO_BLOCK}",
            f"--iodepth={depth}",
            *amount,
            "--norandommap",  # writes may repeat an offset; the generator's seed is fio's default
            "--output-format=json",
            f"--output={out}",  # not stdout: the nbd engine prints a line there before the JSON
        ]
        try:
            await run_tool(argv, self.cfg.runtime + 60 if not writes else JOB_TIMEOUT)
            doc = _load_json(out)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out)
        d.check_alive()
        job = doc["jobs"][0]
        if job.get("error"):
            raise BenchError(f"{self.system}: fio {test} failed with error {job['error']}")
        side = job["read" if rw == "randread" else "write"]
        if not side.get("total_ios"):
            raise BenchError(f"{self.system}: fio {test} did no I/O")
        iops = float(side["iops"])
        p99 = float(side["clat_ns"]["percentile"]["99.000000"]) / 1000
        self.record(test, "IOPS", iops)
        self.record(test, "p99 us", p99)
        self.report(test, f"{iops:9.0f} IOPS  p99 {p99:8.1f} us")
        return int(side["total_ios"])

    async def nbdcopy(self, d: DaemonProc, test: str) -> None:
        """seq-write: nbdcopy the source image into the export (then the image must equal it);
        seq-read: nbdcopy the export to null:.  One connection for both systems."""
        if test == "seq-write":
            argv = ["nbdcopy", "--connections=1", "--flush", self.cfg.source, d.uri]
        else:
            argv = ["nbdcopy", "--connections=1", d.uri, "null:"]
        started = time.perf_counter()
        await run_tool(argv, JOB_TIMEOUT)
        seconds = time.perf_counter() - started
        d.check_alive()
        if test == "seq-write" and not await same_bytes(self.cfg.source, self.live):
            raise BenchError(f"{self.system}: WRONG WRITE, the image differs from what nbdcopy sent")
        mbps = self.cfg.size / seconds / MB
        self.record(test, "MB/s", mbps)
        self.report(test, f"{seconds:7.3f} s {mbps:8.0f} MB/s")

    async def cbw(self, d: DaemonProc, qd: int, *, steady: bool = False) -> None:
        """Random writes during a slow backup: a fixed number (first touch), or for --runtime s
        (``steady``: after the first seconds most land on clusters already copied)."""
        test = f"{'steady' if steady else 'cbw'}-qd{qd}"
        copy_extents(self.live, self.snapshot)  # no I/O in flight: this is the backup's snapshot
        await self.add_target(d)
        with d.qmp.listener(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")) as listener:
            await d.qmp.execute("blockdev-backup", self.backup_args(slow=True))
            writes = await self.fio(d, test, 0 if steady else self.cfg.cbw_writes)
            status = (await d.jobs()).get(JOB_ID)
            # A fast copy-before-write may have copied every cluster (the job is then done); that is
            # part of the result, not an error, but it is reported.
            finished = status in (None, "waiting", "pending", "concluded")
            if not finished:
                await d.qmp.execute("job-cancel", {"id": JOB_ID})
            while True:
                event = await asyncio.wait_for(listener.get(), JOB_TIMEOUT)
                data = event["data"]
                if isinstance(data, dict) and data.get("device") == JOB_ID:
                    break
        expected = "BLOCK_JOB_COMPLETED" if finished else "BLOCK_JOB_CANCELLED"
        if event["event"] != expected or data.get("error"):
            raise BenchError(
                f"{self.system}: slow backup ended with {event['event']} {data.get('error', '')}"
            )
        await self.del_target(d)
        changed, copied = check_cbw_target(self.snapshot, self.live, self.target)
        os.unlink(self.snapshot)
        # Clusters the guest changed: the writes that found a cluster not yet copied (unless the
        # background copy got there first, at most speed * runtime of them).
        share = 100 * changed / writes
        self.record(test, "first-touch %", share)
        done = "job FINISHED during fio (every cluster copied)" if finished else "job cancelled"
        _progress(
            f"{'':<11} {self.system:<9} {test:<11} target ok; {changed} clusters changed by {writes} writes "
            f"({share:.0f}%); {copied} target clusters hold snapshot data; {done}"
        )


async def run_rounds(cfg: Config, args: argparse.Namespace) -> list[Sample]:
    systems = list(SYSTEMS) if args.only is None else [args.only]
    samples: list[Sample] = []
    # Warm-up rounds (numbered <= 0) run and check like the others but do not count.
    for rnd in range(1 - args.warmup, args.rounds + 1):
        # Alternate who goes first, so neither always profits from (or pays for) the other's leftovers.
        order = systems if rnd % 2 else systems[::-1]
        label = f"round {rnd}/{args.rounds}" if rnd > 0 else "warm-up"
        for system in order:
            turn = Turn(cfg, system, rnd, label)
            await turn.run()
            if rnd > 0:
                samples += turn.samples
    return samples


# ---------------------------------------------------------------------- report


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Per metric: each system's median / min / max, then ``cowbackup / qemu`` and the goal."""
    summary: dict[str, Any] = {}
    for metric in METRICS:
        mine = [s for s in samples if s.metric == metric.key]
        if not mine:
            continue
        entry: dict[str, Any] = {
            "test": metric.test,
            "unit": metric.unit,
            "higher_is_better": metric.higher_is_better,
            "goal": metric.goal,
        }
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
            entry["goal_met"] = metric.met(entry["ratio_of_medians"])
        summary[metric.key] = entry
    # What a running backup costs the guest, per system: cbw IOPS / base IOPS of the medians.
    for kind in ("cbw", "steady"):
        for qd in FIO_DEPTHS:
            base, cbw = summary.get(f"base-qd{qd} IOPS"), summary.get(f"{kind}-qd{qd} IOPS")
            if base and cbw:
                summary[f"cbw-cost-{kind}-qd{qd}"] = {
                    s: cbw[s]["median"] / base[s]["median"] for s in SYSTEMS if s in base and s in cbw
                }
    return summary


def _number(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def print_table(summary: dict[str, Any], layout: Layout, cfg: Config, args: argparse.Namespace) -> None:
    print(
        f"source: {cfg.size / MiB:.0f} MiB in {args.dir}: data {layout.data / MiB:.0f} + written zeros "
        f"{layout.zero / MiB:.0f} + holes {layout.hole / MiB:.0f} MiB; cbw backups at speed "
        f"{cfg.speed / MiB:g} MiB/s, x-perf.max-chunk {cfg.max_chunk / MiB:g} MiB (full-backup too); fio "
        f"{FIO_BLOCK} randwrite/randread {cfg.runtime} s, under a backup {cfg.cbw_writes} writes (cbw) or "
        f"{cfg.runtime} s (steady), no ramp; runs {args.min_run // KiB}-{args.max_run // KiB} KiB; "
        f"medians of {args.rounds} round(s)"
    )
    header = (
        f"{'test':<12} {'metric':<7} {'qemu':>9} {'min-max':>13} {'cowbackup':>9} {'min-max':>13} "
        f"{'ratio':>6} {'paired':>6}  goal"
    )
    print(header)
    print("-" * len(header))
    for key, entry in summary.items():
        if key.startswith("cbw-cost"):
            continue
        cells = []
        for system in SYSTEMS:
            s = entry.get(system)
            if s is None:
                cells += [f"{'-':>9}", f"{'':>13}"]
            else:
                spread = f"{_number(s['min'])}-{_number(s['max'])}"
                cells += [f"{_number(s['median']):>9}", f"{spread:>13}"]
        line = f"{entry['test']:<12} {entry['unit']:<7} {' '.join(cells)}"
        if "ratio_of_medians" in entry:
            verdict = "ok" if entry["goal_met"] else "MISSED"
            line += f" {entry['ratio_of_medians']:>6.2f} {entry['median_paired_ratio']:>6.2f}"
            line += f"  {entry['goal']} {verdict}"
        print(line)
    for kind in ("cbw", "steady"):
        for qd in FIO_DEPTHS:
            cost = summary.get(f"cbw-cost-{kind}-qd{qd}")
            if cost:
                parts = ", ".join(f"{s} {v:.2f}" for s, v in cost.items())
                print(f"IOPS kept under a running backup ({kind}-qd{qd} / base-qd{qd}): {parts}")
    print(
        "ratio = cowbackup / qemu of the medians; paired = median of the per-round ratios.  Goals: MB/s and "
        "IOPS >= 1.0; p99 latency <= 1.0 (lower is better).  MB = 10^6 bytes."
    )


# ---------------------------------------------------------------------- command line


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size '{text}' (examples: 256M, 1G)") from None


def _image_size(text: str) -> int:
    value = _size(text)
    if value < MiB or value % MiB:
        raise argparse.ArgumentTypeError(f"--size must be a positive multiple of 1 MiB, not {text}")
    return value


def _tests(text: str) -> tuple[str, ...]:
    wanted = tuple(t for t in text.split(",") if t)
    unknown = [t for t in wanted if t not in TESTS]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(f"unknown test(s) {','.join(unknown)}; known: {','.join(TESTS)}")
    return wanted


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Compare 'cowbackup daemon' with qemu-storage-daemon: full backup, CBW under fio load."
    )
    p.add_argument("--size", type=_image_size, default=1 << 30, help="source size (default 1G)")
    p.add_argument("--rounds", type=positive_int, default=3, help="counted rounds (default 3)")
    p.add_argument("--dir", default="/dev/shm", help="where the images go (default /dev/shm)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted rounds first (default 1)")
    p.add_argument("--seed", type=int, default=1, help="seed of the source layout and data (default 1)")
    p.add_argument("--runtime", type=positive_int, default=5, help="seconds per fio job (default 5)")
    p.add_argument(
        "--cbw-writes",
        type=positive_int,
        help="writes per cbw-qdN fio run (default: one per two 64 KiB clusters of --size)",
    )
    p.add_argument("--speed", type=_size, default=20 * MiB, help="cbw backups' speed, bytes/s (default 20M)")
    p.add_argument(
        "--max-chunk", type=_size, default=MiB, help="x-perf.max-chunk of every backup (default 1M; 0: none)"
    )
    p.add_argument("--only", choices=SYSTEMS, help="run only one system")
    p.add_argument(
        "--tests",
        type=_tests,
        default=TESTS,
        help=f"comma-separated subset of {','.join(TESTS)} (default all)",
    )
    p.add_argument(
        "--min-run",
        type=_size,
        default=MIN_RUN,
        help="shortest data/zero/hole run of the image (default 64K)",
    )
    p.add_argument("--max-run", type=_size, default=MAX_RUN, help="longest run (default 1M)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (source image) at exit")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument(
        "--profile", metavar="FILE", help="run our daemon under cProfile into FILE (the last turn wins)"
    )
    p.add_argument("--qemu-storage-daemon", default="qemu-storage-daemon", help="daemon binary to use")
    p.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="unix",
        help="how NBD clients connect: a Unix socket (default), TCP on 127.0.0.1, or TCP with TLS "
        "(x509, made with openssl; only the nbdcopy tests and full-backup: fio's nbd engine may not "
        "read certificate files)",
    )
    return p


def missing_tools(args: argparse.Namespace) -> list[str]:
    """What is missing, with the Debian package that brings it."""
    needed = {"fio": "fio", "cmp": "diffutils"}
    if args.transport == "tls":
        needed["openssl"] = "openssl"
    if any(t in SEQ_TESTS for t in args.tests):
        needed["nbdcopy"] = "libnbd-bin"
    if args.only != "cowbackup":
        needed[args.qemu_storage_daemon] = "qemu-system-common"
    missing = [f"{tool} (Debian: {pkg})" for tool, pkg in needed.items() if shutil.which(tool) is None]
    if shutil.which("fio") is not None:
        probe = subprocess.run(["fio", "--enghelp=nbd"], capture_output=True, timeout=30)
        if probe.returncode != 0 or b"uri" not in probe.stdout:
            missing.append("fio's nbd engine (Debian's fio has it; this fio was built without libnbd)")
    return missing


async def _main_async(cfg: Config, args: argparse.Namespace) -> list[Sample]:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run_rounds(cfg, args)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.transport == "tls":
        fio_tests = [t for t in args.tests if t in FIO_TESTS]
        if fio_tests and args.tests != TESTS:
            _progress(f"daemon_vs_qsd: fio cannot connect with TLS: {','.join(fio_tests)}")
            return 2
        args.tests = tuple(t for t in args.tests if t not in FIO_TESTS)
    missing = missing_tools(args)
    if missing:
        _progress(f"daemon_vs_qsd: missing {'; '.join(missing)}")
        return 2
    # SIGTERM cleans up like Ctrl-C (inside the event loop, _main_async routes it to a task cancel).
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = tempfile.mkdtemp(prefix="cowbackup-qsdbench-", dir=args.dir)
    try:
        source = os.path.join(workdir, "source.raw")
        started = time.perf_counter()
        if args.min_run < 4 * KiB or args.min_run % (4 * KiB) or args.size % args.min_run:
            _progress("daemon_vs_qsd: --min-run must be a multiple of 4 KiB that divides --size")
            return 2
        layout = make_source(source, args.size, args.seed, args.min_run, args.max_run)
        _progress(
            f"source {source}: {args.size / MiB:.0f} MiB, data {layout.data / MiB:.0f} / zeros "
            f"{layout.zero / MiB:.0f} / holes {layout.hole / MiB:.0f} MiB "
            f"({time.perf_counter() - started:.1f} s)"
        )
        profile = os.path.abspath(args.profile) if args.profile else None
        tls_dir = None
        if args.transport == "tls":
            tls_dir = str(make_tls_creds(Path(workdir) / "tls"))
        cfg = Config(
            workdir,
            source,
            args.size,
            args.runtime,
            args.cbw_writes or max(1, args.size // (2 * CLUSTER)),
            args.speed,
            args.max_chunk,
            args.qemu_storage_daemon,
            profile,
            args.tests,
            args.transport,
            tls_dir,
        )
        samples = asyncio.run(_main_async(cfg, args))
        signal.signal(signal.SIGTERM, _interrupt)  # the loop's removal reset it to the default
        summary = summarize(samples)
        if args.json:
            doc = {
                "config": vars(args),
                "layout": dataclasses.asdict(layout),
                "samples": [dataclasses.asdict(s) for s in samples],
                "summary": summary,
            }
            print(json.dumps(doc, indent=2))
        else:
            print_table(summary, layout, cfg, args)
        return 0
    except BenchError as err:
        _progress(f"daemon_vs_qsd: FAILED: {err}")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        _progress("daemon_vs_qsd: interrupted")
        return 130
    finally:
        if args.keep:
            _progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
