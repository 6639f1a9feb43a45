"""verify finds exactly the objects that were damaged and the snapshots that need them; the next backup
of the same data heals the repository and a later verify clears the damage record."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from cowbackup.repo.manifest import Manifest
from cowbackup.repo.reader import DamagedSnapshot
from cowbackup.repo.repository import Repository, chunk_name, index_name, refs_name, snapshot_name
from cowbackup.repo.verify import QUARANTINE, verify

from .helpers import backup, data, flip_byte, new_repo, object_path, reopen, restore

A, B, C = data(1), data(2), data(3)


def two_snapshots(repo: Repository) -> tuple[Manifest, Manifest]:
    """``first`` holds chunks A, B; ``second`` holds A, C: chunk A is shared, B and C are not."""
    first = asyncio.run(backup(repo, {"d": A + B}, "first"))
    second = asyncio.run(backup(repo, {"d": A + C}, "second"))
    return first, second


def opened(repo: Repository, key: bool) -> Repository:
    return repo if key else reopen(repo, key=False)


@pytest.mark.parametrize("key", [True, False], ids=["key", "no-key"])
@pytest.mark.parametrize("encryption", ["repokey", "none"])
def test_a_flipped_chunk_is_found_with_the_snapshots_that_need_it(
    tmp_path: Path, key: bool, encryption: str
) -> None:
    repo = new_repo(tmp_path / "repo", encryption)
    first, second = two_snapshots(repo)
    shared, own = chunk_name(repo.hash(A)), chunk_name(repo.hash(B))
    flip_byte(repo, own, offset=100)
    assert verify(opened(repo, key), repair=False).ok  # same size: only reading the data finds it
    report = verify(opened(repo, key), read_data=100)
    assert set(report.bad) == {own}
    assert report.damaged == {first.id: [own]}
    assert report.quarantined == [own]
    assert report.chunks_read == 3  # the shared chunk once
    flip_byte(repo, shared, offset=100)
    report = verify(opened(repo, key), read_data=100)
    assert set(report.bad) == {shared, own}  # own is quarantined now: missing
    assert report.bad[own] == "missing"
    assert report.damaged == {first.id: sorted([shared, own]), second.id: [shared]}
    assert set(repo.damage()) == {first.id, second.id}


@pytest.mark.parametrize("key", [True, False], ids=["key", "no-key"])
def test_a_truncated_or_missing_chunk_is_found_without_reading_data(tmp_path: Path, key: bool) -> None:
    repo = new_repo(tmp_path / "repo")
    first, second = two_snapshots(repo)
    own_b, own_c = chunk_name(repo.hash(B)), chunk_name(repo.hash(C))
    os.truncate(object_path(repo, own_b), 100)
    repo.store.delete([own_c])
    report = verify(opened(repo, key))
    assert set(report.bad) == {own_b, own_c} and report.bad[own_c] == "missing"
    assert report.damaged == {first.id: [own_b], second.id: [own_c]}


def test_a_flipped_index_segment(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    first, second = two_snapshots(repo)
    name = index_name(first.disks[0].segments[0].index_id)
    flip_byte(repo, name)
    report = verify(repo)
    assert set(report.bad) == {name}
    assert report.damaged == {first.id: [name]}
    assert report.quarantined == [name]
    with pytest.raises(DamagedSnapshot):
        asyncio.run(restore(repo, first))
    assert asyncio.run(restore(repo, second)) == A + C


@pytest.mark.parametrize("key", [True, False], ids=["key", "no-key"])
def test_a_flipped_refs_segment(tmp_path: Path, key: bool) -> None:
    repo = new_repo(tmp_path / "repo")
    _first, second = two_snapshots(repo)
    name = refs_name(second.disks[0].segments[0].refs_id)
    flip_byte(repo, name)
    report = verify(opened(repo, key))
    assert set(report.bad) == {name}
    assert report.damaged == {second.id: [name]}


def test_a_flipped_manifest(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    first, second = two_snapshots(repo)
    name = snapshot_name(first.id)
    path = object_path(repo, name)
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw.replace(b'"first"', b'"firsT"'))
    report = verify(repo)
    assert set(report.bad) == {name}
    assert report.damaged == {first.id: [name]}
    assert repo.store.stat(name) is not None  # a manifest is reported, never moved
    assert verify(repo, [second.id], read_data=100).ok


@pytest.mark.parametrize("encryption", ["repokey", "none"])
def test_quarantine_then_the_next_backup_heals_and_verify_clears_the_damage(
    tmp_path: Path, encryption: str
) -> None:
    repo = new_repo(tmp_path / "repo", encryption)
    first, _second = two_snapshots(repo)
    own = chunk_name(repo.hash(B))
    flip_byte(repo, own, offset=100)
    report = verify(repo, read_data=100)
    assert report.damaged == {first.id: [own]} and report.quarantined == [own]
    assert repo.store.list(QUARANTINE) and set(repo.damage()) == {first.id}
    with pytest.raises(DamagedSnapshot, match=own):
        asyncio.run(restore(repo, first))
    healer = asyncio.run(backup(repo, {"elsewhere": B}, "healer"))
    assert healer.disks[0].stats["new_chunks"] == 1
    report = verify(repo, read_data=100)
    assert report.ok, report
    assert report.healed == [first.id] and repo.damage() == {}
    for snap, contents in ((first, A + B), (healer, B)):
        assert asyncio.run(restore(repo, snap)) == contents
    # And a key-less verify agrees, now and later.
    assert verify(reopen(repo, key=False), read_data=100).ok
    assert verify(repo, read_data=100).ok


def test_after_healing_a_key_less_verify_of_the_old_snapshot_alone_reports_it_unconfirmed(
    tmp_path: Path,
) -> None:
    """An encrypted chunk stored again has other stored bytes than the damaged snapshot recorded.
    With the key the copy authenticates; without it, checking the old snapshot alone, the copy is
    matched against every snapshot's record -- kept, not quarantined -- and reported unconfirmed."""
    repo = new_repo(tmp_path / "repo", "repokey")
    first, _second = two_snapshots(repo)
    own = chunk_name(repo.hash(B))
    flip_byte(repo, own, offset=100)
    verify(repo, read_data=100)
    asyncio.run(backup(repo, {"elsewhere": B}, "healer"))
    keyless = verify(reopen(repo, key=False), [first.id], read_data=100)
    assert keyless.ok and keyless.quarantined == []
    assert keyless.unconfirmed == {first.id: [own]}
    assert verify(repo, [first.id], read_data=100).ok
    assert asyncio.run(restore(repo, first)) == A + B


def test_a_flipped_index_segment_is_found_without_the_key(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo", "repokey")
    first, _second = two_snapshots(repo)
    name = index_name(first.disks[0].segments[0].index_id)
    flip_byte(repo, name, offset=40)
    report = verify(reopen(repo, key=False), repair=False)
    assert name in report.bad and first.id in report.damaged
