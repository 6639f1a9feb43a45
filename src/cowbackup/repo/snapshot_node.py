"""A repository snapshot's disk as a read-only block node: what ``cowbackup serve --repo`` exports.

Reads map byte ranges to chunk positions (``offset // chunk_size``), look each position up in its index
segment and fetch the chunk; a zero entry reads as zeros and is stored nowhere.  Block status reports
zero chunks as ``ZERO`` without ``DATA`` (NBD ``base:allocation``: hole + zero), every other chunk as
data::

    disk        | chunk 0 | chunk 1 | chunk 2 | chunk 3 | ...       one index entry per chunk position
    index       |  id a   |  zero   |  zero   |  id b   |
    status      |  data   |     hole, zero    |  data   |

Memory is bounded whatever the size of the disk:

* decoded chunks are kept in an LRU cache keyed by chunk id (so deduplicated positions share one copy),
  limited to ``cache_bytes``; a chunk larger than the whole budget is simply not kept;
* index segments are loaded when a position in them is first needed and kept in an LRU of at most
  ``max_segments`` (a 16 TiB disk has 256 segments of 16384 entries; none is loaded up front);
* beyond the caches, only the chunks of requests in flight are held.

Fetching (a store ``get``) and unsealing (authenticate, decompress, length check) run in the node's own
bounded thread pool, never on the event loop.  Concurrent requests for the same chunk or segment share
one fetch; a requester that goes away (its connection dropped) does not cancel the fetch for the others.

A chunk or index segment that is missing or corrupt fails the read of its range with ``EIO`` (a
:class:`~cowbackup.block.errors.RequestError`, which the NBD server turns into an error reply) and is not
cached, so every other range keeps reading normally.  Block status over a segment that cannot be read
answers "data" (unknown), so a client mapping the disk still gets a whole map and meets the error on
reading that range.

The node never writes: writes are refused by the generic layer (``read_only``).  A writable view is a
qcow2 overlay whose backing node is this one (``cowbackup serve --overlay``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from cowbackup.block.errors import RequestError
from cowbackup.block.node import BlockNode, Extent, Limits, Status
from cowbackup.repo.errors import CorruptObject, RepoError
from cowbackup.repo.index import Entry
from cowbackup.repo.manifest import DiskRecord
from cowbackup.repo.repository import Repository, snapshot_name
from cowbackup.repo.workers import default_workers

log = logging.getLogger(__name__)

#: Default byte budget of decoded chunks kept in memory (``serve --cache-size``).
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
#: Default number of index segments kept in memory (16384 entries each: up to ~3 MiB of entries).
DEFAULT_MAX_SEGMENTS = 4

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Loader(Generic[K, V]):
    """An LRU cache bounded by a total cost, with one shared load per key in flight.

    ``cost(value)`` is what a value counts against ``budget``.  Loads run as ``load(key)`` in ``pool``;
    their failures are not cached.  Touched only from the event loop.
    """

    def __init__(
        self,
        pool: concurrent.futures.Executor,
        load: Callable[[K], V],
        cost: Callable[[V], int],
        budget: int,
    ) -> None:
        self._pool = pool
        self._load = load
        self._cost = cost
        self.budget = budget
        #: Loaded values, least recently used first.
        self._values: OrderedDict[K, V] = OrderedDict()
        #: Loads in flight: every requester of the key awaits the same future.
        self._loading: dict[K, asyncio.Future[V]] = {}
        self.used = 0
        #: Loads started (for tests and statistics: a hit or a shared load starts none).
        self.loads = 0

    def peek(self, key: K) -> V | None:
        """The cached value (marked recently used), or None."""
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    async def get(self, key: K) -> V:
        value = self.peek(key)
        if value is not None:
            return value
        fut = self._loading.get(key)
        if fut is None:
            self.loads += 1
            fut = asyncio.get_running_loop().run_in_executor(self._pool, self._load, key)
            self._loading[key] = fut
            fut.add_done_callback(lambda f: self._loaded(key, f))
        # shield: a cancelled requester must not cancel the load the others are waiting for.
        return await asyncio.shield(fut)

    def _loaded(self, key: K, fut: asyncio.Future[V]) -> None:
        del self._loading[key]
        if fut.cancelled() or fut.exception() is not None:
            return  # exception() also marks it retrieved when every requester went away
        self._put(key, fut.result())

    def _put(self, key: K, value: V) -> None:
        cost = self._cost(value)
        if cost > self.budget:
            return
        self._values[key] = value
        self.used += cost
        while self.used > self.budget:
            _, old = self._values.popitem(last=False)
            self.used -= self._cost(old)

    def clear(self) -> None:
        self._values.clear()
        self.used = 0


class SnapshotNode(BlockNode):
    """The disk ``disk`` of snapshot ``snapshot_id`` in ``repo`` (opened with its key), read-only.

    ``cache_bytes`` bounds the decoded chunks kept, ``max_segments`` the index segments kept,
    ``workers`` the fetch threads (0: the repository's default).  Raises CorruptObject (naming the
    manifest) when the disk record is inconsistent, RepoUsageError without the key.
    """

    driver_name = "cowbackup-snapshot"

    def __init__(
        self,
        node_name: str,
        repo: Repository,
        snapshot_id: str,
        disk: DiskRecord,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_segments: int = DEFAULT_MAX_SEGMENTS,
        workers: int = 0,
    ) -> None:
        super().__init__(node_name, read_only=True)
        repo.require_key()
        _check_disk(snapshot_id, disk)
        self.repo = repo
        self.snapshot_id = snapshot_id
        self.disk = disk
        self.chunk_size = disk.chunk_size
        self._size = disk.size
        self.limits = Limits(request_alignment=1)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            workers or default_workers(), thread_name_prefix="cowbackup-snapshot"
        )
        #: Decoded chunks by entry (id, stored size and checksum: a chunk is only ever read as the
        #: index describes it) -> plaintext, at most ``cache_bytes`` of them.
        self.chunks: _Loader[tuple[Entry, int], bytes] = _Loader(
            self._pool, self._read_chunk, len, cache_bytes
        )
        #: Index segments by number -> entries, at most ``max_segments`` of them (each costs 1).
        self.segments: _Loader[int, list[Entry]] = _Loader(
            self._pool, self._read_segment, lambda _entries: 1, max(1, max_segments)
        )

    def describe(self) -> dict[str, object]:
        return {
            "file": f"{self.repo.store.location}::{self.snapshot_id}:{self.disk.name}",
            "snapshot": self.snapshot_id,
            "disk": self.disk.name,
        }

    # ------------------------------------------------------------------ loading (worker threads)

    def _read_chunk(self, key: tuple[Entry, int]) -> bytes:
        entry, length = key
        return self.repo.read_chunk(entry, length)

    def _read_segment(self, number: int) -> list[Entry]:
        return self.repo.read_index(self.disk.segments[number])

    # ------------------------------------------------------------------ lookups (event loop)

    async def _segment(self, number: int) -> list[Entry]:
        try:
            return await self.segments.get(number)
        except RepoError as err:
            first = number * self.disk.segment_entries * self.chunk_size
            raise self._io_error(f"index segment {number} (from offset {first})", err) from err

    async def _chunk(self, position: int) -> bytes | None:
        """The plaintext of the chunk at ``position``, or None for a zero chunk."""
        per = self.disk.segment_entries
        entry = (await self._segment(position // per))[position % per]
        if entry.is_zero:
            return None
        start = position * self.chunk_size
        length = min(self.chunk_size, self._size - start)
        try:
            return await self.chunks.get((entry, length))
        except RepoError as err:
            raise self._io_error(f"chunk at offset {start}", err) from err

    async def fetch_chunk(self, position: int) -> bytes | None:
        """The plaintext of the chunk at ``position`` (None: a zero chunk) for a one-pass copy: a cached
        copy is used, but one read now is not kept -- a restore going through the whole disk would only
        evict what readers use.  RequestError (EIO) if it cannot be read."""
        per = self.disk.segment_entries
        entry = (await self._segment(position // per))[position % per]
        if entry.is_zero:
            return None
        start = position * self.chunk_size
        key = (entry, min(self.chunk_size, self._size - start))
        cached = self.chunks.peek(key)
        if cached is not None:
            return cached
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._read_chunk, key)
        except RepoError as err:
            raise self._io_error(f"chunk at offset {start}", err) from err

    def _io_error(self, what: str, err: RepoError) -> RequestError:
        message = f"snapshot {self.snapshot_id[:8]} disk '{self.disk.name}': {what}: {err}"
        log.warning("%s", message)
        return RequestError(errno.EIO, message)

    # ------------------------------------------------------------------ driver hooks

    async def _do_read(self, offset: int, buf: memoryview) -> None:
        cs = self.chunk_size
        end = offset + len(buf)

        async def one(position: int) -> None:
            start = position * cs
            lo, hi = max(offset, start), min(end, start + cs)
            data = await self._chunk(position)
            if data is None:
                buf[lo - offset : hi - offset] = _zeros(hi - lo)
            else:
                buf[lo - offset : hi - offset] = memoryview(data)[lo - start : hi - start]

        first, last = offset // cs, (end - 1) // cs
        if first == last:
            await one(first)
            return
        # Every chunk of the request at once; wait for all of them (none may write into ``buf`` once
        # we have returned), then fail with the first error.
        results = await asyncio.gather(*(one(p) for p in range(first, last + 1)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _do_block_status(self, offset: int, length: int) -> Extent:
        cs = self.chunk_size
        per = self.disk.segment_entries
        position = offset // cs
        number = position // per
        seg_first = number * per
        # Never past this segment: the next one is loaded only when someone asks about it.
        stop = min(-(-(offset + length) // cs), seg_first + per)
        try:
            entries = await self._segment(number)
        except RequestError:
            # Unknown: data.  A read of the range reports the error.
            return Extent(offset, min(offset + length, stop * cs) - offset, Status.DATA | Status.ALLOCATED)
        zero = entries[position - seg_first].is_zero
        p = position + 1
        while p < stop and entries[p - seg_first].is_zero == zero:
            p += 1
        n = min(offset + length, p * cs) - offset
        return Extent(offset, n, Status.ZERO if zero else Status.DATA | Status.ALLOCATED)

    async def _do_close(self) -> None:
        await self.drain()
        self.chunks.clear()
        self.segments.clear()
        # Fetches of requesters that went away may still run; let them end without waiting for them.
        self._pool.shutdown(wait=False, cancel_futures=True)


def _check_disk(snapshot_id: str, disk: DiskRecord) -> None:
    """The disk record's numbers agree with each other, so every position maps to one index entry."""
    name = snapshot_name(snapshot_id)
    if disk.size < 0 or disk.chunk_size <= 0 or disk.segment_entries <= 0:
        raise CorruptObject(name, f"disk '{disk.name}': bad size, chunk size or segment length")
    positions = disk.positions
    if len(disk.segments) != -(-positions // disk.segment_entries):
        raise CorruptObject(
            name, f"disk '{disk.name}': {len(disk.segments)} index segments for {positions} chunks"
        )
    for i, seg in enumerate(disk.segments):
        expected = min(disk.segment_entries, positions - i * disk.segment_entries)
        if seg.entries != expected:
            raise CorruptObject(
                name, f"disk '{disk.name}': index segment {i} has {seg.entries} entries, not {expected}"
            )


def _zeros(length: int) -> bytes:
    """Zeros for a zero chunk's range (one shared buffer per length, as chunks have few lengths)."""
    return (
        _ZEROS.get(length) or _ZEROS.setdefault(length, bytes(length)) if len(_ZEROS) < 8 else bytes(length)
    )


_ZEROS: dict[int, bytes] = {}
