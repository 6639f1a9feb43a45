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

A guest write's first touch of a cluster -- its whole range still to copy, short enough for one task --
skips the loop: the range is claimed as one task at once, copied inline, and the call returns (QEMU's
block-copy per cluster; :meth:`BlockCopyState._claim_whole` says why no pass before or after is needed).

All state is owned by the event loop; no locks are needed because claiming happens without an ``await``
between finding a dirty area and clearing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from cowbackup.block._bitwords import CHUNK, M64, fill_bits, words_to_int, zero_words
from cowbackup.block.align import align_down, align_up
from cowbackup.block.bitmap import DirtyBitmap
from cowbackup.block.buffers import BufferPool
from cowbackup.block.copy_range import host_file
from cowbackup.block.errors import RequestError
from cowbackup.block.extent_cache import ExtentCache
from cowbackup.block.node import BlockNode, Child, Extent, RequestFlags, Status
from cowbackup.block.ratelimit import RateLimit
from cowbackup.block.threadpool import run_bulk
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
#: A buffered copy at least this long from a local file reads it, and finds its zero clusters, on the
#: bulk-copy thread (:func:`~cowbackup.block.threadpool.run_bulk`) while the loop writes other chunks to
#: the target through its node: a full backup from tmpfs copies about 1.3 times as fast.  Shorter
#: copies -- a guest write's clusters -- stay on the loop, where a hop would cost more than the read.
OFFLOAD_MIN = 512 * 1024


class CopyMethod(enum.Enum):
    READ_WRITE = "read-write"
    WRITE_ZEROES = "write-zeroes"
    SKIP = "skip"
    COPY_RANGE = "copy-range"


# The members as module constants, for the per-task path: on Python 3.11 every attribute of an Enum class
# goes through EnumType's __getattr__ hook (about a thousand instructions), a global is a dict lookup.
_READ_WRITE = CopyMethod.READ_WRITE
_WRITE_ZEROES = CopyMethod.WRITE_ZEROES
_SKIP = CopyMethod.SKIP
_COPY_RANGE = CopyMethod.COPY_RANGE


class CopyError(RequestError):
    """A copy failed.  ``is_read`` tells whether reading the source (True) or writing the target failed."""

    def __init__(self, cause: OSError, is_read: bool) -> None:
        super().__init__(cause.errno or errno.EIO, cause.strerror or str(cause))
        self.is_read = is_read
        self.__cause__ = cause


class CopyCancelled(Exception):
    """The call was cancelled before it finished its range (not an error of the copy)."""


