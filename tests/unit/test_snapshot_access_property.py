"""The snapshot view under concurrency, as a property.

T is the moment ``blockdev-add driver=copy-before-write`` returns (the filter is in the graph, its copy
bitmap set, in one loop step; nothing is in flight).  The test keeps the disk as it was then; afterwards,
while guest writers change the disk through the filter, every snapshot read must return exactly those
bytes, and every block status of the view must agree with them (a ZERO extent reads as zeros then).

Who does what, so that every expectation is exact whatever the interleaving:

* writers own disjoint sets of clusters and write, write-zeroes or discard (aligned or not) only inside
  their own clusters, awaiting each operation: the final disk is the T image with each writer's
  operations applied in order;
* readers read random ranges and ask block status; reader 0 also discards clusters of a set ``D`` chosen
  up front, and the other readers never touch ``D`` -- so reader 0 alone knows when a cluster stops being
  readable, and EACCES is expected exactly for ranges touching a cluster outside the snapshot's bitmap
  (when there is one) or, for reader 0, one it already discarded;
* yielding filters sit between the filter and both its children, so copy tasks, guest requests and
  snapshot reads are suspended between their steps and overlap in many orders.
"""

from __future__ import annotations

import asyncio
import errno
import random
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowbackup.block.drivers import open_node
from cowbackup.block.drivers.memory import MemoryNode
from cowbackup.block.errors import RequestError
from cowbackup.block.graph import BlockGraph, Root
from cowbackup.block.node import NO_FLAGS, BlockNode, Buffer, Extent, FilterNode, RequestFlags

C = 64 * 1024


class Jitter(FilterNode):
    """Yields to the loop 0-2 times before and after passing each request on (I/O latency)."""

    driver_name = "test-jitter"

    def __init__(self, node_name: str, rng: random.Random) -> None:
        super().__init__(node_name)
        self.rng = rng

    async def _yield(self) -> None:
        for _ in range(self.rng.randrange(3)):
            await asyncio.sleep(0)

    async def read(self, offset: int, buf: Buffer) -> None:
        await self._yield()
        await super().read(offset, buf)
        await self._yield()

    async def write(self, offset: int, data: Buffer, flags: RequestFlags = NO_FLAGS) -> None:
        await self._yield()
        await super().write(offset, data, flags)
        await self._yield()

    async def write_zeroes(self, offset: int, length: int, flags: RequestFlags = NO_FLAGS) -> None:
        await self._yield()
        await super().write_zeroes(offset, length, flags)
        await self._yield()

    async def discard(self, offset: int, length: int) -> None:
        await self._yield()
        await super().discard(offset, length)
        await self._yield()

    async def block_status(self, offset: int, length: int) -> Extent:
        await self._yield()
        ext = await super().block_status(offset, length)
        await self._yield()
        return ext


def jitter_above(graph: BlockGraph, below: BlockNode, name: str, rng: random.Random) -> Jitter:
    """Insert a :class:`Jitter` above ``below``: its parents (the guest) now go through it."""
    node = Jitter(name, rng)
    graph.add(node)
    graph.insert_filter(node, below)
    return node


