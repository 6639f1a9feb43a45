"""L2 tables in memory: an LRU cache, and the meaning of an L2 entry.

An L2 table is one cluster of big-endian u64 entries (qcow2.txt, "Cluster mapping").  Tables are kept
decoded (host-endian ``array('Q')``) so that a request can read and update a run of entries with slices.
The cache does no I/O: the node loads tables into it and writes back the dirty ones; a dirty table is
never dropped (the node writes it back first, in crash-safe order).
"""

from __future__ import annotations

import enum
import sys
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from cowbackup.block.drivers.qcow2.format import (
    L2E_COMPRESSED,
    L2E_COPIED,
    L2E_STD_RESERVED,
    L2E_ZERO,
    OFFSET_MASK,
)

_BIG_HOST = sys.byteorder == "big"


def decode_table(data: bytes) -> array[int]:
    """Entries of an on-disk L1 or L2 table."""
    arr = array("Q")
    arr.frombytes(data)
    if not _BIG_HOST:
        arr.byteswap()
    return arr


def encode_table(entries: array[int]) -> bytes:
    """Inverse of :func:`decode_table`."""
    if _BIG_HOST:
        return entries.tobytes()
    out = array("Q", entries)
    out.byteswap()
    return out.tobytes()


class Kind(enum.Enum):
    """What a guest cluster is, by its L2 entry."""

    UNALLOCATED = 0  # read from the backing file (or zeros)
    ZERO = 1  # reads zeros (v3 zero flag); may keep a host cluster
    DATA = 2  # a standard cluster at a host offset
    COMPRESSED = 3  # compressed data somewhere in one or more host clusters


@dataclass(frozen=True, slots=True)
class Mapping:
    """The meaning of one L2 entry (``host`` is the cluster offset, or the compressed data's offset)."""

    kind: Kind
    host: int = 0
    #: Compressed: length of the data in bytes (an upper bound: whole 512-byte sectors).
    csize: int = 0
    #: Standard cluster with refcount 1: may be written in place.
    copied: bool = False


UNALLOCATED = Mapping(Kind.UNALLOCATED)


def classify(entry: int, version: int, cluster_bits: int) -> Mapping:
    """Decode an L2 entry.  Raises ValueError for reserved bits or a misaligned offset."""
    if entry & L2E_COMPRESSED:
        x = 62 - (cluster_bits - 8)
        host = entry & ((1 << x) - 1)
        sectors = (entry >> x) & ((1 << (cluster_bits - 8)) - 1)
        return Mapping(Kind.COMPRESSED, host, (sectors + 1) * 512 - (host & 511))
    if entry & L2E_STD_RESERVED:
        raise ValueError(f"L2 entry {entry:#x} has reserved bits set")
    host = entry & OFFSET_MASK
    if host & ((1 << cluster_bits) - 1):
        raise ValueError(f"L2 entry {entry:#x} points at an offset that is not cluster aligned")
    copied = bool(entry & L2E_COPIED)
    if version >= 3 and entry & L2E_ZERO:
        return Mapping(Kind.ZERO, host, copied=copied)
    if host:
        return Mapping(Kind.DATA, host, copied=copied)
    return UNALLOCATED


def compressed_host_clusters(mapping: Mapping, cluster_bits: int) -> range:
    """The host clusters a compressed cluster's data touches (each holds one reference for it)."""
    first = mapping.host >> cluster_bits
    last = (mapping.host + mapping.csize - 1) >> cluster_bits
    return range(first, last + 1)


class L2Table:
    """One L2 table: its host offset, decoded entries and whether memory differs from disk."""

    __slots__ = ("dirty", "entries", "offset")

    def __init__(self, offset: int, entries: array[int]) -> None:
        self.offset = offset
        self.entries = entries
        self.dirty = False


class L2Cache:
    """LRU cache of L2 tables by L1 index, holding at most ``capacity`` tables plus dirty ones.

    Owned by the node, used under its metadata lock.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._tables: OrderedDict[int, L2Table] = OrderedDict()

    def get(self, l1_index: int) -> L2Table | None:
        table = self._tables.get(l1_index)
        if table is not None:
            self._tables.move_to_end(l1_index)
        return table

    def put(self, l1_index: int, table: L2Table) -> None:
        self._tables[l1_index] = table
        self._tables.move_to_end(l1_index)
        self._shrink()

    def _shrink(self) -> None:
        """Drop least recently used clean tables while over capacity."""
        if len(self._tables) <= self.capacity:
            return
        for key in [k for k, t in self._tables.items() if not t.dirty]:
            if len(self._tables) <= self.capacity:
                break
            del self._tables[key]

    def full_of_dirty(self) -> bool:
        """Over capacity with only dirty tables: the owner should write them back."""
        return len(self._tables) > self.capacity

    def dirty_tables(self) -> list[L2Table]:
        return [t for t in self._tables.values() if t.dirty]

    def written_back(self) -> None:
        """The dirty tables are on disk: mark them clean and shrink to capacity."""
        for table in self._tables.values():
            table.dirty = False
        self._shrink()

    def forget(self, l1_index: int) -> None:
        self._tables.pop(l1_index, None)

    def __len__(self) -> int:
        return len(self._tables)
