"""``cowbackup bitmap`` and ``cowbackup backup --qmp --incremental`` against both daemons.

A daemon of each kind serves ``disk`` (a file node) over NBD (test_cli_live's fixture). The bitmap
commands run as real ``cowbackup`` processes; qemu-io writes through the export; an incremental backup
must then hold exactly the written clusters (everything else stays a hole of the new target) and leave
the bitmap clean.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import RunCli, mapped_data
from .nbd_peers import require
from .test_cli_live import daemon, one_line_error
from .test_live_backup import DaemonProcess, start_daemon

__all__ = ["daemon", "start_daemon"]  # the fixtures, used here by name

C = 64 * 1024


def bitmap_rows(run_cli: RunCli, d: DaemonProcess, *node: str) -> list[dict[str, Any]]:
    proc = run_cli("bitmap", "list", "--qmp", str(d.qmp), *node, "--json")
    assert proc.returncode == 0, proc.stderr
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    return rows


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_bitmap_commands_and_an_incremental_backup(
    run_cli: RunCli, daemon: DaemonProcess, workdir: Path
) -> None:
    require("qemu-io")
    q = str(daemon.qmp)
    assert ok(run_cli("bitmap", "add", "--qmp", q, "disk", "b0")) == ""
    ok(run_cli("bitmap", "add", "--qmp", q, "disk", "fine", "--granularity", "4K", "--disabled"))
    one_line_error(
        run_cli("bitmap", "add", "--qmp", q, "disk", "b0"),
        "cowbackup: GenericError: Bitmap already exists: b0",
    )
    persistent = run_cli("bitmap", "add", "--qmp", q, "disk", "p", "--persistent")
    if daemon.kind == "qemu-storage-daemon":  # only qcow2 images store bitmaps there
        message = "cowbackup: GenericError: Can't store persistent bitmaps to disk: Operation not supported"
        one_line_error(persistent, message)
    else:  # ours: a sidecar next to the raw image
        ok(persistent)
        ok(run_cli("bitmap", "remove", "--qmp", q, "disk", "p"))
        assert not (workdir / "disk.img.cowbackup-bitmaps").exists()
    one_line_error(
        run_cli("bitmap", "clear", "--qmp", q, "disk", "nope"),
        "cowbackup: GenericError: Dirty bitmap 'nope' not found",
    )
    one_line_error(
        run_cli("bitmap", "list", "--qmp", q, "nope"), "cowbackup: the daemon has no block node named 'nope'"
    )

    writes = [
        ("write -P 0x61 65536 65536", {1}),
        ("write -P 0x62 1048676 100", {16}),
        ("write -z 3145728 4096", {48}),
    ]
    args = [a for cmd, _ in writes for a in ("-c", cmd)]
    proc = subprocess.run(
        ["qemu-io", "-f", "raw", *args, daemon.uri], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0 and "failed" not in proc.stdout, proc.stdout + proc.stderr
    dirty = {1, 16, 48}

    rows = bitmap_rows(run_cli, daemon, "disk")
    assert [(r["node"], r["name"], r["count"], r["granularity"], r["recording"]) for r in rows] == [
        ("disk", "fine", 0, 4096, False),
        ("disk", "b0", len(dirty) * C, C, True),
    ]
    table = ok(run_cli("bitmap", "list", "--qmp", q)).splitlines()
    assert table[0].split() == ["NODE", "NAME", "DIRTY", "GRANULARITY", "FLAGS"]
    assert table[2].split() == ["disk", "b0", str(len(dirty) * C), str(C), "recording"]

    expected = (workdir / "disk.img").read_bytes()
    inc = workdir / "inc.img"
    out = ok(run_cli("backup", "--qmp", q, "disk", str(inc), "--incremental", "--bitmap", "b0", "--json"))
    assert out
    image = inc.read_bytes()
    for n in range(len(image) // C):
        piece = slice(n * C, (n + 1) * C)
        assert image[piece] == (expected[piece] if n in dirty else bytes(C)), n
    for start, end in mapped_data(inc):
        assert set(range(start // C, (end + C - 1) // C)) <= dirty
    assert [r["count"] for r in bitmap_rows(run_cli, daemon, "disk") if r["name"] == "b0"] == [0]

    ok(run_cli("bitmap", "remove", "--qmp", q, "disk", "fine"))
    ok(run_cli("bitmap", "clear", "--qmp", q, "disk", "b0"))
    ok(run_cli("bitmap", "remove", "--qmp", q, "disk", "b0"))
    assert bitmap_rows(run_cli, daemon) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--incremental"], "cowbackup: --incremental needs --bitmap NAME"),
        (
            ["--incremental", "--bitmap", "b", "--sync", "top"],
            "cowbackup: --incremental and --sync top contradict",
        ),
    ],
)
def test_incremental_usage_errors(run_cli: RunCli, workdir: Path, extra: list[str], message: str) -> None:
    proc = run_cli("backup", "--qmp", str(workdir / "none.sock"), "disk", str(workdir / "t.img"), *extra)
    assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr
    proc = run_cli("backup", str(workdir / "a.img"), str(workdir / "t.img"), "--bitmap", "b")
    assert proc.returncode == 2 and "need --qmp" in proc.stderr, proc.stderr


def test_fallback_full_creates_a_missing_bitmap_with_a_full_backup(
    run_cli: RunCli, daemon: DaemonProcess, workdir: Path
) -> None:
    q, target = str(daemon.qmp), workdir / "full.img"
    args = ("backup", "--qmp", q, "disk", str(target), "--incremental", "--bitmap", "nb")
    one_line_error(run_cli(*args), "cowbackup: GenericError: Bitmap 'nb' could not be found")
    proc = run_cli(*args, "--fallback-full", "--force")
    assert proc.returncode == 0 and "bitmap 'nb' is missing: taking a full backup instead" in proc.stderr
    assert target.read_bytes() == (workdir / "disk.img").read_bytes()
    assert [(r["name"], r["count"], r["recording"]) for r in bitmap_rows(run_cli, daemon, "disk")] == [
        ("nb", 0, True)
    ]
