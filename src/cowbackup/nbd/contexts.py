"""The ``qemu:`` metadata contexts an export may offer, as QEMU's NBD server defines them.

``qemu:dirty-bitmap:NAME`` -- one flag per extent: ``NBD_STATE_DIRTY`` (1) where the bitmap is dirty::

    bitmap (64 KiB granules)   | clean | dirty | dirty | clean | ...
    reply                      |  0    |       1       |  0    | ...     merged runs, clipped to the request

``qemu:allocation-depth`` -- where in the backing chain each extent is allocated: 0 nowhere (reads come
from no layer: zeros), 1 in the exported node itself, N in its (N-1)th backing file.  Filters above the
node (a copy-before-write filter, say) are looked through, as QEMU does.  A node without a backing chain
is allocated everywhere (depth 1), as raw images are under QEMU.

Each context is a :data:`~cowbackup.nbd.handlers.ContextStatus`: ``(node, offset, length, only_first)``
-> ``[(length, flags), ...]`` covering a prefix of the request, at most MAX_EXTENTS runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from cowbackup.block.bitmap import DirtyBitmap
from cowbackup.block.dirty_bitmaps import BitmapCheck, BitmapError, NodeDirtyBitmap, lookup_bitmap
from cowbackup.block.errors import BlockError
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode, Status
from cowbackup.block.options import Options
from cowbackup.nbd.handlers import MAX_EXTENTS, ContextStatus

__all__ = [
    "ALLOCATION_DEPTH",
    "DIRTY_BITMAP_PREFIX",
    "NBD_STATE_DIRTY",
    "allocation_depth",
    "bitmap_contexts",
    "dirty_bitmap_status",
    "export_bitmaps",
]

ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
#: The one flag of a ``qemu:dirty-bitmap`` extent (QEMU's NBD_STATE_DIRTY).
NBD_STATE_DIRTY = 1
#: Backing chains deeper than this are reported as allocated at this depth (a loop guard).
MAX_DEPTH = 1024


def _append(runs: list[tuple[int, int]], length: int, flags: int) -> None:
    if runs and runs[-1][1] == flags:
        runs[-1] = (runs[-1][0] + length, flags)
    else:
        runs.append((length, flags))


def dirty_bitmap_status(bitmap: Callable[[], DirtyBitmap]) -> ContextStatus:
    """The ``qemu:dirty-bitmap:NAME`` context over the bitmap ``bitmap()`` returns at each query."""

    async def status(node: BlockNode, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
        bits = bitmap()
        end = offset + length
        runs: list[tuple[int, int]] = []
        pos = offset
        while pos < end and len(runs) < MAX_EXTENTS:
            dirty = bits.next_dirty(pos, end) == pos if pos < bits.size else False
            if dirty:
                stop = bits.next_clean(pos, end)
            else:
                stop = bits.next_dirty(pos, end) if pos < bits.size else None
            stop = end if stop is None else stop
            _append(runs, stop - pos, NBD_STATE_DIRTY if dirty else 0)
            pos = stop
            if one:
                break
        return runs

    return status


def _below_filters(node: BlockNode) -> BlockNode:
    while node.is_filter:
        node = node.children["file"].node
    return node


def _backing(node: BlockNode) -> BlockNode | None:
    child = node.children.get("backing")
    return None if child is None else _below_filters(child.node)


async def _depth(node: BlockNode, offset: int, length: int) -> tuple[int, int]:
    """``(length, depth)`` of the first run from ``offset`` with one depth, within ``length``."""
    depth = 1
    layer: BlockNode | None = node
    while layer is not None and depth <= MAX_DEPTH:
        if offset >= layer.size:
            return length, 0  # a shorter backing file: nothing is stored there
        ext = await layer.block_status(offset, min(length, layer.size - offset))
        if ext.flags & Status.ALLOCATED:
            return ext.length, depth
        length = ext.length
        layer = _backing(layer)
        depth += 1
    return length, 0 if layer is None else MAX_DEPTH


async def allocation_depth(node: BlockNode, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
    """The ``qemu:allocation-depth`` context (see the module docstring)."""
    top = _below_filters(node)
    end = offset + length
    runs: list[tuple[int, int]] = []
    pos = offset
    while pos < end and len(runs) < MAX_EXTENTS:
        run, depth = await _depth(top, pos, end - pos)
        if one and runs and runs[-1][1] != depth:
            break
        _append(runs, run, depth)
        pos += run
    return runs


def _find_in_chain(node: BlockNode, name: str) -> NodeDirtyBitmap | None:
    """A bitmap named ``name`` on ``node`` or below it (filters, then backing files), as QEMU looks."""
    layer: BlockNode | None = node
    depth = 0
    while layer is not None and depth <= MAX_DEPTH:
        bm = layer.dirty_bitmaps.find(name)
        if bm is not None:
            return bm
        if layer.is_filter:
            layer = layer.children["file"].node
        else:
            child = layer.children.get("backing")
            layer = None if child is None else child.node
        depth += 1
    return None


def export_bitmaps(
    graph: BlockGraph, node: BlockNode, items: Sequence[object], *, writable: bool
) -> list[NodeDirtyBitmap]:
    """The bitmaps ``block-export-add ... bitmaps`` names, checked in QEMU's order and words.

    An item is a bitmap name (looked up on the exported node and below it) or ``{"node", "name"}``.
    A read-only export may only carry disabled bitmaps: an enabled one would change under a reader
    that has no way to see why.  BitmapError / BlockError; nothing is marked busy here.
    """
    found: list[NodeDirtyBitmap] = []
    for item in items:
        if isinstance(item, str):
            bm = _find_in_chain(node, item)
            if bm is None:
                raise BitmapError(f"Bitmap '{item}' is not found")
        elif isinstance(item, Mapping):
            opts = Options(item)
            owner_name = opts.get_str("node")
            name = opts.get_str("name")
            opts.finish()
            bm = lookup_bitmap(graph, owner_name, name)
        else:
            raise BlockError("Invalid parameter type for 'bitmaps[]', expected: object or string")
        bm.check(BitmapCheck.ALLOW_RO)
        if not writable and bm.enabled:
            raise BitmapError(f"Enabled bitmap '{bm.name}' incompatible with readonly export")
        found.append(bm)
    return found


def bitmap_contexts(bitmaps: Sequence[NodeDirtyBitmap]) -> dict[str, ContextStatus]:
    """``qemu:dirty-bitmap:NAME`` for each bitmap, reading its bits at each query."""

    def bits_of(bm: NodeDirtyBitmap) -> Callable[[], DirtyBitmap]:
        return lambda: bm.bits

    return {f"{DIRTY_BITMAP_PREFIX}{bm.name}": dirty_bitmap_status(bits_of(bm)) for bm in bitmaps}
