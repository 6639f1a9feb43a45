"""Dirty bitmaps, differentially: one QMP script against qemu-storage-daemon 7.2 and ``cowbackup daemon``.

The daemons, nodes and helpers are test_qmp_differential's (``src``: a 4 MiB ``file`` node of 64 clusters;
``tgt0``/``tgt1``: zero-filled ``file`` targets; ``small``: a 1 MiB ``null-co``). What a client sees --
replies, error classes and messages, events, the ``dirty-bitmaps`` of ``query-named-block-nodes``, the
bitmaps' ``x-debug-block-dirty-bitmap-sha256`` -- must be equal.

Writes come from qemu-io through an NBD export of ``src`` (writable), so they pass through the
copy-before-write filter of a running backup as a guest's would. The bitmap-mode matrix is QEMU's iotest
257 scenario on 64 clusters::

    dirty before the backup   0 1 4 8 32 63
    written while it runs     0 1 32 40 41 50 62        (3 already dirty: the union is 10 clusters)

The job is held with ``speed: 1`` and one worker copying one cluster per task: it copies cluster 0 and
then sleeps far longer than the test; ``block-job-set-speed 0`` lets it go on. A failure is injected on
the target's write of cluster 4: QEMU's ``blkdebug`` (under a ``raw`` node, whose writes fire
``write_aio``), our ``fault-inject`` filter.

While a job runs, both list the copy engine's anonymous bitmaps too (on the source; the filter's, on a
node whose generated name differs, are left out), and those are compared with the rest.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from .nbd_peers import require
from .test_qmp_differential import (
    CLUSTER,
    SIZE,
    Backend,
    Obs,
    call,
    differential,
    events_until,
    normalise,
    queued,
    refusal,
    source,
    status_is,
)

__all__ = ["source"]  # the fixture, shared with test_qmp_differential

C = CLUSTER
BEFORE = [0, 1, 4, 8, 32, 63]
DURING = [0, 1, 32, 40, 41, 50, 62]
MODES = ("never", "on-success", "always")
HOLD_ONE = {"speed": 1, "x-perf": {"max-chunk": C, "max-workers": 1}}


def bm(node: str = "src", name: Any = "a", **extra: Any) -> dict[str, Any]:
    return {"node": node, "name": name, **extra}


async def bitmaps(c: QMPClient) -> dict[str, Any]:
    """``dirty-bitmaps`` by node name (nodes without bitmaps, and implicit ones, left out)."""
    out: dict[str, Any] = {}
    nodes: list[dict[str, Any]] = await c.execute("query-named-block-nodes")  # type: ignore[assignment]
    for info in nodes:
        entries = info.get("dirty-bitmaps")
        if entries is None or info["node-name"].startswith("#"):
            continue
        out[info["node-name"]] = entries
    return out


def clusters_of(count: int) -> int:
    assert count % C == 0
    return count // C


async def qemu_io(b: Backend, *commands: str) -> None:
    """Run qemu-io over the NBD export of ``src``; every command must succeed."""
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    uri = f"nbd+unix:///src?socket={b.workdir / f'{b.kind}-nbd.sock'}"
    proc = await asyncio.create_subprocess_exec(
        *argv, uri, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and b"failed" not in out, out.decode()


async def export_src(b: Backend) -> None:
    sock = str(b.workdir / f"{b.kind}-nbd.sock")
    await b.client.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    await b.client.execute(
        "block-export-add", {"type": "nbd", "id": "e", "node-name": "src", "writable": True}
    )


def writes(clusters: list[int], pattern: int) -> list[str]:
    return [f"write -P {pattern} {n * C} {C}" for n in clusters]


# ---------------------------------------------------------------------------------------------- commands

#: Run in order on one daemon (state builds up the same way on both).
COMMANDS: list[tuple[str, dict[str, Any]]] = [
    ("block-dirty-bitmap-add", bm(name="")),
    ("block-dirty-bitmap-add", bm(node="nope")),
    ("block-dirty-bitmap-add", bm(granularity=100)),
    ("block-dirty-bitmap-add", bm(granularity=256)),
    ("block-dirty-bitmap-add", bm(granularity=2**32)),
    ("block-dirty-bitmap-add", bm(granularity="x")),
    ("block-dirty-bitmap-add", bm(name="x" * 1024)),
    ("block-dirty-bitmap-add", {"node": "src"}),
    ("block-dirty-bitmap-add", bm(bogus=1)),
    ("block-dirty-bitmap-add", bm(name=1)),
    ("block-dirty-bitmap-add", bm()),
    ("block-dirty-bitmap-add", bm()),
    ("block-dirty-bitmap-add", bm(node="small", name="p", persistent=True)),
    ("block-dirty-bitmap-add", bm(name="b", granularity=4096, disabled=True)),
    ("block-dirty-bitmap-add", bm(name="huge", granularity=2**31)),
    ("block-dirty-bitmap-add", bm(name="x" * 1023)),
    ("block-dirty-bitmap-add", bm(node="small", name="s", granularity=512)),
    ("block-dirty-bitmap-remove", bm(name="nope")),
    ("block-dirty-bitmap-remove", bm(node="nope")),
    ("block-dirty-bitmap-clear", bm(name="nope")),
    ("block-dirty-bitmap-enable", bm(name="nope")),
    ("block-dirty-bitmap-disable", bm(node="nope")),
    ("block-dirty-bitmap-clear", {"node": "src"}),
    ("x-debug-block-dirty-bitmap-sha256", bm(name="nope")),
    ("block-dirty-bitmap-merge", {"node": "src", "target": "a", "bitmaps": ["nope"]}),
    ("block-dirty-bitmap-merge", {"node": "src", "target": "nope", "bitmaps": ["b"]}),
    ("block-dirty-bitmap-merge", {"node": "src", "target": "a", "bitmaps": [bm(node="small", name="s")]}),
    ("block-dirty-bitmap-merge", {"node": "src", "target": "a", "bitmaps": [{"node": "src"}]}),
    ("block-dirty-bitmap-merge", {"node": "src", "target": "a", "bitmaps": [1]}),
    ("block-dirty-bitmap-merge", {"node": "src", "target": "a", "bitmaps": "b"}),
    ("block-dirty-bitmap-merge", {"node": "src", "target": "a", "bitmaps": [bm(name="b"), "b"]}),
    ("block-dirty-bitmap-merge", {"node": "src", "target": "b", "bitmaps": ["a", "nope"]}),
    ("block-dirty-bitmap-disable", bm()),
    ("block-dirty-bitmap-disable", bm()),
    ("block-dirty-bitmap-enable", bm(name="b")),
    ("block-dirty-bitmap-clear", bm(name="b")),
    ("block-dirty-bitmap-remove", bm(name="huge")),
    ("block-dirty-bitmap-remove", bm(name="huge")),
    # Backup arguments with bitmaps, in QEMU's order of checks.
    ("blockdev-backup", {"device": "src", "target": "tgt0", "sync": "bitmap", "bitmap": "nope"}),
    ("blockdev-backup", {"device": "src", "target": "tgt0", "sync": "bitmap", "bitmap": "a"}),
    ("blockdev-backup", {"device": "src", "target": "tgt0", "sync": "incremental"}),
    (
        "blockdev-backup",
        {"device": "src", "target": "tgt0", "sync": "incremental", "bitmap": "a", "bitmap-mode": "never"},
    ),
    (
        "blockdev-backup",
        {"device": "src", "target": "tgt0", "sync": "none", "bitmap": "a", "bitmap-mode": "always"},
    ),
    (
        "blockdev-backup",
        {"device": "src", "target": "tgt0", "sync": "full", "bitmap": "a", "bitmap-mode": "never"},
    ),
    (
        "blockdev-backup",
        {"device": "src", "target": "tgt0", "sync": "top", "bitmap": "a", "bitmap-mode": "never"},
    ),
    ("blockdev-backup", {"device": "src", "target": "tgt0", "sync": "full", "bitmap-mode": "always"}),
    (
        "blockdev-backup",
        {"device": "src", "target": "small", "sync": "bitmap", "bitmap": "a", "bitmap-mode": "always"},
    ),
    (
        "blockdev-backup",
        {"device": "tgt0", "target": "tgt1", "sync": "bitmap", "bitmap": "a", "bitmap-mode": "always"},
    ),
]

#: Refused while job "j" holds bitmap "a" (frozen, busy).
WHILE_BUSY: list[tuple[str, dict[str, Any]]] = [
    ("block-dirty-bitmap-remove", bm()),
    ("block-dirty-bitmap-clear", bm()),
    ("block-dirty-bitmap-enable", bm()),
    ("block-dirty-bitmap-disable", bm()),
    ("block-dirty-bitmap-merge", {"node": "src", "target": "a", "bitmaps": ["b"]}),
    ("block-dirty-bitmap-merge", {"node": "src", "target": "b", "bitmaps": ["a"]}),
    ("transaction", {"actions": [{"type": "block-dirty-bitmap-remove", "data": bm()}]}),
    (
        "blockdev-backup",
        {
            "job-id": "k",
            "device": "src",
            "target": "tgt1",
            "sync": "bitmap",
            "bitmap": "a",
            "bitmap-mode": "never",
        },
    ),
]


async def commands_script(b: Backend) -> Obs:
    c = b.client
    obs: Obs = [await refusal(c, cmd, args) for cmd, args in COMMANDS]
    obs.append(await bitmaps(c))
    for name in ("a", "b", "x" * 1023):
        obs.append(await call(c, "x-debug-block-dirty-bitmap-sha256", bm(name=name)))
    obs.append(await call(c, "x-debug-block-dirty-bitmap-sha256", bm(node="small", name="s")))
    backup = {"job-id": "j", "device": "src", "target": "tgt0", "sync": "full", "bitmap": "a", **HOLD_ONE}
    assert await call(c, "blockdev-backup", {**backup, "bitmap-mode": "on-success"}) == {}
    obs.append(normalise(await events_until(c, status_is("j", "running"))))
    obs.append(await bitmaps(c))
    obs += [await refusal(c, cmd, args) for cmd, args in WHILE_BUSY]
    assert await call(c, "job-cancel", {"id": "j"}) == {}
    events = normalise(await events_until(c, status_is("j", "null")))
    obs.append([(name, {k: v for k, v in data.items() if k != "offset"}) for name, data in events])
    obs.append(await bitmaps(c))
    return obs


def test_bitmap_commands_match(workdir: Path, source: Path) -> None:
    seen = differential(workdir, source, commands_script)
    for q, o in zip(seen["qemu"], seen["ours"], strict=True):
        assert o == q


# ---------------------------------------------------------------------------------------------- transactions


def action(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}


async def transaction_script(b: Backend) -> Obs:
    c = b.client
    await export_src(b)
    for name in ("a", "b"):
        await c.execute("block-dirty-bitmap-add", bm(name=name))
    await qemu_io(b, *writes([1, 2], 0x11))
    obs: Obs = [await bitmaps(c)]
    # Every bitmap action, then abort: all undone.
    everything = [
        action("block-dirty-bitmap-add", node="src", name="c", granularity=512),
        action("block-dirty-bitmap-clear", node="src", name="a"),
        action("block-dirty-bitmap-disable", node="src", name="b"),
        action("block-dirty-bitmap-merge", node="src", target="c", bitmaps=["b"]),
        action("block-dirty-bitmap-remove", node="src", name="b"),
        action("abort"),
    ]
    obs.append(await refusal(c, "transaction", {"actions": everything}))
    obs.append(await bitmaps(c))
    obs.append(await refusal(c, "transaction", {"actions": everything[:5] + everything[:1]}))
    obs.append(await bitmaps(c))
    # The full-backup anchor: a new bitmap and a full backup at one instant; writes after it land in d.
    anchor = [
        action("block-dirty-bitmap-add", node="src", name="d"),
        action("block-dirty-bitmap-disable", node="src", name="a"),
        action(
            "blockdev-backup",
            **{"job-id": "j", "device": "src", "target": "tgt0", "sync": "full", **HOLD_ONE},
        ),
    ]
    obs.append(await refusal(c, "transaction", {"actions": anchor}))
    await qemu_io(b, *writes([5], 0x22))
    await call(c, "block-job-set-speed", {"device": "j", "speed": 0})
    obs.append(normalise(await events_until(c, status_is("j", "null"))))
    obs.append(await bitmaps(c))
    obs.append(
        await refusal(
            c, "transaction", {"actions": [action("block-dirty-bitmap-remove", node="src", name="b")]}
        )
    )
    obs.append(await bitmaps(c))
    # A backup with a bitmap, rolled back before it ran: the bitmap is reclaimed -- or, with "always",
    # abdicated with everything marked dirty, as QEMU's never-initialised copy bitmap is all set.
    for mode in MODES:
        job = {"job-id": "r", "device": "src", "target": "tgt0", "sync": "bitmap", "bitmap": "a"}
        rollback = [action("blockdev-backup", **job, **{"bitmap-mode": mode}), action("abort")]
        obs.append(await refusal(c, "transaction", {"actions": rollback}))
        obs.append(await bitmaps(c))
    return obs


def test_transactions_with_bitmap_actions_match(workdir: Path, source: Path) -> None:
    require("qemu-io")
    seen = differential(workdir, source, transaction_script)
    for q, o in zip(seen["qemu"], seen["ours"], strict=True):
        assert o == q
    before_rollbacks = seen["ours"][-7]["src"]
    assert [(e["name"], clusters_of(e["count"])) for e in before_rollbacks] == [("d", 1), ("a", 2)]
    assert [(e["name"], clusters_of(e["count"])) for e in seen["ours"][-3]["src"]] == [("d", 1), ("a", 2)]
    assert [(e["name"], clusters_of(e["count"])) for e in seen["ours"][-1]["src"]] == [("a", 64), ("d", 1)]


def test_discards_mark_only_where_they_change_data(workdir: Path, source: Path) -> None:
    """``src`` is opened with QEMU's default ``discard=ignore``: its discards change nothing and mark
    nothing; write-zeroes (with or without unmap) mark their clusters."""
    require("qemu-io")

    async def script(b: Backend) -> Obs:
        await export_src(b)
        await b.client.execute("block-dirty-bitmap-add", bm())
        await qemu_io(b, f"discard 0 {2 * C}", f"write -z {4 * C} {C}", f"write -z -u {6 * C} 100")
        return [await bitmaps(b.client)]

    seen = differential(workdir, source, script)
    assert seen["ours"] == seen["qemu"]
    assert seen["ours"][0]["src"][0]["count"] == 2 * C


def test_persistent_bitmaps_on_raw_images_go_beyond_qemu(workdir: Path, source: Path) -> None:
    async def script(b: Backend) -> Obs:
        reply = await call(b.client, "block-dirty-bitmap-add", bm(persistent=True))
        return [reply, await bitmaps(b.client)]

    seen = differential(workdir, source, script)
    # QEMU stores bitmaps only in qcow2 images; we keep those of raw images in a sidecar file
    # (block/bitmap_sidecar.py).
    message = "Can't store persistent bitmaps to src: Operation not supported"
    assert seen["qemu"] == [("error", "GenericError", message), {}]
    assert seen["ours"][0] == {} and seen["ours"][1]["src"][0]["persistent"] is True
    assert (workdir / "src.img.cowbackup-bitmaps").exists()


async def first_chunk_copied(c: QMPClient) -> None:
    """Wait until held job "j" has copied its first cluster (then it sleeps: the counts stand still)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        jobs = await c.execute("query-jobs")
        assert isinstance(jobs, list)
        if any(j["id"] == "j" and j["current-progress"] >= C for j in jobs):
            return
        assert loop.time() < deadline, jobs
        await asyncio.sleep(0.01)  # polling the job's progress, with a deadline


