"""The live point-in-time backup, end to end: a daemon serving a disk that qemu-io writes during the backup.

::

    cowbackup daemon --blockdev file,disk,discard=unmap --export nbd,disk,writable --monitor (2 sockets)
         ^  NBD: qemu-io, one process at a time, each with ~100 -c commands: unaligned pattern writes,
         |       zero writes (with and without MAY_UNMAP), discards of whole 4 KiB blocks
         +  QMP: blockdev-add target, blockdev-backup at 8 MiB/s (the qemu.qmp client, or
                 `cowbackup backup --qmp`), query-jobs: still running before the first and after the last
                 write, then block-job-set-speed 0 to finish

    target == the image copied before the backup started        (qemu-img compare)
    disk   == that copy with every operation applied, in order  (qemu-img compare)

The test runs against both daemons, started with the same options.  The order of the operations is
known because one qemu-io runs at a time and runs its commands one after the other.  Discards are exact
too, but differ between the daemons:

* ``cowbackup daemon``: the file node has ``discard=unmap`` and punches a hole for the range it gets, and a
  whole-block discard of a tmpfs file reads back as zeros, so the model zeroes them.
* ``qemu-storage-daemon`` (7.2): the backup puts a copy-before-write filter above ``disk``, and QEMU opens
  that filter without ``BDRV_O_UNMAP``, so every discard that arrives while the job runs succeeds and
  changes nothing (without a job the same discard does punch the hole).  Every operation lands while the
  job runs (asserted), so the model leaves discarded ranges as they were.

The helpers here (daemon processes of either kind, a QMP client, waiting with deadlines) are shared with
test_cli_live.py.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from .conftest import (
    CLI_TIMEOUT,
    KiB,
    MiB,
    StartCli,
    build_image,
    cli_command,
    cli_env,
    layout,
    qemu_img_compare,
)
from .nbd_peers import require

#: Longest a daemon may take to start or stop, and a job to reach a state.
DEADLINE = 30.0

DaemonKind = Literal["cowbackup", "qemu-storage-daemon"]

# ---------------------------------------------------------------------------------------------- daemons


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll ``predicate`` until it holds; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.02)


@dataclass
class DaemonProcess:
    """A running ``cowbackup daemon`` or ``qemu-storage-daemon`` with node ``disk`` and two monitors.

    qemu-storage-daemon serves one client per monitor at a time: ``qmp`` is for the client that starts a
    job, ``qmp2`` for a second one that watches or controls it.
    """

    kind: DaemonKind
    proc: subprocess.Popen[bytes]
    qmp: Path
    qmp2: Path
    nbd: Path
    log: Path

    @property
    def uri(self) -> str:
        return f"nbd+unix:///disk?socket={self.nbd}"

    def stop(self) -> int:
        """SIGTERM and wait; the exit status (the fixture kills a daemon that does not stop)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.kind} did not stop within {DEADLINE} s")


def daemon_argv(kind: DaemonKind, image: Path, workdir: Path, blockdevs: Sequence[str] = ()) -> list[str]:
    """The same qemu-storage-daemon options for both daemons: a file node (or the ``--blockdev``
    options ``blockdevs``, one of them node ``disk``), an NBD export of ``disk``, two monitors."""
    nodes = list(blockdevs) or [f"driver=file,node-name=disk,filename={image},discard=unmap"]
    options = [
        *(a for node in nodes for a in ("--blockdev", node)),
        "--nbd-server",
        f"addr.type=unix,addr.path={workdir / 'nbd.sock'}",
        "--export",
        "type=nbd,id=e,node-name=disk,writable=on",
    ]
    for n in (0, 1):
        options += [
            "--chardev",
            f"socket,id=m{n},path={workdir / f'qmp{n}.sock'},server=on,wait=off",
            "--monitor",
            f"chardev=m{n}",
        ]
    options += ["--pidfile", str(workdir / "daemon.pid")]
    if kind == "cowbackup":
        return cli_command("daemon", *options)
    return ["qemu-storage-daemon", *options]


def launch(
    kind: DaemonKind, argv: list[str], workdir: Path, started: list[subprocess.Popen[bytes]]
) -> DaemonProcess:
    """Start a daemon with ``argv`` (options as :func:`daemon_argv` lays them out: monitors ``qmp0``,
    ``qmp1``, NBD socket, pidfile in ``workdir``); ready once its pidfile names it.  The process is
    appended to ``started``, for the caller's teardown."""
    if kind == "qemu-storage-daemon":
        require("qemu-storage-daemon")
    log = workdir / f"{kind}.log"
    pidfile = workdir / "daemon.pid"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=workdir, env=cli_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    started.append(proc)

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"{kind} exited ({proc.returncode}) at start-up: {log.read_text()}")
        return pidfile.exists() and pidfile.read_text().strip() == str(proc.pid)

    wait_until(ready, f"{kind} pidfile")
    return DaemonProcess(kind, proc, workdir / "qmp0.sock", workdir / "qmp1.sock", workdir / "nbd.sock", log)


