"""The backup job through ``Daemon``, against QEMU's contract (qemu-backup-today.md 1.9-1.12, 2.1-2.5).

Sync modes, exact event sequences, pause/cancel/speed, error policies, copy-before-write errors, validation
messages and their order, the end of a job waiting for guest-triggered copies, and copy offloading.
Timing-dependent tests use ``null-co`` latency or a test clock for the speed limit; none asserts on
wall-clock speed, only that something did or did not happen.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cowbackup.block.drivers.file import create_file
from cowbackup.block.drivers.memory import MemoryNode
from cowbackup.block.errors import BlockError, RequestError
from cowbackup.block.filters.cbw import CopyBeforeWriteNode
from cowbackup.block.filters.fault import FaultNode
from cowbackup.block.graph import Root
from cowbackup.block.node import BlockNode, Extent
from cowbackup.daemon import Daemon
from cowbackup.jobs import (
    BLOCK_JOB_CANCELLED,
    BLOCK_JOB_COMPLETED,
    BLOCK_JOB_ERROR,
    BLOCK_JOB_PENDING,
    JOB_STATUS_CHANGE,
    BlockdevOnError,
    Event,
    IoStatus,
    JobError,
    JobStatus,
    RateLimit,
)
from cowbackup.jobs.backup import BackupJob, BackupParams, BackupPerf

T = TypeVar("T")
KiB = 1024
MiB = 1024 * KiB
C = 64 * KiB
TIMEOUT = 20.0


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one test coroutine on a fresh loop, bounded so that a bug hangs nothing."""
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


class Recorder:
    """Every event of a daemon, and a way to wait for one without polling."""

    def __init__(self, daemon: Daemon) -> None:
        self.events: list[Event] = []
        self._waiters: list[tuple[Callable[[Event], bool], asyncio.Future[Event]]] = []
        daemon.jobs.events.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        self.events.append(event)
        for match, fut in list(self._waiters):
            if not fut.done() and match(event):
                fut.set_result(event)

    async def wait_for(self, name: str, **fields: Any) -> Event:
        def match(event: Event) -> bool:
            return event.name == name and all(event.data.get(k) == v for k, v in fields.items())

        for event in self.events:
            if match(event):
                return event
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._waiters.append((match, fut))
        return await fut

    async def wait_status(self, job_id: str, status: str) -> None:
        await self.wait_for(JOB_STATUS_CHANGE, id=job_id, status=status)

    def trace(self, job_id: str) -> list[str]:
        """The job's events in order: statuses by value, other events by name."""
        return [
            e.data["status"] if e.name == JOB_STATUS_CHANGE else e.name
            for e in self.events
            if e.data.get("id", e.data.get("device")) == job_id
        ]

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.name == name]


