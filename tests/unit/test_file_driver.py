"""The ``file`` driver against real files under ``tmp_path``."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from cowbackup.block import threadpool
from cowbackup.block.drivers import file as file_mod
from cowbackup.block.drivers import open_node
from cowbackup.block.drivers.file import FileNode, create_file
from cowbackup.block.errors import BlockError, RequestError
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import NO_FLAGS, RequestFlags

KiB = 1024
MiB = 1024 * KiB


def run(func: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(func())


async def open_file(path: Path, **opts: Any) -> FileNode:
    node = await open_node(BlockGraph(), {"driver": "file", "node-name": "f", "filename": str(path), **opts})
    assert isinstance(node, FileNode)
    return node


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


async def extents(node: FileNode) -> list[tuple[int, int, bool]]:
    return [(e.offset, e.length, e.is_data) async for e in node.extents()]


def test_round_trip_and_fua(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    create_file(str(path), MiB)

    async def main() -> None:
        node = await open_file(path)
        assert node.size == MiB
        assert node.limits.request_alignment == 1
        assert node.describe() == {"file": str(path)}
        await node.write(1000, pattern(5000))
        await node.write(300 * KiB, pattern(4096, 3), RequestFlags.FUA)
        node.has_rwf_dsync = False  # the fdatasync fallback of FUA
        await node.write(400 * KiB, pattern(100, 5), RequestFlags.FUA)
        buf = bytearray(5000)
        await node.read(1000, buf)
        assert buf == pattern(5000)
        await node.flush()
        await node.close()
        await node.close()  # twice is fine

    run(main)
    data = path.read_bytes()
    assert data[1000:6000] == pattern(5000)
    assert data[300 * KiB : 304 * KiB] == pattern(4096, 3)
    assert data[400 * KiB : 400 * KiB + 100] == pattern(100, 5)
    assert data[:1000] == bytes(1000)


def test_sparse_block_status_and_zero_init(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    create_file(str(path), MiB)

    async def main() -> None:
        node = await open_file(path)
        assert node.known_zero_init
        assert await extents(node) == [(0, MiB, False)]
        await node.write(64 * KiB, pattern(64 * KiB))
        await node.write(512 * KiB, pattern(4 * KiB))
        assert await extents(node) == [
            (0, 64 * KiB, False),
            (64 * KiB, 64 * KiB, True),
            (128 * KiB, 384 * KiB, False),
            (512 * KiB, 4 * KiB, True),
            (516 * KiB, 508 * KiB, False),
        ]
        ext = await node.block_status(0, MiB)
        assert ext.is_zero
        assert not ext.is_data
        await node.close()
        again = await open_file(path)
        assert not again.known_zero_init  # it has data now
        await again.close()

    run(main)


def test_write_zeroes_punches_holes_with_discard_unmap(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(pattern(256 * KiB))

    async def main() -> None:
        node = await open_file(path, discard="unmap")
        assert not node.known_zero_init
        blocks = os.stat(path).st_blocks
        await node.write_zeroes(64 * KiB, 64 * KiB, RequestFlags.MAY_UNMAP)
        assert os.stat(path).st_blocks < blocks
        ext = await node.block_status(64 * KiB, 64 * KiB)
        assert (ext.length, ext.is_zero, ext.is_data) == (64 * KiB, True, False)
        # Without MAY_UNMAP the range is zeroed but stays allocated.
        await node.write_zeroes(192 * KiB, 8 * KiB, RequestFlags.FUA)
        await node.close()

    run(main)
    expect = bytearray(pattern(256 * KiB))
    expect[64 * KiB : 128 * KiB] = bytes(64 * KiB)
    expect[192 * KiB : 200 * KiB] = bytes(8 * KiB)
    assert path.read_bytes() == expect


def test_discard(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(pattern(128 * KiB))

    async def main() -> None:
        ignore = await open_file(path)  # discard=ignore is the default: a no-op
        await ignore.discard(0, 64 * KiB)
        await ignore.write_zeroes(64 * KiB, 4 * KiB, RequestFlags.MAY_UNMAP)  # zeroes, never unmaps
        assert [e[2] for e in await extents(ignore)] == [True]
        await ignore.close()
        assert path.read_bytes()[: 64 * KiB] == pattern(128 * KiB)[: 64 * KiB]

        unmap = await open_file(path, discard="unmap")
        await unmap.discard(0, 64 * KiB)
        assert await extents(unmap) == [(0, 64 * KiB, False), (64 * KiB, 64 * KiB, True)]
        await unmap.close()
        assert path.read_bytes()[: 64 * KiB] == bytes(64 * KiB)

    run(main)


def test_write_zeroes_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "disk"
    path.write_bytes(pattern(64 * KiB))

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    async def main() -> None:
        node = await open_file(path, discard="unmap")
        # A file system without fallocate modes: learnt once, then zero buffers are written.
        monkeypatch.setattr(file_mod, "_fallocate", unsupported)
        await node.write_zeroes(0, 4 * KiB, RequestFlags.MAY_UNMAP)
        assert not node.has_punch_hole
        assert not node.has_zero_range
        monkeypatch.undo()
        await node.write_zeroes(8 * KiB, 4 * KiB, RequestFlags.MAY_UNMAP)
        assert [e[2] for e in await extents(node)] == [True]  # written, not punched
        with pytest.raises(RequestError) as info:
            await node.write_zeroes(16 * KiB, 4 * KiB, RequestFlags.NO_FALLBACK)
        assert info.value.errno == errno.ENOTSUP
        await node.discard(20 * KiB, 4 * KiB)  # punching unsupported: discard does nothing
        await node.close()

    run(main)
    data = path.read_bytes()
    expect = bytearray(pattern(64 * KiB))
    expect[0 : 4 * KiB] = bytes(4 * KiB)
    expect[8 * KiB : 12 * KiB] = bytes(4 * KiB)
    assert data == expect


def test_write_zeroes_punch_and_allocate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ZERO_RANGE is missing (tmpfs), write-zeroes without unmap punches the range and allocates it
    again, as QEMU does: zeros without writing a byte, the file as allocated as before.  A file system
    that cannot allocate either gets zero buffers."""
    path = tmp_path / "disk"
    path.write_bytes(pattern(64 * KiB))
    allocated = os.stat(path).st_blocks
    modes: list[int] = []
    real = file_mod._fallocate

    def no_zero_range(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        if mode & file_mod.FALLOC_FL_ZERO_RANGE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        real(fd, mode, offset, length)

    def nothing_but_punch(fd: int, mode: int, offset: int, length: int) -> None:
        if not mode & file_mod.FALLOC_FL_PUNCH_HOLE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        real(fd, mode, offset, length)

    async def main() -> None:
        node = await open_file(path)  # discard=ignore: MAY_UNMAP is not honoured
        monkeypatch.setattr(file_mod, "_fallocate", no_zero_range)
        monkeypatch.setattr(FileNode, "_do_write", None)  # not one byte written
        await node.write_zeroes(8 * KiB, 16 * KiB, RequestFlags.MAY_UNMAP)
        punch = file_mod.FALLOC_FL_PUNCH_HOLE | file_mod.FALLOC_FL_KEEP_SIZE
        assert modes == [file_mod.FALLOC_FL_ZERO_RANGE | file_mod.FALLOC_FL_KEEP_SIZE, punch, 0]
        assert not node.has_zero_range and node.has_punch_hole and node.has_fallocate
        assert os.stat(path).st_blocks == allocated
        monkeypatch.undo()
        monkeypatch.setattr(file_mod, "_fallocate", nothing_but_punch)
        await node.write_zeroes(32 * KiB, 8 * KiB, RequestFlags.MAY_UNMAP)  # zero buffers after the punch
        assert not node.has_fallocate
        with pytest.raises(RequestError) as info:  # learnt: no fast way left
            await node.write_zeroes(48 * KiB, 4 * KiB, RequestFlags.NO_FALLBACK)
        assert info.value.errno == errno.ENOTSUP
        await node.write_zeroes(48 * KiB, 4 * KiB)
        await node.close()

    run(main)
    expect = bytearray(pattern(64 * KiB))
    for start, n in ((8 * KiB, 16 * KiB), (32 * KiB, 8 * KiB), (48 * KiB, 4 * KiB)):
        expect[start : start + n] = bytes(n)
    assert path.read_bytes() == expect


def test_cache_direct_unaligned(tmp_path: Path) -> None:
    path = tmp_path / "direct"
    size = 64 * KiB + 1000  # the last block is partial: padding must not grow the file
    path.write_bytes(pattern(size))
    model = bytearray(pattern(size))

    async def main() -> None:
        try:
            node = await open_file(path, cache={"direct": True, "no-flush": True})
        except BlockError as err:
            pytest.skip(f"no O_DIRECT here: {err}")
        assert node.direct
        assert node.limits.request_alignment == 4096
        backing = bytearray(20000)
        unaligned = memoryview(backing)[3:8003]  # not aligned in memory: bounced
        unaligned[:] = pattern(8000, 9)
        await node.write(1001, unaligned)
        model[1001:9001] = pattern(8000, 9)
        await node.write(size - 500, b"tail" * 125)  # bytes: read-only, bounced
        model[size - 500 :] = b"tail" * 125
        await node.write_zeroes(5000, 20000, RequestFlags.MAY_UNMAP)
        model[5000:25000] = bytes(20000)
        await node.write(16 * KiB, pattern(8 * KiB, 4))  # aligned request, bytes buffer
        model[16 * KiB : 24 * KiB] = pattern(8 * KiB, 4)
        buf = bytearray(size)
        await node.read(0, buf)
        assert buf == model
        small = bytearray(7)
        await node.read(size - 7, small)
        assert small == model[-7:]
        await node.flush()
        await node.close()

    run(main)
    assert path.stat().st_size == size
    assert path.read_bytes() == model


def test_read_only_and_ranges(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    create_file(str(path), 8 * KiB)

    async def main() -> None:
        node = await open_file(path, **{"read-only": True})
        assert node.read_only
        for call in (node.write(0, b"x"), node.write_zeroes(0, 1), node.discard(0, 4096)):
            with pytest.raises(RequestError) as info:
                await call
            assert info.value.errno == errno.EPERM
        with pytest.raises(RequestError) as info:
            await node.read(8 * KiB - 1, bytearray(2))
        assert info.value.errno == errno.EINVAL
        with pytest.raises(RequestError):
            await node.block_status(8 * KiB, 1)
        await node.flush()
        await node.close()
        with pytest.raises(RequestError) as info:
            await node.read(0, bytearray(1))
        assert info.value.errno == errno.EBADF

    run(main)


def test_file_shrank_is_eio(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(pattern(8 * KiB))

    async def main() -> None:
        node = await open_file(path)
        os.truncate(path, 4 * KiB)
        with pytest.raises(RequestError) as info:
            await node.read(0, bytearray(8 * KiB))
        assert info.value.errno == errno.EIO
        await node.close()

    run(main)


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({}, "Parameter 'filename' is missing"),
        ({"filename": "{F}", "bogus": 1}, "Parameter 'bogus' is unexpected"),
        ({"filename": "{F}", "discard": "maybe"}, "Parameter 'discard' does not accept value 'maybe'"),
        ({"filename": "{F}", "locking": "perhaps"}, "Parameter 'locking' does not accept value 'perhaps'"),
        ({"filename": "{F}", "cache": {"writeback": True}}, "Parameter 'cache.writeback' is unexpected"),
        ({"filename": "{F}", "cache": {"direct": "sure"}}, "Parameter 'cache.direct' expects 'on' or 'off'"),
        (
            {"filename": "{F}", "aio": "native"},
            "aio=native is not supported; cowbackup only implements aio=threads",
        ),
        ({"filename": "{D}/missing"}, "Could not open '{D}/missing': No such file or directory"),
        ({"filename": "{D}"}, "'file' driver requires '{D}' to be a regular file or a block device"),
    ],
)
def test_bad_options(tmp_path: Path, opts: dict[str, Any], message: str) -> None:
    path = tmp_path / "disk"
    create_file(str(path), 4096)
    names = {"F": str(path), "D": str(tmp_path)}
    if "filename" in opts:
        opts["filename"] = opts["filename"].format(**names)
    message = message.format(**names)
    graph = BlockGraph()

    async def main() -> None:
        with pytest.raises(BlockError) as info:
            await open_node(graph, {"driver": "file", "node-name": "f", "read-only": True, **opts})
        assert str(info.value) == message
        assert graph.nodes == {}

    run(main)


def test_locking_and_host_device_name(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    create_file(str(path), 4096)

    async def main() -> None:
        graph = BlockGraph()
        base = {"driver": "host_device", "filename": str(path), "locking": "on"}
        first = await open_node(graph, {**base, "node-name": "a"})
        with pytest.raises(BlockError, match='Failed to get "write" lock'):
            await open_node(graph, {**base, "node-name": "b"})
        with pytest.raises(BlockError, match='Failed to get shared "write" lock'):
            await open_node(graph, {**base, "node-name": "c", "read-only": True})
        unlocked = await open_node(graph, {**base, "node-name": "d", "locking": "off"})
        await graph.close_all()
        assert first.closed
        assert unlocked.closed
        r1 = await open_node(graph, {**base, "node-name": "r1", "read-only": True})
        r2 = await open_node(graph, {**base, "node-name": "r2", "read-only": True})
        assert r1.read_only
        assert r2.read_only
        await graph.close_all()

    run(main)


def test_create_file(tmp_path: Path) -> None:
    path = tmp_path / "new"
    path.write_bytes(b"old data" * 1000)
    create_file(str(path), 3 * MiB)
    assert path.stat().st_size == 3 * MiB
    assert path.stat().st_blocks == 0
    with pytest.raises(BlockError, match="Could not create"):
        create_file(str(tmp_path / "no" / "such"), 4096)


@pytest.mark.parametrize("inline", [True, False])
def test_block_status_in_memory_and_through_the_pool_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline: bool
) -> None:
    """On tmpfs the seeks run on the loop; a slow SEEK_HOLE sends the next ones to the pool.  Both give
    the same map (the whole-file answers are cached, so each case opens the file anew)."""
    path = Path("/dev/shm") / f"cowbackup-seek-{os.getpid()}-{tmp_path.name}"
    create_file(str(path), 4 * MiB)
    try:

        async def main() -> None:
            node = await open_file(path)
            assert node.inline_all  # /dev/shm is tmpfs
            if not inline:
                monkeypatch.setattr(file_mod, "SEEK_INLINE_BUDGET_NS", -1)  # every SEEK_HOLE is "slow"
            for i in range(0, 4 * MiB, 512 * KiB):
                await node.write(i, pattern(64 * KiB, i))
            node._data_extents.clear()
            got = await extents(node)
            assert got == [
                (i + off, length, is_data)
                for i in range(0, 4 * MiB, 512 * KiB)
                for off, length, is_data in ((0, 64 * KiB, True), (64 * KiB, 448 * KiB, False))
            ]
            # The first SEEK_HOLE ran inline; when it counted as slow, the later ones went to the pool.
            assert node._slow_seeks == (0 if inline else file_mod.SEEK_SLOW_STREAK - 7)
            await node.close()

        run(main)
    finally:
        path.unlink()


def test_punching_in_memory_inline_or_in_the_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On tmpfs a short punch, or one over holes only, runs on the loop; a long one over data goes to
    the pool.  Each leaves zeros and holes."""
    path = Path("/dev/shm") / f"cowbackup-punch-{os.getpid()}-{tmp_path.name}"
    create_file(str(path), 16 * MiB)
    pooled: list[int] = []
    real = threadpool.run_blocking

    async def counting(func: Any, *args: Any) -> Any:
        if func is file_mod._fallocate:
            pooled.append(args[3])
        return await real(func, *args)

    monkeypatch.setattr(file_mod, "run_blocking", counting)
    try:

        async def main() -> None:
            node = await open_file(path, discard="unmap")
            assert node.inline_all
            await node.write(0, pattern(4 * MiB))
            await node.write_zeroes(0, 64 * KiB, RequestFlags.MAY_UNMAP)  # short: inline
            await node.write_zeroes(8 * MiB, 8 * MiB, RequestFlags.MAY_UNMAP)  # holes only: inline
            assert pooled == []
            await node.write_zeroes(64 * KiB, 4 * MiB - 64 * KiB, RequestFlags.MAY_UNMAP)  # data: pool
            assert pooled == [4 * MiB - 64 * KiB]
            node._data_extents.clear()
            assert await extents(node) == [(0, 16 * MiB, False)]
            await node.close()

        run(main)
        assert path.read_bytes() == bytes(16 * MiB)
    finally:
        path.unlink()


def test_buffered_writes_inline_until_one_is_slow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a file system on a device, whole-page writes up to INLINE_MAX go to the page cache from the
    event loop; partial pages, FUA and longer writes go to the pool.  A slow inline write sends the
    next WRITE_SLOW_STREAK writes to the pool, twice as many after another slow one; a fast one resets
    the streak.  Every byte lands wherever it was written from."""
    path = tmp_path / "disk"
    create_file(str(path), 1 * MiB)
    model = bytearray(1 * MiB)
    pooled: list[int] = []
    real = threadpool.run_blocking

    async def counting(func: Any, *args: Any) -> Any:
        if getattr(func, "__name__", "") == "_pwrite_all":
            pooled.append(args[0])
        return await real(func, *args)

    monkeypatch.setattr(file_mod, "run_blocking", counting)
    streak = file_mod.WRITE_SLOW_STREAK

    async def main() -> None:
        node = await open_file(path)
        if not node.inline_writes:  # tmp_path on tmpfs or overlayfs: behave as a file on ext4
            node.inline_all, node.inline_writes = False, True

        async def write(offset: int, length: int, flags: RequestFlags = NO_FLAGS) -> None:
            data = pattern(length, offset % 250)
            await node.write(offset, data, flags)
            model[offset : offset + length] = data

        await write(0, 4 * KiB)
        await write(64 * KiB, 64 * KiB)
        assert pooled == []
        await write(8 * KiB + 512, 1024)  # a partial page
        await write(16 * KiB, 4 * KiB, RequestFlags.FUA)
        monkeypatch.setattr(file_mod, "INLINE_MAX", 64 * KiB)
        await write(256 * KiB, 128 * KiB)  # longer than INLINE_MAX
        monkeypatch.setattr(file_mod, "INLINE_MAX", 1 * MiB)
        assert pooled == [8 * KiB + 512, 16 * KiB, 256 * KiB]
        pooled.clear()
        monkeypatch.setattr(file_mod, "WRITE_INLINE_BUDGET_NS", -1)  # every inline write is slow
        await write(0, 4 * KiB)  # inline, slow: the next `streak` go to the pool
        for i in range(streak):
            await write(4 * KiB * (i % 16), 4 * KiB)
        assert len(pooled) == streak
        await write(0, 4 * KiB)  # inline again, slow again: twice as many
        assert node._pool_writes == 2 * streak
        monkeypatch.setattr(file_mod, "WRITE_INLINE_BUDGET_NS", 10**12)
        for i in range(2 * streak):
            await write(4 * KiB * (i % 16), 4 * KiB)
        assert len(pooled) == 3 * streak
        await write(0, 4 * KiB)  # inline and fast: the streak starts over
        assert len(pooled) == 3 * streak and node._write_streak == streak
        await node.close()

    run(main)
    assert path.read_bytes() == model


@pytest.mark.parametrize(("fs_type", "inline"), [(0xEF53, True), (0x58465342, True), (0x6969, False)])
def test_buffered_writes_inline_only_on_local_disk_file_systems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fs_type: int, inline: bool
) -> None:
    """ext4 and XFS take whole-page writes on the loop; NFS (or FUSE, Ceph...) never: a server that is
    away would hang the loop with the write."""
    path = tmp_path / "disk"
    create_file(str(path), 64 * KiB)
    monkeypatch.setattr(file_mod, "_fs_type", lambda fd: fs_type)

    async def main() -> None:
        node = await open_file(path)
        assert node.inline_writes is inline and not node.inline_all
        await node.close()

    run(main)