def test_copy_engine_bitmaps_are_listed_as_in_qemu(workdir: Path, source: Path) -> None:
    """During a backup: the copy bitmap on the source (first, before a sync bitmap's successor), the
    filter's access and done bitmaps; all gone with the job."""

    async def script(b: Backend) -> Obs:
        c = b.client
        await export_src(b)
        obs: Obs = [await call(c, "block-dirty-bitmap-add", bm())]
        await qemu_io(b, *writes([1, 2, 40], 7))
        for extra in ({"sync": "full"}, {"sync": "bitmap", "bitmap": "a", "bitmap-mode": "never"}):
            args = {"job-id": "j", "device": "src", "target": "tgt0", "filter-node-name": "flt"}
            obs.append(await call(c, "blockdev-backup", {**args, **extra, **HOLD_ONE}))
            await events_until(c, status_is("j", "running"))
            await first_chunk_copied(c)
            await qemu_io(b, *writes([40, 41], 8))  # copy-before-write: done and the copy bitmap move
            obs.append(await bitmaps(c))
            assert await call(c, "job-cancel", {"id": "j"}) == {}
            await events_until(c, status_is("j", "null"))
            obs.append(await bitmaps(c))
        return obs

    seen = differential(workdir, source, script)
    assert seen["ours"] == seen["qemu"]
    # [bitmap-add, backup, bitmaps during, bitmaps after] for sync=full, then backup, during, after
    during, after = seen["ours"][2], seen["ours"][3]
    assert [e.get("name") for e in during["src"]] == [None, "a"]
    assert [e["count"] for e in during["flt"]] == [SIZE, 2 * C]  # access (all), done (clusters 40, 41)
    assert "flt" not in after and [e.get("name") for e in after["src"]] == ["a"]
    during = seen["ours"][5]  # sync=bitmap: the copy bitmap, then the successor of "a", then "a"
    assert [(e.get("name"), e["recording"], e["busy"]) for e in during["src"]] == [
        (None, False, False),
        (None, True, False),
        ("a", True, True),
    ]


