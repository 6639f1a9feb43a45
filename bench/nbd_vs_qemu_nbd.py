"""Throughput, IOPS and latency of our NBD server (``cowbackup serve``) against ``qemu-nbd``.

Run: .venv/bin/python bench/nbd_vs_qemu_nbd.py [--size 1G] [--rounds 5] [--dir /dev/shm] [--json]

Three raw images are made once in ``--dir`` (page-cached: tmpfs by default) and both servers export the
same files, one server process per image and turn::

    data.raw    random bytes, no holes: both servers must move every byte
    sparse.raw  backup_vs_qemu.py's mix in MiB runs: 50% random data, 20% written zeros, 30% holes
    source.raw  other random bytes: what the write test copies into the export (a fresh sparse target)

    qemu-nbd    qemu-nbd -f raw --persistent --socket PATH IMAGE   (cache and aio left at their defaults)
    cowbackup   python -m cowbackup serve IMAGE --socket PATH

The tests, each timed from the client's side::

    seq-read         nbdcopy EXPORT(data.raw) null:                       MB/s
    seq-read-sparse  nbdcopy EXPORT(sparse.raw) null:  (holes skipped)    MB/s of the virtual size
    seq-write        nbdcopy --flush source.raw EXPORT(target.raw)        MB/s, then cmp target source
    randread-qdN     fio --ioengine=nbd, 4 KiB random reads of data.raw   IOPS and p99 completion latency
    randwrite-qdN    the same, 4 KiB random writes to target.raw          (N = 1 and 16, time based)

Every round, image by image, the two servers take turns, and which goes first alternates by round.  The
first time each server serves a read image, an untimed copy of the export is compared with the image; every
write test's target is compared with its source.  A difference stops the benchmark with exit status 1.

nbdcopy opens up to 4 connections to a server that advertises multi-conn: ours always does, qemu-nbd only
with ``--shared`` above 1.  ``--connections N`` (default 1) is passed to nbdcopy and, above 1, to qemu-nbd
as ``--shared=N``, so both get the same number of connections.  fio's nbd engine uses one per job.

Everything it made -- files, sockets, processes -- is removed on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

from cowbackup.block.options import parse_size
from cowbackup.cli.argtypes import positive_int

KiB = 1024
MiB = 1024 * KiB
MB = 1000 * 1000

SYSTEMS = ("qemu-nbd", "cowbackup")
#: Shares of sparse.raw in MiB units, as in backup_vs_qemu.py: random data, written zeros, holes.
MIX = {"data": 0.5, "zero": 0.2, "hole": 0.3}
#: Longest run of one kind in sparse.raw, in MiB (runs are 1..MAX_RUN_MIB long).
MAX_RUN_MIB = 8
#: The goals of the issue, as ``cowbackup / qemu-nbd`` ratios of the medians.
SEQ_GOAL = 1.0
IOPS_GOAL = 0.8
#: fio's random I/O: block size, queue depths, and the uncounted start of every job.
FIO_BLOCK = "4k"
FIO_DEPTHS = (1, 16)
FIO_RAMP = 1
#: How long a server may take to listen, and to exit after SIGTERM.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
#: Longest one nbdcopy or cmp may run before the benchmark gives up.
TOOL_TIMEOUT = 900.0

SEQ_TESTS = ("seq-read", "seq-read-sparse", "seq-write")
FIO_TESTS = tuple(f"{rw}-qd{qd}" for rw in ("randread", "randwrite") for qd in FIO_DEPTHS)
TESTS = SEQ_TESTS + FIO_TESTS


class BenchError(Exception):
    """The benchmark cannot go on: a tool or server failed, or data read or written is wrong."""


@dataclasses.dataclass(frozen=True)
class Metric:
    """One number a test reports; ``goal`` is the least ``cowbackup / qemu-nbd`` ratio asked for."""

    test: str
    unit: str
    higher_is_better: bool
    goal: float | None = None

    @property
    def key(self) -> str:
        return f"{self.test} {self.unit}"


METRICS = [Metric(t, "MB/s", True, SEQ_GOAL) for t in SEQ_TESTS] + [
    m for t in FIO_TESTS for m in (Metric(t, "IOPS", True, IOPS_GOAL), Metric(t, "p99 us", False))
]


@dataclasses.dataclass
class Sample:
    """One measurement: ``metric`` is a :attr:`Metric.key`."""

    system: str
    round: int
    metric: str
    value: float


@dataclasses.dataclass
class Layout:
    """What sparse.raw holds, in bytes."""

    size: int
    data: int = 0
    zero: int = 0
    hole: int = 0


@dataclasses.dataclass
class Config:
    """What every run needs to know; from the command line."""

    workdir: str
    size: int
    tests: tuple[str, ...]
    connections: int
    runtime: int
    qemu_nbd: str


# ---------------------------------------------------------------------- images


def _create(path: str, size: int) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_random(path: str, size: int, seed: int) -> None:
    """``size`` bytes of seeded random data, no holes."""
    rng = random.Random(seed)
    fd = _create(path, size)
    try:
        for offset in range(0, size, MiB):
            os.pwrite(fd, rng.randbytes(MiB), offset)
    finally:
        os.close(fd)


def make_sparse(path: str, size: int, seed: int) -> Layout:
    """Runs of random data, written zeros (allocated) and holes in the ``MIX`` shares, exact in MiB."""
    rng = random.Random(seed)
    units = size // MiB
    left = {kind: round(units * share) for kind, share in MIX.items() if kind != "hole"}
    left["hole"] = units - sum(left.values())
    layout = Layout(size)
    zeros = bytes(MiB)
    fd = _create(path, size)
    try:
        offset = 0
        while offset < size:
            kinds = [kind for kind, n in left.items() if n > 0]
            kind = rng.choices(kinds, weights=[left[k] for k in kinds])[0]
            n = min(rng.randint(1, MAX_RUN_MIB), left[kind])
            left[kind] -= n
            for _ in range(n):
                if kind != "hole":
                    os.pwrite(fd, rng.randbytes(MiB) if kind == "data" else zeros, offset)
                offset += MiB
            setattr(layout, kind, getattr(layout, kind) + n * MiB)
    finally:
        os.close(fd)
    return layout


def create_sparse(path: str, size: int) -> None:
    """A fresh write target: one hole of ``size`` bytes."""
    os.close(_create(path, size))


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


def run_tool(argv: Sequence[str], timeout: float) -> float:
    """Run a client to completion; its wall time in seconds.  BenchError if it fails.

    The tool gets its own session, so a terminal's Ctrl-C reaches only us; ``subprocess.run`` kills it
    when we are interrupted.
    """
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            argv, capture_output=True, timeout=timeout, start_new_session=True, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} took longer than {timeout:.0f} s: {' '.join(argv)}") from None
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).decode(errors="replace").strip()[-2000:]
        raise BenchError(f"{' '.join(argv)} exited with {proc.returncode}: {detail}")
    return seconds


def same_bytes(a: str, b: str) -> bool:
    """Whether two files hold the same bytes (``cmp``)."""
    rc = subprocess.run(["cmp", "-s", a, b], timeout=TOOL_TIMEOUT, start_new_session=True).returncode
    if rc > 1:
        raise BenchError(f"cmp {a} {b} failed with {rc}")
    return rc == 0


class Server:
    """One export of one image by one system, as a context manager that always stops the process.

    ::

        with Server(cfg, "cowbackup", image) as srv:    # started; listening when __enter__ returns
            nbdcopy(srv.uri, "null:")
                                                        # SIGTERM, then SIGKILL after STOP_TIMEOUT
    """

    def __init__(self, cfg: Config, system: str, image: str) -> None:
        self.system = system
        self.sock = os.path.join(cfg.workdir, f"{system}.sock")
        self.log = os.path.join(cfg.workdir, f"{system}.log")
        # The default (empty) export name, for both.
        self.uri = f"nbd+unix:///?socket={self.sock}"
        if system == "qemu-nbd":
            self.argv = [cfg.qemu_nbd, "-f", "raw", "--persistent", "--socket", self.sock]
            if cfg.connections > 1:
                self.argv.append(f"--shared={cfg.connections}")
            self.argv.append(image)
        else:
            self.argv = [sys.executable, "-m", "cowbackup", "serve", image, "--socket", self.sock]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        logfd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logfd,
                stderr=logfd,
                start_new_session=True,  # our __exit__ stops it, not the terminal's Ctrl-C
            )
        finally:
            os.close(logfd)
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _wait_listening(self) -> None:
        """Poll until the socket accepts a connection, with a deadline; fail if the server exits."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.system} exited with {self.proc.returncode}: {_tail(self.log)}")
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(self.sock).st_mode):
                    with socket.socket(socket.AF_UNIX) as probe:
                        try:
                            probe.connect(self.sock)
                            return
                        except (ConnectionRefusedError, FileNotFoundError):
                            pass
            if time.monotonic() > deadline:
                raise BenchError(f"{self.system} not listening on {self.sock} after {START_TIMEOUT} s")
            time.sleep(0.01)

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchError(f"{self.system} died with {self.proc.returncode}: {_tail(self.log)}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; removes the socket.  May be called twice."""
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(STOP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        _progress(f"{self.system} ignored SIGTERM for {STOP_TIMEOUT} s, killing it")
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)


# ---------------------------------------------------------------------- tests


def nbdcopy(cfg: Config, source: str, dest: str, *, flush: bool = False) -> float:
    argv = ["nbdcopy", f"--connections={cfg.connections}"]
    if flush:
        argv.append("--flush")
    return run_tool([*argv, source, dest], TOOL_TIMEOUT)


def check_read(cfg: Config, srv: Server, image: str) -> None:
    """Copy the whole export into a file (untimed) and compare it with the image it serves."""
    copy = os.path.join(cfg.workdir, "check.raw")
    try:
        nbdcopy(cfg, srv.uri, copy)
        if not same_bytes(copy, image):
            raise BenchError(f"{srv.system}: WRONG DATA, the export of {image} reads differently")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(copy)


def fio(cfg: Config, srv: Server, test: str) -> tuple[float, float]:
    """Run one fio job (``randread-qd16`` and the like); its IOPS and p99 completion latency in µs."""
    rw, _, depth = test.partition("-qd")
    out = os.path.join(cfg.workdir, "fio.json")
    argv = [
        "fio",
        f"--name={test}",
        "--ioengine=nbd",
        f"--uri={srv.uri}",
        f"--rw={rw}",
        f"--bs={FIO_BLOCK}",
        f"--iodepth={depth}",
        "--time_based",
        f"--runtime={cfg.runtime}",
        f"--ramp_time={FIO_RAMP}",
        "--norandommap",
        "--output-format=json",
        f"--output={out}",  # not stdout: the nbd engine prints a line there before the JSON
    ]
    try:
        run_tool(argv, cfg.runtime + FIO_RAMP + 60)
        with open(out) as f:
            doc = json.load(f)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)
    job = doc["jobs"][0]
    if job.get("error"):
        raise BenchError(f"{srv.system}: fio {test} failed with error {job['error']}")
    side = job["read" if rw == "randread" else "write"]
    if not side.get("total_ios"):
        raise BenchError(f"{srv.system}: fio {test} did no I/O")
    p99_ns = float(side["clat_ns"]["percentile"]["99.000000"])
    return float(side["iops"]), p99_ns / 1000


