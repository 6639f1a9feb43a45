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
from cowbackup.repo.writer import default_workers

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

    # Segments: exist, right size and checksum, refs consistent with the index (with the key).
    chunks: dict[str, Entry] = {}
    segment_chunks: dict[bytes, list[str]] = {}  # refs id -> chunk names (a segment shared is read once)
    needs: dict[str, set[str]] = {}  # snapshot id -> names of the objects it needs
    for snap in snaps:
        wanted = needs.setdefault(snap.id, set())
        for disk in snap.disks:
            for seg in disk.segments:
                wanted.update((index_name(seg.index_id), refs_name(seg.refs_id)))
                names = segment_chunks.get(seg.refs_id)
                if names is None:
                    names = segment_chunks[seg.refs_id] = _check_segment(repo, seg, listing, report, chunks)
                wanted.update(names)
    del segment_chunks

    # Chunks: presence and size from the listing; the data of a sample, each read once.
    for name, entry in chunks.items():
        report.objects += 1
        size = listing.get(name)
        if size is None:
            report.bad[name] = "missing"
        elif size != entry.stored_size:
            report.bad[name] = f"{size} bytes stored, the index says {entry.stored_size}"
    if read_data is not None:
        candidates = sorted(n for n in chunks if n not in report.bad)
        if read_data < 100:
            rng = random.Random(seed)
            candidates = rng.sample(candidates, round(len(candidates) * read_data / 100))
        limit = repo.config.chunk_size

        def check(name: str) -> tuple[str, int, str | None]:
            entry = chunks[name]
            try:
                stored = store.get(name, limit=entry.stored_size)
            except MissingObject:
                return name, 0, "missing"
            except CorruptObject as err:
                return name, 0, err.problem
            if len(stored) != entry.stored_size or not hmac.compare_digest(
                blob.stored_checksum(stored), entry.stored_sha256
            ):
                return name, len(stored), "stored checksum mismatch (bit rot or tampering)"
            if repo.has_key:
                try:
                    data = blob.unseal(name, blob.Kind.CHUNK, entry.chunk_id, stored, repo.keys, limit)
                    if repo.keys is None and not hmac.compare_digest(repo.hash(data), entry.chunk_id):
                        return name, len(stored), "its contents do not hash to its id"
                except CorruptObject as err:
                    return name, len(stored), err.problem
            return name, len(stored), None

        with concurrent.futures.ThreadPoolExecutor(workers or default_workers()) as pool:
            for name, nbytes, problem in pool.map(check, candidates):
                report.chunks_read += 1
                report.bytes_read += nbytes
                if problem is not None:
                    report.bad[name] = problem
                if progress is not None:
                    progress(nbytes)

    for sid, wanted in needs.items():
        lost = sorted(n for n in wanted if n in report.bad)
        if lost:
            report.damaged[sid] = lost
    if repair:
        _repair(repo, report, [s.id for s in snaps])
    return report


def _check_segment(
    repo: Repository, seg: SegmentRef, listing: dict[str, int], report: VerifyReport, chunks: dict[str, Entry]
) -> list[str]:
    """Check one index segment and its refs; the names of the chunks it needs (added to ``chunks``)."""
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
    names = []
    for entry in refs:
        name = chunk_name(entry.chunk_id)
        chunks.setdefault(name, entry)
        names.append(name)
    if iname not in listing:
        report.bad[iname] = "missing"
    elif not repo.has_key:
        if listing[iname] != seg.index_size:
            report.bad[iname] = f"{listing[iname]} bytes stored, the manifest says {seg.index_size}"
    else:
        try:
            entries = repo.read_index(seg)
        except (MissingObject, CorruptObject) as err:
            report.bad[iname] = err.problem if isinstance(err, CorruptObject) else "missing"
        else:
            if refs and refs_of(b"".join(e.pack() for e in entries)) != b"".join(e.pack() for e in refs):
                report.bad[rname] = "does not list what its index segment references"
    return names


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
