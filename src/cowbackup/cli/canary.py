"""A generation marker for tracking bitmaps: canary bits that only our own bitmap can carry.

QEMU's dirty bitmaps have a name and nothing else: a bitmap deleted and created again under the same
name -- by a management tool that "restores" bitmaps, by hand -- looks exactly like ours, but it started
recording later and misses every write in between.  An incremental backup driven by it would silently
lose data.

So each tracking bitmap is born marked: in the transaction that creates it (the snapshot's instant) it
also receives, by ``block-dirty-bitmap-merge``, a few *canary* granules chosen at random for this
snapshot and recorded in its manifest.  Bits are never cleared from a tracking bitmap, so before the
next incremental trusts it, every canary must still be set.  A bitmap made by anyone else lacks them,
unless the guest itself has since written every one of those granules -- eight random 64 KiB granules,
recorded nowhere but in our manifest.

QMP cannot set bits, and cannot test one either.  Both are done with a bitmap that holds exactly the
canaries: a tiny qcow2 image written here (no data, one persistent bitmap), opened read-only by the
daemon as a node of the disk's size (bitmaps of the same size merge, whatever their granularity):

* marking: ``block-dirty-bitmap-add`` NEW + ``block-dirty-bitmap-merge`` NEW <- canary node's bitmap,
  in the snapshot's transaction;
* checking: a disabled copy of the tracking bitmap (add + merge in one transaction, so it is one
  instant), its ``count``; merge the canaries into the copy; the count is unchanged exactly when every
  canary was already set.

The canary chunks read as dirty in the next incremental: one 4 MiB chunk with the default chunk size,
eight 64 KiB chunks with the smallest.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from typing import Any

from qemu.qmp import QMPClient

from cowbackup.cli.errors import CliError
from cowbackup.cli.live import blockdev_del_quietly, execute, query_node

#: Canary granules per bitmap, and their preferred size.  A granule of a default-granularity bitmap
#: (4 KiB to 64 KiB) is never larger, so each canary covers whole bits.
CANARIES = 8
CANARY_GRANULE = 65536
#: The bitmap's name inside a canary image.
CANARY_BITMAP = "canary"


@dataclass(frozen=True)
class Canary:
    """Where one tracking bitmap's canary granules are: ``granule`` bytes at each of ``offsets``."""

    granule: int
    offsets: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"granule": self.granule, "offsets": list(self.offsets)}

    @classmethod
    def from_record(cls, record: object) -> Canary | None:
        """The canary a manifest recorded, or None if it recorded none (or nonsense)."""
        if not isinstance(record, dict):
            return None
        granule, offsets = record.get("granule"), record.get("offsets")
        if not isinstance(granule, int) or granule < 512 or granule & (granule - 1):
            return None
        if not isinstance(offsets, list) or not offsets:
            return None
        if not all(isinstance(o, int) and o >= 0 and o % granule == 0 for o in offsets):
            return None
        return cls(granule, tuple(offsets))

    def fits(self, size: int) -> bool:
        return all(o + self.granule <= size for o in self.offsets)


