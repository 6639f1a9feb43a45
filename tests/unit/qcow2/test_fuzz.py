"""Damaged images: every mutation of header or table bytes gives a clear error at open or on access
(BlockError, or an I/O error on access), never another exception, and the file is never modified."""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowbackup.block.errors import BlockError
from cowbackup.block.graph import BlockGraph

from .helpers import KiB, MiB, needs_qemu_img, open_qcow2, qemu_img, qemu_io

pytestmark = needs_qemu_img


def _metadata_offsets(path: Path) -> list[int]:
    """Header, L1, refcount table, first refcount block, L2 tables and a compressed cluster."""
    data = path.read_bytes()
    cs = 1 << struct.unpack(">I", data[20:24])[0]
    l1_size, l1_off, rt_off = struct.unpack(">IQQ", data[36:56])
    offsets = [0, l1_off, rt_off, int.from_bytes(data[rt_off : rt_off + 8], "big")]
    for i in range(l1_size):
        entry = int.from_bytes(data[l1_off + 8 * i : l1_off + 8 * i + 8], "big") & 0x00FFFFFFFFFFFE00
        if entry:
            offsets.append(entry)
    assert all(o % cs == 0 for o in offsets)
    return offsets


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[bytes, list[int]]]:
    root = tmp_path_factory.mktemp("fuzz")
    out = []
    for name, opts in (("v3", "cluster_size=4096"), ("v2", "compat=0.10,cluster_size=512")):
        img = root / f"{name}.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", opts, img, "2M")
        qemu_io(img, "write -P 0x11 0 100k", "write -z 200k 64k", "write -P 0x22 1M 5k")
        out.append((img.read_bytes(), _metadata_offsets(img)))
    src = root / "src.raw"
    src.write_bytes(b"abc" * 300000)
    comp = root / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", src, comp)
    out.append((comp.read_bytes(), _metadata_offsets(comp)))
    return out


async def _exercise(path: Path, read_only: bool) -> None:
    graph = BlockGraph()
    try:
        node = await open_qcow2(graph, path, "q", **{"read-only": read_only})
        n = min(node.size, 2 * MiB)
        buf = bytearray(64 * KiB)
        for pos in range(0, n, len(buf)):
            await node.read(pos, memoryview(buf)[: min(len(buf), n - pos)])
        pos = 0
        while pos < n:
            pos = (await node.block_status(pos, n - pos)).end
    finally:
        await graph.close_all()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_images_fail_cleanly(
    tmp_path: Path, images: list[tuple[bytes, list[int]]], data: st.DataObject
) -> None:
    image, offsets = data.draw(st.sampled_from(images))
    mutated = bytearray(image)
    for _ in range(data.draw(st.integers(1, 4))):
        base = data.draw(st.sampled_from(offsets))
        pos = base + data.draw(st.integers(0, 511 if base == 0 else 63))
        if pos < len(mutated):
            mutated[pos] = data.draw(st.integers(0, 255))
    path = tmp_path / "m.qcow2"
    path.write_bytes(bytes(mutated))
    digest = hashlib.sha256(mutated).digest()
    for read_only in (True, False):
        message = "ok"
        try:
            asyncio.run(_exercise(path, read_only))
        except (BlockError, OSError) as err:
            message = str(err)
        assert message  # an error always says what is wrong
        assert hashlib.sha256(path.read_bytes()).digest() == digest


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ((0, b"QFI\x00"), "not in qcow2 format"),
        ((4, b"\0\0\0\x04"), "unsupported qcow2 version"),
        ((20, b"\0\0\0\x1f"), "cluster size"),
        ((72, b"\0\0\0\0\0\0\x01\0"), "unsupported features"),
        ((32, b"\0\0\0\x01"), "encrypted"),
        ((36, b"\x7f\xff\xff\xff"), "L1 table"),
        ((56, b"\x00\x10\x00\x00"), "refcount table"),
    ],
)
def test_bad_headers_name_the_problem(tmp_path: Path, patch: tuple[int, bytes], message: str) -> None:
    img = tmp_path / "h.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    data = bytearray(img.read_bytes())
    data[patch[0] : patch[0] + len(patch[1])] = patch[1]
    img.write_bytes(bytes(data))
    with pytest.raises(BlockError, match=message):
        asyncio.run(_exercise(img, True))


def test_truncated_image(tmp_path: Path) -> None:
    img = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    img.write_bytes(img.read_bytes()[:50])
    with pytest.raises(BlockError, match="truncated"):
        asyncio.run(_exercise(img, True))


def test_corrupt_and_dirty_bits_refuse_read_write(tmp_path: Path) -> None:
    for bit, message in ((2, "corrupt"), (1, "dirty bit")):
        img = tmp_path / f"b{bit}.qcow2"
        qemu_img("create", "-f", "qcow2", img, "1M")
        data = bytearray(img.read_bytes())
        data[79] |= bit
        img.write_bytes(bytes(data))
        asyncio.run(_exercise(img, True))
        with pytest.raises(BlockError, match=message):
            asyncio.run(_exercise(img, False))
        assert json.loads(qemu_img("info", "--output=json", "-U", img).stdout)["format"] == "qcow2"
