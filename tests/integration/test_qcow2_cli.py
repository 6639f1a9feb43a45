"""``cowbackup backup`` with qcow2: a qcow2 target that qemu-img calls clean and identical, qcow2
sources (probed, chains made by qemu-img), and ``--source-format raw`` never probing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import MiB, RunCli, build_image, layout

pytestmark = pytest.mark.usefixtures("need_qemu_img")


def _img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, check=False)


def test_backup_into_qcow2_target(tmp_path: Path, run_cli: RunCli) -> None:
    disk = tmp_path / "disk.img"
    size = 48 * MiB
    build_image(disk, size, layout(size, [(3 * MiB, "data"), (2 * MiB, "hole"), (MiB, "zero")]), seed=3)
    out = tmp_path / "backup.qcow2"
    proc = run_cli("backup", "--target-format", "qcow2", str(disk), str(out))
    assert proc.returncode == 0, proc.stderr
    check = json.loads(_img("check", "--output=json", out).stdout)
    assert check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0, check
    cmp = _img("compare", "-f", "qcow2", "-F", "raw", out, disk)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    # No larger than the data (24 MiB of it) plus a little metadata: holes and zero runs stay unallocated.
    assert out.stat().st_size <= 24 * MiB + MiB


def test_backup_of_qcow2_chain(tmp_path: Path, run_cli: RunCli) -> None:
    base = tmp_path / "base.qcow2"
    _img("create", "-f", "qcow2", base, "16M")
    subprocess.run(["qemu-io", "-c", "write -P 0x31 0 16M", str(base)], check=True, capture_output=True)
    top = tmp_path / "top.qcow2"
    _img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "16M")
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x32 1M 3M", "-c", "write -z 8M 1M", str(top)],
        check=True,
        capture_output=True,
    )
    full = tmp_path / "full.raw"
    assert run_cli("backup", str(top), str(full)).returncode == 0
    cmp = _img("compare", "-f", "qcow2", "-F", "raw", top, full)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    # sync=top copies only what the top layer holds; the rest of the raw target stays zero.
    only_top = tmp_path / "top.raw"
    assert run_cli("backup", "--sync", "top", str(top), str(only_top)).returncode == 0
    data = only_top.read_bytes()
    assert data[MiB : 4 * MiB] == b"\x32" * (3 * MiB)
    assert data[:MiB] == bytes(MiB) and data[4 * MiB :] == bytes(12 * MiB)


def test_source_format_raw_copies_the_container(tmp_path: Path, run_cli: RunCli) -> None:
    img = tmp_path / "img.qcow2"
    _img("create", "-f", "qcow2", img, "4M")
    out = tmp_path / "copy.raw"
    assert run_cli("backup", "--source-format", "raw", str(img), str(out)).returncode == 0
    assert out.read_bytes() == img.read_bytes()
