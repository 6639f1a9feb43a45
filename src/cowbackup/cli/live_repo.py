"""``cowbackup backup --qmp SOCKET NODE --repo REPO --name NAME``: a live backup into a repository.

The daemon's own backup job (copy-before-write and all) writes into a ``cowbackup-repo`` target node, which
stores chunks as they come and commits the snapshot when the job succeeds -- never when it fails or is
cancelled.

Change tracking that cannot lie.  With ``--bitmap STEM`` every snapshot is bound to a dirty bitmap made for
it alone, ``STEM-<first 16 digits of the snapshot id>``, persistent, created in the same transaction that
starts the backup: it provably records every write from the snapshot's instant on.  The manifest records
the bitmap, the node and the image.  ``--incremental`` trusts that bitmap only if

* the parent (the newest snapshot of NAME) exists and is not recorded damaged, and its index is present;
* it names this node and image, and a bitmap of that exact name;
* the daemon still has the bitmap, enabled (recording), not in use by another job, and not inconsistent
  (a persistent bitmap that was in use when its daemon died is inconsistent);
* it still carries its generation marker: the canary bits the snapshot's transaction set in it
  (:mod:`cowbackup.cli.canary`; a bitmap deleted and created again under the same name has none);

then the job copies only the clusters the bitmap marks (``sync=bitmap``, ``bitmap-mode=never``, so the
bitmap stays intact if anything fails), and every chunk the job does not write is the parent's.  Anything
else is a clear reason: with ``--fallback-full`` the backup reads the whole disk (dedup still stores only
what changed) and arms a new bitmap at its instant; without it the command fails.  On success the parent's
bitmap is removed (after a full backup too: the next incremental starts from the new snapshot); on
failure the new one is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import sys
import time
from typing import Any

from qemu.qmp import EventListener, QMPClient

from cowbackup.cli.canary import (
    Canary,
    bitmap_has_canaries,
    choose_canary,
    close_canary,
    mark_actions,
    open_canary,
)
from cowbackup.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, CliError, UsageError
from cowbackup.cli.live import (
    JOB_EVENTS,
    blockdev_del_quietly,
    connect,
    execute,
    follow_jobs,
    query_node,
    signals_to,
)
from cowbackup.cli.progress import JsonReporter, Reporter, make_reporter
from cowbackup.cli.pull_repo import DiskPlan, SnapshotPlan, pull_backup, scratch_dir
from cowbackup.cli.repo_common import daemon_key_file, human, open_repository
from cowbackup.repo.errors import RepoError
from cowbackup.repo.manifest import DiskRecord, Manifest, check_disk_name, check_snapshot_name
from cowbackup.repo.repository import Repository, index_name


def run(args: argparse.Namespace) -> int:
    if args.target is not None:
        raise UsageError("with --repo there is no TARGET: the snapshot goes into the repository")
    if not args.name:
        raise UsageError("--repo needs --name NAME (for example host1/vm7)")
    try:
        check_snapshot_name(args.name)
        check_disk_name(args.disk)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.sync != "full":
        raise UsageError("into a repository, a backup is full or --incremental; --sync is not for it")
    if args.incremental and not args.bitmap:
        raise UsageError("--incremental needs --bitmap STEM (the bitmaps are STEM-<snapshot id>)")
    # The daemon opens the repository from its own working directory.
    if "://" not in args.repo:  # s3://... is no path
        args.repo = os.path.abspath(args.repo)
    repo = open_repository(args)
    return asyncio.run(_run(args, repo))


def tracking_bitmap(stem: str, snapshot_id: str) -> str:
    return f"{stem}-{snapshot_id[:16]}"


def _image(node: dict[str, Any]) -> str:
    return str(node.get("file") or node.get("image", {}).get("filename", ""))


def trust_problem(
    repo: Repository, parent: Manifest | None, disk: str, node: dict[str, Any], stem: str
) -> tuple[str | None, DiskRecord | None, str | None]:
    """``(reason, parent disk, bitmap)``: reason None when the parent's bitmap may drive an incremental."""
    if parent is None:
        return "no earlier snapshot of this name", None, None
    if parent.id in repo.damage():
        return f"the parent snapshot {parent.id[:8]} is recorded damaged", None, None
    try:
        record = parent.disk(disk)
    except KeyError as err:
        return str(err.args[0]), None, None
    for seg in record.segments:
        if repo.store.stat(index_name(seg.index_id)) is None:
            return f"the parent snapshot {parent.id[:8]} lost an index segment", None, None
    tracking = record.changes.get("tracking")
    if not isinstance(tracking, dict):
        return f"the parent snapshot {parent.id[:8]} was not bound to a dirty bitmap", None, None
    name = tracking.get("bitmap")
    if tracking.get("node") != node.get("node-name") or tracking.get("image") != _image(node):
        return (
            f"the parent snapshot {parent.id[:8]} tracked node '{tracking.get('node')}' "
            f"({tracking.get('image')}), not this one",
            None,
            None,
        )
    if name != tracking_bitmap(stem, parent.id):
        return f"the parent snapshot's bitmap '{name}' is not of stem '{stem}'", None, None
    entry = next((b for b in node.get("dirty-bitmaps", []) if b.get("name") == name), None)
    if entry is None:
        return f"bitmap '{name}' is gone (deleted, or the daemon was restarted without it)", None, None
    if entry.get("inconsistent"):
        return f"bitmap '{name}' is inconsistent (its daemon stopped while it was in use)", None, None
    if not entry.get("recording", True):
        return f"bitmap '{name}' was disabled: writes may have gone unrecorded", None, None
    if entry.get("busy"):
        return f"bitmap '{name}' is in use by another job", None, None
    size = node.get("image", {}).get("virtual-size")
    if record.size != size:
        return f"the disk was resized since the parent snapshot ({record.size} -> {size} bytes)", None, None
    return None, record, name


