"""Instant restore's background copy takes chunks straight from the snapshot node (``fetch_chunk``):
plaintext as stored, zero chunks as None, a cached copy used but nothing newly cached, a damaged chunk
an EIO -- and the restored disk is the snapshot."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from cowbackup.block.drivers.memory import MemoryNode
from cowbackup.block.errors import RequestError
from cowbackup.block.graph import BlockGraph
from cowbackup.repo.instant_restore import InstantRestoreNode, restore_in_background
from cowbackup.repo.repository import chunk_name
from cowbackup.repo.snapshot_node import SnapshotNode

from .helpers import CHUNK, backup, data, flip_byte, new_repo

CONTENTS = data(1) + bytes(CHUNK) + data(2) + data(3)[: CHUNK // 2]


def _filter(source: SnapshotNode, target: MemoryNode) -> InstantRestoreNode:
    """An instant-restore filter over ``target`` in a graph, as ``restore --serve`` makes it."""
    graph = BlockGraph()
    for each in (source, target):
        graph.add(each)
    node = InstantRestoreNode("i", source, CHUNK, target_reads_zero=True)
    graph.attach(node, "file", target)
    node.refresh_limits()
    graph.add(node)
    return node


def test_fetch_chunk_reads_without_filling_the_cache(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "r")

    async def body() -> None:
        snap = await backup(repo, {"disk": CONTENTS})
        node = SnapshotNode("s", repo, snap.id, snap.disk("disk"))
        try:
            assert await node.fetch_chunk(0) == CONTENTS[:CHUNK]
            assert await node.fetch_chunk(1) is None
            assert await node.fetch_chunk(3) == CONTENTS[3 * CHUNK :]  # the short last chunk
            assert node.chunks.used == 0  # one-pass reads are not kept
            buf = bytearray(CHUNK)
            await node.read(2 * CHUNK, buf)  # a reader's read is cached ...
            loads = node.chunks.loads
            assert await node.fetch_chunk(2) == bytes(buf)  # ... and the copy uses it
            assert node.chunks.loads == loads
        finally:
            await node.close()

    asyncio.run(body())


def _with_filter(
    tmp_path: Path, damage: int | None, check: Callable[[InstantRestoreNode, MemoryNode], Awaitable[None]]
) -> None:
    """Back CONTENTS up (damaging chunk ``damage``), put a filter over a fresh target, run ``check``."""
    repo = new_repo(tmp_path / "r")

    async def body() -> None:
        snap = await backup(repo, {"disk": CONTENTS})
        if damage is not None:
            entry = repo.read_index(snap.disk("disk").segments[0])[damage]
            flip_byte(repo, chunk_name(entry.chunk_id))
        source = SnapshotNode("s", repo, snap.id, snap.disk("disk"))
        target = MemoryNode("t", len(CONTENTS))
        try:
            await check(_filter(source, target), target)
        finally:
            await source.close()

    asyncio.run(body())


def test_a_damaged_chunk_is_an_eio_and_the_rest_restores(tmp_path: Path) -> None:
    async def check(node: InstantRestoreNode, target: MemoryNode) -> None:
        with pytest.raises(RequestError, match="chunk at offset"):
            await node.ensure(2)
        for position in (0, 1, 3):
            await node.ensure(position)
        assert target.snapshot()[: 2 * CHUNK] == CONTENTS[: 2 * CHUNK]
        assert target.snapshot()[3 * CHUNK :] == CONTENTS[3 * CHUNK :]
        assert not node.is_restored(2)

    _with_filter(tmp_path, 2, check)


def test_the_background_copy_restores_the_snapshot(tmp_path: Path) -> None:
    async def check(node: InstantRestoreNode, target: MemoryNode) -> None:
        await restore_in_background(node)
        assert node.complete and target.snapshot() == CONTENTS

    _with_filter(tmp_path, None, check)
