"""The chunk cache never names a chunk that a gc record may have deleted (docs/repository.md §14, §17).

Each test saves a cache that knows chunks A and B, then lays out ``gc/`` as gc and verify could have
left it, deletes what a sweep would have deleted, and loads the cache as a new backup would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cowbackup.repo import gc
from cowbackup.repo.blob import Kind, stored_checksum
from cowbackup.repo.cache import ChunkCache
from cowbackup.repo.index import Entry
from cowbackup.repo.repository import Repository, chunk_name
from cowbackup.repo.store_local import LocalStore


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Repository:
    monkeypatch.setenv("COWBACKUP_CACHE_DIR", str(tmp_path / "cache"))
    return Repository.create(
        LocalStore(str(tmp_path / "repo"), "none"),
        chunk_size=65536,
        encryption="none",
        level=3,
        passphrase=None,
        created="2026-12-05T00:00:00Z",
    )


def store_chunk(repo: Repository, data: bytes) -> bytes:
    cid = repo.hash(data)
    stored = repo.seal(Kind.CHUNK, cid, data)
    repo.store.put(chunk_name(cid), stored)
    return Entry(cid, len(stored), stored_checksum(stored)).pack()


@pytest.fixture
def known(repo: Repository) -> tuple[bytes, bytes]:
    """Chunks A and B, stored, and a saved cache (gc_seq 0) that knows both; their ids."""
    a, b = store_chunk(repo, b"A" * 1000), store_chunk(repo, b"B" * 1000)
    cache = ChunkCache(repo)
    cache.load(gc.read_state(repo.store))
    cache.known.update({a[:32]: a, b[:32]: b})
    cache.save()
    return a[:32], b[:32]


def record(repo: Repository, seq: int, kind: str, names: list[str], *markers: str) -> None:
    body = json.dumps({"seq": seq, "kind": kind, "names": names}).encode()
    assert repo.store.put_if_absent(gc.record_name(seq, kind), body)
    for marker in markers:
        repo.store.put(gc.record_name(seq, marker), b"")


def sweep(repo: Repository, chunk_id: bytes) -> None:
    repo.store.delete([chunk_name(chunk_id)])


def reload(repo: Repository) -> ChunkCache:
    cache = ChunkCache(repo)
    cache.load(gc.read_state(repo.store))
    return cache


def test_a_swept_record_above_a_pending_one_is_applied(repo: Repository, known: tuple[bytes, bytes]) -> None:
    # One gc run: record 1 postponed (a backup ran), that backup ended while the run marked, so the
    # same run swept record 2.
    a, b = known
    record(repo, 1, "condemned", ["chunks/00/" + "00" * 32])
    record(repo, 2, "condemned", [chunk_name(a)], "done")
    sweep(repo, a)
    cache = reload(repo)
    assert a not in cache.known
    assert b in cache.known
    assert cache.gc_seq == 0  # record 1 may still delete: every load applies it until it is swept


def test_an_abandoned_sweep_is_applied(repo: Repository, known: tuple[bytes, bytes]) -> None:
    # A gc killed in the middle of sweeping record 1: its marker stays, no ``done``.
    a, b = known
    record(repo, 1, "condemned", [chunk_name(a), chunk_name(b)], "sweep")
    sweep(repo, a)
    cache = reload(repo)
    assert a not in cache.known and b not in cache.known
    assert cache.gc_seq == 0


def test_a_number_shared_by_a_quarantine_and_a_condemned_record(
    repo: Repository, known: tuple[bytes, bytes]
) -> None:
    a, b = known
    record(repo, 1, "quarantine", [chunk_name(b)])
    record(repo, 1, "condemned", [chunk_name(a)])
    sweep(repo, b)
    cache = reload(repo)
    assert a not in cache.known and b not in cache.known
    assert not gc.read_state(repo.store).is_swept(1)
    assert cache.gc_seq == 0


def test_records_pruned_past_a_pending_one_force_a_rebuild(
    repo: Repository, known: tuple[bytes, bytes]
) -> None:
    # Records 2 and 3 (which deleted A) were pruned; 1 is still pending, so the lowest number is 1.
    a, _b = known
    record(repo, 1, "condemned", [])
    record(repo, 4, "condemned", [], "done")
    sweep(repo, a)
    cache = reload(repo)
    assert cache.rebuilt
    assert a not in cache.known


def test_markers_left_by_an_interrupted_prune_are_swept(repo: Repository) -> None:
    repo.store.put(gc.record_name(1, "done"), b"")
    assert gc.read_state(repo.store).is_swept(1)
