"""Copy-before-read: the disk an instant restore serves equals the snapshot with the clients' writes
applied -- while the restore runs, whatever reads, writes and zero writes race it, and in TARGET at the end.

Random snapshots (data, zeros) on memory nodes, a TARGET that reads as zeros or holds garbage, batches
of concurrent requests on disjoint ranges (aligned or not, inside a chunk or across several) racing the
background copy; every read is checked against the model as it returns.
"""

from __future__ import annotations

import asyncio
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from cowbackup.block.drivers.memory import MemoryNode
from cowbackup.block.graph import BlockGraph
from cowbackup.repo.instant_restore import InstantRestoreNode, restore_in_background

CHUNK = 4096
SIZE = 16 * CHUNK + 1000  # a short last chunk

Op = tuple[str, int, int, int]  # kind, offset, length, byte

ops = st.tuples(
    st.sampled_from(["read", "read", "write", "zero"]),
    st.integers(0, SIZE - 1),
    st.integers(1, 3 * CHUNK),
    st.integers(1, 255),
)


def disjoint(batch: list[Op]) -> list[Op]:
    taken: list[tuple[int, int]] = []
    out = []
    for kind, offset, length, byte in batch:
        length = min(length, SIZE - offset)
        if all(offset + length <= a or b <= offset for a, b in taken):
            taken.append((offset, offset + length))
            out.append((kind, offset, length, byte))
    return out


async def scenario(seed: int, target_reads_zero: bool, batches: list[list[Op]], workers: int) -> None:
    rng = random.Random(seed)
    snapshot = bytearray(SIZE)
    for position in range(0, SIZE, CHUNK):
        if rng.random() < 0.6:
            end = min(SIZE, position + CHUNK)
            snapshot[position:end] = rng.randbytes(end - position)
    graph = BlockGraph()
    source, target = MemoryNode("snapshot", SIZE), MemoryNode("target", SIZE)
    await source.write(0, snapshot)
    await source.write_zeroes(0, CHUNK)  # a zero chunk at the start, a hole
    snapshot[:CHUNK] = bytes(CHUNK)
    if not target_reads_zero:
        await target.write(0, bytes([0xEE]) * SIZE)  # garbage where nothing is restored yet
    for node in (source, target):
        graph.add(node)
    disk = InstantRestoreNode("disk", source, CHUNK, target_reads_zero=target_reads_zero)
    graph.attach(disk, "file", target)
    disk.refresh_limits()
    graph.add(disk)
    model = bytearray(snapshot)

    async def run(op: Op) -> None:
        kind, offset, length, byte = op
        if kind == "read":
            buf = bytearray(length)
            await disk.read(offset, buf)
            assert buf == model[offset : offset + length], (op, disk.restored)
        elif kind == "write":
            await disk.write(offset, bytes([byte]) * length)
        else:
            await disk.write_zeroes(offset, length)

    background = asyncio.create_task(restore_in_background(disk, workers=workers))
    for batch in batches:
        batch = disjoint(batch)
        for kind, offset, length, byte in batch:  # the model as every request of the batch will see it
            if kind == "write":
                model[offset : offset + length] = bytes([byte]) * length
            elif kind == "zero":
                model[offset : offset + length] = bytes(length)
        # Reads of the batch see their ranges' state after the batch's writes (ranges are disjoint).
        await asyncio.gather(*(run(op) for op in batch))
        await asyncio.sleep(0)
    await background
    assert disk.complete
    assert target.snapshot() == bytes(model)
    buf = bytearray(SIZE)
    await disk.read(0, buf)
    assert buf == model


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    target_reads_zero=st.booleans(),
    batches=st.lists(st.lists(ops, min_size=1, max_size=4), max_size=12),
    workers=st.integers(1, 4),
)
def test_the_served_disk_is_the_snapshot_with_the_writes(
    seed: int, target_reads_zero: bool, batches: list[list[Op]], workers: int
) -> None:
    asyncio.run(scenario(seed, target_reads_zero, batches, workers))


def test_a_whole_chunk_write_racing_the_background_copy() -> None:
    """Found by Hypothesis: a write covering chunks whole claimed them one loop turn late, and the
    background copy, starting on one of them in between, put the snapshot's data over the write."""
    batches: list[list[Op]] = [
        [("write", 53963, 12287, 255)],
        [("zero", 7940, 12288, 255)],
        [("zero", 32769, 12287, 28)],
    ]
    asyncio.run(scenario(0, False, batches, 1))
