"""qcow2 images made by qemu-img read as qemu-img reads them; images we write pass qemu-img check."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import Status

from .helpers import (
    KiB,
    MiB,
    check_clean,
    needs_qemu_img,
    open_qcow2,
    pattern,
    qemu_img,
    qemu_io,
    read_all,
    to_raw,
)

pytestmark = needs_qemu_img

_WRITES = (
    "write -P 0x11 0 64k",
    "write -P 0x22 1000 3000",
    "write -P 0x33 1M 2M",
    "write -z 1536k 256k",
    "discard 2M 128k",
    "write -P 0x44 7M 1",
)


def _expected_map(path: Path) -> list[tuple[int, int, int, bool, bool]]:
    out = qemu_img("map", "--output=json", path)
    return [(e["start"], e["length"], e["depth"], e["zero"], e["data"]) for e in json.loads(out.stdout)]


async def _compare(path: Path, tmp_path: Path) -> None:
    expected = to_raw(path, tmp_path / "expected.raw")
    graph = BlockGraph()
    node = await open_qcow2(graph, path, "q", **{"read-only": True})
    try:
        assert await read_all(node) == expected
        for start, length, depth, zero, data in _expected_map(path):
            pos = start
            while pos < start + length:
                ext = await node.block_status(pos, start + length - pos)
                if depth == 0:
                    assert bool(ext.flags & Status.DATA) == data, (start, ext)
                    assert bool(ext.flags & Status.ZERO) == (zero and not data), (start, ext)
                else:
                    assert not ext.flags & Status.ALLOCATED, (start, ext)
                pos = ext.end
    finally:
        await graph.close_all()


@pytest.mark.parametrize("cluster_size", [512, 4 * KiB, 64 * KiB, 2 * MiB])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_reads_qemu_images(tmp_path: Path, cluster_size: int, compat: str) -> None:
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster_size},compat={compat}", img, "8M")
    qemu_io(img, *_WRITES)
    asyncio.run(_compare(img, tmp_path))


@pytest.mark.parametrize("backing_fmt", ["raw", "qcow2", None])
def test_reads_backing_chain(tmp_path: Path, backing_fmt: str | None) -> None:
    base = tmp_path / "base.img"
    fmt = backing_fmt or "qcow2"
    qemu_img("create", "-f", fmt, base, "8M")
    qemu_io(base, "write -P 0x55 0 8M", fmt=fmt)
    mid = tmp_path / "mid.qcow2"
    # The backing name is stored relative: it must be found next to the image, not in the cwd.
    args = ["-b", "base.img"] + (["-F", backing_fmt] if backing_fmt else [])
    if backing_fmt is None:
        # qemu-img refuses a backing file without a format; write the header extension-free by hand.
        qemu_img("create", "-f", "qcow2", "-b", "base.img", "-F", "qcow2", mid, "12M")
        _drop_backing_format(mid)
    else:
        qemu_img("create", "-f", "qcow2", *args, mid, "12M")
    qemu_io(mid, "write -P 0x66 64k 64k", "write -z 1M 64k", "discard 2M 64k", "write -P 0x77 9M 100k")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, "12M")
    qemu_io(top, "write -P 0x88 100k 10k")
    asyncio.run(_compare(top, tmp_path))


def _drop_backing_format(path: Path) -> None:
    """Remove the backing format extension (keep its slot: type 0xE2792ACA becomes an unknown type)."""
    data = bytearray(path.read_bytes())
    pos = data.index(bytes.fromhex("e2792aca"))
    data[pos : pos + 4] = bytes.fromhex("12345678")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_reads_compressed(tmp_path: Path, ctype: str) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(pattern(3 * MiB) + bytes(MiB) + b"\xab" * (MiB + 4321))
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={ctype}", src, img)
    asyncio.run(_compare(img, tmp_path))


def test_our_writes_pass_check_and_compare(tmp_path: Path) -> None:
    from cowbackup.block.drivers.qcow2 import create_image

    img = tmp_path / "ours.qcow2"
    shadow = bytearray(20 * MiB)
    create_image(str(img), len(shadow), cluster_size=64 * KiB)

    async def main() -> None:
        graph = BlockGraph()
        node = await open_qcow2(graph, img)
        for i, (off, n) in enumerate([(0, 4 * MiB), (5000, 70000), (10 * MiB - 7, 3 * MiB), (19 * MiB, MiB)]):
            data = pattern(n, i)
            await node.write(off, data)
            shadow[off : off + n] = data
        await node.write_zeroes(MiB, 2 * MiB)
        shadow[MiB : 3 * MiB] = bytes(2 * MiB)
        await node.discard(11 * MiB, MiB + 5)
        shadow[11 * MiB : 12 * MiB] = bytes(MiB)
        assert await read_all(node) == bytes(shadow)
        await graph.close_all()

    asyncio.run(main())
    check_clean(img)
    raw = tmp_path / "shadow.raw"
    raw.write_bytes(bytes(shadow))
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", img, raw, check=False).returncode == 0
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["virtual-size"] == len(shadow) and info["format"] == "qcow2"


def test_write_over_backing_copies_partial_clusters(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 0x5a 0 4M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", top, "4M")

    async def main() -> None:
        graph = BlockGraph()
        node = await open_qcow2(graph, top)
        await node.write(100, b"abc")
        await node.write_zeroes(64 * KiB, 64 * KiB)
        await node.discard(128 * KiB, 64 * KiB)
        ext = await node.block_status(192 * KiB, 64 * KiB)
        assert ext.flags == Status(0)  # unallocated over a backing file: sync=top skips it
        await graph.close_all()

    asyncio.run(main())
    check_clean(top)
    data = to_raw(top, tmp_path / "out.raw")
    assert (
        data[:100] == b"\x5a" * 100 and data[100:103] == b"abc" and data[103 : 64 * KiB] == b"\x5a" * (65433)
    )
    assert data[64 * KiB : 192 * KiB] == bytes(128 * KiB)
    assert data[192 * KiB :] == b"\x5a" * (4 * MiB - 192 * KiB)
