"""``file`` and ``host_device``: a regular file or a host block device (QEMU's file-posix).

Options (both driver names take the same ones and accept both kinds of file):

==================  =========================================================================================
``filename``        path of the file or block device (required)
``read-only``       open ``O_RDONLY`` (default off)
``auto-read-only``  open ``O_RDONLY`` when ``O_RDWR`` fails with EACCES, EPERM or EROFS (default off); the
                    node is then read-only
``discard``         ``ignore`` (default): discards are dropped by the generic layer and write-zeroes never
                    deallocates; ``unmap``: discard punches holes, write-zeroes with ``MAY_UNMAP`` may too
``cache.direct``    open with ``O_DIRECT`` (default off); requests are then aligned to the logical block size
                    (``BLKSSZGET`` for block devices, 4096 for regular files) and bounced through page-aligned
                    buffers when the caller's memory is not aligned
``cache.no-flush``  flush does nothing (default off)
``force-share``,    as for every node (:mod:`cowbackup.block.drivers`); ``force-share`` has no effect
``detect-zeroes``
``aio``             ``threads`` only: every system call runs in the bounded I/O thread pool;
                    ``native`` and ``io_uring`` are refused
``locking``         ``auto`` (default) and ``off`` take no lock; ``on`` takes a ``flock`` on the open file
                    (exclusive when writable, shared when read-only) and fails if another opener conflicts.
                    Unlike QEMU's byte-range image locking this does not see QEMU's own locks.
==================  =========================================================================================

QEMU's ``aio-max-batch``, ``drop-cache``, ``pr-manager`` and ``x-check-cache-dropped`` are not supported (the
registry refuses them as unexpected).

Write-zeroes follows QEMU: with ``MAY_UNMAP`` and ``discard=unmap`` it punches a hole; otherwise it tries
``FALLOC_FL_ZERO_RANGE``, then (tmpfs has no ZERO_RANGE) punches a hole and allocates the range again with
a plain ``fallocate``: zeros without writing a byte, and the range stays allocated.  When the file system
supports none of these (remembered per node in ``has_punch_hole``/``has_zero_range``/``has_fallocate``) it
writes zero buffers, or fails with ENOTSUP under ``NO_FALLBACK``.
Linux implements both ``fallocate`` modes on block devices too, so no ``BLKZEROOUT``/``BLKDISCARD`` ioctls
are needed.

With ``cache.direct`` and a size that is not a multiple of the alignment, the padded last block is read with
zeros past the end of the file, and a write into it is followed by an ``ftruncate`` back to the size.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import logging
import mmap
import os
import stat
import time
from collections.abc import Callable

from cowbackup.block.errors import BlockError, RequestError
from cowbackup.block.extent_cache import ExtentCache
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode, Extent, RequestFlags, Status
from cowbackup.block.options import Options
from cowbackup.block.threadpool import run_blocking

log = logging.getLogger(__name__)

#: Why an ``auto-read-only`` file falls back to read-only: it may be read but not written.
_READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: ioctl returning the logical sector size of a block device (an int).
BLKSSZGET = 0x1268
#: request_alignment of regular files opened with O_DIRECT: a multiple of every logical block size in use.
DIRECT_ALIGNMENT = 4096

#: errnos meaning "this kind of request is not supported here"; the node remembers and stops trying.
_UNSUPPORTED = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})

_Fallocate = Callable[[int, int, int, int], int]


@functools.cache
def _libc_fallocate() -> _Fallocate | None:
    """libc's ``fallocate`` (``os.posix_fallocate`` takes no mode flags), or None when unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        func = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    result: _Fallocate = func
    return result


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call ``fallocate(2)``; raise OSError on failure (ENOTSUP when libc has no fallocate)."""
    func = _libc_fallocate()
    if func is None:
        raise OSError(errno.ENOTSUP, "fallocate is not available")
    if func(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


#: The status of data in a file, built once (an IntFlag | builds a new member each time).
_ALLOCATED_DATA = Status.DATA | Status.ALLOCATED
#: statfs f_type of file systems whose I/O never waits for a device (their pages live in memory).
_MEMORY_FS = frozenset({0x01021994, 0x858458F6})  # TMPFS_MAGIC, RAMFS_MAGIC
#: Requests up to this size may run on the event loop thread instead of the pool (see FileNode): a 1 MiB
#: copy from or to the page cache (~100 us) still costs less than a hop to the pool under load (50-150 us
#: of GIL hand-over).  NBD clients write 256 KiB requests, backups copy 1-4 MiB chunks.  (64 KiB on a
#: device measured a full backup from ext4 at 0.77 of qemu-storage-daemon's speed, 1 MiB at 0.87.)
INLINE_MAX = 1024 * 1024
#: A SEEK_HOLE on a file in memory slower than this sends the next SEEK_SLOW_STREAK to the thread pool.
#: 2 ms is ~500 MiB of data crossed; a hop to the pool costs 50-150 us of GIL hand-over under load, and
#: each extent is asked once (then cached), so a budget well above the hop's cost pays.
SEEK_INLINE_BUDGET_NS = 2_000_000
SEEK_SLOW_STREAK = 16
#: Buffered writes of whole pages up to INLINE_MAX to a file on a device are done on the event loop: the
#: page cache takes 4 KiB in a few microseconds, a hop to the pool costs ~50 (ext4 refuses RWF_NOWAIT
#: for buffered writes, so the kernel cannot be asked whether one would wait).  A write that takes
#: longer than WRITE_INLINE_BUDGET_NS (dirty-page throttling, a journal wait) sends the next writes to
#: the pool: WRITE_SLOW_STREAK of them, twice as many after each slow try, up to WRITE_SLOW_STREAK_MAX,
#: so a throttled device holds the loop up for one write now and then, not for every write.
WRITE_INLINE_BUDGET_NS = 1_000_000
WRITE_SLOW_STREAK = 64
WRITE_SLOW_STREAK_MAX = 64 * 1024
#: Partial pages are not written inline: one not in the page cache is read from the device first.
_PAGE_MASK = 4096 - 1
#: Local disk file systems, the only ones buffered writes are done inline on: a network or FUSE file
#: system can hang a write for as long as its server is away, and the loop would hang with it (in the
#: pool only that request waits).  ext2/3/4, XFS, Btrfs, F2FS, bcachefs, ZFS, JFS.
_LOCAL_DISK_FS = frozenset({0xEF53, 0x58465342, 0x9123683E, 0xF2F52010, 0xCA451A4E, 0x2FC12FC1, 0x3153464A})


def _fs_type(fd: int) -> int | None:
    """The ``f_type`` of the file system ``fd`` is on (``fstatfs(2)``'s first field), None if unknown."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        buf = ctypes.create_string_buffer(256)  # larger than struct statfs on every Linux ABI
        if libc.fstatfs(fd, buf) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], "little", signed=True)