def test_grouped_transactions_refuse_bitmap_actions(workdir: Path, source: Path) -> None:
    async def script(b: Backend) -> Obs:
        args = {
            "actions": [action("block-dirty-bitmap-add", node="src", name="c")],
            "properties": {"completion-mode": "grouped"},
        }
        return [await call(b.client, "transaction", args), await bitmaps(b.client)]

    seen = differential(workdir, source, script)
    # QEMU >= 8.1 checks grouped mode up front and says "transaction property"; 7.2 checked it in each
    # action's prepare and wrote "Transaction property". We follow current QEMU (transaction.py).
    message = "Action 'block-dirty-bitmap-add' does not support {} property completion-mode = grouped"
    assert seen["qemu"] == [("error", "GenericError", message.format("Transaction")), {}]
    assert seen["ours"] == [("error", "GenericError", message.format("transaction")), {}]


# ---------------------------------------------------------------------------------------------- the matrix

OUTCOMES = ("success", "failure", "cancel", "cancel-pending")
#: Dirty clusters afterwards (QEMU's backup_cleanup_sync_bitmap): 10 = before + during, 7 = during;
#: a failed or cancelled "always" keeps what was not copied: 4, 8 (given back) and 63.
EXPECTED = {
    ("never", "success"): 10,
    ("on-success", "success"): 7,
    ("always", "success"): 7,
    ("always", "cancel-pending"): 7,
}


