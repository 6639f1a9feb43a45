"""Loading and storing the persistent dirty bitmaps of an open qcow2 image (format in ``bitmaps.py``).

Storing never changes a cluster that the header (through the bitmaps extension) may point at.  New
bitmap data, tables and directory go to freshly allocated clusters, and the switch is the header write::

    1. write bitmap data, bitmap tables, directory      into clusters that are free on disk
    2. write-back (flush, refcounts, flush)             the new clusters are accounted for
    3. header: extension -> new directory, flush        the switch
    4. free the old directory and tables, write-back    only now nothing on disk points at them

A crash before 3 leaves the old bitmaps in place (new clusters leaked); after 3, the new ones (old
clusters leaked until step 4).  Never a directory pointing at garbage.

``in_use``: before the first write to the image, every bitmap we keep in memory gets ``in_use`` on disk
(a directory-only store, flushed before that write goes on), because from then on the copy on disk is
stale.  A clean close stores them again with ``in_use`` cleared.  A bitmap found with ``in_use`` at open
was not stored after the image last changed: it is reported inconsistent.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from cowbackup.block.bitmap import DirtyBitmap
from cowbackup.block.drivers.qcow2.bitmaps import (
    BME_FLAG_AUTO,
    BME_FLAG_EXTRA_DATA_COMPATIBLE,
    BME_FLAG_IN_USE,
    BTE_ALL_ONES,
    BTE_OFFSET_MASK,
    MAX_BITMAPS,
    MAX_DIRECTORY_SIZE,
    DirEntry,
    StoredBitmap,
    check_new_bitmaps,
    check_table_placement,
    data_bytes,
    data_clusters,
    encode_bitmap_table,
    pack_directory,
    parse_directory,
    parse_table,
    split_data,
    table_size_for,
)
from cowbackup.block.drivers.qcow2.format import AUTOCLEAR_BITMAPS, InvalidImage
from cowbackup.block.drivers.qcow2.metadata import Metadata
from cowbackup.block.errors import BlockError

log = logging.getLogger(__name__)


class BitmapStore:
    """The bitmaps of one open image: the directory on disk and the bitmaps kept in memory.

    Owned by the node.  Methods that touch the disk run under ``meta.lock`` (the caller holds it).
    ``bitmaps`` (the usable bitmaps, live: the node marks enabled ones on every write) may be read at any
    time; it is replaced, never changed in place, by :meth:`store`.
    """

    def __init__(self, meta: Metadata, size: int, read_only: bool) -> None:
        self.meta = meta
        self.size = size
        self.read_only = read_only
        #: The directory on disk, in order (usable and foreign entries).
        self.entries: list[DirEntry] = []
        #: Host clusters (table and data) of each entry on disk, freed when the entry goes.
        self.owned: dict[str, list[int]] = {}
        self.dir_clusters = range(0)
        #: Usable bitmaps, in directory order.
        self.bitmaps: list[StoredBitmap] = []
        #: We set ``in_use`` on disk: a clean close must store the bitmaps again.
        self.in_use_by_us = False
        #: The node marked a bitmap since the last store: a close must store them.
        self.marked = False

    @property
    def writable(self) -> bool:
        meta = self.meta
        return not self.read_only and meta.hdr.version >= 3 and meta.refcounts is not None

    # ------------------------------------------------------------------ loading

    async def load(self) -> None:
        """Read and check the directory, the tables and the bits of every consistent bitmap.

        Raises InvalidImage for anything malformed, out of the file, or overlapping other metadata or
        another bitmap.  On a read-write image the bitmap clusters join the metadata clusters (never
        written as data).
        """
        meta = self.meta
        hdr = meta.hdr
        if hdr.bitmaps_ext is None:
            return
        if not hdr.autoclear_features & AUTOCLEAR_BITMAPS:
            log.warning(
                "qcow2: the bitmaps of '%s' were invalidated by a program that does not know them; they are "
                "ignored (their clusters leak: 'qemu-img check -r leaks' reclaims them)",
                meta.file.node_name,
            )
            return
        nb, dsize, doff = hdr.bitmaps_ext
        cs, fsize = meta.cluster_size, meta.file.size
        if not 1 <= nb <= MAX_BITMAPS:
            raise InvalidImage(f"qcow2: bitmaps extension lists {nb} bitmaps (1 to {MAX_BITMAPS})")
        if dsize > MAX_DIRECTORY_SIZE:
            raise InvalidImage(f"qcow2: bitmap directory of {dsize} bytes is too large")
        if doff == 0 or doff % cs or doff + dsize > fsize:
            raise InvalidImage(
                f"qcow2: bitmap directory at {doff:#x} is misaligned or beyond the end of file"
            )
        entries = parse_directory(await meta.read_bytes(doff, dsize), nb)
        used: dict[int, str] = {}

        def claim(clusters: range | list[int], what: str) -> None:
            for c in clusters:
                if c == 0 or c in meta.meta_clusters:
                    raise InvalidImage(f"qcow2: {what} overlaps other metadata (cluster {c})")
                if c in used:
                    raise InvalidImage(f"qcow2: {what} overlaps the {used[c]} (cluster {c})")
                used[c] = what

        self.dir_clusters = meta.clusters(doff, dsize)
        claim(self.dir_clusters, "bitmap directory")
        for e in entries:
            check_table_placement(e, self.size, cs, fsize)
            need = table_size_for(self.size, e.granularity_bits, cs)
            table = parse_table(e, await meta.read_bytes(e.table_offset, e.table_size * 8), need, cs, fsize)
            table_clusters = meta.clusters(e.table_offset, e.table_size * 8)
            claim(table_clusters, f"table of bitmap '{e.name}'")
            hosts = [off >> meta.cluster_bits for off in data_clusters(table)]
            claim(hosts, f"data of bitmap '{e.name}'")
            self.owned[e.name] = [*table_clusters, *hosts]
            if not e.usable:
                log.warning("qcow2: bitmap '%s' has extra data we do not know: kept, not used", e.name)
                continue
            if e.in_use:
                bitmap = DirtyBitmap(self.size, 1 << e.granularity_bits)
            else:
                bitmap = await self._read_bits(e, list(table[:need]))
            self.bitmaps.append(
                StoredBitmap(e.name, bitmap, bool(e.flags & BME_FLAG_AUTO), e.in_use, e.extra_data)
            )
        rc = meta.refcounts
        if rc is not None:
            for c, what in used.items():
                if rc.get(c) == 0:
                    raise InvalidImage(f"qcow2: cluster {c} of the {what} has refcount 0")
            meta.meta_clusters.update(used)
        self.entries = entries

    async def _read_bits(self, e: DirEntry, table: list[int]) -> DirtyBitmap:
        cs = self.meta.cluster_size
        buf = bytearray(len(table) * cs)
        view = memoryview(buf)
        i = 0
        while i < len(table):
            entry = table[i]
            if entry == BTE_ALL_ONES:
                view[i * cs : (i + 1) * cs] = b"\xff" * cs
            off = entry & BTE_OFFSET_MASK
            j = i + 1
            if off:
                # One read for a run of data clusters that follow each other in the file.
                while j < len(table) and table[j] & BTE_OFFSET_MASK == off + (j - i) * cs:
                    j += 1
                await self.meta.file.read(off, view[i * cs : j * cs])
            i = j
        nbytes = data_bytes(self.size, e.granularity_bits)
        return DirtyBitmap.deserialize(self.size, 1 << e.granularity_bits, bytes(view[:nbytes]))

    # ------------------------------------------------------------------ storing

    async def mark_in_use(self) -> None:
        """Set ``in_use`` on every usable bitmap on disk that lacks it (before the image first changes)."""
        if not self.writable or not any(e.usable and not e.in_use for e in self.entries):
            return
        entries = [
            replace(e, flags=e.flags | BME_FLAG_IN_USE) if e.usable and not e.in_use else e
            for e in self.entries
        ]
        await self._commit(entries, self.owned, fresh=[])
        self.in_use_by_us = True

    async def store(self, bitmaps: list[StoredBitmap], *, clean: bool) -> None:
        """Replace the stored bitmaps by ``bitmaps`` (entries we cannot use are kept as they are).

        ``clean``: the bits are up to date with the image (no write since open, or closing after the
        last one): ``in_use`` stays clear; else it is set.  An inconsistent bitmap whose name is on disk,
        inconsistent too, keeps its entry untouched; a new inconsistent one is stored empty with
        ``in_use``.  Raises BlockError for a set that cannot be stored (nothing is written then),
        OSError from the file.
        """
        if not self.writable:
            raise BlockError("qcow2: this image cannot store bitmaps (read-only, or version 2)")
        foreign = [e for e in self.entries if not e.usable]
        check_new_bitmaps(bitmaps, self.size, [e.name for e in foreign])
        on_disk = {e.name: e for e in self.entries}
        entries: list[DirEntry] = []
        owned: dict[str, list[int]] = {}
        fresh: list[int] = []
        try:
            for sb in bitmaps:
                old = on_disk.get(sb.name)
                if sb.inconsistent and old is not None and old.in_use:
                    entries.append(old)
                    owned[sb.name] = self.owned[sb.name]
                    continue
                entry, clusters = await self._write_bitmap(sb, clean, fresh)
                entries.append(entry)
                owned[sb.name] = clusters
            for e in foreign:
                entries.append(e)
                owned[e.name] = self.owned[e.name]
        except BaseException:
            self._release(fresh)
            raise
        await self._commit(entries, owned, fresh)
        self.bitmaps = list(bitmaps)
        self.marked = False
        self.in_use_by_us = not clean and any(not sb.inconsistent for sb in bitmaps)

    async def remove(self, name: str) -> None:
        """Remove the bitmap ``name`` from the image (a directory-only store).  KeyError if absent."""
        if not any(e.name == name for e in self.entries):
            raise KeyError(name)
        entries = [e for e in self.entries if e.name != name]
        owned = {k: v for k, v in self.owned.items() if k != name}
        await self._commit(entries, owned, fresh=[])
        self.bitmaps = [sb for sb in self.bitmaps if sb.name != name]

    async def _write_bitmap(
        self, sb: StoredBitmap, clean: bool, fresh: list[int]
    ) -> tuple[DirEntry, list[int]]:
        """Write the data and table of one bitmap to new clusters (appended to ``fresh`` as they are
        allocated); its directory entry and the clusters it owns."""
        meta = self.meta
        rc = meta.require_refcounts()
        cs, cb = meta.cluster_size, meta.cluster_bits
        gbits = sb.granularity.bit_length() - 1
        chunks: list[bytes] = []
        if sb.inconsistent:
            table = [0] * table_size_for(self.size, gbits, cs)
        else:
            table, chunks = split_data(sb.bitmap.serialize(), cs)
        hosts: list[int] = []
        for start, n in rc.allocate(len(chunks)) if chunks else []:
            fresh.extend(range(start, start + n))
            meta.meta_clusters.update(range(start, start + n))
            await meta.grow_to(rc.high)
            first = len(hosts)
            await meta.file.write(start << cb, b"".join(chunks[first : first + n]))
            hosts.extend(range(start, start + n))
        it = iter(hosts)
        table = [next(it) << cb if e < 0 else e for e in table]
        raw = encode_bitmap_table(table, cs)
        tfirst = rc.allocate_contiguous(len(raw) // cs)
        tclusters = range(tfirst, tfirst + len(raw) // cs)
        fresh.extend(tclusters)
        meta.meta_clusters.update(tclusters)
        await meta.grow_to(rc.high)
        await meta.file.write(tfirst << cb, raw)
        flags = BME_FLAG_AUTO if sb.enabled else 0
        if sb.inconsistent or not clean:
            flags |= BME_FLAG_IN_USE
        if sb.extra_data:
            flags |= BME_FLAG_EXTRA_DATA_COMPATIBLE
        entry = DirEntry(sb.name, tfirst << cb, len(table), flags, gbits, sb.extra_data)
        return entry, [*tclusters, *hosts]

    async def _commit(self, entries: list[DirEntry], owned: dict[str, list[int]], fresh: list[int]) -> None:
        """Write the directory of ``entries`` to new clusters and switch the header to it (steps 2-4 of
        the module docstring).  ``fresh``: clusters this store allocated, given back if it fails before
        the switch.  After the switch, clusters of the old directory and of entries absent from
        ``owned`` are freed."""
        meta = self.meta
        hdr = meta.hdr
        rc = meta.require_refcounts()
        cs, cb = meta.cluster_size, meta.cluster_bits
        directory = pack_directory(entries)
        if len(directory) > MAX_DIRECTORY_SIZE:
            self._release(fresh)
            raise BlockError("Bitmap directory would be too large")
        new_dir = range(0)
        old_ext = hdr.bitmaps_ext
        old_autoclear = hdr.autoclear_features
        try:
            if entries:
                n = -(-len(directory) // cs)
                first = rc.allocate_contiguous(n)
                new_dir = range(first, first + n)
                fresh.extend(new_dir)
                meta.meta_clusters.update(new_dir)
                await meta.grow_to(rc.high)
                await meta.file.write(first << cb, directory)
            await meta.writeback()
            if entries:
                hdr.bitmaps_ext = (len(entries), len(directory), new_dir.start << cb)
                hdr.autoclear_features |= AUTOCLEAR_BITMAPS
            else:
                hdr.bitmaps_ext = None
                hdr.autoclear_features &= ~AUTOCLEAR_BITMAPS
            header = meta.header_bytes()
        except BaseException:
            hdr.bitmaps_ext, hdr.autoclear_features = old_ext, old_autoclear
            self._release(fresh)
            raise
        try:
            await meta.write_header(header)
        except BaseException as err:
            # The header on disk may be either; keep every cluster (a leak at worst) and refuse writes.
            hdr.bitmaps_ext, hdr.autoclear_features = old_ext, old_autoclear
            meta.corrupt(f"header update for bitmaps failed: {err}")
            raise
        gone = [
            c for name, clusters in self.owned.items() if owned.get(name) is not clusters for c in clusters
        ]
        for c in [*self.dir_clusters, *gone]:
            rc.defer_free(c)
        self.entries, self.owned, self.dir_clusters = entries, owned, new_dir
        await meta.writeback()

    def _release(self, fresh: list[int]) -> None:
        """Free clusters allocated by a store that failed before anything on disk pointed at them."""
        rc = self.meta.refcounts
        if rc is not None:
            for c in fresh:
                rc.defer_free(c)
        fresh.clear()
