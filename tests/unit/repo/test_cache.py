"""The chunk cache never names an object gc or verify removed, and is rebuilt when it cannot know."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from cowbackup.repo import gc
from cowbackup.repo.cache import ChunkCache
from cowbackup.repo.repository import Repository, chunk_name, snapshot_name
from cowbackup.repo.verify import verify
from cowbackup.repo.writer import BackupRun

from .helpers import CHUNK, backup, data, flip_byte, new_repo, object_path, restore

X, Y = data(1), data(2)


def loaded(repo: Repository) -> ChunkCache:
    cache = ChunkCache(repo)
    cache.load(gc.read_state(repo.store))
    return cache


def test_a_chunk_swept_by_gc_is_dropped_from_a_loaded_cache(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    snap = asyncio.run(backup(repo, {"d": X}))
    cid = repo.hash(X)
    assert cid in loaded(repo).known
    repo.store.delete([snapshot_name(snap.id)])
    result = gc.collect(repo)
    assert result.swept and repo.store.stat(chunk_name(cid)) is None
    cache = loaded(repo)
    assert cid not in cache.known and not cache.rebuilt
    # And the next backup of the same data stores it again.
    again = asyncio.run(backup(repo, {"d": X}))
    assert asyncio.run(restore(repo, again)) == X


def test_a_quarantined_chunk_is_dropped_and_the_next_backup_heals(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo", "none")
    snap = asyncio.run(backup(repo, {"d": X + Y}))
    cid = repo.hash(X)
    flip_byte(repo, chunk_name(cid))
    report = verify(repo, read_data=100)
    assert report.quarantined == [chunk_name(cid)]
    assert cid not in loaded(repo).known and repo.hash(Y) in loaded(repo).known
    asyncio.run(backup(repo, {"other": X}))
    assert asyncio.run(restore(repo, snap)) == X + Y


def test_a_sweep_after_a_postponed_record_still_reaches_the_cache(tmp_path: Path) -> None:
    """Record 1 is postponed by a running backup that ends before record 2 is swept: the cache (which
    saw neither) must forget what record 2 deleted, though record 1 is still pending before it."""
    repo = new_repo(tmp_path / "repo")
    doomed = asyncio.run(backup(repo, {"d": Y}, "doomed"))
    cid = repo.hash(Y)

    async def scenario() -> None:
        running = await BackupRun.start(repo, workers=2)
        repo.store.delete([snapshot_name(doomed.id)])
        gc.collect(repo)  # record 1: postponed, the backup started before its sweep
        ended = False

        def end_the_backup(step: str) -> None:
            nonlocal ended
            if step == "mark" and not ended:
                ended = True
                asyncio.run_coroutine_threadsafe(running.close(), loop).result()

        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, lambda: gc.collect(repo, step=end_the_backup))
        assert result.postponed == [1] and result.swept == [2], result

    asyncio.run(scenario())
    assert repo.store.stat(chunk_name(cid)) is None
    assert cid not in loaded(repo).known
    again = asyncio.run(backup(repo, {"d": Y}))
    assert asyncio.run(restore(repo, again)) == Y


def test_a_cache_that_missed_pruned_records_is_rebuilt(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    asyncio.run(backup(repo, {"d": X}))
    stray = repo.hash(Y)
    repo.store.put(chunk_name(stray), b"not referenced by any snapshot")
    for _ in range(3):
        gc.write_record(repo.store, "quarantine", [])
    repo.store.delete([gc.record_name(1, "quarantine"), gc.record_name(2, "quarantine")])
    cache = loaded(repo)
    assert cache.rebuilt
    assert set(cache.known) == {repo.hash(X)}  # what exists *and* whose checksum a snapshot records
    assert cache.gc_seq == 3


def test_a_cache_newer_than_the_repository_is_rebuilt(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    asyncio.run(backup(repo, {"d": X}))
    cache = loaded(repo)
    cache.gc_seq = 7  # it saw records this repository does not have: not the same repository's history
    cache.known[b"\x01" * 32] = b"\x01" * 32 + bytes(36)
    cache.save()
    again = loaded(repo)
    assert again.rebuilt and set(again.known) == {repo.hash(X)}


def test_unreadable_or_foreign_cache_files_are_rebuilt(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    asyncio.run(backup(repo, {"d": X}))
    path = loaded(repo).path
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1)
    assert loaded(repo).rebuilt
    other = new_repo(tmp_path / "other")
    os.makedirs(os.path.dirname(ChunkCache(other).path), exist_ok=True)
    with open(path, "rb") as src, open(ChunkCache(other).path, "wb") as dst:
        dst.write(src.read())
    cache = loaded(other)
    assert cache.rebuilt and not cache.known


def test_a_disabled_cache_reads_and_writes_nothing(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    cache = ChunkCache(repo, enabled=False)
    cache.load(gc.read_state(repo.store))
    cache.known[b"\x02" * 32] = b"\x02" * 32 + bytes(36)
    cache.save()
    assert not os.path.exists(cache.path) and CHUNK


def test_a_gc_killed_while_deleting_does_not_leave_the_cache_believing(tmp_path: Path) -> None:
    """A gc killed after deleting but before ``done``, whose marker's lease then ran out: its record is
    pending forever after, yet its objects are gone; the next backup must not reuse them from cache."""
    repo = new_repo(tmp_path / "repo")
    snap = asyncio.run(backup(repo, {"d": X}))
    repo.store.delete([snapshot_name(snap.id)])

    class Killed(Exception):
        pass

    def kill(step: str) -> None:
        if step == "deleted":
            raise Killed

    with pytest.raises(Killed):
        gc.collect(repo, step=kill)
    # A real kill leaves the sweep marker (this exception's cleanup removes it): age it past its lease.
    marker = object_path(repo, gc.record_name(1, "sweep"))
    if os.path.exists(marker):
        expired = time.time() - gc.SWEEP_LEASE - 1
        os.utime(marker, (expired, expired))
    assert repo.hash(X) not in loaded(repo).known
    again = asyncio.run(backup(repo, {"d": X}))
    assert asyncio.run(restore(repo, again)) == X
