"""The local cache of chunks known to be in a repository: a known chunk costs no request at all.

One file per repository, ``$COWBACKUP_CACHE_DIR`` or ``~/.cache/cowbackup/<repository id>/chunks``::

    line 1   JSON {"repository": ID, "gc_seq": N, "count": M}
    then     M records of 68 bytes: chunk id (32), stored size (u32 BE), SHA-256 of the stored bytes (32)

Safe to delete; never trusted blindly.  ``gc_seq`` is the highest gc record number up to which every
record has been applied and swept (the objects it names were dropped from the cache).  On load, the
chunks named by every newer record -- swept or still pending -- are dropped; if records the cache never
saw were pruned meanwhile, the cache is thrown away and rebuilt from a listing of ``chunks/`` and the
refs segments of the snapshots (which carry the stored checksums).  Several processes may share the
file: each writes it whole, atomically, at its end; the last one wins, and what the others learnt is
merely not cached.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import struct

from cowbackup.repo import gc
from cowbackup.repo.cachedir import cache_dir, location_tag
from cowbackup.repo.errors import CorruptObject, MissingObject
from cowbackup.repo.index import ENTRY, ENTRY_SIZE
from cowbackup.repo.repository import Repository, chunk_name, id_from_name

log = logging.getLogger(__name__)

#: chunk id -> packed index entry (id, stored size, stored checksum)
Known = dict[bytes, bytes]
#: One record of the cache file, whole.
_RECORD = struct.Struct(f"{ENTRY_SIZE}s")


class ChunkCache:
    """The known chunks of one repository, loaded and brought up to date with its gc records."""

    def __init__(self, repo: Repository, *, enabled: bool = True) -> None:
        self.repo = repo
        self.enabled = enabled
        # One file per location too: two copies of a repository share its id but not its chunks.
        self.path = os.path.join(cache_dir(repo.config.id), f"chunks-{location_tag(repo.store.location)}")
        self.known: Known = {}
        self.gc_seq = 0
        self.rebuilt = False

    def load(self, state: gc.GcState) -> None:
        """Read the file and apply ``state`` (the gc records a session saw after writing its record)."""
        if not self.enabled:
            return
        fresh = self._read_file()
        seen_all = self.gc_seq <= state.highest and all(
            seq in state.records for seq in range(self.gc_seq + 1, state.highest + 1)
        )
        if fresh and not seen_all:
            log.info("chunk cache: gc records it never saw were pruned (or gc/ was reset); rebuilding it")
            fresh = False
        if not fresh:
            # The rebuilt cache reflects the store after every deletion so far; applying the records
            # still drops the names of pending ones (they may yet delete) and sets gc_seq.
            self._rebuild()
            self.gc_seq = min(state.records, default=1) - 1
        self._apply(state)

    def _read_file(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                header = json.loads(f.readline(4096))
                if not isinstance(header, dict) or header.get("repository") != self.repo.config.id:
                    return False
                count = int(header["count"])
                gc_seq = int(header.get("gc_seq", 0))
                if count < 0 or gc_seq < 0:
                    return False
                data = f.read(count * ENTRY_SIZE + 1)
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return False  # a cache we cannot read is rebuilt, never trusted
        if len(data) != count * ENTRY_SIZE:
            return False
        self.gc_seq = gc_seq
        # Each record sliced once, as bytes (a backup's start-up reads every known chunk: keep it cheap).
        self.known = {record[:32]: record for (record,) in _RECORD.iter_unpack(data)}
        return True

    def _rebuild(self) -> None:
        """From the store: chunks that exist, with checksums from the snapshots' refs segments."""
        self.rebuilt = True
        self.known = {}
        self.gc_seq = 0
        sizes: dict[bytes, int] = {}
        for info in self.repo.store.list("chunks/"):
            cid = id_from_name(info.name)
            if cid is not None:
                sizes[cid] = info.size
        if not sizes:
            return
        seen: set[bytes] = set()
        for snap in self.repo.snapshots(skip_corrupt=True):  # manifests from the manifest cache
            for disk in snap.disks:
                for seg in disk.segments:
                    if seg.refs_id in seen:
                        continue
                    seen.add(seg.refs_id)
                    try:
                        refs = self.repo.read_refs(seg, seg.entries)
                    except (MissingObject, CorruptObject):
                        continue
                    for e in refs:
                        if sizes.get(e.chunk_id) == e.stored_size:
                            self.known[e.chunk_id] = e.pack()

    def _apply(self, state: gc.GcState) -> None:
        """Forget the chunks of every record above ``gc_seq``, pending ones included: a sweep that died
        or ran out of time may already have deleted part of a pending record, and one numbered above a
        pending record may be swept already.  ``gc_seq`` only moves over swept records, so pending ones
        are applied again by every later load until they are swept."""
        advancing = True
        for seq in sorted(state.records):
            if seq <= self.gc_seq:
                continue
            for kind in ("condemned", "quarantine"):  # one number may hold both (gc.write_record)
                if kind not in state.records[seq]:
                    continue
                try:
                    names = gc.read_names(self.repo.store, seq, kind)
                except (MissingObject, CorruptObject):
                    self.known.clear()  # pruned under us, or unreadable: trust nothing
                    names = []
                for name in names:
                    cid = id_from_name(name)
                    if cid is not None and name == chunk_name(cid):
                        self.known.pop(cid, None)
            advancing = advancing and state.is_swept(seq)
            if advancing:
                self.gc_seq = seq

    def save(self) -> None:
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{secrets.token_hex(4)}.tmp"
        header = {"repository": self.repo.config.id, "gc_seq": self.gc_seq, "count": len(self.known)}
        try:
            with open(tmp, "wb") as f:
                f.write(json.dumps(header).encode() + b"\n")
                f.write(b"".join(self.known.values()))
            os.replace(tmp, self.path)
        except OSError as err:
            log.warning("chunk cache not saved: %s", err)
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def unpack(packed: bytes) -> tuple[bytes, int, bytes]:
    cid, size, checksum = ENTRY.unpack(packed)
    return cid, size, checksum
