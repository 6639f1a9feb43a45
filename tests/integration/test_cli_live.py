"""The QMP-client subcommands against both daemons: ``cowbackup daemon`` and ``qemu-storage-daemon``.

``backup --qmp``, ``jobs``, ``job pause|resume|cancel|set-speed``, ``qmp`` and their errors run as real
``cowbackup`` processes against a daemon started with the same qemu-storage-daemon options (a file node
``disk``, an NBD export, two monitors: qemu-storage-daemon answers one client per monitor, so the command
that follows a job uses ``qmp0`` and the ones that watch or steer it ``qmp1``).  The image has data,
written zeros and holes; nobody writes to it, so every target must equal it byte for byte.
``serve --qmp`` is covered at the end.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import KiB, MiB, RunCli, StartCli, build_image, layout, qemu_img_compare
from .nbd_peers import require
from .test_live_backup import DEADLINE, DaemonKind, DaemonProcess, start_daemon

__all__ = ["start_daemon"]  # the fixture, used here by name

SIZE = 16 * MiB
KINDS: list[DaemonKind] = ["cowbackup", "qemu-storage-daemon"]


@pytest.fixture(params=KINDS)
def daemon(
    request: pytest.FixtureRequest, workdir: Path, start_daemon: Callable[[DaemonKind, Path], DaemonProcess]
) -> DaemonProcess:
    """A daemon of each kind serving ``disk.img``; ``pristine.img`` is a copy to compare targets with."""
    require("qemu-img")
    segments = layout(SIZE, [(MiB, "data"), (768 * KiB, "hole"), (256 * KiB, "zero"), (2 * MiB, "hole")])
    image = build_image(workdir / "disk.img", SIZE, segments, seed=3).path
    shutil.copyfile(image, workdir / "pristine.img")
    kind: DaemonKind = request.param
    return start_daemon(kind, image)


def one_line_error(proc: Any, prefix: str) -> None:
    """Exit status 1, nothing on stdout, and one line on stderr that starts with ``prefix``."""
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(prefix), proc.stderr


def jobs(run_cli: RunCli, daemon: DaemonProcess) -> list[dict[str, Any]]:
    proc = run_cli("jobs", "--qmp", str(daemon.qmp2), "--json")
    assert proc.returncode == 0, proc.stderr
    result: list[dict[str, Any]] = json.loads(proc.stdout)
    return result


def wait_job(run_cli: RunCli, daemon: DaemonProcess, job_id: str, **expect: Any) -> dict[str, Any]:
    """Poll ``cowbackup jobs --json`` until job ``job_id`` has every ``expect``ed field."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        for job in jobs(run_cli, daemon):
            if job["id"] == job_id and all(job.get(k.replace("_", "-")) == v for k, v in expect.items()):
                return job
        time.sleep(0.05)
    pytest.fail(f"job {job_id} never had {expect}: {jobs(run_cli, daemon)}")


def node_names(run_cli: RunCli, socket: Path) -> list[str]:
    proc = run_cli("qmp", "--socket", str(socket), "query-named-block-nodes")
    assert proc.returncode == 0, proc.stderr
    return [node["node-name"] for node in json.loads(proc.stdout)]


# ---------------------------------------------------------------------------------------------- backup


def test_backup_identical_target(run_cli: RunCli, daemon: DaemonProcess, workdir: Path) -> None:
    target = workdir / "target.img"
    proc = run_cli("backup", "--qmp", str(daemon.qmp), "disk", str(target), "--json", "--speed", "100M")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0] == {"type": "start", "job": "backup-disk", "total": SIZE}
    assert lines[-1]["type"] == "result" and lines[-1]["bytes"] == SIZE
    (completed,) = [e["data"] for e in lines if e.get("event") == "BLOCK_JOB_COMPLETED"]
    assert completed["len"] == completed["offset"] == SIZE and "error" not in completed
    assert [line["current"] for line in lines if line["type"] == "progress"][-1] == SIZE
    qemu_img_compare(workdir / "pristine.img", target)
    assert node_names(run_cli, daemon.qmp) == ["disk"]  # the target node is gone
    assert jobs(run_cli, daemon) == []

    # A non-empty target is only overwritten with --force (checked before anything reaches the daemon).
    proc = run_cli("backup", "--qmp", str(daemon.qmp), "disk", str(target))
    assert proc.returncode == 2 and "use --force" in proc.stderr
    proc = run_cli("backup", "--qmp", str(daemon.qmp), "disk", str(target), "--force", "--job-id", "again")
    assert proc.returncode == 0, proc.stderr
    qemu_img_compare(workdir / "pristine.img", target)
    assert daemon.stop() == 0


