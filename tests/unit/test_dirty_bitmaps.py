"""Named dirty bitmaps: the registry, QEMU's state checks, successors, and marking on every write path."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cowbackup.block.dirty_bitmaps import (
    BitmapCheck,
    BitmapError,
    NodeBitmaps,
    default_granularity,
)
from cowbackup.block.drivers.file import create_file
from cowbackup.block.drivers.memory import MemoryNode
from cowbackup.block.errors import RequestError
from cowbackup.block.node import BlockNode, Limits
from cowbackup.daemon import Daemon
from cowbackup.jobs.backup import BackupParams

T = TypeVar("T")
KiB = 1024
MiB = 1024 * KiB
C = 64 * KiB


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20.0))


def registry(size: int = MiB) -> NodeBitmaps:
    return MemoryNode("m", size).dirty_bitmaps


# ---------------------------------------------------------------------- registry and checks


def test_bitmaps_are_listed_newest_first_and_found_by_name() -> None:
    reg = registry()
    a = reg.create("a", C)
    b = reg.create("b", 4 * KiB)
    anon = reg.create(None, C)
    assert list(reg) == [anon, b, a]
    assert reg.find("a") is a and reg.find("b") is b and reg.find("c") is None
    assert [i.get("name") for i in reg.info()] == [None, "b", "a"]
    reg.release(b)
    assert list(reg) == [anon, a] and not b.attached


def test_create_refuses_a_taken_or_too_long_name_with_qemus_messages() -> None:
    reg = registry()
    reg.create("a", C)
    with pytest.raises(BitmapError, match=r"^Bitmap already exists: a$"):
        reg.create("a", C)
    reg.create("x" * 1023, C)
    with pytest.raises(BitmapError, match=r"^Bitmap name too long: x{1024}$"):
        reg.create("x" * 1024, C)
    # The limit is in bytes, as in qcow2.
    with pytest.raises(BitmapError, match="too long"):
        reg.create("é" * 512, C)


def test_info_matches_qemu_block_dirty_info() -> None:
    reg = registry(MiB + 1)
    bm = reg.create("a", C)
    bm.bits.set(MiB, 1)  # the partial last granule counts whole, as in QEMU
    assert bm.info() == {
        "name": "a",
        "recording": True,
        "persistent": False,
        "busy": False,
        "granularity": C,
        "count": C,
    }
    bm.disable()
    bm.inconsistent = True
    assert bm.info()["recording"] is False and bm.info()["inconsistent"] is True


def test_checks_run_in_qemus_order_with_qemus_messages() -> None:
    bm = registry().create("a", C)
    bm.busy = bm.readonly = bm.inconsistent = True
    with pytest.raises(BitmapError, match=r"^Bitmap 'a' is currently in use by another operation and cannot"):
        bm.check(BitmapCheck.DEFAULT)
    with pytest.raises(BitmapError, match=r"^Bitmap 'a' is readonly and cannot be modified$"):
        bm.check(BitmapCheck.RO | BitmapCheck.INCONSISTENT)
    with pytest.raises(BitmapError, match=r"^Bitmap 'a' is inconsistent and cannot be used$"):
        bm.check(BitmapCheck.ALLOW_RO & ~BitmapCheck.BUSY)
    bm.busy = bm.inconsistent = False
    bm.check(BitmapCheck.ALLOW_RO)  # read-only is allowed there


@pytest.mark.parametrize(
    ("cluster", "expected"), [(0, 65536), (512, 4096), (4096, 4096), (65536, 65536), (2 * MiB, 65536)]
)
def test_default_granularity_is_the_cluster_size_clamped_to_4k_64k(cluster: int, expected: int) -> None:
    node = MemoryNode("m", MiB)
    node.limits = Limits(cluster_size=cluster)
    assert default_granularity(node) == expected


def test_sha256_hashes_whole_64_bit_words_as_qemu_does() -> None:
    # Values from qemu-storage-daemon 7.2: an empty 4 MiB bitmap at 2 GiB granularity (one word) and
    # an empty 1000448-byte bitmap at 512 (1954 bits, 31 words).
    assert registry(4 * MiB).create("a", 2**31).sha256() == (
        "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
    )
    assert registry(1000448).create("a", 512).sha256() == (
        "b3ab6982980fddf460a2f47adb428475ce9afa89092fd034499d017a35993f05"
    )
    bm = registry(MiB).create("a", C)  # 16 bits
    bm.bits.set(0, 1)
    bm.bits.set(15 * C, C)
    assert bm.sha256() == hashlib.sha256(bytes([1, 0x80]) + bytes(6)).hexdigest()


def test_merge_from_refuses_other_sizes_and_merges_other_granularities() -> None:
    a = registry(MiB).create("a", C)
    b = registry(2 * MiB).create("b", C)
    with pytest.raises(BitmapError, match=r"^Bitmaps are of different sizes \(destination size is 1048576"):
        a.merge_from(b)
    fine = registry(MiB).create("f", 512)
    fine.bits.set(C + 512, 512)
    old = a.merge_from(fine)
    assert a.count() == C and old.count() == 0
    a.restore(old)
    assert a.count() == 0


# ---------------------------------------------------------------------- successors


def test_successor_records_while_the_parent_is_frozen_then_abdicates() -> None:
    reg = registry()
    bm = reg.create("a", C)
    bm.persistent = True
    bm.bits.set(0, C)
    child = bm.create_successor()
    assert bm.busy and bm.disabled and bm.recording and child.enabled and child.name is None
    assert list(reg) == [child, bm]
    reg.mark(2 * C, 1)
    assert bm.count() == C and child.count() == C
    with pytest.raises(BitmapError, match="currently in use"):
        bm.create_successor()
    heir = bm.abdicate()
    assert heir is child and heir.name == "a" and heir.persistent and not heir.busy
    assert list(reg) == [heir] and not bm.attached
    assert heir.count() == C and heir.bits.get(2 * C)


def test_reclaim_merges_the_successor_back_and_keeps_the_recording_state() -> None:
    reg = registry()
    bm = reg.create("a", C)
    bm.disable()
    bm.bits.set(0, C)
    child = bm.create_successor()
    assert not child.enabled and not bm.recording
    child.bits.set(3 * C, C)  # a disabled successor records nothing, but merge must carry its bits
    assert bm.reclaim() is bm
    assert list(reg) == [bm] and not bm.busy and bm.disabled and bm.count() == 2 * C


def test_abdicate_and_reclaim_need_a_successor() -> None:
    bm = registry().create("a", C)
    with pytest.raises(BitmapError, match=r"^Cannot relinquish control if there's no successor present$"):
        bm.abdicate()
    with pytest.raises(BitmapError, match=r"^Cannot reclaim a successor when none is present$"):
        bm.reclaim()


# ---------------------------------------------------------------------- write paths


def test_every_write_path_marks_enabled_bitmaps_only(tmp_path: Path) -> None:
    async def main() -> None:
        d = Daemon()
        create_file(str(tmp_path / "img"), 4 * MiB)
        raw = await d.blockdev_add(
            {
                "driver": "raw",
                "node-name": "raw",
                "discard": "unmap",
                "file": {"driver": "file", "filename": str(tmp_path / "img"), "discard": "unmap"},
            }
        )
        file = raw.children["file"].node
        on_raw = raw.dirty_bitmaps.create("r", C)
        on_file = file.dirty_bitmaps.create("f", 4 * KiB)
        off = raw.dirty_bitmaps.create("off", C)
        off.disable()
        await raw.write(1, b"x")  # unaligned: one granule each
        await raw.write_zeroes(2 * C, C + 1)
        await raw.discard(8 * C, C)
        failing = raw.write(4 * MiB - 1, b"xx")  # out of range: refused before the request starts
        with pytest.raises(RequestError, match="beyond the end"):
            await failing
        assert on_raw.count() == 4 * C and off.count() == 0
        assert on_file.count() == 4 * KiB + (C + 4 * KiB) + C

    run(main())


def test_writes_through_a_backup_filter_mark_the_source_and_the_filter(tmp_path: Path) -> None:
    async def main() -> None:
        d = Daemon()
        await d.blockdev_add({"driver": "memory", "node-name": "src", "size": MiB, "discard": "unmap"})
        await d.blockdev_add({"driver": "memory", "node-name": "tgt", "size": MiB})
        src: BlockNode = d.graph.get("src")
        bm = src.dirty_bitmaps.create("b", C)
        job = d.blockdev_backup(BackupParams("src", "tgt", "none", job_id="j", filter_node_name="cbw"))
        filt = d.graph.get("cbw")
        on_filter = filt.dirty_bitmaps.create("f", C)
        await filt.write(5 * C, b"y" * 10)
        await filt.discard(6 * C, C)
        assert bm.count() == 2 * C and on_filter.count() == 2 * C
        # The old data went to the target; the target's own bitmaps see that copy.
        tgt = d.graph.get("tgt")
        assert isinstance(tgt, MemoryNode) and tgt.dirty_bitmaps.find("b") is None
        flow = job.cancel()
        if flow is not None:
            await flow
        await job.wait_concluded()
        await d.close()

    run(main())


def test_a_node_that_ignores_discards_does_not_mark_them(tmp_path: Path) -> None:
    async def main() -> None:
        d = Daemon()
        create_file(str(tmp_path / "img"), MiB)
        raw = await d.blockdev_add(
            {
                "driver": "raw",
                "node-name": "raw",
                "file": {"driver": "file", "filename": str(tmp_path / "img")},
            }
        )
        file = raw.children["file"].node
        on_raw, on_file = raw.dirty_bitmaps.create("r", C), file.dirty_bitmaps.create("f", C)
        await raw.discard(0, 2 * C)  # discard=ignore (the default): nothing changes, as in QEMU
        assert on_raw.count() == on_file.count() == 0
        await raw.write_zeroes(0, C)
        assert on_raw.count() == on_file.count() == C
        await d.close()

    run(main())
