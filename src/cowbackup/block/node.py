"""The block-node interface and the generic request path.

Every disk, format, filter and test device is a :class:`BlockNode`.  Users call the public coroutines
(``read``, ``write``, ``write_zeroes``, ``discard``, ``flush``, ``block_status``); those run the generic
request path, which guarantees drivers a narrow, simple contract:

* **validated** -- negative offsets/lengths, requests past the end of the node and writes to a read-only
  node fail with a clear :class:`RequestError` before a driver sees them.  Nothing is ever silently
  shortened.
* **aligned** -- drivers receive only requests aligned to ``limits.request_alignment``.  Unaligned reads
  are padded through a bounce buffer; unaligned writes become read-modify-write cycles that are
  *serialising*: they wait for every overlapping write in flight, and later overlapping writes wait for
  them, so two writers can never lose each other's bytes inside one aligned block::

        request       |----xxxxxxxxxxxxxxxxxxx-----|
        aligned   |--------|--------|--------|--------|
        padded    |<-head->|xxxxxxxxxxxxxxxxx|<-tail->|    head/tail read first, then one aligned write

* **split** -- no driver request is longer than ``limits.max_transfer`` (or ``max_zeroes`` /
  ``max_discard`` for those operations).
* **tracked** -- every request in flight is counted, so :meth:`BlockNode.drain` can wait for quiescence.
* **observed** -- after each write, write-zeroes or discard completes (successfully or not, as QEMU marks
  dirty bitmaps), the node's enabled dirty bitmaps (:mod:`cowbackup.block.dirty_bitmaps`) record the byte
  range and every registered write observer is told it.  Filters do the same for what passes through.

Block status is clamped: it returns one extent that starts at the asked offset and is at most as long
as asked and never reaches past the end of the node.

The value types of the interface (request flags, block status, extents, limits) live in
:mod:`cowbackup.block.request_types`; they are exported from here too, the module most callers import.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

from cowbackup.block.align import align_down, align_up
from cowbackup.block.dirty_bitmaps import NodeBitmaps
from cowbackup.block.errors import BlockError, RequestError, invalid
from cowbackup.block.request_types import (
    DEFAULT_MAX_TRANSFER,
    DEFAULT_MAX_ZEROES,
    NO_FLAGS,
    Buffer,
    Extent,
    Limits,
    RequestFlags,
    Status,
    WriteObserver,
)
from cowbackup.block.tracked_write import TrackedWrite
from cowbackup.block.zero import is_zero

#: Status -> Status of a node without a backing file: data or zeros there are its own (allocated).  A
#: table, because IntFlag arithmetic builds a new member per operation, on a path taken per request.
_OWNED = {
    Status(v): Status(v) | Status.ALLOCATED for v in range(8) if Status(v) & (Status.DATA | Status.ZERO)
}

__all__ = [
    "DEFAULT_MAX_TRANSFER",
    "DEFAULT_MAX_ZEROES",
    "NO_FLAGS",
    "BlockNode",
    "Buffer",
    "Child",
    "Extent",
    "FilterNode",
    "Limits",
    "RequestFlags",
    "Root",
    "Status",
    "WriteObserver",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Filter operations that change data (refused on a read-only filter).
_WRITE_OPS = frozenset({"write", "write_zeroes", "discard"})


class BlockNode:
    """A node of the block graph.  Subclass it and implement the ``_do_*`` hooks.

    The generic layer guarantees every hook call to be in range, aligned to
    ``limits.request_alignment`` and no longer than the matching limit; hooks must do the whole request
    or raise ``OSError`` -- never return a short result.

    Graph fields (``children``, ``parents``) are owned by :class:`cowbackup.block.graph.BlockGraph`; the
    in-flight bookkeeping by the request path below.  All of it is touched only from the event loop.
    """

    #: The QEMU driver name (``file``, ``raw``, ``null-co``, ...).
    driver_name: ClassVar[str] = ""
    #: Whether the ``discard`` option decides what the node does with discards (every driver, as in
    #: QEMU; ``copy-before-write`` opts out, see there).
    discard_option_applies: ClassVar[bool] = True
    #: A format that can have a backing file (qcow2).  Its unallocated ranges stay unallocated even
    #: without one, as in QEMU: they read as zeros but belong to no layer (qemu:allocation-depth 0).
    supports_backing: ClassVar[bool] = False

    def __init__(self, node_name: str, *, read_only: bool = False) -> None:
        self.node_name = node_name
        self.read_only = read_only
        self.limits = Limits()
        self.children: dict[str, Child] = {}
        self.parents: list[Child] = []
        self.write_observers: list[WriteObserver] = []
        #: The node's dirty bitmaps; every completed write, write-zeroes and discard marks them.
        self.dirty_bitmaps = NodeBitmaps(self)
        self._size = 0
        self._in_flight = 0
        self._quiescent: asyncio.Event | None = None
        self._writes: list[TrackedWrite] = []
        self.closed = False
        #: Created inline as another node's child; removed with its parent when unused.
        self.implicit = False
        #: ``off`` | ``on`` | ``unmap``: all-zero writes become write-zeroes (QEMU's detect-zeroes).
        self.detect_zeroes = "off"
        #: Discards reach the driver (QEMU's BDRV_O_UNMAP); otherwise :meth:`discard` drops them.  The
        #: registry sets it from the ``discard`` option (default ``ignore``); a node built directly, by
        #: a test or the daemon itself, executes discards unless told otherwise.
        self.discard_unmap = True
        #: ``cache.direct`` and ``cache.no-flush`` as given (``query-named-block-nodes`` reports them).
        self.cache_direct = False
        self.cache_no_flush = False

    # ------------------------------------------------------------------ description

    @property
    def size(self) -> int:
        """Length of the node in bytes."""
        return self._size

    @property
    def is_filter(self) -> bool:
        return False

    def describe(self) -> dict[str, object]:
        """Driver-specific fields for ``query-named-block-nodes`` (``file`` name and the like)."""
        return {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node_name!r} size={self._size}>"

    def discards_change_data(self) -> bool:
        """Whether a discard sent to this node is executed, and so marks its dirty bitmaps: the node is
        open with ``discard=unmap``.  A node that ignores discards drops them before they are tracked
        (QEMU's bdrv_co_pdiscard), so it marks nothing -- whatever its children would do.  A node that
        executes them marks the range even where the driver, or a child that ignores discards, leaves
        the data as it was, as QEMU does."""
        return self.discard_unmap

    # ------------------------------------------------------------------ backup target hooks

    def backup_target_check(self, sync: str) -> None:
        """A backup job with ``sync`` is about to write this node as its target: BlockError to refuse (a
        target that cannot hold what that mode leaves unwritten).  Any mode suits most targets."""

    async def backup_target_prepare(self) -> None:
        """A backup job that wrote this node as its target succeeded (QEMU's job *prepare* phase).

        A target that makes its contents final in one step does it here -- a repository target commits
        its snapshot.  Raising fails the job, and with it every job of its transaction.
        """

    async def backup_target_abort(self) -> None:
        """The backup job writing this node failed or was cancelled: nothing may become final."""

    # ------------------------------------------------------------------ driver hooks

    async def _do_read(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""
        raise RequestError(errno.ENOTSUP, f"{self.driver_name} cannot read")

    async def _do_write(self, offset: int, data: memoryview, flags: RequestFlags) -> None:
        """Write ``data`` at ``offset``; honour ``RequestFlags.FUA``."""
        raise RequestError(errno.ENOTSUP, f"{self.driver_name} cannot write")

    async def _do_write_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        """Make ``[offset, offset+length)`` read as zeros.  The default writes a zero buffer."""
        if flags & RequestFlags.NO_FALLBACK:
            raise RequestError(errno.ENOTSUP, "fast zeroing is not supported")
        chunk = min(length, self.limits.max_transfer, 4 * 1024 * 1024)
        zeros = memoryview(bytes(chunk))
        end = offset + length
        while offset < end:
            n = min(chunk, end - offset)
            await self._do_write(offset, zeros[:n], flags & RequestFlags.FUA)
            offset += n

    async def _do_discard(self, offset: int, length: int) -> None:
        """Tell the storage the range is no longer needed.  Advisory: the default does nothing."""

    async def _do_flush(self) -> None:
        """Make completed writes durable.  The default (for volatile nodes) does nothing."""

    async def _do_block_status(self, offset: int, length: int) -> Extent:
        """Status of the extent starting at ``offset`` (length ``1..length``).  Default: all data."""
        return Extent(offset, length, Status.DATA | Status.ALLOCATED)

    async def _do_close(self) -> None:
        """Release the driver's resources."""

    # ------------------------------------------------------------------ validation

    def _check_range(self, what: str, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise invalid(
                f"{what} with negative offset {offset} or length {length} on node '{self.node_name}'"
            )
        if offset + length > self._size:
            raise invalid(
                f"{what} of {length} bytes at offset {offset} is beyond the end of node "
                f"'{self.node_name}' ({self._size} bytes)"
            )

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise RequestError(errno.EPERM, f"{what} refused: node '{self.node_name}' is read-only")

    def _check_request(self, what: str, offset: int, length: int, *, write: bool) -> None:
        """All the checks of a read or write: open, writable (``write``), in range.  The data path calls
        it only once a cheap test has found something wrong, so it raises."""
        self._check_open()
        if write:
            self._check_writable(what)
        self._check_range(what, offset, length)

    def _check_open(self) -> None:
        if self.closed:
            raise RequestError(errno.EBADF, f"node '{self.node_name}' is closed")

    # ------------------------------------------------------------------ in-flight tracking

    # A request in flight is counted with ``self._in_flight += 1`` (the data paths do it inline: a call
    # per layer per request costs more than the increment) and ended with :meth:`_end`, or its inline
    # form.  ``_quiescent`` exists only while someone drains: the request that brings the count to zero
    # wakes the drainers and drops it, so starting a request never has to touch it.

    def _begin(self) -> None:
        self._in_flight += 1

    def _end(self) -> None:
        self._in_flight -= 1
        if self._quiescent is not None and not self._in_flight:
            self._wake_drainers()

    def _wake_drainers(self) -> None:
        assert self._quiescent is not None
        self._quiescent.set()
        self._quiescent = None

    @property
    def in_flight(self) -> int:
        """Number of requests on this node that have started and not completed."""
        return self._in_flight

    async def drain(self) -> None:
        """Wait until no request is in flight on this node."""
        if self._in_flight == 0:
            return
        if self._quiescent is None:
            self._quiescent = asyncio.Event()
        await self._quiescent.wait()

    async def _track_write(self, offset: int, length: int, serialising: bool) -> TrackedWrite | None:
        """Register a write-type request; wait for the overlapping ones it must follow.

        A serialising request (read-modify-write) waits for every overlapping write already in flight; any
        write waits for overlapping serialising ones.  Requests never wait for later ones, so no cycle.
        With an alignment of 1 no request is ever serialising, so none is tracked (None): callers on the
        hot path skip the call then.  Called after :meth:`_begin`; if the wait is cancelled, the request
        is ended here.
        """
        align = self.limits.request_alignment
        if align == 1:
            return None
        req = TrackedWrite(align_down(offset, align), align_up(offset + length, align), serialising)
        try:
            while (blocker := next((w for w in self._writes if req.must_follow(w)), None)) is not None:
                await blocker.wait()
        except BaseException:
            self._end()
            raise
        self._writes.append(req)
        return req

    def _untrack_write(self, req: TrackedWrite | None) -> None:
        if req is not None:
            self._writes.remove(req)
            req.complete()

    def _notify_write(self, offset: int, length: int) -> None:
        self.dirty_bitmaps.mark(offset, length)
        for observer in self.write_observers:
            observer(offset, length)

    # ------------------------------------------------------------------ public I/O

    async def read(self, offset: int, buf: Buffer) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf`` (any writable buffer).

        Raises :class:`RequestError` (EINVAL) out of range, ``OSError`` from the driver.
        """
        view = memoryview(buf).cast("B")
        length = len(view)
        if self.closed or offset < 0 or offset + length > self._size:
            self._check_request("read", offset, length, write=False)
        if length == 0:
            return
        self._in_flight += 1
        try:
            align = self.limits.request_alignment
            if length <= self.limits.max_transfer and not (offset % align or length % align):
                await self._do_read(offset, view)
            elif offset % align or length % align:
                start = align_down(offset, align)
                end = align_up(offset + length, align)
                bounce = bytearray(end - start)
                await self._read_split(start, memoryview(bounce))
                view[:] = memoryview(bounce)[offset - start : offset - start + length]
            else:
                await self._read_split(offset, view)
        finally:
            self._in_flight -= 1
            if self._quiescent is not None and not self._in_flight:
                self._wake_drainers()

    async def _read_split(self, offset: int, view: memoryview) -> None:
        step = self.limits.max_transfer
        if len(view) <= step:
            await self._do_read(offset, view)
            return
        for pos in range(0, len(view), step):
            await self._do_read(offset + pos, view[pos : pos + step])

    async def write(self, offset: int, data: Buffer, flags: RequestFlags = NO_FLAGS) -> None:
        """Write ``data`` at ``offset``.  ``RequestFlags.FUA`` makes it durable before returning."""
        view = memoryview(data).cast("B")
        length = len(view)
        if self.closed or self.read_only or offset < 0 or offset + length > self._size:
            self._check_request("write", offset, length, write=True)
        if length == 0:
            return
        if self.detect_zeroes != "off" and is_zero(view):
            # QEMU's detect-zeroes: an all-zero write becomes write-zeroes ("unmap" may deallocate).
            zflags = flags & RequestFlags.FUA
            if self.detect_zeroes == "unmap":
                zflags |= RequestFlags.MAY_UNMAP
            await self.write_zeroes(offset, length, zflags)
            return
        align = self.limits.request_alignment
        unaligned = align > 1 and bool(offset % align or length % align)
        self._in_flight += 1
        req = None if align == 1 else await self._track_write(offset, length, unaligned)
        try:
            if length <= self.limits.max_transfer and not unaligned:
                await self._do_write(offset, view, flags)
            elif unaligned:
                start = align_down(offset, align)
                end = align_up(offset + length, align)
                bounce = bytearray(end - start)
                bview = memoryview(bounce)
                # Read only the partial head and tail blocks; the middle is overwritten anyway.
                await self._do_read(start, bview[:align])
                if end - align > start:
                    await self._do_read(end - align, bview[len(bounce) - align :])
                bview[offset - start : offset - start + length] = view
                await self._write_split(start, bview, flags)
            else:
                await self._write_split(offset, view, flags)
        finally:
            if req is not None:
                self._untrack_write(req)
            self._in_flight -= 1
            if self._quiescent is not None and not self._in_flight:
                self._wake_drainers()
            if self.dirty_bitmaps.marking or self.write_observers:
                self._notify_write(offset, length)

    async def _write_split(self, offset: int, view: memoryview, flags: RequestFlags) -> None:
        step = self.limits.max_transfer
        if len(view) <= step:
            await self._do_write(offset, view, flags)
            return
        for pos in range(0, len(view), step):
            await self._do_write(offset + pos, view[pos : pos + step], flags)

    async def write_zeroes(self, offset: int, length: int, flags: RequestFlags = NO_FLAGS) -> None:
        """Make the range read as zeros; with ``MAY_UNMAP`` the driver may deallocate it."""
        self._check_open()
        self._check_writable("write-zeroes")
        self._check_range("write-zeroes", offset, length)
        if length == 0:
            return
        align = self.limits.request_alignment
        start = align_up(offset, align)
        end = align_down(offset + length, align)
        unaligned = start != offset or end != offset + length
        self._begin()
        req = await self._track_write(offset, length, unaligned)
        try:
            if start >= end:
                # Entirely inside one or two blocks: read-modify-write with zeros.
                await self._zero_partial(offset, offset + length, flags)
            else:
                if start > offset:
                    await self._zero_partial(offset, start, flags)
                step = align_down(self.limits.max_zeroes, align) or align
                pos = start
                while pos < end:
                    n = min(step, end - pos)
                    await self._do_write_zeroes(pos, n, flags)
                    pos += n
                if end < offset + length:
                    await self._zero_partial(end, offset + length, flags)
        finally:
            self._untrack_write(req)
            self._end()
            self._notify_write(offset, length)

    async def _zero_partial(self, start: int, end: int, flags: RequestFlags) -> None:
        """Zero an unaligned range by read-modify-write of the aligned blocks around it."""
        align = self.limits.request_alignment
        astart = align_down(start, align)
        aend = align_up(end, align)
        bounce = bytearray(aend - astart)
        view = memoryview(bounce)
        await self._do_read(astart, view)
        view[start - astart : end - astart] = bytes(end - start)
        await self._do_write(astart, view, flags & RequestFlags.FUA)

    async def discard(self, offset: int, length: int) -> None:
        """Discard the range.  Unaligned edges are left alone (discard is advisory, as in QEMU).

        A node without ``discard=unmap`` checks the request, then drops it: it succeeds, changes
        nothing and marks no dirty bitmap (QEMU's bdrv_co_pdiscard).
        """
        self._check_open()
        self._check_writable("discard")
        self._check_range("discard", offset, length)
        if not self.discards_change_data():
            return
        align = self.limits.request_alignment
        start = align_up(offset, align)
        end = align_down(offset + length, align)
        if start >= end:
            return
        self._begin()
        req = await self._track_write(start, end - start, False)
        try:
            step = align_down(self.limits.max_discard, align) or align
            pos = start
            while pos < end:
                n = min(step, end - pos)
                await self._do_discard(pos, n)
                pos += n
        finally:
            self._untrack_write(req)
            self._end()
            self._notify_write(start, end - start)

    async def flush(self) -> None:
        """Make every completed write durable."""
        self._check_open()
        self._begin()
        try:
            await self._do_flush()
        finally:
            self._end()

    async def block_status(self, offset: int, length: int) -> Extent:
        """Status of the extent that starts at ``offset``; its length is 1..``length`` (clamped to size).

        The alignment of the answer follows the driver; callers that need cluster granularity round it.
        """
        self._check_open()
        if offset < 0 or length <= 0 or offset >= self._size:
            raise invalid(
                f"block status of {length} bytes at offset {offset} out of range for node "
                f"'{self.node_name}' ({self._size} bytes)"
            )
        length = min(length, self._size - offset)
        self._begin()
        try:
            ext = await self._do_block_status(offset, length)
        finally:
            self._end()
        if ext.offset != offset or not ext.length > 0:
            raise RequestError(errno.EIO, f"driver {self.driver_name} returned a bad extent {ext}")
        flags = ext.flags
        if not self.supports_backing:
            # A node that cannot have a backing file owns every byte: a hole is allocated zeros
            # (QEMU's rule; sync=top must not skip holes of a raw disk).
            flags = _OWNED.get(flags, flags)
        if ext.length > length or flags != ext.flags:
            ext = Extent(offset, min(ext.length, length), flags)
        return ext

    async def status_above(self, offset: int, length: int) -> Extent:
        """Block status of the whole backing chain (QEMU's ``bdrv_block_status_above``): where this
        node has nothing of its own (neither data, zeros nor an allocation), its backing node answers,
        and so on down.  Past the end of a shorter backing node the disk reads zeros.  What a reader of
        the node sees, as an NBD client's ``base:allocation`` must tell it."""
        ext = await self.block_status(offset, length)
        layer: BlockNode = self
        while not ext.flags:  # neither data, zeros nor an allocation here
            edge = layer.children.get("backing")
            if edge is None:
                break
            layer = edge.node
            if offset >= layer.size:
                return Extent(offset, ext.length, Status.ZERO)
            ext = await layer.block_status(offset, min(ext.length, layer.size - offset))
        return ext

    async def extents(self, offset: int = 0, length: int | None = None) -> AsyncIterator[Extent]:
        """Iterate the block status of ``[offset, offset+length)`` extent by extent, merging equal flags."""
        end = self._size if length is None else offset + length
        pending: Extent | None = None
        while offset < end:
            ext = await self.block_status(offset, end - offset)
            if pending is not None and pending.flags == ext.flags:
                pending = Extent(pending.offset, pending.length + ext.length, ext.flags)
            else:
                if pending is not None:
                    yield pending
                pending = ext
            offset = ext.end
        if pending is not None:
            yield pending

    async def close(self) -> None:
        """Store the node's persistent dirty bitmaps, then close its driver.  Safe to call twice.

        New requests are refused from the start; the bitmaps are stored once those in flight have
        completed (and marked them), while the driver is still open (qcow2 keeps them in the image).
        """
        if self.closed:
            return
        self.closed = True
        await self.dirty_bitmaps.close()
        await self._do_close()


class FilterNode(BlockNode):
    """A node with exactly one child (role ``file``) that never changes data.

    ``reads_unchanged``: reads reach the child as they are, so a reader may go to the child's storage
    directly (the NBD server's sendfile path); a filter that can fail or delay reads sets it False.

    By default every request passes to the child unchanged; filters override what they intercept.
    The child is resolved through the edge at each request, so graph changes take effect at once.
    """

    reads_unchanged: ClassVar[bool] = True

    def __init__(self, node_name: str, *, read_only: bool = False) -> None:
        super().__init__(node_name, read_only=read_only)
        #: The parent edges re-pointed to this filter when it was inserted above its child (owned by
        #: the graph): ``blockdev-del`` hands them back instead of counting them as users.
        self.adopted: list[Child] = []

    @property
    def is_filter(self) -> bool:
        return True

    @property
    def child(self) -> BlockNode:
        return self.children["file"].node

    @property
    def size(self) -> int:
        return self.child.size

    def refresh_limits(self) -> None:
        """Take the child's limits (called when the child is attached)."""
        child = self.child
        self._size = child.size
        self.limits = Limits(
            request_alignment=1,
            max_transfer=child.limits.max_transfer,
            max_zeroes=child.limits.max_zeroes,
            max_discard=child.limits.max_discard,
            cluster_size=child.limits.cluster_size,
        )

    # The filter passes requests through whole: the child's own request path aligns and splits them.
    # Requests are counted here too, so draining the filter waits for what passes through it.

    async def _intercept(self, op: str, offset: int | None, length: int, flags: RequestFlags) -> None:
        """Called before each request goes to the child; a filter that acts on requests overrides it.

        ``op`` is ``read``, ``write``, ``write_zeroes``, ``discard``, ``flush`` or ``block_status``
        (``offset`` is None for ``flush``).  Raising fails the request before the child sees it.  Reads
        are intercepted only by a filter that sets ``reads_unchanged`` False.
        """

    def _passes(self, op: str, offset: int, length: int, flags: RequestFlags) -> bool:
        """True when the filter has nothing to do for this read, write, write-zeroes or discard: it goes
        to the child without :meth:`_intercept` (a synchronous test, so that the common request costs
        no extra coroutine).  The default is False: every request is intercepted.
        """
        return False

    async def _forward(
        self, op: str, offset: int | None, length: int, flags: RequestFlags, call: Callable[[], Awaitable[T]]
    ) -> T:
        self._check_open()
        if op in _WRITE_OPS:
            self._check_writable(op.replace("_", "-"))
        self._begin()
        try:
            if offset is None or op not in _WRITE_OPS or not self._passes(op, offset, length, flags):
                await self._intercept(op, offset, length, flags)
            return await call()
        finally:
            self._end()
            if op in _WRITE_OPS and offset is not None:
                # A filter's own bitmaps see what passed through it, as on any node.
                self._notify_write(offset, length)

    # Reads and writes are spelled out rather than sent through _forward: they are the data path, and
    # each layer of a stack costs every request its Python.  Same steps, same order.

    async def read(self, offset: int, buf: Buffer) -> None:
        length = memoryview(buf).nbytes
        if self.closed:
            self._check_open()
        self._in_flight += 1
        try:
            if not self.reads_unchanged and not self._passes("read", offset, length, NO_FLAGS):
                await self._intercept("read", offset, length, NO_FLAGS)
            await self.child.read(offset, buf)
        finally:
            self._in_flight -= 1
            if self._quiescent is not None and not self._in_flight:
                self._wake_drainers()

    async def write(self, offset: int, data: Buffer, flags: RequestFlags = NO_FLAGS) -> None:
        length = memoryview(data).nbytes
        if self.closed or self.read_only:
            self._check_open()
            self._check_writable("write")
        self._in_flight += 1
        try:
            if not self._passes("write", offset, length, flags):
                await self._intercept("write", offset, length, flags)
            await self.child.write(offset, data, flags)
        finally:
            self._in_flight -= 1
            if self._quiescent is not None and not self._in_flight:
                self._wake_drainers()
            # A filter's own bitmaps see what passed through it, as on any node.
            if self.dirty_bitmaps.marking or self.write_observers:
                self._notify_write(offset, length)

    async def write_zeroes(self, offset: int, length: int, flags: RequestFlags = NO_FLAGS) -> None:
        call = lambda: self.child.write_zeroes(offset, length, flags)  # noqa: E731
        await self._forward("write_zeroes", offset, length, flags, call)

    async def discard(self, offset: int, length: int) -> None:
        if not self.discards_change_data():
            # Dropped before the filter sees it, as by any node (see BlockNode.discard).
            self._check_open()
            self._check_writable("discard")
            return
        await self._forward("discard", offset, length, NO_FLAGS, lambda: self.child.discard(offset, length))

    async def flush(self) -> None:
        await self._forward("flush", None, 0, NO_FLAGS, lambda: self.child.flush())

    async def block_status(self, offset: int, length: int) -> Extent:
        call = lambda: self.child.block_status(offset, length)  # noqa: E731
        return await self._forward("block_status", offset, length, NO_FLAGS, call)


# ---------------------------------------------------------------------- edges of the graph
# Defined here, with the node that holds them, so that the graph imports the node and never the reverse.


@dataclass(eq=False)
class Child:
    """An edge from ``parent`` to ``node`` in role ``role``.

    Mutated only by :class:`cowbackup.block.graph.BlockGraph`, which owns the edges (see its module).
    """

    parent: BlockNode | Root
    role: str
    node: BlockNode


@dataclass(eq=False)
class Root:
    """A parent that is not a node: an export, a job, a one-shot command.

    ``description`` says who it is in "node is busy" errors, e.g. ``"export 'disk0'"``.
    """

    description: str
    child: Child | None = field(default=None, repr=False)

    @property
    def node(self) -> BlockNode:
        if self.child is None:
            raise BlockError(f"{self.description} is not attached to a node")
        return self.child.node
