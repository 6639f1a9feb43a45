"""``restore --serve``: the restored disk is usable over NBD at once, while the snapshot is copied in.

A client writes and reads through the export while the background copy (slowed down) runs: what it reads
is the snapshot with its writes, and when the copy completes TARGET holds exactly that.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from .conftest import KiB, MiB, RunCli, StartCli, build_image, layout

SIZE = 8 * MiB


def test_a_disk_served_while_it_is_restored(
    run_cli: RunCli, start_cli: StartCli, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COWBACKUP_PASSWORD", "instant")
    monkeypatch.setenv("COWBACKUP_CACHE_DIR", str(workdir / "cache"))
    segments = layout(SIZE, [(MiB, "data"), (512 * KiB, "hole"), (512 * KiB, "zero"), (MiB, "data")])
    image = build_image(workdir / "disk.img", SIZE, segments, seed=21).path
    repo = workdir / "repo"
    for args in (
        ("repo", "init", str(repo), "--chunk-size", "64K"),
        ("backup", str(image), "--repo", str(repo), "--name", "vm"),
    ):
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr
    target, sock = workdir / "restored.img", workdir / "restore.sock"
    served = start_cli(
        "restore", "--repo", str(repo), "vm@latest", str(target), "--serve", "--socket", str(sock),
        "--speed", "2M",
    )  # fmt: skip
    uri = served.wait_line(lambda line: line.startswith("nbd+unix://"))
    expected = bytearray(image.read_bytes())
    # Writes first (one inside a chunk, one across chunks, zeros), while little is restored yet.
    writes = [
        ("write -P 0x5c 100000 3000", 100000, b"\x5c" * 3000),
        ("write -z 5000000 200000", 5000000, bytes(200000)),
    ]
    for command, offset, data in writes:
        subprocess.run(["qemu-io", "-f", "raw", "-c", command, uri], check=True, capture_output=True)
        expected[offset : offset + len(data)] = data
    copy = workdir / "copy.img"
    subprocess.run(["nbdcopy", uri, str(copy)], check=True, capture_output=True)
    assert copy.read_bytes() == expected
    deadline = time.monotonic() + 60
    while "restore complete" not in (workdir / "stderr-0.txt").read_text():
        assert time.monotonic() < deadline and served.proc.poll() is None, served.stderr()
        time.sleep(0.1)
    served.proc.terminate()
    assert served.finish() == 0, served.stderr()
    assert target.read_bytes() == expected
