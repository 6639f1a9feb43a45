"""The copy engine: copies clusters from a source node to a target node, each at most once.

It is shared by the copy-before-write filter (guest writes ask it to save old data first) and the backup
job (which walks the whole disk in the background), so the two collaborate instead of copying the same
cluster twice -- QEMU's block-copy.  State is split by lifetime (STYLE.md #2):

* :class:`BlockCopyState` lives as long as the backup: the copy bitmap (set bit = "still to copy"),
  the tasks in flight, the memory budget, the speed limit, progress hooks.
* :class:`CopyCall` is one call of :meth:`BlockCopyState.copy` over a range: its workers, its first error,
  its cancellation.
* :class:`_Task` is one unit of work: a run of clusters claimed by one call.

The rules that make the point-in-time guarantee hold::

    claim      a task clears its clusters' bits *before* it reads them (in the same loop step as finding
               them dirty), so no two tasks ever cover the same cluster;
    wait       a call that finds no dirty bit left in its range waits for any task in flight that
               overlaps the range, then looks again -- so a guest write never overtakes a copy of its
               clusters that another call started;
    roll back  a failed task sets its bits again; the waiting call then copies them itself (or fails).

All state is owned by the event loop; no locks are needed because claiming happens without an ``await``
between finding a dirty area and clearing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from cowbackup.block.align import align_down, align_up
from cowbackup.block.bitmap import DirtyBitmap
from cowbackup.block.buffers import BufferPool
from cowbackup.block.errors import RequestError
from cowbackup.block.extent_cache import ExtentCache
from cowbackup.block.node import BlockNode, Child, Extent, RequestFlags, Status
from cowbackup.block.ratelimit import RateLimit
from cowbackup.block.zero import is_zero, zero_runs

log = logging.getLogger(__name__)

#: Smallest copy unit; a target cluster larger than this raises it (QEMU's BACKUP_CLUSTER_SIZE_DEFAULT).
MIN_CLUSTER_SIZE = 64 * 1024
#: Largest chunk for buffered copies (QEMU: 1 MiB; we take larger chunks to amortise per-task cost).
DEFAULT_CHUNK = 4 * 1024 * 1024
#: Largest chunk for copy offloading (copy_file_range).
COPY_RANGE_CHUNK = 16 * 1024 * 1024
#: Default and maximum number of parallel tasks of one call.
DEFAULT_WORKERS = 64
#: Bytes of buffers in flight across all calls (QEMU: 128 MiB).  Ours is smaller: eight 4 MiB chunks keep a
#: local copy at full speed, and more only thrash the CPU caches -- 1 GiB in /dev/shm went from 2800 MB/s
#: at 170 MiB peak RSS with 128 MiB to 3175 MB/s at 68 MiB with 32 MiB (bench/backup_vs_qemu.py).
MEMORY_BUDGET = 32 * 1024 * 1024
#: A dirty run shorter than this (and than the chunk limit) is read without asking the source's block
#: status, unless a cached answer covers it.  An incremental backup's dirty clusters are scattered runs
#: of a cluster or a few: a status query each (on tmpfs SEEK_HOLE walks the page cache to the next hole)
#: costs more than reading them, and the read path finds zeros itself and keeps them sparse (a remote
#: source sends holes as holes in a sparse read).
STATUS_MIN_RUN = 1024 * 1024
#: Source block-status answers kept (about 100 KiB): enough for the extents of a fragmented disk that
#: guest writes hit at random.
STATUS_CACHE_EXTENTS = 4096


class CopyMethod(enum.Enum):
    READ_WRITE = "read-write"
    WRITE_ZEROES = "write-zeroes"
    SKIP = "skip"
    COPY_RANGE = "copy-range"


class CopyError(RequestError):
    """A copy failed.  ``is_read`` tells whether reading the source (True) or writing the target failed."""

    def __init__(self, cause: OSError, is_read: bool) -> None:
        super().__init__(cause.errno or errno.EIO, cause.strerror or str(cause))
        self.is_read = is_read
        self.__cause__ = cause


class CopyCancelled(Exception):
    """The call was cancelled before it finished its range (not an error of the copy)."""


@dataclass(eq=False)
class _Task:
    """Clusters ``[offset, offset+length)`` claimed by one call; ``done`` is set when they are settled."""

    call: CopyCall
    offset: int
    length: int
    method: CopyMethod = CopyMethod.READ_WRITE
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(eq=False)
class CopyCall:
    """One request to copy everything still dirty in ``[offset, offset+length)``.

    ``max_workers`` tasks run at once; ``max_chunk`` (0 = no limit) caps a task's size; guest-triggered
    calls set ``ignore_ratelimit`` (they never wait for the speed limit, but their copies are charged to
    it).  ``cancel()`` stops new tasks; tasks in flight finish.
    """

    offset: int
    length: int
    max_workers: int = DEFAULT_WORKERS
    max_chunk: int = 0
    ignore_ratelimit: bool = False
    cancelled: bool = False
    error: CopyError | None = None
    _kick: asyncio.Event = field(default_factory=asyncio.Event)

    def cancel(self) -> None:
        self.cancelled = True
        self._kick.set()

    def kick(self) -> None:
        """Wake the call if it sleeps for the speed limit (the limit changed)."""
        self._kick.set()


class BlockCopyState:
    """Copies dirty clusters from ``source`` to ``target`` (edges, resolved at each request).

    ``bitmap``: the copy bitmap; a set bit means "still to copy".  The owner (the backup job or the filter)
    initialises it; :class:`BlockCopyState` only claims, clears and rolls back bits.
    ``on_progress(done_bytes)`` is called after each successful task and ``on_remaining(bytes)`` after
    every task (remaining = dirty + in flight), as QEMU's progress meter.
    """

    def __init__(
        self,
        source: Child,
        target: Child,
        cluster_size: int,
        *,
        use_copy_range: bool = False,
        memory_budget: int = MEMORY_BUDGET,
    ) -> None:
        self.source = source
        self.target = target
        self.cluster_size = cluster_size
        size = source.node.size
        self.bitmap = DirtyBitmap(size, cluster_size)
        self.skip_unallocated = False
        #: Discard each source range once copied (blockdev-backup's discard-source).
        self.discard_source = False
        self.use_copy_range = use_copy_range
        #: Flags of data writes to the target (``WRITE_COMPRESSED`` for ``compress=true``).
        self.write_flags = RequestFlags(0)
        self.ratelimit = RateLimit(0)
        self.on_progress: Callable[[int], None] = lambda n: None
        self.on_remaining: Callable[[int], None] = lambda n: None
        self._tasks: list[_Task] = []
        #: The clusters of ``_tasks`` (set from claim to finish), so that "is anything being copied
        #: here?" is a bit test, not a walk of the tasks.
        self._busy = DirtyBitmap(size, cluster_size)
        self._in_flight_bytes = 0
        self._buffers = BufferPool(memory_budget)
        self._calls: set[CopyCall] = set()
        # The source's block status answers.  Valid for still-dirty clusters, the only ones asked about:
        # those cannot have been written since the backup started (every write copies its dirty clusters
        # first), so a guest writing all over the disk does not send every copy back to block status.
        self._status: ExtentCache[Status] = ExtentCache(capacity=STATUS_CACHE_EXTENTS)
        #: Set when the target reads as zeros everywhere not yet written (a fresh sparse file): zero
        #: clusters then need no write.  ``known_zero_init`` only says what a file was when it was opened
        #: (a node reused for a second backup has data since), so it is confirmed against the target's
        #: block status before the first copy; until then zeros are written.
        self.target_is_zero = False
        self._confirm_target_zero = bool(getattr(target.node, "known_zero_init", False))
        src_max = source.node.limits.max_transfer
        tgt_max = target.node.limits.max_transfer
        self.max_transfer = max(align_down(min(src_max, tgt_max), cluster_size), cluster_size)

    # ------------------------------------------------------------------ configuration

    @property
    def size(self) -> int:
        return self.source.node.size

    @property
    def in_flight_bytes(self) -> int:
        return self._in_flight_bytes

    def settled(self, start: int, end: int) -> bool:
        """Whether every cluster touching ``[start, end)`` is copied and none is being copied.

        A write there needs neither a copy nor a wait: :meth:`copy` over the range would return at once.
        The filter's fast path asks this for every guest write; whatever is copied or in flight
        elsewhere on the disk does not change the answer or its cost.
        """
        return self.bitmap.all_clean(start, end) and (not self._tasks or self._busy.all_clean(start, end))

    def remaining(self) -> int:
        """Bytes still to copy: dirty clusters plus those being copied.

        Counted as tasks count them, in bytes clamped to the disk: the bitmap counts whole clusters, so a
        dirty partial last cluster is counted for its bytes only (otherwise ``len`` would exceed the disk
        size until that cluster is copied, and stay so if the job fails first).
        """
        dirty = self.bitmap.count()
        size = self.size
        if size % self.cluster_size and self.bitmap.get(size - 1):
            dirty -= align_up(size, self.cluster_size) - size
        return dirty + self._in_flight_bytes

    def set_speed(self, speed: int) -> None:
        self.ratelimit.set_speed(speed)
        for call in self._calls:
            call.kick()

    def _chunk_limit(self, call: CopyCall) -> int:
        chunk = COPY_RANGE_CHUNK if self.use_copy_range else DEFAULT_CHUNK
        chunk = min(max(chunk, self.cluster_size), self.max_transfer)
        if call.max_chunk:
            chunk = min(chunk, max(align_down(call.max_chunk, self.cluster_size), self.cluster_size))
        return chunk

    # ------------------------------------------------------------------ public entry

    async def copy(self, call: CopyCall) -> None:
        """Copy every dirty cluster in the call's range; return when none is dirty or in flight there.

        Raises :class:`CopyError` on the first failed task (its clusters are dirty again) and
        :class:`CopyCancelled` if the call was cancelled.
        """
        if self._confirm_target_zero:
            self._confirm_target_zero = False
            self.target_is_zero = await self._target_reads_zero()
        self._calls.add(call)
        try:
            while True:
                found = await self._copy_dirty_clusters(call)
                if call.error is not None:
                    raise call.error
                if call.cancelled:
                    raise CopyCancelled()
                waited = await self._wait_one(call.offset, call.offset + call.length)
                if not found and not waited:
                    return
        finally:
            self._calls.discard(call)

    async def _target_reads_zero(self) -> bool:
        """True if the whole target is one zero extent (only asked before this state's first copy)."""
        try:
            ext = await self.target.node.block_status(0, self.size)
        except OSError:
            return False
        return ext.length == self.size and ext.is_zero and not ext.is_data

    async def _wait_one(self, start: int, end: int) -> bool:
        """Wait for one task in flight that overlaps ``[start, end)``; False if there is none."""
        for task in self._tasks:
            if task.offset < end and start < task.end:
                await task.done.wait()
                return True
        return False

    # ------------------------------------------------------------------ the copy loop

    async def _copy_dirty_clusters(self, call: CopyCall) -> bool:
        """One pass over the range, claiming and copying dirty areas.  True if anything was claimed."""
        start = align_down(call.offset, self.cluster_size)
        end = min(align_up(call.offset + call.length, self.cluster_size), self.size)
        limit = self._chunk_limit(call)
        found = False
        workers: set[asyncio.Task[None]] = set()
        pos = start
        try:
            while pos < end and not call.cancelled and call.error is None:
                area = self.bitmap.next_dirty_area(pos, end, limit)
                if area is None:
                    break
                task = self._claim(call, *area)
                found = True
                # A run that ended before the chunk limit is known to be short; a full chunk may go on.
                short = area[1] < min(limit, STATUS_MIN_RUN)
                classified = await self._classify(task, ask_status=not short)
                pos = task.end  # the task may have shrunk to one block-status extent
                if not classified:
                    continue
                # Charged at task start, zero clusters too (QEMU's rule).  Copies for a guest write
                # (ignore_ratelimit) never wait, but are charged all the same: the background copies
                # then wait for them, and the job as a whole keeps to its speed (block-copy.c).
                if not call.ignore_ratelimit:
                    delay = self.ratelimit.calculate_delay()
                    if delay > 0:
                        self._finish(task, ok=False)
                        pos = task.offset
                        await self._sleep(call, delay)
                        continue
                self.ratelimit.account(task.length)
                if len(workers) >= call.max_workers:
                    done, workers = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
                    for worker in done:
                        worker.result()  # re-raise anything that is not a copy error (a bug)
                    if call.error is not None:
                        self._finish(task, ok=False)
                        break
                if pos >= end and not workers:
                    # The last piece of the range: run it inline, no worker needed.
                    await self._run_task(task)
                else:
                    workers.add(asyncio.ensure_future(self._run_task(task)))
        finally:
            if workers:
                await asyncio.wait(workers)
        return found

    def _claim(self, call: CopyCall, offset: int, length: int) -> _Task:
        end = min(offset + length, self.size)
        # Claim whole clusters; the bitmap clamps the last partial cluster to the image end.
        self.bitmap.reset(offset, end - offset)
        self._busy.set(offset, end - offset)
        task = _Task(call, offset, end - offset)
        self._tasks.append(task)
        self._in_flight_bytes += task.length
        return task

    def _shrink(self, task: _Task, length: int) -> None:
        """Give back the tail of a task (its clusters become dirty again) and wake its waiters."""
        tail = task.length - length
        self.bitmap.set(task.offset + length, tail)
        self._busy.reset(task.offset + length, tail)
        self._in_flight_bytes -= tail
        task.length = length
        task.done.set()
        task.done = asyncio.Event()

    async def _classify(self, task: _Task, *, ask_status: bool = True) -> bool:
        """Choose the copy method from the source's block status; False if the task needs no copy.

        A task is cut to the first block-status extent (rounded down to clusters), so one task is all data,
        all zero or all unallocated.  Without ``ask_status`` and without a cached answer, the task is
        copied as data (see :data:`STATUS_MIN_RUN`), except where the status decides more than speed:
        sync=top's unallocated areas, and copy offloading (which would allocate holes).
        """
        cached = self._status.lookup(task.offset)
        if cached is not None:
            ext = Extent(task.offset, cached[0] - task.offset, cached[1])
        elif not ask_status and not self.skip_unallocated and not self.use_copy_range:
            return True
        else:
            try:
                # Ask about the rest of the disk, not just the task: the whole extent goes in the cache.
                ext = await self.source.node.block_status(task.offset, self.size - task.offset)
                self._status.add(ext.offset, ext.end, ext.flags)
            except OSError:
                # Unknown status: treat one task as data; the read will report a real error.
                ext = Extent(task.offset, task.length, Status.DATA | Status.ALLOCATED)
        usable = min(ext.end, task.end) - task.offset
        if ext.end < self.size:
            usable = align_down(usable, self.cluster_size)
        if usable <= 0:
            usable = self.cluster_size  # extent shorter than a cluster: copy the cluster as data
            flags = Status.DATA | Status.ALLOCATED
        else:
            flags = ext.flags
        if usable < task.length:
            self._shrink(task, usable)
        if self.skip_unallocated and not flags & Status.ALLOCATED:
            task.method = CopyMethod.SKIP
            self._finish(task, ok=True, count_progress=False)
            return False
        if flags & Status.ZERO:
            task.method = CopyMethod.SKIP if self.target_is_zero else CopyMethod.WRITE_ZEROES
        elif self.use_copy_range:
            task.method = CopyMethod.COPY_RANGE
        return True

    async def _sleep(self, call: CopyCall, delay_ns: int) -> None:
        """Sleep for the speed limit; a kick (cancel, new speed) ends it early.

        The kick is cleared only after waking, so one that arrived while the loop was busy elsewhere (in a
        block-status query, say) is not lost.
        """
        if not call.cancelled:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(call._kick.wait(), delay_ns / 1e9)
        call._kick.clear()

    async def _run_task(self, task: _Task) -> None:
        ok = False
        try:
            await self._do_copy(task)
            ok = True
            if self.discard_source and task.method is not CopyMethod.SKIP:
                # Best effort, as QEMU: a failed discard does not fail the copy.
                with contextlib.suppress(OSError):
                    await self.source.node.discard(task.offset, task.length)
        except CopyError as err:
            if task.call.error is None:
                task.call.error = err
            log.debug("copy of %d+%d failed: %s", task.offset, task.length, err)
        finally:
            self._finish(task, ok=ok)

    async def _do_copy(self, task: _Task) -> None:
        target = self.target.node
        offset, length = task.offset, task.length
        if task.method is CopyMethod.SKIP:
            return
        if task.method is CopyMethod.WRITE_ZEROES:
            await self._write_zeroes(offset, length)
            return
        if task.method is CopyMethod.COPY_RANGE:
            if await self._copy_range(offset, length):
                return
            task.method = CopyMethod.READ_WRITE
        buf = await self._buffers.get(length)
        try:
            await self._read_write(target, offset, buf)
        except asyncio.CancelledError:
            # A pool thread may still be reading into the buffer or writing from it: never again.
            await self._buffers.drop(buf)
            raise
        except BaseException:
            await self._buffers.put(buf)
            raise
        await self._buffers.put(buf)

    async def _read_write(self, target: BlockNode, offset: int, buf: memoryview) -> None:
        try:
            await self.source.node.read(offset, buf)
        except OSError as err:
            raise CopyError(err, is_read=True) from err
        if is_zero(buf):
            await self._write_zeroes(offset, len(buf))
            return
        # Zero clusters inside a data extent stay sparse too (only data runs are written).
        for run, n, zero in zero_runs(buf, self.cluster_size):
            if zero:
                await self._write_zeroes(offset + run, n)
            else:
                await _target_io(target.write(offset + run, buf[run : run + n], self.write_flags))

    async def _write_zeroes(self, offset: int, length: int) -> None:
        if not self.target_is_zero:
            await _target_io(self.target.node.write_zeroes(offset, length, RequestFlags.MAY_UNMAP))

    async def _copy_range(self, offset: int, length: int) -> bool:
        """Offload to copy_file_range between two local files; False (and stop trying) if impossible."""
        from cowbackup.block.copy_range import copy_file_range

        try:
            done = await copy_file_range(self.source.node, self.target.node, offset, length)
        except OSError as err:
            raise CopyError(err, is_read=False) from err
        if not done:
            self.use_copy_range = False
        return done

    def _finish(self, task: _Task, *, ok: bool, count_progress: bool = True) -> None:
        if not ok:
            self.bitmap.set(task.offset, task.length)
        self._busy.reset(task.offset, task.length)
        self._in_flight_bytes -= task.length
        self._tasks.remove(task)
        task.done.set()
        if ok and count_progress:
            self.on_progress(task.length)
        self.on_remaining(self.remaining())


async def _target_io(request: object) -> None:
    """Await a target request, marking its failure as a write error."""
    assert asyncio.iscoroutine(request)
    try:
        await request
    except OSError as err:
        raise CopyError(err, is_read=False) from err


def cluster_size_for(target: BlockNode, minimum: int = MIN_CLUSTER_SIZE) -> int:
    """The backup cluster size: max(minimum, target cluster size), as QEMU chooses it."""
    return max(minimum, target.limits.cluster_size)
