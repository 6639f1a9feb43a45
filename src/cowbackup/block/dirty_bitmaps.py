"""Named dirty bitmaps of block nodes (QEMU's BdrvDirtyBitmap, block/dirty-bitmap.c).

Every :class:`~cowbackup.block.node.BlockNode` owns a :class:`NodeBitmaps`: its dirty bitmaps, newest
first as QEMU lists them (``query-named-block-nodes``). The node's request path calls
:meth:`NodeBitmaps.mark` when a write, write-zeroes or discard completes -- successfully or not, as
QEMU's ``bdrv_co_write_req_finish`` does -- and every *enabled* bitmap of the node records the range.

A bitmap's states, as QEMU names them::

    recording      enabled, or frozen with a successor that records (what query shows)
    disabled       does not record writes (block-dirty-bitmap-disable, or frozen)
    busy           in use by an operation (a backup job, an export); most commands refuse it
    readonly       loaded from a read-only image; cannot be modified
    inconsistent   loaded from storage that was not closed cleanly; only removal is allowed
    persistent     stored by the node's bitmap store (see :class:`BitmapStore`) when it closes

Successors -- how a backup job uses a bitmap without losing writes (QEMU's verbs)::

    create_successor   parent: disabled + busy (frozen); a new anonymous bitmap of the same
                       granularity, enabled iff the parent was, records writes from now on
    abdicate           the successor takes the parent's name (and persistence); the parent goes
    reclaim            the successor's bits are merged back into the parent, which takes the
                       successor's enabled state and is no longer busy; the successor goes

Persistence is a hook: a driver that can store bitmaps registers a :class:`BitmapStore` factory with
:func:`register_bitmap_store`; :meth:`NodeBitmaps.store` finds it. Without one,
``persistent=true`` is refused as QEMU refuses it ("Can't store persistent bitmaps to NODE: Operation
not supported"). The life of a store, as QEMU's qcow2 driver lives it::

    blockdev-add         NodeBitmaps.load    stored bitmaps join the registry (inconsistent if the
                                             store was left "in use")
    add / remove         NodeBitmaps.save    of a persistent bitmap: stored at once, "in use"
    node close           NodeBitmaps.close   after the last request drained: stored, not "in use"

The store's methods that touch storage are coroutines; their blocking calls run in the I/O thread pool.

Thread safety: none needed -- bitmaps belong to the event loop that owns the node (QEMU: BQL plus the
bitmap mutex).

This module sits below :mod:`cowbackup.block.node` (a node creates its :class:`NodeBitmaps`), so it
knows nodes and the graph only by what it uses of them: :class:`BitmapOwner` and :class:`NodeLookup`.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import Protocol

from cowbackup.block.bitmap import DirtyBitmap
from cowbackup.block.errors import BlockError
from cowbackup.block.request_types import Limits

log = logging.getLogger(__name__)

__all__ = [
    "MAX_NAME_SIZE",
    "MIN_GRANULARITY",
    "BitmapCheck",
    "BitmapError",
    "BitmapOwner",
    "BitmapStore",
    "NodeBitmaps",
    "NodeDirtyBitmap",
    "NodeLookup",
    "default_granularity",
    "load_persistent_bitmaps",
    "lookup_bitmap",
    "register_bitmap_store",
]

#: Longest bitmap name in bytes (QEMU's BDRV_BITMAP_MAX_NAME_SIZE, the qcow2 limit).
MAX_NAME_SIZE = 1023
#: Smallest granularity block-dirty-bitmap-add accepts.
MIN_GRANULARITY = 512


class BitmapError(BlockError):
    """A bitmap operation refused (QMP: GenericError); the message is QEMU's."""


class BitmapCheck(enum.Flag):
    """What :meth:`NodeDirtyBitmap.check` refuses (QEMU's BDRV_BITMAP_* flags)."""

    BUSY = enum.auto()
    RO = enum.auto()
    INCONSISTENT = enum.auto()
    #: For operations that change the bits.
    DEFAULT = BUSY | RO | INCONSISTENT
    #: For operations that only read the bits or change the recording state.
    ALLOW_RO = BUSY | INCONSISTENT