class _BusyClusters:
    """The clusters of the tasks in flight, from claim to finish: a bit each, in a flat array of words.

    Not a :class:`DirtyBitmap`: what changes is one task's run of clusters, and what is asked is whether
    any of a guest request's few clusters is busy, so its count and summary levels would only cost --
    the one-cluster task of a guest write's first touch sets and clears a bit with one masked store.
    """

    __slots__ = ("_bits", "_shift", "_words")

    def __init__(self, size: int, cluster_size: int) -> None:
        self._shift = cluster_size.bit_length() - 1
        self._bits = -(-size // cluster_size)
        self._words = zero_words((self._bits + 63) >> 6)

    def mark(self, offset: int, length: int, busy: bool) -> None:
        """Mark the clusters touching ``[offset, offset+length)`` (non-empty, inside the disk)."""
        a = offset >> self._shift
        b = ((offset + length - 1) >> self._shift) + 1
        w = a >> 6
        if w == (b - 1) >> 6:
            mask = ((1 << (b - a)) - 1) << (a & 63)
            words = self._words
            words[w] = words[w] | mask if busy else words[w] & ~mask
        else:
            fill_bits(self._words, a, b, busy)

    def any(self, start: int, end: int) -> bool:
        """Whether a cluster touching ``[start, end)`` is busy (``end`` may lie past the disk)."""
        a = start >> self._shift
        b = min(((end - 1) >> self._shift) + 1, self._bits)
        if a >= b:
            return False
        words = self._words
        wa, wb = a >> 6, (b - 1) >> 6
        head = words[wa] >> (a & 63)
        if wa == wb:
            return bool(head & ((1 << (b - a)) - 1))
        if head or words[wb] & (M64 >> (63 - ((b - 1) & 63))):
            return True
        # Whole words between: a long request (a discard of the disk, say), C speed a chunk at a time.
        return any(words_to_int(words, w, min(w + CHUNK, wb)) for w in range(wa + 1, wb, CHUNK))


class _Task:
    """Clusters ``[offset, offset+length)`` claimed by one call.

    :meth:`wait` returns once they are settled (copied, or given back).  Most tasks are waited for by
    nobody, so the event behind it is made by the first waiter only.
    """

    __slots__ = ("_settled", "call", "length", "method", "offset")

    def __init__(self, call: CopyCall, offset: int, length: int) -> None:
        self.call = call
        self.offset = offset
        self.length = length
        self.method = _READ_WRITE
        self._settled: asyncio.Event | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length

    async def wait(self) -> None:
        """Wait until the clusters the task holds now are settled (or some of them given back)."""
        if self._settled is None:
            self._settled = asyncio.Event()
        await self._settled.wait()

    def wake(self) -> None:
        """Wake every :meth:`wait`; later ones wait for the next :meth:`wake`."""
        if self._settled is not None:
            self._settled.set()
            self._settled = None


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
    # Made on the first kick or sleep: a guest write's call, made for every first touch of a cluster,
    # does neither.
    _kick: asyncio.Event | None = None

    def cancel(self) -> None:
        self.cancelled = True
        self.kicked().set()

    def kick(self) -> None:
        """Wake the call if it sleeps for the speed limit (the limit changed)."""
        self.kicked().set()

    def kicked(self) -> asyncio.Event:
        """The event a kick sets, and a sleep for the speed limit waits for."""
        if self._kick is None:
            self._kick = asyncio.Event()
        return self._kick


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
        #: Bytes of the bitmap's last cluster past the end of the disk (see :meth:`remaining`).
        self._tail_pad = align_up(size, cluster_size) - size
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
        #: Calls copied as one task claimed at once, without the copy loop (:meth:`_claim_whole`).
        self.whole_calls = 0
        #: The clusters of ``_tasks`` (set from claim to finish), so that "is anything being copied
        #: here?" is a bit test, not a walk of the tasks.
        self._busy = _BusyClusters(size, cluster_size)
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
        return self.bitmap.all_clean(start, end) and (not self._tasks or not self._busy.any(start, end))

    def remaining(self) -> int:
        """Bytes still to copy: dirty clusters plus those being copied.

        Counted as tasks count them, in bytes clamped to the disk: the bitmap counts whole clusters, so a
        dirty partial last cluster is counted for its bytes only (otherwise ``len`` would exceed the disk
        size until that cluster is copied, and stay so if the job fails first).
        """
        dirty = self.bitmap.count()
        if self._tail_pad and self.bitmap.get(self.bitmap.size - 1):
            dirty -= self._tail_pad
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
        task = self._claim_whole(call)
        if task is not None:
            # Nothing to wait for before the task, and nothing left to copy or wait for after it: see
            # _claim_whole.
            await self._run_task(task)
            if call.error is not None:
                raise call.error
            if call.cancelled:
                raise CopyCancelled()
            return
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

    def _claim_whole(self, call: CopyCall) -> _Task | None:
        """The first touch of a guest write: the call's whole range as one task, claimed and classified,
        when every cluster of it is still to copy and it fits one task; None otherwise (the copy loop).

        What QEMU's block-copy does for a cluster, without the loop's second pass: a range all dirty
        is covered by no task in flight (a task's clusters are clean from its claim to its end), so
        there is nothing to wait for first; once the task ends, its clusters are copied -- nothing
        makes them dirty again but its own failure, which ends the call with the error -- and no other
        task can have claimed them meanwhile, so there is nothing to copy or wait for after it.  Only
        guest calls (no speed limit to wait for, no chunk limit) for a range the loop would copy as
        one short run (one cluster, always): its block status comes from the cache or not at all, as
        in the loop, and a cached answer that would cut the task short leaves the call to the loop,
        as do sync=top's scan of unallocated areas and copy offloading, which need the status.
        """
        if not call.ignore_ratelimit or call.max_chunk or call.cancelled:
            return None
        if self.skip_unallocated or self.use_copy_range:
            return None
        cluster = self.cluster_size
        start = call.offset - call.offset % cluster
        end = call.offset + call.length
        end -= end % -cluster  # rounded up to a cluster
        size = self.size
        if end > size:
            end = size
        length = end - start
        if length <= 0 or not self.bitmap.all_dirty(start, end):
            return None
        if length > cluster and length >= min(self._chunk_limit(call), STATUS_MIN_RUN):
            return None  # a long run: the loop asks its block status and may cut it into tasks
        method = _READ_WRITE
        cached = self._status.lookup(start)
        if cached is not None:
            ext_end, flags = cached
            if ext_end < end:
                return None  # _classify would shrink the task
            if flags & Status.ZERO:
                method = _SKIP if self.target_is_zero else _WRITE_ZEROES
        task = self._claim(call, start, length)
        task.method = method
        self.ratelimit.account(length)  # charged, never waited for (see _copy_dirty_clusters)
        self.whole_calls += 1
        return task

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
                await task.wait()
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
        """Claim ``[offset, offset+length)``: whole clusters, the last one cut at the end of the disk."""
        self.bitmap.reset(offset, length)
        self._busy.mark(offset, length, True)
        task = _Task(call, offset, length)
        self._tasks.append(task)
        self._in_flight_bytes += length
        return task

    def _shrink(self, task: _Task, length: int) -> None:
        """Give back the tail of a task (its clusters become dirty again) and wake its waiters."""
        tail = task.length - length
        self.bitmap.set(task.offset + length, tail)
        self._busy.mark(task.offset + length, tail, False)
        self._in_flight_bytes -= tail
        task.length = length
        task.wake()

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
            task.method = _SKIP
            self._finish(task, ok=True, count_progress=False)
            return False
        if flags & Status.ZERO:
            task.method = _SKIP if self.target_is_zero else _WRITE_ZEROES
        elif self.use_copy_range:
            task.method = _COPY_RANGE
        return True

    async def _sleep(self, call: CopyCall, delay_ns: int) -> None:
        """Sleep for the speed limit; a kick (cancel, new speed) ends it early.

        The kick is cleared only after waking, so one that arrived while the loop was busy elsewhere (in a
        block-status query, say) is not lost.
        """
        if not call.cancelled:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(call.kicked().wait(), delay_ns / 1e9)
        call.kicked().clear()

    async def _run_task(self, task: _Task) -> None:
        ok = False
        try:
            await self._do_copy(task)
            ok = True
            if self.discard_source and task.method is not _SKIP:
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
        method = task.method
        if method is _SKIP:
            return
        if method is _WRITE_ZEROES:
            await self._write_zeroes(offset, length)
            return
        if method is _COPY_RANGE:
            if await self._copy_range(offset, length):
                return
            task.method = _READ_WRITE
        buf = self._buffers.get_nowait(length)
        if buf is None:
            buf = await self._buffers.get(length)
        try:
            await self._read_write(target, offset, buf)
        except asyncio.CancelledError:
            # A pool thread may still be reading into the buffer or writing from it: never again.
            self._buffers.drop(buf)
            raise
        except BaseException:
            self._buffers.put(buf)
            raise
        self._buffers.put(buf)

    async def _read_write(self, target: BlockNode, offset: int, buf: memoryview) -> None:
        host = host_file(self.source.node) if len(buf) >= OFFLOAD_MIN else None
        if host is not None:
            try:
                runs = await run_bulk(_read_and_scan, host[0], host[1] + offset, buf, self.cluster_size)
            except OSError as err:
                raise CopyError(err, is_read=True) from err
            for run, n, zero in runs:
                if zero:
                    await self._write_zeroes(offset + run, n)
                else:
                    await _target_io(target.write(offset + run, buf[run : run + n], self.write_flags))
            return
        try:
            await self.source.node.read(offset, buf)
        except OSError as err:
            raise CopyError(err, is_read=True) from err
        if is_zero(buf):
            await self._write_zeroes(offset, len(buf))
            return
        if len(buf) <= self.cluster_size:
            # One cluster, not zero: nothing to split (the usual copy for a guest's write).
            try:
                await target.write(offset, buf, self.write_flags)
            except OSError as err:
                raise CopyError(err, is_read=False) from err
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
        self._busy.mark(task.offset, task.length, False)
        self._in_flight_bytes -= task.length
        self._tasks.remove(task)
        task.wake()
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


def _read_and_scan(fd: int, position: int, buf: memoryview, cluster_size: int) -> list[tuple[int, int, bool]]:
    """Fill ``buf`` from ``fd`` at ``position`` and split it into runs of zero and data clusters (on the
    bulk-copy thread: the system call and the memcmp both leave the loop free)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], position + done)
        if n == 0:
            raise OSError(errno.EIO, f"unexpected end of the source file at offset {position + done}")
        done += n
    if is_zero(buf):
        return [(0, len(buf), True)]
    return list(zero_runs(buf, cluster_size))


def cluster_size_for(target: BlockNode, minimum: int = MIN_CLUSTER_SIZE) -> int:
    """The backup cluster size: max(minimum, target cluster size), as QEMU chooses it."""
    return max(minimum, target.limits.cluster_size)
