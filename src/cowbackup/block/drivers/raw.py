"""``raw``: the raw format -- a window ``[offset, offset+size)`` of its ``file`` child (QEMU's raw-format).

Options:

=============  ===========================================================================================
``file``       the child: a node name or an inline node definition (required)
``offset``     where the window starts in the child (default 0)
``size``       length of the window (default: the child's size minus ``offset``); a multiple of 512
``discard``    ``ignore`` (default): discards sent to the raw node are dropped there -- they succeed,
               change nothing and mark none of its dirty bitmaps; ``unmap``: they mark its bitmaps and go
               on to the child, which drops or executes them by its own ``discard`` option (QEMU's
               raw_co_pdiscard under bdrv_co_pdiscard).  Also with a child given by name.
others         every node's options (:mod:`cowbackup.block.drivers`): an inline child inherits
               ``read-only``, ``auto-read-only``, ``force-share`` and ``cache.*`` unless it sets them, and
               its ``discard`` defaults to ``unmap`` (QEMU's bdrv_inherited_options); a child given by
               name keeps its own.  ``cache.*`` does nothing on the raw node itself.
=============  ===========================================================================================

Every request is forwarded to the child with ``offset`` added, block status is shifted back.  A raw node
is not a filter: it may shift offsets and hide the child's edges.  Its limits are the child's; its
``request_alignment`` is the child's only when the window is aligned to it, otherwise 1, so that padding
never reads or writes outside the window (the child's own request path pads instead).

Reads and writes -- the data path -- skip the generic request path of the raw node itself and go
straight to the child's, which aligns, pads, serialises and splits them against the same limits (or,
for an unaligned window, against the child's where raw's would do nothing): doing it twice costs every
request of the usual ``raw``-over-``file`` stack a second pass of Python and gains nothing.  What
belongs to the raw node stays here: the checks against its window and read-only flag, its
``detect-zeroes`` (through the generic path), the in-flight count that ``drain`` waits for, and its
dirty bitmaps and write observers.
"""

from __future__ import annotations

from cowbackup.block.drivers import open_child
from cowbackup.block.errors import BlockError
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import NO_FLAGS, BlockNode, Buffer, Extent, Limits, RequestFlags
from cowbackup.block.options import Options

#: QEMU keeps sizes in 512-byte sectors; a window of another size would be rounded and leak past its end.
SECTOR_SIZE = 512


class RawNode(BlockNode):
    """A window onto the ``file`` child, reached through its edge at each request."""

    driver_name = "raw"

    def __init__(self, node_name: str, *, offset: int, size: int, read_only: bool = False) -> None:
        super().__init__(node_name, read_only=read_only)
        self.offset = offset
        self._size = size

    @property
    def child(self) -> BlockNode:
        return self.children["file"].node

    @property
    def known_zero_init(self) -> bool:
        """The child's ``known_zero_init`` when the window is the whole child, else False."""
        child = self.child
        return (
            self.offset == 0 and self._size == child.size and bool(getattr(child, "known_zero_init", False))
        )

    def refresh_limits(self) -> None:
        """Take the child's limits (called once the child is attached)."""
        lim = self.child.limits
        align = lim.request_alignment
        window_aligned = self.offset % align == 0 and self._size % align == 0
        self.limits = Limits(
            request_alignment=align if window_aligned else 1,
            max_transfer=lim.max_transfer,
            max_zeroes=lim.max_zeroes,
            max_discard=lim.max_discard,
            cluster_size=lim.cluster_size,
        )

    def describe(self) -> dict[str, object]:
        return {"file": self.child.describe().get("file", self.child.node_name)}

    # ------------------------------------------------------------------ the data path (see the module)

    async def read(self, offset: int, buf: Buffer) -> None:
        length = memoryview(buf).nbytes
        if self.closed or offset < 0 or offset + length > self._size:
            self._check_request("read", offset, length, write=False)
        if length == 0:
            return
        self._in_flight += 1
        try:
            await self.children["file"].node.read(self.offset + offset, buf)
        finally:
            self._in_flight -= 1
            if self._quiescent is not None and not self._in_flight:
                self._wake_drainers()

    async def write(self, offset: int, data: Buffer, flags: RequestFlags = NO_FLAGS) -> None:
        if self.detect_zeroes != "off":
            await super().write(offset, data, flags)
            return
        length = memoryview(data).nbytes
        if self.closed or self.read_only or offset < 0 or offset + length > self._size:
            self._check_request("write", offset, length, write=True)
        if length == 0:
            return
        self._in_flight += 1
        try:
            await self.children["file"].node.write(self.offset + offset, data, flags)
        finally:
            self._in_flight -= 1
            if self._quiescent is not None and not self._in_flight:
                self._wake_drainers()
            if self.dirty_bitmaps.marking or self.write_observers:
                self._notify_write(offset, length)

    # ------------------------------------------------------------------ driver hooks
    # What the generic path still calls: write-zeroes, discard, flush, block status, and writes under
    # detect-zeroes.

    async def _do_read(self, offset: int, buf: memoryview) -> None:
        await self.child.read(self.offset + offset, buf)

    async def _do_write(self, offset: int, data: memoryview, flags: RequestFlags) -> None:
        await self.child.write(self.offset + offset, data, flags)

    async def _do_write_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        await self.child.write_zeroes(self.offset + offset, length, flags)

    async def _do_discard(self, offset: int, length: int) -> None:
        await self.child.discard(self.offset + offset, length)

    async def _do_flush(self) -> None:
        await self.child.flush()

    async def _do_block_status(self, offset: int, length: int) -> Extent:
        ext = await self.child.block_status(self.offset + offset, length)
        return Extent(offset, ext.length, ext.flags)


async def open_node(graph: BlockGraph, node_name: str, opts: Options) -> BlockNode:
    """Open a ``raw`` node (options in the module docstring).  BlockError with QEMU's wording."""
    offset = opts.get_int("offset", 0, minimum=0)
    size: int | None = opts.get_int("size", None, minimum=0)
    child = await open_child(graph, opts, "file")
    assert child is not None
    real_size = child.size
    node = RawNode(node_name, offset=offset, size=0)
    graph.attach(node, "file", child)
    try:
        if offset > real_size:
            raise BlockError(
                f"Offset ({offset}) cannot be greater than size of the containing file ({real_size})"
            )
        if size is not None and real_size - offset < size:
            # QEMU's message, double space included.
            raise BlockError(
                f"The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the "
                f" actual size of the containing file ({real_size})"
            )
        if size is not None and size % SECTOR_SIZE:
            raise BlockError(f"Specified size is not multiple of {SECTOR_SIZE}")
    except BlockError:
        await graph.abandon(node)
        raise
    node._size = real_size - offset if size is None else size
    node.refresh_limits()
    return node
