"""Reading snapshots back: restore a disk onto a block node, segment by segment, chunks in parallel.

Chunks are fetched and checked (authenticated, decompressed, length-checked; re-hashed in a plain
repository) by worker threads as they arrive; the target is written in whatever order they complete.
On a target that reads as zeros (a new file), runs of zeros inside a chunk are not written either: they
stay holes, as whole zero chunks do, and cost the target no allocation and no copy.

A chunk that is missing or corrupt is a *bad range*: restore goes on to find every one, then fails
naming them all -- unless ``partial``, which leaves zeros there and reports them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass

from cowbackup.block.node import BlockNode, RequestFlags
from cowbackup.block.zero import is_zero
from cowbackup.repo.errors import CorruptObject, MissingObject, RepoError, first_repo_error
from cowbackup.repo.index import Entry
from cowbackup.repo.manifest import DiskRecord
from cowbackup.repo.repository import Repository
from cowbackup.repo.writer import default_workers, retain_freed_memory

Progress = Callable[[int], None]

#: Zeros inside a chunk are left out of the writes to a zeroed target in runs of whole, aligned blocks
#: of this size: large enough that a chunk costs at most 64 ``is_zero`` calls (4 MiB chunks), small
#: enough to find the holes of a fragmented disk (file systems allocate 4 KiB blocks, in runs).
ZERO_BLOCK = 64 * 1024


@dataclass(frozen=True, slots=True)
class BadRange:
    offset: int
    length: int
    reason: str


class DamagedSnapshot(RepoError):
    def __init__(self, disk: str, bad: list[BadRange]) -> None:
        shown = ", ".join(f"[{b.offset}, +{b.length})" for b in bad[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        super().__init__(
            f"disk '{disk}' cannot be restored whole: {len(bad)} bad range(s): {shown}{more} "
            f"(first: {bad[0].reason}); --partial restores the rest with zeros there"
        )
        self.bad = bad


async def restore_disk(
    repo: Repository,
    disk: DiskRecord,
    target: BlockNode,
    *,
    target_reads_zero: bool,
    partial: bool = False,
    workers: int = 0,
    progress: Progress | None = None,
) -> list[BadRange]:
    """Write ``disk`` onto ``target`` (at least as large).  Zero chunks are written as zeroes (holes
    where the target can) unless ``target_reads_zero``.  The bad ranges when ``partial``; else
    DamagedSnapshot if there are any."""
    repo.require_key()
    retain_freed_memory()
    loop = asyncio.get_running_loop()
    workers = workers or default_workers()
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="cowbackup-restore")
    window = asyncio.Semaphore(workers * 2)
    bad: list[BadRange] = []
    report = progress or (lambda _n: None)
    cs = disk.chunk_size

    def fetch(entry: Entry, length: int) -> tuple[bytes, list[tuple[int, int]]]:
        """In a worker thread: the chunk's plaintext and the runs of it to write."""
        data = repo.read_chunk(entry, length)
        return data, (_data_runs(data, ZERO_BLOCK) if target_reads_zero else [(0, len(data))])

    async def one(offset: int, length: int, entry: Entry) -> None:
        try:
            if entry.is_zero:
                if not target_reads_zero:
                    await target.write_zeroes(offset, length, RequestFlags.MAY_UNMAP)
            else:
                try:
                    data, runs = await loop.run_in_executor(pool, fetch, entry, length)
                except (MissingObject, CorruptObject) as err:
                    bad.append(BadRange(offset, length, str(err)))
                    if not target_reads_zero:
                        await target.write_zeroes(offset, length, RequestFlags.MAY_UNMAP)
                else:
                    view = memoryview(data)
                    for start, end in runs:
                        await target.write(offset + start, view[start:end])
            report(length)
        finally:
            window.release()

    try:
        for s, segment in enumerate(disk.segments):
            first = s * disk.segment_entries
            try:
                entries = await loop.run_in_executor(pool, repo.read_index, segment)
            except (MissingObject, CorruptObject) as err:
                start = first * cs
                length = min(disk.size, (first + segment.entries) * cs) - start
                bad.append(BadRange(start, length, str(err)))
                if not target_reads_zero:
                    await target.write_zeroes(start, length, RequestFlags.MAY_UNMAP)
                report(length)
                continue
            try:
                async with asyncio.TaskGroup() as tasks:
                    for i, entry in enumerate(entries):
                        offset = (first + i) * cs
                        await window.acquire()
                        tasks.create_task(one(offset, min(cs, disk.size - offset), entry))
            except ExceptionGroup as group:
                raise first_repo_error(group) from None
        await target.flush()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    bad.sort(key=lambda b: b.offset)
    if bad and not partial:
        raise DamagedSnapshot(disk.name, bad)
    return bad


def _data_runs(data: bytes, block: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` runs of ``data`` that are not whole all-zero ``block``-sized blocks."""
    view = memoryview(data)
    runs: list[tuple[int, int]] = []
    start = -1
    for pos in range(0, len(view), block):
        if is_zero(view[pos : pos + block]):
            if start >= 0:
                runs.append((start, pos))
                start = -1
        elif start < 0:
            start = pos
    if start >= 0:
        runs.append((start, len(view)))
    return runs
