"""A live backup into a repository from a daemon that cannot hold our target node: pull mode.

``backup --qmp SOCKET NODE --repo REPO`` against a ``qemu-storage-daemon`` (or QEMU) sets up fleecing the
way libvirt does on QEMU 7.2, reads the point-in-time view over NBD, and tears everything down whatever
happens::

    blockdev-add       cb-ID-scratch: a qcow2 scratch image (a new file) whose backing node is NODE
    transaction        block-dirty-bitmap-add STEM-ID (persistent: tracks writes from this instant)
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import EventListener, QMPClient

from cowbackup.block.drivers import qcow2
from cowbackup.cli.errors import CliError
from cowbackup.cli.live import execute
from cowbackup.cli.progress import Reporter
from cowbackup.cli.pull import export_del
from cowbackup.daemon import Daemon
from cowbackup.nbd.client_conn import NBDClient
from cowbackup.nbd.uri import NBDAddress
from cowbackup.repo.manifest import DiskRecord, Manifest
from cowbackup.repo.repository import Repository
from cowbackup.repo.writer import BackupRun

#: Longest wait for the fleecing job to go away after job-cancel.
JOB_GONE_TIMEOUT = 30.0


@dataclass
class PullPlan:
    """What the caller decided: names, the parent, and how the changes are found."""

    node: str
    size: int
    snapshot_id: str
    disk: str
    name: str
    tags: list[str]
    changes: dict[str, Any]
    parent: Manifest | None
    parent_disk: DiskRecord | None
    old_bitmap: str | None
    new_bitmap: str | None
    #: QEMU stores persistent bitmaps in qcow2 images only; elsewhere the bitmap lives as long as the
    #: daemon (a restart then means a full backup, with the reason said).
    persistent: bool = True


@dataclass
class _Fleece:
    """What has been set up so far, undone in reverse by :meth:`teardown`."""

    prefix: str
    scratch: str
    socket_dir: str
    nodes: list[str] = field(default_factory=list)
    bitmaps: list[tuple[str, str]] = field(default_factory=list)
    job: str | None = None
    export: str | None = None
    server_started: bool = False
    tracking_added: bool = False

    async def teardown(self, client: QMPClient) -> list[str]:
        errors: list[str] = []

        async def step(what: Callable[[], Awaitable[object]]) -> None:
            try:
                await what()
            except CliError as err:
                errors.append(err.message)

        if self.export is not None:
            export = self.export
            await step(lambda: export_del(client, export))
        if self.job is not None:
            job = self.job
            await step(lambda: _cancel_job(client, job))
        for name in reversed(self.nodes):
            await step(lambda name=name: execute(client, "blockdev-del", {"node-name": name}))  # type: ignore[misc]
        for node, bitmap in self.bitmaps:
            ref = {"node": node, "name": bitmap}
            await step(lambda ref=ref: execute(client, "block-dirty-bitmap-remove", ref))  # type: ignore[misc]
        if self.server_started:
            await step(lambda: execute(client, "nbd-server-stop"))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.scratch)
        with contextlib.suppress(OSError):
            os.rmdir(self.socket_dir)
        return errors


async def _cancel_job(client: QMPClient, job: str) -> None:
    listener = EventListener("JOB_STATUS_CHANGE")
    with client.listen(listener):
        try:
            await execute(client, "job-cancel", {"id": job})
        except CliError as err:
            if "not found" in err.message.lower():
                return
            raise
        try:
            async with asyncio.timeout(JOB_GONE_TIMEOUT):
                while True:
                    event: dict[str, Any] = dict(await listener.get())
                    data = event.get("data", {})
                    if data.get("id") == job and data.get("status") == "null":
                        return  # auto-dismissed
        except TimeoutError:
            raise CliError(f"the fleecing job '{job}' did not end within {JOB_GONE_TIMEOUT:.0f} s") from None


async def pull_backup(
    client: QMPClient,
    args: argparse.Namespace,
    repo: Repository,
    plan: PullPlan,
    reporter: Reporter,
) -> tuple[Manifest, float]:
    """Fleece, read, commit, tear down; ``(snapshot, seconds)``.  CliError if anything fails (then
    nothing is committed, and everything set up is removed)."""
    prefix = f"cb-{plan.snapshot_id[:8]}"
    scratch_dir = args.scratch_dir or tempfile.gettempdir()
    fleece = _Fleece(
        prefix, os.path.join(scratch_dir, f"{prefix}.scratch.qcow2"), tempfile.mkdtemp(prefix="cb-nbd-")
    )
    committed: Manifest | None = None
    try:
        started = time.monotonic()
        uri_socket = await _set_up(client, args, plan, fleece)
        committed = await _read_into_repository(repo, plan, uri_socket, f"{prefix}", reporter)
        return committed, time.monotonic() - started
    finally:
        # The tracking bitmap that lost: the new one if nothing was committed, else the parent's.
        stale = (
            plan.old_bitmap if committed is not None else plan.new_bitmap if fleece.tracking_added else None
        )
        if stale is not None:
            fleece.bitmaps.append((plan.node, stale))
        errors = await fleece.teardown(client)
        for message in errors:
            sys.stderr.write(f"cowbackup: warning: cleaning up: {message}\n")


async def _set_up(client: QMPClient, args: argparse.Namespace, plan: PullPlan, f: _Fleece) -> str:
    """Everything up to the export; the unix socket where the view is served."""
    await qcow2.create(f.scratch, plan.size)
    scratch_node = f"{f.prefix}-scratch"
    await execute(
        client,
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": scratch_node,
            "file": {"driver": "file", "filename": f.scratch},
            "backing": plan.node,
        },
    )
    f.nodes.append(scratch_node)
    frozen = f"{f.prefix}-frozen" if plan.old_bitmap else None
    actions: list[dict[str, Any]] = []
    if plan.new_bitmap is not None:
        add = {"node": plan.node, "name": plan.new_bitmap, "persistent": plan.persistent}
        actions.append({"type": "block-dirty-bitmap-add", "data": add})
    if frozen is not None:
        actions.append(
            {"type": "block-dirty-bitmap-add", "data": {"node": plan.node, "name": frozen, "disabled": True}}
        )
        merge = {"node": plan.node, "target": frozen, "bitmaps": [plan.old_bitmap]}
        actions.append({"type": "block-dirty-bitmap-merge", "data": merge})
    job = f"{f.prefix}-fleece"
    backup = {
        "job-id": job,
        "device": plan.node,
        "target": scratch_node,
        "sync": "none",
        "auto-dismiss": True,
    }
    actions.append({"type": "blockdev-backup", "data": backup})
    await execute(client, "transaction", {"actions": actions})
    f.job = job
    f.tracking_added = plan.new_bitmap is not None
    if frozen is not None:
        f.bitmaps.append((plan.node, frozen))
    socket = args.nbd_socket
    if socket is None:
        socket = os.path.join(f.socket_dir, "nbd.sock")
        try:
            addr = {"type": "unix", "data": {"path": socket}}
            await execute(client, "nbd-server-start", {"addr": addr})
            f.server_started = True
        except CliError as err:
            if "already running" not in err.message:
                raise
            raise CliError(
                "the daemon already runs an NBD server, and where it listens cannot be asked over QMP: "
                "give its unix socket with --nbd-socket PATH"
            ) from None
    export: dict[str, Any] = {"type": "nbd", "id": f.prefix, "node-name": scratch_node, "name": f.prefix}
    export["writable"] = False
    if frozen is not None:
        export["bitmaps"] = [frozen]
    await execute(client, "block-export-add", export)
    f.export = f.prefix
    return str(socket)


async def _read_into_repository(
    repo: Repository, plan: PullPlan, socket: str, export: str, reporter: Reporter
) -> Manifest:
    daemon = Daemon()
    run: BackupRun | None = None
    try:
        server = {"type": "unix", "path": socket}
        node = await daemon.blockdev_add(
            {"driver": "nbd", "node-name": "view", "server": server, "export": export, "read-only": True}
        )
        dirty = None
        if plan.old_bitmap is not None:
            dirty = await _dirty_chunks(socket, export, f"qemu:dirty-bitmap:{export}-frozen", plan.size, repo)
        run = await BackupRun.start(repo)
        done = 0
        reporter.start(plan.name, plan.size)

        def progress(n: int) -> None:
            nonlocal done
            done += n
            reporter.update(done, plan.size)

        record = await run.write_disk(
            plan.disk,
            node,
            source=f"nbd+unix:///{export}?socket={socket}",
            parent=plan.parent_disk,
            dirty=dirty,
            changes=plan.changes,
            progress=progress,
        )
        reporter.update(done, plan.size, force=True)
        return await run.commit(
            plan.name,
            [record],
            tags=plan.tags,
            parent=plan.parent.id if plan.parent is not None else None,
            snapshot_id=plan.snapshot_id,
        )
    finally:
        reporter.stop()
        if run is not None:
            await run.close()
        await daemon.close()


async def _dirty_chunks(
    socket: str, export: str, context: str, size: int, repo: Repository
) -> Callable[[int, int], bool]:
    """The chunk positions the frozen bitmap marks, read once from the export's dirty-bitmap context."""
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
