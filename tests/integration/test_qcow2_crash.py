"""Crash safety of the qcow2 driver: a writer killed (SIGKILL) at random points leaves an image that
qemu-img check finds free of corruption (leaks are allowed), holding every write flushed before the kill."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cowbackup.block.drivers.qcow2 import create_image

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")

SIZE = 4 * 1024 * 1024

_WRITER = r"""
import asyncio, random, sys
from cowbackup.block.drivers import open_node
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import RequestFlags

def pattern(n, seed):
    return bytes((i * 7 + seed * 13) % 251 for i in range(n))

async def main(path, journal, seed, size):
    rnd = random.Random(seed)
    graph = BlockGraph()
    # discard=unmap: the model zeroes what is discarded (the default, ignore, drops discards)
    node = await open_node(graph, {"driver": "qcow2", "node-name": "q", "discard": "unmap",
                                   "file": {"driver": "file", "filename": path}, "l2-cache-size": 8192})
    with open(journal, "a", buffering=1) as log:
        for i in range(100000):
            kind = rnd.choice(["write", "write", "write", "zero", "discard", "flush"])
            off = rnd.randrange(size)
            n = min(rnd.randrange(1, 300000), size - off)
            log.write(f"{kind} {off} {n} {i}\n")
            if kind == "write":
                await node.write(off, pattern(n, i))
            elif kind == "zero":
                await node.write_zeroes(off, n, RequestFlags.MAY_UNMAP if i % 2 else RequestFlags(0))
            elif kind == "discard":
                await node.discard(off, n)
            else:
                await node.flush()
                log.write(f"flushed {i}\n")

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed * 13) % 251 for i in range(n))


def _replay(lines: list[str], cs: int) -> tuple[bytearray, list[tuple[int, int]]]:
    """The image as of the last completed flush, and the ranges touched after it (undefined content)."""
    last = max((i for i, line in enumerate(lines) if line.startswith("flushed")), default=-1)
    shadow = bytearray(SIZE)
    after: list[tuple[int, int]] = []
    for i, line in enumerate(lines):
        parts = line.split()
        if len(parts) != 4:
            continue
        kind, off, n, seed = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
        if i > last:
            after.append((off - cs, off + n + cs))  # partial clusters may be rewritten around a range
            continue
        if kind == "write":
            shadow[off : off + n] = _pattern(n, seed)
        elif kind == "zero":
            shadow[off : off + n] = bytes(n)
        elif kind == "discard":
            start = -(-off // cs) * cs
            end = off + n if off + n == SIZE else (off + n) // cs * cs
            if end > start:
                shadow[start:end] = bytes(end - start)
    return shadow, after


@pytest.mark.parametrize("cs", [4096, 65536])
def test_killed_writer_leaves_consistent_image(tmp_path: Path, cs: int) -> None:
    rnd = random.Random(cs)
    for round_ in range(3):
        img = tmp_path / f"crash{round_}.qcow2"
        journal = tmp_path / f"journal{round_}.txt"
        create_image(str(img), SIZE, cluster_size=cs)
        child = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(img), str(journal), str(round_), str(SIZE)],
            stderr=subprocess.PIPE,
        )
        # Let it run a random while, then kill it mid-flight.
        time.sleep(rnd.uniform(0.3, 1.2))
        child.kill()
        _, err = child.communicate()
        assert child.returncode == -9, err.decode()
        out = subprocess.run(["qemu-img", "check", "--output=json", str(img)], capture_output=True, text=True)
        report = json.loads(out.stdout)
        assert report.get("corruptions", 0) == 0, report
        raw = tmp_path / "out.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(raw)], check=True)
        data = raw.read_bytes()
        shadow, after = _replay(journal.read_text().splitlines(), cs)
        mask = bytearray(b"\1") * SIZE
        for start, end in after:
            start, end = max(0, start), min(SIZE, end)
            mask[start:end] = bytes(end - start)
        for pos in range(0, SIZE, cs):
            if all(mask[pos : pos + cs]):
                assert data[pos : pos + cs] == shadow[pos : pos + cs], f"cluster at {pos} lost flushed data"
