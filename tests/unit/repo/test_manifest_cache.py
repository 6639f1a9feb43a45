"""The manifest cache: a manifest is read from the store once, and a kept copy is never trusted blindly.

Every test reopens the repository (a new Repository, as the next command would) so that nothing but
the cache folder carries over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from cowbackup.repo.errors import SnapshotNotFound
from cowbackup.repo.manifest import Manifest
from cowbackup.repo.manifest_cache import STALE_TEMPORARY, ManifestCache
from cowbackup.repo.repository import Repository, snapshot_name
from cowbackup.repo.store import RequestCounts

from .helpers import backup, data, new_repo, object_path, reopen

N = 40
T = TypeVar("T")


def with_snapshots(path: Path, count: int, encryption: str = "repokey") -> tuple[Repository, list[Manifest]]:
    """A repository holding ``count`` snapshots (one backup, then its manifest committed again under
    other ids and names: manifests are what this is about, not data)."""
    repo = new_repo(path, encryption)
    first = asyncio.run(backup(repo, {"d": data(1)}, "vm0", time="2026-01-01T00:00:00.000Z"))
    snaps = [first]
    for n in range(1, count):
        snap = dataclasses.replace(
            first,
            id=secrets.token_hex(16),
            name=f"vm{n % 7}",
            time=f"2026-01-01T00:{n // 60:02}:{n % 60:02}.000Z",
        )
        repo.commit(snap)
        snaps.append(snap)
    return repo, snaps


def requests_of(repo: Repository, call: Callable[[], T]) -> tuple[T, dict[str, int]]:
    """What ``call`` returns, and the requests ``repo``'s store sent meanwhile."""
    before = repo.store.requests.snapshot()
    result = call()
    return result, RequestCounts.since(before, repo.store.requests.snapshot())


def counts_of_snapshots(repo: Repository) -> dict[str, int]:
    """The requests of ``snapshots()`` by the next command (a repository opened afresh)."""
    fresh = reopen(repo)
    return requests_of(fresh, fresh.snapshots)[1]


def ids(snaps: list[Manifest]) -> list[str]:
    return [s.id for s in snaps]


def entry_path(repo: Repository, sid: str) -> str:
    cache = repo.manifest_cache
    assert cache is not None
    return os.path.join(cache.path, sid)


def test_a_second_listing_reads_no_manifest(tmp_path: Path) -> None:
    repo, snaps = with_snapshots(tmp_path / "repo", N)
    cold_repo, warm_repo = reopen(repo), reopen(repo)
    first, cold = requests_of(cold_repo, cold_repo.snapshots)
    assert cold["list"] == 1 and cold["get"] == N
    second, warm = requests_of(warm_repo, warm_repo.snapshots)
    assert warm == {**dict.fromkeys(warm, 0), "list": 1}
    assert second == first and sorted(ids(second)) == sorted(ids(snaps))


def test_only_a_new_snapshot_is_read(tmp_path: Path) -> None:
    repo, snaps = with_snapshots(tmp_path / "repo", 5)
    reopen(repo).snapshots()
    newer = dataclasses.replace(snaps[0], id=secrets.token_hex(16), time="2026-02-01T00:00:00.000Z")
    repo.commit(newer)
    fresh = reopen(repo)
    found, counts = requests_of(fresh, fresh.snapshots)
    assert counts["get"] == 1 and ids(found)[-1] == newer.id
    latest, counts = requests_of(fresh, lambda: fresh.resolve("vm0@latest"))
    assert counts["get"] == 0 and latest == newer


def test_resolve_by_prefix_reads_the_kept_copy(tmp_path: Path) -> None:
    repo, snaps = with_snapshots(tmp_path / "repo", 3)
    reopen(repo).snapshots()
    fresh = reopen(repo)
    found, counts = requests_of(fresh, lambda: fresh.resolve(snaps[1].id[:8]))
    assert found == snaps[1] and counts["get"] == 0 and counts["list"] == 1


def test_a_forgotten_snapshot_disappears_from_the_cache(tmp_path: Path) -> None:
    repo, snaps = with_snapshots(tmp_path / "repo", 4)
    reopen(repo).snapshots()
    gone = snaps[2].id
    assert os.path.exists(entry_path(repo, gone))
    repo.store.delete([snapshot_name(gone)])
    fresh = reopen(repo)
    assert gone not in ids(fresh.snapshots())
    assert not os.path.exists(entry_path(repo, gone))
    with pytest.raises(SnapshotNotFound):
        fresh.resolve(gone)


