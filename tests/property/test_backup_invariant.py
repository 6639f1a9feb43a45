"""The invariant that matters most (DESIGN.md), as a property.

A backup started at instant T holds, for every byte, the value that byte had at T, whatever writes,
write-zeroes and discards reach the device meanwhile; and the device ends up with every acknowledged write.

How the test makes the expectation exact despite concurrency
------------------------------------------------------------

T is the moment the job is created (``backup_job_create``, the first half of ``Daemon.blockdev_backup``):
the filter is in the graph and the copy bitmap is set in that one loop step, and no request is in flight
then (the writers start afterwards).  The test reads the whole source just before: this is the
*snapshot*; the target must equal it at the end.

Writers run concurrently with the job (and with each other) but each **owns** a disjoint set of bytes:
the disk is cut into stripes of ``stripe`` bytes, shifted by ``phase``, and stripe ``k`` belongs to writer
``k % writers``.  Stripes are unaligned and usually narrower than a cluster, so one cluster is shared by
several writers, whose copy-before-write requests then race for it::

    cluster     |<------------------ 64 KiB ------------------>|<--------- ...
    stripes     |  w0  |  w1  |  w2  |  w0  |  w1  |  w2  |  w0  |  w1 ...
    ops            [==]    [=======]        [=]   [=====]        (each inside one stripe of its writer)

Every operation of a writer lies inside one of its own stripes, and a writer awaits each operation before
issuing its next one.  So the final value of every byte is decided by its owner alone, in the owner's
program order, whatever the interleaving: the expected source is the snapshot with each writer's
*acknowledged* operations applied in order.  Discard on ``memory`` (opened ``discard=unmap``, like the
file) zeroes exactly its range; on ``file``
(opened ``discard=unmap``, buffered, so ``request_alignment`` is 1) it punches exactly its range, which
reads back as zeros -- both modelled as "becomes zeros".  Files are also opened with ``cache.direct``
(``request_alignment`` 4096): unaligned writes then become read-modify-write cycles of shared 4 KiB blocks
(the generic layer serialises them), and discard only punches the whole blocks inside its range, which is
what the model zeroes.  With one writer the stripe is the whole disk, so
operations also span many clusters.

What makes the interleavings varied:

* operations are aligned (512, 4096, cluster) or not, and write data, zero data, write-zeroes (with or
  without ``MAY_UNMAP``) or discard;
* before an operation a writer yields a few times, or waits until the job has copied some fraction of the
  disk (so writes land before, during and after the background copy reaches their clusters);
* the job runs with a random cluster size (``min-cluster-size``), ``max-chunk``, ``max-workers`` and
  sometimes a speed limit that keeps it running for ~0.1 s; it starts at once or a few loop steps after
  the snapshot instant (writes then meet a created job), and it is paused and resumed, or given another
  speed, at random moments while the writers run;
* optionally a yielding filter sits on the source and on the target, so a copy task is suspended between
  claiming its clusters, reading the source and writing the target, as with real I/O latency;
* the source has holes (``sync=top`` on a disk without backing must behave as ``full``), and the target
  is sometimes pre-filled with garbage -- after it was opened, for files -- so zero clusters must really be
  written.

Backends: ``memory`` nodes and ``file`` nodes (sparse files in /dev/shm when it exists).

The fault property adds a fault-inject filter over the target that fails the ``nth`` target write once
(``on-target-error=report``), and checks what each path must do: a background failure fails the job with
the errno's text; a copy-before-write failure fails the guest write (``break-guest-write``: its data
never reaches the source, the job goes on and still produces the exact snapshot) or fails the job
(``break-snapshot``: the write goes through).  The source always holds every acknowledged write.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cowbackup.block.align import align_down, align_up
from cowbackup.block.drivers.file import create_file
from cowbackup.block.filters.fault import FaultNode
from cowbackup.block.graph import BlockGraph, Root
from cowbackup.block.node import NO_FLAGS, BlockNode, Buffer, Extent, FilterNode, RequestFlags
from cowbackup.daemon import Daemon
from cowbackup.jobs.backup import BackupParams, BackupPerf, backup_job_create
from cowbackup.jobs.events import BLOCK_JOB_COMPLETED, BLOCK_JOB_ERROR, Event
from cowbackup.jobs.job import JobError, JobStatus

KiB = 1024
MiB = 1024 * KiB
CLUSTERS = (64 * KiB, 128 * KiB, 256 * KiB)
TIMEOUT = 30.0
SHM = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _direct_io_dir() -> str | None:
    """A directory whose file system takes O_DIRECT (tmpfs only since Linux 6.6), or None."""
    for directory in (SHM, tempfile.gettempdir()):
        if directory is None:
            continue
        try:
            with tempfile.NamedTemporaryFile(dir=directory) as f:
                os.close(os.open(f.name, os.O_RDWR | os.O_DIRECT))
            return directory
        except OSError:
            continue
    return None


DIRECT_DIR = _direct_io_dir()

PROPERTY_SETTINGS = settings(
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------------- test drivers


class YieldNode(FilterNode):
    """A filter that yields to the event loop 0-2 times before passing a request on.

    It stands for I/O latency on nodes that have none (``memory``): a copy task is suspended between its
    block-status query, its source read and its target write, so writers get to run in between.
    """

    driver_name = "test-yield"

    def __init__(self, node_name: str, rng: random.Random) -> None:
        super().__init__(node_name)
        self.rng = rng

    async def _jitter(self) -> None:
        for _ in range(self.rng.randrange(3)):
            await asyncio.sleep(0)

    async def read(self, offset: int, buf: Buffer) -> None:
        await self._jitter()
        await super().read(offset, buf)

    async def write(self, offset: int, data: Buffer, flags: RequestFlags = NO_FLAGS) -> None:
        await self._jitter()
        await super().write(offset, data, flags)

    async def write_zeroes(self, offset: int, length: int, flags: RequestFlags = NO_FLAGS) -> None:
        await self._jitter()
        await super().write_zeroes(offset, length, flags)

    async def discard(self, offset: int, length: int) -> None:
        await self._jitter()
        await super().discard(offset, length)

    async def block_status(self, offset: int, length: int) -> Extent:
        await self._jitter()
        return await super().block_status(offset, length)


def yield_above(graph: BlockGraph, below: BlockNode, name: str, rng: random.Random) -> YieldNode:
    node = YieldNode(name, rng)
    graph.add(node)
    graph.attach(node, "file", below)
    node.refresh_limits()
    return node


class Events:
    """Every event of the daemon, in order."""

    def __init__(self, daemon: Daemon) -> None:
        self.events: list[Event] = []
        daemon.jobs.events.subscribe(self.events.append)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.name == name]


# ---------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Op:
    """One guest request; ``wait`` < 0: yield ``-wait - 1`` times first; >= 0: wait until the job has
    copied ``wait``/8 of the disk (or ended)."""

    kind: str  # write | zero-data | write-zeroes | discard
    offset: int
    length: int
    seed: int
    unmap: bool
    wait: int


@dataclass(frozen=True)
class Control:
    """A job verb issued while writers run: ``pause`` (then ``resume`` after ``arg`` loop yields) or
    ``speed`` (set-speed to ``arg`` disks per second, 0 = unlimited), once ``wait``/8 of the disk is
    copied."""

    wait: int
    action: str
    arg: int


@dataclass(frozen=True)
class Scenario:
    """One drawn run: the disk, the job's parameters, the writers (``writers[w]`` = writer w's program)."""

    size: int
    cluster: int
    max_chunk: int
    max_workers: int
    speed: int
    sync: str
    layout: tuple[tuple[int, int], ...]  # data extents of the source at T; the rest are holes
    seed: int
    stripe: int
    phase: int
    writers: tuple[tuple[Op, ...], ...]
    jitter: bool
    prefill_target: bool
    target_unmap: bool
    start_delay: int = 0  # loop yields between the snapshot instant and the job's start
    controls: tuple[Control, ...] = ()
    direct: bool = False  # file nodes opened with cache.direct (request_alignment 4096)


def owned_stripes(size: int, stripe: int, phase: int, nwriters: int, writer: int) -> list[tuple[int, int]]:
    """The byte ranges ``[a, b)`` that ``writer`` owns (see the module docstring)."""
    out: list[tuple[int, int]] = []
    k = writer
    while True:
        a = max(k * stripe - phase, 0)
        b = min((k + 1) * stripe - phase, size)
        if a >= size:
            return out
        if a < b:
            out.append((a, b))
        k += nwriters


@st.composite
def ops_in(draw: st.DrawFn, ranges: list[tuple[int, int]], cluster: int) -> Op:
    a, b = ranges[draw(st.integers(0, len(ranges) - 1))]
    start = draw(st.integers(a, b - 1))
    length = draw(st.integers(1, min(b - start, 3 * cluster)))
    align = draw(st.sampled_from((1, 1, 512, 4096, cluster)))
    s, e = align_up(start, align), align_down(start + length, align)
    if s < e:
        start, length = s, e - s
    kind = draw(st.sampled_from(("write", "write", "write", "zero-data", "write-zeroes", "discard")))
    wait = draw(st.one_of(st.integers(-3, -1), st.integers(0, 8)))
    return Op(kind, start, length, draw(st.integers(0, 2**32)), draw(st.booleans()), wait)


@st.composite
def controls(draw: st.DrawFn) -> Control:
    action = draw(st.sampled_from(("pause", "pause", "speed")))
    arg = draw(st.integers(0, 20) if action == "pause" else st.sampled_from((0, 8, 16)))
    return Control(draw(st.integers(0, 7)), action, arg)


@st.composite
def scenarios(draw: st.DrawFn, max_size: int = 4 * MiB, direct: bool = False) -> Scenario:
    base = draw(st.sampled_from([s for s in (256 * KiB, 512 * KiB, MiB, 2 * MiB, 4 * MiB) if s <= max_size]))
    size = base + draw(st.sampled_from((0, 0, 0, 4096, 12345)))
    cluster = draw(st.sampled_from(CLUSTERS))
    max_chunk = cluster * draw(st.sampled_from((0, 1, 2, 4)))
    nwriters = draw(st.integers(1, 4))
    if nwriters == 1:
        stripe, phase = size, 0
    else:
        stripe = draw(st.integers(512, 3 * cluster))
        phase = draw(st.integers(0, stripe - 1))
    writers: list[tuple[Op, ...]] = []
    for w in range(nwriters):
        ranges = owned_stripes(size, stripe, phase, nwriters, w)
        if not ranges:
            writers.append(())
            continue
        writers.append(tuple(draw(st.lists(ops_in(ranges, cluster), min_size=1, max_size=10))))
    extents = draw(
        st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, size // 4)), min_size=0, max_size=5)
    )
    return Scenario(
        size=size,
        cluster=cluster,
        max_chunk=max_chunk,
        max_workers=draw(st.integers(1, 8)),
        # 8 disks/s: with max-chunk set, the first 100 ms slice admits ~80% of the disk and the rest
        # waits for the stretched slice to end, so the job lasts ~0.1 s: long enough for writes to overlap.
        speed=draw(st.sampled_from((0, 0, 0, 8 * size))),
        sync=draw(st.sampled_from(("full", "top"))),
        layout=tuple((o, min(n, size - o)) for o, n in extents),
        seed=draw(st.integers(0, 2**32)),
        stripe=stripe,
        phase=phase,
        writers=tuple(writers),
        jitter=draw(st.booleans()),
        prefill_target=draw(st.booleans()),
        target_unmap=draw(st.booleans()),
        start_delay=draw(st.sampled_from((0, 0, 1, 3, 10))),
        controls=tuple(draw(st.lists(controls(), max_size=3))),
        direct=direct and draw(st.booleans()),
    )


# ---------------------------------------------------------------------- running one scenario


@contextmanager
def workdir(backend: str, direct: bool = False) -> Iterator[str]:
    if backend == "memory":
        yield ""
        return
    with tempfile.TemporaryDirectory(dir=DIRECT_DIR if direct else SHM, prefix="cowbackup-prop-") as path:
        yield path


async def open_pair(daemon: Daemon, sc: Scenario, backend: str, path: str) -> tuple[BlockNode, BlockNode]:
    """The source (data extents of the layout, holes elsewhere) and the target, both ``size`` bytes."""
    rng = random.Random(sc.seed)
    if backend == "memory":
        # discard=unmap: the guests' discards must reach the disk (the default, ignore, drops them).
        src = await daemon.blockdev_add(
            {"driver": "memory", "node-name": "src", "size": sc.size, "discard": "unmap"}
        )
        tgt = await daemon.blockdev_add({"driver": "memory", "node-name": "tgt", "size": sc.size})
        if sc.prefill_target:
            await tgt.write(0, rng.randbytes(sc.size))
    else:
        create_file(f"{path}/src", sc.size)
        create_file(f"{path}/tgt", sc.size)
        cache = {"direct": sc.direct}
        src = await daemon.blockdev_add(
            {
                "driver": "file",
                "node-name": "src",
                "filename": f"{path}/src",
                "discard": "unmap",
                "cache": cache,
            }
        )
        tgt = await daemon.blockdev_add(
            {
                "driver": "file",
                "node-name": "tgt",
                "filename": f"{path}/tgt",
                "discard": "unmap" if sc.target_unmap else "ignore",
                "cache": cache,
            }
        )
        if sc.prefill_target:
            # Written after opening: the file was a hole when opened, but is not any more.
            await tgt.write(0, rng.randbytes(sc.size))
    for offset, length in sc.layout:
        await src.write(offset, rng.randbytes(length))
    return src, tgt


async def read_all(node: BlockNode) -> bytes:
    buf = bytearray(node.size)
    await node.read(0, buf)
    return bytes(buf)


@dataclass(repr=False)  # asyncio reprs a finished task's result; megabytes of bytes are slow to repr
class Outcome:
    snapshot: bytes
    expected: bytearray
    source: bytes
    target: bytes
    events: Events
    failed_ops: list[tuple[Op, OSError]]
    ops_during_job: int
    pauses: int
    filter_left: bool
    guest_on_device: bool


async def run_scenario(
    sc: Scenario,
    backend: str,
    path: str,
    *,
    fault: tuple[int, int] | None = None,
    on_cbw_error: str = "break-guest-write",
) -> Outcome:
    daemon = Daemon()
    events = Events(daemon)
    rng = random.Random(sc.seed ^ 0x5EED)
    src, tgt = await open_pair(daemon, sc, backend, path)
    device, target = "src", "tgt"
    if sc.jitter:
        device = yield_above(daemon.graph, src, "src-y", rng).node_name
    if fault is not None:
        faulty = FaultNode("tgt-f")
        daemon.graph.add(faulty)
        daemon.graph.attach(faulty, "file", tgt)
        faulty.refresh_limits()
        faulty.inject("any-write", nth=fault[0], errno=fault[1])
        target = "tgt-f"
    if sc.jitter:
        target = yield_above(daemon.graph, daemon.graph.get(target), "tgt-y", rng).node_name
    guest = Root("guest")
    daemon.graph.attach(guest, "root", daemon.graph.get(device))

    snapshot = await read_all(src)  # the instant T: nothing is in flight
    expected = bytearray(snapshot)
    perf = BackupPerf(max_workers=sc.max_workers, max_chunk=sc.max_chunk, min_cluster_size=sc.cluster)
    params = BackupParams(
        device,
        target,
        sc.sync,
        speed=sc.speed,
        filter_node_name="cbw",
        on_cbw_error=on_cbw_error,
        perf=perf,
    )
    # Daemon.blockdev_backup() is create + start; the two are split here so that writers may also run
    # between the snapshot instant and the start of the background copy (a created job, as in QEMU's
    # transactions).
    job = backup_job_create(daemon.graph, daemon.jobs, params)
    assert job.cluster_size == sc.cluster
    concluded = asyncio.ensure_future(job.wait_concluded())
    failed: list[tuple[Op, OSError]] = []
    during = paused = 0
    align = src.limits.request_alignment

    async def gate(wait: int) -> None:
        if wait < 0:
            for _ in range(-wait - 1):
                await asyncio.sleep(0)
        else:
            while not concluded.done() and job.progress_current * 8 < wait * sc.size:  # noqa: ASYNC110
                await asyncio.sleep(0.0005)

    async def controller() -> None:
        for control in sc.controls:
            await gate(control.wait)
            try:
                if control.action == "speed":
                    job.set_speed(control.arg * sc.size)
                    continue
                job.pause()
            except JobError:
                continue  # the job has finished running: verbs are refused
            for _ in range(control.arg):
                await asyncio.sleep(0)
            nonlocal paused
            paused += job.status == JobStatus.PAUSED
            job.resume()

    async def writer(ops: tuple[Op, ...]) -> None:
        nonlocal during
        for op in ops:
            await gate(op.wait)
            if not concluded.done():
                during += 1
            node = guest.node
            end = op.offset + op.length
            try:
                if op.kind == "write":
                    data = random.Random(op.seed).randbytes(op.length)
                    await node.write(op.offset, data)
                    expected[op.offset : end] = data
                elif op.kind == "zero-data":
                    await node.write(op.offset, bytes(op.length))
                    expected[op.offset : end] = bytes(op.length)
                elif op.kind == "write-zeroes":
                    flags = RequestFlags.MAY_UNMAP if op.unmap else NO_FLAGS
                    await node.write_zeroes(op.offset, op.length, flags)
                    expected[op.offset : end] = bytes(op.length)
                else:
                    await node.discard(op.offset, op.length)
                    # Only whole request_alignment blocks are discarded (1 unless cache.direct).
                    a, b = align_up(op.offset, align), align_down(end, align)
                    if a < b:
                        expected[a:b] = bytes(b - a)
            except OSError as err:
                failed.append((op, err))

    async def start() -> None:
        for _ in range(sc.start_delay):
            await asyncio.sleep(0)
        job.start()

    await asyncio.gather(start(), controller(), concluded, *(writer(ops) for ops in sc.writers))
    outcome = Outcome(
        snapshot=snapshot,
        expected=expected,
        source=await read_all(src),
        target=await read_all(tgt),
        events=events,
        failed_ops=failed,
        ops_during_job=during,
        pauses=paused,
        filter_left=daemon.graph.find("cbw") is not None,
        guest_on_device=guest.node is daemon.graph.get(device),
    )
    await daemon.close()
    return outcome


def run(coro: Any) -> Outcome:
    result: Outcome = asyncio.run(asyncio.wait_for(coro, TIMEOUT))
    return result


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> str:
    if len(a) != len(b):
        return f"lengths differ: {len(a)} != {len(b)}"
    for i in range(0, len(a), 4096):
        if a[i : i + 4096] != b[i : i + 4096]:
            j = next(k for k in range(i, min(i + 4096, len(a))) if a[k] != b[k])
            return f"first difference at byte {j} (cluster of 64 KiB #{j // 65536})"
    return "equal"


def check_success(sc: Scenario, out: Outcome) -> None:
    completed = out.events.named(BLOCK_JOB_COMPLETED)
    assert len(completed) == 1, out.events.events
    assert "error" not in completed[0], completed[0]
    assert completed[0]["len"] == completed[0]["offset"] == sc.size
    assert out.failed_ops == []
    assert out.target == out.snapshot, "target != source at T: " + first_difference(out.target, out.snapshot)
    assert out.source == out.expected, "source lost a write: " + first_difference(out.source, out.expected)
    assert not out.filter_left and out.guest_on_device


def label(sc: Scenario, out: Outcome) -> None:
    event(f"writers={len(sc.writers)}")
    ops = out.ops_during_job
    event("ops during the job: " + ("0" if ops == 0 else "1-4" if ops < 5 else "5+"))
    if out.pauses:
        event("the job was paused while writers ran")


# ---------------------------------------------------------------------- the properties


@settings(PROPERTY_SETTINGS, max_examples=300)
@given(sc=scenarios())
def test_backup_is_point_in_time_memory(sc: Scenario) -> None:
    out = run(run_scenario(sc, "memory", ""))
    label(sc, out)
    check_success(sc, out)


@settings(PROPERTY_SETTINGS, max_examples=150)
@given(sc=scenarios(max_size=2 * MiB, direct=DIRECT_DIR is not None))
def test_backup_is_point_in_time_file(sc: Scenario) -> None:
    event(f"cache.direct={sc.direct}")
    with workdir("file", sc.direct) as path:
        out = run(run_scenario(sc, "file", path))
    label(sc, out)
    check_success(sc, out)


@settings(PROPERTY_SETTINGS, max_examples=200)
@given(
    sc=scenarios(max_size=MiB),
    nth=st.integers(1, 8),
    err=st.sampled_from((errno.EIO, errno.ENOSPC, errno.EPERM)),
    on_cbw_error=st.sampled_from(("break-guest-write", "break-snapshot")),
    backend=st.sampled_from(("memory", "file")),
)
def test_target_write_failure_never_corrupts_the_source(
    sc: Scenario, nth: int, err: int, on_cbw_error: str, backend: str
) -> None:
    with workdir(backend) as path:
        out = run(run_scenario(sc, backend, path, fault=(nth, err), on_cbw_error=on_cbw_error))
    completed = out.events.named(BLOCK_JOB_COMPLETED)
    assert len(completed) == 1, out.events.events
    job_error = completed[0].get("error")
    # The source holds exactly the acknowledged writes: a failed write left no trace.
    assert out.source == out.expected, "source corrupted: " + first_difference(out.source, out.expected)
    assert not out.filter_left and out.guest_on_device
    errors = out.events.named(BLOCK_JOB_ERROR)
    if out.failed_ops:
        # A copy-before-write failed under break-guest-write: only that write failed, with the errno.
        event("fault hit a guest write")
        assert on_cbw_error == "break-guest-write"
        assert [e.errno for _, e in out.failed_ops] == [err]
        # The snapshot survived: the job copied the clusters again and finished exactly.
        assert job_error is None and errors == []
        assert out.target == out.snapshot, first_difference(out.target, out.snapshot)
    elif job_error is not None:
        event("fault failed the job")
        assert job_error == os.strerror(err)
        # (offset may still reach len: a guest write can re-copy the clusters of the failed task.)
        assert completed[0]["offset"] <= completed[0]["len"] == sc.size
        # A background failure is reported as a write error; a broken snapshot has no BLOCK_JOB_ERROR.
        assert errors in (
            [],
            [{"device": "src-y" if sc.jitter else "src", "operation": "write", "action": "report"}],
        )
        if errors == []:
            assert on_cbw_error == "break-snapshot"
    else:
        event("fault never fired")
        assert errors == []
        assert out.target == out.snapshot, first_difference(out.target, out.snapshot)


# ---------------------------------------------------------------------- stress (no Hypothesis)


@pytest.mark.parametrize("backend", ["memory", "file"])
def test_stress_32mib_four_writers_for_the_whole_job(backend: str) -> None:
    """32 MiB, 4 writers hammering shared clusters from job start to job end, unaligned and aligned."""
    size = 32 * MiB
    cluster = 64 * KiB
    stripe, phase, nwriters = 3001, 17, 4

    async def main(path: str) -> None:
        sc = Scenario(
            size=size,
            cluster=cluster,
            max_chunk=MiB,
            max_workers=4,
            speed=16 * MiB,
            sync="full",
            layout=((0, 8 * MiB), (12 * MiB + 5, 3 * MiB), (30 * MiB, 2 * MiB)),
            seed=7,
            stripe=stripe,
            phase=phase,
            writers=(),
            jitter=False,
            prefill_target=backend == "memory",
            target_unmap=True,
        )
        daemon = Daemon()
        events = Events(daemon)
        src, tgt = await open_pair(daemon, sc, backend, path)
        guest = Root("guest")
        daemon.graph.attach(guest, "root", src)
        snapshot = await read_all(src)
        expected = bytearray(snapshot)
        job = daemon.blockdev_backup(
            BackupParams("src", "tgt", "full", speed=sc.speed, perf=BackupPerf(max_workers=4, max_chunk=MiB))
        )
        concluded = asyncio.ensure_future(job.wait_concluded())
        counts = [0] * nwriters

        async def writer(w: int) -> None:
            ranges = owned_stripes(size, stripe, phase, nwriters, w)
            wrng = random.Random(w)
            per_mib = len(ranges) * MiB // size
            while not concluded.done():
                if wrng.random() < 0.8:
                    # Near the background copy's front (the first cluster still to copy), where writes
                    # meet clusters that are being copied.
                    front = job.bcs.bitmap.next_dirty(0)
                    first = (front or 0) * len(ranges) // size
                    i = min(first + wrng.randrange(per_mib), len(ranges) - 1)
                else:
                    i = wrng.randrange(len(ranges))
                a, b = ranges[i]
                start = wrng.randrange(a, b)
                length = wrng.randrange(1, b - start + 1)
                if wrng.random() < 0.3:
                    s, e = align_up(start, 512), align_down(start + length, 512)
                    if s < e:
                        start, length = s, e - s
                kind = wrng.randrange(4)
                if kind < 2:
                    data = wrng.randbytes(length)
                    await guest.node.write(start, data)
                    expected[start : start + length] = data
                elif kind == 2:
                    await guest.node.write_zeroes(start, length, RequestFlags.MAY_UNMAP)
                    expected[start : start + length] = bytes(length)
                else:
                    await guest.node.discard(start, length)
                    expected[start : start + length] = bytes(length)
                counts[w] += 1
                await asyncio.sleep(0.001 if wrng.random() < 0.5 else 0)

        await asyncio.gather(concluded, *(writer(w) for w in range(nwriters)))
        completed = events.named(BLOCK_JOB_COMPLETED)
        assert completed == [
            {"type": "backup", "device": "src", "len": size, "offset": size, "speed": sc.speed}
        ]
        assert all(n > 10 for n in counts), counts
        target = await read_all(tgt)
        assert target == snapshot, first_difference(target, snapshot)
        source = await read_all(src)
        assert source == expected, first_difference(source, expected)
        await daemon.close()

    with workdir(backend) as path:
        asyncio.run(asyncio.wait_for(main(path), TIMEOUT))
