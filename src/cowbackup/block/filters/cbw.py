"""The copy-before-write filter (QEMU's ``copy-before-write`` driver).

Inserted above the backup source, it sees every write, write-zeroes and discard before the source does.
For each, it widens the range to whole backup clusters and asks the copy engine to save every cluster in
it that is not yet copied; only then does the request go on to the source::

    guest write [o, o+n) ──> cbw: copy(align_down(o, C) .. align_up(o+n, C)) ──> source.write(o, n)
                                     │  waits for copies of those clusters already in flight
                                     └─ reads old data from the source, writes it to the target

Errors while saving follow ``on-cbw-error``:

* ``break-guest-write`` (default): the guest request fails with the copy's error and never reaches the
  source, so the snapshot stays intact;
* ``break-snapshot``: the first error is remembered in ``snapshot_error``, the owner (the backup job) is
  told, the request and all later ones pass through without copying: the snapshot is lost, the guest is not.

``cbw-timeout`` (seconds, 0 = none) bounds how long a guest request waits for its copy; on timeout the
request fails with ETIMEDOUT (or breaks the snapshot), while the copy itself runs on in the background.
Reads and flushes pass through untouched.

**The snapshot API** (what a ``snapshot-access`` node above the filter reads through, QEMU's
``bdrv_co_preadv_snapshot`` & co.).  Three bitmaps and one list, at the copy cluster size, describe the
point-in-time view::

    bcs.bitmap   still to copy (the copy engine's)
    access       may be read through the snapshot: the copy bitmap as it was when the filter was opened,
                 minus what the reader discarded; reads elsewhere fail with EACCES
    done         a guest request's copy-before-write finished here: the old data is in the target
    frozen       snapshot reads in flight that read the *source*; guest requests wait for them

    snapshot read of [o, o+n):   outside access or snapshot broken   -> EACCES
                                 done                                -> read the target
                                 not done                            -> freeze the range, read the source
    guest write of [o, o+n):     copy-before-write the clusters -> mark them done
                                 -> wait for frozen reads overlapping them -> write the source

A read that finds a range not done may read the source because no guest request has passed the filter
there yet, and none can before the read ends: it would have to mark the range done first, and then it
waits for the frozen read.  A read that finds it done reads the target, which has held the old data since
the copy finished (a copy still in flight does not count as done).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
from collections.abc import Callable
from dataclasses import dataclass, field

from cowbackup.block.align import align_down, align_up
from cowbackup.block.bitmap import DirtyBitmap
from cowbackup.block.copy import BlockCopyState, CopyCall, CopyError, cluster_size_for
from cowbackup.block.dirty_bitmaps import BitmapCheck, NodeDirtyBitmap, lookup_bitmap
from cowbackup.block.drivers import open_child
from cowbackup.block.errors import BlockError, RequestError
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import NO_FLAGS, BlockNode, Buffer, Extent, FilterNode, RequestFlags
from cowbackup.block.options import Options

log = logging.getLogger(__name__)

ON_CBW_ERROR = ("break-guest-write", "break-snapshot")
#: Guest-triggered copies run with many workers and no chunk limit (QEMU's BLOCK_COPY_MAX_WORKERS).
CBW_WORKERS = 64

#: Stands for the copy bitmap and ``done`` in the pass cache's stamps before the copy state is attached.
_NO_BITS = DirtyBitmap(0, 1)


@dataclass(eq=False)
class _FrozenRead:
    """A snapshot read of ``[start, end)`` served from the source; guest requests there wait for ``done``."""

    start: int
    end: int
    done: asyncio.Event = field(default_factory=asyncio.Event)


class CopyBeforeWriteNode(FilterNode):
    """A filter whose writes first save old data through a :class:`BlockCopyState`.

    ``bcs`` is set once the target is attached (:func:`cbw_append`, or opening with ``blockdev-add``).
    ``_background`` holds copies whose guest request timed out; they are awaited by :meth:`quiesce`.
    """

    driver_name = "copy-before-write"
    # Discards always go on to the source, whatever the filter's ``discard`` option: unlike QEMU's, our
    # filter is inserted under the source's other parents (see open_node), and a guest's discard that
    # went straight to the source there must not be dropped by the filter here.
    discard_option_applies = False

    def __init__(
        self, node_name: str, *, on_cbw_error: str = "break-guest-write", cbw_timeout: int = 0
    ) -> None:
        super().__init__(node_name)
        if on_cbw_error not in ON_CBW_ERROR:
            raise BlockError(f"Parameter 'on-cbw-error' does not accept value '{on_cbw_error}'")
        self.on_cbw_error = on_cbw_error
        self.cbw_timeout = cbw_timeout
        self._bcs: BlockCopyState | None = None
        self.snapshot_error: OSError | None = None
        #: Called once with the error when ``break-snapshot`` gives up the snapshot.
        self.on_snapshot_error: Callable[[OSError], None] = lambda err: None
        #: False once the owner is done with the snapshot: requests then pass straight through.
        self.active = True
        self._background: set[asyncio.Future[None]] = set()
        #: Write-type requests that took the fast path (:meth:`_passes`): no copy, no wait.
        self.passed = 0
        # The pass cache (see :meth:`write`): one byte per cluster, 1 where :meth:`_passes` found that a
        # write needs nothing from the filter; valid while the copy bitmap has not been dirtied and
        # ``done`` not cleaned since (their change stamps, remembered in _pass_dirtied/_pass_cleaned).
        # Made anew with the copy state (:meth:`_reset_pass_cache`).  A byte, not a bit: indexing is
        # all the test costs.  An anonymous mapping, not a bytearray: only the pages of clusters written
        # take memory (one page covers 256 MiB of disk at 64 KiB clusters), whatever the disk's size.
        self._pass_shift = 63
        self._pass_bits = mmap.mmap(-1, 1)
        self._copy_bits = self._done_bits = _NO_BITS
        self._pass_dirtied = self._pass_cleaned = 0
        # The snapshot API's state (see the module docstring); set up by :meth:`init_snapshot`, touched
        # only from the event loop.
        self.access: DirtyBitmap | None = None
        self.done: DirtyBitmap | None = None
        self._frozen: list[_FrozenRead] = []
        # The copy engine's bitmaps as QEMU lists them (query-named-block-nodes): the copy bitmap on
        # the source, and on this filter what was readable at the start and what has been done.
        self._shown: list[NodeDirtyBitmap] = []

    def describe(self) -> dict[str, object]:
        return {"file": self.child.node_name}

    @property
    def bcs(self) -> BlockCopyState | None:
        """The copy state (None until the target is attached)."""
        return self._bcs

    @bcs.setter
    def bcs(self, bcs: BlockCopyState | None) -> None:
        self._bcs = bcs
        self._reset_pass_cache()

    # ------------------------------------------------------------------ interception

    async def _save_old_data(self, offset: int, length: int, flags: RequestFlags) -> None:
        bcs = self._bcs
        if bcs is None or not self.active or self.snapshot_error is not None or length == 0:
            return
        if flags and flags & RequestFlags.WRITE_UNCHANGED:  # IntFlag's & is slow; test the int first
            return
        cluster = bcs.cluster_size
        start = offset - offset % cluster
        end = offset + length
        end -= end % -cluster  # rounded up to a cluster
        if end > bcs.size:
            end = bcs.size
        if not bcs.settled(start, end):
            call = CopyCall(start, end - start, max_workers=CBW_WORKERS, ignore_ratelimit=True)
            try:
                if self.cbw_timeout:
                    await self._copy_with_timeout(bcs, call)
                else:
                    await bcs.copy(call)
            except (CopyError, RequestError) as err:
                self._copy_failed(err)  # raises unless on-cbw-error=break-snapshot
                await self._wait_frozen(start, end)
                return
        if self.done is not None:
            self.done.set(start, end - start)
            if self._frozen:
                await self._wait_frozen(start, end)

    async def _copy_with_timeout(self, bcs: BlockCopyState, call: CopyCall) -> None:
        copy = asyncio.ensure_future(bcs.copy(call))
        self._background.add(copy)
        copy.add_done_callback(self._background_done)
        try:
            await asyncio.wait_for(asyncio.shield(copy), self.cbw_timeout)
        except TimeoutError:
            raise RequestError(errno.ETIMEDOUT, "copy-before-write timed out") from None

    async def _wait_frozen(self, start: int, end: int) -> None:
        """Wait until no snapshot read of the source overlaps ``[start, end)``.

        New ones cannot start there once the range is done (they read the target), so this ends.
        """
        while True:
            blocker = next((r for r in self._frozen if r.start < end and start < r.end), None)
            if blocker is None:
                return
            await blocker.done.wait()

    def _background_done(self, fut: asyncio.Future[None]) -> None:
        self._background.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.debug("background copy-before-write failed: %s", fut.exception())

    def _copy_failed(self, err: OSError) -> None:
        if self.on_cbw_error == "break-guest-write":
            raise RequestError(err.errno or errno.EIO, err.strerror or str(err)) from err
        if self.snapshot_error is None:
            log.warning("copy-before-write failed, snapshot broken: %s", err)
            self.snapshot_error = err
            self.on_snapshot_error(err)

    def _passes(self, op: str, offset: int, length: int, flags: RequestFlags) -> bool:
        """The fast path: True when the request needs nothing from the filter.

        Reads always pass.  A write-type request passes when every cluster it touches is copied, none is
        being copied, a guest request has marked each one done already (so ``done`` would not change)
        and no snapshot read of the source is in flight -- or when there is no snapshot to keep.  Copies
        in flight elsewhere on the disk do not matter, and the test costs a few mask operations.
        """
        if op == "read":
            return True
        bcs = self._bcs
        if bcs is None or not self.active or self.snapshot_error is not None or not length:
            self.passed += 1
            return True
        if flags and flags & RequestFlags.WRITE_UNCHANGED:  # IntFlag's & is slow; test the int first
            self.passed += 1
            return True
        cluster = bcs.cluster_size
        start = offset - offset % cluster
        end = offset + length
        end -= end % -cluster  # rounded up to a cluster (the bitmaps clip it to the disk)
        done = self.done
        if (
            self._frozen
            or not bcs.settled(start, end)
            or (done is not None and not done.all_dirty(start, end))
        ):
            return False
        self.passed += 1
        if done is not None:
            self._remember_pass(start, min(end, bcs.size))
        return True

    def _reset_pass_cache(self) -> None:
        """An empty pass cache for the current copy state and ``done``."""
        bcs, done = self._bcs, self.done
        if bcs is None or done is None:
            self._pass_shift, self._pass_bits = 63, mmap.mmap(-1, 1)
            self._copy_bits = self._done_bits = _NO_BITS
        else:
            clusters = -(-bcs.size // bcs.cluster_size)
            self._pass_shift = bcs.cluster_size.bit_length() - 1
            self._pass_bits = mmap.mmap(-1, clusters or 1)
            self._copy_bits, self._done_bits = bcs.bitmap, done
        self._pass_dirtied, self._pass_cleaned = self._copy_bits.dirtied, self._done_bits.cleaned

    def _remember_pass(self, start: int, end: int) -> None:
        """Add the clusters of ``[start, end)``, just found to pass, to the pass cache.

        Whatever could make a cached cluster need the filter again changes a stamp: the copy bitmap
        dirtied there (a task claims only dirty clusters, so "being copied" comes after it) or ``done``
        cleaned there.  A snapshot read of the source is the one other reason, and the cache is never
        used while one is in flight.  So the cache is emptied when a stamp moved, and otherwise grows.
        """
        copy_bits, done = self._copy_bits, self._done_bits
        if self._pass_dirtied != copy_bits.dirtied or self._pass_cleaned != done.cleaned:
            self._pass_bits = mmap.mmap(-1, len(self._pass_bits))
            self._pass_dirtied, self._pass_cleaned = copy_bits.dirtied, done.cleaned
        bits = self._pass_bits
        for c in range(start >> self._pass_shift, ((end - 1) >> self._pass_shift) + 1):
            bits[c] = 1

    async def write(self, offset: int, data: Buffer, flags: RequestFlags = NO_FLAGS) -> None:
        """FilterNode's write, with the pass cache tried before :meth:`_passes`.

        Most writes during a long backup land in one cluster that an earlier write already copied: a
        bit test and two stamp comparisons find that the write needs nothing from the filter, where
        :meth:`_passes` asks three bitmaps.  The cache only ever answers "passes" where ``_passes`` did
        and nothing has changed since (:meth:`_remember_pass`); any other write asks ``_passes``.
        """
        length = data.nbytes if type(data) is memoryview else memoryview(data).nbytes
        if self.closed or self.read_only:
            self._check_open()
            self._check_writable("write")
        self._in_flight += 1
        try:
            shift = self._pass_shift
            c = offset >> shift
            try:
                cached = (
                    not self._frozen
                    and (offset + length - 1) >> shift == c
                    and self._pass_bits[c]
                    and self._pass_dirtied == self._copy_bits.dirtied
                    and self._pass_cleaned == self._done_bits.cleaned
                )
            except IndexError:  # past the end (the child refuses it; a negative offset too)
                cached = False
            if not cached:
                if not self._passes("write", offset, length, flags):
                    await self._save_old_data(offset, length, flags)
            else:
                self.passed += 1
            await self.children["file"].node.write(offset, data, flags)
        finally:
            # FilterNode.write's ending, inline as on every data path (a call per layer per request
            # costs more than these lines).
            self._in_flight -= 1
            if self._quiescent is not None and not self._in_flight:
                self._wake_drainers()
            # A filter's own bitmaps see what passed through it, as on any node.
            if self.dirty_bitmaps.marking or self.write_observers:
                self._notify_write(offset, length)

    async def _intercept(self, op: str, offset: int | None, length: int, flags: RequestFlags) -> None:
        if op in ("write", "write_zeroes", "discard") and offset is not None:
            await self._save_old_data(offset, length, flags)

    # ------------------------------------------------------------------ the snapshot API

    def attach_copy_state(self, bcs: BlockCopyState) -> None:
        """Take ``bcs`` (its source edge is this filter's ``file``): ``done`` starts empty.

        Its copy bitmap is listed on the source, and ``done`` on this filter, as anonymous bitmaps,
        as QEMU lists them (they go with :meth:`release_copy_bitmaps`).
        """
        self.done = DirtyBitmap(bcs.size, bcs.cluster_size)
        self.bcs = bcs
        self._shown = [
            bcs.source.node.dirty_bitmaps.create_internal(bcs.bitmap),
            self.dirty_bitmaps.create_internal(self.done),
        ]

    def show_access(self, bits: DirtyBitmap) -> None:
        """List ``bits`` on this filter as QEMU lists its access bitmap: what the copy bitmap was when
        the filter opened (all of the disk for a backup job's filter)."""
        self._shown.append(self.dirty_bitmaps.create_internal(bits))

    def release_copy_bitmaps(self) -> None:
        """Stop listing the copy engine's bitmaps (the filter leaves the graph)."""
        for bm in self._shown:
            if bm.attached:
                bm.owner.release(bm)
        self._shown = []

    def init_snapshot(self) -> None:
        """Make the filter readable as a snapshot: what is to copy now is what a reader may read.

        Called once the copy bitmap holds the snapshot's clusters, before any request passes.
        """
        assert self.bcs is not None
        self.access = self.bcs.bitmap.copy()
        self.show_access(self.access)

    def _snapshot_lock(self, offset: int, length: int) -> tuple[BlockNode, int, _FrozenRead | None]:
        """Where to read the snapshot's ``[offset, offset+n)`` from, ``n`` (1..length), and the frozen
        read to release with :meth:`_snapshot_unlock` (None when it comes from the target).

        Raises EACCES if any of the range may not be read, or the snapshot is broken; ENOTSUP if this
        filter was not opened as a snapshot.
        """
        access, done, bcs = self.access, self.done, self.bcs
        if access is None or done is None or bcs is None:
            raise RequestError(errno.ENOTSUP, f"node '{self.node_name}' has no snapshot to access")
        end = offset + length
        if self.snapshot_error is not None or access.next_clean(offset, end) is not None:
            raise RequestError(errno.EACCES, "Permission denied")
        if done.get(offset):
            stop = done.next_clean(offset, end)
            return bcs.target.node, (end if stop is None else stop) - offset, None
        stop = done.next_dirty(offset, end)
        n = (end if stop is None else stop) - offset
        frozen = _FrozenRead(offset, offset + n)
        self._frozen.append(frozen)
        return self.child, n, frozen

    def _snapshot_unlock(self, frozen: _FrozenRead | None) -> None:
        if frozen is not None:
            self._frozen.remove(frozen)
            frozen.done.set()

    def _check_snapshot(self) -> None:
        # A read that was in flight when on-cbw-error=break-snapshot gave the snapshot up may have seen
        # new data: it fails too, as every later one.
        if self.snapshot_error is not None:
            raise RequestError(errno.EACCES, "Permission denied")

    async def snapshot_read(self, offset: int, buf: Buffer) -> None:
        """Fill ``buf`` with the point-in-time view at ``offset`` (the caller checked the range).

        EACCES outside the readable area or once the snapshot is broken; I/O errors of either child.
        """
        view = memoryview(buf).cast("B")
        pos = 0
        while pos < len(view):
            node, n, frozen = self._snapshot_lock(offset + pos, len(view) - pos)
            try:
                await node.read(offset + pos, view[pos : pos + n])
            finally:
                self._snapshot_unlock(frozen)
            pos += n
        self._check_snapshot()

    async def snapshot_block_status(self, offset: int, length: int) -> Extent:
        """Block status of the point-in-time view: the target's where the old data was saved, the
        source's elsewhere (frozen while asked).  EACCES as :meth:`snapshot_read`."""
        node, n, frozen = self._snapshot_lock(offset, length)
        try:
            ext = await node.block_status(offset, n)
        finally:
            self._snapshot_unlock(frozen)
        self._check_snapshot()
        return ext

    async def snapshot_discard(self, offset: int, length: int) -> None:
        """The reader is done with the whole clusters inside ``[offset, offset+length)``.

        They stop being readable (EACCES from now on) and stop being copied (later guest writes there
        cost nothing), and the target's copy of them, if any, is discarded to free the scratch space.
        A partial cluster at either end is left alone, as QEMU does.
        """
        access, bcs = self.access, self.bcs
        if access is None or bcs is None:
            raise RequestError(errno.ENOTSUP, f"node '{self.node_name}' has no snapshot to access")
        cluster = bcs.cluster_size
        start = align_up(offset, cluster)
        end = offset + length if offset + length == bcs.size else align_down(offset + length, cluster)
        if start >= end:
            return
        access.reset_inward(start, end - start)
        bcs.bitmap.reset_inward(start, end - start)
        bcs.on_remaining(bcs.remaining())
        await bcs.target.node.discard(start, end - start)

    # ------------------------------------------------------------------ lifecycle

    async def quiesce(self) -> None:
        """Stop copying for new requests and wait for every request and copy in flight.

        After this, no copy touches the target any more, so its owner may close it.
        """
        self.active = False
        await self.drain()
        while self._background:
            await asyncio.wait(list(self._background))

    async def _do_close(self) -> None:
        await self.quiesce()
        self.release_copy_bitmaps()


def cbw_append(
    graph: BlockGraph,
    source_name: str,
    target_name: str,
    *,
    filter_node_name: str | None = None,
    cluster_size: int | None = None,
    on_cbw_error: str = "break-guest-write",
    cbw_timeout: int = 0,
    use_copy_range: bool = False,
) -> tuple[CopyBeforeWriteNode, BlockCopyState]:
    """Insert a copy-before-write filter above ``source_name`` that copies to ``target_name``.

    All parents of the source are re-pointed to the filter.  The copy bitmap starts empty: the caller
    marks what belongs to the snapshot before any write may happen (in the same loop step).
    """
    source = graph.get(source_name)
    target = graph.get(target_name)
    name = filter_node_name or graph.auto_name()
    if filter_node_name is not None:
        graph.check_node_name(name)
    filt = CopyBeforeWriteNode(name, on_cbw_error=on_cbw_error, cbw_timeout=cbw_timeout)
    graph.add(filt)
    target_edge = graph.attach(filt, "target", target)
    try:
        graph.insert_filter(filt, source)
    except BlockError:
        graph.detach(target_edge)
        graph.drop_filter(filt)
        raise
    bcs = BlockCopyState(
        filt.children["file"],
        target_edge,
        cluster_size or cluster_size_for(target),
        use_copy_range=use_copy_range,
    )
    filt.attach_copy_state(bcs)
    # QEMU's filter opens with everything to copy, and its access bitmap keeps that; the job then sets
    # the copy bitmap to what its sync mode copies.
    everything = DirtyBitmap(bcs.size, bcs.cluster_size)
    everything.set_all()
    filt.show_access(everything)
    return filt, bcs


async def cbw_drop(graph: BlockGraph, filt: CopyBeforeWriteNode) -> None:
    """Wait for the filter's requests and copies, then remove it and re-point its parents to the source."""
    await filt.quiesce()
    cbw_detach(graph, filt)


def cbw_detach(graph: BlockGraph, filt: CopyBeforeWriteNode) -> None:
    """Remove the filter from the graph at once (nothing may be in flight through it)."""
    filt.active = False
    filt.release_copy_bitmaps()
    target = filt.children.get("target")
    if target is not None:
        graph.detach(target)
    graph.drop_filter(filt)
    filt.closed = True


def _lookup_bitmap(graph: BlockGraph, ref: Options) -> NodeDirtyBitmap:
    """The ``bitmap`` option's {node, name}, with QEMU's block_dirty_bitmap_lookup messages."""
    node_name = ref.get_str("node")
    name = ref.get_str("name")
    ref.finish()
    return lookup_bitmap(graph, node_name, name)


def _seed_copy_bitmap(bcs: BlockCopyState, bitmap: NodeDirtyBitmap | None) -> None:
    """Mark what the snapshot holds: everything, or the clusters dirty in ``bitmap`` (merged outward to
    the copy cluster size).  Errors as QEMU's block_copy_state_new words them."""
    if bitmap is None:
        bcs.bitmap.set_all()
        return
    prefix = (
        f"Cannot create block-copy-state: Failed to merge bitmap '{bitmap.name}' to internal copy-bitmap: "
    )
    try:
        bitmap.check(BitmapCheck.INCONSISTENT)
    except BlockError as err:
        raise BlockError(prefix + str(err)) from None
    if bitmap.size != bcs.size:
        raise BlockError(prefix + "Bitmaps are incompatible and can't be merged")
    bcs.bitmap.merge(bitmap.bits)


async def open_node(graph: BlockGraph, node_name: str, opts: Options) -> CopyBeforeWriteNode:
    """``blockdev-add driver=copy-before-write file=SRC target=TGT [bitmap={node,name}] [on-cbw-error]
    [cbw-timeout] [min-cluster-size] [x-view-bitmap=NAME]`` (fleecing).

    The snapshot is taken here: every cluster (or, with ``bitmap``, each cluster dirty in that bitmap
    now; later changes to the bitmap do not matter) is "to copy" and readable through a
    ``snapshot-access`` node.  Unlike QEMU, which leaves the source's other parents writing past the
    filter (its permission system then refuses the combination), the filter is *inserted* above the
    source: an export or a format node over the source writes through it from now on, and deleting the
    filter (``blockdev-del``) hands them back to the source.
    """
    on_cbw_error = opts.get_enum("on-cbw-error", ON_CBW_ERROR, "break-guest-write")
    cbw_timeout = opts.get_int("cbw-timeout", 0, minimum=0)
    if cbw_timeout >= 1 << 32:
        raise BlockError("Parameter 'cbw-timeout' expects uint32_t")
    min_cluster = opts.get_int("min-cluster-size", 0, minimum=0)
    if min_cluster & (min_cluster - 1):
        raise BlockError("min-cluster-size needs to be a power of 2")
    bitmap_ref = opts.get_dict("bitmap") if opts.has("bitmap") else None
    view_map = opts.get_str("x-view-bitmap", None)
    # Refuse unknown options now, before the graph changes (the registry's own check comes after).
    source = await open_child(graph, opts, "file")
    target = await open_child(graph, opts, "target")
    assert source is not None and target is not None
    opts.finish()
    bitmap = _lookup_bitmap(graph, bitmap_ref) if bitmap_ref is not None else None
    if source.size != target.size:
        raise BlockError("Source and target image have different sizes")
    filt = CopyBeforeWriteNode(node_name, on_cbw_error=on_cbw_error, cbw_timeout=cbw_timeout)
    target_edge = graph.attach(filt, "target", target)
    cluster = cluster_size_for(target, max(min_cluster, 64 * 1024))
    # The copy state is built on the edge the filter is about to own; the edge is created by
    # insert_filter, so build it right after, before any await (no request can pass in between).
    graph.insert_filter(filt, source, adopt=True)
    bcs = BlockCopyState(filt.children["file"], target_edge, cluster)
    filt.attach_copy_state(bcs)
    try:
        _seed_copy_bitmap(bcs, bitmap)
        if view_map is not None:
            _add_view_bitmap(filt, view_map, bitmap)
    except BlockError:
        filt.release_copy_bitmaps()
        graph.detach(target_edge)
        graph.drop_filter(filt)
        raise
    filt.init_snapshot()
    return filt


def _add_view_bitmap(filt: CopyBeforeWriteNode, name: str, bitmap: NodeDirtyBitmap | None) -> None:
    """``x-view-bitmap`` (ours, not QEMU's): keep what the snapshot holds as a disabled bitmap ``name``
    on the filter, taken in the same instant as the snapshot.

    A pull-mode reader of an incremental view needs the view's dirty map; exporting it with the view
    (``block-export-add bitmaps=[{node: FILTER, name}]``) gives ``qemu:dirty-bitmap:NAME`` next to the
    data.  Made from the source bitmap in a separate command, it would race with guest writes that land
    between that command and the filter's insertion.
    """
    assert filt.bcs is not None
    if not name:
        raise BlockError("Bitmap name cannot be empty")
    granularity = bitmap.granularity if bitmap is not None else filt.bcs.cluster_size
    view = filt.dirty_bitmaps.create(name, granularity)
    if bitmap is not None:
        view.bits = bitmap.bits.copy()
    else:
        view.bits.set_all()
    view.disable()
