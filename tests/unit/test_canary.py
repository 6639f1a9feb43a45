"""Generation markers of tracking bitmaps (cli/canary.py): where the canaries go, what a manifest may
record, and the canary image QEMU and our daemon merge from."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cowbackup.cli.canary import CANARIES, CANARY_BITMAP, Canary, choose_canary, write_canary_image
from cowbackup.daemon import Daemon

KiB = 1024
MiB = 1024 * KiB


@given(
    size=st.integers(min_value=512, max_value=1 << 40).map(lambda n: n // 512 * 512),
    chunk=st.sampled_from([64 * KiB, 256 * KiB, 4 * MiB, 16 * MiB]),
)
def test_canaries_are_whole_granules_inside_the_disk_in_as_few_chunks_as_possible(
    size: int, chunk: int
) -> None:
    canary = choose_canary(size, chunk)
    assert canary is not None
    granule = canary.granule
    assert granule & (granule - 1) == 0 and 512 <= granule <= 64 * KiB
    assert len(set(canary.offsets)) == len(canary.offsets) == min(CANARIES, size // granule)
    assert canary.fits(size) and all(o % granule == 0 for o in canary.offsets)
    chunks = {o // chunk for o in canary.offsets}
    per_chunk = max(1, chunk // granule)
    assert len(chunks) <= -(-len(canary.offsets) // per_chunk) + 1  # the last chunk may be short
    assert Canary.from_record(json.loads(json.dumps(canary.as_dict()))) == canary


def test_canaries_differ_between_snapshots() -> None:
    assert len({choose_canary(64 * 1024 * MiB, 4 * MiB) for _ in range(20)}) == 20


def test_a_disk_under_one_sector_has_no_canary() -> None:
    assert choose_canary(511, 4 * MiB) is None


@pytest.mark.parametrize(
    "record",
    [
        None,
        "x",
        {},
        {"granule": 65536},
        {"granule": 65536, "offsets": []},
        {"granule": 1000, "offsets": [0]},
        {"granule": 256, "offsets": [0]},
        {"granule": 65536, "offsets": [100]},
        {"granule": 65536, "offsets": [-65536]},
        {"granule": 65536, "offsets": ["0"]},
        {"granule": True, "offsets": [0]},
    ],
)
def test_a_record_that_is_not_a_canary_is_none(record: object) -> None:
    assert Canary.from_record(record) is None


def test_the_canary_image_holds_exactly_the_canaries(tmp_path: Path) -> None:
    size = 64 * MiB + 512  # not a whole number of granules: the last one is never a canary
    canary = Canary(65536, (0, 3 * 65536, 1023 * 65536))
    path = tmp_path / "canary.qcow2"
    asyncio.run(write_canary_image(str(path), size, canary))
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                                     capture_output=True, text=True).stdout)  # fmt: skip
    assert info["virtual-size"] == size
    (bitmap,) = info["format-specific"]["data"]["bitmaps"]
    # Disabled (no "auto"), closed cleanly (no "in-use"): a read-only merge source for QEMU.
    assert bitmap == {"name": CANARY_BITMAP, "granularity": 65536, "flags": []}
    subprocess.run(["qemu-img", "check", str(path)], check=True, capture_output=True)

    async def bits() -> list[tuple[int, int]]:
        daemon = Daemon()
        try:
            opts = {"driver": "qcow2", "node-name": "c", "read-only": True}
            node = await daemon.blockdev_add({**opts, "file": {"driver": "file", "filename": str(path)}})
            loaded = node.dirty_bitmaps.find(CANARY_BITMAP)
            assert loaded is not None and loaded.count() == 3 * 65536
            return [(o, o + 65536) for o in canary.offsets if loaded.bits.get(o)]
        finally:
            await daemon.close()

    assert len(asyncio.run(bits())) == 3