class BitmapOwner(Protocol):
    """What the bitmaps use of the node that owns them: a :class:`~cowbackup.block.node.BlockNode`."""

    @property
    def node_name(self) -> str: ...
    @property
    def driver_name(self) -> str: ...
    @property
    def read_only(self) -> bool: ...
    @property
    def size(self) -> int: ...
    @property
    def limits(self) -> Limits: ...
    @property
    def dirty_bitmaps(self) -> NodeBitmaps: ...
    async def drain(self) -> None: ...


class NodeLookup(Protocol):
    """Finds a node by name: a :class:`~cowbackup.block.graph.BlockGraph`."""

    def find(self, name: str) -> BitmapOwner | None: ...


def default_granularity(node: BitmapOwner) -> int:
    """QEMU's bdrv_get_default_bitmap_granularity: the node's cluster size clamped to [4 KiB, 64 KiB],
    64 KiB when the node has no clusters (file, raw over file, null-co)."""
    cluster = node.limits.cluster_size
    if cluster <= 0:
        return 65536
    return min(65536, max(4096, cluster))


class NodeDirtyBitmap:
    """One dirty bitmap of one node: the bits plus QEMU's state flags (see the module docstring).

    ``name`` is None for anonymous bitmaps (successors). Create bitmaps with
    :meth:`NodeBitmaps.create`, never directly, so that the node's writes reach them.
    """

    def __init__(self, owner: NodeBitmaps, name: str | None, size: int, granularity: int) -> None:
        self.owner = owner
        self.name = name
        self.bits = DirtyBitmap(size, granularity)
        self._disabled = False
        self.busy = False
        self.readonly = False
        self.inconsistent = False
        self.persistent = False
        #: The bitmap recording in this one's place while it is frozen (None otherwise).
        self.successor: NodeDirtyBitmap | None = None
        #: False once released: a stale reference must not be used any more.
        self.attached = True

    # ------------------------------------------------------------------ state

    @property
    def disabled(self) -> bool:
        return self._disabled

    @disabled.setter
    def disabled(self, value: bool) -> None:
        self._disabled = value
        self.owner.refresh_marking()

    @property
    def granularity(self) -> int:
        return self.bits.granularity

    @property
    def size(self) -> int:
        return self.bits.size

    @property
    def enabled(self) -> bool:
        return not self.disabled

    @property
    def recording(self) -> bool:
        """Whether writes end up in this bitmap's data: enabled, or frozen with a recording successor."""
        return self.enabled or (self.successor is not None and self.successor.enabled)

    @property
    def frozen(self) -> bool:
        return self.successor is not None

    def count(self) -> int:
        """Dirty bytes in whole granules (QEMU's bdrv_get_dirty_count)."""
        return self.bits.count()

    def __repr__(self) -> str:
        names = ("disabled", "busy", "readonly", "inconsistent", "persistent")
        flags = [f for f in names if getattr(self, f)]
        return f"<NodeDirtyBitmap {self.name!r} on {self.owner.node.node_name!r} {self.bits!r} {flags}>"

    def check(self, what: BitmapCheck) -> None:
        """Raise :class:`BitmapError` with QEMU's message if the bitmap is in a state ``what`` refuses.

        The checks run in QEMU's order: busy, read-only, inconsistent.
        """
        if BitmapCheck.BUSY in what and self.busy:
            raise BitmapError(
                f"Bitmap '{self.name}' is currently in use by another operation and cannot be used"
            )
        if BitmapCheck.RO in what and self.readonly:
            raise BitmapError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if BitmapCheck.INCONSISTENT in what and self.inconsistent:
            # QEMU adds the hint "Try block-dirty-bitmap-remove to delete this bitmap from disk",
            # which QMP never shows.
            raise BitmapError(f"Bitmap '{self.name}' is inconsistent and cannot be used")

    def info(self) -> dict[str, object]:
        """The ``dirty-bitmaps`` entry of query-named-block-nodes (QEMU's BlockDirtyInfo)."""
        out: dict[str, object] = {}
        if self.name is not None:
            out["name"] = self.name
        out.update(
            recording=self.recording,
            persistent=self.persistent,
            busy=self.busy,
            granularity=self.granularity,
            count=self.count(),
        )
        if self.inconsistent:
            out["inconsistent"] = True
        return out

    def sha256(self) -> str:
        """SHA-256 of the bits as QEMU hashes them (x-debug-block-dirty-bitmap-sha256): level 0 as
        64-bit little-endian words, bit ``i`` = granule ``i``, padded with zero bits to a whole word."""
        data = self.bits.serialize()
        return hashlib.sha256(data + bytes(-len(data) % 8)).hexdigest()

    # ------------------------------------------------------------------ operations

    def enable(self) -> None:
        self.disabled = False

    def disable(self) -> None:
        self.disabled = True

    def clear(self) -> DirtyBitmap:
        """Clear every bit; return the bits as they were, for :meth:`restore` (transaction abort)."""
        old = self.bits.copy()
        self.bits.clear()
        return old

    def restore(self, old: DirtyBitmap) -> None:
        """Put back bits saved by :meth:`clear` or :meth:`merge_from`."""
        self.bits = old

    def merge_from(self, other: NodeDirtyBitmap | DirtyBitmap) -> DirtyBitmap:
        """OR ``other``'s bits into this bitmap without any state check (QEMU's
        bdrv_dirty_bitmap_merge_internal); return the bits as they were, for :meth:`restore`.

        Raises BitmapError with QEMU's message if the sizes differ; granularities may differ.
        """
        src = other.bits if isinstance(other, NodeDirtyBitmap) else other
        if src.size != self.size:
            raise BitmapError(
                f"Bitmaps are of different sizes (destination size is {self.size}, "
                f"source size is {src.size}) and can't be merged"
            )
        old = self.bits.copy()
        self.bits.merge(src)
        return old

    def create_successor(self) -> NodeDirtyBitmap:
        """Freeze this bitmap and return the anonymous successor that records in its place.

        Raises BitmapError if the bitmap is busy or already has a successor (QEMU's messages).
        """
        self.check(BitmapCheck.BUSY)
        if self.successor is not None:
            raise BitmapError("Cannot create a successor for a bitmap that already has one")
        child = self.owner.create(None, self.granularity)
        child.disabled = self.disabled
        self.disabled = True
        self.successor = child
        self.busy = True
        return child

    def abdicate(self) -> NodeDirtyBitmap:
        """The successor takes this bitmap's name and persistence; this bitmap is released.

        Returns the successor. Raises BitmapError if there is none.
        """
        child = self.successor
        if child is None:
            raise BitmapError("Cannot relinquish control if there's no successor present")
        child.name, self.name = self.name, None
        child.persistent, self.persistent = self.persistent, False
        self.successor = None
        self.busy = False
        self.owner.release(self)
        return child

    def reclaim(self) -> NodeDirtyBitmap:
        """Merge the successor's bits back into this bitmap, which records again as the successor did
        and is no longer busy; the successor is released. Returns this bitmap.

        Raises BitmapError if there is no successor.
        """
        child = self.successor
        if child is None:
            raise BitmapError("Cannot reclaim a successor when none is present")
        self.bits.merge(child.bits)
        self.disabled = child.disabled
        self.busy = False
        self.successor = None
        self.owner.release(child)
        return self