class Round:
    """One server's turn in one round: runs the selected tests and collects their samples."""

    def __init__(self, cfg: Config, system: str, rnd: int, label: str) -> None:
        self.cfg = cfg
        self.system = system
        self.rnd = rnd
        self.label = label
        self.samples: list[Sample] = []

    def record(self, test: str, unit: str, value: float) -> None:
        self.samples.append(Sample(self.system, self.rnd, f"{test} {unit}", value))

    def report(self, test: str, text: str) -> None:
        _progress(f"{self.label:<11} {self.system:<9} {test:<16} {text}")

    def seq(self, test: str, source: str, dest: str, *, flush: bool = False) -> None:
        seconds = nbdcopy(self.cfg, source, dest, flush=flush)
        mbps = self.cfg.size / seconds / MB
        self.record(test, "MB/s", mbps)
        self.report(test, f"{seconds:7.3f} s {mbps:8.0f} MB/s")

    def fio(self, srv: Server, test: str) -> None:
        iops, p99 = fio(self.cfg, srv, test)
        self.record(test, "IOPS", iops)
        self.record(test, "p99 us", p99)
        self.report(test, f"{iops:9.0f} IOPS  p99 {p99:8.1f} us")

    def wanted(self, *tests: str) -> list[str]:
        return [t for t in tests if t in self.cfg.tests]