def test_a_kept_copy_is_never_used_for_an_id_the_listing_does_not_show(tmp_path: Path) -> None:
    """A copy planted (or left over) for an id that is not in the store: never a snapshot."""
    repo, snaps = with_snapshots(tmp_path / "repo", 2)
    reopen(repo).snapshots()
    stray = snaps[1].id
    repo.store.delete([snapshot_name(stray)])
    # Its entry is still there (no listing since): resolve by prefix does not see it all the same.
    fresh = reopen(repo)
    with pytest.raises(SnapshotNotFound):
        fresh.resolve(stray[:8])
    assert ids(fresh.snapshots()) == [snaps[0].id]
    assert not os.path.exists(entry_path(repo, stray))


def test_a_tampered_copy_is_detected_and_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo, snaps = with_snapshots(tmp_path / "repo", 3)
    reopen(repo).snapshots()
    victim = snaps[1]
    path = entry_path(repo, victim.id)
    with open(path, "rb") as f:
        header, body = f.readline(), f.read()
    # Rename the snapshot in the kept copy, same length: only the MAC can tell.
    forged = body.replace(b'"name": "vm1"', b'"name": "vmX"')
    assert forged != body and len(forged) == len(body)
    with open(path, "wb") as f:
        f.write(header + forged)
    fresh = reopen(repo)
    found, counts = requests_of(fresh, fresh.snapshots)
    assert counts["get"] == 1
    assert victim in found and all(s.name != "vmX" for s in found)
    assert "unsound" in caplog.text
    with open(path, "rb") as f:
        assert f.read() == header + body  # replaced by the store's copy
    assert counts_of_snapshots(repo)["get"] == 0


def test_a_copy_signed_for_another_snapshot_is_refused(tmp_path: Path) -> None:
    """An authentic manifest copied over another one's entry: its id is not the entry's."""
    repo, snaps = with_snapshots(tmp_path / "repo", 2)
    reopen(repo).snapshots()
    a, b = entry_path(repo, snaps[0].id), entry_path(repo, snaps[1].id)
    with open(a, "rb") as f:
        _, body_a = f.readline(), f.read()
    with open(b, "rb") as f:
        header_b = f.readline()
    assert len(body_a) == json.loads(header_b)["size"]  # ids and names of one length
    with open(b, "wb") as f:
        f.write(header_b + body_a)
    fresh = reopen(repo)
    found, counts = requests_of(fresh, fresh.snapshots)
    assert sorted(ids(found)) == sorted(ids(snaps))
    assert counts["get"] == 1


@pytest.mark.parametrize(
    "damage",
    ["garbage", "empty", "truncated", "long", "bad header", "header of another size", "directory", "symlink"],
)
def test_a_corrupt_cache_file_is_a_miss(tmp_path: Path, damage: str) -> None:
    repo, snaps = with_snapshots(tmp_path / "repo", 2)
    reopen(repo).snapshots()
    path = entry_path(repo, snaps[0].id)
    with open(path, "rb") as f:
        header, body = f.readline(), f.read()
    outside = tmp_path / "outside"
    outside.write_bytes(header + body)
    os.unlink(path)
    if damage == "directory":
        os.mkdir(path)
    elif damage == "symlink":
        os.symlink(outside, path)  # a sound copy, but not a file of ours: never followed
    else:
        contents = {
            "garbage": os.urandom(300),
            "empty": b"",
            "truncated": header + body[:-1],
            "long": header + body + b" ",
            "bad header": b"{" + header,
            "header of another size": header.replace(b'"size": ', b'"size": 1'),
        }[damage]
        with open(path, "wb") as f:
            f.write(contents + (body if damage == "header of another size" else b""))
    fresh = reopen(repo)
    found, counts = requests_of(fresh, fresh.snapshots)
    assert sorted(ids(found)) == sorted(ids(snaps)) and counts["get"] == 1
    if damage == "symlink":
        assert os.path.isfile(path) and not os.path.islink(path)  # replaced, the target untouched
        assert outside.read_bytes() == header + body
    elif damage != "directory":
        assert counts_of_snapshots(repo)["get"] == 0


def test_a_snapshot_written_again_under_its_id_is_read_again(tmp_path: Path) -> None:
    """Kept copies are tied to the listed object (stored size, store time), not only to the id."""
    repo, snaps = with_snapshots(tmp_path / "repo", 2)
    reopen(repo).snapshots()
    sid = snaps[1].id
    repo.store.delete([snapshot_name(sid)])
    renamed = dataclasses.replace(snaps[1], name="renamed")
    repo.commit(renamed)
    later = time.time() + 5
    os.utime(object_path(repo, snapshot_name(sid)), (later, later))
    fresh = reopen(repo)
    found, counts = requests_of(fresh, fresh.snapshots)
    assert counts["get"] == 1 and renamed in found


