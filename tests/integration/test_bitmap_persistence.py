"""Persistent bitmaps of a raw image across ``cowbackup daemon`` restarts (the sidecar file).

A clean stop (SIGTERM) keeps a persistent bitmap with every write it recorded; a SIGKILL leaves it
``inconsistent``: an incremental backup from it is refused with QEMU's message instead of copying too
little, and removing it is the way out. qemu-io writes through the daemon's NBD export.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from .conftest import RunCli
from .nbd_peers import require
from .test_cli_live import one_line_error
from .test_live_backup import DEADLINE, DaemonProcess, start_daemon

__all__ = ["start_daemon"]  # the fixture, used here by name

C = 64 * 1024
SIZE = 4 * 1024 * 1024


def write(d: DaemonProcess, *clusters: int) -> None:
    args = [a for n in clusters for a in ("-c", f"write -P 0x7{n % 10} {n * C + 10} 100")]
    proc = subprocess.run(
        ["qemu-io", "-f", "raw", *args, d.uri], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0 and "failed" not in proc.stdout, proc.stdout + proc.stderr


def rows(run_cli: RunCli, d: DaemonProcess) -> list[dict[str, Any]]:
    proc = run_cli("bitmap", "list", "--qmp", str(d.qmp), "--json")
    assert proc.returncode == 0, proc.stderr
    result: list[dict[str, Any]] = json.loads(proc.stdout)
    return [{k: v for k, v in row.items() if k != "node"} for row in result]


def test_a_clean_restart_keeps_the_bitmap_and_sigkill_makes_it_inconsistent(
    run_cli: RunCli, start_daemon: Any, workdir: Path
) -> None:
    require("qemu-io")
    image = workdir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    d: DaemonProcess = start_daemon("cowbackup", image)
    q = str(d.qmp)
    assert run_cli("bitmap", "add", "--qmp", q, "disk", "b0", "--persistent").returncode == 0
    write(d, 2, 5)
    assert d.stop() == 0

    d = start_daemon("cowbackup", image)
    base = {"name": "b0", "granularity": C, "recording": True, "busy": False, "persistent": True}
    assert rows(run_cli, d) == [{**base, "count": 2 * C}]
    write(d, 7)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(DEADLINE)

    d = start_daemon("cowbackup", image)
    # The bits of the last clean stop, and a mark that they may be missing writes.
    assert rows(run_cli, d) == [{**base, "count": 2 * C, "inconsistent": True}]
    target = workdir / "inc.img"
    incremental = ("backup", "--qmp", str(d.qmp), "disk", str(target), "--incremental", "--bitmap", "b0")
    one_line_error(
        run_cli(*incremental), "cowbackup: GenericError: Bitmap 'b0' is inconsistent and cannot be used"
    )
    # --fallback-full: a full backup instead, and b0 anew from its instant (still persistent).
    proc = run_cli(*incremental, "--fallback-full", "--force")
    assert proc.returncode == 0, proc.stderr
    assert "bitmap 'b0' is inconsistent: taking a full backup instead" in proc.stderr
    assert target.read_bytes() == image.read_bytes()
    assert rows(run_cli, d) == [{**base, "count": 0}]
    write(d, 9)
    proc = run_cli(*incremental, "--fallback-full", "--force")
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    data = target.read_bytes()
    assert data[9 * C : 10 * C] == image.read_bytes()[9 * C : 10 * C] and data[: 9 * C] == bytes(9 * C)

    assert run_cli("bitmap", "remove", "--qmp", str(d.qmp), "disk", "b0").returncode == 0
    assert rows(run_cli, d) == []
    assert d.stop() == 0
    assert not (workdir / "disk.img.cowbackup-bitmaps").exists()
