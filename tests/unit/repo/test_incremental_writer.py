"""An incremental -- read (pull mode's write_disk) or handed its chunks (a target node's finish_disk) --
is the parent with exactly its changed positions replaced: the same entries, segment for segment, as a
full backup of the new contents, whatever changed (data, zeros, nothing at all behind a dirty mark)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path

import pytest

from cowbackup.repo.manifest import DiskRecord
from cowbackup.repo.repository import Repository
from cowbackup.repo.writer import BackupRun, DiskStats

from .helpers import CHUNK, data, memory_disk, new_repo, restore

SEGMENT = 8  # entries per segment: a disk of a few dozen chunks has several


def small_segments(path: Path) -> Repository:
    repo = new_repo(path)
    repo.config = dataclasses.replace(repo.config, segment_entries=SEGMENT)
    return repo


def contents(rng: random.Random, chunks: int, tail: int) -> bytearray:
    disk = bytearray()
    for _ in range(chunks):
        disk += bytes(CHUNK) if rng.random() < 0.3 else data(rng.randrange(1 << 30))
    return disk + data(rng.randrange(1 << 30), tail)


def entries(repo: Repository, record: DiskRecord) -> list[bytes]:
    return [e.pack() for seg in record.segments for e in repo.read_index(seg)]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("how", ["read", "handed"])
def test_an_incremental_is_the_parent_with_its_changes(tmp_path: Path, seed: int, how: str) -> None:
    rng = random.Random(seed)
    chunks, tail = rng.randrange(1, 40), rng.choice([0, 4096])
    positions = chunks + (1 if tail else 0)
    size = chunks * CHUNK + tail
    old = contents(rng, chunks, tail)
    new = bytearray(old)
    changed = set(rng.sample(range(positions), rng.randrange(0, positions + 1)))
    for pos in changed:
        length = min(CHUNK, size - pos * CHUNK)
        kind = rng.choice(["data", "zeros", "same"])  # "same": marked dirty, nothing really changed
        if kind != "same":
            piece = data(rng.randrange(1 << 30), length) if kind == "data" else bytes(length)
            new[pos * CHUNK : pos * CHUNK + length] = piece
    repo = small_segments(tmp_path / "r")

    def dirty(offset: int, length: int) -> bool:
        return any(p in changed for p in range(offset // CHUNK, -(-(offset + length) // CHUNK)))

    async def run() -> tuple[DiskRecord, DiskRecord, DiskRecord]:
        backup = await BackupRun.start(repo, workers=2)
        try:
            parent = await backup.write_disk("d", memory_disk(bytes(old)))
            full = await backup.write_disk("d", memory_disk(bytes(new)))
            if how == "read":
                incr = await backup.write_disk("d", memory_disk(bytes(new)), parent=parent, dirty=dirty)
            else:
                stats = DiskStats(size=size)
                written = {}
                for pos in sorted(changed):
                    piece = memoryview(bytes(new[pos * CHUNK : min(size, (pos + 1) * CHUNK)]))
                    written[pos] = await backup.store_chunk(piece, stats)
                incr = await backup.finish_disk("d", size, written, stats, parent=parent)
            snap = await backup.commit("vm", [incr])
            assert await restore(repo, snap) == bytes(new)
            return parent, full, incr
        finally:
            await backup.close()

    parent, full, incr = asyncio.run(run())
    assert entries(repo, incr) == entries(repo, full)
    assert [s.index_id for s in incr.segments] == [s.index_id for s in full.segments]
    changed_bytes = sum(min(CHUNK, size - p * CHUNK) for p in changed)
    assert incr.stats["reused_bytes"] == size - changed_bytes
    assert incr.stats["data_bytes"] + incr.stats["zero_bytes"] == changed_bytes
    # A segment with no change is the parent's record, not even rewritten.
    for s, seg in enumerate(incr.segments):
        if not any(s * SEGMENT <= p < (s + 1) * SEGMENT for p in changed):
            assert seg == parent.segments[s]
