"""Persistent dirty bitmaps in qcow2: bitmaps qemu-img made read back with the right bits, bitmaps we store
are read back by QEMU with the same bits, in_use follows writes and clean closes, bad bitmap metadata is
refused with a clear error and nothing written."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowbackup.block.bitmap import DirtyBitmap
from cowbackup.block.drivers.qcow2 import Qcow2Node, StoredBitmap, create_image
from cowbackup.block.drivers.qcow2.bitmaps import BME_FLAG_EXTRA_DATA_COMPATIBLE, DIR_ENTRY
from cowbackup.block.drivers.qcow2.format import AUTOCLEAR_OFFSET, parse_header
from cowbackup.block.errors import BlockError
from cowbackup.block.graph import BlockGraph

from .helpers import KiB, MiB, check_clean, needs_qemu_img, open_qcow2, qemu_img, qemu_io

pytestmark = needs_qemu_img


def _info_bitmaps(path: Path) -> list[dict[str, Any]]:
    info = json.loads(qemu_img("info", "--output=json", "-U", path).stdout)
    bitmaps: list[dict[str, Any]] = info["format-specific"]["data"].get("bitmaps", [])
    return bitmaps


def _expected(size: int, granularity: int, writes: list[tuple[int, int]]) -> DirtyBitmap:
    bitmap = DirtyBitmap(size, granularity)
    for off, n in writes:
        bitmap.set(off, n)
    return bitmap


async def _read_bitmaps(path: Path, read_only: bool = True) -> dict[str, StoredBitmap]:
    graph = BlockGraph()
    try:
        node = await open_qcow2(graph, path, "q", **{"read-only": read_only})
        return {sb.name: sb for sb in node.stored_bitmaps()}
    finally:
        await graph.close_all()


def _read(path: Path, read_only: bool = True) -> dict[str, StoredBitmap]:
    return asyncio.run(_read_bitmaps(path, read_only))


def _directory(path: Path) -> tuple[int, int, int]:
    """(nb_bitmaps, directory size, directory offset) of an image."""
    data = path.read_bytes()
    hdr = parse_header(data[: 1 << int.from_bytes(data[20:24], "big")], len(data))
    assert hdr.bitmaps_ext is not None
    return hdr.bitmaps_ext


@pytest.mark.parametrize("cluster_size", [4 * KiB, 64 * KiB])
def test_reads_bitmaps_made_by_qemu(tmp_path: Path, cluster_size: int) -> None:
    img = tmp_path / "img.qcow2"
    size = 64 * MiB
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", img, str(size))
    qemu_img("bitmap", "--add", img, "always")
    qemu_img("bitmap", "--add", "-g", "128K", img, "early")
    qemu_img("bitmap", "--add", "--disable", "-g", "512", img, "late")
    first = [(1 * MiB, 64 * KiB), (10 * MiB + 1000, 300 * KiB), (63 * MiB, 1)]
    qemu_io(img, *(f"write -P 7 {off} {n}" for off, n in first))
    qemu_img("bitmap", "--disable", img, "early")
    qemu_img("bitmap", "--enable", img, "late")
    second = [(20 * MiB, 1 * KiB), (40 * MiB - 512, 2 * MiB)]
    qemu_io(img, *(f"write -z {off} {n}" for off, n in second))
    qemu_img("bitmap", "--add", img, "merged", "--disable")
    qemu_img("bitmap", "--merge", "early", img, "merged")

    got = _read(img)
    info = {b["name"]: b for b in _info_bitmaps(img)}
    assert set(got) == set(info) == {"always", "early", "late", "merged"}
    for name, sb in got.items():
        assert sb.granularity == info[name]["granularity"]
        assert sb.enabled == ("auto" in info[name]["flags"])
        assert not sb.inconsistent
    # Without -g, QEMU's granularity is the image's cluster size (at least 4 KiB).
    assert got["always"].granularity == max(cluster_size, 4 * KiB)
    assert got["always"].bitmap == _expected(size, got["always"].granularity, first + second)
    assert got["early"].bitmap == _expected(size, 128 * KiB, first)
    assert got["late"].bitmap == _expected(size, 512, second)
    # Merged at a finer granularity: the granules of "early" (128 KiB) are set whole.
    assert got["merged"].bitmap == _expected(
        size, got["merged"].granularity, list(got["early"].bitmap.dirty_areas())
    )


def _random_bitmap(rnd: random.Random, size: int, granularity: int) -> DirtyBitmap:
    bitmap = DirtyBitmap(size, granularity)
    for _ in range(rnd.randrange(0, 40)):
        off = rnd.randrange(size)
        bitmap.set(off, rnd.randrange(1, min(size - off, 8 * MiB) + 1))
    return bitmap


async def _store(path: Path, bitmaps: list[StoredBitmap]) -> None:
    graph = BlockGraph()
    try:
        node = await open_qcow2(graph, path)
        assert node.can_store_bitmaps
        await node.store_bitmaps(bitmaps)
    finally:
        await graph.close_all()


def test_qemu_reads_the_bits_we_store(tmp_path: Path) -> None:
    """Our bitmaps are listed by qemu-img info, pass qemu-img check, and their bits survive QEMU reading
    them and writing them anew (qemu-img convert --bitmaps), down to all-ones clusters and the tail."""
    size = 48 * MiB + 512 * 3
    img = tmp_path / "ours.qcow2"
    create_image(str(img), size, cluster_size=4 * KiB)
    rnd = random.Random(5)
    full = DirtyBitmap(size, 512)
    full.set_all()
    bitmaps = [
        StoredBitmap("rand", _random_bitmap(rnd, size, 64 * KiB)),
        StoredBitmap("full", full, enabled=False),
        StoredBitmap("sparse-\u00e9", _random_bitmap(rnd, size, 1 * MiB), enabled=False),
        StoredBitmap("empty", DirtyBitmap(size, 4 * KiB)),
    ]
    expected = {sb.name: sb.bitmap.copy() for sb in bitmaps}
    asyncio.run(_store(img, bitmaps))
    check_clean(img)
    info = {b["name"]: b for b in _info_bitmaps(img)}
    assert {n: (b["granularity"], sorted(b["flags"])) for n, b in info.items()} == {
        "rand": (64 * KiB, ["auto"]),
        "full": (512, []),
        "sparse-\u00e9": (1 * MiB, []),
        "empty": (4 * KiB, ["auto"]),
    }
    copy = tmp_path / "copy.qcow2"
    qemu_img("convert", "--bitmaps", "-O", "qcow2", img, copy)
    got = _read(copy)
    assert {name: sb.bitmap for name, sb in got.items()} == expected


def test_qemu_img_bitmap_works_on_our_image(tmp_path: Path) -> None:
    size = 16 * MiB
    img = tmp_path / "ours.qcow2"
    create_image(str(img), size)
    a = DirtyBitmap(size, 64 * KiB)
    a.set(3 * MiB, 100)
    asyncio.run(_store(img, [StoredBitmap("a", a), StoredBitmap("gone", DirtyBitmap(size, 64 * KiB))]))
    qemu_img("bitmap", "--remove", img, "gone")
    qemu_img("bitmap", "--add", img, "b")
    qemu_io(img, "write 8M 4k")
    qemu_img("bitmap", "--merge", "a", img, "b")
    check_clean(img)
    got = _read(img)
    assert set(got) == {"a", "b"}
    assert got["a"].bitmap == _expected(size, 64 * KiB, [(3 * MiB, 100), (8 * MiB, 4096)])
    assert got["b"].bitmap == _expected(size, 64 * KiB, [(3 * MiB, 100), (8 * MiB, 4096)])


def test_in_use_while_written_cleared_at_clean_close(tmp_path: Path) -> None:
    size = 8 * MiB
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(size))
    qemu_img("bitmap", "--add", img, "on")
    qemu_img("bitmap", "--add", "--disable", img, "off")

    async def run() -> None:
        graph = BlockGraph()
        node = await open_qcow2(graph, img)
        await node.read(0, bytearray(4096))
        assert all(b["flags"] in (["auto"], []) for b in _info_bitmaps(img)), "a read set in_use"
        await node.write(1 * MiB, b"x" * 1000)
        # The write was acknowledged: in_use is on disk for every bitmap we hold.
        assert all("in-use" in b["flags"] for b in _info_bitmaps(img))
        assert qemu_img("check", "-U", img).returncode == 0
        # Storing while written keeps in_use; the close stores again, clean.
        await node.store_bitmaps(node.stored_bitmaps())
        assert all("in-use" in b["flags"] for b in _info_bitmaps(img))
        await node.discard(4 * MiB, 1 * MiB)
        await graph.close_all()

    asyncio.run(run())
    check_clean(img)
    assert sorted((b["name"], b["flags"]) for b in _info_bitmaps(img)) == [("off", []), ("on", ["auto"])]
    got = _read(img)
    assert got["on"].bitmap == _expected(size, 64 * KiB, [(1 * MiB, 1000), (4 * MiB, 1 * MiB)])
    assert got["off"].bitmap.is_empty()


def test_store_before_any_write_is_clean_then_first_write_sets_in_use(tmp_path: Path) -> None:
    img = tmp_path / "img.qcow2"
    create_image(str(img), 4 * MiB)

    async def run() -> None:
        graph = BlockGraph()
        node = await open_qcow2(graph, img)
        await node.store_bitmaps([StoredBitmap("b", DirtyBitmap(node.size, 64 * KiB))])
        assert _info_bitmaps(img) == [{"name": "b", "granularity": 65536, "flags": ["auto"]}]
        await node.write(0, b"\1" * 512)
        assert _info_bitmaps(img)[0]["flags"] == ["in-use", "auto"]
        await node.remove_stored_bitmap("b")
        assert _info_bitmaps(img) == []
        with pytest.raises(BlockError, match="not stored"):
            await node.remove_stored_bitmap("b")
        await graph.close_all()

    asyncio.run(run())
    check_clean(img)


def test_refuses_bad_bitmap_sets(tmp_path: Path) -> None:
    img = tmp_path / "img.qcow2"
    create_image(str(img), 4 * MiB)
    before = img.read_bytes()

    async def run() -> None:
        graph = BlockGraph()
        node = await open_qcow2(graph, img)
        ok = DirtyBitmap(node.size, 64 * KiB)
        bad: list[tuple[list[StoredBitmap], str]] = [
            ([StoredBitmap("", ok)], "must be 1 to"),
            ([StoredBitmap("x" * 1024, ok)], "must be 1 to"),
            ([StoredBitmap("a", ok), StoredBitmap("a", ok)], "stored twice"),
            ([StoredBitmap("a", DirtyBitmap(node.size, 256))], "granularity 256"),
            ([StoredBitmap("a", DirtyBitmap(node.size + 1, 64 * KiB))], "covers"),
        ]
        for bitmaps, message in bad:
            with pytest.raises(BlockError, match=message):
                await node.store_bitmaps(bitmaps)
        await graph.close_all()
        graph = BlockGraph()
        ro = await open_qcow2(graph, img, "r", **{"read-only": True})
        assert not ro.can_store_bitmaps
        with pytest.raises(BlockError, match="Cannot store"):
            await ro.store_bitmaps([StoredBitmap("a", ok)])
        await graph.close_all()

    asyncio.run(run())
    assert img.read_bytes() == before


def test_v2_images_cannot_store_bitmaps(tmp_path: Path) -> None:
    img = tmp_path / "v2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", img, "1M")

    async def run() -> None:
        graph = BlockGraph()
        node = await open_qcow2(graph, img)
        assert not node.can_store_bitmaps and node.stored_bitmaps() == []
        await graph.close_all()

    asyncio.run(run())


def test_cleared_autoclear_bit_means_no_bitmaps(tmp_path: Path) -> None:
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    qemu_img("bitmap", "--add", img, "b")
    data = bytearray(img.read_bytes())
    data[AUTOCLEAR_OFFSET : AUTOCLEAR_OFFSET + 8] = bytes(8)
    img.write_bytes(data)
    assert _read(img, read_only=False) == {}


def test_extra_data_kept_and_unusable_entries_left_alone(tmp_path: Path) -> None:
    size = 4 * MiB
    img = tmp_path / "img.qcow2"
    create_image(str(img), size)
    extra = DirtyBitmap(size, 64 * KiB)
    extra.set(0, 1)
    asyncio.run(_store(img, [StoredBitmap("x", extra, extra_data=b"opaque!")]))
    got = _read(img)
    assert got["x"].extra_data == b"opaque!" and got["x"].bitmap == extra
    # Clear extra_data_compatible: the entry must now be kept as it is, never used.
    _, _, doff = _directory(img)
    data = bytearray(img.read_bytes())
    flags_at = doff + 12
    flags = struct.unpack_from(">I", data, flags_at)[0] & ~BME_FLAG_EXTRA_DATA_COMPATIBLE
    struct.pack_into(">I", data, flags_at, flags)
    img.write_bytes(data)
    assert _read(img) == {}
    asyncio.run(_store(img, [StoredBitmap("y", DirtyBitmap(size, 64 * KiB))]))
    nb, dsize, doff = _directory(img)
    assert nb == 2
    assert b"opaque!x" in img.read_bytes()[doff : doff + dsize]
    with pytest.raises(BlockError, match="stored twice"):
        asyncio.run(_store(img, [StoredBitmap("x", DirtyBitmap(size, 64 * KiB))]))
    assert set(_read(img)) == {"y"}


def _corrupt_cases(img: Path) -> list[tuple[str, int, bytes]]:
    """(expected error, offset, new bytes) of damaged bitmap metadata."""
    data = img.read_bytes()
    cs = 1 << int.from_bytes(data[20:24], "big")
    nb, dsize, doff = _directory(img)
    table_off, table_size, flags, _, gbits, name_size, _ = DIR_ENTRY.unpack_from(data, doff)
    l1_off = int.from_bytes(data[40:48], "big")
    rt_off = int.from_bytes(data[48:56], "big")
    data_cluster = int.from_bytes(data[table_off : table_off + 8], "big")
    second = doff + DIR_ENTRY.size + name_size + (-(DIR_ENTRY.size + name_size) % 8)
    second_table = int.from_bytes(data[second : second + 8], "big")
    q = struct.Struct(">Q").pack
    return [
        ("beyond", doff, q(len(data) + cs)),
        ("not cluster aligned", doff, q(table_off + 8)),
        ("overlaps other metadata", doff, q(l1_off)),
        ("overlaps other metadata", doff, q(rt_off)),
        ("overlaps the", doff, q(doff)),
        ("overlaps the", second, q(table_off)),
        ("needs", doff + 8, struct.pack(">I", table_size - 1)),
        ("reserved flags", doff + 12, struct.pack(">I", flags | 0x80)),
        ("unknown type", doff + 16, b"\x02"),
        ("granularity", doff + 17, bytes([gbits + 40])),
        ("runs past", doff + 18, struct.pack(">H", 1000)),
        ("name of 0 bytes", doff + 18, struct.pack(">H", 0)),
        ("stored twice", second + DIR_ENTRY.size, data[doff + DIR_ENTRY.size : doff + DIR_ENTRY.size + 2]),
        ("reserved bits", table_off, q(data_cluster | 2)),
        ("beyond the end of file", table_off, q(len(data) + cs)),
        ("overlaps the", table_off, q(second_table)),
        ("overlaps other metadata", table_off, q(l1_off)),
        ("lists 0", 112 + 8, struct.pack(">I", 0)),
        ("too short", 112 + 8, struct.pack(">I", nb + 1)),
        ("take", 112 + 8 + 8, q(dsize + 8)),
        ("misaligned", 112 + 8 + 16, q(doff + 512)),
    ]


def test_damaged_bitmap_metadata_is_refused_and_never_written(tmp_path: Path) -> None:
    size = 8 * MiB
    img = tmp_path / "img.qcow2"
    create_image(str(img), size, cluster_size=4 * KiB)
    a = DirtyBitmap(size, 4 * KiB)
    a.set(0, 1)
    b = DirtyBitmap(size, 4 * KiB)
    b.set(5 * MiB, 1)
    asyncio.run(_store(img, [StoredBitmap("aa", a), StoredBitmap("ab", b)]))
    # Our header puts the bitmaps extension right after the 112-byte header: the cases poke it there.
    assert struct.unpack_from(">I", img.read_bytes(), 112)[0] == 0x23852875
    pristine = img.read_bytes()
    for message, offset, patch in _corrupt_cases(img):
        damaged = bytearray(pristine)
        damaged[offset : offset + len(patch)] = patch
        img.write_bytes(damaged)
        digest = hashlib.sha256(damaged).digest()
        for read_only in (True, False):
            with pytest.raises(BlockError, match=message):
                _read(img, read_only)
        assert hashlib.sha256(img.read_bytes()).digest() == digest, message


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sets=st.lists(
        st.lists(
            st.tuples(
                st.integers(0, 3 * MiB - 1), st.integers(1, 1 * MiB), st.sampled_from([512, 4096, 65536])
            ),
            max_size=6,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_repeated_stores_round_trip_and_stay_clean(
    tmp_path: Path, sets: list[list[tuple[int, int, int]]]
) -> None:
    """Storing one set after another (fewer, more, other granularities) reads back the last set exactly
    and never leaks or corrupts."""
    size = 3 * MiB
    img = tmp_path / "prop.qcow2"
    create_image(str(img), size, cluster_size=512)

    async def run() -> dict[str, DirtyBitmap]:
        graph = BlockGraph()
        node = await open_qcow2(graph, img)
        assert isinstance(node, Qcow2Node)
        last: dict[str, DirtyBitmap] = {}
        for round_, ranges in enumerate(sets):
            bitmaps = []
            for i, (off, n, gran) in enumerate(ranges):
                bm = DirtyBitmap(size, gran)
                bm.set(off, min(n, size - off))
                bitmaps.append(StoredBitmap(f"r{round_}-{i}", bm, enabled=bool(i % 2)))
            await node.store_bitmaps(bitmaps)
            last = {sb.name: sb.bitmap.copy() for sb in bitmaps}
        await graph.close_all()
        return last

    expected = asyncio.run(run())
    check_clean(img)
    assert {name: sb.bitmap for name, sb in _read(img).items()} == expected
