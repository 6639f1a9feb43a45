"""``cowbackup pull``: export a frozen, point-in-time view of a live disk over NBD until released.

::

    cowbackup pull --qmp SOCKET NODE --scratch PATH (--socket NBD_SOCKET | --bind HOST:PORT)
                   [--bitmap NAME] [--name EXPORT] [--id ID] [--allow-discard] [--until-file PATH]

It drives a running ``cowbackup daemon`` (or ``qemu-storage-daemon``) over QMP with the commands libvirt
uses for a pull-mode backup (docs/pull-mode.md has them in full).  On ``cowbackup daemon``::

    nbd-server-start      at --socket / --bind, unless a server already runs (then the view must be
                          reachable at the address given: pull connects to check, else it refuses)
    blockdev-add          ID-scratch: driver file on PATH (created sparse, NODE's size; must not exist)
    blockdev-add          ID-cbw: copy-before-write, file=NODE, target=ID-scratch [, bitmap=NODE/NAME,
                          x-view-bitmap=NAME] -- the instant of the snapshot; with --bitmap, our daemon
                          also freezes the view's dirty map as bitmap NAME on ID-cbw, in that instant
    blockdev-add          ID-snap: snapshot-access, file=ID-cbw, discard=unmap
    block-export-add      id ID, node ID-snap, name EXPORT (default NODE-snapshot), read-only unless
                          --allow-discard (then writable, so a reader may trim what it has read and free
                          scratch space; writes still fail); with --bitmap, bitmaps=[ID-cbw/NAME], read
                          as qemu:dirty-bitmap:NAME

On QEMU's daemons, which refuse snapshot-access while the guest's export may write NODE ("Permission
conflict"), the way libvirt takes on QEMU 7.2 (:mod:`cowbackup.cli.fleece`): PATH becomes a qcow2 image
whose backing node is NODE, filled by a ``blockdev-backup sync=none`` job; with --bitmap, a disabled copy
``ID-frozen`` of NAME taken in the same transaction is the view's dirty map
(``qemu:dirty-bitmap:ID-frozen``, said on stderr).  --allow-discard is refused there.

Then it prints the NBD URI of the view as the first line of stdout, and waits -- without holding the QMP
connection, so qemu-storage-daemon's single monitor stays usable -- until SIGINT or SIGTERM, or until
``--until-file`` exists.  Then it tears everything down in reverse order: ``block-export-del`` (clients
still connected are cut off), waiting for ``BLOCK_EXPORT_DELETED``; the fleecing job; the nodes and the
frozen bitmap; ``nbd-server-stop`` if it started the server; and removes the scratch file.  A failure
while setting up undoes what was done.

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
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from cowbackup.cli.errors import EXIT_OK, CliError, UsageError
from cowbackup.cli.fleece import FleeceSpec, Setup, fleece_with_backup_job
from cowbackup.cli.live import connect, execute
from cowbackup.nbd.client_conn import ConnectError, NBDClient
from cowbackup.nbd.uri import parse_uri

#: How often --until-file is looked for.
UNTIL_FILE_POLL = 0.2


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
    scratch = Path(os.path.abspath(args.scratch))  # the daemon resolves names from its own directory
    if scratch.exists():
        raise UsageError(f"scratch file '{scratch}' already exists")
    return asyncio.run(_pull(args, addr, uri, scratch))


async def _size_of(client: QMPClient, node: str) -> int:
    nodes: list[dict[str, Any]] = await execute(client, "query-named-block-nodes", {"flat": True})
    for info in nodes:
        if info.get("node-name") == node:
            return int(info["image"]["virtual-size"])
    raise CliError(f"the daemon has no block node named '{node}'")


async def _set_up(
    client: QMPClient, args: argparse.Namespace, addr: dict[str, Any], s: Setup, scratch: Path
) -> str:
    """Freeze the view and export it; the name of the dirty-map context exported with it, if any."""
    size = await _size_of(client, args.node)
    try:
        await execute(client, "nbd-server-start", {"addr": {"type": addr["type"], "data": _data(addr)}})
        s.server_started = True
    except CliError as err:
        if "already running" not in err.message:
            raise  # (already running: checked once the view is exported, by connecting to it)
    version: dict[str, Any] = await execute(client, "query-version")
    if not str(version.get("package", "")).startswith("cowbackup"):
        return await _set_up_backup_job(client, args, s, size, scratch)
    await asyncio.to_thread(_create_sparse, scratch, size)
    s.files.append(str(scratch))
    prefix = args.id
    scratch_node, cbw_node, snap_node = f"{prefix}-scratch", f"{prefix}-cbw", f"{prefix}-snap"
    await execute(
        client,
        "blockdev-add",
        {
            "driver": "file",
            "node-name": scratch_node,
            "filename": str(scratch),
            "discard": "unmap",
        },
    )
    s.nodes.append(scratch_node)
    cbw: dict[str, Any] = {"driver": "copy-before-write", "node-name": cbw_node, "file": args.node}
    cbw["target"] = scratch_node
    if args.bitmap is not None:
        cbw["bitmap"] = {"node": args.node, "name": args.bitmap}
        # Ours: the view's dirty map, frozen in the same instant as the view, exported next to it.
        cbw["x-view-bitmap"] = args.bitmap
    await execute(client, "blockdev-add", cbw)
    s.nodes.append(cbw_node)
    snap = {"driver": "snapshot-access", "node-name": snap_node, "file": cbw_node, "discard": "unmap"}
    await execute(client, "blockdev-add", snap)
    s.nodes.append(snap_node)
    export: dict[str, Any] = {"type": "nbd", "id": args.id, "node-name": snap_node}
    export["name"] = args.name or f"{args.node}-snapshot"
    export["writable"] = bool(args.allow_discard)
    if args.bitmap is not None:
        export["bitmaps"] = [{"node": cbw_node, "name": args.bitmap}]
    await execute(client, "block-export-add", export)
    s.exports.append(args.id)
    return f"qemu:dirty-bitmap:{args.bitmap}" if args.bitmap is not None else ""


async def _set_up_backup_job(
    client: QMPClient, args: argparse.Namespace, s: Setup, size: int, scratch: Path
) -> str:
    """QEMU's daemons: the scratch is a qcow2 image over NODE filled by a sync=none backup job
    (libvirt's way on QEMU 7.2; snapshot-access beside the guest's writable export is a permission
    conflict there).  The view's dirty map is a disabled copy of --bitmap, taken in the same instant."""
    if args.allow_discard:
        raise CliError("--allow-discard needs snapshot-access (cowbackup daemon); QEMU's view is read-only")
    spec = FleeceSpec(args.node, size, str(scratch), args.id, args.bitmap)
    (view,) = await fleece_with_backup_job(client, s, [spec])
    scratch_node, frozen = view.scratch_node, view.frozen
    export: dict[str, Any] = {"type": "nbd", "id": args.id, "node-name": scratch_node}
    export["name"] = args.name or f"{args.node}-snapshot"
    export["writable"] = False
    if frozen is not None:
        export["bitmaps"] = [frozen]
    await execute(client, "block-export-add", export)
    s.exports.append(args.id)
    return f"qemu:dirty-bitmap:{frozen}" if frozen is not None else ""


