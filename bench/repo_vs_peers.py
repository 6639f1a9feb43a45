"""Backups into a repository: cowbackup against restic and borg on one VM-like disk image.

Run: .venv/bin/python bench/repo_vs_peers.py [--size 1G] [--rounds 3] [--workdir /dev/shm] [--json]

One disk image is made of fragmented runs (4 KiB to 8 MiB) of what VM disks hold: real files from /usr
concatenated (compresses like a system disk), random data, written zeros and holes.  Each round, each
tool in turn (the order rotates) gets a fresh copy of it and a fresh encrypted, compressed repository::

    full backup      timed (whole process: start, key, read, store, commit)
    rewrite 1%       64 KiB pieces of random data at random 4 KiB-aligned offsets (not timed; the same
                     offsets and bytes for every tool of a round)
    second backup    timed; a one-shot backup that reads the whole image again (the repository
                     already holds all but the rewritten data)
    du -sb REPO      both snapshots
    restore          the second snapshot, timed; then ``cmp`` with the image (a difference fails)

Each step's peak RSS comes from ``/usr/bin/time -v`` (or, without it, from ``getrusage(RUSAGE_CHILDREN)``
in a small wrapper process per step).  A second scenario (``--skip-large`` to leave it out) backs up and
restores a 64 GiB sparse disk holding 1 GiB with cowbackup only, to show that its memory does not grow
with the disk.  Everything the benchmark made -- images, repositories, caches -- is removed on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import cowbackup
from cowbackup.cli.argtypes import positive_int, size

# BenchError: a tool failed, or a restore differs from the image (copy_extents raises it too).
from daemon_vs_qsd import BenchError, _image_size, _interrupt, _progress, copy_extents

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1000 * 1000

#: Shares of the image: files from /usr, random data, written zeros, holes.
MIX = {"system": 0.45, "random": 0.20, "zero": 0.10, "hole": 0.25}
#: Where the "system" content comes from (regular files, walked in sorted order).
SYSTEM_DIRS = ("/usr/lib", "/usr/share", "/usr/bin")
#: Runs are 2**u pages long, u uniform in [0, RUN_BITS]: 4 KiB to 8 MiB, about 1 MiB on average.
PAGE = 4 * KiB
RUN_BITS = 11
#: The rewrite between the two backups.
REWRITE_SHARE = 0.01
REWRITE_PIECE = 64 * KiB
PASSWORD = "repo-bench-passphrase"
SNAPSHOT_NAME = "bench/vm1/disk0"
TOOLS = ("cowbackup", "restic", "borg")
TOOL_TIMEOUT = 3600.0
RSS_LINE = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
#: Run as ``python -c RSS_WRAPPER OUTFILE ARGV...`` when /usr/bin/time is missing: the child's peak RSS in
#: /usr/bin/time -v's words, then the child's exit status.
RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "open(sys.argv[1], 'w').write(f'Maximum resident set size (kbytes): {kb}\\n')\n"
    "sys.exit(rc if rc >= 0 else 128 - rc)\n"
)


# ---------------------------------------------------------------------- the image


@dataclasses.dataclass
class Layout:
    """What the image holds, in bytes."""

    size: int
    system: int = 0
    random: int = 0
    zero: int = 0
    hole: int = 0
    runs: int = 0
    #: How many times the /usr files were used up and read again from the start (0: all distinct).
    system_wraps: int = 0


class SystemFiles:
    """The contents of the regular files under SYSTEM_DIRS, one after the other, as an endless stream."""

    def __init__(self) -> None:
        self._files = self._walk()
        self._pending = b""
        self.wraps = 0

    @staticmethod
    def _walk() -> Iterator[str]:
        for top in SYSTEM_DIRS:
            for root, dirs, files in os.walk(top):
                dirs.sort()
                for name in sorted(files):
                    path = os.path.join(root, name)
                    if os.path.isfile(path) and not os.path.islink(path):
                        yield path

    def _next_file(self) -> bytes:
        while True:
            for path in self._files:
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                if data:
                    return data
            # Used up: start again (the report says so, since repeats deduplicate).
            self.wraps += 1
            self._files = self._walk()

    def read(self, n: int) -> bytes:
        parts = [self._pending]
        have = len(self._pending)
        while have < n:
            data = self._next_file()
            parts.append(data)
            have += len(data)
        joined = b"".join(parts)
        self._pending = joined[n:]
        return joined[:n]


def make_image(path: str, size: int, mix: dict[str, float], seed: int, files: SystemFiles) -> Layout:
    """Write a sparse image of ``size`` bytes: runs of each kind of ``mix`` (exact shares in pages)."""
    rng = random.Random(seed)
    pages = size // PAGE
    left = {kind: round(pages * share) for kind, share in mix.items() if kind != "hole"}
    left["hole"] = pages - sum(left.values())
    layout = Layout(size)
    wraps = files.wraps
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        offset = 0
        while offset < size:
            kinds = [kind for kind, n in left.items() if n > 0]
            kind = rng.choices(kinds, weights=[left[k] for k in kinds])[0]
            n = min(int(2 ** rng.uniform(0, RUN_BITS)), left[kind])
            left[kind] -= n
            layout.runs += 1
            length = n * PAGE
            if kind == "system":
                os.pwrite(fd, files.read(length), offset)
            elif kind == "random":
                os.pwrite(fd, rng.randbytes(length), offset)
            elif kind == "zero":
                os.pwrite(fd, bytes(length), offset)
            setattr(layout, kind, getattr(layout, kind) + length)
            offset += length
    finally:
        os.close(fd)
    layout.system_wraps = files.wraps - wraps
    return layout


def rewrite(path: str, size: int, seed: int) -> int:
    """Overwrite REWRITE_SHARE of the image with random 64 KiB pieces at random offsets; bytes written."""
    rng = random.Random(seed)
    count = max(1, round(size * REWRITE_SHARE / REWRITE_PIECE))
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for _ in range(count):
            offset = rng.randrange((size - REWRITE_PIECE) // PAGE + 1) * PAGE
            os.pwrite(fd, rng.randbytes(REWRITE_PIECE), offset)
    finally:
        os.close(fd)
    return count * REWRITE_PIECE


def _data_extents(path: str) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        end_of_file = os.fstat(fd).st_size
        extents = []
        offset = 0
        while offset < end_of_file:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            offset = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, offset))
        return extents
    finally:
        os.close(fd)


def same_sparse(a: str, b: str) -> bool:
    """``cmp`` for large sparse files: compare the union of both files' data extents (holes read as 0)."""
    if os.stat(a).st_size != os.stat(b).st_size:
        return False
    merged: list[list[int]] = []
    for start, end in sorted(_data_extents(a) + _data_extents(b)):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        for start, end in merged:
            for offset in range(start, end, 8 * MiB):
                n = min(8 * MiB, end - offset)
                if os.pread(fa.fileno(), n, offset) != os.pread(fb.fileno(), n, offset):
                    return False
    return True