class BitmapStore(Protocol):
    """Where a node keeps its persistent bitmaps (a qcow2 image, a sidecar file next to a raw one).

    The registry calls it; it never calls back. Errors are :class:`BitmapError` with the message the
    user should see. ``check_new`` does no I/O (it runs inside a transaction's prepare step, which
    must not yield to the event loop); the others are coroutines that keep every blocking system call
    off the event loop.
    """

    def check_new(self, name: str, granularity: int) -> None:
        """Raise if a new persistent bitmap ``name`` of ``granularity`` cannot be stored here."""

    async def load(self) -> None:
        """Create the node's stored bitmaps in its registry (persistent; inconsistent if they were not
        stored cleanly; read-only on a read-only node). Called once, before any other method."""

    async def remove(self, name: str) -> None:
        """Forget the stored bitmap ``name`` (block-dirty-bitmap-remove of a persistent bitmap)."""

    async def save(self, in_use: bool) -> None:
        """Store the node's persistent bitmaps now; ``in_use``: the node stays open (a crash from now
        on must make them load as inconsistent)."""


#: Store factories by driver name: given a node of that driver, its store, or None when this node
#: cannot store bitmaps (a raw node not over a file...).
_STORES: dict[str, Callable[[BitmapOwner], BitmapStore | None]] = {}


