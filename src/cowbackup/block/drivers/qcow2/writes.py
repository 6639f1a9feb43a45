"""qcow2 writes: guest writes that allocate clusters, compressed clusters, and the claims that order them.

A write looks its clusters up under the metadata lock, does its data I/O without the lock, and (when it
allocates) takes the lock again to point the L2 entries at the new clusters::

    plan   (locked)    wait for allocating writes to the same guest clusters; look the clusters up;
                       allocate new host clusters for those that cannot be written in place
    data   (unlocked)  write the data, one write per run of contiguous host clusters; a partial new
                       cluster is completed from its old contents (backing file, zeros, compressed data)
    commit (locked)    set the L2 entries; the old host clusters are freed at the next write-back

While guest clusters are being allocated their range is listed in the node's ``allocating``; any other
request that would change their L2 entries waits for it (:func:`lock_range`), so two writes never allocate
the same guest cluster twice.

These functions are the write half of :class:`~cowbackup.block.drivers.qcow2.node.Qcow2Node`: each takes
the node as its first argument and works on the node's state (``allocating``, ``ctail``) as a method
would.  They know the node only as a :class:`Qcow2Image`, what they use of it, so the node imports them
and they never import the node.  :mod:`~cowbackup.block.drivers.qcow2.zeroing` uses :func:`check_usable`,
:func:`lock_range`, :func:`free_mapping`, :func:`segments` and :func:`write_plain` too.
"""

from __future__ import annotations

import asyncio
from array import array
from typing import Protocol

from cowbackup.block.drivers.qcow2 import compress as codec
from cowbackup.block.drivers.qcow2.format import L2E_COMPRESSED, L2E_COPIED, Header
from cowbackup.block.drivers.qcow2.l2cache import UNALLOCATED, Kind, Mapping, compressed_host_clusters
from cowbackup.block.drivers.qcow2.metadata import CorruptImage, Metadata
from cowbackup.block.errors import invalid
from cowbackup.block.node import BlockNode, RequestFlags


class Qcow2Image(Protocol):
    """What the write half uses of an open image: a :class:`~cowbackup.block.drivers.qcow2.node.Qcow2Node`."""

    hdr: Header
    meta: Metadata
    cluster_size: int
    cluster_bits: int
    l2_entries: int
    #: Write full clusters compressed (the node's ``compress`` option).
    compress_writes: bool
    #: The header names a backing file, open or not.
    has_backing_file: bool
    #: Guest cluster ranges ``[first, end)`` being allocated and the event set when they are done;
    #: kept by this module (:func:`lock_range`).
    allocating: list[tuple[int, int, asyncio.Event]]
    #: Where the next compressed cluster may go inside a partly used host cluster (0: none).
    ctail: int

    @property
    def size(self) -> int: ...
    @property
    def file(self) -> BlockNode: ...
    @property
    def backing(self) -> BlockNode | None: ...
    def classify_entry(self, entry: int) -> Mapping:
        """The mapping an L2 entry describes (a corrupt entry raises CorruptImage)."""

    async def read_mapped(self, m: Mapping, offset: int, view: memoryview) -> None:
        """Read guest bytes at ``offset`` that all map as ``m``."""

    async def flush_image(self) -> None:
        """Write the metadata back and flush the image file."""


# ---------------------------------------------------------------------- claims and helpers


def check_usable(node: Qcow2Image) -> None:
    """Refuse to change an image found corrupt (CorruptImage, an EIO)."""
    if node.meta.broken is not None:
        raise CorruptImage(f"image is corrupt, writes refused ({node.meta.broken})")


async def lock_range(node: Qcow2Image, first: int, count: int) -> None:
    """Take the metadata lock once no write is allocating guest clusters ``[first, first+count)``."""
    lock = node.meta.lock
    while True:
        await lock.acquire()
        end = first + count
        event = next((ev for a, b, ev in node.allocating if a < end and first < b), None)
        if event is None:
            return
        lock.release()
        await event.wait()


def free_mapping(node: Qcow2Image, m: Mapping) -> None:
    """Free the host clusters that ``m`` points to, at the next write-back.  Called under the lock."""
    rc = node.meta.require_refcounts()
    if m.kind is Kind.COMPRESSED:
        for c in compressed_host_clusters(m, node.cluster_bits):
            rc.defer_free(c)
    elif m.kind in (Kind.DATA, Kind.ZERO) and m.host:
        rc.defer_free(m.host >> node.cluster_bits)


