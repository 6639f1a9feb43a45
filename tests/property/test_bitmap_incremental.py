"""An incremental chain as a property: full + incremental equals the disk when the incremental started.

::

    T0   bitmap d created and full backup -> t0 started in one loop step
         ops1 run while the full backup copies         => t0 == disk at T0
         ops2 run after it
    T1   sync=incremental bitmap=d -> t1 (a fresh, zero target)
         ops3 run while it copies                       => t1 == disk at T1 on every cluster a granule
                                                           dirtied by ops1 + ops2 touches, zeros elsewhere;
                                                           t0 overlaid with those clusters == disk at T1;
                                                           d == the granules ops3 touched

Writes, write-zeroes and discards of any alignment go through a guest edge on the source, so while a job
runs they pass through its copy-before-write filter; one writer runs its operations in order, yielding a
random number of times before each, so they land before, during and after the background copy reaches
their clusters. The bitmap's granularity is below, equal to or above the backup cluster.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from cowbackup.block.graph import Root
from cowbackup.block.node import BlockNode
from cowbackup.daemon import Daemon
from cowbackup.jobs.backup import BackupParams, BackupPerf

C = 64 * 1024


@dataclass(frozen=True)
class Op:
    kind: str  # write | zeroes | discard
    offset: int
    length: int
    yields: int
    seed: int


def ops(size: int) -> st.SearchStrategy[list[Op]]:
    def build(kind: str, offset: int, length: int, yields: int, seed: int) -> Op:
        return Op(kind, offset, max(1, min(length, size - offset)), yields, seed)

    one = st.builds(
        build,
        st.sampled_from(("write", "zeroes", "discard")),
        st.integers(0, size - 1),
        st.integers(1, 3 * C),
        st.integers(0, 6),
        st.integers(0, 2**16),
    )
    return st.lists(one, max_size=8)


async def apply(edge_node: BlockNode, op: Op) -> None:
    if op.kind == "write":
        await edge_node.write(op.offset, random.Random(op.seed).randbytes(op.length))
    elif op.kind == "zeroes":
        await edge_node.write_zeroes(op.offset, op.length)
    else:
        await edge_node.discard(op.offset, op.length)


async def read_all(node: BlockNode) -> bytes:
    buf = bytearray(node.size)
    await node.read(0, buf)
    return bytes(buf)


def granules(batch: list[Op], g: int) -> set[int]:
    return {n for op in batch for n in range(op.offset // g, (op.offset + op.length + g - 1) // g)}


@settings(max_examples=60, deadline=None)
@given(
    clusters=st.integers(4, 24),
    tail=st.sampled_from((0, 512, 4096, 40000)),
    granularity=st.sampled_from((512, 4096, C, 2 * C)),
    data=st.data(),
)
def test_full_plus_incremental_is_the_disk_at_the_incremental(
    clusters: int, tail: int, granularity: int, data: st.DataObject
) -> None:
    size = clusters * C + tail
    ops1, ops2, ops3 = (data.draw(ops(size)) for _ in range(3))
    chunk = data.draw(st.sampled_from((0, C, 4 * C)))
    workers = data.draw(st.sampled_from((1, 4, 64)))

    async def writer(guest: Root, batch: list[Op]) -> None:
        for op in batch:
            for _ in range(op.yields):
                await asyncio.sleep(0)
            await apply(guest.node, op)

    async def main() -> None:
        d = Daemon()
        for name in ("src", "t0", "t1"):
            # discard=unmap: the guest's discards must reach the disk (the default, ignore, drops them).
            await d.blockdev_add({"driver": "memory", "node-name": name, "size": size, "discard": "unmap"})
        src = d.graph.get("src")
        await src.write(0, random.Random(size).randbytes(size))
        guest = Root("guest")
        d.graph.attach(guest, "root", src)
        perf = BackupPerf(max_workers=workers, max_chunk=chunk)

        # T0: the bitmap and the full backup in one step, as a transaction does.
        bitmap = src.dirty_bitmaps.create("d", granularity)
        at_t0 = await read_all(src)
        full = d.blockdev_backup(BackupParams("src", "t0", "full", perf=perf))
        await asyncio.gather(writer(guest, ops1), full.wait_concluded())
        assert full.error is None
        t0 = await read_all(d.graph.get("t0"))
        assert t0 == at_t0

        await writer(guest, ops2)
        dirty = granules(ops1 + ops2, granularity)
        assert {off // granularity for off in range(0, size, granularity) if bitmap.bits.get(off)} == dirty
        at_t1 = await read_all(src)
        inc = d.blockdev_backup(BackupParams("src", "t1", "incremental", bitmap="d", perf=perf))
        await asyncio.gather(writer(guest, ops3), inc.wait_concluded())
        assert inc.error is None
        t1 = await read_all(d.graph.get("t1"))

        copied = {n * granularity // C + k for n in dirty for k in range(max(1, granularity // C))}
        chain = bytearray(t0)
        for c in range((size + C - 1) // C):
            piece = slice(c * C, min((c + 1) * C, size))
            if c in copied:
                assert t1[piece] == at_t1[piece], f"cluster {c} is not the disk at T1"
                chain[piece] = t1[piece]
            else:
                assert t1[piece] == bytes(piece.stop - piece.start), f"clean cluster {c} was copied"
        assert bytes(chain) == at_t1
        heir = src.dirty_bitmaps.find("d")
        assert heir is not None and not heir.busy
        after = {off // granularity for off in range(0, size, granularity) if heir.bits.get(off)}
        assert after == granules(ops3, granularity)
        await d.close()

    asyncio.run(asyncio.wait_for(main(), 30))
