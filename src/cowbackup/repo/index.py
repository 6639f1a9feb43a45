"""Index segments and refs segments: the per-disk map from chunk positions to chunks.

A disk of ``size`` bytes has ``ceil(size / chunk_size)`` chunk positions.  Its index is cut into segments
of ``segment_entries`` positions (the last one shorter); each segment is stored as two objects:

* the **index segment** (sealed, encrypted in an encrypted repository): one :data:`ENTRY` per position,
  in order;
* the **refs segment** (sealed, never encrypted): the same records for the segment's non-zero entries,
  sorted by chunk id, without duplicates.  It tells, without the key, which stored objects the segment
  needs and their stored checksums (chunk ids are keyed, so a sorted list reveals no more than the
  object names themselves do).

Both are content-addressed (id = the repository's keyed hash of the plaintext for index segments, plain
SHA-256 of the plaintext for refs), so an unchanged segment of an incremental backup is not stored again.
Memory is bounded by one segment: nothing here holds a whole disk's entries.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

#: chunk id (32), stored length (u32), SHA-256 of the stored bytes (32); all zero for a zero chunk
ENTRY = struct.Struct(">32sI32s")
ENTRY_SIZE = ENTRY.size
ZERO_ID = bytes(32)
ZERO_ENTRY = bytes(ENTRY_SIZE)


@dataclass(frozen=True, slots=True)
class Entry:
    """One chunk position: ``chunk_id`` is ZERO_ID for a chunk that reads as zeros (stored nowhere)."""

    chunk_id: bytes
    stored_size: int
    stored_sha256: bytes

    @property
    def is_zero(self) -> bool:
        return self.chunk_id == ZERO_ID

    def pack(self) -> bytes:
        return ENTRY.pack(self.chunk_id, self.stored_size, self.stored_sha256)


ZERO = Entry(ZERO_ID, 0, bytes(32))


class SegmentBuilder:
    """Collects the entries of one segment, then gives its index and refs plaintexts."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._buf = bytearray(count * ENTRY_SIZE)  # zero-filled: every position starts as a zero chunk

    def set(self, position: int, entry: Entry) -> None:
        ENTRY.pack_into(
            self._buf, position * ENTRY_SIZE, entry.chunk_id, entry.stored_size, entry.stored_sha256
        )

    def set_packed(self, position: int, packed: bytes | memoryview) -> None:
        self._buf[position * ENTRY_SIZE : (position + 1) * ENTRY_SIZE] = packed

    def set_all(self, plaintext: bytes) -> None:
        """Every position at once, from an index plaintext of this segment's length (checked by
        :func:`check_entries`): an incremental starts from its parent's segment and overwrites what
        changed, with no per-entry work."""
        if len(plaintext) != len(self._buf):
            raise ValueError(f"{len(plaintext)} bytes of entries for a segment of {self.count}")
        self._buf[:] = plaintext

    def index_plaintext(self) -> bytes:
        return bytes(self._buf)

    def refs_plaintext(self) -> bytes:
        return refs_of(self._buf)


def refs_of(index_plaintext: bytes | bytearray | memoryview) -> bytes:
    """The refs plaintext of an index segment's plaintext: sorted unique non-zero records."""
    view = memoryview(index_plaintext)
    records = {bytes(view[i : i + ENTRY_SIZE]) for i in range(0, len(view), ENTRY_SIZE)}
    records.discard(ZERO_ENTRY)
    return b"".join(sorted(records))


def check_entries(plaintext: bytes, expected: int) -> None:
    """ValueError (with a reason) unless ``plaintext`` is ``expected`` entries (any number if negative),
    each consistent: a zero id has no size, a chunk id has one."""
    if len(plaintext) % ENTRY_SIZE or (expected >= 0 and len(plaintext) != expected * ENTRY_SIZE):
        raise ValueError(f"{len(plaintext)} bytes, not {expected} entries of {ENTRY_SIZE}")
    for chunk_id, size, _checksum in ENTRY.iter_unpack(plaintext):
        if (chunk_id == ZERO_ID) != (size == 0):
            raise ValueError("an entry with a zero id and a size, or a chunk id without one")


def parse_entries(plaintext: bytes, name: str, expected: int) -> list[Entry]:
    """The entries of an index or refs segment.  ValueError as :func:`check_entries`."""
    check_entries(plaintext, expected)
    return entries_of(plaintext)


def entries_of(plaintext: bytes) -> list[Entry]:
    """The entries of a plaintext :func:`check_entries` has accepted."""
    return [Entry(cid, size, sha) if size else ZERO for cid, size, sha in ENTRY.iter_unpack(plaintext)]
