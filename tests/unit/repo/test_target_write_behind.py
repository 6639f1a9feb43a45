"""The repository target node stores write-behind: a write returns once its data is in memory (a guest
write that copied its cluster first does not wait for the repository), the job's prepare waits for every
store, a failed store fails the next write and the prepare, and the memory it holds is bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cowbackup.daemon import Daemon
from cowbackup.repo import target_node
from cowbackup.repo.errors import RepoError
from cowbackup.repo.repository import Repository

from .helpers import CHUNK, PASSPHRASE, data, new_repo, reopen, restore

StoreChunk = Callable[[memoryview, Any], Awaitable[bytes]]


def _run(body: Callable[[Daemon, Repository], Awaitable[None]], tmp_path: Path) -> Repository:
    repo = new_repo(tmp_path / "r")
    (tmp_path / "pass").write_bytes(PASSPHRASE)

    async def main() -> None:
        daemon = Daemon()
        try:
            await body(daemon, repo)
        finally:
            await daemon.close()

    asyncio.run(main())
    return repo


async def _target(daemon: Daemon, repo: Repository, chunks: int) -> Any:
    options = {"driver": "cowbackup-repo", "node-name": "t", "repo": repo.store.location, "name": "vm"}
    password_file = str(Path(repo.store.location).parent / "pass")
    return await daemon.blockdev_add({**options, "size": chunks * CHUNK, "password-file": password_file})


def _gated(node: Any, gate: asyncio.Event, started: list[int]) -> None:
    """Make the node's stores wait for ``gate``."""
    store: StoreChunk = node.run.store_chunk

    async def slow(chunk: memoryview, stats: Any) -> bytes:
        started.append(len(chunk))
        await gate.wait()
        return await store(chunk, stats)

    node.run.store_chunk = slow


def test_a_write_returns_before_its_chunk_is_stored_and_prepare_waits(tmp_path: Path) -> None:
    contents = data(1, CHUNK) + data(2, CHUNK)

    async def body(daemon: Daemon, repo: Repository) -> None:
        node = await _target(daemon, repo, 2)
        gate, started = asyncio.Event(), list[int]()
        _gated(node, gate, started)
        buf = bytearray(contents)
        await asyncio.wait_for(node.write(0, buf), 5)  # returns with the store still gated
        await asyncio.sleep(0.01)
        assert started == [CHUNK, CHUNK] and node.written == {}
        buf[:] = bytes(len(buf))  # the caller's buffer is its own again: the stored data is a copy
        prepare = asyncio.create_task(node.backup_target_prepare())
        await asyncio.sleep(0.05)
        assert not prepare.done()  # waits for the stores
        gate.set()
        await asyncio.wait_for(prepare, 5)
        snap = node.pending.committed
        assert snap is not None
        assert await restore(reopen(repo), snap) == contents

    _run(body, tmp_path)


def test_a_failed_store_fails_the_next_write_and_the_prepare(tmp_path: Path) -> None:
    async def body(daemon: Daemon, repo: Repository) -> None:
        node = await _target(daemon, repo, 3)

        async def failing(chunk: memoryview, stats: Any) -> bytes:
            raise RepoError("the store is full") from OSError(28, "No space left on device")

        node.run.store_chunk = failing
        await node.write(0, data(1, CHUNK))  # accepted: the failure comes later
        await asyncio.sleep(0.01)
        with pytest.raises(OSError, match="the store is full") as write_error:
            await node.write(CHUNK, data(2, CHUNK))
        assert write_error.value.errno == 28
        with pytest.raises(OSError, match="the store is full"):
            await node.backup_target_prepare()
        assert node.pending.committed is None
        assert repo.snapshot_ids() == []

    _run(body, tmp_path)


def test_writers_wait_when_the_bytes_not_stored_yet_reach_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(target_node, "WRITE_BEHIND_BYTES", 2 * CHUNK)

    async def body(daemon: Daemon, repo: Repository) -> None:
        node = await _target(daemon, repo, 4)
        gate, started = asyncio.Event(), list[int]()
        _gated(node, gate, started)
        await node.write(0, data(1, CHUNK))
        await node.write(CHUNK, data(2, CHUNK))
        third = asyncio.create_task(node.write(2 * CHUNK, data(3, CHUNK)))
        await asyncio.sleep(0.05)
        assert not third.done()  # two chunks held already: no room
        gate.set()
        await asyncio.wait_for(third, 5)
        await node.write(3 * CHUNK, data(4, CHUNK))
        await node.backup_target_prepare()
        assert node.pending.committed is not None

    _run(body, tmp_path)


def test_an_aborted_job_cancels_the_stores_still_waiting(tmp_path: Path) -> None:
    async def body(daemon: Daemon, repo: Repository) -> None:
        node = await _target(daemon, repo, 1)
        gate, started = asyncio.Event(), list[int]()
        _gated(node, gate, started)
        await node.write(0, data(1, CHUNK))
        await asyncio.wait_for(node.backup_target_abort(), 5)  # does not wait for the gate
        assert node.pending.committed is None and repo.snapshot_ids() == []

    _run(body, tmp_path)