def same_bytes(a: str, b: str) -> bool:
    rc = subprocess.run(["cmp", "-s", a, b], check=False).returncode
    if rc > 1:
        raise BenchError(f"cmp {a} {b} failed with {rc}")
    return rc == 0


def du_bytes(path: str) -> int:
    out = subprocess.run(["du", "-sb", path], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


# ---------------------------------------------------------------------- running a tool


@dataclasses.dataclass
class Measured:
    """One tool process: wall seconds, peak RSS in bytes, its output."""

    seconds: float
    rss: int
    stdout: str
    stderr: str


class Runner:
    """Runs a tool in its own session, timing it and taking its peak RSS."""

    def __init__(self, workdir: str, use_time: bool) -> None:
        self.workdir = workdir
        self.use_time = use_time
        self.rss_file = os.path.join(workdir, "rss.txt")

    @property
    def method(self) -> str:
        return "/usr/bin/time -v" if self.use_time else "getrusage(RUSAGE_CHILDREN) in a wrapper"

    def run(self, argv: Sequence[str], env: dict[str, str], cwd: str | None = None) -> Measured:
        if self.use_time:
            wrapped = ["/usr/bin/time", "-v", "-o", self.rss_file, *argv]
        else:
            wrapped = [sys.executable, "-c", RSS_WRAPPER, self.rss_file, *argv]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.rss_file)
        started = time.perf_counter()
        proc = subprocess.Popen(
            wrapped,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,  # Ctrl-C reaches us only; the finally below stops the tool
        )
        try:
            out, err = proc.communicate(timeout=TOOL_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{argv[0]} took longer than {TOOL_TIMEOUT:.0f} s: {' '.join(argv)}") from None
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            detail = (err or out).decode(errors="replace").strip()[-2000:]
            raise BenchError(f"{' '.join(argv)} exited with {proc.returncode}: {detail}")
        with open(self.rss_file) as f:
            match = RSS_LINE.search(f.read())
        if match is None:
            raise BenchError(f"no peak RSS for {' '.join(argv)} in {self.rss_file}")
        return Measured(seconds, int(match.group(1)) * KiB, out.decode(errors="replace"), err.decode())


# ---------------------------------------------------------------------- the tools


class Tool:
    """One backup program: init a repository, back the image up, restore the last snapshot."""

    name = ""

    def __init__(self, runner: Runner, workdir: str) -> None:
        self.runner = runner
        self.workdir = workdir
        self.home = os.path.join(workdir, f"{self.name}-home")
        self.repo = os.path.join(workdir, f"{self.name}-repo")
        self.env = dict(os.environ)
        self.snapshots: list[str] = []

    def init(self) -> None:
        raise NotImplementedError

    def backup(self, image: str) -> Measured:
        raise NotImplementedError

    def restore(self, image: str, outdir: str) -> tuple[Measured, str]:
        """Restore the last snapshot into ``outdir``; the measurement and the restored file's path."""
        raise NotImplementedError

    def clean(self) -> None:
        for path in (self.repo, self.home):
            shutil.rmtree(path, ignore_errors=True)
        self.snapshots = []


class Cowbackup(Tool):
    name = "cowbackup"

    def __init__(self, runner: Runner, workdir: str) -> None:
        super().__init__(runner, workdir)
        src = os.path.dirname(os.path.dirname(os.path.abspath(cowbackup.__file__)))
        self.env.update(
            PYTHONPATH=src,  # the children run the same cowbackup as this script imports
            COWBACKUP_PASSWORD=PASSWORD,
            COWBACKUP_CACHE_DIR=os.path.join(self.home, "cache"),
            COWBACKUP_KEYS_DIR=os.path.join(self.home, "keys"),
        )
        self.cli = [sys.executable, "-m", "cowbackup"]
        #: ``repo init --chunk-size`` (0: the default, 4 MiB)
        self.chunk_size = 0

    def init(self) -> None:
        argv = [*self.cli, "repo", "init", "--encryption", "repokey", self.repo]
        if self.chunk_size:
            argv += ["--chunk-size", str(self.chunk_size)]
        self.runner.run(argv, self.env)

    def backup(self, image: str) -> Measured:
        argv = [*self.cli, "backup", image, "--repo", self.repo, "--name", SNAPSHOT_NAME, "--json"]
        m = self.runner.run(argv, self.env)
        self.snapshots.append(_json_result(m.stdout, "cowbackup backup")["snapshot"])
        return m

    def restore(self, image: str, outdir: str) -> tuple[Measured, str]:
        target = os.path.join(outdir, os.path.basename(image))
        argv = [*self.cli, "restore", "--repo", self.repo, "--json", self.snapshots[-1], target]
        return self.runner.run(argv, self.env), target


def _json_result(stdout: str, what: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            obj = json.loads(line)
            if obj.get("type") == "result":
                return dict(obj)
    raise BenchError(f"{what} printed no result line")


class Restic(Tool):
    name = "restic"

    def __init__(self, runner: Runner, workdir: str) -> None:
        super().__init__(runner, workdir)
        self.env.update(RESTIC_PASSWORD=PASSWORD, RESTIC_CACHE_DIR=os.path.join(self.home, "cache"))
        self.env.pop("RESTIC_REPOSITORY", None)

    def init(self) -> None:
        # Version 2 is the first with compression (restic's "stable" default in 0.14, named to be sure).
        self.runner.run(["restic", "-r", self.repo, "init", "--repository-version", "2"], self.env)

    def backup(self, image: str) -> Measured:
        m = self.runner.run(["restic", "-r", self.repo, "backup", "--json", image], self.env)
        summary = None
        for line in m.stdout.splitlines():
            if '"summary"' in line:
                summary = json.loads(line)
        if summary is None:
            raise BenchError("restic backup printed no summary")
        # The rewrite changed the file's mtime and ctime, so restic must have read it whole again.
        if summary.get("files_unmodified", 0) != 0:
            raise BenchError(f"restic did not re-read the image: {summary}")
        self.snapshots.append(summary["snapshot_id"])
        return m

    def restore(self, image: str, outdir: str) -> tuple[Measured, str]:
        argv = ["restic", "-r", self.repo, "restore", self.snapshots[-1], "--target", outdir]
        m = self.runner.run(argv, self.env)
        # restic recreates the file's absolute path under the target directory.
        return m, os.path.join(outdir, os.path.abspath(image).lstrip("/"))


class Borg(Tool):
    name = "borg"

    def __init__(self, runner: Runner, workdir: str) -> None:
        super().__init__(runner, workdir)
        self.env.update(
            BORG_PASSPHRASE=PASSWORD,
            BORG_BASE_DIR=self.home,  # cache, config and security dirs, removed with the repository
            BORG_DISPLAY_PASSPHRASE="no",
        )
        self.env.pop("BORG_REPO", None)

    def init(self) -> None:
        self.runner.run(["borg", "init", "--encryption", "repokey", self.repo], self.env)

    def backup(self, image: str) -> Measured:
        archive = f"{self.repo}::snap{len(self.snapshots)}"
        # Run in the image's directory with a relative name, so that extract recreates just that name.
        argv = ["borg", "create", "--compression", "zstd,3", "--list", archive, os.path.basename(image)]
        m = self.runner.run(argv, self.env, cwd=os.path.dirname(image))
        # --list gives each file's status: A added, M modified (read again), U unchanged (not read).
        status = [
            ln.split(None, 1)[0] for ln in m.stderr.splitlines() if ln.endswith(os.path.basename(image))
        ]
        if status[-1:] not in (["A"], ["M"]):
            raise BenchError(f"borg did not read the image whole: --list said {status}")
        self.snapshots.append(archive)
        return m

    def restore(self, image: str, outdir: str) -> tuple[Measured, str]:
        # --sparse leaves holes for all-zero chunks, as cowbackup's restore does.
        m = self.runner.run(["borg", "extract", "--sparse", self.snapshots[-1]], self.env, cwd=outdir)
        return m, os.path.join(outdir, os.path.basename(image))


TOOL_CLASSES: dict[str, type[Tool]] = {"cowbackup": Cowbackup, "restic": Restic, "borg": Borg}


# ---------------------------------------------------------------------- rounds


@dataclasses.dataclass(frozen=True)
class Metric:
    key: str
    higher_is_better: bool


METRICS = [
    Metric("full MB/s", True),
    Metric("full s", False),
    Metric("second s", False),
    Metric("restore s", False),
    Metric("repo MiB", False),
    Metric("full RSS MiB", False),
    Metric("second RSS MiB", False),
    Metric("restore RSS MiB", False),
]


@dataclasses.dataclass(frozen=True)
class Goal:
    """A goal of the issue: ``cowbackup / peer`` (``peer / cowbackup`` if ``inverse``) against a bound."""

    text: str
    metric: str
    peer: str
    bound: float
    at_most: bool = False
    inverse: bool = False

    def value(self, ours: float, theirs: float) -> float:
        return theirs / ours if self.inverse else ours / theirs

    def met(self, value: float) -> bool:
        return value <= self.bound if self.at_most else value >= self.bound


GOALS = [
    Goal("full backup MB/s >= 5x restic's", "full MB/s", "restic", 5.0),
    Goal("full backup MB/s >= 3x borg's", "full MB/s", "borg", 3.0),
    Goal("second backup >= 3x faster than restic (restic s / ours)", "second s", "restic", 3.0, inverse=True),
    Goal("restore >= 2x faster than restic (restic s / ours)", "restore s", "restic", 2.0, inverse=True),
    Goal("repository size <= 1.05x restic's", "repo MiB", "restic", 1.05, at_most=True),
]
RSS_GOAL_MIB = 300.0


@dataclasses.dataclass
class Sample:
    tool: str
    round: int
    metric: str
    value: float


@contextlib.contextmanager
def _scratch(tool: Tool, image: str, outdir: str) -> Iterator[None]:
    """A turn's restore directory; it, the image and the tool's repository are removed afterwards."""
    try:
        os.makedirs(outdir)
        yield
    finally:
        tool.clean()
        shutil.rmtree(outdir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)


def make_tool(name: str, runner: Runner, args: argparse.Namespace) -> Tool:
    tool = TOOL_CLASSES[name](runner, args.workdir_path)
    if isinstance(tool, Cowbackup):
        tool.chunk_size = args.chunk_size
    return tool


def one_turn(tool: Tool, base: str, size: int, rnd: int, seed: int) -> list[Sample]:
    """Full backup, rewrite, second backup, size, restore and compare, with a fresh image and repository."""
    image = os.path.join(tool.workdir, "disk.raw")
    outdir = os.path.join(tool.workdir, f"{tool.name}-restore")
    with _scratch(tool, image, outdir):
        copy_extents(base, image)
        tool.init()
        full = tool.backup(image)
        rewrite(image, size, seed * 1000 + rnd)
        second = tool.backup(image)
        repo_bytes = du_bytes(tool.repo)
        restore, restored = tool.restore(image, outdir)
        if not same_bytes(image, restored):
            raise BenchError(f"{tool.name}: WRONG RESTORE, {restored} differs from {image}")
    values = {
        "full MB/s": size / full.seconds / MB,
        "full s": full.seconds,
        "second s": second.seconds,
        "restore s": restore.seconds,
        "repo MiB": repo_bytes / MiB,
        "full RSS MiB": full.rss / MiB,
        "second RSS MiB": second.rss / MiB,
        "restore RSS MiB": restore.rss / MiB,
    }
    _progress(
        f"round {rnd} {tool.name:<9} full {full.seconds:6.2f} s ({values['full MB/s']:5.0f} MB/s)  "
        f"second {second.seconds:6.2f} s  restore {restore.seconds:6.2f} s  "
        f"repo {values['repo MiB']:6.0f} MiB  "
        f"RSS {full.rss / MiB:.0f}/{second.rss / MiB:.0f}/{restore.rss / MiB:.0f} MiB  ok"
    )
    return [Sample(tool.name, rnd, key, value) for key, value in values.items()]


def run_rounds(args: argparse.Namespace, runner: Runner, base: str, tools: list[str]) -> list[Sample]:
    samples: list[Sample] = []
    for rnd in range(1, args.rounds + 1):
        # Rotate who goes first, so that no tool always runs on a machine its predecessor just warmed.
        shift = (rnd - 1) % len(tools)
        for name in tools[shift:] + tools[:shift]:
            tool = make_tool(name, runner, args)
            samples += one_turn(tool, base, args.size, rnd, args.seed)
    return samples


def run_large(args: argparse.Namespace, runner: Runner, files: SystemFiles) -> dict[str, Any]:
    """cowbackup alone on a large sparse disk: full backup and restore, time and peak RSS."""
    workdir = args.workdir_path
    image = os.path.join(workdir, "large.raw")
    outdir = os.path.join(workdir, "large-restore")
    tool = make_tool("cowbackup", runner, args)
    share = args.large_data / args.large_size
    data_kinds = {k: v for k, v in MIX.items() if k != "hole"}
    mix = {k: share * v / sum(data_kinds.values()) for k, v in data_kinds.items()}
    mix["hole"] = 1.0 - share
    with _scratch(tool, image, outdir):
        layout = make_image(image, args.large_size, mix, args.seed + 7, files)
        tool.init()
        full = tool.backup(image)
        repo_bytes = du_bytes(tool.repo)
        restore, restored = tool.restore(image, outdir)
        if not same_sparse(image, restored):
            raise BenchError(f"cowbackup: WRONG RESTORE of the large disk, {restored} differs from {image}")
    result = {
        "layout": dataclasses.asdict(layout),
        "full_seconds": full.seconds,
        "full_rss": full.rss,
        "restore_seconds": restore.seconds,
        "restore_rss": restore.rss,
        "repo_bytes": repo_bytes,
    }
    _progress(
        f"large {args.large_size / GiB:.0f} GiB cowbackup  full {full.seconds:6.2f} s  restore "
        f"{restore.seconds:6.2f} s  RSS {full.rss / MiB:.0f}/{restore.rss / MiB:.0f} MiB  ok"
    )
    return result


# ---------------------------------------------------------------------- report


def summarize(samples: list[Sample], tools: list[str]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for metric in METRICS:
        entry: dict[str, Any] = {"higher_is_better": metric.higher_is_better}
        for tool in tools:
            values = [s.value for s in samples if s.tool == tool and s.metric == metric.key]
            if values:
                entry[tool] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        for peer in tools[1:]:
            if peer in entry and "cowbackup" in entry:
                entry[f"cowbackup/{peer}"] = entry["cowbackup"]["median"] / entry[peer]["median"]
        metrics[metric.key] = entry
    goals = []
    for goal in GOALS:
        m = metrics[goal.metric]
        if goal.peer in m and "cowbackup" in m:
            value = goal.value(m["cowbackup"]["median"], m[goal.peer]["median"])
            goals.append({"goal": goal.text, "value": value, "met": goal.met(value)})
    rss = [s.value for s in samples if s.tool == "cowbackup" and "RSS" in s.metric]
    if rss:
        goals.append(
            {
                "goal": f"cowbackup peak RSS <= {RSS_GOAL_MIB:.0f} MiB (max of all steps and rounds)",
                "value": max(rss),
                "met": max(rss) <= RSS_GOAL_MIB,
            }
        )
    return {"metrics": metrics, "goals": goals}


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def print_table(
    summary: dict[str, Any],
    layout: Layout,
    tools: list[str],
    args: argparse.Namespace,
    runner: Runner,
    large: dict[str, Any] | None,
) -> None:
    print(
        f"image: {layout.size / MiB:.0f} MiB in {layout.runs} runs: /usr files {layout.system / MiB:.0f} + "
        f"random {layout.random / MiB:.0f} + written zeros {layout.zero / MiB:.0f} + holes "
        f"{layout.hole / MiB:.0f} MiB; rewrite {REWRITE_SHARE:.0%} in {REWRITE_PIECE // KiB} KiB pieces; "
        f"medians of {args.rounds} round(s); RSS by {runner.method}; MB = 10^6 bytes"
    )
    header = f"{'metric':<16}" + "".join(f" {t:>9} {'min-max':>13}" for t in tools)
    header += "".join(f" {'/' + peer:>8}" for peer in tools[1:])
    print(header)
    print("-" * len(header))
    for key, entry in summary["metrics"].items():
        line = f"{key:<16}"
        for tool in tools:
            s = entry.get(tool)
            if s is None:
                line += f" {'-':>9} {'':>13}"
            else:
                line += f" {_number(s['median']):>9} {_number(s['min']) + '-' + _number(s['max']):>13}"
        for peer in tools[1:]:
            ratio = entry.get(f"cowbackup/{peer}")
            line += f" {ratio:>8.2f}" if ratio is not None else f" {'-':>8}"
        print(line)
    print("/peer = cowbackup / peer, of the medians")
    print("goals (issue 12):")
    for g in summary["goals"]:
        print(f"  {g['goal']:<62} {g['value']:8.2f}  {'ok' if g['met'] else 'MISSED'}")
    if large is not None:
        lay = large["layout"]
        data = lay["system"] + lay["random"] + lay["zero"]
        print(
            f"large disk ({lay['size'] / GiB:.0f} GiB sparse, {data / MiB:.0f} MiB allocated, "
            f"{lay['runs']} runs with the holes), cowbackup: full backup {large['full_seconds']:.2f} s, "
            f"peak RSS "
            f"{large['full_rss'] / MiB:.0f} MiB; restore {large['restore_seconds']:.2f} s, peak RSS "
            f"{large['restore_rss'] / MiB:.0f} MiB; repository {large['repo_bytes'] / MiB:.0f} MiB"
        )


# ---------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Compare cowbackup's repository backups with restic and borg on one disk image."
    )
    p.add_argument("--size", type=_image_size, default=GiB, help="image size (default 1G)")
    p.add_argument("--rounds", type=positive_int, default=3, help="rounds per tool (default 3)")
    p.add_argument(
        "--workdir", default="/dev/shm", help="where images and repositories go (default /dev/shm)"
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the layout, data and rewrites (default 1)")
    p.add_argument("--skip-peers", action="store_true", help="run cowbackup only")
    p.add_argument(
        "--chunk-size", type=size, default=0, help="cowbackup's repo init --chunk-size (default: its own, 4M)"
    )
    p.add_argument("--skip-large", action="store_true", help="leave out the large sparse disk scenario")
    p.add_argument("--large-size", type=_image_size, default=64 * GiB, help="large disk size (default 64G)")
    p.add_argument("--large-data", type=size, default=GiB, help="allocated part of it (default 1G)")
    p.add_argument(
        "--rss",
        choices=("auto", "time", "getrusage"),
        default="auto",
        help="peak RSS by /usr/bin/time -v or a getrusage wrapper (default: time if installed)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (base image) at exit")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.large_data <= args.large_size:
        _progress("repo_vs_peers: --large-data must be positive and at most --large-size")
        return 2
    tools = ["cowbackup"] if args.skip_peers else list(TOOLS)
    for tool in ("cmp", "du", *tools[1:]):
        if shutil.which(tool) is None:
            _progress(f"repo_vs_peers: '{tool}' not found (--skip-peers runs cowbackup alone)")
            return 2
    have_time = os.access("/usr/bin/time", os.X_OK)
    if args.rss == "time" and not have_time:
        _progress("repo_vs_peers: /usr/bin/time not found")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = tempfile.mkdtemp(prefix="cowbackup-repo-bench-", dir=args.workdir)
    args.workdir_path = workdir
    runner = Runner(workdir, have_time and args.rss != "getrusage")
    try:
        base = os.path.join(workdir, "base.raw")
        started = time.perf_counter()
        files = SystemFiles()
        layout = make_image(base, args.size, MIX, args.seed, files)
        _progress(
            f"image {base}: {layout.size / MiB:.0f} MiB, /usr files {layout.system / MiB:.0f} / random "
            f"{layout.random / MiB:.0f} / zeros {layout.zero / MiB:.0f} / holes {layout.hole / MiB:.0f} MiB "
            f"in {layout.runs} runs ({time.perf_counter() - started:.1f} s)"
        )
        if layout.system_wraps:
            _progress(
                f"note: the files of {', '.join(SYSTEM_DIRS)} were used {layout.system_wraps + 1} times"
            )
        samples = run_rounds(args, runner, base, tools)
        if not args.keep:
            os.unlink(base)  # its memory, before the large disk
        large = None if args.skip_large else run_large(args, runner, files)
        summary = summarize(samples, tools)
        if args.json:
            doc = {
                "layout": dataclasses.asdict(layout),
                "config": {k: v for k, v in vars(args).items() if k != "workdir_path"},
                "rss_method": runner.method,
                "samples": [dataclasses.asdict(s) for s in samples],
                "summary": summary,
                "large": large,
            }
            print(json.dumps(doc, indent=2))
        else:
            print_table(summary, layout, tools, args, runner, large)
        return 0
    except BenchError as err:
        _progress(f"repo_vs_peers: FAILED: {err}")
        return 1
    except KeyboardInterrupt:
        _progress("repo_vs_peers: interrupted")
        return 130
    finally:
        if args.keep:
            _progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
