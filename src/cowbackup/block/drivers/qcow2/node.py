"""The qcow2 node: guest reads, writes, zeroing, discard and block status over the image's tables.

Every request looks its clusters up under the metadata lock, does its data I/O without the lock, and (for
writes that allocate) takes the lock again to point the L2 entries at the new clusters::

    plan   (locked)    wait for allocating writes to the same guest clusters; look the clusters up;
                       allocate new host clusters for those that cannot be written in place
    data   (unlocked)  write the data, one write per run of contiguous host clusters; a partial new
                       cluster is completed from its old contents (backing file, zeros, compressed data)
    commit (locked)    set the L2 entries; the old host clusters are freed at the next write-back

While guest clusters are being allocated their range is listed in ``_allocating``; any other request that
would change their L2 entries waits for it, so two writes never allocate the same guest cluster twice.
"""

from __future__ import annotations

import asyncio
import errno
from array import array
from typing import TYPE_CHECKING

from cowbackup.block.drivers.qcow2 import compress as codec
from cowbackup.block.drivers.qcow2.bitmaps import StoredBitmap
from cowbackup.block.drivers.qcow2.bitmapstore import BitmapStore
from cowbackup.block.drivers.qcow2.format import (
    L2E_COMPRESSED,
    L2E_COPIED,
    L2E_ZERO,
    OFFSET_MASK,
)
from cowbackup.block.drivers.qcow2.l2cache import (
    UNALLOCATED,
    Kind,
    Mapping,
    classify,
    compressed_host_clusters,
)
from cowbackup.block.drivers.qcow2.metadata import CorruptImage, Metadata
from cowbackup.block.errors import BlockError, RequestError, invalid
from cowbackup.block.node import BlockNode, Extent, Limits, RequestFlags, Status

if TYPE_CHECKING:
    from cowbackup.block.drivers.qcow2.format import Header

_ZERO_CHUNK = 1 << 20