def serve_data(turn: Round, image: str, check: bool) -> None:
    tests = turn.wanted("seq-read", *(t for t in FIO_TESTS if t.startswith("randread")))
    if not tests and not check:
        return
    with Server(turn.cfg, turn.system, image) as srv:
        if check:
            check_read(turn.cfg, srv, image)
        for test in tests:
            if test == "seq-read":
                turn.seq(test, srv.uri, "null:")
            else:
                turn.fio(srv, test)
            srv.check_alive()


def serve_sparse(turn: Round, image: str, check: bool) -> None:
    if not turn.wanted("seq-read-sparse") and not check:
        return
    with Server(turn.cfg, turn.system, image) as srv:
        if check:
            check_read(turn.cfg, srv, image)
        if turn.wanted("seq-read-sparse"):
            turn.seq("seq-read-sparse", srv.uri, "null:")
            srv.check_alive()


def serve_target(turn: Round, source: str) -> None:
    """seq-write into a fresh sparse target, then random writes over what it wrote."""
    randwrites = turn.wanted(*(t for t in FIO_TESTS if t.startswith("randwrite")))
    if not turn.wanted("seq-write") and not randwrites:
        return
    target = os.path.join(turn.cfg.workdir, "target.raw")
    try:
        if turn.wanted("seq-write"):
            create_sparse(target, turn.cfg.size)
        else:  # random writes land on allocated data, as after seq-write
            shutil.copyfile(source, target)
        with Server(turn.cfg, turn.system, target) as srv:
            if turn.wanted("seq-write"):
                turn.seq("seq-write", source, srv.uri, flush=True)
                srv.check_alive()
                # nbdcopy --flush returned: every byte is in the file (and tmpfs has no other cache).
                if not same_bytes(target, source):
                    raise BenchError(f"{turn.system}: WRONG WRITE, the target differs from its source")
            for test in randwrites:
                turn.fio(srv, test)
                srv.check_alive()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)


