"""Writing snapshots: read disks chunk by chunk, store what the repository lacks, commit the manifest.

A :class:`BackupRun` is one backup session::

    run = await BackupRun.start(repo)          session record, wait out sweeps, load the chunk cache
    disk = await run.write_disk("disk0", node)  per disk: chunks, then index and refs segments
    snap = await run.commit(name, [disk])       sync, then the manifest (the commit point)
    await run.close()                           end the session (always; a run not committed leaves
                                                only garbage for gc)

Per chunk position: block status says it is a hole or reads as zeros -> a zero entry, nothing read.
Otherwise the chunk is read into a pooled buffer, and a worker thread checks it for zeros, hashes it,
and -- unless the id is known (cache, or stored earlier in this run) -- compresses, encrypts and
uploads it with put-if-absent.  Identical chunks in flight at once are stored once: the first claims
the id, the others wait for its entry.  Memory is bounded by the window of chunks in flight and one
index segment.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from cowbackup.block.node import BlockNode
from cowbackup.block.ratelimit import RateLimit
from cowbackup.block.zero import is_zero
from cowbackup.repo import blob, crypto, gc
from cowbackup.repo.blob import Kind
from cowbackup.repo.cache import ChunkCache
from cowbackup.repo.errors import CorruptObject, MissingObject, RepoError
from cowbackup.repo.index import ENTRY, ZERO_ENTRY, Entry, SegmentBuilder
from cowbackup.repo.manifest import DiskRecord, Manifest, SegmentRef, check_disk_name, check_snapshot_name
from cowbackup.repo.repository import Repository, chunk_name, index_name, refs_name
from cowbackup.repo.sessions import Session
from cowbackup.repo.store import RequestCounts
from cowbackup.repo.workers import default_workers, first_error, retain_freed_memory, utc_now

#: Called with the number of bytes of the disk just dealt with.
Progress = Callable[[int], None]
#: For incremental backups: is anything in ``[offset, offset + length)`` changed since the parent?
DirtyTest = Callable[[int, int], bool]


@dataclass
class DiskStats:
    size: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0
    reused_bytes: int = 0
    chunks: int = 0
    new_chunks: int = 0
    new_stored_bytes: int = 0
    stored_bytes: int = 0
    healed_chunks: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Claims:
    """Ids being stored right now, so that a chunk met twice at once is stored once."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: dict[bytes, concurrent.futures.Future[bytes]] = field(default_factory=dict)


