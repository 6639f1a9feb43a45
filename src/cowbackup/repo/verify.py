"""``verify``: are the snapshots whole?  Find missing and bit-rotten objects, quarantine them, record
which snapshots they damage.

Without ``read_data`` every object a snapshot needs must exist with the right stored size, from one
listing (not one request per object); index and refs segments are read (they are small) and checked.
With ``read_data`` (a percentage of the unique chunks, 100 by default) each chosen chunk is read once per
run, however many snapshots share it: its stored checksum is checked (this needs no key), and with the
key it is also authenticated, decompressed and re-hashed.

A bad object is moved to ``quarantine/`` (a missing one is only reported), a ``quarantine`` gc record
makes every chunk cache forget it, and ``damage/<snapshot id>`` records what each damaged snapshot lacks
(manifests are never rewritten).  The next backup that holds the same data stores it again; a later
verify that finds a snapshot whole again removes its damage record.
"""

from __future__ import annotations

import concurrent.futures
import hmac
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cowbackup.repo import blob, gc
from cowbackup.repo.errors import CorruptObject, MissingObject, StoreError
from cowbackup.repo.index import Entry, refs_of
from cowbackup.repo.manifest import Manifest, SegmentRef
from cowbackup.repo.repository import DAMAGE, Repository, chunk_name, index_name, refs_name, snapshot_name
from cowbackup.repo.workers import default_workers

QUARANTINE = "quarantine/"
Progress = Callable[[int], None]


@dataclass
class VerifyReport:
    snapshots: int = 0
    objects: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    #: object name -> what is wrong with it
    bad: dict[str, str] = field(default_factory=dict)
    #: snapshot id -> names of the bad objects it needs
    damaged: dict[str, list[str]] = field(default_factory=dict)
    quarantined: list[str] = field(default_factory=list)
    healed: list[str] = field(default_factory=list)
    #: snapshot id -> chunks stored again since that snapshot recorded them (the copy differs from its
    #: record, matches another snapshot's): sound if authenticated, which needs the key
    unconfirmed: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.bad and not self.damaged


def verify(
    repo: Repository,
    snapshot_ids: list[str] | None = None,
    *,
    read_data: float | None = None,
    repair: bool = True,
    workers: int = 0,
    progress: Progress | None = None,
    seed: int | None = None,
) -> VerifyReport:
    """Verify the given snapshots (all by default); see the module docstring.  ``read_data`` is a
    percentage (0-100] of the unique chunks to read, or None to check presence and sizes only."""
    report = VerifyReport()
    store = repo.store
    ids = snapshot_ids if snapshot_ids is not None else repo.snapshot_ids()
    listing = {info.name: info.size for prefix in gc.GARBAGE_PREFIXES for info in store.list(prefix)}
    snaps: list[Manifest] = []
    for sid in ids:
        try:
            snaps.append(repo.load_manifest(sid))
        except MissingObject:
            continue
        except CorruptObject as err:
            report.bad[snapshot_name(sid)] = err.problem
            report.damaged[sid] = [snapshot_name(sid)]
    report.snapshots = len(snaps) + len(report.damaged)

    # Segments: exist, right size and checksum, refs consistent with the index (with the key).  A chunk
    # stored again (healed, with a fresh nonce) has other stored bytes than older snapshots recorded:
    # every (size, checksum) some snapshot recorded for a name is a copy we may find.
    chunks: dict[str, Entry] = {}
    records: dict[str, set[tuple[int, bytes]]] = {}  # chunk name -> recorded (stored size, checksum)
    segment_chunks: dict[bytes, list[Entry]] = {}  # refs id -> its records (a shared segment is read once)
    needs: dict[str, set[str]] = {}  # snapshot id -> names of the segments it needs
    needs_chunks: dict[str, list[bytes]] = {}  # snapshot id -> refs ids of its segments
    for snap in snaps:
        wanted = needs.setdefault(snap.id, set())
        for disk in snap.disks:
            for seg in disk.segments:
                wanted.update((index_name(seg.index_id), refs_name(seg.refs_id)))
                if seg.refs_id not in segment_chunks:
                    segment_chunks[seg.refs_id] = _check_segment(repo, seg, listing, report)
                needs_chunks.setdefault(snap.id, []).append(seg.refs_id)
    for entries in segment_chunks.values():
        for entry in entries:
            name = chunk_name(entry.chunk_id)
            chunks.setdefault(name, entry)
            records.setdefault(name, set()).add((entry.stored_size, entry.stored_sha256))
    if not repo.has_key and snapshot_ids is not None:
        # Without the key only a record tells a sound copy from a rotten one: the copy a later backup
        # stored may be recorded by snapshots we were not asked to check.
        _add_other_records(repo, set(ids), records)

    # Chunks: presence and size from the listing; the data of a sample, each read once.
    for name in chunks:
        report.objects += 1
        size = listing.get(name)
        if size is None:
            report.bad[name] = "missing"
        elif all(size != recorded for recorded, _ in records[name]):
            report.bad[name] = f"{size} bytes stored, the index says {chunks[name].stored_size}"
    present: dict[str, tuple[int, bytes]] = {}  # what the chunks read hold now
    if read_data is not None:
        candidates = sorted(n for n in chunks if n not in report.bad)
        if read_data < 100:
            rng = random.Random(seed)
            candidates = rng.sample(candidates, round(len(candidates) * read_data / 100))
        limit = repo.config.chunk_size

        def check(name: str) -> tuple[str, int, bytes, str | None]:
            entry = chunks[name]
            try:
                stored = store.get(name, limit=max(size for size, _ in records[name]))
            except MissingObject:
                return name, 0, b"", "missing"
            except CorruptObject as err:
                return name, 0, b"", err.problem
            checksum = blob.stored_checksum(stored)
            if (len(stored), checksum) not in records[name] and not repo.has_key:
                return name, len(stored), checksum, "stored checksum mismatch (bit rot or tampering)"
            if repo.has_key:
                # A copy stored again after these snapshots recorded theirs: authentication decides.
                try:
                    data = blob.unseal(name, blob.Kind.CHUNK, entry.chunk_id, stored, repo.keys, limit)
                    if repo.keys is None and not hmac.compare_digest(repo.hash(data), entry.chunk_id):
                        return name, len(stored), checksum, "its contents do not hash to its id"
                except CorruptObject as err:
                    return name, len(stored), checksum, err.problem
            return name, len(stored), checksum, None

        with concurrent.futures.ThreadPoolExecutor(workers or default_workers()) as pool:
            for name, nbytes, checksum, problem in pool.map(check, candidates):
                report.chunks_read += 1
                report.bytes_read += nbytes
                if problem is not None:
                    report.bad[name] = problem
                else:
                    present[name] = (nbytes, checksum)
                if progress is not None:
                    progress(nbytes)

    for sid, wanted in needs.items():
        lost = {n for n in wanted if n in report.bad}
        restored = set()
        for refs_id in needs_chunks.get(sid, ()):
            for entry in segment_chunks[refs_id]:
                name = chunk_name(entry.chunk_id)
                if name in report.bad:
                    lost.add(name)
                elif name in present and present[name] != (entry.stored_size, entry.stored_sha256):
                    restored.add(name)
        if lost:
            report.damaged[sid] = sorted(lost)
        if restored and not repo.has_key:
            report.unconfirmed[sid] = sorted(restored)
    if repair:
        _repair(repo, report, [s.id for s in snaps])
    return report


