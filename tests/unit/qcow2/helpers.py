"""Shared helpers of the qcow2 tests: qemu-img, opening images, byte patterns."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cowbackup.block.drivers import open_node
from cowbackup.block.drivers.qcow2 import Qcow2Node
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode

KiB = 1024
MiB = 1024 * 1024

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")


def qemu_img(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, check=check)


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    argv: list[str] = ["qemu-io", "-f", fmt]
    for cmd in commands:
        argv += ["-c", cmd]
    out = subprocess.run([*argv, str(path)], capture_output=True, text=True, check=True)
    assert "error" not in out.stdout.lower() + out.stderr.lower(), out.stdout + out.stderr


def check_clean(path: Path) -> dict[str, Any]:
    """``qemu-img check`` finds no corruption and no leak; its JSON report."""
    out = qemu_img("check", "--output=json", path, check=False)
    report: dict[str, Any] = json.loads(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    return report


def to_raw(path: Path, dest: Path) -> bytes:
    qemu_img("convert", "-O", "raw", path, dest)
    return dest.read_bytes()


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed * 13) % 251 for i in range(n))


async def open_qcow2(graph: BlockGraph, path: Path, name: str = "q", **opts: object) -> Qcow2Node:
    node = await open_node(
        graph,
        # discard=unmap, as libvirt opens images: these tests exercise the driver's discard, which a node
        # opened with the default (ignore) never sees.
        {
            "driver": "qcow2",
            "node-name": name,
            "discard": "unmap",
            "file": {"driver": "file", "filename": str(path)},
            **opts,
        },
    )
    assert isinstance(node, Qcow2Node)
    return node


async def read_all(node: BlockNode, chunk: int = 4 * MiB) -> bytes:
    out = bytearray(node.size)
    for pos in range(0, node.size, chunk):
        await node.read(pos, memoryview(out)[pos : pos + chunk])
    return bytes(out)