def test_without_the_key_the_cache_is_not_used(tmp_path: Path) -> None:
    repo, snaps = with_snapshots(tmp_path / "repo", 3)
    reopen(repo).snapshots()
    cache = repo.manifest_cache
    assert cache is not None
    before = sorted(os.listdir(cache.path))
    keyless = reopen(repo, key=False)
    assert keyless.manifest_cache is None
    found, counts = requests_of(keyless, keyless.snapshots)
    assert counts["get"] == 3 and sorted(ids(found)) == sorted(ids(snaps))
    assert sorted(os.listdir(cache.path)) == before


def test_a_repository_without_encryption_keeps_no_copies(tmp_path: Path) -> None:
    """Its manifests carry a checksum anyone can recompute: nothing could prove a kept copy sound."""
    repo, _ = with_snapshots(tmp_path / "repo", 2, "none")
    assert repo.manifest_cache is None
    assert counts_of_snapshots(repo)["get"] == 2
    assert not list((tmp_path / "cache").glob("*/manifests-*"))


def test_load_manifest_reads_the_store(tmp_path: Path) -> None:
    """verify checks the store's copy: load_manifest never answers from the cache."""
    repo, snaps = with_snapshots(tmp_path / "repo", 2)
    reopen(repo).snapshots()
    fresh = reopen(repo)
    assert requests_of(fresh, lambda: fresh.load_manifest(snaps[0].id))[1]["get"] == 1


def test_stale_temporary_files_are_removed_and_others_left(tmp_path: Path) -> None:
    repo, snaps = with_snapshots(tmp_path / "repo", 1)
    reopen(repo).snapshots()
    cache = repo.manifest_cache
    assert cache is not None
    old, new, other = (os.path.join(cache.path, n) for n in (".a.tmp", ".b.tmp", "notes"))
    for p in (old, new, other):
        with open(p, "wb") as f:
            f.write(b"x")
    long_ago = time.time() - STALE_TEMPORARY - 10
    os.utime(old, (long_ago, long_ago))
    reopen(repo).snapshots()
    assert not os.path.exists(old) and os.path.exists(new) and os.path.exists(other)
    assert os.path.exists(entry_path(repo, snaps[0].id))


def test_hostile_ids_are_never_paths(tmp_path: Path) -> None:
    repo, snaps = with_snapshots(tmp_path / "repo", 1)
    listed = repo.store.stat(snapshot_name(snaps[0].id))
    assert listed is not None
    cache = ManifestCache(repo.config.id, repo.store.location)
    for bad in ("../../x", "/etc/passwd", "", snaps[0].id + "/..", snaps[0].id.upper()):
        cache.save(bad, dataclasses.replace(listed, size=1), b"x")
        assert cache.load(bad, dataclasses.replace(listed, size=1)) is None
    assert not os.path.exists(cache.path)


def test_two_locations_of_one_repository_keep_apart(tmp_path: Path) -> None:
    repo, _ = with_snapshots(tmp_path / "repo", 2)
    reopen(repo).snapshots()
    a = ManifestCache(repo.config.id, repo.store.location)
    b = ManifestCache(repo.config.id, repo.store.location + "-copy")
    assert a.path != b.path and os.path.isdir(a.path) and not os.path.exists(b.path)


def test_processes_sharing_the_cache_never_see_a_partial_entry(tmp_path: Path) -> None:
    """Readers, writers and pruners of one folder at once (threads standing in for processes, each with
    its own Repository): every listing gets whole, authentic manifests, and the folder settles."""
    repo, snaps = with_snapshots(tmp_path / "repo", 12)
    forgotten = {s.id for s in snaps[8:]}
    errors: list[BaseException] = []

    def reader(rounds: int) -> None:
        try:
            for _ in range(rounds):
                found = ids(reopen(repo).snapshots())
                assert set(found) <= set(ids(snaps)) and set(found) >= set(ids(snaps)) - forgotten
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=reader, args=(6,)) for _ in range(4)]
    for t in threads:
        t.start()
    repo.store.delete(snapshot_name(sid) for sid in forgotten)
    for t in threads:
        t.join()
    assert errors == []
    warm = counts_of_snapshots(repo)
    assert warm["get"] == 0 and warm["list"] == 1
    cache = repo.manifest_cache
    assert cache is not None
    assert sorted(os.listdir(cache.path)) == sorted(set(ids(snaps)) - forgotten)


def test_a_cache_that_cannot_be_written_warns_once_and_reads_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo, snaps = with_snapshots(tmp_path / "repo", 3)
    cache = repo.manifest_cache
    assert cache is not None
    os.makedirs(os.path.dirname(cache.path), exist_ok=True)
    with open(cache.path, "wb"):  # a file where the folder should be
        pass
    caplog.set_level(logging.WARNING)
    fresh = reopen(repo)
    found, counts = requests_of(fresh, fresh.snapshots)
    assert sorted(ids(found)) == sorted(ids(snaps)) and counts["get"] == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "not saved" in r.getMessage()]
    assert len(warnings) == 1