def kill_all(started: list[subprocess.Popen[bytes]]) -> None:
    """Kill every daemon of ``started`` still running (a test's teardown)."""
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(DEADLINE)


@pytest.fixture
def start_daemon(workdir: Path) -> Iterator[Callable[[DaemonKind, Path], DaemonProcess]]:
    """Start a daemon on an image; ready once its pidfile exists.  Every daemon is killed at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(kind: DaemonKind, image: Path) -> DaemonProcess:
        return launch(kind, daemon_argv(kind, image, workdir), workdir, started)

    yield start
    kill_all(started)


@pytest.fixture
def qmp_connect() -> Iterator[Callable[[Path], QEMUMonitorProtocol]]:
    """Connect the qemu.qmp (synchronous) client to a monitor; every client is closed at teardown."""
    clients: list[QEMUMonitorProtocol] = []

    def connect(path: Path) -> QEMUMonitorProtocol:
        client = QEMUMonitorProtocol(str(path))
        client.settimeout(DEADLINE)
        client.connect()
        clients.append(client)
        return client

    yield connect
    for client in clients:
        # close() re-raises what ended the session: EOF when the test stopped the daemon first.
        with contextlib.suppress(QMPError, OSError, EOFError):
            client.close()


def job_info(client: QEMUMonitorProtocol, job_id: str) -> dict[str, Any] | None:
    """The job's ``query-jobs`` entry, or None."""
    jobs: Any = client.cmd("query-jobs")
    return next((dict(job) for job in jobs if job["id"] == job_id), None)


def wait_event(client: QEMUMonitorProtocol, name: str, job_id: str) -> dict[str, Any]:
    """The data of the next event ``name`` about ``job_id`` (earlier events are dropped)."""
    deadline = time.monotonic() + DEADLINE
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            event = client.pull_event(wait=remaining)
        except TimeoutError:
            break
        assert event is not None
        data = dict(event.get("data", {}))
        if event["event"] == name and job_id in (data.get("device"), data.get("id")):
            return data
    pytest.fail(f"no {name} for {job_id} within {DEADLINE} s")


# ---------------------------------------------------------------------------------------------- writers


@dataclass(frozen=True)
class Op:
    """One qemu-io command: ``write`` (pattern byte), ``zero`` (write -z, -u: may unmap), ``discard``."""

    kind: Literal["write", "zero", "zero-unmap", "discard"]
    offset: int
    length: int
    pattern: int = 0

    def command(self) -> str:
        if self.kind == "write":
            return f"write -P {self.pattern:#x} {self.offset} {self.length}"
        if self.kind == "zero":
            return f"write -z {self.offset} {self.length}"
        if self.kind == "zero-unmap":
            return f"write -z -u {self.offset} {self.length}"
        return f"discard {self.offset} {self.length}"

    def apply(self, image: bytearray, daemon: DaemonKind) -> None:
        """What the operation does to ``image`` on ``daemon`` while a backup job runs (see the top)."""
        if self.kind == "discard" and daemon == "qemu-storage-daemon":
            return  # the copy-before-write filter drops it
        fill = self.pattern if self.kind == "write" else 0
        image[self.offset : self.offset + self.length] = bytes([fill]) * self.length


