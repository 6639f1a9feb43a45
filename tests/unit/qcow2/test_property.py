"""Random write / write-zeroes / discard sequences on a qcow2 image and a plain shadow read the same,
and qemu-img check stays clean; concurrent writes into one cluster all land."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowbackup.block.drivers.qcow2 import create_image
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import RequestFlags

from .helpers import KiB, check_clean, needs_qemu_img, open_qcow2, pattern, read_all

pytestmark = needs_qemu_img

SIZE = 640 * KiB + 512 * 3  # not a multiple of the cluster size: the last cluster is partial

_op = st.tuples(
    st.sampled_from(["write", "zero", "zero-unmap", "discard", "flush"]),
    st.integers(0, SIZE - 1),
    st.integers(1, 200 * KiB),
)


def _discard_range(off: int, n: int, cs: int, size: int) -> tuple[int, int]:
    start = -(-off // cs) * cs
    end = off + n if off + n == size else (off + n) // cs * cs
    return start, max(start, end)


async def _run(path: Path, ops: list[tuple[str, int, int]], cs: int, cache: int, size: int = SIZE) -> bytes:
    shadow = bytearray(size)
    graph = BlockGraph()
    node = await open_qcow2(graph, path, "q", **{"l2-cache-size": cache})
    for i, (kind, off, n) in enumerate(ops):
        n = min(n, size - off)
        if kind == "write":
            data = pattern(n, i)
            await node.write(off, data)
            shadow[off : off + n] = data
        elif kind.startswith("zero"):
            flags = RequestFlags.MAY_UNMAP if kind == "zero-unmap" else RequestFlags(0)
            await node.write_zeroes(off, n, flags)
            shadow[off : off + n] = bytes(n)
        elif kind == "discard":
            await node.discard(off, n)
            start, end = _discard_range(off, n, cs, size)
            shadow[start:end] = bytes(end - start)
        else:
            await node.flush()
    assert await read_all(node) == bytes(shadow)
    await graph.close_all()
    graph = BlockGraph()
    node = await open_qcow2(graph, path, "q", **{"read-only": True})
    assert await read_all(node) == bytes(shadow)
    await graph.close_all()
    return bytes(shadow)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, min_size=1, max_size=12), cs=st.sampled_from([512, 4 * KiB, 64 * KiB]))
def test_random_operations_match_shadow(tmp_path: Path, ops: list[tuple[str, int, int]], cs: int) -> None:
    path = tmp_path / f"p{cs}.qcow2"
    create_image(str(path), SIZE, cluster_size=cs)
    # A tiny L2 cache forces write-back on eviction in the middle of requests.
    asyncio.run(_run(path, ops, cs, 2 * cs))
    check_clean(path)


def test_refcount_table_grows(tmp_path: Path) -> None:
    """512-byte clusters: 4 MiB of data needs many refcount blocks and a larger refcount table."""
    path = tmp_path / "grow.qcow2"
    create_image(str(path), 8 * 1024 * KiB, cluster_size=512)
    asyncio.run(
        _run(
            path,
            [("write", 0, 8192 * KiB), ("discard", 1024 * KiB, 512 * KiB), ("write", 1000 * KiB, 600 * KiB)],
            512,
            64 * KiB,
            8192 * KiB,
        )
    )
    check_clean(path)


def test_concurrent_writes_into_shared_clusters(tmp_path: Path) -> None:
    path = tmp_path / "conc.qcow2"
    create_image(str(path), 2048 * KiB, cluster_size=64 * KiB)
    pieces = [(i * 4 * KiB + 7, 4 * KiB - 11) for i in range(256)]
    random.Random(5).shuffle(pieces)
    expected = bytearray(2048 * KiB)

    async def main() -> None:
        graph = BlockGraph()
        node = await open_qcow2(graph, path)
        for i, (off, n) in enumerate(pieces):
            expected[off : off + n] = pattern(n, i)
        await asyncio.gather(*(node.write(off, pattern(n, i)) for i, (off, n) in enumerate(pieces)))
        assert await read_all(node) == bytes(expected)
        await graph.close_all()

    asyncio.run(main())
    check_clean(path)
