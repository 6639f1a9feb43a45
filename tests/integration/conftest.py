"""Fixtures for running the real ``cowbackup`` command on real files.

* ``workdir``: a fresh directory, in /dev/shm when there is one (fast, and tmpfs reports holes exactly).
* :func:`build_image`: a raw image from a layout of data (deterministic random bytes), explicit zero runs
  and holes, so tests know exactly which bytes are data.
* ``run_cli``: ``python -m cowbackup ARGS`` to completion, with a timeout (a hung command fails the test).
* ``start_cli``: ``python -m cowbackup ARGS`` in the background, to signal it; its stdout lines arrive
  through a reader thread and are waited for with a deadline.  Every process started is killed at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import pytest
from qemu.qmp import QMPClient
from qemu.qmp.protocol import ConnectError

from .ceph_fixtures import ceph, fault_proxy, s3_env  # noqa: F401 (fixtures of the S3 tests)

KiB = 1024
MiB = 1024 * KiB

#: Longest a cowbackup command may run in these tests before it counts as hung.
CLI_TIMEOUT = 60.0

_SRC = Path(__file__).resolve().parents[2] / "src"

# ---------------------------------------------------------------------------------------------- images

SegmentKind = Literal["data", "zero", "hole"]


@dataclass(frozen=True)
class Segment:
    offset: int
    length: int
    kind: SegmentKind

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class Image:
    """A raw image built by :func:`build_image` and the layout it was built from."""

    path: Path
    size: int
    segments: tuple[Segment, ...]

    @property
    def data_bytes(self) -> int:
        """Bytes written with (non-zero) data: what a sparse copy must allocate at most."""
        return sum(s.length for s in self.segments if s.kind == "data")

    def data_ranges(self) -> list[tuple[int, int]]:
        """``(start, end)`` of the data segments, adjacent ones merged."""
        merged: list[tuple[int, int]] = []
        for seg in sorted(self.segments, key=lambda s: s.offset):
            if seg.kind != "data":
                continue
            if merged and merged[-1][1] == seg.offset:
                merged[-1] = (merged[-1][0], seg.end)
            else:
                merged.append((seg.offset, seg.end))
        return merged


def layout(size: int, pattern: Sequence[tuple[int, SegmentKind]]) -> tuple[Segment, ...]:
    """Repeat ``pattern`` (lengths and kinds) from offset 0 until ``size``; the last segment is cut."""
    assert sum(length for length, _ in pattern) > 0
    segments: list[Segment] = []
    offset = 0
    while offset < size:
        for length, kind in pattern:
            n = min(length, size - offset)
            if n <= 0:
                break
            segments.append(Segment(offset, n, kind))
            offset += n
    return tuple(segments)


def build_image(path: Path, size: int, segments: Sequence[Segment], seed: int) -> Image:
    """Create a sparse raw image: random data where asked, written zeros for zero runs, holes elsewhere."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for seg in segments:
            if seg.kind == "hole":
                continue
            f.seek(seg.offset)
            for pos in range(0, seg.length, 4 * MiB):
                n = min(4 * MiB, seg.length - pos)
                f.write(rng.randbytes(n) if seg.kind == "data" else bytes(n))
    return Image(path, size, tuple(segments))


def random_file(path: Path, size: int, seed: int) -> Path:
    """A file of ``size`` random bytes (all data, nothing for a copy to skip)."""
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


# ---------------------------------------------------------------------------------------------- checks


def allocated(path: Path) -> int:
    """Bytes the file system allocates for ``path``."""
    return os.stat(path).st_blocks * 512


def assert_same_content(a: Path, b: Path) -> None:
    """The two files have the same size and bytes; on a difference, name the first differing MiB."""
    assert os.path.getsize(a) == os.path.getsize(b), f"sizes differ: {a} vs {b}"
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            assert x == y, f"{a} and {b} differ in the MiB at offset {offset}"
            if not x:
                return
            offset += len(x)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", *args], capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
    )


def qemu_img_compare(a: Path, b: Path) -> None:
    """``qemu-img compare`` (strict raw vs raw) says the images are identical."""
    proc = qemu_img("compare", "-f", "raw", "-F", "raw", str(a), str(b))
    assert proc.returncode == 0, f"qemu-img compare: {proc.stdout}{proc.stderr}"


def mapped_data(path: Path) -> list[tuple[int, int]]:
    """``(start, end)`` of the extents ``qemu-img map`` reports as data."""
    proc = qemu_img("map", "--output=json", "-f", "raw", str(path))
    assert proc.returncode == 0, proc.stderr
    extents: list[dict[str, Any]] = json.loads(proc.stdout)
    return [(e["start"], e["start"] + e["length"]) for e in extents if e["data"]]


