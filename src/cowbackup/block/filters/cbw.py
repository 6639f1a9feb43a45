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
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable

from cowbackup.block.align import align_down, align_up
from cowbackup.block.copy import BlockCopyState, CopyCall, CopyError, cluster_size_for
from cowbackup.block.drivers import open_child
from cowbackup.block.errors import BlockError, RequestError
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import FilterNode, RequestFlags
from cowbackup.block.options import Options

log = logging.getLogger(__name__)

ON_CBW_ERROR = ("break-guest-write", "break-snapshot")
#: Guest-triggered copies run with many workers and no chunk limit (QEMU's BLOCK_COPY_MAX_WORKERS).
CBW_WORKERS = 64


class CopyBeforeWriteNode(FilterNode):
    """A filter whose writes first save old data through a :class:`BlockCopyState`.

    ``bcs`` is set once the target is attached (:func:`cbw_append`, or opening with ``blockdev-add``).
    ``_background`` holds copies whose guest request timed out; they are awaited by :meth:`quiesce`.
    """

    driver_name = "copy-before-write"

    def __init__(
        self, node_name: str, *, on_cbw_error: str = "break-guest-write", cbw_timeout: int = 0
    ) -> None:
        super().__init__(node_name)
        if on_cbw_error not in ON_CBW_ERROR:
            raise BlockError(f"Parameter 'on-cbw-error' does not accept value '{on_cbw_error}'")
        self.on_cbw_error = on_cbw_error
        self.cbw_timeout = cbw_timeout
        self.bcs: BlockCopyState | None = None
        self.snapshot_error: OSError | None = None
        #: Called once with the error when ``break-snapshot`` gives up the snapshot.
        self.on_snapshot_error: Callable[[OSError], None] = lambda err: None
        #: False once the owner is done with the snapshot: requests then pass straight through.
        self.active = True
        self._background: set[asyncio.Future[None]] = set()

    def describe(self) -> dict[str, object]:
        return {"file": self.child.node_name}

    # ------------------------------------------------------------------ interception

    async def _save_old_data(self, offset: int, length: int, flags: RequestFlags) -> None:
        bcs = self.bcs
        if bcs is None or not self.active or self.snapshot_error is not None or length == 0:
            return
        if flags & RequestFlags.WRITE_UNCHANGED:
            return
        cluster = bcs.cluster_size
        start = align_down(offset, cluster)
        end = min(align_up(offset + length, cluster), bcs.size)
        if bcs.bitmap.next_dirty(start, end) is None and not bcs.in_flight_bytes:
            return  # fast path: nothing left to copy here and nothing in flight to wait for
        call = CopyCall(start, end - start, max_workers=CBW_WORKERS, ignore_ratelimit=True)
        try:
            if self.cbw_timeout:
                copy = asyncio.ensure_future(bcs.copy(call))
                self._background.add(copy)
                copy.add_done_callback(self._background_done)
                try:
                    await asyncio.wait_for(asyncio.shield(copy), self.cbw_timeout)
                except TimeoutError:
                    raise RequestError(errno.ETIMEDOUT, "copy-before-write timed out") from None
            else:
                await bcs.copy(call)
        except (CopyError, RequestError) as err:
            self._copy_failed(err)

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

    async def _intercept(self, op: str, offset: int | None, length: int, flags: RequestFlags) -> None:
        if op in ("write", "write_zeroes", "discard") and offset is not None:
            await self._save_old_data(offset, length, flags)

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
    filt.bcs = bcs
    return filt, bcs


async def cbw_drop(graph: BlockGraph, filt: CopyBeforeWriteNode) -> None:
    """Wait for the filter's requests and copies, then remove it and re-point its parents to the source."""
    await filt.quiesce()
    cbw_detach(graph, filt)


def cbw_detach(graph: BlockGraph, filt: CopyBeforeWriteNode) -> None:
    """Remove the filter from the graph at once (nothing may be in flight through it)."""
    filt.active = False
    target = filt.children.get("target")
    if target is not None:
        graph.detach(target)
    graph.drop_filter(filt)
    filt.closed = True


async def open_node(graph: BlockGraph, node_name: str, opts: Options) -> CopyBeforeWriteNode:
    """``blockdev-add driver=copy-before-write file=SRC target=TGT`` (fleecing).

    Every cluster starts "to copy"; the filter is a new node above ``file`` (its other parents keep
    writing to ``file`` directly unless re-pointed).
    """
    on_cbw_error = opts.get_enum("on-cbw-error", ON_CBW_ERROR, "break-guest-write")
    cbw_timeout = opts.get_int("cbw-timeout", 0, minimum=0)
    min_cluster = opts.get_int("min-cluster-size", 0, minimum=0)
    source = await open_child(graph, opts, "file")
    target = await open_child(graph, opts, "target")
    assert source is not None and target is not None
    if source.size != target.size:
        raise BlockError("Source and target image have different sizes")
    filt = CopyBeforeWriteNode(node_name, on_cbw_error=on_cbw_error, cbw_timeout=cbw_timeout)
    graph.attach(filt, "file", source)
    filt.refresh_limits()
    target_edge = graph.attach(filt, "target", target)
    cluster = cluster_size_for(target, max(min_cluster, 64 * 1024))
    filt.bcs = BlockCopyState(filt.children["file"], target_edge, cluster)
    filt.bcs.bitmap.set_all()
    return filt
