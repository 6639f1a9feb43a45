"""Restore leaves the zero runs inside a chunk as holes on a fresh target, and writes them elsewhere."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from cowbackup.daemon import Daemon
from cowbackup.repo.reader import ZERO_BLOCK, _data_runs, restore_disk
from cowbackup.repo.repository import Repository
from cowbackup.repo.store_local import LocalStore
from cowbackup.repo.writer import BackupRun

MiB = 1024 * 1024
CHUNK = MiB


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COWBACKUP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COWBACKUP_KEYS_DIR", str(tmp_path / "keys"))


def test_data_runs() -> None:
    z, d = bytes(ZERO_BLOCK), b"\x01" * ZERO_BLOCK
    assert _data_runs(z * 4, ZERO_BLOCK) == []
    assert _data_runs(d + z + z + d + d, ZERO_BLOCK) == [(0, ZERO_BLOCK), (3 * ZERO_BLOCK, 5 * ZERO_BLOCK)]
    # A block with a single non-zero byte is data; a short tail counts as a block.
    tail = z + bytes(100) + b"\x02"
    assert _data_runs(tail, ZERO_BLOCK) == [(ZERO_BLOCK, len(tail))]


def _allocated(path: Path, offset: int, length: int) -> bool:
    """Does the file hold data anywhere in ``[offset, offset + length)``?"""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            return os.lseek(fd, offset, os.SEEK_DATA) < offset + length
        except OSError:  # ENXIO: nothing but a hole from offset on
            return False
    finally:
        os.close(fd)


async def _backup_and_restore(tmp_path: Path, disk: Path, target: Path, fresh: bool) -> None:
    repo = Repository.create(
        LocalStore(str(tmp_path / "repo"), "none"),
        chunk_size=CHUNK,
        encryption="none",
        level=3,
        passphrase=None,
        created="2026-01-01T00:00:00Z",
    )
    daemon = Daemon()
    try:
        node = await daemon.blockdev_add({"driver": "file", "node-name": "src", "filename": str(disk)})
        run = await BackupRun.start(repo, workers=2)
        try:
            record = await run.write_disk("disk0", node)
            await run.commit("t/disk0", [record])
        finally:
            await run.close()
        out = await daemon.blockdev_add({"driver": "file", "node-name": "out", "filename": str(target)})
        bad = await restore_disk(repo, record, out, target_reads_zero=fresh, workers=2)
        assert bad == []
    finally:
        await daemon.close()


@pytest.mark.parametrize("fresh", [True, False])
def test_zero_runs_inside_chunks(tmp_path: Path, fresh: bool) -> None:
    size = 4 * CHUNK
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(size)
        # Chunk 0: data, a 256 KiB hole, data.  Chunk 1: written zeros then data.  Chunks 2-3: a hole,
        # then data in the last 64 KiB block (a short run at the chunk's end).
        f.seek(0)
        f.write(os.urandom(256 * 1024))
        f.seek(512 * 1024)
        f.write(os.urandom(512 * 1024))
        f.seek(CHUNK)
        f.write(bytes(512 * 1024) + os.urandom(512 * 1024))
        f.seek(size - ZERO_BLOCK)
        f.write(os.urandom(ZERO_BLOCK))
    target = tmp_path / "out.raw"
    with open(target, "wb") as f:
        if fresh:
            f.truncate(size)
        else:
            f.write(b"\xff" * size)  # old contents: restore must overwrite its zero runs too
    asyncio.run(_backup_and_restore(tmp_path, disk, target, fresh))
    assert target.read_bytes() == disk.read_bytes()
    if fresh:
        assert not _allocated(target, 256 * 1024, 256 * 1024)
        assert not _allocated(target, CHUNK, 512 * 1024)
        assert not _allocated(target, 2 * CHUNK, 2 * CHUNK - ZERO_BLOCK)
        assert _allocated(target, CHUNK + 512 * 1024, 512 * 1024)