def segments(node: Qcow2Image, offset: int, length: int) -> list[tuple[int, int]]:
    """Split a range at L2 table boundaries (each part is served by one table)."""
    span = node.l2_entries * node.cluster_size
    out = []
    end = offset + length
    while offset < end:
        n = min(end, (offset // span + 1) * span) - offset
        out.append((offset, n))
        offset += n
    return out


async def _old_cluster(node: Qcow2Image, m: Mapping, gc: int) -> bytearray:
    """The current contents of guest cluster ``gc`` (mapped as ``m``), to complete a partial write."""
    cs = node.cluster_size
    buf = bytearray(cs)
    n = min(cs, node.size - gc * cs)
    if m.kind is not Kind.ZERO:
        await node.read_mapped(m, gc * cs, memoryview(buf)[:n])
    return buf


# ---------------------------------------------------------------------- writes


async def write(node: Qcow2Image, offset: int, data: memoryview, flags: RequestFlags) -> None:
    """``Qcow2Node._do_write``: whole clusters compressed when asked to, the rest as plain writes."""
    check_usable(node)
    cs = node.cluster_size
    if node.compress_writes or flags & RequestFlags.WRITE_COMPRESSED:
        start = -(-offset // cs) * cs
        end = offset + len(data) if offset + len(data) == node.size else (offset + len(data)) // cs * cs
        if start < end:
            if start > offset:
                await write(node, offset, data[: start - offset], flags & ~RequestFlags.FUA)
            await write_compressed_clusters(node, start, data[start - offset : end - offset])
            if end < offset + len(data):
                await write_plain(node, end, data[end - offset :])
            if flags & RequestFlags.FUA:
                await node.flush_image()
            return
    await write_plain(node, offset, data)
    if flags & RequestFlags.FUA:
        await node.flush_image()


async def write_plain(node: Qcow2Image, offset: int, data: memoryview) -> None:
    """Write ``data`` uncompressed, one L2 table's range at a time."""
    pos = 0
    for seg_off, n in segments(node, offset, len(data)):
        await _write_segment(node, seg_off, data[pos : pos + n])
        pos += n


async def _write_segment(node: Qcow2Image, offset: int, data: memoryview) -> None:
    """Write ``data`` inside one L2 table's range (plan / data / commit, see the module docstring)."""
    cb = node.cluster_bits
    meta = node.meta
    end = offset + len(data)
    first = offset >> cb
    count = ((end - 1) >> cb) - first + 1
    l1i, l2i = divmod(first, node.l2_entries)
    await lock_range(node, first, count)
    try:
        check_usable(node)
        await meta.before_first_write()
        table = await meta.l2_table(l1i, create=False)
        # Fast path: every cluster unallocated (a backup into a fresh image) -- no per-cluster lookup.
        fresh = table is None or not any(table.entries[l2i : l2i + count])
        if fresh:
            olds = [UNALLOCATED] * count
            need = list(range(count))
        else:
            assert table is not None
            olds = [node.classify_entry(e) for e in table.entries[l2i : l2i + count]]
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
            node.allocating.append(claim)
    finally:
        meta.lock.release()
    committed = False
    try:
        if need:
            await meta.grow_to(max(start + n for start, n in runs))
        await _write_data(node, offset, data, hosts, olds, set(need), contiguous=fresh and len(runs) == 1)
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
                        free_mapping(node, node.classify_entry(entries[l2i + k]))
                        entries[l2i + k] = hosts[k] | L2E_COPIED
                table.dirty = True
            committed = True
    finally:
        if need:
            if not committed:
                for k in need:
                    meta.require_refcounts().defer_free(hosts[k] >> cb)
            node.allocating.remove(claim)
            event.set()


async def _write_data(
    node: Qcow2Image,
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
    cs, cb = node.cluster_size, node.cluster_bits
    first = offset >> cb
    end = offset + len(data)
    file = node.file
    if contiguous and not offset & (cs - 1) and (not end & (cs - 1) or end == node.size):
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
        partial_new = k in new and (gend - gstart) < min(cs, node.size - ((first + k) << cb))
        if partial_new:
            buf = await _old_cluster(node, olds[k], first + k)
            buf[within : within + gend - gstart] = data[gstart - offset : gend - offset]
            await file.write(host, buf)
            continue
        if run_len and run_host + run_len == host + within:
            run_len += gend - gstart
            continue
        await flush_run()
        run_host, run_pos, run_len = host + within, gstart - offset, gend - gstart
    await flush_run()


# ---------------------------------------------------------------------- compressed writes


async def write_compressed_clusters(node: Qcow2Image, offset: int, data: memoryview) -> None:
    """:meth:`Qcow2Node.write_compressed_clusters` (see there for the contract)."""
    cs, cb = node.cluster_size, node.cluster_bits
    if offset % cs or (len(data) % cs and offset + len(data) != node.size):
        raise invalid(f"compressed write of {len(data)} bytes at {offset} is not cluster aligned")
    check_usable(node)
    for pos in range(0, len(data), cs):
        chunk = data[pos : pos + cs]
        comp = codec.compress(bytes(chunk).ljust(cs, b"\0"), node.hdr.compression_type)
        if comp is None:
            await write_plain(node, offset + pos, chunk)
        else:
            await _write_compressed_cluster(node, (offset + pos) >> cb, comp)


async def _write_compressed_cluster(node: Qcow2Image, gc: int, comp: bytes) -> None:
    cs, cb = node.cluster_size, node.cluster_bits
    meta = node.meta
    l1i, l2i = divmod(gc, node.l2_entries)
    await lock_range(node, gc, 1)
    try:
        check_usable(node)
        await meta.before_first_write()
        rc = meta.require_refcounts()
        tail = node.ctail
        if tail and (tail & (cs - 1)) + len(comp) <= cs:
            rc.increment(tail >> cb)
            host = tail
        else:
            host = rc.allocate_one() << cb
            await meta.grow_to(rc.high)
        node.ctail = (host + len(comp)) if (host + len(comp)) & (cs - 1) else 0
        event = asyncio.Event()
        claim = (gc, gc + 1, event)
        node.allocating.append(claim)
    finally:
        meta.lock.release()
    committed = False
    try:
        await node.file.write(host, comp)
        x = 62 - (cb - 8)
        sectors = (host + len(comp) - 1) // 512 - host // 512
        async with meta.lock:
            table = await meta.l2_table(l1i, create=True)
            assert table is not None
            free_mapping(node, node.classify_entry(table.entries[l2i]))
            table.entries[l2i] = L2E_COMPRESSED | (sectors << x) | host
            table.dirty = True
        committed = True
    finally:
        if not committed:
            meta.require_refcounts().defer_free(host >> cb)
        node.allocating.remove(claim)
        event.set()
