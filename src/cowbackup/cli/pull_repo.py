"""A live backup into a repository from a daemon that cannot hold our target node: pull mode.

``backup --qmp SOCKET NODE --repo REPO`` against a ``qemu-storage-daemon`` (or QEMU) sets up fleecing the
way libvirt does on QEMU 7.2, reads the point-in-time view over NBD, and tears everything down whatever
happens::

    blockdev-add       cb-ID-scratch: a qcow2 scratch image (a new file) whose backing node is NODE
                       [cb-ID-canary: the new bitmap's generation marker, a read-only qcow2 (cli/canary.py)]
    transaction        block-dirty-bitmap-add STEM-ID (persistent: tracks writes from this instant)
                       + merge the canary bits into it
                       [incremental: block-dirty-bitmap-add cb-ID-frozen (disabled) + merge the parent's
                        bitmap into it: the changes since the parent, frozen at this instant]
                       blockdev-backup sync=none NODE -> scratch: old data is saved before a write
    nbd-server-start   on a private unix socket (unless one runs: then --nbd-socket says where)
    block-export-add   cb-ID: the scratch node read-only [with bitmaps: cb-ID-frozen]
    (read)             chunks over NBD: holes by block status, and in an incremental only the chunks
                       qemu:dirty-bitmap:cb-ID-frozen marks; the parent's entries for the rest
    teardown           block-export-del, job-cancel, blockdev-del, the frozen bitmap, the new or the
                       parent's tracking bitmap (by outcome), nbd-server-stop, the scratch file
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qemu.qmp import QMPClient

from cowbackup.block.ratelimit import RateLimit
from cowbackup.cli.canary import Canary, mark_actions, open_canary
from cowbackup.cli.errors import CliError
from cowbackup.cli.fleece import Fleeced, FleeceSpec, Setup, fleece_with_backup_job, start_nbd_server
from cowbackup.cli.live import execute
from cowbackup.cli.progress import Reporter
from cowbackup.repo.errors import MissingObject, RepoError
from cowbackup.repo.manifest import DiskRecord, Manifest
from cowbackup.repo.repository import Repository

if TYPE_CHECKING:
    from cowbackup.block.node import BlockNode
    from cowbackup.repo.writer import DirtyTest


@dataclass
class DiskPlan:
    """One disk of a live backup: its node, how its changes are found, and its tracking bitmaps."""

    node: str
    disk: str
    size: int
    image: str
    changes: dict[str, Any]
    parent_disk: DiskRecord | None = None
    old_bitmap: str | None = None
    new_bitmap: str | None = None
    #: A full backup's parent's tracking bitmap: once this snapshot commits, the next incremental's parent
    #: is this one, so that bitmap serves nobody -- it is removed then (else it would grow forever).
    retired: str | None = None
    #: The new bitmap's generation marker (see :mod:`cowbackup.cli.canary`), recorded in ``changes``.
    canary: Canary | None = None
    #: QEMU stores persistent bitmaps in qcow2 images only; elsewhere the bitmap lives as long as the
    #: daemon (a restart then means a full backup, with the reason said).
    persistent: bool = True


@dataclass
class SnapshotPlan:
    """The snapshot a live backup makes: its id (chosen first, it names the bitmaps), name and disks."""

    snapshot_id: str
    name: str
    tags: list[str]
    parent: Manifest | None
    disks: list[DiskPlan]
    #: ``--audit``: the percentage of the chunks a bitmap calls clean that are re-read and compared.
    audit: float = 0.0

    @property
    def size(self) -> int:
        return sum(d.size for d in self.disks)


def scratch_dir(args: argparse.Namespace) -> str:
    """Where the scratch and canary images go: the daemon opens them there (``--scratch-dir``)."""
    return str(args.scratch_dir or tempfile.gettempdir())


async def pull_backup(
    client: QMPClient,
    args: argparse.Namespace,
    repo: Repository,
    plan: SnapshotPlan,
    reporter: Reporter,
) -> tuple[Manifest, float]:
    """Fleece every disk at one instant, read them, commit, tear down; ``(snapshot, seconds)``.
    CliError if anything fails (then nothing is committed, and everything set up is removed)."""
    prefix = f"cb-{plan.snapshot_id[:8]}"
    scratch = scratch_dir(args)
    socket_dir = tempfile.mkdtemp(prefix="cb-nbd-")
    setup = Setup()
    committed: Manifest | None = None
    tracking_added = False
    try:
        started = time.monotonic()
        tracking: list[dict[str, Any]] = []
        for i, d in enumerate(plan.disks):
            if d.new_bitmap is None:
                continue
            add = {"node": d.node, "name": d.new_bitmap, "persistent": d.persistent}
            tracking.append({"type": "block-dirty-bitmap-add", "data": add})
            if d.canary is not None:
                canary_node, path = (
                    f"{prefix}-{i}-canary",
                    os.path.join(scratch, f"{prefix}-{i}.canary.qcow2"),
                )
                await open_canary(client, canary_node, path, d.size, d.canary)
                setup.files.append(path)
                setup.nodes.append(canary_node)
                tracking += mark_actions(d.node, d.new_bitmap, canary_node)
        specs = [
            FleeceSpec(
                d.node,
                d.size,
                os.path.join(scratch, f"{prefix}-{i}.scratch.qcow2"),
                f"{prefix}-{i}",
                d.old_bitmap,
            )
            for i, d in enumerate(plan.disks)
        ]
        views = await fleece_with_backup_job(client, setup, specs, tracking)
        tracking_added = True
        socket = args.nbd_socket or os.path.join(socket_dir, "nbd.sock")
        await start_nbd_server(
            client, setup, {"type": "unix", "path": socket}, existing_ok=args.nbd_socket is not None
        )
        for spec, view in zip(specs, views, strict=True):
            export: dict[str, Any] = {"type": "nbd", "id": spec.prefix, "node-name": view.scratch_node}
            export.update(name=spec.prefix, writable=False)
            if view.frozen is not None:
                export["bitmaps"] = [view.frozen]
            await execute(client, "block-export-add", export)
            setup.exports.append(spec.prefix)
        try:
            committed = await _read_into_repository(
                repo, plan, str(socket), specs, views, reporter, RateLimit(args.speed or 0)
            )
        except RepoError as err:
            # Say what push mode says: the repository failed, and nothing was committed.
            raise CliError(f"backup failed: {err}; no snapshot committed", err.exit_code) from err
        return committed, time.monotonic() - started
    finally:
        # The tracking bitmaps that lost: the new ones if nothing was committed, else the parent's.
        for d in plan.disks:
            stale = d.old_bitmap if committed is not None else d.new_bitmap if tracking_added else None
            if stale is not None:
                setup.bitmaps.append((d.node, stale))
            if committed is not None and d.retired is not None:
                setup.bitmaps.append((d.node, d.retired))
        errors = await setup.teardown(client)
        with contextlib.suppress(OSError):
            os.rmdir(socket_dir)
        for message in errors:
            sys.stderr.write(f"cowbackup: warning: cleaning up: {message}\n")


async def _read_into_repository(
    repo: Repository,
    plan: SnapshotPlan,
    socket: str,
    specs: list[FleeceSpec],
    views: list[Fleeced],
    reporter: Reporter,
    limit: RateLimit,
) -> Manifest:
    # Imported here: push mode (live_repo) shares this module's plans but reads nothing itself.
    from cowbackup.daemon import Daemon
    from cowbackup.repo.writer import BackupRun

    daemon = Daemon()
    run: BackupRun | None = None
    try:
        run = await BackupRun.start(repo)
        await _reload_parent(repo, plan)
        done = 0
        reporter.start(plan.name, plan.size)

        def progress(n: int) -> None:
            nonlocal done
            done += n
            reporter.update(done, plan.size)

        records = []
        for disk, spec, view in zip(plan.disks, specs, views, strict=True):
            server = {"type": "unix", "path": socket}
            node = await daemon.blockdev_add(
                {
                    "driver": "nbd",
                    "node-name": spec.prefix,
                    "server": server,
                    "export": spec.prefix,
                    "read-only": True,
                }
            )
            dirty = None
            parent = disk.parent_disk
            if view.frozen is not None:
                context = f"qemu:dirty-bitmap:{view.frozen}"
                dirty = await _dirty_chunks(socket, spec.prefix, context, disk.size, repo)
                if plan.audit and parent is not None:
                    dirty, parent = await _audit(repo, node, disk, parent, dirty, plan.audit)
            records.append(
                await run.write_disk(
                    disk.disk,
                    node,
                    source=disk.image,
                    parent=parent,
                    dirty=dirty,
                    changes=disk.changes,
                    progress=progress,
                    limit=limit,
                )
            )
        reporter.update(done, plan.size, force=True)
        return await run.commit(
            plan.name,
            records,
            tags=plan.tags,
            parent=plan.parent.id if plan.parent is not None else None,
            snapshot_id=plan.snapshot_id,
        )
    finally:
        reporter.stop()
        if run is not None:
            await run.close()
        await daemon.close()


async def _audit(
    repo: Repository, view: BlockNode, disk: DiskPlan, parent: DiskRecord, dirty: DirtyTest, percent: float
) -> tuple[DirtyTest | None, DiskRecord | None]:
    """``--audit``: re-read a sample of what the bitmap calls clean; if any of it changed, the bitmap
    lied -- say so loudly and read the whole disk instead (dedup still stores only what changed)."""
    from cowbackup.repo.audit import audit_clean_chunks

    result = await audit_clean_chunks(repo, view, parent, dirty, percent)
    disk.changes["audit"] = result.as_dict()
    if not result.mismatches:
        return dirty, parent
    first = result.mismatches[0]
    reason = (
        f"audit: {len(result.mismatches)} of {result.checked} chunk(s) the bitmap called clean differ from "
        f"the parent snapshot (first at offset {first}): the bitmap missed writes"
    )
    sys.stderr.write(f"cowbackup: WARNING: {disk.node}: {reason}; reading the whole disk instead\n")
    disk.changes.update(method="full", fallback=reason)
    disk.changes.pop("bitmap", None)
    return None, None


async def _reload_parent(repo: Repository, plan: SnapshotPlan) -> None:
    """Read the parent again now that our session exists: gc protects what a session may reuse only from
    its start on, so a parent read earlier may have been forgotten and swept since."""
    if plan.parent is None or not any(d.parent_disk is not None for d in plan.disks):
        return
    try:
        parent = await asyncio.get_running_loop().run_in_executor(None, repo.load_manifest, plan.parent.id)
    except MissingObject:
        raise CliError(
            f"the parent snapshot {plan.parent.id[:8]} was forgotten while this backup started; run it again "
            "(with --fallback-full it then reads everything)"
        ) from None
    for d in plan.disks:
        if d.parent_disk is not None:
            d.parent_disk = parent.disk(d.disk)


async def _dirty_chunks(
    socket: str, export: str, context: str, size: int, repo: Repository
) -> Callable[[int, int], bool]:
    """The chunk positions the frozen bitmap marks, read once from the export's dirty-bitmap context."""
    from cowbackup.nbd.client_conn import NBDClient
    from cowbackup.nbd.uri import NBDAddress

    cs = repo.config.chunk_size
    marks = bytearray(-(-size // cs))
    client = await NBDClient.connect(NBDAddress(export=export, socket=socket), extra_contexts=(context,))
    try:
        offset = 0
        while offset < size:
            extents = await client.context_status(context, offset, size - offset)
            for length, flags in extents:
                end = min(size, offset + length)
                if flags & 1:
                    for pos in range(offset // cs, -(-end // cs)):
                        marks[pos] = 1
                offset = end
                if offset >= size:
                    break
    finally:
        await client.close()

    def dirty(offset: int, length: int) -> bool:
        return any(marks[offset // cs : -(-(offset + length) // cs)])

    return dirty