def failing_target(kind: str) -> dict[str, Any]:
    """``tgtf`` over ``tgt1``: the write of cluster 4 fails once with EIO."""
    if kind == "qemu":
        rule = {"event": "write_aio", "errno": 5, "sector": 4 * C // 512, "once": True}
        return {
            "driver": "raw",
            "node-name": "tgtf",
            "file": {"driver": "blkdebug", "image": "tgt1", "inject-error": [rule]},
        }
    rule = {"op": "write", "offset": 4 * C, "length": C, "errno": "EIO"}
    return {"driver": "fault-inject", "node-name": "tgtf", "file": "tgt1", "rules": [rule]}


async def matrix_script(b: Backend, mode: str, outcome: str, sync: str = "bitmap") -> Obs:
    c = b.client
    await export_src(b)
    await c.execute("blockdev-add", failing_target(b.kind))
    await c.execute("block-dirty-bitmap-add", bm(name="b0", granularity=C))
    await qemu_io(b, *writes(BEFORE, 0x33))
    args = {
        "job-id": "j",
        "device": "src",
        "target": "tgtf" if outcome == "failure" else "tgt0",
        "sync": sync,
        "bitmap": "b0",
        "bitmap-mode": mode,
        "auto-finalize": outcome != "cancel-pending",
        **HOLD_ONE,
    }
    obs: Obs = [await call(c, "blockdev-backup", args)]
    obs.append(normalise(await events_until(c, status_is("j", "running"))))
    await qemu_io(b, *writes(DURING, 0x44))
    obs.append(await bitmaps(c))
    if outcome == "cancel":
        await call(c, "job-cancel", {"id": "j"})
    else:
        await call(c, "block-job-set-speed", {"device": "j", "speed": 0})
    if outcome == "cancel-pending":
        obs.append(normalise(await events_until(c, status_is("j", "pending"))))
        await call(c, "job-cancel", {"id": "j"})
    obs.append(normalise(await events_until(c, status_is("j", "null"))))
    obs.append(normalise(queued(c)))
    obs.append(await bitmaps(c))
    obs.append(await call(c, "x-debug-block-dirty-bitmap-sha256", bm(name="b0")))
    return obs


@pytest.mark.parametrize("outcome", OUTCOMES)
@pytest.mark.parametrize("mode", MODES)
def test_bitmap_mode_matrix_matches(workdir: Path, source: Path, mode: str, outcome: str) -> None:
    require("qemu-io")

    async def script(b: Backend) -> Obs:
        return await matrix_script(b, mode, outcome)

    seen = differential(workdir, source, script)
    for q, o in zip(seen["qemu"], seen["ours"], strict=True):
        assert o == q
    (entry,) = seen["ours"][-2]["src"]
    assert entry["name"] == "b0" and not entry["busy"] and entry["recording"]
    assert clusters_of(entry["count"]) == EXPECTED.get((mode, outcome), 10)
    # A failure is reported as one, the rest are not.
    completed = [data for name, data in seen["ours"][-4] if name == "BLOCK_JOB_COMPLETED"]
    assert bool(completed and "error" in completed[0]) == (outcome == "failure")


@pytest.mark.parametrize("outcome", ["success", "failure", "cancel"])
@pytest.mark.parametrize("mode", ["on-success", "always"])
def test_full_backup_with_a_bitmap_matches(workdir: Path, source: Path, mode: str, outcome: str) -> None:
    """sync=full with a bitmap: the bitmap only receives the outcome (with "always" after a failure:
    everything the job did not copy, which is most of the disk)."""
    require("qemu-io")

    async def script(b: Backend) -> Obs:
        return await matrix_script(b, mode, outcome, sync="full")

    seen = differential(workdir, source, script)
    for q, o in zip(seen["qemu"], seen["ours"], strict=True):
        assert o == q
    (entry,) = seen["ours"][-2]["src"]
    dirty = clusters_of(entry["count"])
    if outcome == "success":
        assert dirty == len(DURING)
    elif mode == "on-success":
        assert dirty == len(set(BEFORE) | set(DURING))
    else:
        assert dirty > len(set(BEFORE) | set(DURING))
