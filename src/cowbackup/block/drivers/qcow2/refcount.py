"""Refcounts of a qcow2 image held in memory, and the cluster allocator built on them.

The refcount table points at refcount blocks; each block holds ``cluster_size * 8 / refcount_bits``
refcounts.  All blocks are loaded when an image is opened read-write (a refcount costs ``refcount_bits/8``
bytes of memory: 32 MiB for a fully allocated 1 TiB image with 64 KiB clusters) into one flat array
indexed by host cluster number, so that allocation never waits for I/O.

Nothing here does I/O.  The owner writes back what :meth:`Refcounts.dirty_blocks` and
:meth:`Refcounts.table_bytes` give, in the crash-safe order described in ``node.py``.

Decrements are *deferred*: :meth:`Refcounts.defer_free` only records them, and :meth:`apply_frees` (called
once the tables that stopped referencing the clusters are on disk) applies them.  So a freed cluster is
never handed out again while some table on disk may still point at it -- a crash can leak clusters but
never make two tables share one.
"""

from __future__ import annotations

import errno
import sys
from array import array

from cowbackup.block.drivers.qcow2.format import REFT_RESERVED, InvalidImage
from cowbackup.block.errors import RequestError

#: Array type code able to hold one refcount of ``1 << order`` bits (sub-byte orders use bytes).
_TYPECODES = {0: "B", 1: "B", 2: "B", 3: "B", 4: "H", 5: "I", 6: "Q"}
_BIG_HOST = sys.byteorder == "big"


def decode_block(data: bytes, order: int) -> array[int]:
    """Refcounts of one on-disk refcount block (big-endian, or LSB-first bit fields below 8 bits)."""
    bits = 1 << order
    if bits >= 8:
        arr = array(_TYPECODES[order])
        if arr.itemsize != bits // 8:
            raise InvalidImage(f"qcow2: refcount width {bits} is not supported on this host")
        arr.frombytes(data)
        if not _BIG_HOST and bits > 8:
            arr.byteswap()
        return arr
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    return array("B", [(byte >> (i * bits)) & mask for byte in data for i in range(per_byte)])