async def _run(args: argparse.Namespace, repo: Repository) -> int:
    await live_backup(args, repo)
    return EXIT_OK


async def live_backup(args: argparse.Namespace, repo: Repository) -> Manifest:
    """The live backup ``args`` describe (``backup --qmp ... --repo``'s options), on the running loop;
    the committed snapshot.  CliError when it fails (nothing committed then)."""
    loop = asyncio.get_running_loop()
    everything = await loop.run_in_executor(None, repo.snapshots)
    parents = [s for s in everything if s.name == args.name]
    plan = SnapshotPlan(
        secrets.token_hex(16), args.name, list(args.tag), parents[-1] if parents else None, []
    )
    plan.audit = args.audit
    reporter = make_reporter(args.json)
    async with connect(args.qmp) as client:
        for node, disk in _nodes_and_disks(args):
            known = {s.id for s in everything}
            plan.disks.append(await _plan_disk(client, args, repo, plan, node, disk, known))
        pushed = False
        if not plan.audit:  # an audit reads the frozen view itself: that is pull mode
            with daemon_key_file(repo) as key_file:
                pushed = await _add_targets(client, args, plan, key_file)
        if not pushed:
            # Not our daemon (qemu-storage-daemon, QEMU), or an audit: fleece and read the view.
            snap, elapsed = await pull_backup(client, args, repo, plan, reporter)
        else:
            snap, elapsed = await _push(client, args, repo, plan, reporter)
    _report(reporter, snap, plan.size, elapsed)
    return snap


def _nodes_and_disks(args: argparse.Namespace) -> list[tuple[str, str]]:
    """NODE and every --node, with their disk names: --disk for a single node, else each node's name."""
    nodes = [args.source, *args.node]
    if len(set(nodes)) != len(nodes):
        raise UsageError("a node is named twice")
    if len(nodes) == 1:
        return [(args.source, args.disk)]
    for node in nodes:
        try:
            check_disk_name(node)
        except ValueError:
            raise UsageError(f"node '{node}' cannot name a disk of the snapshot") from None
    return [(node, node) for node in nodes]


async def _plan_disk(
    client: QMPClient,
    args: argparse.Namespace,
    repo: Repository,
    plan: SnapshotPlan,
    node: str,
    disk: str,
    known: set[str],
) -> DiskPlan:
    """How one disk is backed up: full, or incremental if its parent's bitmap can be trusted.  ``known``:
    the ids of every snapshot in the repository (a bitmap of none of them is an orphan)."""
    info = await query_node(client, node)
    d = DiskPlan(node, disk, int(info["image"]["virtual-size"]), _image(info), {"method": "full"})
    d.persistent = info.get("drv") == "qcow2" or await _is_ours(client)
    if args.incremental:
        reason, d.parent_disk, d.old_bitmap = await asyncio.get_running_loop().run_in_executor(
            None, trust_problem, repo, plan.parent, disk, info, args.bitmap
        )
        if reason is None:
            reason = await _generation_problem(client, args, plan, d)
        if reason is not None:
            d.parent_disk = d.old_bitmap = None
            if not args.fallback_full:
                raise CliError(
                    f"cannot back up '{node}' incrementally: {reason} (--fallback-full reads it all)"
                )
            sys.stderr.write(f"cowbackup: full backup of '{node}' instead of incremental: {reason}\n")
            d.changes["fallback"] = reason
            await _drop_unusable(client, args, info, plan.parent, known)
        else:
            d.changes = {"method": "bitmap", "bitmap": d.old_bitmap}
    elif args.bitmap and plan.parent is not None:
        previous = tracking_bitmap(args.bitmap, plan.parent.id)
        if any(b.get("name") == previous for b in info.get("dirty-bitmaps", [])):
            d.retired = previous
    if args.bitmap:
        d.new_bitmap = tracking_bitmap(args.bitmap, plan.snapshot_id)
        d.changes["tracking"] = {"bitmap": d.new_bitmap, "node": node, "image": d.image}
        d.canary = choose_canary(d.size, repo.config.chunk_size)
        if d.canary is not None:
            d.changes["tracking"]["canary"] = d.canary.as_dict()
    return d


