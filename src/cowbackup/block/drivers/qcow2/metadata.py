"""The metadata of an open qcow2 image: L1 table, L2 cache, refcounts, and their crash-safe write-back.

Metadata changes are made in memory under :attr:`Metadata.lock` and reach the disk in :meth:`writeback`
(on flush, close, or when the L2 cache is full of dirty tables), in this order::

    1. flush the file             data written so far is stable before any table points at it
    2. refcount blocks, flush     new clusters are accounted for before anything uses them
       refcount table, flush      (a grown table: then the header, flush)
    3. L2 tables, flush           new L2 tables are complete before the L1 points at them
    4. L1 table, flush
    5. deferred frees, flush      a cluster's refcount drops only once no table on disk points at it

A crash at any point leaves every table on disk pointing at clusters whose refcount on disk counts the
reference: at worst clusters are leaked (``qemu-img check -r leaks`` reclaims them).

Reads and writes of image files go through the ``file`` child node, so any protocol node works.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from array import array
from collections.abc import Awaitable, Callable

from cowbackup.block.drivers.file import FileNode
from cowbackup.block.drivers.qcow2.format import (
    AUTOCLEAR_KNOWN,
    AUTOCLEAR_OFFSET,
    L1E_RESERVED,
    L2E_COPIED,
    OFFSET_MASK,
    REFTABLE_FIELDS,
    REFTABLE_FIELDS_OFFSET,
    Header,
    InvalidImage,
    build_header_cluster,
)
from cowbackup.block.drivers.qcow2.l2cache import L2Cache, L2Table, decode_table, encode_table
from cowbackup.block.drivers.qcow2.refcount import Refcounts
from cowbackup.block.errors import RequestError
from cowbackup.block.node import BlockNode

log = logging.getLogger(__name__)


class CorruptImage(RequestError):
    """The image's metadata is inconsistent (found on access).  Writes to the node are refused from then
    on; the image file is not marked (QEMU sets the corrupt bit; we leave the file as it is)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, f"qcow2: {message}")


async def grow_file(node: BlockNode, size: int) -> None:
    """Make the image file at least ``size`` bytes long (sparse).  Only ``file`` nodes on regular files
    can grow; anything else fails with ENOSPC when it is too short."""
    if size <= node.size:
        return
    if not isinstance(node, FileNode):
        raise RequestError(errno.ENOSPC, f"qcow2: image file '{node.node_name}' cannot grow to {size} bytes")
    await node.grow(size)


#: Bounds of the room grown ahead of allocation (see :meth:`Metadata.grow_to`).
GROW_MIN = 32 << 20
GROW_MAX = 256 << 20


