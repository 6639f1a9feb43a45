"""The qcow2 node's persistent bitmaps as seen by the bitmap registry (``block-dirty-bitmap-*``).

:mod:`cowbackup.block.dirty_bitmaps` keeps every node's named bitmaps; this module is its
:class:`~cowbackup.block.dirty_bitmaps.BitmapStore` for qcow2 nodes, over the node's own bitmap store
(``Qcow2Node.stored_bitmaps`` / ``store_bitmaps`` / ``remove_stored_bitmap``, see ``bitmapstore``)::

    registry (NodeDirtyBitmap)          qcow2 node (StoredBitmap)            image
    ---------------------------         -------------------------           -----
    load:  one persistent bitmap   <--  each usable directory entry    <--  read at open
           per entry; its bits ARE      (in_use at open: inconsistent,
           the entry's bits (shared)     no bits)
    save:  persistent bitmaps      -->  the new set                    -->  written at once
    close: as save, after the last request; the node's own close then clears ``in_use``

Where the bits are shared, the node and the registry both mark them on a write (the same bits, so
marking twice changes nothing). ``in_use`` is the node's business: stored bitmaps get it on disk before
the image first changes, and lose it when the node closes cleanly -- as QEMU's qcow2 driver does; the
``in_use`` argument of :meth:`Qcow2BitmapStore.save` therefore changes nothing here.

Directory order follows QEMU's, so that ``qemu-img info`` lists the bitmaps of an image the same way
whichever daemon last closed it: the entries found at open keep their places, and bitmaps created since
follow in the registry's order (newest first), which is how QEMU appends them when it stores at close.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from cowbackup.block.bitmap import DirtyBitmap
from cowbackup.block.dirty_bitmaps import BitmapError, BitmapOwner, NodeDirtyBitmap, register_bitmap_store
from cowbackup.block.drivers.qcow2.bitmaps import (
    DIR_ENTRY,
    MAX_BITMAPS,
    MAX_DIRECTORY_SIZE,
    MAX_GRANULARITY_BITS,
    MAX_NAME_SIZE,
    MAX_PHYS_SIZE,
    MAX_TABLE_SIZE,
    MIN_GRANULARITY_BITS,
    StoredBitmap,
    data_bytes,
)
from cowbackup.block.drivers.qcow2.node import Qcow2Node
from cowbackup.block.errors import BlockError

if TYPE_CHECKING:
    from cowbackup.block.node import BlockNode

#: Names of the entries found in each open node's image when it was loaded, in directory order, minus
#: those removed since (event loop only).
_LOADED: weakref.WeakKeyDictionary[BlockNode, list[str]] = weakref.WeakKeyDictionary()


def _entry_size(name: str) -> int:
    """Bytes of a directory entry without extra data (QEMU's calc_dir_entry_size)."""
    return -(-(DIR_ENTRY.size + len(name.encode())) // 8) * 8


class Qcow2BitmapStore:
    """The registry's view of one qcow2 node's stored bitmaps (stateless besides ``_LOADED``)."""

    def __init__(self, node: Qcow2Node) -> None:
        self.node = node

    # ------------------------------------------------------------------ checks (no I/O)

    def check_new(self, name: str, granularity: int) -> None:
        """QEMU's qcow2_co_can_store_new_dirty_bitmap: the same checks, order and messages."""
        try:
            self._check_new(name, granularity)
        except BitmapError as err:
            raise BitmapError(
                f"Can't make bitmap '{name}' persistent in '{self.node.node_name}': {err}"
            ) from None

    def _check_new(self, name: str, granularity: int) -> None:
        node = self.node
        if node.hdr.version < 3:
            raise BitmapError("Cannot store dirty bitmaps in qcow2 v2 files")
        if not node.can_store_bitmaps:
            raise BitmapError("the image is read-only or corrupt")
        gbits = granularity.bit_length() - 1
        if gbits > MAX_GRANULARITY_BITS:
            raise BitmapError(f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)")
        if gbits < MIN_GRANULARITY_BITS:
            raise BitmapError(f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)")
        nbytes = data_bytes(node.size, gbits)
        if nbytes > MAX_PHYS_SIZE or nbytes > MAX_TABLE_SIZE * node.cluster_size:
            raise BitmapError("Too much space will be occupied by the bitmap. Use larger granularity")
        if len(name.encode()) > MAX_NAME_SIZE:
            raise BitmapError(f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)")
        names = [bm.name for bm in node.dirty_bitmaps if bm.persistent and bm.name is not None]
        if len(names) >= MAX_BITMAPS:
            raise BitmapError("Maximum number of persistent bitmaps is already reached")
        if sum(_entry_size(n) for n in [*names, name]) > MAX_DIRECTORY_SIZE:
            raise BitmapError("Not enough space in the bitmap directory")

    # ------------------------------------------------------------------ storage

    async def load(self) -> None:
        """Create a persistent bitmap in the registry for every usable bitmap of the image.

        The image was read when the node opened: nothing to do on disk. A bitmap left ``in_use`` is
        inconsistent, and disabled as QEMU disables it (bdrv_dirty_bitmap_set_inconsistent).
        """
        node = self.node
        stored = node.stored_bitmaps()
        for sb in stored:  # directory order; each new bitmap goes first, as in QEMU
            bm = node.dirty_bitmaps.create(sb.name, sb.granularity)
            bm.bits = sb.bitmap
            bm.persistent = True
            bm.inconsistent = sb.inconsistent
            bm.disabled = not sb.enabled or sb.inconsistent
            bm.readonly = node.read_only
        _LOADED[node] = [sb.name for sb in stored]

    async def save(self, in_use: bool) -> None:
        """Replace the image's bitmaps by the registry's persistent ones (see the module docstring).

        Raises BitmapError (naming the node) if they cannot be stored; nothing on disk changes then.
        """
        node = self.node
        bitmaps = self._wanted()
        if not bitmaps and not node.stored_bitmaps():
            return  # nothing stored, nothing to store: leave the image alone
        try:
            await node.store_bitmaps(bitmaps)
        except (BlockError, OSError) as err:
            raise BitmapError(
                f"Cannot store persistent bitmaps in qcow2 node '{node.node_name}': {err}"
            ) from err

    async def remove(self, name: str) -> None:
        """Remove the bitmap ``name`` from the image (a no-op if it was never stored there)."""
        node = self.node
        loaded = _LOADED.get(node, [])
        if name in loaded:
            loaded.remove(name)
        if all(sb.name != name for sb in node.stored_bitmaps()):
            return
        try:
            await node.remove_stored_bitmap(name)
        except (BlockError, OSError) as err:
            raise BitmapError(
                f"Cannot remove bitmap '{name}' from qcow2 node '{node.node_name}': {err}"
            ) from err

    def _wanted(self) -> list[StoredBitmap]:
        """The registry's persistent bitmaps as the image should hold them, in directory order."""
        node = self.node
        persistent = {bm.name: bm for bm in node.dirty_bitmaps if bm.persistent and bm.name is not None}
        loaded = [n for n in _LOADED.get(node, []) if n in persistent]
        order = loaded + [n for n in persistent if n not in loaded]
        extra = {sb.name: sb.extra_data for sb in node.stored_bitmaps()}
        return [_stored(persistent[n], n, extra.get(n, b"")) for n in order]


def _stored(bm: NodeDirtyBitmap, name: str, extra_data: bytes) -> StoredBitmap:
    """``bm`` as the qcow2 node stores it: a frozen bitmap (a backup runs) holds its own bits plus
    its successor's, which records in its place; otherwise the bits are shared, not copied."""
    bits = bm.bits
    enabled = bm.enabled
    if bm.successor is not None:
        bits = bm.bits.copy()
        bits.merge(bm.successor.bits)
        enabled = bm.successor.enabled
    if bm.inconsistent:
        bits = DirtyBitmap(bm.size, bm.granularity)
    return StoredBitmap(name, bits, enabled=enabled, inconsistent=bm.inconsistent, extra_data=extra_data)


def _store_of(node: BitmapOwner) -> Qcow2BitmapStore | None:
    return Qcow2BitmapStore(node) if isinstance(node, Qcow2Node) else None


register_bitmap_store("qcow2", _store_of)