async def _generation_problem(
    client: QMPClient, args: argparse.Namespace, plan: SnapshotPlan, d: DiskPlan
) -> str | None:
    """Why the bitmap that passed :func:`trust_problem` is still not the parent's own, or None: it must
    carry the canary granules the parent recorded (a bitmap created again under its name has none)."""
    assert d.parent_disk is not None and d.old_bitmap is not None and plan.parent is not None
    tracking = d.parent_disk.changes["tracking"]
    canary = Canary.from_record(tracking.get("canary"))
    if canary is None or not canary.fits(d.size):
        return f"the parent snapshot's bitmap '{d.old_bitmap}' has no generation marker to check"
    prefix = f"cb-{plan.snapshot_id[:8]}-check{len(plan.disks)}"
    path = os.path.join(scratch_dir(args), f"{prefix}.canary.qcow2")
    if await bitmap_has_canaries(client, d.node, d.old_bitmap, d.size, canary, path, prefix):
        return None
    return (
        f"bitmap '{d.old_bitmap}' lacks the generation marker of the parent snapshot {plan.parent.id[:8]}: "
        "it was deleted and created again since (writes in between are not in it)"
    )


async def _is_ours(client: QMPClient) -> bool:
    version: dict[str, Any] = await execute(client, "query-version")
    return str(version.get("package", "")).startswith("cowbackup")


def _target_name(plan: SnapshotPlan, i: int) -> str:
    return f"repo-{plan.snapshot_id[:8]}-{i}"


async def _add_targets(
    client: QMPClient, args: argparse.Namespace, plan: SnapshotPlan, key_file: str | None
) -> bool:
    """A ``cowbackup-repo`` target node per disk, one group; False if the daemon has no such driver.
    ``key_file``: the repository's unwrapped key (the daemon need not run scrypt again)."""
    for i, d in enumerate(plan.disks):
        options: dict[str, Any] = {
            "driver": "cowbackup-repo",
            "node-name": _target_name(plan, i),
            "repo": args.repo,
            "name": plan.name,
            "size": d.size,
            "disk": d.disk,
            "snapshot-id": plan.snapshot_id,
            "group": plan.snapshot_id,
            "group-disks": len(plan.disks),
            "changes": json.dumps(d.changes),
            "sync-level": args.sync_level,
        }
        if d.parent_disk is not None and plan.parent is not None:
            options["parent"] = plan.parent.id
        if plan.tags:
            options["tag"] = plan.tags[0]
        if key_file is not None:
            options["key-file"] = key_file
        try:
            await execute(client, "blockdev-add", options)
        except CliError as err:
            if i == 0 and "'cowbackup-repo'" in err.message:
                return False
            for j in range(i):
                await blockdev_del_quietly(client, _target_name(plan, j))
            raise
    return True