def register_bitmap_store(driver_name: str, factory: Callable[[BitmapOwner], BitmapStore | None]) -> None:
    """Let nodes of ``driver_name`` store persistent bitmaps through ``factory(node)``; ``node`` is the
    :class:`~cowbackup.block.node.BlockNode` whose ``driver_name`` it is."""
    _STORES[driver_name] = factory


class NodeBitmaps:
    """The dirty bitmaps of one node, newest first (QEMU's ``bs->dirty_bitmaps``).

    Owned by the node (``node.dirty_bitmaps``); touched only from the event loop.
    """

    def __init__(self, node: BitmapOwner) -> None:
        self.node = node
        self._list: list[NodeDirtyBitmap] = []
        #: The enabled bitmaps, newest first: what :meth:`mark` marks.  A plain list, kept up to date
        #: by every change of the list or of a bitmap's ``disabled``, so that the request path asks
        #: "is anything to mark?" with one attribute test (its write path runs for every request).
        self.marking: list[NodeDirtyBitmap] = []
        #: True once the node's stored bitmaps were loaded (or there was nothing to load): from then on
        #: the store may be written.
        self.store_opened = False
        #: Serializes the store's coroutines (load, save, remove, close), so that each stores the state
        #: of its turn and an older state never lands after a newer one.
        self._store_lock = asyncio.Lock()

    def __iter__(self) -> Iterator[NodeDirtyBitmap]:
        return iter(list(self._list))

    def __len__(self) -> int:
        return len(self._list)

    def refresh_marking(self) -> None:
        """Rebuild :attr:`marking` (a bitmap was added, released, enabled or disabled)."""
        self.marking = [bm for bm in self._list if not bm.disabled]

    def find(self, name: str) -> NodeDirtyBitmap | None:
        """The bitmap called ``name`` (anonymous bitmaps are never found)."""
        for bm in self._list:
            if bm.name == name:
                return bm
        return None

    def store(self) -> BitmapStore | None:
        """The node's persistent bitmap store, or None if it cannot store bitmaps."""
        factory = _STORES.get(self.node.driver_name)
        return factory(self.node) if factory is not None else None

    async def load(self) -> None:
        """Load the node's stored bitmaps, once (QEMU loads them when the image opens).

        From then on :meth:`close` stores them. Raises BitmapError if the store is unreadable.
        """
        if self.store_opened:
            return
        self.store_opened = True
        store = self.store()
        if store is not None:
            async with self._store_lock:
                await store.load()

    async def save(self) -> None:
        """Store the persistent bitmaps now, marked in use (after add or remove of one).

        Raises BitmapError if they cannot be stored.
        """
        store = self.store()
        if store is not None:
            async with self._store_lock:
                await store.save(in_use=True)
            self.store_opened = True

    async def remove_stored(self, name: str) -> None:
        """Remove the bitmap ``name`` from the node's store now (it stays in memory until the caller
        releases it). Raises BitmapError if the store cannot be changed."""
        store = self.store()
        if store is not None:
            async with self._store_lock:
                await store.remove(name)

    async def close(self) -> None:
        """Store the persistent bitmaps as closed cleanly: the node is closing and nothing writes to
        it any more (its requests have drained).

        Errors are logged, not raised: the node goes away either way, and its store then still says
        "in use", so the bitmaps come back inconsistent instead of wrong.
        """
        if not self.store_opened or self.node.read_only:
            return
        store = self.store()
        if store is None:
            return
        # Requests still in flight mark the bitmaps when they complete: store after them.
        await self.node.drain()
        try:
            async with self._store_lock:
                await store.save(in_use=False)
        except BitmapError as err:
            log.error("could not store the persistent bitmaps of '%s': %s", self.node.node_name, err)

    def can_store_new(self, name: str, granularity: int) -> None:
        """Raise BitmapError (QEMU's message) unless a new persistent bitmap can be stored here."""
        store = self.store()
        if store is None:
            node = self.node.node_name
            raise BitmapError(f"Can't store persistent bitmaps to {node}: Operation not supported")
        store.check_new(name, granularity)

    def create(self, name: str | None, granularity: int) -> NodeDirtyBitmap:
        """A new, enabled, clean bitmap the size of the node, listed first (QEMU's
        bdrv_create_dirty_bitmap). ``name`` None makes an anonymous bitmap.

        Raises BitmapError if the name is taken or longer than :data:`MAX_NAME_SIZE` bytes; ValueError
        if ``granularity`` is not a power of two (callers check that with QEMU's message first).
        """
        if name is not None:
            if self.find(name) is not None:
                raise BitmapError(f"Bitmap already exists: {name}")
            if len(name.encode()) > MAX_NAME_SIZE:
                raise BitmapError(f"Bitmap name too long: {name}")
        bm = NodeDirtyBitmap(self, name, self.node.size, granularity)
        self._list.insert(0, bm)
        self.refresh_marking()
        return bm

    def create_internal(self, bits: DirtyBitmap) -> NodeDirtyBitmap:
        """An anonymous, disabled bitmap over ``bits``, listed first: one the copy engine or the
        copy-before-write filter works with, shown as QEMU shows its own (their ``count`` moves as the
        job goes).  Nobody else can name it; release it with :meth:`release`."""
        bm = self.create(None, bits.granularity)
        bm.bits = bits
        bm.disabled = True
        return bm

    def release(self, bm: NodeDirtyBitmap) -> None:
        """Drop ``bm`` (QEMU's bdrv_release_dirty_bitmap). A frozen bitmap is never released alone."""
        if bm.successor is not None:
            raise AssertionError(f"releasing frozen bitmap {bm!r}")
        self._list.remove(bm)
        bm.attached = False
        self.refresh_marking()

    def mark(self, offset: int, length: int) -> None:
        """A write, write-zeroes or discard of [offset, offset + length) completed: every enabled bitmap
        records it (QEMU's bdrv_set_dirty). The range is clipped to the bitmaps' size."""
        if length <= 0:
            return
        for bm in self.marking:
            end = min(offset + length, bm.size)
            if offset < end:
                bm.bits.set(offset, end - offset)

    def info(self) -> list[dict[str, object]]:
        """The node's ``dirty-bitmaps`` list for query-named-block-nodes."""
        return [bm.info() for bm in self._list]


async def load_persistent_bitmaps(node: BitmapOwner) -> None:
    """Load ``node``'s stored bitmaps into its registry (once per node; see :meth:`NodeBitmaps.load`)."""
    await node.dirty_bitmaps.load()


def lookup_bitmap(graph: NodeLookup, node_name: str, name: str) -> NodeDirtyBitmap:
    """The bitmap ``name`` of node ``node_name`` (QEMU's block_dirty_bitmap_lookup and its messages)."""
    node = graph.find(node_name)
    if node is None:
        raise BitmapError(f"Node '{node_name}' not found")
    bm = node.dirty_bitmaps.find(name)
    if bm is None:
        raise BitmapError(f"Dirty bitmap '{name}' not found")
    return bm
