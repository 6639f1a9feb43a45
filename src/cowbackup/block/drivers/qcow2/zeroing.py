"""qcow2 write-zeroes and discard: whole clusters change only their L2 entries, partial ones are written.

Whole clusters are changed one L2 table at a time (:func:`_zero_segment`).  On a v3 image write-zeroes
sets the zero flag, keeping a cluster of its own allocated unless ``MAY_UNMAP`` is given (as QEMU does);
discard, and write-zeroes on v2, leave the entry unallocated, or zero-flagged on v3 when a backing file
lies below.  Host clusters let go of are freed at the next write-back.

The partial clusters at the ends of a write-zeroes are written as zero data
(:func:`~cowbackup.block.drivers.qcow2.writes.write_plain`), and so is the whole range on a v2 image with
a backing file, since v2 has no zero flag.  Discard is advisory: it leaves partial clusters alone, and
does nothing on a v2 image over an open backing file.

Like :mod:`~cowbackup.block.drivers.qcow2.writes`, each function takes the node (a
:class:`~cowbackup.block.drivers.qcow2.writes.Qcow2Image`) as its first argument,
and changes a table only under that module's allocation claims (``lock_range``).
"""

from __future__ import annotations

from cowbackup.block.drivers.qcow2.format import L2E_ZERO, OFFSET_MASK
from cowbackup.block.drivers.qcow2.l2cache import Kind
from cowbackup.block.drivers.qcow2.writes import (
    Qcow2Image,
    check_usable,
    free_mapping,
    lock_range,
    segments,
    write_plain,
)
from cowbackup.block.node import RequestFlags

_ZERO_CHUNK = 1 << 20


async def write_zeroes(node: Qcow2Image, offset: int, length: int, flags: RequestFlags) -> None:
    """``Qcow2Node._do_write_zeroes``: make ``[offset, offset+length)`` read as zeros."""
    check_usable(node)
    cs = node.cluster_size
    start = -(-offset // cs) * cs
    end = offset + length
    full_end = end if end == node.size else end // cs * cs
    if (node.hdr.version < 3 and (node.backing is not None or node.has_backing_file)) or start >= full_end:
        await _write_zero_data(node, offset, length)
    else:
        if start > offset:
            await _write_zero_data(node, offset, start - offset)
        unmap = bool(flags & RequestFlags.MAY_UNMAP)
        for seg_off, n in segments(node, start, full_end - start):
            await _zero_segment(node, seg_off, n, discard=False, unmap=unmap)
        if full_end < end:
            await _write_zero_data(node, full_end, end - full_end)
    if flags & RequestFlags.FUA:
        await node.flush_image()


async def _write_zero_data(node: Qcow2Image, offset: int, length: int) -> None:
    zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
    while length:
        n = min(length, len(zeros))
        await write_plain(node, offset, zeros[:n])
        offset += n
        length -= n


async def discard(node: Qcow2Image, offset: int, length: int) -> None:
    """``Qcow2Node._do_discard``: drop the whole clusters of ``[offset, offset+length)``."""
    check_usable(node)
    cs = node.cluster_size
    start = -(-offset // cs) * cs
    end = offset + length
    end = end if end == node.size else end // cs * cs
    if node.hdr.version < 3 and node.backing is not None:
        return  # v2 cannot say "zero" over a backing file; discard is advisory
    for seg_off, n in segments(node, start, max(0, end - start)):
        await _zero_segment(node, seg_off, n, discard=True, unmap=True)


async def _zero_segment(node: Qcow2Image, offset: int, length: int, *, discard: bool, unmap: bool) -> None:
    """Make whole clusters read as zeros (v3 zero flag) or unallocated (no backing file) in one table."""
    cb = node.cluster_bits
    meta = node.meta
    first = offset >> cb
    count = -(-length >> cb) if length else 0
    l1i, l2i = divmod(first, node.l2_entries)
    # Discard follows the open chain (QEMU's rule); zeroing, the chain the image names.
    has_backing = node.backing is not None or (not discard and node.has_backing_file)
    v3 = node.hdr.version >= 3
    await lock_range(node, first, count)
    try:
        check_usable(node)
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
            m = node.classify_entry(entry)
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
                free_mapping(node, m)
            entries[k] = new
            table.dirty = True
    finally:
        meta.lock.release()
