"""Backups with a dirty bitmap: what the bitmap holds after success, failure and cancel, per bitmap-mode.

The scenario follows QEMU's iotest 257 on a 64-cluster disk: six clusters are dirty before the backup,
seven are written through the filter while it runs (three of them already dirty), and the background copy
(one worker, one cluster per task) is held at cluster 4 by a stall on the target so those writes land
mid-job::

    dirty before      0 1 . . 4 . . . 8 ... 32 ... 63
    written during    0 1 . . . . . . . ... 32 ... 40 41 ... 50 ... 62
    copied by then    0 1 (background), 32 (copy-before-write); 4 in flight, 8 claimed for the next task

(Like QEMU's block-copy, the engine claims the next area before it waits for a free worker, so a write to
cluster 8 would wait for the stalled copy of 4; the writes avoid it.)

The expected counts are QEMU's (backup_cleanup_sync_bitmap): the union of both sets is 10 clusters, the
writes alone 7.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from cowbackup.block.dirty_bitmaps import NodeDirtyBitmap
from cowbackup.block.drivers.memory import MemoryNode
from cowbackup.block.errors import BlockError
from cowbackup.block.filters.fault import FaultNode
from cowbackup.daemon import Daemon
from cowbackup.jobs import Event
from cowbackup.jobs.backup import BackupJob, BackupParams, BackupPerf

T = TypeVar("T")
C = 64 * 1024
SIZE = 64 * C
BEFORE = [0, 1, 4, 8, 32, 63]
DURING = [0, 1, 32, 40, 41, 50, 62]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20.0))


def clusters(bm: NodeDirtyBitmap) -> list[int]:
    return [off // C for off in range(0, SIZE, C) if bm.bits.get(off)]


class Scene:
    """src (memory, bitmap ``b`` with BEFORE dirty) -> backup through ``cbw`` -> fault-inject -> tgt."""

    def __init__(self, d: Daemon, src: MemoryNode, fault: FaultNode) -> None:
        self.d, self.src, self.fault = d, src, fault

    @classmethod
    async def make(cls) -> Scene:
        d = Daemon()
        src = await d.blockdev_add({"driver": "memory", "node-name": "src", "size": SIZE})
        await d.blockdev_add({"driver": "memory", "node-name": "tgt", "size": SIZE})
        fault = await d.blockdev_add({"driver": "fault-inject", "node-name": "tgtf", "file": "tgt"})
        assert isinstance(src, MemoryNode) and isinstance(fault, FaultNode)
        src.dirty_bitmaps.create("b", C)
        for n in BEFORE:
            await src.write(n * C, bytes([n + 1]) * C)
        return cls(d, src, fault)

    @property
    def bitmap(self) -> NodeDirtyBitmap:
        bm = self.src.dirty_bitmaps.find("b")
        assert bm is not None
        return bm

    def backup(self, sync: str, mode: str | None, **kw: Any) -> BackupJob:
        params = BackupParams(
            "src",
            "tgtf",
            sync,
            job_id="j",
            bitmap="b",
            bitmap_mode=mode,
            filter_node_name="cbw",
            perf=BackupPerf(max_workers=1, max_chunk=C),
            **kw,
        )
        job = self.d.blockdev_backup(params)
        assert isinstance(job, BackupJob)
        return job

    async def write_during(self) -> None:
        filt = self.d.graph.get("cbw")
        for n in DURING:
            await filt.write(n * C, b"\xee" * C)


async def finish(job: BackupJob) -> None:
    await job.wait_concluded()


async def mid_job(scene: Scene, sync: str, mode: str, *, fail: bool = False, **kw: Any) -> BackupJob:
    """Start the backup, hold its background copy at cluster 4, write DURING."""
    held = 4 * C
    stall = scene.fault.inject("write", stall=True, offset_range=(held, held + C))
    if fail:
        scene.fault.inject("write", offset_range=(held, held + C))
    job = scene.backup(sync, mode, **kw)
    await stall.wait_hits(1)
    await scene.write_during()
    # The bitmap is frozen: it still holds what it held, and says it is busy.
    assert clusters(scene.bitmap) == BEFORE and scene.bitmap.busy
    stall.release()
    return job


MATRIX = [
    # mode, outcome, dirty clusters afterwards (QEMU 257's 10 / 7 pattern)
    ("never", "success", 10),
    ("on-success", "success", 7),
    ("always", "success", 7),
    ("never", "failure", 10),
    ("on-success", "failure", 10),
    ("always", "failure", 10),  # the writes + 4 (failed), 8 (claimed, given back) and 63 (never reached)
    ("never", "cancel-pending", 10),
    ("on-success", "cancel-pending", 10),
    ("always", "cancel-pending", 7),  # nothing left uncopied
]


@pytest.mark.parametrize(("mode", "outcome", "expected"), MATRIX)
def test_bitmap_mode_matrix(mode: str, outcome: str, expected: int) -> None:
    async def main() -> None:
        scene = await Scene.make()
        pending = asyncio.get_running_loop().create_future()

        def on_event(event: Event) -> None:
            if event.data == {"id": "j", "status": "pending"} and not pending.done():
                pending.set_result(None)

        scene.d.jobs.events.subscribe(on_event)
        job = await mid_job(
            scene, "bitmap", mode, fail=outcome == "failure", auto_finalize=outcome != "cancel-pending"
        )
        if outcome == "cancel-pending":
            await pending
            flow = job.cancel()
            if flow is not None:
                await flow
        await finish(job)
        assert job.error is None if outcome == "success" else job.error is not None
        bm = scene.bitmap
        assert len(clusters(bm)) == expected
        assert not bm.busy and bm.recording and list(scene.src.dirty_bitmaps) == [bm]
        if outcome == "success" and mode != "never":
            assert clusters(bm) == DURING
        await scene.d.close()

    run(main())


def test_incremental_copies_exactly_the_dirty_clusters_at_the_snapshot() -> None:
    async def main() -> None:
        scene = await Scene.make()
        before = bytearray(SIZE)
        await scene.src.read(0, before)
        job = await mid_job(scene, "incremental", "on-success")
        await finish(job)
        assert job.error is None
        tgt = scene.d.graph.get("tgt")
        assert isinstance(tgt, MemoryNode)
        image = tgt.snapshot()
        for n in range(64):
            chunk = image[n * C : (n + 1) * C]
            assert chunk == (before[n * C : (n + 1) * C] if n in BEFORE else bytes(C)), n
        assert clusters(scene.bitmap) == DURING
        await scene.d.close()

    run(main())


def test_sync_full_with_always_keeps_what_a_failed_job_did_not_copy() -> None:
    async def main() -> None:
        scene = await Scene.make()
        job = await mid_job(scene, "full", "always", fail=True)
        await finish(job)
        # Copied: 0-3 (background), 32 40 41 50 62 (copy-before-write); 4 failed, 5 given back, 6.. never
        # reached.
        left = [n for n in range(4, 64) if n not in (32, 40, 41, 50, 62)]
        assert clusters(scene.bitmap) == sorted(set(left) | set(DURING))
        await scene.d.close()

    run(main())


def test_a_refused_backup_leaves_the_bitmap_as_it_was() -> None:
    async def main() -> None:
        scene = await Scene.make()
        await scene.d.blockdev_add({"driver": "memory", "node-name": "small", "size": C})
        with pytest.raises(BlockError, match="different sizes"):
            scene.d.blockdev_backup(BackupParams("src", "small", "bitmap", bitmap="b", bitmap_mode="always"))
        bm = scene.bitmap
        assert not bm.busy and bm.successor is None and list(scene.src.dirty_bitmaps) == [bm]
        job = scene.backup("bitmap", "never")
        with pytest.raises(BlockError, match=r"^Bitmap 'b' is currently in use by another operation"):
            scene.d.blockdev_backup(
                BackupParams("src", "small", "bitmap", job_id="k", bitmap="b", bitmap_mode="never")
            )
        await finish(job)
        assert clusters(scene.bitmap) == BEFORE
        await scene.d.close()

    run(main())


def test_a_readonly_bitmap_serves_only_mode_never() -> None:
    async def main() -> None:
        scene = await Scene.make()
        scene.bitmap.readonly = True
        with pytest.raises(BlockError, match=r"^Bitmap 'b' is readonly and cannot be modified$"):
            scene.backup("bitmap", "on-success")
        job = scene.backup("bitmap", "never")
        await finish(job)
        assert job.error is None and clusters(scene.bitmap) == BEFORE
        await scene.d.close()

    run(main())