def _add_other_records(
    repo: Repository, checked: set[str], records: dict[str, set[tuple[int, bytes]]]
) -> None:
    for sid in repo.snapshot_ids():
        if sid in checked:
            continue
        try:
            snap = repo.load_manifest(sid)
            for disk in snap.disks:
                for seg in disk.segments:
                    for entry in repo.read_refs(seg, seg.entries):
                        name = chunk_name(entry.chunk_id)
                        if name in records:
                            records[name].add((entry.stored_size, entry.stored_sha256))
        except (MissingObject, CorruptObject):
            continue


def _check_segment(
    repo: Repository, seg: SegmentRef, listing: dict[str, int], report: VerifyReport
) -> list[Entry]:
    """Check one index segment and its refs; the records of the chunks it needs."""
    iname, rname = index_name(seg.index_id), refs_name(seg.refs_id)
    report.objects += 2
    try:
        refs = repo.read_refs(seg, seg.entries)
    except MissingObject:
        report.bad[rname] = "missing"
        refs = []
    except CorruptObject as err:
        report.bad[rname] = err.problem
        refs = []
    if iname not in listing:
        report.bad[iname] = "missing"
    elif not repo.has_key:
        try:
            stored = repo.store.get(iname, limit=seg.index_size)
            if len(stored) != seg.index_size or not hmac.compare_digest(
                blob.stored_checksum(stored), seg.index_sha256
            ):
                report.bad[iname] = "stored checksum mismatch (bit rot or tampering)"
        except MissingObject:
            report.bad[iname] = "missing"
        except CorruptObject as err:
            report.bad[iname] = err.problem
    else:
        try:
            entries = repo.read_index(seg)
        except (MissingObject, CorruptObject) as err:
            report.bad[iname] = err.problem if isinstance(err, CorruptObject) else "missing"
        else:
            if refs and refs_of(b"".join(e.pack() for e in entries)) != b"".join(e.pack() for e in refs):
                report.bad[rname] = "does not list what its index segment references"
    return refs


def _repair(repo: Repository, report: VerifyReport, checked: list[str]) -> None:
    """Quarantine bad objects, record damaged snapshots, clear the records of whole ones."""
    store = repo.store
    moved = []
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for name, problem in sorted(report.bad.items()):
        if problem == "missing" or name.startswith("snapshots/"):
            continue
        try:
            data = store.get(name, limit=blob.max_stored_size(repo.config.chunk_size) + (64 << 20))
            store.put(f"{QUARANTINE}{name.replace('/', '.')}.{stamp}", data)
            store.delete([name])
            moved.append(name)
        except (MissingObject, CorruptObject, StoreError):
            continue
    if moved:
        gc.write_record(store, "quarantine", moved)
        report.quarantined = moved
    for sid, lost in report.damaged.items():
        body = {"snapshot": sid, "time": stamp, "objects": {n: report.bad.get(n, "?") for n in lost}}
        store.put(DAMAGE + sid, json.dumps(body, indent=1).encode())
    existing = repo.damage()
    for sid in checked:
        if sid in existing and sid not in report.damaged:
            store.delete([DAMAGE + sid])
            report.healed.append(sid)
