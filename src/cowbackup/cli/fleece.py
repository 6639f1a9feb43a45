"""Fleecing over QMP: what ``pull`` and pull-mode backups set up on a daemon, and take down again.

Two ways to freeze a view of a live node, both read over an NBD export:

* ``copy-before-write`` + ``snapshot-access`` (QEMU 7.1+'s way; our daemon's).  qemu-storage-daemon
  refuses it while another user may write the node (its guest export): "Permission conflict".
* a qcow2 scratch image whose backing node is the disk, filled by a ``blockdev-backup sync=none`` job
  (:func:`fleece_with_backup_job`: libvirt's way on QEMU 7.2), which works beside a writable export.

:class:`Setup` records every step as it succeeds; :meth:`Setup.teardown` undoes them in reverse, each
step tried whatever the others did, so Ctrl-C, an error or a refused command leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import EventListener, QMPClient

from cowbackup.cli.errors import CliError
from cowbackup.cli.live import execute

#: Longest wait for BLOCK_EXPORT_DELETED after block-export-del, and for a job to go after job-cancel.
EXPORT_DELETED_TIMEOUT = 30.0
JOB_GONE_TIMEOUT = 30.0


@dataclass
class Setup:
    """What has been set up on the daemon so far, in the order teardown undoes it."""

    exports: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    bitmaps: list[tuple[str, str]] = field(default_factory=list)
    server_started: bool = False
    files: list[str] = field(default_factory=list)

    async def teardown(self, client: QMPClient) -> list[str]:
        """Undo everything; the errors (each step is tried whatever the others did)."""
        errors: list[str] = []

        async def step(what: Callable[[], Awaitable[object]]) -> None:
            try:
                await what()
            except CliError as err:
                errors.append(err.message)

        for export in self.exports:
            await step(lambda export=export: export_del(client, export))  # type: ignore[misc]
        for job in self.jobs:
            await step(lambda job=job: cancel_job(client, job))  # type: ignore[misc]
        for name in reversed(self.nodes):
            await step(lambda name=name: execute(client, "blockdev-del", {"node-name": name}))  # type: ignore[misc]
        for node, bitmap in self.bitmaps:
            ref = {"node": node, "name": bitmap}
            await step(lambda ref=ref: execute(client, "block-dirty-bitmap-remove", ref))  # type: ignore[misc]
        if self.server_started:
            await step(lambda: execute(client, "nbd-server-stop"))
        for path in self.files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return errors


async def export_del(client: QMPClient, export_id: str) -> None:
    """``block-export-del`` (hard: readers still connected are cut off), then wait until it is gone:
    QEMU removes an export asynchronously, and its node stays busy until BLOCK_EXPORT_DELETED."""
    listener = EventListener("BLOCK_EXPORT_DELETED")
    with client.listen(listener):
        await execute(client, "block-export-del", {"id": export_id, "mode": "hard"})
        try:
            async with asyncio.timeout(EXPORT_DELETED_TIMEOUT):
                while True:
                    event: dict[str, Any] = dict(await listener.get())
                    if event.get("data", {}).get("id") == export_id:
                        return
        except TimeoutError:
            raise CliError(
                f"export '{export_id}' was not deleted within {EXPORT_DELETED_TIMEOUT:.0f} s"
            ) from None


async def cancel_job(client: QMPClient, job: str) -> None:
    """``job-cancel``, then wait until the (auto-dismissed) job is gone."""
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
                        return
        except TimeoutError:
            raise CliError(f"the fleecing job '{job}' did not end within {JOB_GONE_TIMEOUT:.0f} s") from None


async def start_nbd_server(
    client: QMPClient, setup: Setup, addr: dict[str, Any], *, existing_ok: bool
) -> None:
    """``nbd-server-start`` at ``addr`` (a QMP SocketAddress with its ``type``).  If the daemon already
    runs a server, QMP cannot tell where it listens: that is only fine when the caller knows it
    (``existing_ok``), else a clear error."""
    try:
        data = {k: v for k, v in addr.items() if k != "type"}
        await execute(client, "nbd-server-start", {"addr": {"type": addr["type"], "data": data}})
        setup.server_started = True
    except CliError as err:
        if "already running" not in err.message:
            raise
        if not existing_ok:
            raise CliError(
                "the daemon already runs an NBD server, and where it listens cannot be asked over QMP; "
                "if it listens at the address given, say so (--existing-server / --nbd-socket), or stop it"
            ) from None


@dataclass(frozen=True)
class FleeceSpec:
    """One node to freeze: its size, a new scratch file, a name prefix, and optionally a bitmap whose
    bits (the changes up to the instant) are frozen with the view."""

    node: str
    size: int
    scratch: str
    prefix: str
    frozen_from: str | None = None


@dataclass(frozen=True)
class Fleeced:
    """A frozen view: the scratch node to export, and the frozen bitmap on the source node (or None)."""

    scratch_node: str
    frozen: str | None


async def fleece_with_backup_job(
    client: QMPClient,
    setup: Setup,
    specs: list[FleeceSpec],
    actions: list[dict[str, Any]] | None = None,
) -> list[Fleeced]:
    """Freeze the views of several nodes at one instant: each in a new qcow2 scratch file (must not
    exist) whose backing node is the source, filled by its ``sync=none`` backup job; one transaction
    starts them all.

    With ``frozen_from``, a disabled bitmap ``PREFIX-frozen`` receives that bitmap's bits in the same
    transaction: the changes up to the instant, frozen with the view.  ``actions`` join the transaction
    too (bitmaps that start tracking at that instant).
    """
    from cowbackup.block.drivers import qcow2  # only fleecing writes qcow2: not every user of this module

    steps = list(actions or [])
    views = []
    for spec in specs:
        await qcow2.create(spec.scratch, spec.size)
        setup.files.append(spec.scratch)
        scratch_node = f"{spec.prefix}-scratch"
        await execute(
            client,
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": scratch_node,
                "file": {"driver": "file", "filename": spec.scratch},
                "backing": spec.node,
            },
        )
        setup.nodes.append(scratch_node)
        frozen = f"{spec.prefix}-frozen" if spec.frozen_from else None
        if frozen is not None:
            add = {"node": spec.node, "name": frozen, "disabled": True}
            steps.append({"type": "block-dirty-bitmap-add", "data": add})
            merge = {"node": spec.node, "target": frozen, "bitmaps": [spec.frozen_from]}
            steps.append({"type": "block-dirty-bitmap-merge", "data": merge})
        job = f"{spec.prefix}-fleece"
        backup = {
            "job-id": job,
            "device": spec.node,
            "target": scratch_node,
            "sync": "none",
            "auto-dismiss": True,
        }
        steps.append({"type": "blockdev-backup", "data": backup})
        views.append(Fleeced(scratch_node, frozen))
    await execute(client, "transaction", {"actions": steps})
    for spec, view in zip(specs, views, strict=True):
        setup.jobs.append(f"{spec.prefix}-fleece")
        if view.frozen is not None:
            setup.bitmaps.append((spec.node, view.frozen))
    return views