class Metadata:
    """State of one open image shared by all its requests.  Every field is touched under ``lock``."""

    def __init__(self, hdr: Header, file: Callable[[], BlockNode], l2_cache_tables: int) -> None:
        self.hdr = hdr
        self.cluster_bits = hdr.cluster_bits
        self.cluster_size = hdr.cluster_size
        self._file = file
        self.lock = asyncio.Lock()
        #: Serialises :meth:`grow_to` (never held while waiting for ``lock``).
        self._grow_lock = asyncio.Lock()
        #: Length of the image file when its refcounts were loaded (``trim`` never cuts below it).
        self._size_at_open = 0
        self.l1: array[int] = array("Q")
        self.l1_dirty: set[int] = set()
        self.l2 = L2Cache(l2_cache_tables)
        #: Loaded for read-write images only.
        self.refcounts: Refcounts | None = None
        #: Host clusters holding metadata (header, tables): never written as data.
        self.meta_clusters: set[int] = set()
        #: Set when metadata was found inconsistent: writes are refused.
        self.broken: str | None = None
        #: Data reads in flight: deferred frees wait until none reads a cluster that might be freed.
        self.reads = 0
        #: Called after deferred frees were applied (the compressed-write tail may have been freed).
        self.on_freed: Callable[[], None] = lambda: None
        #: Called once before the first change to the image (stored bitmaps become stale then).
        self.on_first_write: Callable[[], Awaitable[None]] | None = None
        self._written = False

    @property
    def file(self) -> BlockNode:
        return self._file()

    def corrupt(self, message: str) -> CorruptImage:
        """Record the inconsistency (writes refused from now on) and return the error to raise."""
        if self.broken is None:
            self.broken = message
            log.error("qcow2 image on '%s' is corrupt: %s", self.file.node_name, message)
        return CorruptImage(message)

    # ------------------------------------------------------------------ loading

    async def read_bytes(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.file.read(offset, buf)
        return bytes(buf)

    async def load_l1(self) -> None:
        hdr = self.hdr
        data = await self.read_bytes(hdr.l1_table_offset, hdr.l1_size * 8) if hdr.l1_size else b""
        self.l1 = decode_table(data)
        size = self.file.size
        for i, entry in enumerate(self.l1):
            off = entry & OFFSET_MASK
            if entry & L1E_RESERVED:
                raise InvalidImage(f"qcow2: L1 entry {i} has reserved bits set")
            if off % self.cluster_size or (off + self.cluster_size > size and off):
                raise InvalidImage(f"qcow2: L2 table {i} at {off:#x} is misaligned or beyond the end of file")
        # The fixed metadata (also known read-only: bitmaps are checked against it).
        meta = self.meta_clusters
        meta.add(0)
        meta.update(self.clusters(hdr.l1_table_offset, hdr.l1_size * 8))
        meta.update(self.clusters(hdr.refcount_table_offset, hdr.refcount_table_clusters * self.cluster_size))
        meta.update((e & OFFSET_MASK) >> self.cluster_bits for e in self.l1 if e & OFFSET_MASK)

    async def load_refcounts(self) -> None:
        """Load the refcount table and every block; note which clusters hold metadata."""
        hdr = self.hdr
        cs = self.cluster_size
        rc = Refcounts(
            hdr.cluster_bits, hdr.refcount_order, hdr.refcount_table_offset, hdr.refcount_table_clusters
        )
        self._size_at_open = self.file.size
        table = await self.read_bytes(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs)
        rc.load_table(table, self.file.size)
        for index, off in enumerate(rc.table):
            if off:
                rc.load_block(index, await self.read_bytes(off, cs))
                self.meta_clusters.add(off >> self.cluster_bits)
        rc.loaded()
        self.refcounts = rc
        for c in self.meta_clusters:
            if rc.get(c) == 0:
                raise InvalidImage(f"qcow2: metadata cluster {c} has refcount 0")

    async def before_first_write(self) -> None:
        """Before the image first changes: clear autoclear bits we do not know (their extensions are not
        kept up to date by us, as the spec requires) and run ``on_first_write``.  Under ``lock``."""
        if self._written:
            return
        self._written = True
        hdr = self.hdr
        if hdr.version >= 3 and hdr.autoclear_features & ~AUTOCLEAR_KNOWN:
            hdr.autoclear_features &= AUTOCLEAR_KNOWN
            await self.file.write(AUTOCLEAR_OFFSET, hdr.autoclear_features.to_bytes(8, "big"))
            await self.file.flush()
        if self.on_first_write is not None:
            await self.on_first_write()

    @property
    def written(self) -> bool:
        """The image may have changed since it was opened (a write request got past its plan step)."""
        return self._written

    def header_bytes(self) -> bytes:
        """The header cluster for :attr:`hdr`, trimmed to the used part in whole 512-byte sectors.

        Raises InvalidImage when the header and its extensions do not fit in one cluster.
        """
        data = build_header_cluster(self.hdr, self.cluster_size)
        used = len(data.rstrip(b"\0"))
        return data[: min(len(data), -(-used // 512) * 512)]

    async def write_header(self, data: bytes) -> None:
        """Rewrite the header with ``data`` (from :meth:`header_bytes`) in one write, then flush.
        Under ``lock``."""
        await self.file.write(0, data)
        await self.file.flush()

    def clusters(self, offset: int, length: int) -> range:
        """Host clusters touched by ``length`` bytes at ``offset``."""
        return range(
            offset >> self.cluster_bits, (offset + length + self.cluster_size - 1) >> self.cluster_bits
        )

    # ------------------------------------------------------------------ L2 tables

    async def l2_table(self, l1_index: int, *, create: bool) -> L2Table | None:
        """The L2 table of ``l1_index`` (loaded if needed); None when unallocated and not ``create``.

        With ``create`` the table is allocated (all entries unallocated) and the L1 entry set.  Callers
        hold ``lock`` and must not await between using and changing the table they get.
        """
        table = self.l2.get(l1_index)
        if table is not None:
            return table
        if l1_index >= len(self.l1):
            raise self.corrupt(f"guest offset needs L1 entry {l1_index}, beyond the L1 table")
        l1e = self.l1[l1_index]
        off = l1e & OFFSET_MASK
        if off == 0 and not create:
            return None
        await self._make_room()
        if off == 0:
            rc = self.require_refcounts()
            cluster = rc.allocate_one()
            await self.grow_to(rc.high)
            self.meta_clusters.add(cluster)
            table = L2Table(cluster << self.cluster_bits, array("Q", bytes(self.cluster_size)))
            table.dirty = True
            self.l1[l1_index] = table.offset | L2E_COPIED
            self.l1_dirty.add(l1_index)
        else:
            if self.refcounts is not None and self.refcounts.get(off >> self.cluster_bits) != 1:
                raise self.corrupt(
                    f"L2 table at {off:#x} has refcount {self.refcounts.get(off >> self.cluster_bits)}"
                )
            table = L2Table(off, decode_table(await self.read_bytes(off, self.cluster_size)))
        self.l2.put(l1_index, table)
        return table

    async def _make_room(self) -> None:
        """Before a table is added: when the cache is full of dirty tables, write them back (then clean
        ones can be dropped)."""
        if len(self.l2) >= self.l2.capacity and len(self.l2.dirty_tables()) >= self.l2.capacity:
            await self.writeback()

    def require_refcounts(self) -> Refcounts:
        if self.refcounts is None:
            raise RequestError(errno.EPERM, "qcow2: image is open read-only")
        return self.refcounts

    async def grow_to(self, clusters: int) -> None:
        """Make the image file cover ``clusters`` clusters (those allocated so far, ``refcounts.high``).

        Callers need not hold ``lock`` (a data write then does not hold the metadata lock across a file
        system call).  It grows past the allocation high mark, which covers the clusters of every write
        allocated so far.
        """
        if clusters << self.cluster_bits <= self.file.size:
            return
        async with self._grow_lock:
            # Concurrent growers queue here; most find the room made by the one before them.
            if clusters << self.cluster_bits <= self.file.size:
                return
            await self._grow(clusters)

    async def _grow(self, clusters: int) -> None:
        rc = self.refcounts
        need = max(clusters, rc.high if rc is not None else 0) << self.cluster_bits
        # Grow ahead (a quarter of the need, 32 to 256 MiB of hole): a backup into an empty image then
        # grows the file a few times per GiB instead of once per chunk (each ftruncate waits for the
        # writes in flight on the file).  :meth:`trim` gives the rest back at close.
        ahead = min(max(need // 4, GROW_MIN), GROW_MAX)
        await grow_file(self.file, -(-(need + ahead) >> self.cluster_bits) << self.cluster_bits)

    async def trim(self) -> None:
        """Cut the room :meth:`grow_to` added past the last allocated cluster (never below the size the
        file had at open).  Called at close, after the final write-back."""
        file, rc = self.file, self.refcounts
        if rc is None or not isinstance(file, FileNode) or file.is_block:
            return
        end = max(rc.high << self.cluster_bits, self._size_at_open)
        if file.size > end:
            await file.truncate(end)

    def check_data_cluster(self, host: int) -> None:
        """Refuse to write data to ``host`` unless it is a data cluster of ours (refcount 1, no metadata)."""
        cluster = host >> self.cluster_bits
        rc = self.require_refcounts()
        if cluster in self.meta_clusters or cluster == 0:
            raise self.corrupt(f"data cluster at {host:#x} overlaps metadata")
        if rc.get(cluster) != 1:
            raise self.corrupt(f"data cluster at {host:#x} has refcount {rc.get(cluster)}, not 1")

    # ------------------------------------------------------------------ write-back

    @property
    def dirty(self) -> bool:
        rc = self.refcounts
        return bool(
            self.l1_dirty or self.l2.dirty_tables() or (rc is not None and (rc.dirty_any or rc.pending_free))
        )

    async def writeback(self) -> None:
        """Write every metadata change to disk in the crash-safe order (module docstring).  Under ``lock``."""
        file = self.file
        rc = self.refcounts
        if rc is None:
            return
        tables = self.l2.dirty_tables()
        if rc.dirty_any or tables or self.l1_dirty:
            await file.flush()
        if rc.dirty_any:
            await self._write_refcounts(rc)
        if tables:
            for table in tables:
                await file.write(table.offset, encode_table(table.entries))
            await file.flush()
            self.l2.written_back()
        if self.l1_dirty:
            await self._write_l1()
            await file.flush()
        if rc.pending_free and self.reads == 0:
            freed = list(rc.pending_free)
            bad = rc.apply_frees()
            if bad:
                log.warning("qcow2: freed clusters that were already free: %s", bad[:8])
            for c in freed:
                if rc.get(c) == 0:
                    self.meta_clusters.discard(c)
            await self._write_refcounts(rc)
            self.on_freed()

    async def _write_refcounts(self, rc: Refcounts) -> None:
        file = self.file
        for off, data in rc.dirty_blocks():
            await file.write(off, data)
        await file.flush()
        moved = rc.moved_from is not None
        writes = rc.table_writes()
        for off, data in writes:
            await file.write(off, data)
        if writes:
            await file.flush()
        if moved:
            fields = REFTABLE_FIELDS.pack(rc.table_offset, rc.table_clusters)
            await file.write(REFTABLE_FIELDS_OFFSET, fields)
            await file.flush()
            old = rc.moved_from
            self.hdr.refcount_table_offset, self.hdr.refcount_table_clusters = (
                rc.table_offset,
                rc.table_clusters,
            )
            rc.table_moved()
            if old is not None:
                for c in self.clusters(old[0], old[1] * self.cluster_size):
                    self.meta_clusters.discard(c)
        self.meta_clusters.update(self.clusters(rc.table_offset, rc.table_clusters * self.cluster_size))
        self.meta_clusters.update(off >> self.cluster_bits for off in rc.table if off)

    async def _write_l1(self) -> None:
        cs = self.cluster_size
        per_cluster = cs // 8
        for c in sorted({i // per_cluster for i in self.l1_dirty}):
            entries = self.l1[c * per_cluster : (c + 1) * per_cluster]
            await self.file.write(self.hdr.l1_table_offset + c * cs, encode_table(entries))
        self.l1_dirty.clear()