def run_rounds(cfg: Config, args: argparse.Namespace, images: dict[str, str]) -> list[Sample]:
    systems = list(SYSTEMS) if args.only is None else [args.only]
    samples: list[Sample] = []
    checked: set[str] = set()
    # Warm-up rounds (numbered <= 0) run and check like the others but do not count.
    for rnd in range(1 - args.warmup, args.rounds + 1):
        # Alternate who goes first, so neither always profits from (or pays for) the other's leftovers.
        order = systems if rnd % 2 else systems[::-1]
        label = f"round {rnd}/{args.rounds}" if rnd > 0 else "warm-up"
        turns = {system: Round(cfg, system, rnd, label) for system in systems}
        for system in order:
            serve_data(turns[system], images["data"], check=system not in checked)
        for system in order:
            serve_sparse(turns[system], images["sparse"], check=system not in checked)
        for system in order:
            serve_target(turns[system], images["source"])
        checked.update(systems)
        if rnd > 0:
            samples += [s for turn in turns.values() for s in turn.samples]
    return samples


# ---------------------------------------------------------------------- report


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Per metric: each system's median / min / max, then ``cowbackup / qemu-nbd`` and the goal."""
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
            qemu = {s.round: s.value for s in mine if s.system == "qemu-nbd"}
            ours = {s.round: s.value for s in mine if s.system == "cowbackup"}
            entry["ratio_of_medians"] = entry["cowbackup"]["median"] / entry["qemu-nbd"]["median"]
            entry["median_paired_ratio"] = statistics.median(ours[r] / qemu[r] for r in ours if r in qemu)
            if metric.goal is not None:
                entry["goal_met"] = entry["ratio_of_medians"] >= metric.goal
        summary[metric.key] = entry
    return summary