@dataclass(frozen=True)
class Scenario:
    clusters: int
    seed: int
    writers: int
    readers: int
    ops: int
    bitmap: frozenset[int] | None
    discards: frozenset[int]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    clusters = draw(st.integers(2, 12))
    every = st.integers(0, clusters - 1)
    bitmap = draw(st.none() | st.frozensets(every, min_size=1))
    return Scenario(
        clusters=clusters,
        seed=draw(st.integers(0, 2**32)),
        writers=draw(st.integers(1, 3)),
        readers=draw(st.integers(1, 3)),
        ops=draw(st.integers(1, 12)),
        bitmap=bitmap,
        discards=draw(st.frozensets(every, max_size=clusters // 2)),
    )


def _range(rng: random.Random, start: int, end: int) -> tuple[int, int]:
    """A random non-empty range inside [start, end): aligned to a cluster, to 512 or not at all."""
    align = rng.choice((1, 512, C))
    a = rng.randrange(start, end) // align * align
    b = min(end, a + rng.randrange(1, 2 * C) // align * align + align)
    return max(a, start), b


class Run:
    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.rng = random.Random(sc.seed)
        self.size = sc.clusters * C
        self.failures: list[str] = []

    async def setup(self) -> None:
        graph = self.graph = BlockGraph()
        src = await open_node(
            graph, {"driver": "memory", "node-name": "src", "size": self.size, "discard": "unmap"}
        )
        tgt = await open_node(
            graph, {"driver": "memory", "node-name": "tgt", "size": self.size, "discard": "unmap"}
        )
        assert isinstance(src, MemoryNode) and isinstance(tgt, MemoryNode)
        self.src = src
        for n in range(self.sc.clusters):
            kind = self.rng.choice(("data", "zero", "half"))
            if kind != "zero":
                length = C if kind == "data" else C // 2
                await src.write(n * C + self.rng.randrange(C - length + 1), self.rng.randbytes(length))
        self.guest = Root("guest")
        graph.attach(self.guest, "root", src)
        options: dict[str, object] = {"driver": "copy-before-write", "node-name": "cbw"}
        options["file"] = jitter_above(graph, src, "src-j", self.rng).node_name
        options["target"] = jitter_above(graph, tgt, "tgt-j", self.rng).node_name
        if self.sc.bitmap is not None:
            bm = src.dirty_bitmaps.create("b", 4096)
            for n in self.sc.bitmap:
                bm.bits.set(n * C + self.rng.randrange(C), 1)
            options["bitmap"] = {"node": "src", "name": "b"}
        # guest -> src-j -> src now; the filter goes between the guest and src-j.
        self.t_image = src.snapshot()
        await open_node(graph, options)
        assert self.guest.node.node_name == "cbw"
        self.snap = await open_node(
            graph, {"driver": "snapshot-access", "node-name": "snap", "file": "cbw", "discard": "unmap"}
        )
        self.expected = bytearray(self.t_image)

    def readable(self, offset: int, end: int, discarded: set[int]) -> bool:
        for n in range(offset // C, (end - 1) // C + 1):
            if n in discarded or (self.sc.bitmap is not None and n not in self.sc.bitmap):
                return False
        return True

    async def writer(self, k: int, owned: list[int]) -> None:
        rng = random.Random(self.rng.random())
        for _ in range(self.sc.ops):
            if not owned:
                return
            n = rng.choice(owned)
            offset, end = _range(rng, n * C, (n + 1) * C)
            kind = rng.choice(("write", "write", "zeroes", "discard"))
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
            node = self.guest.node
            if kind == "write":
                data = rng.randbytes(end - offset)
                await node.write(offset, data)
                self.expected[offset:end] = data
            elif kind == "zeroes":
                await node.write_zeroes(offset, end - offset, rng.choice((NO_FLAGS, RequestFlags.MAY_UNMAP)))
                self.expected[offset:end] = bytes(end - offset)
            else:
                await node.discard(offset, end - offset)  # memory discards read back as zeros
                self.expected[offset:end] = bytes(end - offset)

    async def reader(self, k: int) -> None:
        rng = random.Random(self.rng.random())
        discarded: set[int] = set()
        to_discard = sorted(self.sc.discards)
        rng.shuffle(to_discard)
        for _ in range(self.sc.ops):
            if k == 0 and to_discard and rng.random() < 0.3:
                n = to_discard.pop()
                await self.snap.discard(n * C, C)
                discarded.add(n)
                continue
            offset, end = _range(rng, 0, self.size)
            if k != 0 and any(offset < (n + 1) * C and n * C < end for n in self.sc.discards):
                continue
            await self.check_read(offset, end, discarded, rng.random() < 0.3)

    async def check_read(self, offset: int, end: int, discarded: set[int], status: bool) -> None:
        want = self.t_image[offset:end]
        ok = self.readable(offset, end, discarded)
        try:
            if status:
                ext = await self.snap.block_status(offset, end - offset)
                if ext.is_zero and want[: ext.length] != bytes(ext.length):
                    self.failures.append(f"block status says zero at {offset}+{ext.length}")
            else:
                buf = bytearray(end - offset)
                await self.snap.read(offset, buf)
                if buf != want:
                    self.failures.append(f"snapshot read {offset}..{end} differs from the disk at T")
        except RequestError as err:
            if ok or err.errno != errno.EACCES:
                self.failures.append(f"read {offset}..{end}: {err}")
            return
        if not ok:
            self.failures.append(f"read {offset}..{end} outside the snapshot succeeded")

    async def main(self) -> None:
        await self.setup()
        clusters = list(range(self.sc.clusters))
        self.rng.shuffle(clusters)
        owned = [clusters[k :: self.sc.writers] for k in range(self.sc.writers)]
        tasks = [self.writer(k, owned[k]) for k in range(self.sc.writers)]
        tasks += [self.reader(k) for k in range(self.sc.readers)]
        await asyncio.gather(*tasks)
        assert not self.failures, self.failures
        assert self.src.snapshot() == bytes(self.expected)
        # Everything still readable reads as at T, now that all writes are done.
        for n in range(self.sc.clusters):
            if self.readable(n * C, (n + 1) * C, set(self.sc.discards)):
                buf = bytearray(C)
                await self.snap.read(n * C, buf)
                assert buf == self.t_image[n * C : (n + 1) * C], f"cluster {n}"


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenarios())
def test_every_snapshot_read_is_the_disk_at_the_instant_the_filter_was_inserted(sc: Scenario) -> None:
    asyncio.run(Run(sc).main())