async def _push(
    client: QMPClient, args: argparse.Namespace, repo: Repository, plan: SnapshotPlan, reporter: Reporter
) -> tuple[Manifest, float]:
    """Start one backup job per disk in one transaction (the snapshot's instant), follow them, and clean
    up: the target nodes, and the tracking bitmaps that lost."""
    jobs = [f"backup-{d.node}" for d in plan.disks]
    if args.job_id and len(jobs) == 1:
        jobs = [args.job_id]
    interrupted: list[int] = []
    committed = False
    started = False
    canaries: list[tuple[str, str]] = []
    listener = EventListener(JOB_EVENTS)
    try:
        with client.listen(listener):
            actions: list[dict[str, Any]] = []
            for i, (d, job) in enumerate(zip(plan.disks, jobs, strict=True)):
                if d.new_bitmap is not None:
                    add = {"node": d.node, "name": d.new_bitmap, "persistent": d.persistent}
                    actions.append({"type": "block-dirty-bitmap-add", "data": add})
                    if d.canary is not None:
                        canary = (
                            f"{_target_name(plan, i)}-canary",
                            os.path.join(scratch_dir(args), f"{_target_name(plan, i)}.canary.qcow2"),
                        )
                        await open_canary(client, *canary, d.size, d.canary)
                        canaries.append(canary)
                        actions += mark_actions(d.node, d.new_bitmap, canary[0])
                backup: dict[str, Any] = {
                    "job-id": job,
                    "device": d.node,
                    "target": _target_name(plan, i),
                    "sync": "bitmap" if d.old_bitmap else "full",
                    "speed": args.speed,
                    "auto-finalize": True,
                    "auto-dismiss": True,
                }
                if d.old_bitmap:
                    backup.update(bitmap=d.old_bitmap, **{"bitmap-mode": "never"})
                actions.append({"type": "blockdev-backup", "data": backup})
            with signals_to(interrupted):
                begun = time.monotonic()
                await execute(client, "transaction", {"actions": actions})
                started = True
                outcomes = await follow_jobs(client, listener, jobs, plan.size, reporter, interrupted)
                elapsed = time.monotonic() - begun
        failed = [
            f"{job}: {outcomes.get(job, {}).get('error') or 'cancelled'}"
            for job in jobs
            if outcomes.get(job, {}).get("event") != "BLOCK_JOB_COMPLETED" or "error" in outcomes.get(job, {})
        ]
        # The targets commit when their jobs succeed: a signal that came too late to cancel them
        # changes nothing.
        committed = not failed
    finally:
        for i in range(len(plan.disks)):
            await blockdev_del_quietly(client, _target_name(plan, i))
        for canary in canaries:
            await close_canary(client, *canary)
        if started:
            for d in plan.disks:
                stale = d.old_bitmap if committed else d.new_bitmap
                if stale is not None:
                    await _remove_bitmap(client, d.node, stale)
                if committed and d.retired is not None:
                    await _remove_bitmap(client, d.node, d.retired)
    if interrupted and not committed:
        name = signal.Signals(interrupted[0]).name
        raise CliError(f"interrupted by {name}: backup cancelled, no snapshot committed", EXIT_INTERRUPTED)
    if not committed:
        raise CliError(f"backup failed: {'; '.join(failed)}; no snapshot committed", EXIT_FAILED)
    try:
        snap = await asyncio.get_running_loop().run_in_executor(None, repo.load_manifest, plan.snapshot_id)
    except RepoError as err:
        raise CliError(
            f"the jobs completed but snapshot {plan.snapshot_id[:8]} is not readable: {err}"
        ) from None
    return snap, elapsed


async def _drop_unusable(
    client: QMPClient,
    args: argparse.Namespace,
    node: dict[str, Any],
    parent: Manifest | None,
    known: set[str],
) -> None:
    """Remove the bitmaps of our stem that no backup can use: the parent's, which cannot be trusted, and
    the orphans of snapshots that no longer exist (a forgotten newest snapshot leaves its bitmap behind,
    and the next backup falls back to an older parent).  Each would only grow, forever."""
    ours = re.compile(re.escape(args.bitmap) + "-([0-9a-f]{16})")
    for bitmap in node.get("dirty-bitmaps", []):
        found = ours.fullmatch(str(bitmap.get("name", "")))
        if found is None or bitmap.get("busy"):  # busy: another job's; it removes it itself
            continue
        stem_id = found[1]
        if (parent is not None and parent.id.startswith(stem_id)) or not any(
            s.startswith(stem_id) for s in known
        ):
            await _remove_bitmap(client, str(node["node-name"]), str(bitmap["name"]))


async def _remove_bitmap(client: QMPClient, node: str, name: str) -> None:
    try:
        await execute(client, "block-dirty-bitmap-remove", {"node": node, "name": name})
    except CliError as err:
        sys.stderr.write(f"cowbackup: warning: could not remove bitmap '{name}': {err.message}\n")


def _report(reporter: Reporter, snap: Manifest, size: int, elapsed: float) -> None:
    disk = snap.disks[0]
    result = {
        "snapshot": snap.id,
        "name": snap.name,
        "bytes": size,
        "seconds": elapsed,
        "rate": size / elapsed if elapsed > 0 else 0.0,
        "changes": disk.changes,
        "disks": {d.name: d.changes for d in snap.disks},
        "stats": snap.stats,
    }
    if isinstance(reporter, JsonReporter):
        reporter.result(result)
        return
    s = snap.stats
    how = "incremental" if disk.changes.get("method") == "bitmap" else "full"
    sys.stderr.write(
        f"cowbackup: snapshot {snap.id[:8]} of {snap.name} ({how}): {human(size)} in {elapsed:.2f} s; "
        f"{human(s.get('data_bytes', 0))} copied, {human(s.get('reused_bytes', 0))} from the parent, "
        f"{s.get('new_chunks', 0)} new chunk(s) ({human(s.get('new_stored_bytes', 0))} stored)\n"
    )