def _number(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def print_table(summary: dict[str, Any], layout: Layout, cfg: Config, args: argparse.Namespace) -> None:
    print(
        f"images: {cfg.size / MiB:.0f} MiB each in {args.dir}; sparse.raw: data {layout.data / MiB:.0f} "
        f"+ written zeros {layout.zero / MiB:.0f} + holes {layout.hole / MiB:.0f} MiB; "
        f"nbdcopy --connections={cfg.connections}; fio {FIO_BLOCK} for {cfg.runtime} s "
        f"(+{FIO_RAMP} s ramp); medians of {args.rounds} round(s); MB = 10^6 bytes"
    )
    header = (
        f"{'test':<16} {'metric':<7} {'qemu-nbd':>9} {'min-max':>13} {'cowbackup':>9} {'min-max':>13} "
        f"{'ratio':>6} {'paired':>6}  goal"
    )
    print(header)
    print("-" * len(header))
    for entry in summary.values():
        cells = []
        for system in SYSTEMS:
            s = entry.get(system)
            if s is None:
                cells += [f"{'-':>9}", f"{'':>13}"]
            else:
                spread = f"{_number(s['min'])}-{_number(s['max'])}"
                cells += [f"{_number(s['median']):>9}", f"{spread:>13}"]
        line = f"{entry['test']:<16} {entry['unit']:<7} {' '.join(cells)}"
        if "ratio_of_medians" in entry:
            line += f" {entry['ratio_of_medians']:>6.2f} {entry['median_paired_ratio']:>6.2f}"
            if entry["goal"] is not None:
                verdict = "ok" if entry["goal_met"] else "MISSED"
                line += f"  >= {entry['goal']:.1f} {verdict}"
            else:
                line += "  (lower is better)"
        print(line)
    print(
        "ratio = cowbackup / qemu-nbd of the medians; paired = median of the per-round ratios.  For p99 "
        "latency lower is better: a ratio below 1 favours cowbackup.\nGoals (the issue's): sequential "
        f">= {SEQ_GOAL:.1f}x, 4 KiB IOPS >= {IOPS_GOAL:.1f}x.  seq-read-sparse MB/s counts the virtual "
        "size (holes included)."
    )


# ---------------------------------------------------------------------- command line


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size '{text}' (examples: 256M, 1G)") from None
    if value < MiB or value % MiB:
        raise argparse.ArgumentTypeError(f"--size must be a positive multiple of 1 MiB, not {text}")
    return value


def _tests(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in names if t not in TESTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown test(s) {', '.join(unknown)}; known: {', '.join(TESTS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Compare 'cowbackup serve' with qemu-nbd: nbdcopy throughput, fio 4 KiB IOPS/latency."
    )
    p.add_argument("--size", type=_size, default=1 << 30, help="size of each image (default 1G)")
    p.add_argument("--rounds", type=positive_int, default=5, help="counted rounds (default 5)")
    p.add_argument("--dir", default="/dev/shm", help="where the images go (default /dev/shm)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted rounds first (default 1)")
    p.add_argument("--seed", type=int, default=1, help="seed of the images' data and layout (default 1)")
    p.add_argument("--runtime", type=positive_int, default=5, help="seconds per fio job (default 5)")
    p.add_argument(
        "--connections",
        type=positive_int,
        default=1,
        help="nbdcopy --connections; above 1 also qemu-nbd --shared (default 1)",
    )
    p.add_argument("--tests", type=_tests, default=TESTS, help=f"comma list of: {', '.join(TESTS)}")
    p.add_argument("--only", choices=SYSTEMS, help="run only one server")
    p.add_argument("--keep", action="store_true", help="keep the work directory (images) at exit")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--qemu-nbd", default="qemu-nbd", help="qemu-nbd binary to use")
    return p


def missing_tools(args: argparse.Namespace) -> list[str]:
    """What is missing, with the Debian package that brings it."""
    needed = {"nbdcopy": "libnbd-bin", "cmp": "diffutils"}
    if args.only != "cowbackup":
        needed[args.qemu_nbd] = "qemu-utils"
    if any(t in FIO_TESTS for t in args.tests):
        needed["fio"] = "fio"
    missing = [f"{tool} (Debian: {pkg})" for tool, pkg in needed.items() if shutil.which(tool) is None]
    if "fio" in needed and shutil.which("fio") is not None:
        probe = subprocess.run(["fio", "--enghelp=nbd"], capture_output=True, timeout=30)
        if probe.returncode != 0 or b"uri" not in probe.stdout:
            missing.append("fio's nbd engine (Debian's fio has it; this fio was built without libnbd)")
    return missing


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _workdir(parent: str, keep: bool) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="cowbackup-nbdbench-", dir=parent)
    try:
        yield path
    finally:
        if keep:
            _progress(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_tools(args)
    if missing:
        _progress(f"nbd_vs_qemu_nbd: missing {'; '.join(missing)}")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up like Ctrl-C
    try:
        with _workdir(args.dir, args.keep) as workdir:
            cfg = Config(workdir, args.size, args.tests, args.connections, args.runtime, args.qemu_nbd)
            started = time.perf_counter()
            images = {name: os.path.join(workdir, f"{name}.raw") for name in ("data", "sparse", "source")}
            make_random(images["data"], args.size, args.seed)
            make_random(images["source"], args.size, args.seed + 1)
            layout = make_sparse(images["sparse"], args.size, args.seed)
            _progress(
                f"images in {workdir}: {args.size / MiB:.0f} MiB each; sparse.raw data "
                f"{layout.data / MiB:.0f} / zeros {layout.zero / MiB:.0f} / holes "
                f"{layout.hole / MiB:.0f} MiB ({time.perf_counter() - started:.1f} s)"
            )
            samples = run_rounds(cfg, args, images)
        summary = summarize(samples)
        if args.json:
            doc = {
                "config": {**vars(args), "tests": list(args.tests)},
                "sparse_layout": dataclasses.asdict(layout),
                "samples": [dataclasses.asdict(s) for s in samples],
                "summary": summary,
            }
            print(json.dumps(doc, indent=2))
        else:
            print_table(summary, layout, cfg, args)
        return 0
    except BenchError as err:
        _progress(f"nbd_vs_qemu_nbd: FAILED: {err}")
        return 1
    except KeyboardInterrupt:
        _progress("nbd_vs_qemu_nbd: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