class Qcow2Node(BlockNode):
    """An open qcow2 image over its ``file`` child, with an optional ``backing`` child."""

    driver_name = "qcow2"
    supports_backing = True
    #: Honours ``RequestFlags.WRITE_COMPRESSED`` (the backup job checks this for ``compress=true``).
    supports_compressed_writes = True
    #: May read as zeros everywhere (QEMU's bdrv_has_zero_init for qcow2): the copy engine confirms it
    #: with one block-status call before relying on it, which a backing file or any data fails.
    known_zero_init = True

    def __init__(
        self, node_name: str, hdr: Header, meta: Metadata, *, read_only: bool, compress: bool
    ) -> None:
        super().__init__(node_name, read_only=read_only)
        self.hdr = hdr
        self.meta = meta
        self.cluster_size = hdr.cluster_size
        self.cluster_bits = hdr.cluster_bits
        self.l2_entries = hdr.cluster_size // 8
        #: Write full clusters compressed (the ``compress`` option, QEMU's compress filter).
        self.compress_writes = compress
        self._size = hdr.size
        self.limits = Limits(request_alignment=1, cluster_size=hdr.cluster_size)
        #: Guest cluster ranges ``[first, end)`` being allocated, with the event set when they are done.
        #: A short list (one entry per allocating request in flight), scanned rather than indexed per
        #: cluster so that a large write costs the same as a small one.
        self._allocating: list[tuple[int, int, asyncio.Event]] = []
        #: Where the next compressed cluster may go inside a partly used host cluster (0: none).
        self._ctail = 0
        meta.on_freed = self._check_ctail
        #: The header names a backing file, whether or not it is open (``backing: null`` leaves it
        #: closed, as a backup target into an overlay is opened): zeroing must then mark clusters zero
        #: rather than leave them unallocated, or a read through the chain would see the backing file.
        self.has_backing_file = hdr.backing_file is not None
        # Nor may the copy engine skip zero clusters on such an image because it reads zeros *here*.
        self.known_zero_init = not self.has_backing_file
        self.bitmap_store = BitmapStore(meta, hdr.size, read_only)
        meta.on_first_write = self.bitmap_store.mark_in_use
        self.write_observers.append(self._track_bitmaps)

    @property
    def file(self) -> BlockNode:
        return self.children["file"].node

    @property
    def backing(self) -> BlockNode | None:
        child = self.children.get("backing")
        return child.node if child is not None else None

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"file": self.file.describe().get("file", self.file.node_name)}
        if self.backing is not None:
            out["backing_file"] = self.backing.describe().get("file", self.backing.node_name)
        return out

    # ------------------------------------------------------------------ persistent bitmaps

    @property
    def can_store_bitmaps(self) -> bool:
        """Bitmaps can be stored in this image (version 3, opened read-write, not found corrupt)."""
        return self.bitmap_store.writable and self.meta.broken is None

    def stored_bitmaps(self) -> list[StoredBitmap]:
        """The image's persistent bitmaps: read at open, or as last stored.

        The objects are live: while the image is open the node marks the bitmap of every enabled,
        consistent entry on each write, write-zeroes and discard that reaches it, and a clean close
        stores them (so a registry that shares these ``DirtyBitmap`` objects need not mark them itself;
        marking twice is harmless).  Other changes (clear, merge, enable, ...) reach the image only
        through :meth:`store_bitmaps`.  Inconsistent bitmaps (``in_use`` at open) have no bits.
        """
        return list(self.bitmap_store.bitmaps)

    async def store_bitmaps(self, bitmaps: list[StoredBitmap]) -> None:
        """Replace the image's stored bitmaps by ``bitmaps``, now (crash-safe, see ``bitmapstore``).

        Entries with extra data we may not use are kept.  If the image was written since it was opened,
        the bitmaps are stored with ``in_use`` set (a clean close clears it).  Raises BlockError when
        bitmaps cannot be stored here or the set is invalid (bad name, granularity, size, duplicate),
        with nothing written; OSError from the file.
        """
        if not self.can_store_bitmaps:
            raise BlockError(f"Cannot store bitmaps in qcow2 node '{self.node_name}' (read-only or v2)")
        async with self.meta.lock:
            await self.bitmap_store.store(bitmaps, clean=not self.meta.written)

    async def remove_stored_bitmap(self, name: str) -> None:
        """Remove the stored bitmap ``name`` (any entry, also an inconsistent or unusable one), now.

        Raises BlockError if there is no such bitmap or bitmaps cannot be stored here.
        """
        if not self.can_store_bitmaps:
            raise BlockError(f"Cannot remove bitmaps from qcow2 node '{self.node_name}' (read-only or v2)")
        async with self.meta.lock:
            try:
                await self.bitmap_store.remove(name)
            except KeyError:
                raise BlockError(f"Bitmap '{name}' is not stored in node '{self.node_name}'") from None

    def _track_bitmaps(self, offset: int, length: int) -> None:
        for sb in self.bitmap_store.bitmaps:
            if sb.enabled and not sb.inconsistent:
                sb.bitmap.set(offset, length)
                # Even a request that changed nothing on disk (zeroing a hole) is marked, as QEMU does:
                # the close must then store the bits.
                self.bitmap_store.marked = True

    # ------------------------------------------------------------------ lookup

    async def _lookup(self, offset: int, length: int) -> tuple[Mapping, int]:
        """The mapping at ``offset`` and how many bytes from there map the same way (contiguously).

        Called under the lock.  A compressed cluster is always a run of its own.
        """
        cs = self.cluster_size
        gc = offset >> self.cluster_bits
        l1i, l2i = divmod(gc, self.l2_entries)
        table = await self.meta.l2_table(l1i, create=False)
        limit = min(offset + length, (l1i + 1) * self.l2_entries * cs)
        if table is None:
            # Whole L2 ranges without a table are unallocated too: one answer for all of them (a fresh
            # image is one extent, so the copy engine can tell it reads as zeros).
            l1 = self.meta.l1
            span = self.l2_entries * cs
            nxt = l1i + 1
            while nxt < len(l1) and nxt * span < offset + length and not l1[nxt] & OFFSET_MASK:
                nxt += 1
            return UNALLOCATED, min(offset + length, nxt * span) - offset
        entries = table.entries
        first = self._classify(entries[l2i])
        end = (gc + 1) * cs
        if first.kind is not Kind.COMPRESSED:
            k = l2i + 1
            while end < limit:
                m = self._classify(entries[k])
                if m.kind is not first.kind or (
                    first.kind is Kind.DATA and m.host != first.host + (k - l2i) * cs
                ):
                    break
                end += cs
                k += 1
        return first, min(end, limit) - offset

    def _classify(self, entry: int) -> Mapping:
        try:
            return classify(entry, self.hdr.version, self.cluster_bits)
        except ValueError as err:
            raise self.meta.corrupt(str(err)) from None

    # ------------------------------------------------------------------ reads

    async def _do_read(self, offset: int, buf: memoryview) -> None:
        pos = 0
        meta = self.meta
        while pos < len(buf):
            async with meta.lock:
                mapping, n = await self._lookup(offset + pos, len(buf) - pos)
                meta.reads += 1
            try:
                await self._read_mapped(mapping, offset + pos, buf[pos : pos + n])
            finally:
                meta.reads -= 1
            pos += n

    async def _read_mapped(self, m: Mapping, offset: int, view: memoryview) -> None:
        """Read guest bytes at ``offset`` that all map as ``m`` (the run :meth:`_lookup` found)."""
        cs = self.cluster_size
        if m.kind is Kind.DATA:
            await self._read_host(m.host + offset % cs, view)
        elif m.kind is Kind.COMPRESSED:
            cluster = await self._decompress(m)
            start = offset % cs
            view[:] = cluster[start : start + len(view)]
        elif m.kind is Kind.UNALLOCATED and self.backing is not None:
            backing = self.backing
            n = max(0, min(len(view), backing.size - offset))
            if n:
                await backing.read(offset, view[:n])
            view[n:] = bytes(len(view) - n)
        else:
            view[:] = bytes(len(view))

    async def _read_host(self, host: int, view: memoryview) -> None:
        """Read image bytes; bytes past the end of a short image file read as zeros (QEMU's rule)."""
        fsize = self.file.size
        if host >= fsize:
            raise self.meta.corrupt(f"data cluster at {host:#x} lies beyond the end of the image file")
        n = min(len(view), fsize - host)
        await self.file.read(host, view[:n])
        if n < len(view):
            view[n:] = bytes(len(view) - n)

    async def _decompress(self, m: Mapping) -> bytes:
        fsize = self.file.size
        if m.host >= fsize or m.host < self.cluster_size:
            raise self.meta.corrupt(f"compressed cluster at {m.host:#x} lies outside the image file")
        raw = bytearray(min(m.csize, fsize - m.host))
        await self.file.read(m.host, raw)
        try:
            return codec.decompress(bytes(raw), self.hdr.compression_type, self.cluster_size)
        except codec.CompressedDataError as err:
            raise CorruptImage(f"compressed cluster at {m.host:#x}: {err}") from None

    # ------------------------------------------------------------------ block status

    async def _do_block_status(self, offset: int, length: int) -> Extent:
        async with self.meta.lock:
            m, n = await self._lookup(offset, length)
        if m.kind in (Kind.DATA, Kind.COMPRESSED):
            return Extent(offset, n, Status.DATA | Status.ALLOCATED)
        if m.kind is Kind.ZERO:
            return Extent(offset, n, Status.ZERO | Status.ALLOCATED)
        backing = self.backing
        if backing is None:
            return Extent(offset, n, Status.ZERO)
        if offset >= backing.size:
            return Extent(offset, n, Status.ZERO)  # past the end of a shorter backing file: zeros
        return Extent(offset, min(n, backing.size - offset), Status(0))

    # ------------------------------------------------------------------ write helpers

    def _check_usable(self) -> None:
        if self.meta.broken is not None:
            raise CorruptImage(f"image is corrupt, writes refused ({self.meta.broken})")

    async def _lock_range(self, first: int, count: int) -> None:
        """Take the metadata lock once no write is allocating guest clusters ``[first, first+count)``."""
        lock = self.meta.lock
        while True:
            await lock.acquire()
            end = first + count
            event = next((ev for a, b, ev in self._allocating if a < end and first < b), None)
            if event is None:
                return
            lock.release()
            await event.wait()

    def _free_mapping(self, m: Mapping) -> None:
        rc = self.meta.require_refcounts()
        if m.kind is Kind.COMPRESSED:
            for c in compressed_host_clusters(m, self.cluster_bits):
                rc.defer_free(c)
        elif m.kind in (Kind.DATA, Kind.ZERO) and m.host:
            rc.defer_free(m.host >> self.cluster_bits)

    def _segments(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Split a range at L2 table boundaries (each part is served by one table)."""
        span = self.l2_entries * self.cluster_size
        out = []
        end = offset + length
        while offset < end:
            n = min(end, (offset // span + 1) * span) - offset
            out.append((offset, n))
            offset += n
        return out

    async def _old_cluster(self, m: Mapping, gc: int) -> bytearray:
        """The current contents of guest cluster ``gc`` (mapped as ``m``), to complete a partial write."""
        cs = self.cluster_size
        buf = bytearray(cs)
        n = min(cs, self._size - gc * cs)
        if m.kind is not Kind.ZERO:
            await self._read_mapped(m, gc * cs, memoryview(buf)[:n])
        return buf

    # ------------------------------------------------------------------ writes

    async def _do_write(self, offset: int, data: memoryview, flags: RequestFlags) -> None:
        self._check_usable()
        cs = self.cluster_size
        if self.compress_writes or flags & RequestFlags.WRITE_COMPRESSED:
            start = -(-offset // cs) * cs
            end = offset + len(data) if offset + len(data) == self._size else (offset + len(data)) // cs * cs
            if start < end:
                if start > offset:
                    await self._do_write(offset, data[: start - offset], flags & ~RequestFlags.FUA)
                await self.write_compressed_clusters(start, data[start - offset : end - offset])
                if end < offset + len(data):
                    await self._write_plain(end, data[end - offset :])
                if flags & RequestFlags.FUA:
                    await self._do_flush()
                return
        await self._write_plain(offset, data)
        if flags & RequestFlags.FUA:
            await self._do_flush()

    async def _write_plain(self, offset: int, data: memoryview) -> None:
        pos = 0
        for seg_off, n in self._segments(offset, len(data)):
            await self._write_segment(seg_off, data[pos : pos + n])
            pos += n

    async def _write_segment(self, offset: int, data: memoryview) -> None:
        """Write ``data`` inside one L2 table's range (plan / data / commit, see the module docstring)."""
        cb = self.cluster_bits
        meta = self.meta
        end = offset + len(data)
        first = offset >> cb
        count = ((end - 1) >> cb) - first + 1
        l1i, l2i = divmod(first, self.l2_entries)
        await self._lock_range(first, count)
        try:
            self._check_usable()
            await meta.before_first_write()
            table = await meta.l2_table(l1i, create=False)
            # Fast path: every cluster unallocated (a backup into a fresh image) -- no per-cluster lookup.
            fresh = table is None or not any(table.entries[l2i : l2i + count])
            if fresh:
                olds = [UNALLOCATED] * count
                need = list(range(count))
            else:
                assert table is not None
                olds = [self._classify(e) for e in table.entries[l2i : l2i + count]]
                need = [k for k, m in enumerate(olds) if not (m.kind is Kind.DATA and m.copied)]
                for m in olds:
                    if m.kind is Kind.DATA and m.copied:
                        meta.check_data_cluster(m.host)  # written in place: must be ours alone
            hosts = [m.host for m in olds]
            event = asyncio.Event()
            runs: list[tuple[int, int]] = []
            if need:
                runs = meta.require_refcounts().allocate(len(need))
                it = iter(need)
                for start, n in runs:
                    for c in range(start, start + n):
                        hosts[next(it)] = c << cb
                claim = (first, first + count, event)
                self._allocating.append(claim)
        finally:
            meta.lock.release()
        committed = False
        try:
            if need:
                await meta.grow_to(max(start + n for start, n in runs))
            await self._write_data(offset, data, hosts, olds, set(need), contiguous=fresh and len(runs) == 1)
            if need:
                async with meta.lock:
                    table = await meta.l2_table(l1i, create=True)
                    assert table is not None
                    entries = table.entries
                    if fresh and len(runs) == 1:
                        # Nothing to free (the clusters were unallocated, and stayed so: other changes to
                        # them wait for this claim); one slice for the whole run.
                        base = hosts[0] | L2E_COPIED
                        entries[l2i : l2i + count] = array("Q", range(base, base + (count << cb), 1 << cb))
                    else:
                        for k in need:
                            self._free_mapping(self._classify(entries[l2i + k]))
                            entries[l2i + k] = hosts[k] | L2E_COPIED
                    table.dirty = True
                committed = True
        finally:
            if need:
                if not committed:
                    for k in need:
                        meta.require_refcounts().defer_free(hosts[k] >> cb)
                self._allocating.remove(claim)
                event.set()

    async def _write_data(
        self,
        offset: int,
        data: memoryview,
        hosts: list[int],
        olds: list[Mapping],
        new: set[int],
        *,
        contiguous: bool = False,
    ) -> None:
        """Write the data to its host clusters: contiguous host runs in one write each; partial new
        clusters completed from their old contents.  ``contiguous``: ``hosts`` follow each other."""
        cs, cb = self.cluster_size, self.cluster_bits
        first = offset >> cb
        end = offset + len(data)
        file = self.file
        if contiguous and not offset & (cs - 1) and (not end & (cs - 1) or end == self._size):
            await file.write(hosts[0], data)  # whole clusters in one run: nothing to complete
            return
        run_host = run_pos = run_len = 0

        async def flush_run() -> None:
            if run_len:
                await file.write(run_host, data[run_pos : run_pos + run_len])

        for k, host in enumerate(hosts):
            gstart = max(offset, (first + k) << cb)
            gend = min(end, (first + k + 1) << cb)
            within = gstart & (cs - 1)
            partial_new = k in new and (gend - gstart) < min(cs, self._size - ((first + k) << cb))
            if partial_new:
                buf = await self._old_cluster(olds[k], first + k)
                buf[within : within + gend - gstart] = data[gstart - offset : gend - offset]
                await file.write(host, buf)
                continue
            if run_len and run_host + run_len == host + within:
                run_len += gend - gstart
                continue
            await flush_run()
            run_host, run_pos, run_len = host + within, gstart - offset, gend - gstart
        await flush_run()

    # ------------------------------------------------------------------ compressed writes

    async def write_compressed_clusters(self, offset: int, data: memoryview) -> None:
        """Write whole clusters compressed (QEMU's ``BDRV_REQ_WRITE_COMPRESSED``).

        ``offset`` must be cluster aligned and ``data`` a multiple of the cluster size, except that the
        last cluster of the image may be partial.  A cluster that does not shrink is written normally.
        """
        cs, cb = self.cluster_size, self.cluster_bits
        if offset % cs or (len(data) % cs and offset + len(data) != self._size):
            raise invalid(f"compressed write of {len(data)} bytes at {offset} is not cluster aligned")
        self._check_usable()
        for pos in range(0, len(data), cs):
            chunk = data[pos : pos + cs]
            comp = codec.compress(bytes(chunk).ljust(cs, b"\0"), self.hdr.compression_type)
            if comp is None:
                await self._write_plain(offset + pos, chunk)
            else:
                await self._write_compressed_cluster((offset + pos) >> cb, comp)

    async def _write_compressed_cluster(self, gc: int, comp: bytes) -> None:
        cs, cb = self.cluster_size, self.cluster_bits
        meta = self.meta
        l1i, l2i = divmod(gc, self.l2_entries)
        await self._lock_range(gc, 1)
        try:
            self._check_usable()
            await meta.before_first_write()
            rc = meta.require_refcounts()
            tail = self._ctail
            if tail and (tail & (cs - 1)) + len(comp) <= cs:
                rc.increment(tail >> cb)
                host = tail
            else:
                host = rc.allocate_one() << cb
                await meta.grow_to(rc.high)
            self._ctail = (host + len(comp)) if (host + len(comp)) & (cs - 1) else 0
            event = asyncio.Event()
            claim = (gc, gc + 1, event)
            self._allocating.append(claim)
        finally:
            meta.lock.release()
        committed = False
        try:
            await self.file.write(host, comp)
            x = 62 - (cb - 8)
            sectors = (host + len(comp) - 1) // 512 - host // 512
            async with meta.lock:
                table = await meta.l2_table(l1i, create=True)
                assert table is not None
                self._free_mapping(self._classify(table.entries[l2i]))
                table.entries[l2i] = L2E_COMPRESSED | (sectors << x) | host
                table.dirty = True
            committed = True
        finally:
            if not committed:
                meta.require_refcounts().defer_free(host >> cb)
            self._allocating.remove(claim)
            event.set()

    def _check_ctail(self) -> None:
        """After frees: forget the compressed tail if its host cluster became free (it may be reused)."""
        rc = self.meta.refcounts
        if self._ctail and rc is not None and rc.get(self._ctail >> self.cluster_bits) == 0:
            self._ctail = 0

    # ------------------------------------------------------------------ zeroing and discard

    async def _do_write_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        self._check_usable()
        cs = self.cluster_size
        start = -(-offset // cs) * cs
        end = offset + length
        full_end = end if end == self._size else end // cs * cs
        if (
            self.hdr.version < 3 and (self.backing is not None or self.has_backing_file)
        ) or start >= full_end:
            await self._write_zero_data(offset, length)
        else:
            if start > offset:
                await self._write_zero_data(offset, start - offset)
            unmap = bool(flags & RequestFlags.MAY_UNMAP)
            for seg_off, n in self._segments(start, full_end - start):
                await self._zero_segment(seg_off, n, discard=False, unmap=unmap)
            if full_end < end:
                await self._write_zero_data(full_end, end - full_end)
        if flags & RequestFlags.FUA:
            await self._do_flush()

    async def _write_zero_data(self, offset: int, length: int) -> None:
        zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
        while length:
            n = min(length, len(zeros))
            await self._write_plain(offset, zeros[:n])
            offset += n
            length -= n

    async def _do_discard(self, offset: int, length: int) -> None:
        self._check_usable()
        cs = self.cluster_size
        start = -(-offset // cs) * cs
        end = offset + length
        end = end if end == self._size else end // cs * cs
        if self.hdr.version < 3 and self.backing is not None:
            return  # v2 cannot say "zero" over a backing file; discard is advisory
        for seg_off, n in self._segments(start, max(0, end - start)):
            await self._zero_segment(seg_off, n, discard=True, unmap=True)

    async def _zero_segment(self, offset: int, length: int, *, discard: bool, unmap: bool) -> None:
        """Make whole clusters read as zeros (v3 zero flag) or unallocated (no backing file) in one table."""
        cb = self.cluster_bits
        meta = self.meta
        first = offset >> cb
        count = -(-length >> cb) if length else 0
        l1i, l2i = divmod(first, self.l2_entries)
        # Discard follows the open chain (QEMU's rule); zeroing, the chain the image names.
        has_backing = self.backing is not None or (not discard and self.has_backing_file)
        v3 = self.hdr.version >= 3
        await self._lock_range(first, count)
        try:
            self._check_usable()
            table = await meta.l2_table(l1i, create=False)
            if table is None:
                if not has_backing:
                    return
                await meta.before_first_write()
                table = await meta.l2_table(l1i, create=True)
                assert table is not None
            await meta.before_first_write()
            entries = table.entries
            for k in range(l2i, l2i + count):
                entry = entries[k]
                m = self._classify(entry)
                if discard or not v3:
                    new = L2E_ZERO if has_backing and v3 else 0
                elif m.kind is Kind.DATA and m.copied and not unmap:
                    new = entry | L2E_ZERO  # keep the cluster allocated, as QEMU does without MAY_UNMAP
                elif (m.kind is Kind.ZERO and not (unmap and m.host)) or (
                    m.kind is Kind.UNALLOCATED and not has_backing
                ):
                    continue
                else:
                    new = L2E_ZERO
                if new == entry:
                    continue
                if m.kind is Kind.COMPRESSED or (m.host and new & OFFSET_MASK != m.host):
                    self._free_mapping(m)
                entries[k] = new
                table.dirty = True
        finally:
            meta.lock.release()

    # ------------------------------------------------------------------ flush and close

    async def _do_flush(self) -> None:
        if self.meta.refcounts is None:
            return
        async with self.meta.lock:
            await self.meta.writeback()
        await self.file.flush()

    async def _do_close(self) -> None:
        await self.drain()
        store = self.bitmap_store
        if (store.in_use_by_us or store.marked) and store.writable and self.meta.broken is None:
            # Every write has completed and marked the bitmaps: store them with in_use cleared.
            async with self.meta.lock:
                await store.store(store.bitmaps, clean=True)
        if self.meta.refcounts is not None and self.meta.broken is None and self.meta.dirty:
            try:
                await self._do_flush()
            except OSError as err:
                raise RequestError(err.errno or errno.EIO, f"qcow2: flush at close failed: {err}") from err
        if self.meta.refcounts is not None and self.meta.broken is None:
            await self.meta.trim()