async def until(predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` holds (for progress counters, which send no event); 5 s at most."""
    async with asyncio.timeout(5):
        while not predicate():  # noqa: ASYNC110 - progress counters send no event
            await asyncio.sleep(0.001)


async def memory(daemon: Daemon, name: str, size: int) -> MemoryNode:
    node = await daemon.blockdev_add({"driver": "memory", "node-name": name, "size": size})
    assert isinstance(node, MemoryNode)
    return node


async def file_node(daemon: Daemon, name: str, path: Path, size: int, **opts: Any) -> BlockNode:
    create_file(str(path), size)
    return await daemon.blockdev_add({"driver": "file", "node-name": name, "filename": str(path), **opts})


async def backend_pair(
    daemon: Daemon, backend: str, tmp_path: Path, size: int
) -> tuple[BlockNode, BlockNode]:
    """Source ``src`` and target ``tgt`` of one backend: ``memory``, ``file`` or ``raw`` over ``file``."""
    if backend == "memory":
        return await memory(daemon, "src", size), await memory(daemon, "tgt", size)
    if backend == "file":
        src = await file_node(daemon, "src", tmp_path / "src", size, discard="unmap")
        tgt = await file_node(daemon, "tgt", tmp_path / "tgt", size, discard="unmap")
        return src, tgt
    nodes = []
    for name in ("src", "tgt"):
        create_file(str(tmp_path / name), size)
        inner = {"driver": "file", "filename": str(tmp_path / name), "discard": "unmap"}
        nodes.append(await daemon.blockdev_add({"driver": "raw", "node-name": name, "file": inner}))
    return nodes[0], nodes[1]


async def contents(node: BlockNode) -> bytes:
    buf = bytearray(node.size)
    await node.read(0, buf)
    return bytes(buf)


async def layout(node: BlockNode) -> list[tuple[int, int, bool]]:
    """(offset, length, is data) of every extent: where the node has holes."""
    out = []
    ext: Extent
    async for ext in node.extents():
        out.append((ext.offset, ext.length, ext.is_data))
    return out


async def write_layout(node: BlockNode, seed: int = 1) -> None:
    """Data in whole clusters, holes elsewhere: 0-1 MiB, 2 MiB+64K (128K), the last cluster."""
    rng = random.Random(seed)
    await node.write(0, rng.randbytes(MiB))
    await node.write(2 * MiB + C, rng.randbytes(2 * C))
    await node.write(node.size - C, rng.randbytes(C))


async def null_source(daemon: Daemon, size: int = 64 * MiB, latency_ns: int = 0) -> None:
    await daemon.blockdev_add(
        {"driver": "null-co", "node-name": "src", "size": size, "latency-ns": latency_ns}
    )
    await daemon.blockdev_add({"driver": "null-co", "node-name": "tgt", "size": size})


async def fault_over(daemon: Daemon, name: str, child: str) -> FaultNode:
    node = await daemon.blockdev_add({"driver": "fault-inject", "node-name": name, "file": child})
    assert isinstance(node, FaultNode)
    return node


def backup(
    daemon: Daemon, device: str = "src", target: str = "tgt", sync: str = "full", **kw: Any
) -> BackupJob:
    job = daemon.blockdev_backup(BackupParams(device, target, sync, **kw))
    assert isinstance(job, BackupJob)
    return job


SUCCESS = ["created", "running", "waiting", "pending", BLOCK_JOB_COMPLETED, "concluded", "null"]
CANCELLED = ["aborting", BLOCK_JOB_CANCELLED, "concluded", "null"]


# ---------------------------------------------------------------------- sync modes


@pytest.mark.parametrize("backend", ["memory", "file"])
def test_full_backup_is_an_exact_sparse_copy_and_the_filter_comes_and_goes(
    backend: str, tmp_path: Path
) -> None:
    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        size = 4 * MiB
        src, tgt = await backend_pair(d, backend, tmp_path, size)
        await write_layout(src)
        guest, export = Root("guest"), Root("export 'disk0'")
        guest_edge = d.graph.attach(guest, "root", src)
        export_edge = d.graph.attach(export, "root", src)
        before = await contents(src)

        job = backup(d, filter_node_name="cbw0")
        filt = d.graph.find("cbw0")
        assert isinstance(filt, CopyBeforeWriteNode)
        assert guest.node is filt and export.node is filt and filt.child is src
        assert job.status == JobStatus.RUNNING
        await job.wait_concluded()

        assert d.graph.find("cbw0") is None
        assert guest.node is src and export.node is src
        assert src.parents == [guest_edge, export_edge]
        assert rec.trace("src") == SUCCESS
        assert rec.named(BLOCK_JOB_COMPLETED) == [
            {"type": "backup", "device": "src", "len": size, "offset": size, "speed": 0}
        ]
        assert await contents(tgt) == before == await contents(src)
        # Holes of the source are holes of the target.
        assert await layout(tgt) == await layout(src)
        if backend == "file":
            src_blocks = os.stat(tmp_path / "src").st_blocks
            tgt_blocks = os.stat(tmp_path / "tgt").st_blocks
            assert tgt_blocks == src_blocks
            assert tgt_blocks * 512 < size  # sparse
        await d.close()

    run(main())


@pytest.mark.parametrize("backend", ["memory", "file", "raw"])
def test_sync_top_without_backing_behaves_as_full(backend: str, tmp_path: Path) -> None:
    """QEMU: the holes of a layer without backing are allocated zeros, so sync=top copies them too."""

    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        size = 4 * MiB
        src, tgt = await backend_pair(d, backend, tmp_path, size)
        await write_layout(src)
        await tgt.write(0, b"\xee" * size)  # a stale target: holes of the source must become zeros
        before = await contents(src)
        job = backup(d, sync="top")
        await job.wait_concluded()
        assert rec.named(BLOCK_JOB_COMPLETED) == [
            {"type": "backup", "device": "src", "len": size, "offset": size, "speed": 0}
        ]
        assert await contents(tgt) == before
        await d.close()

    run(main())


def test_sync_none_copies_only_what_writes_touch_until_cancelled() -> None:
    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        size = 4 * MiB
        src = await memory(d, "src", size)
        tgt = await memory(d, "tgt", size)
        await src.write(0, random.Random(3).randbytes(size))
        before = await contents(src)
        guest = Root("guest")
        d.graph.attach(guest, "root", src)
        job = backup(d, sync="none")
        await asyncio.sleep(0.01)
        assert job.progress_current == 0 and job.progress_total == size
        # Writes touching clusters 0, 1, 5, 10, 11 and 20: six clusters.
        await guest.node.write(C - 100, b"a" * 200)
        await guest.node.write(5 * C + 1, b"b")
        await guest.node.write(0, b"c" * 10)  # cluster 0 again: copied already
        await guest.node.write_zeroes(10 * C + 7, C)
        await guest.node.discard(20 * C, C)
        assert job.progress_current == 6 * C == 393216
        await asyncio.sleep(0.02)
        assert job.status == JobStatus.RUNNING and job.progress_current == 393216
        target = await contents(tgt)
        copied = [0, 1, 5, 10, 11, 20]
        for i in range(size // C):
            want = before[i * C : (i + 1) * C] if i in copied else bytes(C)
            assert target[i * C : (i + 1) * C] == want, i
        job.cancel()
        await job.wait_concluded()
        assert rec.trace("src") == ["created", "running", *CANCELLED]
        assert rec.named(BLOCK_JOB_CANCELLED) == [
            {"type": "backup", "device": "src", "len": size, "offset": 393216, "speed": 0}
        ]
        await d.close()

    run(main())


def test_second_backup_into_the_same_target_node_is_exact(tmp_path: Path) -> None:
    """The target file was one hole when opened, but the first backup filled it: the second backup must
    still write the zeros of the source's new holes (it used to skip them, leaving stale data)."""

    async def main() -> None:
        d = Daemon()
        size = 2 * MiB
        src, tgt = await backend_pair(d, "file", tmp_path, size)
        await src.write(0, b"\x55" * size)
        await backup(d, job_id="first").wait_concluded()
        assert await contents(tgt) == await contents(src)
        await src.discard(0, MiB)
        await src.write_zeroes(MiB + C, C)
        await backup(d, job_id="second").wait_concluded()
        assert await contents(tgt) == await contents(src)
        await d.close()

    run(main())


def test_progress_of_a_disk_with_a_partial_last_cluster() -> None:
    """len is in bytes of the disk, from the start to the end, whether the job succeeds or fails."""

    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        size = MiB + 4096
        src = await memory(d, "mem", size)
        await src.write(0, b"\1" * size)
        await memory(d, "tgt", size)
        fault = await fault_over(d, "src", "mem")
        job = backup(d, job_id="ok")
        assert job.progress_total == size
        await job.wait_concluded()
        fault.inject("read", nth=1)
        job = backup(d, job_id="bad")
        assert job.progress_total == size
        await job.wait_concluded()
        assert [(e["len"], e["offset"], e.get("error")) for e in rec.named(BLOCK_JOB_COMPLETED)] == [
            (size, size, None),
            (size, 0, "Input/output error"),
        ]
        await d.close()

    run(main())


# ---------------------------------------------------------------------- event sequences


async def _memory_pair(d: Daemon, size: int = MiB) -> MemoryNode:
    src = await memory(d, "src", size)
    await memory(d, "tgt", size)
    await src.write(0, random.Random(5).randbytes(size))
    return src


def test_events_with_auto_finalize_off() -> None:
    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        await _memory_pair(d)
        job = backup(d, job_id="job0", auto_finalize=False, filter_node_name="cbw0")
        await rec.wait_for(BLOCK_JOB_PENDING)
        assert rec.trace("job0") == ["created", "running", "waiting", "pending", BLOCK_JOB_PENDING]
        assert rec.named(BLOCK_JOB_PENDING) == [{"type": "backup", "id": "job0"}]
        assert job.status == JobStatus.PENDING
        assert d.graph.find("cbw0") is not None  # the filter stays until finalized (test 283)
        await job.finalize()
        assert rec.trace("job0")[5:] == [BLOCK_JOB_COMPLETED, "concluded", "null"]
        assert d.graph.find("cbw0") is None
        await d.close()

    run(main())


def test_events_with_auto_dismiss_off() -> None:
    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        await _memory_pair(d)
        job = backup(d, job_id="job0", auto_dismiss=False)
        await job.wait_concluded()
        assert rec.trace("job0") == SUCCESS[:-1]
        assert job.status == JobStatus.CONCLUDED and d.jobs.get("job0") is job
        job.dismiss()
        assert rec.trace("job0") == SUCCESS
        assert d.jobs.get("job0") is None
        await d.close()

    run(main())


def test_events_of_a_failed_job() -> None:
    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        src = await memory(d, "mem", MiB)
        await src.write(0, random.Random(6).randbytes(MiB))
        await memory(d, "tgt", MiB)
        fault = await fault_over(d, "src", "mem")
        fault.inject("read", nth=2)
        backup(d, job_id="job0", perf=BackupPerf(max_workers=1, max_chunk=C))
        await rec.wait_status("job0", "null")
        assert rec.trace("job0") == [
            "created", "running", BLOCK_JOB_ERROR, "aborting", BLOCK_JOB_COMPLETED, "concluded", "null",
        ]  # fmt: skip
        assert rec.named(BLOCK_JOB_ERROR) == [{"device": "job0", "operation": "read", "action": "report"}]
        # One cluster was copied before the failing read (QEMU: offset 65536, "Input/output error").
        assert rec.named(BLOCK_JOB_COMPLETED) == [
            {"type": "backup", "device": "job0", "len": MiB, "offset": C, "speed": 0,
             "error": "Input/output error"}
        ]  # fmt: skip
        await d.close()

    run(main())


def test_cancel_while_running() -> None:
    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        await null_source(d, latency_ns=1_000_000)
        job = backup(d, job_id="job0", filter_node_name="cbw0", perf=BackupPerf(max_chunk=C, max_workers=2))
        await until(lambda: job.progress_current > 0)
        job.cancel()
        await job.wait_concluded()
        assert rec.trace("job0") == ["created", "running", *CANCELLED]
        cancelled = rec.named(BLOCK_JOB_CANCELLED)
        assert len(cancelled) == 1 and 0 < cancelled[0]["offset"] < cancelled[0]["len"] == 64 * MiB
        assert d.graph.find("cbw0") is None
        await d.close()

    run(main())


def test_cancel_while_paused() -> None:
    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        await null_source(d, latency_ns=1_000_000)
        job = backup(d, job_id="job0", perf=BackupPerf(max_chunk=C, max_workers=2))
        await until(lambda: job.progress_current > 0)
        job.pause()
        await rec.wait_status("job0", "paused")
        job.cancel()
        await job.wait_concluded()
        # Cancel withdraws the user's pause: the job runs again to notice it (as QEMU's).
        assert rec.trace("job0") == ["created", "running", "paused", "running", *CANCELLED]
        await d.close()

    run(main())


def test_cancel_while_pending_reports_the_full_offset() -> None:
    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        await _memory_pair(d)
        job = backup(d, job_id="job0", auto_finalize=False, filter_node_name="cbw0")
        await rec.wait_status("job0", "pending")
        task = job.cancel()
        assert task is not None
        await task
        assert rec.trace("job0") == [
            "created", "running", "waiting", "pending", BLOCK_JOB_PENDING, *CANCELLED,
        ]  # fmt: skip
        assert rec.named(BLOCK_JOB_CANCELLED) == [
            {"type": "backup", "device": "job0", "len": MiB, "offset": MiB, "speed": 0}
        ]
        assert d.graph.find("cbw0") is None
        await d.close()

    run(main())


# ---------------------------------------------------------------------- pause, resume, speed


def test_offset_does_not_move_while_paused() -> None:
    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        await null_source(d, latency_ns=1_000_000)
        job = backup(d, job_id="job0", perf=BackupPerf(max_chunk=C, max_workers=4))
        await until(lambda: job.progress_current > 0)
        job.pause()
        await rec.wait_status("job0", "paused")
        info = job.block_job_info()
        assert info["paused"] is True and info["status"] == "paused" and info["io-status"] == "ok"
        first = job.progress_current
        await asyncio.sleep(0.05)
        assert job.progress_current == first
        with pytest.raises(JobError, match=r"^Job is already paused$"):
            job.pause()
        job.resume()
        await until(lambda: job.progress_current > first)
        assert job.status == JobStatus.RUNNING
        with pytest.raises(JobError, match=r"^Can't resume a job that was not paused$"):
            job.resume()
        job.cancel()
        await job.wait_concluded()
        await d.close()

    run(main())


class TestClock:
    """A clock for the speed limit that moves only when told (QEMU's iotests step a virtual clock)."""

    __test__ = False

    def __init__(self) -> None:
        self.now = 10**12

    def __call__(self) -> int:
        return self.now

    def step(self, seconds: float) -> None:
        self.now += int(seconds * 1e9)


def test_speed_limit_admits_exactly_one_chunk_per_step() -> None:
    """speed=64K, max-chunk=64K: each step of the clock (or resume after one) copies exactly 65536
    bytes, as QEMU's test 219 sees; raising the speed lets the job finish."""

    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        await null_source(d)
        speed = 64 * KiB
        job = backup(d, job_id="job0", speed=speed, perf=BackupPerf(max_chunk=C, max_workers=1))
        clock = TestClock()
        job.bcs.ratelimit = RateLimit(speed, clock=clock)  # before the job's task first runs

        async def settles_at(offset: int) -> None:
            await until(lambda: job.progress_current >= offset)
            await asyncio.sleep(0.03)
            assert job.progress_current == offset

        await settles_at(C)  # the first chunk opens the slice; the next must wait ~1 s of test clock
        for step in (2, 3):
            clock.step(1.5)
            job.set_speed(speed)  # same speed: wakes the sleeping copy so it sees the new time
            await settles_at(step * C)
        job.pause()
        await rec.wait_status("job0", "paused")
        clock.step(1.5)
        job.set_speed(speed)
        await asyncio.sleep(0.03)
        assert job.progress_current == 3 * C  # nothing while paused, even with quota
        job.resume()
        await settles_at(4 * C)
        assert job.block_job_info()["speed"] == speed
        job.set_speed(0)  # unlimited: the rest goes at once
        await job.wait_concluded()
        assert rec.named(BLOCK_JOB_COMPLETED) == [
            {"type": "backup", "device": "job0", "len": 64 * MiB, "offset": 64 * MiB, "speed": 0}
        ]
        await d.close()

    run(main())


def test_raising_the_speed_wakes_a_throttled_job() -> None:
    async def main() -> None:
        d = Daemon()
        await null_source(d, size=4 * MiB)
        job = backup(d, job_id="job0", speed=64 * KiB, perf=BackupPerf(max_chunk=C, max_workers=1))
        await until(lambda: job.progress_current >= C)
        await asyncio.sleep(0.03)
        throttled = job.progress_current
        assert throttled < 4 * MiB
        job.set_speed(1 << 40)
        await job.wait_concluded()
        assert job.progress_current == 4 * MiB
        await d.close()

    run(main())


def test_negative_speed_is_refused() -> None:
    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        await null_source(d, latency_ns=1_000_000)
        with pytest.raises(JobError, match=r"^Parameter 'speed' expects a non-negative value$"):
            backup(d, job_id="bad", speed=-1, filter_node_name="cbw0")
        assert d.graph.find("cbw0") is None and d.jobs.list() == []
        assert [e.data["status"] for e in rec.events] == ["created", "null"]  # as QEMU
        job = backup(d, job_id="job0", speed=C)
        with pytest.raises(JobError, match=r"^Parameter 'speed' expects a non-negative value$"):
            job.set_speed(-1)
        assert job.speed == C and job.block_job_info()["speed"] == C
        job.cancel()
        await job.wait_concluded()
        await d.close()

    run(main())


# ---------------------------------------------------------------------- error policies


async def _faulty_pair(d: Daemon, side: str, size: int = MiB) -> tuple[MemoryNode, MemoryNode, FaultNode]:
    """Memory nodes ``msrc`` (random data) and ``mtgt`` under fault filters ``src`` and ``tgt``; returns
    the memory nodes and the filter of ``side`` (the other filter has no rules)."""
    mem_src = await memory(d, "msrc", size)
    mem_tgt = await memory(d, "mtgt", size)
    await mem_src.write(0, random.Random(8).randbytes(size))
    faults = {"src": await fault_over(d, "src", "msrc"), "tgt": await fault_over(d, "tgt", "mtgt")}
    return mem_src, mem_tgt, faults[side]


@pytest.mark.parametrize(("side", "operation"), [("src", "read"), ("tgt", "write")])
def test_on_error_ignore_retries_and_succeeds(side: str, operation: str) -> None:
    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        msrc, mtgt, fault = await _faulty_pair(d, side)
        before = msrc.snapshot()
        fault.inject("read" if side == "src" else "any-write", nth=3)
        policy = {f"on_{'source' if side == 'src' else 'target'}_error": BlockdevOnError.IGNORE}
        job = backup(d, job_id="job0", perf=BackupPerf(max_chunk=C, max_workers=2), **policy)
        await job.wait_concluded()
        assert rec.named(BLOCK_JOB_ERROR) == [{"device": "job0", "operation": operation, "action": "ignore"}]
        assert "error" not in rec.named(BLOCK_JOB_COMPLETED)[0]
        assert mtgt.snapshot() == before and msrc.snapshot() == before
        await d.close()

    run(main())


@pytest.mark.parametrize(
    ("policy", "err", "action", "io_status"),
    [
        (BlockdevOnError.STOP, errno.ENOSPC, "stop", IoStatus.NOSPACE),
        (BlockdevOnError.STOP, errno.EIO, "stop", IoStatus.FAILED),
        (BlockdevOnError.ENOSPC, errno.ENOSPC, "stop", IoStatus.NOSPACE),
        (BlockdevOnError.AUTO, errno.ENOSPC, "stop", IoStatus.NOSPACE),
        (BlockdevOnError.ENOSPC, errno.EIO, "report", None),
    ],
)
def test_on_target_error_stop_pauses_and_resume_retries(
    policy: BlockdevOnError, err: int, action: str, io_status: IoStatus | None
) -> None:
    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        msrc, mtgt, fault = await _faulty_pair(d, "tgt")
        before = msrc.snapshot()
        fault.inject("write", nth=2, errno=err)
        job = backup(d, job_id="job0", on_target_error=policy, perf=BackupPerf(max_chunk=C, max_workers=1))
        await rec.wait_for(BLOCK_JOB_ERROR)
        assert rec.named(BLOCK_JOB_ERROR) == [{"device": "job0", "operation": "write", "action": action}]
        if io_status is None:
            await job.wait_concluded()
            assert rec.named(BLOCK_JOB_COMPLETED)[0]["error"] == os.strerror(err)
        else:
            await rec.wait_status("job0", "paused")
            assert job.io_status == io_status and job.user_paused
            info = job.block_job_info()
            assert info["io-status"] == io_status.value and info["paused"] is True
            frozen = job.progress_current
            await asyncio.sleep(0.02)
            assert job.progress_current == frozen and job.status == JobStatus.PAUSED
            job.resume()
            assert job.io_status == IoStatus.OK
            await job.wait_concluded()
            assert rec.trace("job0") == [
                "created", "running", BLOCK_JOB_ERROR, "paused", "running",
                "waiting", "pending", BLOCK_JOB_COMPLETED, "concluded", "null",
            ]  # fmt: skip
            assert "error" not in rec.named(BLOCK_JOB_COMPLETED)[0]
            assert mtgt.snapshot() == before
        assert msrc.snapshot() == before  # the job never writes its source
        await d.close()

    run(main())


@pytest.mark.parametrize(("side", "operation"), [("src", "read"), ("tgt", "write")])
@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_on_error_report_fails_the_job(side: str, operation: str, err: int) -> None:
    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        msrc, _mtgt, fault = await _faulty_pair(d, side)
        before = msrc.snapshot()
        fault.inject("read" if side == "src" else "write", nth=3, errno=err)
        job = backup(d, job_id="job0", filter_node_name="cbw0", perf=BackupPerf(max_chunk=C, max_workers=1))
        await job.wait_concluded()
        assert rec.named(BLOCK_JOB_ERROR) == [{"device": "job0", "operation": operation, "action": "report"}]
        assert rec.named(BLOCK_JOB_COMPLETED) == [
            {"type": "backup", "device": "job0", "len": MiB, "offset": 2 * C, "speed": 0,
             "error": os.strerror(err)}
        ]  # fmt: skip
        assert rec.trace("job0")[-4:] == ["aborting", BLOCK_JOB_COMPLETED, "concluded", "null"]
        assert msrc.snapshot() == before
        assert d.graph.find("cbw0") is None
        await d.close()

    run(main())


# ---------------------------------------------------------------------- copy-before-write errors


@pytest.mark.parametrize("sync", ["none", "full"])
def test_break_snapshot_lets_the_write_through_and_fails_the_job(sync: str) -> None:
    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        msrc, _mtgt, fault = await _faulty_pair(d, "tgt")
        guest = Root("guest")
        d.graph.attach(guest, "root", d.graph.get("src"))
        fault.inject("any-write", nth=1, errno=errno.ENOSPC)
        job = backup(d, job_id="job0", sync=sync, on_cbw_error="break-snapshot")
        if sync == "full":
            job.pause()  # so that the guest write, not the background copy, copies cluster 1 first
            await rec.wait_status("job0", "paused")
        await guest.node.write(C + 5, b"guest data")
        assert msrc.snapshot()[C + 5 : C + 15] == b"guest data"
        if sync == "full":
            job.resume()
        await job.wait_concluded()
        assert rec.named(BLOCK_JOB_ERROR) == []
        completed = rec.named(BLOCK_JOB_COMPLETED)
        assert len(completed) == 1 and completed[0]["error"] == "No space left on device"
        assert rec.trace("job0")[-4:] == ["aborting", BLOCK_JOB_COMPLETED, "concluded", "null"]
        await guest.node.write(0, b"after")  # the filter is gone; writes go straight to the source
        assert msrc.snapshot()[:5] == b"after"
        await d.close()

    run(main())


def test_break_guest_write_fails_the_write_and_keeps_the_snapshot() -> None:
    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        msrc, mtgt, fault = await _faulty_pair(d, "tgt")
        before = msrc.snapshot()
        guest = Root("guest")
        d.graph.attach(guest, "root", d.graph.get("src"))
        fault.inject("any-write", nth=1, errno=errno.EIO)
        job = backup(d, job_id="job0", sync="none")
        with pytest.raises(RequestError) as info:
            await guest.node.write(C + 5, b"lost")
        assert info.value.errno == errno.EIO
        assert msrc.snapshot() == before and job.status == JobStatus.RUNNING
        await guest.node.write(C + 5, b"kept")  # the cluster is still to copy: this copy succeeds
        assert msrc.snapshot()[C + 5 : C + 9] == b"kept"
        assert mtgt.snapshot()[C : 2 * C] == before[C : 2 * C]
        assert job.progress_current == C
        job.cancel()
        await job.wait_concluded()
        assert rec.named(BLOCK_JOB_ERROR) == []
        await d.close()

    run(main())


@pytest.mark.parametrize("sync", ["none", "full"])
def test_job_ends_only_after_guest_triggered_copies_finish(sync: str) -> None:
    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        msrc, mtgt, fault = await _faulty_pair(d, "tgt")
        before = msrc.snapshot()
        guest = Root("guest")
        d.graph.attach(guest, "root", d.graph.get("src"))
        job = backup(d, job_id="job0", sync=sync, filter_node_name="cbw0")
        if sync == "full":
            job.pause()
            await rec.wait_status("job0", "paused")
        stall = fault.inject("any-write", nth=1, stall=True)
        write = asyncio.ensure_future(guest.node.write(3 * C, b"new"))
        await stall.wait_hits(1)  # the guest's copy of cluster 3 is writing to the target
        job.cancel()
        await asyncio.sleep(0.05)
        assert job.status == JobStatus.ABORTING
        assert rec.named(BLOCK_JOB_CANCELLED) == []
        assert d.graph.find("cbw0") is not None and not write.done()
        stall.release()
        await asyncio.wait_for(job.wait_concluded(), 5)
        assert write.done()
        await write
        assert rec.trace("job0")[-3:] == [BLOCK_JOB_CANCELLED, "concluded", "null"]
        assert d.graph.find("cbw0") is None and guest.node is d.graph.get("src")
        assert mtgt.snapshot()[3 * C : 4 * C] == before[3 * C : 4 * C]
        assert msrc.snapshot()[3 * C : 3 * C + 3] == b"new"
        await d.close()

    run(main())


# ---------------------------------------------------------------------- validation


async def _validation_setup(d: Daemon) -> Root:
    await memory(d, "src", MiB)
    await memory(d, "tgt", MiB)
    await memory(d, "small", MiB // 2)
    await memory(d, "small-t", MiB // 2)
    guest = Root("guest")
    d.graph.attach(guest, "root", d.graph.get("src"))
    return guest


CASES: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("same node", {"target": "src"}, BlockError, "Source and target cannot be the same"),
    ("sizes", {"target": "small"}, BlockError, "Source and target image have different sizes"),
    ("workers 0", {"perf": BackupPerf(max_workers=0)}, BlockError,
     "max-workers must be between 1 and 2147483647"),
    ("workers big", {"perf": BackupPerf(max_workers=2**31)}, BlockError,
     "max-workers must be between 1 and 2147483647"),
    ("chunk < 0", {"perf": BackupPerf(max_chunk=-1)}, BlockError,
     "max-chunk must be zero (which means no limit) or positive"),
    ("chunk < cluster", {"perf": BackupPerf(max_chunk=4096)}, BlockError,
     "Required max-chunk (4096) is less than backup cluster size (65536)"),
    ("chunk < min cluster", {"perf": BackupPerf(max_chunk=C, min_cluster_size=2 * C)}, BlockError,
     "Required max-chunk (65536) is less than backup cluster size (131072)"),
    ("min cluster", {"perf": BackupPerf(min_cluster_size=3 * C)}, BlockError,
     "min-cluster-size needs to be a power of 2"),
    ("incremental", {"sync": "incremental"}, BlockError,
     "must provide a valid bitmap name for 'incremental' sync mode"),
    ("bitmap sync", {"sync": "bitmap"}, BlockError,
     "must provide a valid bitmap name for 'bitmap' sync mode"),
    ("incremental mode", {"sync": "incremental", "bitmap": "b0", "bitmap_mode": "never"}, BlockError,
     "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"),
    ("unknown bitmap", {"sync": "bitmap", "bitmap": "bitmap404", "bitmap_mode": "on-success"}, BlockError,
     "Bitmap 'bitmap404' could not be found"),
    ("mode without bitmap", {"bitmap_mode": "on-success"}, BlockError,
     "Cannot specify bitmap sync mode without a bitmap"),
    ("bad sync", {"sync": "mirror"}, BlockError, "Parameter 'sync' does not accept value 'mirror'"),
    ("unknown device", {"device": "x"}, BlockError, "Cannot find device='x' nor node-name='x'"),
    ("unknown target", {"target": "y"}, BlockError, "Cannot find device='y' nor node-name='y'"),
    ("invalid job id", {"job_id": "1job"}, JobError, "Invalid job ID '1job'"),
    ("duplicate job id", {"job_id": "busy"}, JobError, "Job ID 'busy' already in use"),
    ("negative speed", {"speed": -1}, JobError, "Parameter 'speed' expects a non-negative value"),
    ("bad filter name", {"filter_node_name": "9f"}, BlockError, "Invalid node-name: '9f'"),
    ("taken filter name", {"filter_node_name": "tgt"}, BlockError, "Duplicate nodes with node-name='tgt'"),
    # QEMU's order: do_backup_common (bitmap arguments), then backup_job_create: same node, x-perf ranges,
    # sizes, the filter (min-cluster-size), max-chunk vs cluster, then the job (id, then speed).
    ("bitmap before same node", {"sync": "incremental", "target": "src"}, BlockError,
     "must provide a valid bitmap name for 'incremental' sync mode"),
    ("same node before x-perf", {"target": "src", "perf": BackupPerf(max_workers=0)}, BlockError,
     "Source and target cannot be the same"),
    ("workers before chunk", {"perf": BackupPerf(max_workers=0, max_chunk=-1)}, BlockError,
     "max-workers must be between 1 and 2147483647"),
    ("x-perf before sizes", {"target": "small", "perf": BackupPerf(max_chunk=-1)}, BlockError,
     "max-chunk must be zero (which means no limit) or positive"),
    ("sizes before min cluster", {"target": "small", "perf": BackupPerf(min_cluster_size=3 * C)}, BlockError,
     "Source and target image have different sizes"),
    ("sizes before speed", {"target": "small", "speed": -1}, BlockError,
     "Source and target image have different sizes"),
    ("min cluster before chunk", {"perf": BackupPerf(min_cluster_size=3 * C, max_chunk=4096)}, BlockError,
     "min-cluster-size needs to be a power of 2"),
    ("chunk before job id", {"job_id": "1job", "perf": BackupPerf(max_chunk=4096)}, BlockError,
     "Required max-chunk (4096) is less than backup cluster size (65536)"),
    ("chunk before speed", {"speed": -1, "perf": BackupPerf(max_chunk=4096)}, BlockError,
     "Required max-chunk (4096) is less than backup cluster size (65536)"),
    ("job id before speed", {"job_id": "1job", "speed": -1}, JobError, "Invalid job ID '1job'"),
    ("duplicate id before speed", {"job_id": "busy", "speed": -1}, JobError, "Job ID 'busy' already in use"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "cls", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validation_message_and_nothing_left_behind(
    args: dict[str, Any], cls: type[Exception], message: str
) -> None:
    async def main() -> None:
        d = Daemon()
        guest = await _validation_setup(d)
        busy = None
        if args.get("job_id") == "busy":
            busy = backup(d, job_id="busy", sync="none", device="small", target="small-t")
        rec = Recorder(d)
        nodes = dict(d.graph.nodes)
        parents = {name: list(node.parents) for name, node in nodes.items()}
        fields = {"device": "src", "target": "tgt", "sync": "full", "job_id": "job0", **args}
        with pytest.raises(cls) as info:
            d.blockdev_backup(BackupParams(**fields))
        assert type(info.value) is cls and str(info.value) == message
        # Nothing remains: no filter node, every edge as before, no job, no event.
        assert d.graph.nodes == nodes
        assert {name: list(node.parents) for name, node in nodes.items()} == parents
        assert guest.node is d.graph.get("src")
        assert d.jobs.list() == ([busy] if busy is not None else [])
        # No event, except QEMU's created-and-dropped job for a negative speed.
        dropped = [{"id": "job0", "status": "created"}, {"id": "job0", "status": "null"}]
        assert [e.data for e in rec.events] == (dropped if message.startswith("Parameter 'speed'") else [])
        if busy is not None:
            busy.cancel()
            await busy.wait_concluded()
        await d.close()

    run(main())


# ---------------------------------------------------------------------- copy offloading


def test_copy_range_between_files_is_exact_and_sparse(tmp_path: Path) -> None:
    async def main() -> None:
        d = Daemon()
        rec = Recorder(d)
        size = 4 * MiB
        src, tgt = await backend_pair(d, "file", tmp_path, size)
        await write_layout(src, seed=9)
        job = backup(d, job_id="job0", perf=BackupPerf(use_copy_range=True))
        bcs = job.bcs
        await job.wait_concluded()
        assert "error" not in rec.named(BLOCK_JOB_COMPLETED)[0]
        assert bcs.use_copy_range  # copy_file_range worked: no fall back to read/write
        assert await contents(tgt) == await contents(src)
        assert await layout(tgt) == await layout(src)
        assert os.stat(tmp_path / "tgt").st_blocks == os.stat(tmp_path / "src").st_blocks
        await d.close()

    run(main())