def random_ops(rng: random.Random, size: int, count: int) -> list[Op]:
    """Writes of any offset and length (1 byte to 256 KiB), zero writes likewise, 4 KiB-block discards."""
    ops: list[Op] = []
    for n in range(count):
        roll = rng.random()
        if roll < 0.15:
            length = rng.randrange(1, 64) * 4 * KiB
            offset = rng.randrange(0, (size - length) // (4 * KiB)) * 4 * KiB
            ops.append(Op("discard", offset, length))
            continue
        length = rng.choice([1, 511, 4097, rng.randrange(1, 256 * KiB), rng.randrange(1, 8 * KiB)])
        offset = rng.randrange(0, size - length)
        if roll < 0.25:
            ops.append(Op("zero", offset, length))
        elif roll < 0.30:
            ops.append(Op("zero-unmap", offset, length))
        else:
            ops.append(Op("write", offset, length, pattern=1 + n % 255))
    return ops


def run_qemu_io(uri: str, ops: Sequence[Op]) -> None:
    """One qemu-io process running ``ops`` in order over NBD; every command must report success."""
    argv = ["qemu-io", "-f", "raw"]
    for op in ops:
        argv += ["-c", op.command()]
    proc = subprocess.run([*argv, uri], capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = sum(line.startswith(("wrote ", "discard ")) for line in proc.stdout.splitlines())
    assert done == len(ops), f"{done} of {len(ops)} qemu-io commands succeeded: {proc.stdout}{proc.stderr}"


# ---------------------------------------------------------------------------------------------- the test

SIZE = 128 * MiB
#: Slow enough that the job is still running after the writers; set to 0 afterwards.
SPEED = 8 * MiB
BATCHES, PER_BATCH = 8, 100


def make_image(workdir: Path) -> Path:
    segments = layout(SIZE, [(3 * MiB, "data"), (MiB, "hole"), (512 * KiB, "zero"), (1536 * KiB, "hole")])
    return build_image(workdir / "disk.img", SIZE, segments, seed=7).path


def create_target(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cowbackup", "qemu-storage-daemon"])
@pytest.mark.parametrize("client", ["qemu.qmp", "cowbackup backup --qmp"])
def test_live_backup_is_point_in_time(
    kind: DaemonKind,
    client: str,
    workdir: Path,
    start_daemon: Callable[[DaemonKind, Path], DaemonProcess],
    qmp_connect: Callable[[Path], QEMUMonitorProtocol],
    start_cli: StartCli,
) -> None:
    require("qemu-io", "qemu-img")
    image = make_image(workdir)
    start_copy = workdir / "start.img"
    shutil.copyfile(image, start_copy)  # nobody writes before the backup starts
    target = workdir / "target.img"
    daemon = start_daemon(kind, image)
    watcher = qmp_connect(daemon.qmp2)

    if client == "qemu.qmp":
        qmp = qmp_connect(daemon.qmp)
        create_target(target)
        qmp.cmd("blockdev-add", **{"driver": "file", "node-name": "tgt", "filename": str(target)})
        qmp.cmd(
            "blockdev-backup",
            **{"job-id": "live", "device": "disk", "target": "tgt", "sync": "full", "speed": SPEED},
        )
        backup = None
    else:
        backup = start_cli(
            "backup",
            "--qmp",
            str(daemon.qmp),
            "disk",
            str(target),
            "--speed",
            "8M",
            "--json",
            "--job-id",
            "live",
        )
        backup.wait_line(lambda line: '"type": "start"' in line)

    # Some of the image is copied (writes land on both sides of the copy front), the job runs.
    wait_until(lambda: (job_info(watcher, "live") or {}).get("current-progress", 0) > 0, "copy progress")
    before = job_info(watcher, "live")
    assert before is not None and before["status"] == "running"

    rng = random.Random(1234)
    ops = random_ops(rng, SIZE, BATCHES * PER_BATCH)
    for n in range(BATCHES):
        run_qemu_io(daemon.uri, ops[n * PER_BATCH : (n + 1) * PER_BATCH])

    after = job_info(watcher, "live")
    assert after is not None and after["status"] == "running", "the backup ended before the last write"
    assert after["current-progress"] < after["total-progress"]
    watcher.cmd("block-job-set-speed", device="live", speed=0)

    if backup is None:
        completed = wait_event(qmp, "BLOCK_JOB_COMPLETED", "live")
        assert "error" not in completed and completed["offset"] == SIZE
        wait_until(lambda: job_info(watcher, "live") is None, "job dismissed")
        qmp.cmd("blockdev-del", **{"node-name": "tgt"})
    else:
        assert backup.finish() == 0, backup.stderr()
        assert '"type": "result"' in backup.stdout_lines[-1]
    nodes: Any = watcher.cmd("query-named-block-nodes")
    assert [node["node-name"] for node in nodes] == ["disk"]
    assert daemon.stop() == 0

    qemu_img_compare(start_copy, target)  # the disk as it was at the start, byte for byte
    expected = bytearray(start_copy.read_bytes())
    for op in ops:
        op.apply(expected, kind)
    expected_path = workdir / "expected.img"
    expected_path.write_bytes(expected)
    qemu_img_compare(expected_path, image)  # and the disk holds every write
    counts = {name: sum(op.kind == name for op in ops) for name in ("write", "zero", "zero-unmap", "discard")}
    sys.stderr.write(
        f"live backup ({kind}, {client}): {len(ops)} operations {counts} landed while the job ran, "
        f"copy progress {before['current-progress'] // MiB} -> {after['current-progress'] // MiB} of "
        f"{SIZE // MiB} MiB\n"
    )