def _memory_backed(fd: int) -> bool:
    """True when ``fd`` is on tmpfs or ramfs."""
    return _fs_type(fd) in _MEMORY_FS


def _address(view: memoryview) -> int | None:
    """Memory address of a writable buffer, or None when it cannot be known (read-only buffers)."""
    if view.readonly:
        return None
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None


class _AlignedBuffer:
    """A page-aligned anonymous mapping of ``n`` bytes, for O_DIRECT I/O from unaligned buffers."""

    def __init__(self, n: int) -> None:
        self._map = mmap.mmap(-1, n)
        self.view = memoryview(self._map)

    def __enter__(self) -> memoryview:
        return self.view

    def __exit__(self, *exc: object) -> None:
        self.view.release()
        self._map.close()


class FileNode(BlockNode):
    """An open file descriptor.  ``fd`` is owned by the node and closed by :meth:`close`.

    ``has_punch_hole``/``has_zero_range``/``has_fallocate``: cleared the first time the file system
    reports the fallocate mode unsupported, so later requests go straight to the fallback (tests clear
    them to force it).
    ``known_zero_init``: the file was one big hole when opened (a fresh sparse file); the copy engine then
    need not write zeros to it.  It describes the file *at open* and is not updated by writes.
    """

    driver_name = "file"

    def __init__(
        self,
        node_name: str,
        filename: str,
        fd: int,
        *,
        size: int,
        read_only: bool = False,
        is_block: bool = False,
        discard_unmap: bool = False,
        direct: bool = False,
        alignment: int = 1,
        no_flush: bool = False,
        known_zero_init: bool = False,
    ) -> None:
        super().__init__(node_name, read_only=read_only)
        self.filename = filename
        self.fd = fd
        self._size = size
        self.is_block = is_block
        self.discard_unmap = discard_unmap
        self.direct = self.cache_direct = direct
        self.no_flush = self.cache_no_flush = no_flush
        self.known_zero_init = known_zero_init
        self.limits.request_alignment = alignment
        self.has_punch_hole = True
        self.has_zero_range = True
        self.has_fallocate = True
        self.has_seek_data = not is_block
        self.has_rwf_dsync = hasattr(os, "RWF_DSYNC")
        # Small requests skip the thread pool (a hop costs ~50 us, a 4 KiB copy ~2 us) where they cannot
        # block: always on tmpfs/ramfs; reads elsewhere when RWF_NOWAIT finds the data in the page cache,
        # and buffered writes of whole pages while they stay fast (inline_writes).
        self.inline_all = not direct and not is_block and _memory_backed(fd)
        self.inline_max = INLINE_MAX
        self.has_rwf_nowait = hasattr(os, "RWF_NOWAIT") and not direct
        # Buffered writes of whole pages inline on a local disk file system too (WRITE_INLINE_BUDGET_NS);
        # not on a block device, whose writes a dead disk can hold up for good once its cache is full.
        self.inline_writes = not direct and not is_block and _fs_type(fd) in _LOCAL_DISK_FS
        self._pool_writes = 0  # writes still to send to the pool after a slow inline one
        self._write_streak = WRITE_SLOW_STREAK
        # Ranges known to hold data (QEMU keeps one; we keep several, see extent_cache).  Only data -- a stale
        # "data" answer is still correct for reads, even if someone changes the file behind our back,
        # while a stale "hole" would make a backup skip data -- and it is dropped when a zero-write or
        # discard touches it (those may punch holes).  Writes only ever turn holes into data.
        self._data_extents: ExtentCache[bool] = ExtentCache()
        self._slow_seeks = 0  # SEEK_HOLEs still to send to the pool (see _seek_in_memory)
        self._grow_lock = asyncio.Lock()

    def describe(self) -> dict[str, object]:
        return {"file": self.filename}

    def _needs_bounce(self, view: memoryview) -> bool:
        if not self.direct:
            return False
        addr = _address(view)
        return addr is None or addr % self.limits.request_alignment != 0

    # ------------------------------------------------------------------ read / write (in the pool)

    def _pread_all(self, offset: int, buf: memoryview) -> None:
        pos = 0
        while pos < len(buf):
            if offset + pos >= self._size:
                # Only the padding of an O_DIRECT tail block lies past the end: it reads as zeros.
                buf[pos:] = bytes(len(buf) - pos)
                return
            n = os.preadv(self.fd, [buf[pos:]], offset + pos)
            if n == 0:
                raise RequestError(
                    errno.EIO, f"unexpected end of '{self.filename}' at offset {offset + pos} (file shrank?)"
                )
            pos += n

    def _pwrite_all(self, offset: int, data: memoryview, fua: bool) -> None:
        rwflags = os.RWF_DSYNC if fua and self.has_rwf_dsync else 0
        pos = 0
        while pos < len(data):
            try:
                n = os.pwritev(self.fd, [data[pos:]], offset + pos, rwflags)
            except OSError as err:
                if not rwflags or err.errno not in _UNSUPPORTED:
                    raise
                self.has_rwf_dsync = False  # old kernel: fall back to fdatasync below
                rwflags = 0
                continue
            if n == 0:
                raise RequestError(errno.EIO, f"write to '{self.filename}' stalled at {offset + pos}")
            pos += n
        if offset + len(data) > self._size and not self.is_block:
            os.ftruncate(self.fd, self._size)  # padding of an O_DIRECT tail block grew the file
        if fua and not rwflags:
            os.fdatasync(self.fd)

    def _write_inline(self, offset: int, data: memoryview) -> None:
        """A buffered write on the event loop, timed: a slow one sends the next ones to the pool."""
        started = time.perf_counter_ns()
        self._pwrite_all(offset, data, False)
        if time.perf_counter_ns() - started > WRITE_INLINE_BUDGET_NS:
            self._pool_writes = self._write_streak
            self._write_streak = min(2 * self._write_streak, WRITE_SLOW_STREAK_MAX)
        else:
            self._write_streak = WRITE_SLOW_STREAK

    def _read_inline(self, offset: int, buf: memoryview) -> int:
        """Read what can be read without blocking; the number of bytes read (maybe 0)."""
        if self.inline_all:
            self._pread_all(offset, buf)
            return len(buf)
        if not self.has_rwf_nowait or offset + len(buf) > self._size:
            return 0
        try:
            return os.preadv(self.fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as err:
            if err.errno in _UNSUPPORTED:
                self.has_rwf_nowait = False
                return 0
            raise

    async def _do_read(self, offset: int, buf: memoryview) -> None:
        if self.inline_all and len(buf) <= self.inline_max and os.preadv(self.fd, (buf,), offset) == len(buf):
            return  # the usual request in memory: one preadv, no helper call (a short read goes on below)
        if len(buf) <= self.inline_max and not self.direct:
            done = self._read_inline(offset, buf)
            if done == len(buf):
                return
            offset, buf = offset + done, buf[done:]
        if self._needs_bounce(buf):
            with _AlignedBuffer(len(buf)) as bounce:
                await run_blocking(self._pread_all, offset, bounce)
                buf[:] = bounce
        else:
            await run_blocking(self._pread_all, offset, buf)

    async def _do_write(self, offset: int, data: memoryview, flags: RequestFlags) -> None:
        # The usual request in memory: one pwrite, no helper call.  A short write (unheard of on tmpfs)
        # is written again whole below: the same bytes at the same place.
        if (
            not flags
            and self.inline_all
            and len(data) <= self.inline_max
            and os.pwrite(self.fd, data, offset) == len(data)
        ):
            return
        fua = bool(flags) and bool(flags & RequestFlags.FUA)  # IntFlag's & is slow; bool() is int's
        if self.inline_all and len(data) <= self.inline_max:  # in memory a sync returns at once
            self._pwrite_all(offset, data, False)
            return
        whole_pages = not (offset | len(data)) & _PAGE_MASK
        if self.inline_writes and not fua and len(data) <= INLINE_MAX and whole_pages:
            if not self._pool_writes:
                self._write_inline(offset, data)
                return
            self._pool_writes -= 1
        if self._needs_bounce(data):
            with _AlignedBuffer(len(data)) as bounce:
                bounce[:] = data
                await run_blocking(self._pwrite_all, offset, bounce, fua)
        else:
            await run_blocking(self._pwrite_all, offset, data, fua)

    # ------------------------------------------------------------------ zeroing and discard

    async def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        """Run fallocate; False (and remember it when permanent) if the mode is not supported here."""
        try:
            if mode & FALLOC_FL_PUNCH_HOLE:
                inline = self.inline_all and self._cheap_punch(offset, length)
            else:
                inline = self.inline_all and length <= self.inline_max
            if inline:
                _fallocate(self.fd, mode, offset, length)
            else:
                await run_blocking(_fallocate, self.fd, mode, offset, length)
        except OSError as err:
            if err.errno in _UNSUPPORTED:
                if mode & FALLOC_FL_PUNCH_HOLE:
                    self.has_punch_hole = False
                elif mode & FALLOC_FL_ZERO_RANGE:
                    self.has_zero_range = False
                else:
                    self.has_fallocate = False
                return False
            if err.errno == errno.EINVAL:
                return False  # e.g. a block device and a range not aligned to its sectors
            raise
        return True

    def _cheap_punch(self, offset: int, length: int) -> bool:
        """In memory, punching a hole costs ~0.5 us per page that held data and ~2 us where there was
        none; the hop to the pool costs 50-150 us.  Punch inline what is short (as short writes are
        done inline) or holds no data at all (a zeroed range of a sparse copy: the usual case)."""
        if length <= self.inline_max:
            return True
        if not self.has_seek_data:
            return False
        hole = self._seek_data(offset, length)
        return hole is not None and not hole.flags & Status.DATA and hole.length >= length

    def _forget_extent(self, offset: int, length: int) -> None:
        self._data_extents.forget(offset, offset + length)

    async def _do_write_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        self._forget_extent(offset, length)
        done = False
        if flags & RequestFlags.MAY_UNMAP and self.discard_unmap and self.has_punch_hole:
            done = await self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        if not done and self.has_zero_range:
            done = await self._try_fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        if not done and self.has_punch_hole and self.has_fallocate:
            # QEMU's next resort, and what tmpfs offers: the range reads as zeros once punched, and
            # allocating it again keeps it allocated as a write-zeroes without unmap must.  An error of
            # the allocation (ENOSPC) fails the request; the range already reads as zeros.
            done = await self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            done = done and await self._try_fallocate(0, offset, length)
        if not done:
            # The base class writes zero buffers, or raises ENOTSUP under NO_FALLBACK.
            await super()._do_write_zeroes(offset, length, flags)
        elif flags & RequestFlags.FUA:
            await self._do_flush()

    async def _do_discard(self, offset: int, length: int) -> None:
        self._forget_extent(offset, length)
        if self.discard_unmap and self.has_punch_hole:
            await self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    async def _do_flush(self) -> None:
        if self.no_flush:
            return
        if self.inline_all:
            os.fdatasync(self.fd)  # tmpfs and ramfs have nothing to write back: no hop to the pool
        else:
            await run_blocking(os.fdatasync, self.fd)

    # ------------------------------------------------------------------ block status

    def _find_allocation(self, offset: int, length: int) -> Extent:
        """One ``SEEK_DATA`` (and maybe one ``SEEK_HOLE``) from ``offset``::

            in a hole:  |offset ....... data|xxxxxxx    -> ZERO up to the next data (ENXIO: up to EOF)
            in data:    |offset xxxxxxx hole|.......    -> DATA up to the next hole

        File systems without SEEK_DATA (EINVAL, ENOTSUP) report everything as data from then on.
        """
        return self._seek_data(offset, length) or self._seek_hole(offset, length)

    def _seek_data(self, offset: int, length: int) -> Extent | None:
        """The first half of :meth:`_find_allocation`: None when ``offset`` is in data."""
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:
                return Extent(offset, length, Status.ZERO)  # no data after offset: a hole to EOF
            if err.errno in _UNSUPPORTED or err.errno == errno.EINVAL:
                self.has_seek_data = False
                return Extent(offset, length, _ALLOCATED_DATA)
            raise
        if data > offset:
            return Extent(offset, min(data - offset, length), Status.ZERO)
        return None

    def _seek_hole(self, offset: int, length: int) -> Extent:
        """The second half of :meth:`_find_allocation`, for an ``offset`` in data."""
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
            hole = offset + length  # the file shrank under us: report data, reads will tell
        if hole <= offset:
            hole = offset + length  # changed between the two seeks: data is the safe answer
        return Extent(offset, min(hole - offset, length), _ALLOCATED_DATA)

    async def _seek_in_memory(self, offset: int, length: int) -> Extent:
        """:meth:`_find_allocation` for a file in memory, on the event loop where it is cheap.

        On tmpfs SEEK_DATA costs microseconds wherever it starts, but SEEK_HOLE walks every page of the
        data it crosses (~15 ms for 1 GiB).  Short data runs (a disk that guest writes have fragmented)
        are asked inline; once a SEEK_HOLE takes longer than SEEK_INLINE_BUDGET_NS, the next
        SEEK_SLOW_STREAK ones go to the thread pool, then inline is tried again.
        """
        ext = self._seek_data(offset, length)
        if ext is not None:
            return ext
        if self._slow_seeks:
            self._slow_seeks -= 1
            return await run_blocking(self._seek_hole, offset, length)
        started = time.perf_counter_ns()
        ext = self._seek_hole(offset, length)
        if time.perf_counter_ns() - started > SEEK_INLINE_BUDGET_NS:
            self._slow_seeks = SEEK_SLOW_STREAK
        return ext

    async def _do_block_status(self, offset: int, length: int) -> Extent:
        if not self.has_seek_data:
            return Extent(offset, length, _ALLOCATED_DATA)
        cached = self._data_extents.lookup(offset)
        if cached is not None:
            return Extent(offset, min(cached[0] - offset, length), _ALLOCATED_DATA)
        # Ask about the whole rest of the file once and keep the answer (a long SEEK_HOLE is costly).
        if self.inline_all:
            ext = await self._seek_in_memory(offset, self._size - offset)
        else:
            ext = await run_blocking(self._find_allocation, offset, self._size - offset)
        if ext.flags == _ALLOCATED_DATA:  # the only status of data _find_allocation gives
            self._data_extents.add(ext.offset, ext.end, True)
        return Extent(offset, min(ext.length, length), ext.flags)

    async def grow(self, size: int) -> None:
        """Make the file at least ``size`` bytes long; the new bytes are a hole (read as zeros).

        Never shrinks (a smaller ``size`` is a no-op), so requests in flight always stay in range.  Only
        regular files grow: a block device, or a node opened read-only, fails with ``ENOSPC`` / ``EPERM``
        (a format driver that needs room then fails the allocating request cleanly).
        """
        if size <= self._size:
            return
        self._check_open()
        if self.read_only:
            raise RequestError(errno.EPERM, f"Cannot grow read-only node '{self.node_name}'")
        if self.is_block:
            raise RequestError(
                errno.ENOSPC, f"Block device '{self.filename}' cannot grow to {size} bytes ({self._size})"
            )
        # One ftruncate at a time: a smaller one finishing last would shrink the file.  Never inline,
        # even on tmpfs: it waits for the inode lock that a large write in flight holds.
        async with self._grow_lock:
            if size <= self._size:
                return
            await run_blocking(os.ftruncate, self.fd, size)
            # Raise the size only once the file is that long: a concurrent read in range never sees EOF.
            self._size = size

    async def truncate(self, size: int) -> None:
        """Set the file's length to exactly ``size`` (growing with a hole, or shrinking).

        The caller guarantees that nothing past ``size`` is in use (a format driver trimming the room it
        grew ahead, at close).  Regular files only: ENOTSUP on a block device, EPERM read-only.
        """
        self._check_open()
        if self.read_only:
            raise RequestError(errno.EPERM, f"Cannot truncate read-only node '{self.node_name}'")
        if self.is_block:
            raise RequestError(errno.ENOTSUP, f"Cannot truncate block device '{self.filename}'")
        async with self._grow_lock:
            await run_blocking(os.ftruncate, self.fd, size)
            if size < self._size:
                self._forget_extent(size, self._size - size)
            self._size = size

    async def _do_close(self) -> None:
        await self.drain()  # worker threads may still use the fd number
        os.close(self.fd)


# ---------------------------------------------------------------------- opening and creating


def _lock(fd: int, filename: str, read_only: bool) -> None:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as err:
        what = 'shared "write"' if read_only else '"write"'
        raise BlockError(
            f"Failed to get {what} lock: Is another process using the image [{filename}]?"
        ) from err


def _probe(fd: int, filename: str, direct: bool) -> tuple[int, bool, int, bool]:
    """(size, is_block, alignment, known_zero_init) of an open file; BlockError if it is neither kind."""
    st = os.fstat(fd)
    is_block = stat.S_ISBLK(st.st_mode)
    if not is_block and not stat.S_ISREG(st.st_mode):
        raise BlockError(f"'file' driver requires '{filename}' to be a regular file or a block device")
    alignment = 1
    if is_block:
        size = os.lseek(fd, 0, os.SEEK_END)
        if direct:
            try:
                out = fcntl.ioctl(fd, BLKSSZGET, b"\0\0\0\0")
                alignment = int.from_bytes(out, "little") or DIRECT_ALIGNMENT
            except OSError:
                alignment = DIRECT_ALIGNMENT
        return size, True, alignment, False
    if direct:
        alignment = DIRECT_ALIGNMENT
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
        zero_init = False
    except OSError as err:
        zero_init = err.errno == errno.ENXIO  # no data anywhere: one hole (or empty)
    return st.st_size, False, alignment, zero_init


def _open(filename: str, read_only: bool, direct: bool, lock: bool) -> tuple[int, int, bool, int, bool]:
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    if direct:
        flags |= os.O_DIRECT
    try:
        fd = os.open(filename, flags)
    except OSError as err:
        raise BlockError(f"Could not open '{filename}': {err.strerror}") from err
    try:
        if lock:
            _lock(fd, filename, read_only)
        return (fd, *_probe(fd, filename, direct))
    except BaseException:
        os.close(fd)
        raise


async def open_node(graph: BlockGraph, node_name: str, opts: Options) -> BlockNode:
    """Open a ``file``/``host_device`` node (options in the module docstring)."""
    filename = opts.get_str("filename")
    base = opts.base
    read_only = base.read_only
    aio = opts.get_enum("aio", ("threads", "native", "io_uring"), "threads")
    if aio != "threads":
        raise BlockError(f"aio={aio} is not supported; cowbackup only implements aio=threads")
    locking = opts.get_enum("locking", ("auto", "on", "off"), "auto")
    try:
        fd, size, is_block, alignment, zero_init = await run_blocking(
            _open, filename, read_only, base.cache_direct, locking == "on"
        )
    except BlockError as err:
        # auto-read-only: a file we may not write is opened read-only (QEMU's bdrv_apply_auto_read_only).
        cause = err.__cause__
        if read_only or not base.auto_read_only or getattr(cause, "errno", None) not in _READ_ONLY_ERRNOS:
            raise
        read_only = True
        fd, size, is_block, alignment, zero_init = await run_blocking(
            _open, filename, read_only, base.cache_direct, locking == "on"
        )
    log.debug("opened %s: size=%d alignment=%d zero_init=%s", filename, size, alignment, zero_init)
    return FileNode(
        node_name,
        filename,
        fd,
        size=size,
        read_only=read_only,
        is_block=is_block,
        discard_unmap=base.discard_unmap,
        direct=base.cache_direct,
        alignment=alignment,
        no_flush=base.cache_no_flush,
        known_zero_init=zero_init,
    )


def create_file(path: str, size: int) -> None:
    """Create (or cut to empty and regrow) a sparse regular file of ``size`` bytes at ``path``.

    Whether an existing file may be replaced is the caller's decision.  Raises BlockError on failure.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise BlockError(f"Could not create '{path}': {err.strerror}") from err
    try:
        os.ftruncate(fd, 0)  # drop old blocks, so the new file is all hole
        os.ftruncate(fd, size)
    except OSError as err:
        raise BlockError(f"Could not resize '{path}' to {size} bytes: {err.strerror}") from err
    finally:
        os.close(fd)