def test_backup_to_nbd_target(
    run_cli: RunCli, start_cli: StartCli, daemon: DaemonProcess, workdir: Path
) -> None:
    """TARGET an NBD URI: the daemon connects to it (here a ``cowbackup serve``) and writes through it."""
    target = workdir / "nbd-target.img"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    sock = workdir / "target-nbd.sock"
    server = start_cli("serve", str(target), "--socket", str(sock))
    uri = server.wait_line(lambda line: line.startswith("nbd+unix://"))
    proc = run_cli("backup", "--qmp", str(daemon.qmp), "disk", uri)
    assert proc.returncode == 0, proc.stderr
    assert node_names(run_cli, daemon.qmp) == ["disk"]
    server.proc.send_signal(signal.SIGTERM)
    assert server.finish() == 0
    qemu_img_compare(workdir / "pristine.img", target)


def test_jobs_and_job_verbs(
    run_cli: RunCli, start_cli: StartCli, daemon: DaemonProcess, workdir: Path
) -> None:
    backup = start_cli(
        "backup",
        "--qmp",
        str(daemon.qmp),
        "disk",
        str(workdir / "t.img"),
        "--speed",
        "1M",
        "--json",
        "--job-id",
        "j1",
    )
    backup.wait_line(lambda line: '"type": "start"' in line)
    job = wait_job(run_cli, daemon, "j1", status="running")
    assert job["type"] == "backup" and job["speed"] == MiB and job["total-progress"] == SIZE

    table = run_cli("jobs", "--qmp", str(daemon.qmp2))
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == ["ID", "TYPE", "STATUS", "PROGRESS", "SPEED"]
    assert row.split()[:3] == ["j1", "backup", "running"] and row.endswith("1.0 MiB/s")

    for verb, status in (("pause", "paused"), ("resume", "running")):
        proc = run_cli("job", verb, "j1", "--qmp", str(daemon.qmp2))
        assert proc.returncode == 0 and proc.stdout == proc.stderr == ""
        wait_job(run_cli, daemon, "j1", status=status)
    proc = run_cli("job", "set-speed", "j1", "2M", "--qmp", str(daemon.qmp2))
    assert proc.returncode == 0, proc.stderr
    wait_job(run_cli, daemon, "j1", speed=2 * MiB)
    proc = run_cli("job", "set-speed", "j1", "--qmp", str(daemon.qmp2))
    assert proc.returncode == 2 and "needs SPEED" in proc.stderr

    # Cancelled by someone else: the following command says so, exits 1 and removes its target node.
    proc = run_cli("job", "cancel", "j1", "--qmp", str(daemon.qmp2))
    assert proc.returncode == 0, proc.stderr
    assert backup.finish() == 1
    assert backup.stderr() == "cowbackup: backup failed: job 'j1' was cancelled\n"
    assert any('"BLOCK_JOB_CANCELLED"' in line for line in backup.stdout_lines)
    assert jobs(run_cli, daemon) == []
    assert node_names(run_cli, daemon.qmp) == ["disk"]


