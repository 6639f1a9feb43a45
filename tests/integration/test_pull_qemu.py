"""``cowbackup pull`` against qemu-storage-daemon whose disk the guest writes through an NBD export.

QEMU refuses snapshot-access while another user may write the node ("Permission conflict"), so pull
fleeces there the way libvirt does on QEMU 7.2 (a qcow2 scratch over the disk, a sync=none job).  The
view equals the disk at the instant, whatever the guest writes meanwhile; the daemon's NBD server, already
running, is reused only where the view really is reachable.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from .conftest import KiB, MiB, RunCli, StartCli, build_image, layout
from .test_live_backup import DaemonKind, DaemonProcess, start_daemon

__all__ = ["start_daemon"]  # the fixture, used here by name

SIZE = 8 * MiB


def qemu(start_daemon: Callable[[DaemonKind, Path], DaemonProcess], workdir: Path) -> DaemonProcess:
    segments = layout(SIZE, [(MiB, "data"), (512 * KiB, "hole"), (256 * KiB, "zero"), (MiB, "data")])
    image = build_image(workdir / "disk.img", SIZE, segments, seed=9).path
    return start_daemon("qemu-storage-daemon", image)


def nodes(run_cli: RunCli, daemon: DaemonProcess) -> list[str]:
    proc = run_cli("qmp", "--socket", str(daemon.qmp2), "query-named-block-nodes")
    assert proc.returncode == 0, proc.stderr
    return [n["node-name"] for n in json.loads(proc.stdout)]


def test_pull_beside_the_guests_writable_export(
    start_daemon: Callable[[DaemonKind, Path], DaemonProcess],
    start_cli: StartCli,
    run_cli: RunCli,
    workdir: Path,
) -> None:
    daemon = qemu(start_daemon, workdir)
    scratch, until = workdir / "scratch.qcow2", workdir / "release"
    at_t = (workdir / "disk.img").read_bytes()
    pull = start_cli(
        "pull", "--qmp", str(daemon.qmp), "disk", "--scratch", str(scratch), "--socket", str(daemon.nbd),
        "--until-file", str(until),
    )  # fmt: skip
    uri = pull.wait_line(lambda line: line.startswith("nbd+unix://"))
    assert uri == f"nbd+unix:///disk-snapshot?socket={daemon.nbd}"
    guest = [
        "qemu-io",
        "-f",
        "raw",
        "-c",
        f"write -P 0x71 0 {MiB}",
        "-c",
        f"write -z {2 * MiB} {MiB}",
        daemon.uri,
    ]
    subprocess.run(guest, check=True, capture_output=True)
    copy = workdir / "copy.img"
    subprocess.run(["nbdcopy", uri, str(copy)], check=True, capture_output=True)
    assert copy.read_bytes() == at_t and (workdir / "disk.img").read_bytes() != at_t
    until.touch()
    assert pull.finish() == 0, pull.stderr()
    assert not [n for n in nodes(run_cli, daemon) if n.startswith("pull-")]
    assert not scratch.exists()


def test_pull_refuses_an_address_where_the_running_server_is_not(
    start_daemon: Callable[[DaemonKind, Path], DaemonProcess], run_cli: RunCli, workdir: Path
) -> None:
    daemon = qemu(start_daemon, workdir)
    scratch = workdir / "scratch.qcow2"
    elsewhere = workdir / "elsewhere.sock"
    proc = run_cli(
        "pull", "--qmp", str(daemon.qmp), "disk", "--scratch", str(scratch), "--socket", str(elsewhere),
        "--until-file", str(workdir / "never"),
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == ""
    assert "already runs an NBD server" in proc.stderr and str(elsewhere) in proc.stderr
    assert not [n for n in nodes(run_cli, daemon) if n.startswith("pull-")]
    assert not scratch.exists()
