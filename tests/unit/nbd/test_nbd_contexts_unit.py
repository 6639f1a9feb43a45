"""The qemu: metadata contexts on test nodes: REQ_ONE, request edges, a bitmap smaller than the request."""

from __future__ import annotations

import asyncio

from cowbackup.block.bitmap import DirtyBitmap
from cowbackup.block.drivers import open_node
from cowbackup.block.graph import BlockGraph
from cowbackup.nbd.contexts import NBD_STATE_DIRTY, allocation_depth, dirty_bitmap_status

KiB = 1024


def test_dirty_bitmap_runs_clip_to_the_request_and_honour_req_one() -> None:
    bits = DirtyBitmap(1024 * KiB, 64 * KiB)
    bits.set(128 * KiB, 128 * KiB)
    status = dirty_bitmap_status(lambda: bits)

    async def main() -> None:
        node = await open_node(BlockGraph(), {"driver": "null-co", "node-name": "n", "size": 1024 * KiB})
        assert await status(node, 0, 1024 * KiB, False) == [
            (128 * KiB, 0),
            (128 * KiB, NBD_STATE_DIRTY),
            (768 * KiB, 0),
        ]
        # starting inside a dirty granule, ending inside a clean one
        assert await status(node, 200 * KiB, 100 * KiB, False) == [(56 * KiB, NBD_STATE_DIRTY), (44 * KiB, 0)]
        assert await status(node, 0, 1024 * KiB, True) == [(128 * KiB, 0)]
        bits.clear()
        assert await status(node, 5, 1000, False) == [(1000, 0)]

    asyncio.run(main())


def test_allocation_depth_of_a_node_without_backing_is_one_everywhere() -> None:
    async def main() -> None:
        node = await open_node(BlockGraph(), {"driver": "null-co", "node-name": "n", "size": 1024 * KiB})
        assert await allocation_depth(node, 0, 1024 * KiB, False) == [(1024 * KiB, 1)]
        assert await allocation_depth(node, 4096, 4096, True) == [(4096, 1)]

    asyncio.run(main())