async def _check_reachable(uri: str, server_started: bool) -> None:
    """The view must be where the printed URI says: when the daemon's NBD server was already running,
    QMP cannot tell where it listens, so connect and see."""
    if server_started:
        return
    try:
        client = await NBDClient.connect(parse_uri(uri), connect_timeout=5)
    except (ConnectError, OSError, ValueError) as err:
        raise CliError(
            f"the daemon already runs an NBD server, and the view is not reachable at {uri} ({err}); "
            "give --socket/--bind where that server listens, or stop it"
        ) from None
    await client.close()


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
    s = Setup()
    async with connect(args.qmp) as client:
        try:
            context = await _set_up(client, args, addr, s, scratch)
            await _check_reachable(uri, s.server_started)
        except BaseException:
            errors = await s.teardown(client)
            for message in errors:
                sys.stderr.write(f"cowbackup: warning: cleaning up: {message}\n")
            raise
    print(uri, flush=True)
    sys.stderr.write(f"cowbackup: exporting the view of '{args.node}' taken now; waiting for release\n")
    if context:
        sys.stderr.write(f"cowbackup: its dirty map is the metadata context {context}\n")
    why = await _wait_for_release(args.until_file)
    sys.stderr.write(f"cowbackup: released ({why}); tearing down\n")
    async with connect(args.qmp) as client:
        errors = await s.teardown(client)
    if errors:
        raise CliError("teardown incomplete: " + "; ".join(errors))
    return EXIT_OK
