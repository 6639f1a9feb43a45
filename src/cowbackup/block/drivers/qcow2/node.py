"""The qcow2 node: the open image, guest reads and block status over its tables, bitmaps, flush and close.

Every request looks its clusters up under the metadata lock (:meth:`Qcow2Node._lookup`) and does its
data I/O without the lock.  Requests that change the tables live in their own modules, as functions that
take the node as their first argument: writes, with cluster allocation, compressed clusters and the
allocation claims that keep concurrent writes apart, in :mod:`~cowbackup.block.drivers.qcow2.writes`;
write-zeroes and discard in :mod:`~cowbackup.block.drivers.qcow2.zeroing`.
"""

from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING

from cowbackup.block.drivers.qcow2 import compress as codec
from cowbackup.block.drivers.qcow2 import writes, zeroing
from cowbackup.block.drivers.qcow2.bitmaps import StoredBitmap
from cowbackup.block.drivers.qcow2.bitmapstore import BitmapStore
from cowbackup.block.drivers.qcow2.format import OFFSET_MASK
from cowbackup.block.drivers.qcow2.l2cache import UNALLOCATED, Kind, Mapping, classify
from cowbackup.block.drivers.qcow2.metadata import CorruptImage, Metadata
from cowbackup.block.errors import BlockError, RequestError
from cowbackup.block.node import BlockNode, Extent, Limits, RequestFlags, Status

if TYPE_CHECKING:
    from cowbackup.block.drivers.qcow2.format import Header


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
        #: cluster so that a large write costs the same as a small one.  Kept by the ``writes`` module,
        #: like ``ctail``; nothing else touches them.
        self.allocating: list[tuple[int, int, asyncio.Event]] = []
        #: Where the next compressed cluster may go inside a partly used host cluster (0: none); set by
        #: compressed writes (``writes``), forgotten by :meth:`_check_ctail`.
        self.ctail = 0
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
        first = self.classify_entry(entries[l2i])
        end = (gc + 1) * cs
        if first.kind is not Kind.COMPRESSED:
            k = l2i + 1
            while end < limit:
                m = self.classify_entry(entries[k])
                if m.kind is not first.kind or (
                    first.kind is Kind.DATA and m.host != first.host + (k - l2i) * cs
                ):
                    break
                end += cs
                k += 1
        return first, min(end, limit) - offset

    def classify_entry(self, entry: int) -> Mapping:
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
                await self.read_mapped(mapping, offset + pos, buf[pos : pos + n])
            finally:
                meta.reads -= 1
            pos += n

    async def read_mapped(self, m: Mapping, offset: int, view: memoryview) -> None:
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

    # ------------------------------------------------------------------ writes, zeroing and discard

    async def _do_write(self, offset: int, data: memoryview, flags: RequestFlags) -> None:
        await writes.write(self, offset, data, flags)

    async def write_compressed_clusters(self, offset: int, data: memoryview) -> None:
        """Write whole clusters compressed (QEMU's ``BDRV_REQ_WRITE_COMPRESSED``).

        ``offset`` must be cluster aligned and ``data`` a multiple of the cluster size, except that the
        last cluster of the image may be partial.  A cluster that does not shrink is written normally.
        """
        await writes.write_compressed_clusters(self, offset, data)

    def _check_ctail(self) -> None:
        """After frees: forget the compressed tail if its host cluster became free (it may be reused)."""
        rc = self.meta.refcounts
        if self.ctail and rc is not None and rc.get(self.ctail >> self.cluster_bits) == 0:
            self.ctail = 0

    async def _do_write_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        await zeroing.write_zeroes(self, offset, length, flags)

    async def _do_discard(self, offset: int, length: int) -> None:
        await zeroing.discard(self, offset, length)

    # ------------------------------------------------------------------ flush and close

    async def _do_flush(self) -> None:
        await self.flush_image()

    async def flush_image(self) -> None:
        """Write the metadata back and flush the image file (the write half's flush, see ``writes``)."""
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
                await self.flush_image()
            except OSError as err:
                raise RequestError(err.errno or errno.EIO, f"qcow2: flush at close failed: {err}") from err
        if self.meta.refcounts is not None and self.meta.broken is None:
            await self.meta.trim()
