"""The backup job: a point-in-time copy of a node while it is being written (QEMU's block/backup.c).

Creating the job is the instant of the snapshot: :func:`backup_job_create` inserts the copy-before-write
filter above the source and marks the copy bitmap in one step of the event loop, so no write can slip
between them.  From then on every write to the source first saves the old data of the clusters it touches;
the job itself walks the copy bitmap in the background::

    create:  validate (QEMU's order and messages) -> cbw_append -> bitmap := what the sync mode copies
    run:     [sync=top: clear unallocated clusters] -> loop { copy call over the whole disk }
             pause = cancel the call, resume = a new call; an error goes to on-source/target-error
    clean:   wait for every copy in flight (guest-triggered too), drop the filter -- whatever the outcome

Writes already inside the source node when the filter goes in are not drained first (QEMU drains): they
were not acknowledged before the snapshot instant, so the snapshot may hold their old data, their new
data, or -- like a disk after a crash -- part of each; every write acknowledged before the instant is in,
and nothing issued after it.

Sync modes: ``full`` copies everything; ``top`` skips clusters not allocated in the source's top layer;
``none`` copies only what writers are about to change (fleecing), until cancelled; ``bitmap`` copies the
clusters dirty in a named bitmap of the source (``incremental`` = ``bitmap`` with ``on-success``).

A ``bitmap`` given with ``full``, ``top`` or ``bitmap`` is frozen when the job is created: it gets a
successor that records the writes from the snapshot instant on (:mod:`cowbackup.block.dirty_bitmaps`).
With ``sync=bitmap`` the copy bitmap starts as the frozen bitmap, at the snapshot instant (QEMU copies
it when the job starts running; nothing may write in between here, so the two agree). When the job
ends, ``bitmap-mode`` decides what the bitmap holds (QEMU's backup_cleanup_sync_bitmap)::

    bitmap-mode   job succeeded                    job failed or was cancelled
    on-success    abdicate: writes since the start  reclaim: old bits + writes since the start
    never         reclaim                           reclaim
    always        abdicate                          abdicate, plus the clusters not copied yet
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from cowbackup.block.align import align_down, align_up, is_power_of_2
from cowbackup.block.copy import (
    DEFAULT_WORKERS,
    MIN_CLUSTER_SIZE,
    BlockCopyState,
    CopyCall,
    CopyCancelled,
    CopyError,
    cluster_size_for,
)
from cowbackup.block.dirty_bitmaps import BitmapCheck, NodeDirtyBitmap
from cowbackup.block.errors import BlockError
from cowbackup.block.filters.cbw import CopyBeforeWriteNode, cbw_append, cbw_detach, cbw_drop
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode, RequestFlags
from cowbackup.jobs.job import BlockdevOnError, ErrorAction, Job, JobError, JobManager, JobTxn

SYNC_MODES = ("top", "full", "none", "incremental", "bitmap")
BITMAP_MODES = ("on-success", "never", "always")
INT_MAX = 2**31 - 1


@dataclass
class BackupPerf:
    """``x-perf`` (QEMU's BackupPerf)."""

    use_copy_range: bool = False
    max_workers: int = DEFAULT_WORKERS
    max_chunk: int = 0
    min_cluster_size: int = 0


@dataclass
class BackupParams:
    """The arguments of ``blockdev-backup`` (QEMU's BackupCommon plus ``target``), with QEMU's defaults."""

    device: str
    target: str
    sync: str
    job_id: str | None = None
    speed: int = 0
    bitmap: str | None = None
    bitmap_mode: str | None = None
    compress: bool = False
    on_source_error: BlockdevOnError = BlockdevOnError.REPORT
    on_target_error: BlockdevOnError = BlockdevOnError.REPORT
    on_cbw_error: str = "break-guest-write"
    auto_finalize: bool = True
    auto_dismiss: bool = True
    filter_node_name: str | None = None
    discard_source: bool = False
    perf: BackupPerf = field(default_factory=BackupPerf)


class BackupJob(Job):
    """Copies the snapshot held by ``bcs`` to the target; see the module docstring.

    ``_call``/``_copy`` are the background copy call in flight (None between calls); only the job's own
    task and its pause/cancel hooks touch them.
    """

    def __init__(
        self,
        job_id: str,
        manager: JobManager,
        graph: BlockGraph,
        params: BackupParams,
        filt: CopyBeforeWriteNode,
        bcs: BlockCopyState,
        txn: JobTxn | None = None,
        sync_bitmap: NodeDirtyBitmap | None = None,
    ) -> None:
        super().__init__(
            job_id,
            "backup",
            manager,
            speed=params.speed,
            auto_finalize=params.auto_finalize,
            auto_dismiss=params.auto_dismiss,
            txn=txn,
        )
        self.graph = graph
        self.params = params
        self.filt = filt
        self.bcs = bcs
        self._call: CopyCall | None = None
        self._copy: asyncio.Future[None] | None = None
        self._snapshot_error: OSError | None = None
        #: The frozen bitmap of ``bitmap``/``bitmap-mode`` (None without one); settled at commit/abort.
        self.sync_bitmap = sync_bitmap
        bcs.set_speed(params.speed)
        bcs.on_progress = self.progress_update
        bcs.on_remaining = self.progress_set_remaining
        filt.on_snapshot_error = self._snapshot_broken
        self.progress_set_remaining(bcs.remaining())

    @property
    def cluster_size(self) -> int:
        return self.bcs.cluster_size

    # ------------------------------------------------------------------ hooks

    def on_set_speed(self, speed: int) -> None:
        self.bcs.set_speed(speed)

    def on_cancel(self, force: bool) -> None:
        # Backup cancels are always forced: stop starting tasks; tasks in flight finish.
        if self._call is not None:
            self._call.cancel()

    async def on_pause(self) -> None:
        # QEMU's backup_pause: stop the running copy call; a new one continues from the bitmap on resume.
        if self._call is not None and self._copy is not None:
            self._call.cancel()
            await asyncio.wait([self._copy])

    def _snapshot_broken(self, err: OSError) -> None:
        """on-cbw-error=break-snapshot gave up the snapshot: the job fails with that error."""
        self._snapshot_error = err
        if self._call is not None:
            self._call.cancel()
        self.enter()

    async def prepare(self) -> None:
        await self.bcs.target.node.backup_target_prepare()

    async def commit(self) -> None:
        self._cleanup_sync_bitmap(success=True)

    async def abort(self) -> None:
        self._cleanup_sync_bitmap(success=False)
        await self.bcs.target.node.backup_target_abort()

    async def clean(self) -> None:
        await cbw_drop(self.graph, self.filt)

    def _cleanup_sync_bitmap(self, success: bool) -> None:
        """Settle the frozen bitmap by ``bitmap-mode`` (the table in the module docstring)."""
        bm, mode = self.sync_bitmap, self.params.bitmap_mode
        if bm is None:
            return
        self.sync_bitmap = None
        # The successor replaces the bitmap when the job succeeded or the mode says "always"; otherwise
        # its bits go back into the bitmap.
        sync = (success or mode == "always") and mode != "never"
        bm = bm.abdicate() if sync else bm.reclaim()
        if not success and mode == "always":
            # What the job did not copy is still different from the target: keep it dirty. A job
            # rolled back before it ran copied nothing: QEMU's copy bitmap is still all set then (it
            # takes the sync bitmap's bits only when the job starts), so the whole disk stays dirty.
            if self._started:
                bm.merge_from(self.bcs.bitmap)
            else:
                bm.bits.set_all()

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        if self.params.sync == "top":
            await self._skip_unallocated()
        self.progress_set_remaining(self.bcs.remaining())
        if self.params.sync == "none":
            while not self.is_cancelled() and self._snapshot_error is None:
                await self.yield_()
        else:
            await self._copy_loop()
        if self._snapshot_error is not None and not self.is_cancelled():
            raise self._snapshot_error

    async def _skip_unallocated(self) -> None:
        """sync=top: clear the bits of clusters the source's top layer does not allocate.

        The engine skips unallocated areas meanwhile (guest writes may copy before the scan reaches them).
        """
        bcs = self.bcs
        bcs.skip_unallocated = True
        source = bcs.source.node
        offset = 0
        while offset < bcs.size and not self.is_cancelled():
            ext = await source.block_status(offset, bcs.size - offset)
            if not ext.is_allocated:
                start = align_up(ext.offset, self.cluster_size)
                end = ext.end if ext.end == bcs.size else align_down(ext.end, self.cluster_size)
                if start < end:
                    bcs.bitmap.reset(start, end - start)
                    self.progress_set_remaining(bcs.remaining())
            offset = ext.end
            await self.pause_point()
        bcs.skip_unallocated = False

    async def _copy_loop(self) -> None:
        perf = self.params.perf
        while not self.is_cancelled() and self._snapshot_error is None:
            call = CopyCall(0, self.bcs.size, max_workers=perf.max_workers, max_chunk=perf.max_chunk)
            copy = asyncio.ensure_future(self.bcs.copy(call))
            copy.add_done_callback(lambda _: self.enter())
            self._call, self._copy = call, copy
            try:
                while not copy.done() and not self.is_cancelled():
                    await self.yield_()
                if not copy.done():
                    call.cancel()
                    await asyncio.wait([copy])
            finally:
                self._call = self._copy = None
            try:
                copy.result()
                return
            except CopyCancelled:
                continue  # paused (a new call resumes) or cancelled (the loop ends)
            except CopyError as err:
                if self.is_cancelled():
                    return
                policy = self.params.on_source_error if err.is_read else self.params.on_target_error
                if self.error_action(policy, err.is_read, err) is ErrorAction.REPORT:
                    raise
                await self.pause_point()  # "stop" paused the job; "ignore" retries at once


def _supports_compressed_writes(node: BlockNode) -> bool:
    """QEMU's bdrv_supports_compressed_writes: the node, or the node under its filters, can compress."""
    while node.is_filter and "file" in node.children:
        node = node.children["file"].node
    return bool(getattr(node, "supports_compressed_writes", False))


def _check_bitmap_args(params: BackupParams, source: BlockNode) -> NodeDirtyBitmap | None:
    """QEMU's do_backup_common checks on bitmap arguments, in its order and words; the bitmap, if any."""
    sync = params.sync
    if sync in ("bitmap", "incremental") and params.bitmap is None:
        raise BlockError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if params.bitmap_mode not in (None, "on-success"):
            raise BlockError("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'")
        params.sync, params.bitmap_mode = "bitmap", "on-success"
    if params.bitmap is None:
        if params.bitmap_mode is not None:
            raise BlockError("Cannot specify bitmap sync mode without a bitmap")
        return None
    bm = source.dirty_bitmaps.find(params.bitmap)
    if bm is None:
        raise BlockError(f"Bitmap '{params.bitmap}' could not be found")
    if params.bitmap_mode is None:
        raise BlockError("Bitmap sync mode must be given when providing a bitmap")
    bm.check(BitmapCheck.ALLOW_RO)
    if params.sync == "none":
        raise BlockError("sync mode 'none' does not produce meaningful bitmap outputs")
    if params.bitmap_mode == "never" and params.sync != "bitmap":
        raise BlockError(
            f"Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{params.sync}'"
        )
    return bm


def backup_job_create(
    graph: BlockGraph, manager: JobManager, params: BackupParams, txn: JobTxn | None = None
) -> BackupJob:
    """Validate ``params``, insert the filter (the snapshot instant) and create the job, not yet started.

    Raises BlockError / JobError with QEMU's messages; on error nothing is left behind.
    """
    if params.sync not in SYNC_MODES:
        raise BlockError(f"Parameter 'sync' does not accept value '{params.sync}'")
    if params.bitmap_mode is not None and params.bitmap_mode not in BITMAP_MODES:
        raise BlockError(f"Parameter 'bitmap-mode' does not accept value '{params.bitmap_mode}'")
    source = graph.get(params.device)
    target = graph.get(params.target)
    sync_bitmap = _check_bitmap_args(params, source)
    if source is target:
        raise BlockError("Source and target cannot be the same")
    if params.compress and not _supports_compressed_writes(target):
        raise BlockError(f"Compression is not supported for this drive {params.target}")
    target.backup_target_check(params.sync)
    # QEMU's op blockers: a running backup's target is the job's alone -- neither the source nor the
    # target of another backup (two snapshots would interleave in it, or a half-written one be read).
    for name, node in ((params.device, source), (params.target, target)):
        if any(isinstance(e.parent, CopyBeforeWriteNode) and e.role == "target" for e in node.parents):
            raise BlockError(f"Node '{name}' is busy: block device is in use by block job: backup")
    perf = params.perf
    if not 1 <= perf.max_workers <= INT_MAX:
        raise BlockError(f"max-workers must be between 1 and {INT_MAX}")
    if perf.max_chunk < 0:
        raise BlockError("max-chunk must be zero (which means no limit) or positive")
    if sync_bitmap is not None:
        # A bitmap the job will write to must be writable; then freeze it (QEMU: before the sizes).
        if params.bitmap_mode != "never":
            sync_bitmap.check(BitmapCheck.DEFAULT)
        sync_bitmap.create_successor()
    try:
        return _create(graph, manager, params, txn, sync_bitmap)
    except (JobError, BlockError):
        if sync_bitmap is not None:
            sync_bitmap.reclaim()
        raise


def _create(
    graph: BlockGraph,
    manager: JobManager,
    params: BackupParams,
    txn: JobTxn | None,
    sync_bitmap: NodeDirtyBitmap | None,
) -> BackupJob:
    """The checks after the bitmap is frozen, the filter, the job (backup_job_create's second half)."""
    source = graph.get(params.device)
    target = graph.get(params.target)
    perf = params.perf
    if source.size != target.size:
        raise BlockError("Source and target image have different sizes")
    if target.read_only:
        raise BlockError(f"Block node '{params.target}' is read-only")
    if params.discard_source and source.read_only:
        raise BlockError(f"Block node '{params.device}' is read-only: cannot discard the source")
    # QEMU checks min-cluster-size when it opens the filter, after the sizes; the job id and the speed
    # (< 0) are checked last, when the job is created (BackupJob below).
    if perf.min_cluster_size and not is_power_of_2(perf.min_cluster_size):
        raise BlockError("min-cluster-size needs to be a power of 2")
    cluster = cluster_size_for(target, max(perf.min_cluster_size, MIN_CLUSTER_SIZE))
    if perf.max_chunk and perf.max_chunk < cluster:
        raise BlockError(
            f"Required max-chunk ({perf.max_chunk}) is less than backup cluster size ({cluster})"
        )
    job_id = params.job_id if params.job_id is not None else params.device

    filt, bcs = cbw_append(
        graph,
        params.device,
        params.target,
        filter_node_name=params.filter_node_name,
        cluster_size=cluster,
        on_cbw_error=params.on_cbw_error,
        use_copy_range=perf.use_copy_range and not params.compress,
    )
    bcs.discard_source = params.discard_source
    if params.compress:
        bcs.write_flags = RequestFlags.WRITE_COMPRESSED
    # The snapshot instant: from here on every write passes through the filter.
    if params.sync == "bitmap":
        assert sync_bitmap is not None
        bcs.bitmap.merge(sync_bitmap.bits)
    else:
        bcs.bitmap.set_all()
    try:
        return BackupJob(job_id, manager, graph, params, filt, bcs, txn, sync_bitmap)
    except (JobError, BlockError):
        cbw_detach(graph, filt)
        raise
