"""``cowbackup pull``: export a frozen, point-in-time view of a live disk over NBD until released.

::

    cowbackup pull --qmp SOCKET NODE --scratch PATH (--socket NBD_SOCKET | --bind HOST:PORT)
                   [--bitmap NAME] [--name EXPORT] [--id ID] [--allow-discard] [--until-file PATH]

It drives a running ``cowbackup daemon`` (or ``qemu-storage-daemon``) over QMP with the commands libvirt
uses for a pull-mode backup (docs/pull-mode.md has them in full)::

    nbd-server-start      at --socket / --bind, unless a server already runs (then it is reused, and the
                          URI printed assumes it listens at the address given)
    blockdev-add          ID-scratch: driver file on PATH (created sparse, NODE's size; must not exist)
    blockdev-add          ID-cbw: copy-before-write, file=NODE, target=ID-scratch [, bitmap=NODE/NAME,
                          x-view-bitmap=NAME] -- the instant of the snapshot; with --bitmap, our daemon
                          also freezes the view's dirty map as bitmap NAME on ID-cbw, in that instant
    blockdev-add          ID-snap: snapshot-access, file=ID-cbw, discard=unmap
    block-export-add      id ID, node ID-snap, name EXPORT (default NODE-snapshot), read-only unless
                          --allow-discard (then writable, so a reader may trim what it has read and free
                          scratch space; writes still fail); with --bitmap, bitmaps=[ID-cbw/NAME], read
                          as qemu:dirty-bitmap:NAME (qemu-storage-daemon: no dirty map, a warning)

then prints the NBD URI of the view as the first line of stdout, and waits -- without holding the QMP
connection, so qemu-storage-daemon's single monitor stays usable -- until SIGINT or SIGTERM, or until
``--until-file`` exists.  Then it tears everything down in reverse order: ``block-export-del`` (clients
still connected are cut off), waiting for ``BLOCK_EXPORT_DELETED``; ``blockdev-del`` of the three nodes;
``nbd-server-stop`` if it started the server; and removes the scratch file.  A failure while setting up
undoes what was done.

Writes to NODE must pass through the filter: with ``cowbackup daemon`` the filter is inserted above NODE,
so an existing export of NODE (the guest's) writes through it.  qemu-storage-daemon refuses the
snapshot-access node while anything else may write NODE directly; export the ``ID-cbw`` node to the guest
there instead.

Exit status: 0 after a clean release; 1 if the daemon refuses a command or goes away; 2 for bad usage
(a scratch file that exists, a bad address).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient

from cowbackup.cli.errors import EXIT_OK, CliError, UsageError
from cowbackup.cli.live import connect, execute

#: How often --until-file is looked for.
UNTIL_FILE_POLL = 0.2
#: Longest wait for BLOCK_EXPORT_DELETED after block-export-del.
EXPORT_DELETED_TIMEOUT = 30.0


def add_parser(sub: Any) -> None:
    """Register ``pull``."""
    p = sub.add_parser(
        "pull",
        help="export a frozen view of a live disk over NBD until released (pull-mode backup)",
        description="Export a point-in-time view of NODE of a running daemon over NBD, for a backup "
        "tool to read at its own pace while the disk keeps changing; released by SIGINT/SIGTERM or "
        "--until-file.",
    )
    p.add_argument("--qmp", metavar="SOCKET", required=True, help="the daemon's QMP monitor socket")
    p.add_argument("node", metavar="NODE", help="the block node to take the view of")
    p.add_argument("--scratch", metavar="PATH", required=True, help="scratch file for old data (created)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="NBD server on this unix socket")
    where.add_argument("--bind", metavar="HOST:PORT", help="NBD server on this TCP address")
    p.add_argument("--bitmap", metavar="NAME", help="only the clusters dirty in NODE's bitmap NAME")
    p.add_argument("--name", metavar="EXPORT", help="NBD export name (default: NODE-snapshot)")
    p.add_argument("--id", default="pull", help="export id and node-name prefix (default: pull)")
    p.add_argument(
        "--allow-discard", action="store_true", help="let the reader trim what it has read (frees scratch)"
    )
    p.add_argument("--until-file", metavar="PATH", help="release when this file exists")
    p.set_defaults(func=run)


def _address(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The nbd-server-start address and the URI of export ``name`` on it."""
    name = args.name or f"{args.node}-snapshot"
    if args.socket is not None:
        path = os.path.abspath(args.socket)
        return {"type": "unix", "path": path}, f"nbd+unix:///{name}?socket={path}"
    host, sep, port = str(args.bind).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--bind expects HOST:PORT, not '{args.bind}'")
    host = host.strip("[]")
    shown = f"[{host}]" if ":" in host else host
    return {"type": "inet", "host": host, "port": port}, f"nbd://{shown}:{port}/{name}"


def run(args: argparse.Namespace) -> int:
    addr, uri = _address(args)
    scratch = Path(args.scratch)
    if scratch.exists():
        raise UsageError(f"scratch file '{scratch}' already exists")
    return asyncio.run(_pull(args, addr, uri, scratch))


