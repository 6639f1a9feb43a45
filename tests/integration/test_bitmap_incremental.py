"""An incremental chain over NBD writes, on qemu-storage-daemon and on ``cowbackup daemon``::

    T0  transaction { block-dirty-bitmap-add d ; blockdev-backup sync=full -> tgt0 }   (held running)
        qemu-io over NBD: W1 while the full backup runs       -> tgt0 = disk at T0
        qemu-io over NBD: W2 after it
    T1  blockdev-backup sync=incremental bitmap=d -> tgt1    (held running)
        qemu-io over NBD: W3 while the incremental runs       -> d = W3 afterwards

Checks on each daemon: the full backup equals the disk at T0; the incremental wrote exactly the clusters of
W1 + W2 (data nowhere else in the sparse target, ``len`` of the job = those clusters) with the disk's
content at T1; the full backup with the incremental laid over it equals the disk at T1; and the bitmap
left behind holds exactly W3's clusters. The two daemons' observations (events, bitmaps) must be equal.
Writes include unaligned ones and write-zeroes: a cluster they touch is dirty as a whole.
"""

from __future__ import annotations

from pathlib import Path

from .conftest import mapped_data
from .nbd_peers import require
from .test_bitmap_differential import HOLD_ONE, C, action, bitmaps, export_src, qemu_io
from .test_qmp_differential import (
    SIZE,
    Backend,
    Obs,
    call,
    differential,
    events_until,
    normalise,
    source,
    status_is,
)

__all__ = ["source"]  # the fixture, shared with test_qmp_differential

#: (qemu-io command, clusters it dirties)
W1 = [(f"write -P 0x51 {3 * C} {C}", {3}), (f"write -P 0x52 {10 * C + 100} {C}", {10, 11})]
W2 = [
    (f"write -P 0x53 {11 * C} 4096", {11}),
    (f"write -z {50 * C + 7} 3", {50}),
    (f"write -P 0x54 {63 * C} {C}", {63}),
]
W3 = [(f"write -P 0x55 {3 * C} 512", {3}), (f"write -P 0x56 {30 * C} {2 * C}", {30, 31})]


def dirtied(ops: list[tuple[str, set[int]]]) -> set[int]:
    return set().union(*(clusters for _, clusters in ops))


async def chain_script(b: Backend) -> Obs:
    c = b.client
    t0 = b.workdir / "src.img"
    disk_t0 = t0.read_bytes()
    await export_src(b)
    full = {"job-id": "full", "device": "src", "target": "tgt0", "sync": "full", **HOLD_ONE}
    anchor = [action("block-dirty-bitmap-add", node="src", name="d"), action("blockdev-backup", **full)]
    obs: Obs = [await call(c, "transaction", {"actions": anchor})]
    await events_until(c, status_is("full", "running"))
    await qemu_io(b, *(cmd for cmd, _ in W1))
    await call(c, "block-job-set-speed", {"device": "full", "speed": 0})
    obs.append(normalise(await events_until(c, status_is("full", "null"))))
    assert b.target(0).read_bytes() == disk_t0, f"{b.kind}: the full backup is not the disk at T0"

    await qemu_io(b, *(cmd for cmd, _ in W2))
    obs.append(await bitmaps(c))
    disk_t1 = t0.read_bytes()  # nothing writes between here and the incremental's start
    assert disk_t1 != disk_t0
    inc = {
        "job-id": "inc",
        "device": "src",
        "target": "tgt1",
        "sync": "incremental",
        "bitmap": "d",
        **HOLD_ONE,
    }
    obs.append(await call(c, "blockdev-backup", inc))
    await events_until(c, status_is("inc", "running"))
    await qemu_io(b, *(cmd for cmd, _ in W3))
    await call(c, "block-job-set-speed", {"device": "inc", "speed": 0})
    events = normalise(await events_until(c, status_is("inc", "null")))
    obs.append(events)
    obs.append(await bitmaps(c))

    dirty = dirtied(W1) | dirtied(W2)
    (completed,) = [data for name, data in events if name == "BLOCK_JOB_COMPLETED"]
    assert completed["len"] == completed["offset"] == len(dirty) * C, (b.kind, completed)
    inc_image = b.target(1).read_bytes()
    chain = bytearray(b.target(0).read_bytes())
    for n in range(SIZE // C):
        piece = slice(n * C, (n + 1) * C)
        if n in dirty:
            assert inc_image[piece] == disk_t1[piece], f"{b.kind}: cluster {n} is not the disk at T1"
            chain[piece] = inc_image[piece]
        else:
            assert inc_image[piece] == bytes(C), f"{b.kind}: cluster {n} was copied but is clean"
    assert bytes(chain) == disk_t1, f"{b.kind}: full + incremental is not the disk at T1"
    for start, end in mapped_data(b.target(1)):
        assert {n for n in range(start // C, (end + C - 1) // C)} <= dirty, (b.kind, start, end)
    (entry,) = obs[-1]["src"]
    assert entry["name"] == "d" and entry["count"] == len(dirtied(W3)) * C, (b.kind, entry)
    return obs


def test_full_then_incremental_chain(workdir: Path, source: Path) -> None:
    require("qemu-io", "qemu-img")
    seen = differential(workdir, source, chain_script)
    for q, o in zip(seen["qemu"], seen["ours"], strict=True):
        assert o == q