def test_interrupt_cancels_the_job(
    run_cli: RunCli, start_cli: StartCli, daemon: DaemonProcess, workdir: Path
) -> None:
    backup = start_cli(
        "backup", "--qmp", str(daemon.qmp), "disk", str(workdir / "t.img"), "--speed", "1M", "--job-id", "j2"
    )
    wait_job(run_cli, daemon, "j2", status="running")
    backup.proc.send_signal(signal.SIGINT)
    assert backup.finish() == 130
    assert backup.stderr().endswith(
        f"interrupted by SIGINT: backup cancelled, '{workdir / 't.img'}' is incomplete\n"
    )
    assert jobs(run_cli, daemon) == []
    assert node_names(run_cli, daemon.qmp) == ["disk"]


# ---------------------------------------------------------------------------------------------- qmp


def test_qmp_command(run_cli: RunCli, daemon: DaemonProcess) -> None:
    proc = run_cli("qmp", "--socket", str(daemon.qmp), "query-version")
    assert proc.returncode == 0, proc.stderr
    version = json.loads(proc.stdout)
    assert version["qemu"]["major"] == 7 and version["qemu"]["minor"] == 2
    proc = run_cli("qmp", "--socket", str(daemon.qmp), "--pretty", "query-block-exports")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("[\n")
    (export,) = json.loads(proc.stdout)
    assert export["id"] == "e" and export["node-name"] == "disk"
    proc = run_cli("qmp", "--socket", str(daemon.qmp), "blockdev-del", '{"node-name": "nope"}')
    one_line_error(proc, "cowbackup: GenericError: Failed to find node with node-name='nope'")
    proc = run_cli("qmp", "--socket", str(daemon.qmp), "no-such-command")
    one_line_error(proc, "cowbackup: CommandNotFound: The command no-such-command has not been found")
    proc = run_cli("qmp", "--socket", str(daemon.qmp), "query-jobs", "{not json")
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr


def test_errors(run_cli: RunCli, daemon: DaemonProcess, workdir: Path) -> None:
    target = workdir / "t.img"
    proc = run_cli("backup", "--qmp", str(daemon.qmp), "nope", str(target))
    one_line_error(proc, "cowbackup: the daemon has no block node named 'nope'")
    assert not target.exists()
    proc = run_cli("job", "pause", "nope", "--qmp", str(daemon.qmp))
    one_line_error(proc, "cowbackup: GenericError: Job not found")
    proc = run_cli("job", "set-speed", "nope", "1M", "--qmp", str(daemon.qmp))
    one_line_error(proc, "cowbackup: DeviceNotActive: Block job 'nope' not found")
    proc = run_cli("jobs", "--qmp", str(workdir / "missing.sock"))
    one_line_error(proc, f"cowbackup: cannot connect to the QMP socket '{workdir / 'missing.sock'}'")
    proc = run_cli("backup", "--qmp", str(daemon.qmp), "disk", "nbd+unix:///x?socket=/nonexistent.sock")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    proc = run_cli("backup", "--qmp", str(daemon.qmp), "disk", str(target), "--job-id", "1bad")
    assert proc.returncode == 2 and "invalid job id" in proc.stderr
    assert node_names(run_cli, daemon.qmp) == ["disk"]  # nothing left behind


# ---------------------------------------------------------------------------------------------- serve


def test_serve_qmp(run_cli: RunCli, start_cli: StartCli, workdir: Path) -> None:
    require("qemu-img")
    segments = layout(SIZE, [(MiB, "data"), (3 * MiB, "hole")])
    image = build_image(workdir / "served.img", SIZE, segments, seed=5).path
    qmp = workdir / "serve-qmp.sock"
    server = start_cli("serve", str(image), "--socket", str(workdir / "nbd.sock"), "--qmp", str(qmp))
    server.wait_line(lambda line: line.startswith("nbd+unix://"))
    target = workdir / "target.img"
    proc = run_cli("backup", "--qmp", str(qmp), "disk", str(target))
    assert proc.returncode == 0, proc.stderr
    qemu_img_compare(image, target)
    proc = run_cli("qmp", "--socket", str(qmp), "quit")  # stops the server like Ctrl-C
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {}
    assert server.finish() == 0
    assert not qmp.exists()