@pytest.fixture(scope="session")
def need_qemu_img() -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed")


# ---------------------------------------------------------------------------------------------- dirs


def _scratch_base() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A fresh directory on tmpfs if possible (``tmp_path`` otherwise), removed afterwards."""
    base = _scratch_base()
    if base is None:
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="cowbackup-test-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def module_workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Like ``workdir``, shared by a module's tests (for read-only source images built once)."""
    base = _scratch_base()
    if base is None:
        yield tmp_path_factory.mktemp("images")
        return
    path = Path(tempfile.mkdtemp(prefix="cowbackup-images-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the CLI


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cowbackup", *args]


def cli_env() -> dict[str, str]:
    """The environment for cowbackup: this checkout's sources first, a wide fake terminal for rich."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_SRC), env.get("PYTHONPATH", "")) if p)
    env["COLUMNS"] = "200"
    return env


class RunCli(Protocol):
    def __call__(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture
def run_cli(workdir: Path) -> RunCli:
    """Run ``cowbackup ARGS`` in ``workdir`` to completion; stdout and stderr are captured as text."""

    def run(*args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cli_command(*args),
            cwd=workdir,
            env=cli_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run


class CliProcess:
    """``cowbackup ARGS`` running in the background.

    A thread moves stdout lines to a queue (so waiting for a line can have a deadline); stderr goes to a
    file, read when the process has ended.
    """

    def __init__(self, args: Sequence[str], cwd: Path, stderr_path: Path) -> None:
        self._stderr_path = stderr_path
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.stdout_lines: list[str] = []
        with open(stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                cli_command(*args),
                cwd=cwd,
                env=cli_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self._reader = threading.Thread(target=self._read, name="cowbackup-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = CLI_TIMEOUT) -> str:
        """Return the first stdout line (without its newline) that satisfies ``predicate``.

        Fails the test if stdout ends first or the deadline passes.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no matching line from cowbackup within {timeout} s: {self.stdout_lines}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"cowbackup ended before a matching line: {self.stdout_lines} {self.stderr()}")
            self.stdout_lines.append(line.rstrip("\n"))
            if predicate(self.stdout_lines[-1]):
                return self.stdout_lines[-1]

    def finish(self, timeout: float = CLI_TIMEOUT) -> int:
        """Wait for the exit (failing the test after ``timeout``); collect the rest of stdout."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"cowbackup did not exit within {timeout} s")
        self._reader.join(timeout)
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.stdout_lines.append(line.rstrip("\n"))
        return code

    def stderr(self) -> str:
        return self._stderr_path.read_text()

    def close(self) -> None:
        """Kill the process if it still runs; safe to call twice."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=CLI_TIMEOUT)
        self._reader.join(CLI_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class StartCli(Protocol):
    def __call__(self, *args: str) -> CliProcess: ...


@pytest.fixture
def start_cli(workdir: Path) -> Iterator[StartCli]:
    """Start ``cowbackup ARGS`` in the background; every process is killed at teardown."""
    started: list[CliProcess] = []

    def start(*args: str) -> CliProcess:
        proc = CliProcess(args, workdir, workdir / f"stderr-{len(started)}.txt")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


async def wait_listening(
    path: Path, proc: asyncio.subprocess.Process, what: str, limit: float = 10.0
) -> None:
    """Wait until a Unix socket accepts connections (the file appears at bind(), before listen(): a
    connect in between is refused), failing the test if ``proc`` exits or ``limit`` seconds pass."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        try:
            _, writer = await asyncio.open_unix_connection(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            if proc.returncode is not None or loop.time() > deadline:
                pytest.fail(f"{what} did not start listening on {path}")
            await asyncio.sleep(0.01)  # polling for the listener, with a deadline
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


async def connect_qmp(client: QMPClient, path: Path, limit: float = 10.0) -> None:
    """Connect ``client`` to the monitor at ``path`` (after :func:`wait_listening`), with a deadline.

    qemu-storage-daemon serves one client per monitor socket and may still be closing the connection of
    wait_listening()'s probe when the next one comes: that one then reads EOF instead of the greeting.
    Such a connection is retried, as is one refused while the monitor is still busy with the probe (its
    listen backlog is one); anything else, or the deadline, fails.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        try:
            await asyncio.wait_for(client.connect(str(path)), max(deadline - loop.time(), 0.1))
            return
        except ConnectError as err:
            if not isinstance(err.exc, EOFError | ConnectionRefusedError) or loop.time() > deadline:
                raise
        await asyncio.sleep(0.05)  # polling for the monitor to be free, with a deadline