class _Setup:
    """What has been set up so far, undone in reverse by :meth:`teardown`."""

    def __init__(self, export_id: str, scratch: Path) -> None:
        self.export_id = export_id
        self.scratch = scratch
        self.nodes: list[str] = []
        self.exported = False
        self.server_started = False
        self.file_created = False

    async def teardown(self, client: QMPClient) -> list[str]:
        """Undo everything; return the errors (each step is tried whatever the others did)."""
        errors: list[str] = []

        async def step(what: Callable[[], Awaitable[object]]) -> None:
            try:
                await what()
            except CliError as err:
                errors.append(err.message)

        if self.exported:
            await step(lambda: export_del(client, self.export_id))
        for name in reversed(self.nodes):
            await step(lambda name=name: execute(client, "blockdev-del", {"node-name": name}))  # type: ignore[misc]
        if self.server_started:
            await step(lambda: execute(client, "nbd-server-stop"))
        if self.file_created:
            with contextlib.suppress(FileNotFoundError):
                self.scratch.unlink()
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


async def _size_of(client: QMPClient, node: str) -> int:
    nodes: list[dict[str, Any]] = await execute(client, "query-named-block-nodes", {"flat": True})
    for info in nodes:
        if info.get("node-name") == node:
            return int(info["image"]["virtual-size"])
    raise CliError(f"the daemon has no block node named '{node}'")


async def _set_up(client: QMPClient, args: argparse.Namespace, addr: dict[str, Any], s: _Setup) -> None:
    size = await _size_of(client, args.node)
    try:
        await execute(client, "nbd-server-start", {"addr": {"type": addr["type"], "data": _data(addr)}})
        s.server_started = True
    except CliError as err:
        if "already running" not in err.message:
            raise
    await asyncio.to_thread(_create_sparse, s.scratch, size)
    s.file_created = True
    prefix = args.id
    scratch_node, cbw_node, snap_node = f"{prefix}-scratch", f"{prefix}-cbw", f"{prefix}-snap"
    await execute(
        client,
        "blockdev-add",
        {
            "driver": "file",
            "node-name": scratch_node,
            "filename": str(s.scratch.resolve()),
            "discard": "unmap",
        },
    )
    s.nodes.append(scratch_node)
    cbw: dict[str, Any] = {"driver": "copy-before-write", "node-name": cbw_node, "file": args.node}
    cbw["target"] = scratch_node
    dirty_map = False
    if args.bitmap is not None:
        cbw["bitmap"] = {"node": args.node, "name": args.bitmap}
        # Ours: the view's dirty map, frozen in the same instant as the view, exported next to it.
        try:
            await execute(client, "blockdev-add", {**cbw, "x-view-bitmap": args.bitmap})
            dirty_map = True
        except CliError as err:
            if "x-view-bitmap" not in err.message:
                raise
            sys.stderr.write(
                "cowbackup: warning: this daemon cannot freeze the view's dirty map "
                f"(qemu:dirty-bitmap:{args.bitmap} is not exported)\n"
            )
    if not dirty_map:
        await execute(client, "blockdev-add", cbw)
    s.nodes.append(cbw_node)
    snap = {"driver": "snapshot-access", "node-name": snap_node, "file": cbw_node, "discard": "unmap"}
    await execute(client, "blockdev-add", snap)
    s.nodes.append(snap_node)
    export: dict[str, Any] = {"type": "nbd", "id": s.export_id, "node-name": snap_node}
    export["name"] = args.name or f"{args.node}-snapshot"
    export["writable"] = bool(args.allow_discard)
    if dirty_map:
        export["bitmaps"] = [{"node": cbw_node, "name": args.bitmap}]
    await execute(client, "block-export-add", export)
    s.exported = True


def _create_sparse(path: Path, size: int) -> None:
    """A new sparse file of ``size`` bytes; FileExistsError if ``path`` exists (never overwritten)."""
    with open(path, "xb") as f:
        f.truncate(size)


def _data(addr: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in addr.items() if k != "type"}


async def _wait_for_release(until_file: str | None) -> str:
    """Wait for SIGINT/SIGTERM or ``until_file``; return what released the view."""
    loop = asyncio.get_running_loop()
    released: asyncio.Future[str] = loop.create_future()

    def note(signum: int) -> None:
        if not released.done():
            released.set_result(signal.Signals(signum).name)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, note, signum)
    try:
        while not released.done():
            if until_file is not None and await asyncio.to_thread(os.path.exists, until_file):
                return f"'{until_file}' exists"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(released), UNTIL_FILE_POLL if until_file else None)
        return released.result()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def _pull(args: argparse.Namespace, addr: dict[str, Any], uri: str, scratch: Path) -> int:
    s = _Setup(args.id, scratch)
    async with connect(args.qmp) as client:
        try:
            await _set_up(client, args, addr, s)
        except BaseException:
            errors = await s.teardown(client)
            for message in errors:
                sys.stderr.write(f"cowbackup: warning: cleaning up: {message}\n")
            raise
    print(uri, flush=True)
    sys.stderr.write(f"cowbackup: exporting the view of '{args.node}' taken now; waiting for release\n")
    why = await _wait_for_release(args.until_file)
    sys.stderr.write(f"cowbackup: released ({why}); tearing down\n")
    async with connect(args.qmp) as client:
        errors = await s.teardown(client)
    if errors:
        raise CliError("teardown incomplete: " + "; ".join(errors))
    return EXIT_OK
