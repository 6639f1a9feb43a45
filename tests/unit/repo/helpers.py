"""Small builders shared by the repository's unit tests: repositories, disks, backups and restores."""

from __future__ import annotations

import os
import random
from pathlib import Path

from cowbackup.block.drivers.memory import MemoryNode
from cowbackup.repo.manifest import Manifest
from cowbackup.repo.reader import restore_disk
from cowbackup.repo.repository import Repository
from cowbackup.repo.store_local import LocalStore
from cowbackup.repo.writer import BackupRun

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB
PASSPHRASE = b"correct horse"


def new_repo(path: Path, encryption: str = "repokey", *, level: int = 3) -> Repository:
    """A fresh repository with 64 KiB chunks; its store does not fsync (tests never crash the host)."""
    return Repository.create(
        LocalStore(str(path), "none"),
        chunk_size=CHUNK,
        encryption=encryption,
        level=level,
        passphrase=PASSPHRASE if encryption != "none" else None,
        created="2026-01-01T00:00:00Z",
    )


def reopen(repo: Repository, *, key: bool = True) -> Repository:
    """The same repository opened afresh, with its passphrase or (``key=False``) without."""
    return Repository.open(LocalStore(repo.store.location, "none"), (lambda: PASSPHRASE) if key else None)


def data(seed: int, length: int = CHUNK) -> bytes:
    """Incompressible bytes, the same for the same seed."""
    return random.Random(seed).randbytes(length)


def memory_disk(contents: bytes) -> MemoryNode:
    """A memory node holding ``contents``; chunks that are all zeros are left as holes."""
    node = MemoryNode("disk", len(contents))
    for offset in range(0, len(contents), CHUNK):
        piece = contents[offset : offset + CHUNK]
        if piece.count(0) != len(piece):
            node.data[offset : offset + len(piece)] = piece
            node.allocated.set(offset, len(piece))
    return node


async def backup(
    repo: Repository, disks: dict[str, bytes], name: str = "host/vm", *, time: str | None = None
) -> Manifest:
    """One complete backup of ``disks`` (disk name -> contents); the committed manifest."""
    run = await BackupRun.start(repo, workers=2)
    try:
        records = [await run.write_disk(d, memory_disk(contents)) for d, contents in disks.items()]
        return await run.commit(name, records, time=time)
    finally:
        await run.close()


async def restore(repo: Repository, snap: Manifest, disk: str | None = None) -> bytes:
    """The bytes of one disk of ``snap`` (raises DamagedSnapshot if it cannot be restored whole)."""
    record = snap.disk(disk)
    target = MemoryNode("target", record.size)
    await restore_disk(repo, record, target, target_reads_zero=True, workers=2)
    return target.snapshot()


def object_path(repo: Repository, name: str) -> str:
    """Where the local store keeps object ``name`` (to damage it behind the repository's back)."""
    return os.path.join(repo.store.location, name)


def flip_byte(repo: Repository, name: str, offset: int = -1) -> None:
    """Invert one byte of a stored object (the last by default: inside the payload or GCM tag)."""
    path = object_path(repo, name)
    with open(path, "r+b") as f:
        raw = bytearray(f.read())
        raw[offset] ^= 0xFF
        f.seek(0)
        f.write(raw)