def choose_canary(size: int, chunk_size: int) -> Canary | None:
    """Random canary granules for a disk of ``size`` bytes, gathered in as few repository chunks as
    possible (each chunk holding one is read by the next incremental); None for a disk under 512 bytes."""
    granule = CANARY_GRANULE
    while granule > 512 and size // granule < CANARIES:
        granule //= 2
    granules = size // granule
    if granules == 0:
        return None
    wanted = min(CANARIES, granules)
    per_chunk = max(1, chunk_size // granule)
    chunks = -(-granules // per_chunk)
    rng = secrets.SystemRandom()
    chosen: set[int] = set()
    visited: set[int] = set()
    while len(chosen) < wanted:  # ends: the chunks hold ``granules`` >= ``wanted`` granules in all
        chunk = rng.randrange(chunks)
        if chunk in visited:
            continue
        visited.add(chunk)
        first = chunk * per_chunk
        inside = range(first, min(first + per_chunk, granules))
        chosen.update(rng.sample(inside, min(len(inside), wanted - len(chosen))))
    return Canary(granule, tuple(sorted(g * granule for g in chosen)))


async def write_canary_image(path: str, size: int, canary: Canary) -> None:
    """A new qcow2 image of ``size`` bytes (``path`` must not exist) holding no data and one persistent
    bitmap, :data:`CANARY_BITMAP`, with exactly the canary granules set."""
    # Imported here: a backup that arms no bitmap needs no block layer in this process.
    from cowbackup.block.drivers import qcow2
    from cowbackup.daemon import Daemon

    await qcow2.create(path, size)
    daemon = Daemon()
    try:
        node = await daemon.blockdev_add(
            {"driver": "qcow2", "node-name": "canary", "file": {"driver": "file", "filename": path}}
        )
        bitmap = node.dirty_bitmaps.create(CANARY_BITMAP, canary.granule)
        bitmap.persistent = True
        bitmap.disable()
        for offset in canary.offsets:
            bitmap.bits.set(offset, canary.granule)
        await node.dirty_bitmaps.save()
    finally:
        await daemon.close()  # stores the bitmap as closed cleanly


async def open_canary(client: QMPClient, node_name: str, path: str, size: int, canary: Canary) -> None:
    """Write a canary image at ``path`` (a new file; the daemon must see it there) and open it read-only
    in the daemon as ``node_name``; once this returned, :func:`close_canary` removes both again."""
    try:
        await write_canary_image(path, size, canary)
        options = {
            "driver": "qcow2",
            "node-name": node_name,
            "read-only": True,
            "file": {"driver": "file", "filename": path, "read-only": True},
        }
        await execute(client, "blockdev-add", options)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise


async def close_canary(client: QMPClient, node_name: str, path: str) -> None:
    """Remove a node and image :func:`open_canary` made (a failure to remove the node is a warning)."""
    await blockdev_del_quietly(client, node_name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def bitmap_has_canaries(
    client: QMPClient, node: str, bitmap: str, size: int, canary: Canary, path: str, prefix: str
) -> bool:
    """Whether ``bitmap`` on ``node`` (``size`` bytes) has every granule of ``canary`` set; ``path``: a
    new file for the canary image; ``prefix``: names for the temporary node and bitmap."""
    await open_canary(client, f"{prefix}-canary", path, size, canary)
    try:
        return await canaries_present(client, node, bitmap, f"{prefix}-canary", f"{prefix}-probe")
    finally:
        await close_canary(client, f"{prefix}-canary", path)


def mark_actions(node: str, bitmap: str, canary_node: str) -> list[dict[str, Any]]:
    """Transaction actions that put the canaries into ``bitmap`` (added earlier in the transaction)."""
    source = {"node": canary_node, "name": CANARY_BITMAP}
    merge = {"node": node, "target": bitmap, "bitmaps": [source]}
    return [{"type": "block-dirty-bitmap-merge", "data": merge}]


async def canaries_present(client: QMPClient, node: str, bitmap: str, canary_node: str, probe: str) -> bool:
    """Whether ``bitmap`` on ``node`` has every canary of the (already added) canary node set.

    ``probe``: a free bitmap name on ``node``, for the disabled copy; removed again whatever happens.
    """
    info = await query_node(client, node)
    entry = next((b for b in info.get("dirty-bitmaps", []) if b.get("name") == bitmap), None)
    if entry is None:
        raise CliError(f"bitmap '{bitmap}' vanished while it was checked")
    add = {"node": node, "name": probe, "granularity": int(entry["granularity"]), "disabled": True}
    copy = {"node": node, "target": probe, "bitmaps": [bitmap]}
    await execute(
        client,
        "transaction",
        {
            "actions": [
                {"type": "block-dirty-bitmap-add", "data": add},
                {"type": "block-dirty-bitmap-merge", "data": copy},
            ]
        },
    )
    try:
        before = await _count(client, node, probe)
        source = {"node": canary_node, "name": CANARY_BITMAP}
        await execute(
            client, "block-dirty-bitmap-merge", {"node": node, "target": probe, "bitmaps": [source]}
        )
        return await _count(client, node, probe) == before
    finally:
        await execute(client, "block-dirty-bitmap-remove", {"node": node, "name": probe})


async def _count(client: QMPClient, node: str, bitmap: str) -> int:
    info = await query_node(client, node)
    for entry in info.get("dirty-bitmaps", []):
        if entry.get("name") == bitmap:
            return int(entry["count"])
    raise CliError(f"bitmap '{bitmap}' vanished while it was checked")
