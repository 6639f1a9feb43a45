"""tools/restore_reference.py -- a reader written from docs/repository.md alone -- restores what the
``cowbackup`` CLI backed up, byte for byte, and refuses a repository that was tampered with.

The repositories use 64 KiB chunks and 4 entries per index segment (the config is rewritten before the
first backup, as another writer of the format could), so that a 1.3 MiB disk has several segments, a
short last chunk, zero chunks and holes.  A second backup of the same disk with a few chunks changed
shares most of its chunks (and its unchanged segments) with the first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import (
    CLI_TIMEOUT,
    KiB,
    RunCli,
    SegmentKind,
    allocated,
    assert_same_content,
    build_image,
    layout,
    mapped_data,
    qemu_img_compare,
)

TOOL = Path(__file__).resolve().parents[2] / "tools" / "restore_reference.py"
CHUNK = 64 * KiB
SEGMENT_ENTRIES = 4
#: 20 full chunks and a short one: 6 segments, the last of one position.
SIZE = 20 * CHUNK + 12345
#: An aligned run of two chunks that is a hole in the image: it must stay a hole when restored.
HOLE = (8 * CHUNK, 10 * CHUNK)
PASSPHRASE = "reference reader"


@pytest.fixture(autouse=True)
def _private_dirs(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COWBACKUP_CACHE_DIR", str(workdir / "cache"))
    monkeypatch.setenv("COWBACKUP_KEYS_DIR", str(workdir / "keys"))
    monkeypatch.setenv("COWBACKUP_PASSWORD", PASSPHRASE)


def reference(*args: str | Path, password: str | None = PASSPHRASE) -> subprocess.CompletedProcess[str]:
    """Run the reference reader with only what it may use: this Python, no cowbackup on its path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COWBACKUP_PASSWORD")}
    if password is not None:
        env["COWBACKUP_PASSWORD"] = password
    return subprocess.run(
        [sys.executable, "-I", str(TOOL), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def make_repository(run_cli: RunCli, repo: Path, encryption: str) -> None:
    proc = run_cli("repo", "init", str(repo), "--encryption", encryption, "--chunk-size", "64K")
    assert proc.returncode == 0, proc.stderr
    config_path = repo / "config"
    config = json.loads(config_path.read_text())
    config["segment_entries"] = SEGMENT_ENTRIES
    config_path.write_text(json.dumps(config, indent=1) + "\n")


def backup(run_cli: RunCli, image: Path, repo: Path) -> str:
    proc = run_cli("backup", str(image), "--repo", str(repo), "--name", "ref/disk", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["type"] == "result"
    return str(result["snapshot"])


def restore_and_compare(repo: Path, snapshot: str, expected: Path, out: Path) -> None:
    proc = reference(repo, snapshot[:8], out, "--disk", "disk0")
    assert proc.returncode == 0, proc.stderr
    assert_same_content(expected, out)
    qemu_img_compare(expected, out)
    # Zero chunks are holes: nothing is allocated where the image has an aligned hole.
    assert all(end <= HOLE[0] or start >= HOLE[1] for start, end in mapped_data(out))
    assert allocated(out) < SIZE


@pytest.mark.parametrize("encryption", ["repokey", "none"])
def test_reference_restores_cli_backups(
    run_cli: RunCli, workdir: Path, need_qemu_img: None, encryption: str
) -> None:
    pattern: list[tuple[int, SegmentKind]] = [
        (100 * KiB, "data"),
        (3 * CHUNK, "zero"),
        (CHUNK + 7, "data"),
        (2 * CHUNK, "hole"),
    ]
    segments = layout(SIZE, pattern)
    segments = tuple(s for s in segments if not (s.offset < HOLE[1] and s.end > HOLE[0]))
    image = build_image(workdir / "disk.img", SIZE, segments, seed=12)
    repo = workdir / "repo"
    make_repository(run_cli, repo, encryption)

    first = backup(run_cli, image.path, repo)
    first_copy = workdir / "first.img"
    shutil.copyfile(image.path, first_copy)
    # Change three chunks (one in the short last chunk): the second backup shares everything else.
    with open(image.path, "r+b") as f:
        for offset in (CHUNK // 2, 5 * CHUNK + 100, SIZE - 1000):
            f.seek(offset)
            f.write(os.urandom(500))
    second = backup(run_cli, image.path, repo)
    assert first != second

    manifest = json.loads((repo / "snapshots" / second).read_text())["manifest"]
    assert len(manifest["disks"][0]["segments"]) == 6
    assert manifest["disks"][0]["stats"]["new_chunks"] < manifest["disks"][0]["stats"]["chunks"]
    assert not list((repo / "sessions").iterdir())

    restore_and_compare(repo, first, first_copy, workdir / "first-restored.img")
    restore_and_compare(repo, second, image.path, workdir / "second-restored.img")


@pytest.mark.parametrize("encryption", ["repokey", "none"])
def test_reference_refuses_tampering(run_cli: RunCli, workdir: Path, encryption: str) -> None:
    image = build_image(workdir / "disk.img", SIZE, layout(SIZE, [(CHUNK, "data"), (CHUNK, "hole")]), seed=3)
    repo = workdir / "repo"
    make_repository(run_cli, repo, encryption)
    sid = backup(run_cli, image.path, repo)
    out = workdir / "out.img"

    if encryption != "none":
        proc = reference(repo, sid, out, password="not the passphrase")
        assert proc.returncode == 2, proc.stderr
        assert "wrong passphrase" in proc.stderr
        assert not out.exists()

    # A manifest altered but still well-formed: authentication fails, nothing is left behind.
    manifest_path = repo / "snapshots" / sid
    original = manifest_path.read_bytes()
    doc = json.loads(original)
    doc["manifest"]["disks"][0]["size"] -= CHUNK
    manifest_path.write_text(json.dumps(doc, indent=1))
    proc = reference(repo, sid, out)
    assert proc.returncode == 1, proc.stderr
    assert "manifest authentication failed" in proc.stderr
    assert not out.exists()
    manifest_path.write_bytes(original)

    # One byte of one chunk flipped: the stored checksum of its index entry no longer matches.
    chunk = sorted(p for p in (repo / "chunks").rglob("*") if p.is_file())[-1]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    proc = reference(repo, sid, out)
    assert proc.returncode == 1, proc.stderr
    assert f"chunks/{chunk.parent.name}/{chunk.name}" in proc.stderr
    assert not out.exists()

    # A chunk directory that leads outside the repository is refused, not followed.
    elsewhere = workdir / "elsewhere"
    shutil.move(chunk.parent, elsewhere)
    chunk.parent.symlink_to(elsewhere)
    proc = reference(repo, sid, out)
    assert proc.returncode == 1, proc.stderr
    assert "outside the repository" in proc.stderr
