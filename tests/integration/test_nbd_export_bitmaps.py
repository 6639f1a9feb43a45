"""``block-export-add`` with ``bitmaps`` and ``allocation-depth``, differentially against qemu-storage-daemon.

Both daemons run the same script (test_qmp_differential's nodes: ``src`` is a 4 MiB raw file of 64
clusters): refusals (unknown bitmap, enabled bitmap on a read-only export, a bitmap busy in another
export), the busy flag while exported and after, and what nbdinfo reads from the export's
``qemu:dirty-bitmap:NAME`` and ``qemu:allocation-depth`` contexts after qemu-io wrote through a writable
export.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from .test_bitmap_differential import bitmaps, bm, export_src, qemu_io, writes
from .test_qmp_differential import CLUSTER, Backend, Obs, call, differential, refusal, source

__all__ = ["source"]

C = CLUSTER


def exp(export_id: str, **extra: Any) -> dict[str, Any]:
    return {"type": "nbd", "id": export_id, "node-name": "src", "name": export_id, **extra}


async def nbdinfo_map(b: Backend, export: str, context: str) -> list[tuple[int, int, int]]:
    uri = f"nbd+unix:///{export}?socket={b.workdir / f'{b.kind}-nbd.sock'}"
    proc = await asyncio.create_subprocess_exec(
        "nbdinfo", f"--map={context}", "--json", uri, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    runs: list[tuple[int, int, int]] = []
    for e in json.loads(out):
        if runs and runs[-1][2] == e["type"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"], e["type"])
        else:
            runs.append((e["offset"], e["length"], e["type"]))
    return runs


async def export_script(b: Backend) -> Obs:
    c = b.client
    await export_src(b)  # writable export "src" of node src
    obs: Obs = [
        await call(c, "block-dirty-bitmap-add", bm(name="live")),
        await call(c, "block-dirty-bitmap-add", bm(name="frozen")),
    ]
    await qemu_io(b, *writes([2, 3, 10], 0x11))
    obs.append(await call(c, "block-dirty-bitmap-disable", bm(name="frozen")))
    await qemu_io(b, *writes([20], 0x22))
    obs += [
        await refusal(c, "block-export-add", exp("e1", bitmaps=["nope"])),
        await refusal(c, "block-export-add", exp("e1", bitmaps=[{"node": "src", "name": "nope"}])),
        await refusal(c, "block-export-add", exp("e1", bitmaps=[{"node": "nope", "name": "live"}])),
        await refusal(c, "block-export-add", exp("e1", bitmaps=["live"])),  # enabled, read-only export
        await refusal(c, "block-export-add", exp("e1", bitmaps=["frozen"], **{"allocation-depth": True})),
        await refusal(c, "block-export-add", exp("e2", bitmaps=[{"node": "src", "name": "frozen"}])),
        await refusal(c, "block-export-add", exp("e3", bitmaps=["live"], writable=True)),
        await bitmaps(c),
        await refusal(c, "block-dirty-bitmap-remove", bm(name="frozen")),
        await refusal(c, "block-dirty-bitmap-clear", bm(name="live")),
        await nbdinfo_map(b, "e1", "qemu:dirty-bitmap:frozen"),
        await nbdinfo_map(b, "e3", "qemu:dirty-bitmap:live"),
        await nbdinfo_map(b, "e1", "qemu:allocation-depth"),
    ]
    for export_id in ("e1", "e3"):
        obs.append(await call(c, "block-export-del", {"id": export_id}))
    await asyncio.sleep(0.2)  # BLOCK_EXPORT_DELETED comes once the last client is gone
    obs += [
        await bitmaps(c),
        await call(c, "block-dirty-bitmap-remove", bm(name="frozen")),
        await call(c, "block-dirty-bitmap-remove", bm(name="live")),
    ]
    return obs


def test_exported_bitmaps_match(workdir: Path, source: Path) -> None:
    seen = differential(workdir, source, export_script)
    for q, o in zip(seen["qemu"], seen["ours"], strict=True):
        assert o == q
    # Not only equal, also right: the disabled bitmap holds clusters 2, 3 and 10; the enabled one also 20.
    frozen, live = seen["ours"][13], seen["ours"][14]
    assert [(o // C, n // C, t) for o, n, t in frozen] == [
        (0, 2, 0),
        (2, 2, 1),
        (4, 6, 0),
        (10, 1, 1),
        (11, 53, 0),
    ]
    assert (20 * C, C, 1) in live