class BackupRun:
    """One backup session into ``repo`` (see the module docstring for the life cycle)."""

    def __init__(
        self, repo: Repository, session: Session, cache: ChunkCache, workers: int, level: int | None
    ):
        self.repo = repo
        self.store = repo.store
        self.session = session
        self.cache = cache
        self.known = cache.known
        self.level = repo.level if level is None else level
        self.workers = workers
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="cowbackup-repo")
        self._claims = _Claims()
        self._stats_lock = threading.Lock()
        self._buffers: list[bytearray] = []
        self._closed = False
        #: The snapshot's time: when the backup started reading, not when it committed (retention and
        #: ``latest`` order snapshots by the instant they show).
        self.started_at = utc_now()
        #: The store's request counts when the session began (the manifest records what the run sent).
        self._requests_before = self.store.requests.snapshot()

    @classmethod
    async def start(
        cls, repo: Repository, *, use_cache: bool = True, workers: int = 0, level: int | None = None
    ) -> BackupRun:
        repo.require_key()
        retain_freed_memory()
        before = repo.store.requests.snapshot()
        loop = asyncio.get_running_loop()
        session = await loop.run_in_executor(None, Session, repo.store)
        try:
            state = await loop.run_in_executor(None, gc.wait_for_sweeps, repo.store, session.started)
            cache = ChunkCache(repo, enabled=use_cache)
            await loop.run_in_executor(None, cache.load, state)
        except BaseException:
            await loop.run_in_executor(None, session.end)
            raise
        run = cls(repo, session, cache, workers or default_workers(), level)
        run._requests_before = before
        return run

    async def _run(self, func: Callable[..., bytes], *args: object) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(self._pool, func, *args)

    # -- one disk ---------------------------------------------------------------------------------

    async def write_disk(
        self,
        name: str,
        node: BlockNode,
        *,
        source: str = "",
        parent: DiskRecord | None = None,
        dirty: DirtyTest | None = None,
        changes: dict[str, object] | None = None,
        progress: Progress | None = None,
        limit: RateLimit | None = None,
    ) -> DiskRecord:
        """Store disk ``name`` read from ``node``; its record for the manifest.

        With ``parent`` and ``dirty`` (an incremental), a position that ``dirty`` calls clean takes the
        parent's entry without being read, and a segment with no dirty position is the parent's segment.
        ``limit``: every chunk read is charged to it, and waits for it (a backup's ``speed``).
        """
        check_disk_name(name)
        size = node.size
        cs = self.repo.config.chunk_size
        per_segment = self.repo.config.segment_entries
        positions = -(-size // cs)
        stats = DiskStats(size=size)
        report = progress or (lambda _n: None)
        usable_parent = (
            parent
            if parent is not None
            and dirty is not None
            and parent.size == size
            and parent.chunk_size == cs
            and parent.segment_entries == per_segment
            else None
        )
        segments: list[SegmentRef] = []
        for s in range(-(-positions // per_segment)):
            first = s * per_segment
            count = min(per_segment, positions - first)
            start, end = first * cs, min(size, (first + count) * cs)
            if usable_parent is not None and dirty is not None and not dirty(start, end - start):
                segments.append(usable_parent.segments[s])
                stats.reused_bytes += end - start
                report(end - start)
                continue
            builder = SegmentBuilder(count)
            incremental = False
            if usable_parent is not None:
                # Every position starts as the parent's; the dirty ones are overwritten below.
                parent_plain = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self.repo.read_index_plaintext, usable_parent.segments[s]
                )
                builder.set_all(parent_plain)
                incremental = True
            await self._write_positions(
                node, first, count, builder, incremental, dirty, stats, report, limit or RateLimit()
            )
            segments.append(await self._store_segment(builder))
        return self._record(name, size, segments, changes, stats, source)

    async def store_chunk(self, data: memoryview, stats: DiskStats) -> bytes:
        """The packed index entry of one chunk's ``data``, stored if the repository lacks it -- for
        targets that are handed their chunks one by one (a backup job's repository target node).
        ``data`` must stay untouched until this returns."""
        return await self._run(self._store_chunk, data, stats)

    async def finish_disk(
        self,
        name: str,
        size: int,
        written: dict[int, bytes],
        stats: DiskStats,
        *,
        parent: DiskRecord | None = None,
        changes: dict[str, object] | None = None,
        source: str = "",
    ) -> DiskRecord:
        """The record of a disk whose chunks were given one by one: ``written`` maps positions to packed
        entries; a position never written reads as zeros, or -- with ``parent`` (an incremental) -- as the
        parent's.  A segment with no written position is the parent's segment, not even read."""
        check_disk_name(name)
        cs = self.repo.config.chunk_size
        per_segment = self.repo.config.segment_entries
        positions = -(-size // cs)
        if parent is not None and (
            parent.size != size or parent.chunk_size != cs or parent.segment_entries != per_segment
        ):
            raise RepoError(
                f"disk '{name}': the parent's geometry differs; an incremental cannot build on it"
            )
        touched: dict[int, list[tuple[int, bytes]]] = {}
        for pos, packed in written.items():
            touched.setdefault(pos // per_segment, []).append((pos, packed))
        segments: list[SegmentRef | None] = []
        work = []
        for s in range(-(-positions // per_segment)):
            first = s * per_segment
            count = min(per_segment, positions - first)
            seg_bytes = min(size, (first + count) * cs) - first * cs
            changed = touched.get(s, [])
            if parent is not None and not changed:
                segments.append(parent.segments[s])
                stats.reused_bytes += seg_bytes
                continue
            if parent is not None:
                stats.reused_bytes += seg_bytes - sum(min(cs, size - pos * cs) for pos, _ in changed)
            base = parent.segments[s] if parent is not None else None
            work.append((len(segments), base, first, count, changed))
            segments.append(None)
        # The touched segments are built and stored at once, each in a worker (hashing, compression and
        # encryption release the GIL).
        loop = asyncio.get_running_loop()
        built = await asyncio.gather(
            *(loop.run_in_executor(self._pool, self._merge_segment, *w[1:]) for w in work)
        )
        for (at, *_), ref in zip(work, built, strict=True):
            segments[at] = ref
        return self._record(name, size, [s for s in segments if s is not None], changes, stats, source)

    def _merge_segment(
        self, parent: SegmentRef | None, first: int, count: int, changed: list[tuple[int, bytes]]
    ) -> SegmentRef:
        """In a worker thread: store the segment of ``count`` positions from ``first`` that is the
        ``parent`` segment (or zeros) with the ``changed`` positions' packed entries put in."""
        builder = SegmentBuilder(count)
        if parent is not None:
            builder.set_all(self.repo.read_index_plaintext(parent))
        for pos, packed in changed:
            builder.set_packed(pos - first, packed)
        return self._store_segment_sync(builder)

    def _record(
        self,
        name: str,
        size: int,
        segments: list[SegmentRef],
        changes: dict[str, object] | None,
        stats: DiskStats,
        source: str,
    ) -> DiskRecord:
        return DiskRecord(
            name=name,
            size=size,
            chunk_size=self.repo.config.chunk_size,
            segment_entries=self.repo.config.segment_entries,
            segments=segments,
            changes=dict(changes) if changes else {"method": "full"},
            stats=stats.as_dict(),
            source=source,
        )

    async def _write_positions(
        self,
        node: BlockNode,
        first: int,
        count: int,
        builder: SegmentBuilder,
        incremental: bool,
        dirty: DirtyTest | None,
        stats: DiskStats,
        report: Progress,
        limit: RateLimit,
    ) -> None:
        """Fill ``builder``: every position read and stored, or -- ``incremental``, the builder holding
        the parent's entries -- only those ``dirty`` calls changed."""
        cs = self.repo.config.chunk_size
        size = node.size
        window = asyncio.Semaphore(self.workers + 2)

        async def one(i: int, offset: int, length: int) -> None:
            try:
                # In an incremental a dirty chunk was written since the parent: almost always data, so
                # it is read at once (one request, not a block status query first); one that reads as
                # zeros is found so by its bytes, with the same entry and stats.
                if not incremental and await _reads_as_zero(node, offset, length):
                    builder.set_packed(i, ZERO_ENTRY)  # over the parent's entry, in an incremental
                    with self._stats_lock:
                        stats.zero_bytes += length
                else:
                    packed = await self._read_and_store(node, offset, length, stats)
                    builder.set_packed(i, packed)
                report(length)
            finally:
                window.release()

        def clean_until(end: int) -> None:
            """Positions up to ``end`` are clean: the parent's entries stay, no read, no task; a run of
            them is counted and reported at once (most positions of an incremental)."""
            clean = min(size, end * cs) - min(size, done * cs)
            if clean > 0:
                with self._stats_lock:
                    stats.reused_bytes += clean
                report(clean)

        done = first  # positions before this one are dealt with
        try:
            async with asyncio.TaskGroup() as tasks:
                for pos in self._positions_to_read(first, count, size, dirty if incremental else None):
                    clean_until(pos)
                    offset = pos * cs
                    await window.acquire()
                    length = min(cs, size - offset)
                    delay = limit.calculate_delay()
                    if delay:  # the slice's quota is spent: its end admits the next read
                        await asyncio.sleep(delay / 1e9)
                    limit.account(length)
                    tasks.create_task(one(pos - first, offset, length))
                    done = pos + 1
                clean_until(first + count)
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    def _positions_to_read(self, first: int, count: int, size: int, dirty: DirtyTest | None) -> Iterator[int]:
        """The positions of ``[first, first + count)`` to read, in order: all of them, or only those
        ``dirty`` calls changed -- found by halving the ranges it calls dirty, so that a clean range
        costs one test whatever its length (an incremental's few changes cost ~log2(count) tests each)."""
        if dirty is None:
            yield from range(first, first + count)
            return
        cs = self.repo.config.chunk_size
        ranges = [(first, first + count)]
        while ranges:
            lo, hi = ranges.pop()
            start = lo * cs
            if not dirty(start, min(size, hi * cs) - start):
                continue
            if hi - lo == 1:
                yield lo
                continue
            mid = (lo + hi) // 2
            ranges += [(mid, hi), (lo, mid)]  # the lower half first

    async def _read_and_store(self, node: BlockNode, offset: int, length: int, stats: DiskStats) -> bytes:
        buf = self._buffers.pop() if self._buffers else bytearray(self.repo.config.chunk_size)
        view = memoryview(buf)[:length]
        await node.read(offset, view)
        packed = await self._run(self._store_chunk, view, stats)
        # Only now back to the pool: if we were cancelled above, a worker thread may still be hashing
        # or sealing this buffer, and new data in it would be stored under the old id.
        self._buffers.append(buf)
        return packed

    def _store_chunk(self, data: memoryview, stats: DiskStats) -> bytes:
        """In a worker thread: the packed index entry of ``data``, stored if the repository lacks it."""
        if is_zero(data):
            with self._stats_lock:
                stats.zero_bytes += len(data)
            return ZERO_ENTRY
        cid = self.repo.hash(data)
        packed = self.known.get(cid)
        if packed is None:
            packed = self._claim_and_store(cid, data, stats)
        with self._stats_lock:
            stats.data_bytes += len(data)
            stats.chunks += 1
            stats.stored_bytes += ENTRY.unpack(packed)[1]
        return packed

    def _claim_and_store(self, cid: bytes, data: memoryview, stats: DiskStats) -> bytes:
        claims = self._claims
        with claims.lock:
            known = self.known.get(cid)
            if known is not None:  # stored by another thread since our first look
                return known
            future = claims.pending.get(cid)
            mine = future is None
            if future is None:
                future = claims.pending[cid] = concurrent.futures.Future()
        if not mine:
            return future.result()
        try:
            packed = self._store_new(cid, data, stats)
        except BaseException as err:
            future.set_exception(err)
            with claims.lock:
                del claims.pending[cid]
            raise
        with claims.lock:  # known from now on: the claim has done its job (and must not pile up)
            self.known[cid] = packed
            del claims.pending[cid]
        future.set_result(packed)
        return packed

    def _store_new(self, cid: bytes, data: memoryview, stats: DiskStats) -> bytes:
        name = chunk_name(cid)
        stored = self.repo.seal(Kind.CHUNK, cid, data, self.level)
        if self.store.put_if_absent(name, stored, durable=False):
            with self._stats_lock:
                stats.new_chunks += 1
                stats.new_stored_bytes += len(stored)
            return ENTRY.pack(cid, len(stored), blob.stored_checksum(stored))
        # Stored by someone else (another disk, host, or an earlier run whose cache we lack): use their
        # copy if it is sound, else replace it with ours -- a backup heals what verify would flag.
        existing = self.store.get(name, limit=blob.max_stored_size(len(data)))
        entry = Entry(cid, len(existing), blob.stored_checksum(existing))
        try:
            self.repo.unseal_chunk(entry, existing, len(data))
            return entry.pack()
        except CorruptObject:
            self.store.put(name, stored, durable=False)
            with self._stats_lock:
                stats.healed_chunks += 1
                stats.new_stored_bytes += len(stored)
            return ENTRY.pack(cid, len(stored), blob.stored_checksum(stored))

    async def _store_segment(self, builder: SegmentBuilder) -> SegmentRef:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._store_segment_sync, builder)

    def _store_segment_sync(self, builder: SegmentBuilder) -> SegmentRef:
        index_plain = builder.index_plaintext()
        refs_plain = builder.refs_plaintext()
        index_id = self.repo.hash(index_plain)
        refs_id = crypto.chunk_id(None, refs_plain)
        index_stored = self._put_object(
            index_name(index_id),
            Kind.INDEX,
            index_id,
            self.repo.seal(Kind.INDEX, index_id, index_plain),
            index_plain,
        )
        refs_stored = self._put_object(
            refs_name(refs_id),
            Kind.REFS,
            refs_id,
            blob.seal(Kind.REFS, refs_id, refs_plain, None, self.repo.level or 3),
            refs_plain,
        )
        return SegmentRef(
            entries=builder.count,
            index_id=index_id,
            index_size=len(index_stored),
            index_sha256=hashlib.sha256(index_stored).digest(),
            refs_id=refs_id,
            refs_size=len(refs_stored),
            refs_sha256=hashlib.sha256(refs_stored).digest(),
        )

    def _put_object(self, name: str, kind: Kind, object_id: bytes, stored: bytes, plaintext: bytes) -> bytes:
        """Store a content-addressed segment; the stored bytes that are in the store afterwards: another
        writer's copy of the same plaintext if it was there first and is sound, else ours over it (its
        stored checksum goes into our manifest, so a rotten copy must not be adopted)."""
        if self.store.put_if_absent(name, stored, durable=False):
            return stored
        try:
            existing = self.store.get(name, limit=blob.max_stored_size(len(plaintext)))
            keys = self.repo.keys if kind == Kind.INDEX else None
            if blob.unseal(name, kind, object_id, existing, keys, len(plaintext)) == plaintext:
                return existing
        except (CorruptObject, MissingObject):
            pass
        self.store.put(name, stored, durable=False)
        return stored

    # -- the end ----------------------------------------------------------------------------------

    async def commit(
        self,
        name: str,
        disks: list[DiskRecord],
        *,
        tags: list[str] | None = None,
        parent: str | None = None,
        time: str | None = None,
        snapshot_id: str | None = None,
    ) -> Manifest:
        """Write the manifest: the snapshot exists from here on."""
        if self._closed:
            raise RepoError("the backup session is closed")
        check_snapshot_name(name)
        totals: dict[str, int] = {}
        for disk in disks:
            for key, value in disk.stats.items():
                totals[key] = totals.get(key, 0) + value
        # The requests this run sent from the start of its session to its commit (the manifest's own
        # PUT and the session's end come after: one PUT and one DELETE more).
        sent = RequestCounts.since(self._requests_before, self.store.requests.snapshot())
        totals.update({f"requests_{k}": v for k, v in sent.items()})
        snap = Manifest(
            id=snapshot_id or secrets.token_hex(16),
            repository=self.repo.config.id,
            name=name,
            time=time or self.started_at,
            host=socket.gethostname(),
            tags=sorted(set(tags or [])),
            parent=parent,
            disks=disks,
            stats=totals,
        )
        await asyncio.get_running_loop().run_in_executor(
            None, self.repo.commit, snap, self.session.check_fresh
        )
        await asyncio.get_running_loop().run_in_executor(None, self.cache.save)
        return snap

    async def close(self) -> None:
        """End the session (a run not committed leaves only garbage for gc); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        # Waiting for the workers in flight (an upload) must not block the event loop: a daemon's.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            None, functools.partial(self._pool.shutdown, wait=True, cancel_futures=True)
        )
        await loop.run_in_executor(None, self.session.end)


async def _reads_as_zero(node: BlockNode, offset: int, length: int) -> bool:
    """True if block status says ``[offset, offset + length)`` reads as zeros (holes, zero clusters)."""
    end = offset + length
    while offset < end:
        ext = await node.block_status(offset, end - offset)
        if not ext.is_zero:
            return False
        offset = ext.end
    return True
