"""The ``discard`` option, differentially: the same ``--blockdev`` lines on qemu-storage-daemon 7.2 and
``cowbackup daemon``, the same discards from qemu-io through an NBD export, the same result.

Each case starts both daemons with its ``--blockdev`` lines, an NBD server and a writable export of
node ``disk``; adds a dirty bitmap (64 KiB granules) on every named node; sends, from qemu-io over NBD,
discards of whole clusters, of an unaligned range and of a small piece of one cluster; then compares
what the two daemons report and leave:

* the ``count`` of every bitmap (``query-named-block-nodes``): QEMU marks the bitmaps of the node that
  executes a discard (``discard=unmap``) and of no node that drops it;
* the image read back after ``quit`` (through qemu-img, as the format says), byte for byte;
* its allocation map (``qemu-img map``: data and zero flags), so that "dropped" and "executed" differ
  where a discard deallocates without changing what reads back.

The images start full of data (0x5a), so every executed discard is visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from qemu.qmp import QMPClient

from .conftest import MiB, cli_command, cli_env, connect_qmp, wait_listening
from .nbd_peers import require

QSD = "qemu-storage-daemon"
WAIT = 10.0
SIZE = 4 * MiB

pytestmark = pytest.mark.skipif(shutil.which(QSD) is None, reason=f"{QSD} is not installed")

#: qemu-io commands sent through the export: whole clusters, an unaligned range, part of one cluster.
DISCARDS = ("discard 0 1M", "discard 1620k 100k", "discard 3M 4k")


@dataclass(frozen=True)
class Case:
    blockdevs: tuple[str, ...]  # ``{img}`` stands for the image's path
    fmt: str  # of the image: qcow2 or raw; "" for none (null-co)
    bitmaps: tuple[str, ...]  # nodes that get a bitmap


CASES = {
    # null-co has no discard of its own in QEMU: even with unmap, bdrv_co_pdiscard drops it untracked.
    "null-co-unmap": Case(("driver=null-co,node-name=disk,size=4194304,discard=unmap",), "", ("disk",)),
    "qcow2-default": Case(
        ("driver=qcow2,node-name=disk,file.driver=file,file.filename={img}",), "qcow2", ("disk",)
    ),
    "qcow2-unmap": Case(
        ("driver=qcow2,node-name=disk,discard=unmap,file.driver=file,file.filename={img}",),
        "qcow2",
        ("disk",),
    ),
    "raw-named-default": Case(
        ("driver=file,node-name=f,filename={img}", "driver=raw,node-name=disk,file=f"), "raw", ("disk", "f")
    ),
    # raw executes (marks its bitmap, passes it on), the file drops it: nothing changes.
    "raw-unmap-named-default": Case(
        ("driver=file,node-name=f,filename={img}", "driver=raw,node-name=disk,file=f,discard=unmap"),
        "raw",
        ("disk", "f"),
    ),
    "raw-unmap-named-unmap": Case(
        (
            "driver=file,node-name=f,filename={img},discard=unmap",
            "driver=raw,node-name=disk,file=f,discard=unmap",
        ),
        "raw",
        ("disk", "f"),
    ),
    # The file would execute it, but raw drops it first.
    "raw-default-named-unmap": Case(
        ("driver=file,node-name=f,filename={img},discard=unmap", "driver=raw,node-name=disk,file=f"),
        "raw",
        ("disk", "f"),
    ),
    # An inline file child defaults to discard=unmap (bdrv_inherited_options): holes are punched.
    "raw-unmap-inline": Case(
        ("driver=raw,node-name=disk,discard=unmap,file.driver=file,file.filename={img}",), "raw", ("disk",)
    ),
}


def make_image(path: Path, fmt: str) -> None:
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE)], check=True)
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {SIZE}", str(path)],
            check=True,
            capture_output=True,
        )
    else:
        path.write_bytes(b"\x5a" * SIZE)


async def run_daemon(kind: str, case: Case, image: Path, workdir: Path, log: IO[bytes]) -> dict[str, int]:
    """Start one daemon with the case's options, discard through its export; the bitmap counts."""
    qmp = workdir / f"{kind}-qmp.sock"
    nbd = workdir / f"{kind}-nbd.sock"
    argv = [QSD] if kind == "qemu" else cli_command("daemon")
    for line in case.blockdevs:
        argv += ["--blockdev", line.format(img=image)]
    argv += [
        "--nbd-server",
        f"addr.type=unix,addr.path={nbd}",
        "--export",
        "type=nbd,id=e,node-name=disk,writable=on",
        "--chardev",
        f"socket,id=m,path={qmp},server=on,wait=off",
        "--monitor",
        "chardev=m",
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=cli_env()
    )
    client = QMPClient(kind)
    try:
        await wait_listening(qmp, proc, f"{kind} daemon (output in {log.name})", WAIT)
        await connect_qmp(client, qmp, WAIT)
        for node in case.bitmaps:
            await client.execute("block-dirty-bitmap-add", {"node": node, "name": "b"})
        io_argv = ["qemu-io", "-f", "raw"]
        for command in DISCARDS:
            io_argv += ["-c", command]
        io = await asyncio.create_subprocess_exec(
            *io_argv,
            f"nbd+unix:///disk?socket={nbd}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(io.communicate(), WAIT)
        assert io.returncode == 0 and b"failed" not in out, out.decode()
        counts: dict[str, int] = {}
        nodes: list[dict[str, Any]] = await client.execute("query-named-block-nodes")  # type: ignore[assignment]
        for info in nodes:
            for bitmap in info.get("dirty-bitmaps", []):
                counts[info["node-name"]] = bitmap["count"]
        return counts
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.execute("quit"), WAIT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), WAIT)
        try:
            await asyncio.wait_for(proc.wait(), WAIT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            pytest.fail(f"{kind} daemon did not exit after quit")


def contents(image: Path, fmt: str, workdir: Path) -> tuple[bytes, list[tuple[int, int, bool, bool]]]:
    """What the image reads (as raw bytes) and its allocation map (start, length, data, zero)."""
    out = workdir / f"{image.name}.out"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(out)], check=True)
    mapped = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", fmt, str(image)],
        check=True,
        capture_output=True,
        text=True,
    )
    extents = [(e["start"], e["length"], e["data"], e["zero"]) for e in json.loads(mapped.stdout)]
    return out.read_bytes(), extents


@pytest.mark.parametrize("name", list(CASES))
def test_discards_match_qemu(workdir: Path, name: str) -> None:
    require("qemu-io", "qemu-img")
    case = CASES[name]
    seen: dict[str, tuple[dict[str, int], bytes, list[tuple[int, int, bool, bool]]]] = {}
    for kind in ("qemu", "ours"):
        image = workdir / f"{kind}.{case.fmt}"
        if case.fmt:
            make_image(image, case.fmt)
        with open(workdir / f"{kind}.log", "wb") as log:
            counts = asyncio.run(asyncio.wait_for(run_daemon(kind, case, image, workdir, log), 4 * WAIT))
        seen[kind] = (counts, *contents(image, case.fmt, workdir)) if case.fmt else (counts, b"", [])
    qemu, ours = seen["qemu"], seen["ours"]
    assert ours[0] == qemu[0], "bitmap counts"
    assert ours[1] == qemu[1], "image contents"
    assert ours[2] == qemu[2], "allocation map"