def encode_block(refs: array[int], order: int) -> bytes:
    """Inverse of :func:`decode_block`."""
    bits = 1 << order
    if bits >= 8:
        if _BIG_HOST or bits == 8:
            return refs.tobytes()
        swapped = array(refs.typecode, refs)
        swapped.byteswap()
        return swapped.tobytes()
    per_byte = 8 // bits
    out = bytearray(len(refs) // per_byte)
    for i, value in enumerate(refs):
        out[i // per_byte] |= value << ((i % per_byte) * bits)
    return bytes(out)


class Refcounts:
    """The refcount table and every refcount block of an image opened read-write.

    Owned by the node; touched only under its metadata lock.  ``refs[c]`` is the refcount of host cluster
    ``c``; the array always covers whole refcount blocks.  ``table[b]`` is the host offset of refcount
    block ``b`` (0: not allocated, every cluster it would cover is free).
    """

    def __init__(self, cluster_bits: int, order: int, table_offset: int, table_clusters: int) -> None:
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.order = order
        self.max_refcount = (1 << (1 << order)) - 1
        #: Refcounts per refcount block.
        self.per_block = self.cluster_size * 8 >> order
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.table: list[int] = []
        self.refs: array[int] = array(_TYPECODES[order])
        self.dirty: set[int] = set()
        #: Indices of table entries changed since the last write-back.
        self.table_dirty: set[int] = set()
        #: The table moved (grown): (old offset, old clusters), freed once the header points elsewhere.
        self.moved_from: tuple[int, int] | None = None
        #: Deferred decrements (a cluster may appear more than once).
        self.pending_free: list[int] = []
        #: No free cluster lies below this index (an allocation search starts here).
        self.hint = 0
        #: One past the highest cluster ever allocated: the image file must be at least this long.
        self.high = 0
        #: The whole table must be written (it moved to clusters that were never written).
        self._rewrite_table = False

    # ------------------------------------------------------------------ loading

    def load_table(self, data: bytes, file_size: int) -> None:
        """Take the on-disk refcount table; check each entry (alignment, inside the file, no repeats)."""
        seen: set[int] = set()
        table = []
        for i in range(len(data) // 8):
            entry = int.from_bytes(data[i * 8 : i * 8 + 8], "big")
            if entry & REFT_RESERVED:
                raise InvalidImage(f"qcow2: refcount table entry {i} has reserved bits set")
            if entry:
                if entry % self.cluster_size or entry + self.cluster_size > file_size:
                    raise InvalidImage(f"qcow2: refcount block {i} at {entry:#x} is invalid or beyond EOF")
                if i * self.per_block > (file_size >> self.cluster_bits) + self.per_block:
                    raise InvalidImage(f"qcow2: refcount block {i} covers clusters far beyond the file's end")
                if entry in seen:
                    raise InvalidImage(f"qcow2: refcount block {i} at {entry:#x} is used twice")
                seen.add(entry)
            table.append(entry)
        while table and table[-1] == 0:
            table.pop()
        self.table = table
        self.refs = array(self.refs.typecode, bytes(len(table) * self.per_block * self.refs.itemsize))

    def loaded(self) -> None:
        """All blocks are loaded: find the end of the allocated clusters."""
        self.high = self.end_of_image()

    def load_block(self, index: int, data: bytes) -> None:
        """Decode refcount block ``index`` from its on-disk bytes into the flat array."""
        start = index * self.per_block
        self.refs[start : start + self.per_block] = decode_block(data, self.order)

    @property
    def table_capacity(self) -> int:
        return self.table_clusters * self.cluster_size // 8

    # ------------------------------------------------------------------ queries

    def get(self, cluster: int) -> int:
        return self.refs[cluster] if cluster < len(self.refs) else 0

    def _covered(self, block: int) -> bool:
        return block < len(self.table) and self.table[block] != 0

    def _extend(self, blocks: int) -> None:
        """Grow the array and the table list to cover ``blocks`` refcount blocks."""
        want = blocks * self.per_block
        if len(self.refs) < want:
            self.refs.extend(array(self.refs.typecode, bytes((want - len(self.refs)) * self.refs.itemsize)))
        while len(self.table) < blocks:
            self.table.append(0)

    def _set_one(self, cluster: int, value: int) -> None:
        self.refs[cluster] = value
        self.dirty.add(cluster // self.per_block)
        if value:
            self.high = max(self.high, cluster + 1)

    # ------------------------------------------------------------------ allocation

    def _next_free(self, start: int) -> int:
        if start >= len(self.refs):
            return start
        try:
            return self.refs.index(0, start)
        except ValueError:
            return len(self.refs)

    def allocate(self, count: int) -> list[tuple[int, int]]:
        """Allocate ``count`` clusters, as few contiguous runs as the free space allows.

        Returns ``(first_cluster, n)`` runs in allocation order; their refcounts are 1.  New refcount
        blocks (and a grown refcount table) are laid out as needed and marked dirty.
        """
        runs: list[tuple[int, int]] = []
        while count > 0:
            start = self._next_free(self.hint)
            block = start // self.per_block
            if not self._covered(block):
                self._new_block(block, start)
                continue
            end = start + 1
            block_end = (block + 1) * self.per_block
            while end - start < count and end < block_end and self.refs[end] == 0:
                end += 1
            self.refs[start:end] = array(self.refs.typecode, [1]) * (end - start)
            self.dirty.add(block)
            self.hint = end
            self.high = max(self.high, end)
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1] = (runs[-1][0], runs[-1][1] + end - start)
            else:
                runs.append((start, end - start))
            count -= end - start
        return runs

    def allocate_contiguous(self, count: int) -> int:
        """Allocate ``count`` clusters in one run (a table that must be contiguous); its first cluster.

        Free space below the end of the image is tried first; when it is fragmented, or a new refcount
        block lands in the middle, the clusters are given back and the search moves to the end of the
        image, where everything is free.  Raises RequestError (ENOSPC) if no run is found.
        """
        low = self.hint
        try:
            for _ in range(64):
                runs = self.allocate(count)
                if len(runs) == 1:
                    return runs[0][0]
                for start, n in runs:
                    self.release(start, n)
                    low = min(low, start)
                self.hint = self.high
        finally:
            self.hint = min(self.hint, low)
        raise RequestError(errno.ENOSPC, f"qcow2: no room for {count} contiguous clusters")

    def release(self, start: int, count: int) -> None:
        """Give back clusters just allocated and never referenced (not even by anything on disk)."""
        for c in range(start, start + count):
            self.refs[c] = 0
            self.dirty.add(c // self.per_block)
        self.hint = min(self.hint, start)

    def allocate_one(self) -> int:
        """Allocate a single cluster; its index."""
        return self.allocate(1)[0][0]

    def _new_block(self, block: int, cluster: int) -> None:
        """Create refcount block ``block``, stored at ``cluster`` (free, and covered by the block itself)."""
        if block >= self.table_capacity:
            self._grow_table(block + 1)
            return  # the layout changed: the caller searches again
        self._extend(block + 1)
        self.table[block] = cluster << self.cluster_bits
        self.table_dirty.add(block)
        self._set_one(cluster, 1)

    def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a larger place at the end of the image.

        Layout at the first uncovered block ``k`` (the array's end)::

            | refblock k | refblock k+1 | ... | new table ...... |
              m blocks cover themselves and the table

        The old table is freed once the header points at the new one (see ``moved_from``).
        """
        per_cluster = self.cluster_size // 8
        first = len(self.refs)
        k = first // self.per_block
        m = 1
        while True:
            entries = max(min_entries, k + m, 2 * self.table_capacity)
            clusters = -(-entries // per_cluster)
            need = -(-(m + clusters) // self.per_block)
            if need <= m:
                break
            m = need
        self._extend(k + m)
        for j in range(m):
            self.table[k + j] = (first + j) << self.cluster_bits
            self._set_one(first + j, 1)
        for c in range(first + m, first + m + clusters):
            self._set_one(c, 1)
        if self.moved_from is None:
            self.moved_from = (self.table_offset, self.table_clusters)
        else:
            # Moved twice between write-backs: the intermediate table was never on disk; free it now.
            self.pending_free.extend(self._clusters_of(self.table_offset, self.table_clusters))
        self.table_offset = (first + m) << self.cluster_bits
        self.table_clusters = clusters
        self._rewrite_table = True
        self.hint = min(self.hint, first + m + clusters)

    def _clusters_of(self, offset: int, clusters: int) -> range:
        first = offset >> self.cluster_bits
        return range(first, first + clusters)

    # ------------------------------------------------------------------ freeing

    def increment(self, cluster: int) -> None:
        """Add a reference to an allocated cluster (a compressed cluster sharing a host cluster)."""
        value = self.get(cluster)
        if value == 0 or value >= self.max_refcount:
            raise ValueError(f"refcount of cluster {cluster} is {value}: cannot add a reference")
        self._set_one(cluster, value + 1)

    def defer_free(self, cluster: int) -> None:
        """Drop one reference to ``cluster`` at the next :meth:`apply_frees`."""
        self.pending_free.append(cluster)

    def table_moved(self) -> None:
        """The header now points at the new table: the old one may be freed."""
        if self.moved_from is not None:
            self.pending_free.extend(self._clusters_of(*self.moved_from))
            self.moved_from = None

    def apply_frees(self) -> list[int]:
        """Apply the deferred decrements; clusters that reached 0 may be reused.  Returns bad clusters
        (a decrement of a free cluster: the image was inconsistent) -- they are left at 0."""
        bad = []
        for cluster in self.pending_free:
            value = self.get(cluster)
            if value == 0:
                bad.append(cluster)
                continue
            self._set_one(cluster, value - 1)
            if value == 1:
                self.hint = min(self.hint, cluster)
        self.pending_free.clear()
        return bad

    # ------------------------------------------------------------------ write-back

    def dirty_blocks(self) -> list[tuple[int, bytes]]:
        """``(host offset, bytes)`` of every dirty refcount block; clears the dirty set."""
        out = []
        for block in sorted(self.dirty):
            start = block * self.per_block
            out.append(
                (self.table[block], encode_block(self.refs[start : start + self.per_block], self.order))
            )
        self.dirty.clear()
        return out

    def table_writes(self) -> list[tuple[int, bytes]]:
        """``(host offset, bytes)`` of the table clusters with changed entries (the whole table after a
        move); clears the dirty set."""
        per_cluster = self.cluster_size // 8
        if self._rewrite_table:
            clusters = list(range(self.table_clusters))
        else:
            clusters = sorted({i // per_cluster for i in self.table_dirty})
        self.table_dirty.clear()
        self._rewrite_table = False
        out = []
        for c in clusters:
            entries = self.table[c * per_cluster : (c + 1) * per_cluster]
            data = b"".join(e.to_bytes(8, "big") for e in entries).ljust(self.cluster_size, b"\0")
            out.append((self.table_offset + c * self.cluster_size, data))
        return out

    def end_of_image(self) -> int:
        """One past the highest allocated cluster (a scan from the end)."""
        i = len(self.refs)
        while i > 0 and self.refs[i - 1] == 0:
            i -= 1
        return i

    @property
    def dirty_any(self) -> bool:
        return bool(self.dirty or self.table_dirty or self._rewrite_table or self.moved_from)
