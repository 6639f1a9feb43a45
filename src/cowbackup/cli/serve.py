"""``cowbackup serve IMAGE``: serve a disk over NBD until Ctrl-C.

Prints the NBD URI to connect to (``nbd+unix:///NAME?socket=PATH`` or ``nbd://HOST:PORT/NAME``), so
``qemu-io``, ``qemu-img``, ``nbdinfo``, ``nbdcopy`` or the kernel's ``nbd-client`` can use it at once.
Writable unless ``--read-only``; discards and zero writes that allow it deallocate (``discard=unmap``), so
the image keeps its holes.  ``--tls-creds DIR`` (QEMU's x509 layout) makes TLS mandatory.
``--qmp PATH`` also opens a QMP monitor on PATH, where the disk is the node ``disk``: back it up while it is
served with ``cowbackup backup --qmp PATH disk TARGET``.

``cowbackup serve --repo REPO SNAP[:DISK]`` serves a snapshot's disk from a repository instead, read-only:
zero chunks are holes in the block status, chunks are fetched and decoded on demand and kept in a cache
of ``--cache-size`` bytes.  With ``--overlay FILE`` the export is writable: writes go to FILE, a sparse
qcow2 image whose backing node is the snapshot (created if absent; reused only if it was made for the
same snapshot and disk).  The snapshot itself never changes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import stat
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from cowbackup.block.drivers import qcow2
from cowbackup.block.errors import BlockError
from cowbackup.cli import argtypes
from cowbackup.cli.errors import EXIT_OK, UsageError
from cowbackup.cli.repo_common import read_passphrase, resolve_disk
from cowbackup.daemon import Daemon
from cowbackup.nbd.contexts import ALLOCATION_DEPTH, allocation_depth
from cowbackup.nbd.listener import NBDServer
from cowbackup.nbd.tls import TLSError, server_context
from cowbackup.nbd.uri import NBD_DEFAULT_PORT, NBDAddress
from cowbackup.qmp.server import QMPServer
from cowbackup.repo.backends import open_store
from cowbackup.repo.instant_restore import InstantRestoreNode, restore_in_background
from cowbackup.repo.manifest import DiskRecord
from cowbackup.repo.repository import Repository
from cowbackup.repo.snapshot_node import DEFAULT_CACHE_BYTES, SnapshotNode


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a disk image, or a repository snapshot, over NBD",
        description=__doc__,
    )
    p.add_argument(
        "image",
        metavar="IMAGE | SNAP[:DISK]",
        help="raw image file or block device; with --repo, a snapshot (id, prefix, latest, NAME@latest)",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="listen on this Unix socket")
    where.add_argument(
        "--bind", metavar="HOST[:PORT]", help=f"listen on TCP (default port {NBD_DEFAULT_PORT})"
    )
    p.add_argument("--name", default="", help="export name (default: empty, the default export)")
    p.add_argument("--read-only", action="store_true", help="refuse writes")
    p.add_argument("--tls-creds", metavar="DIR", help="x509 credentials directory; TLS becomes mandatory")
    p.add_argument(
        "--no-verify-peer", action="store_true", help="with TLS, do not require client certificates"
    )
    p.add_argument(
        "--qmp", metavar="PATH", help="also serve a QMP monitor on this Unix socket (the node is 'disk')"
    )
    p.add_argument(
        "-A",
        "--allocation-depth",
        action="store_true",
        help="also offer the qemu:allocation-depth metadata context (as qemu-nbd -A)",
    )
    g = p.add_argument_group(
        "from a repository", "With --repo, serve a snapshot (read-only unless --overlay)."
    )
    # Not repo_common's add_repo_arguments: --sync-level means nothing to a reader.
    g.add_argument("--repo", metavar="REPO", help="serve a snapshot of this repository (a directory)")
    g.add_argument("--password-file", metavar="FILE", help="read the passphrase from FILE's first line")
    g.add_argument(
        "--overlay",
        metavar="FILE",
        help="make the export writable: writes go to FILE, a qcow2 overlay over the snapshot "
        "(created if absent; an existing one is reused only if made for the same snapshot and disk)",
    )
    g.add_argument(
        "--cache-size",
        type=argtypes.size,
        default=None,
        metavar="BYTES",
        help=f"memory for decoded chunks (default {DEFAULT_CACHE_BYTES >> 20}M)",
    )
    p.set_defaults(func=run)


def _parse_bind(text: str) -> tuple[str, int]:
    host, port = text, NBD_DEFAULT_PORT
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = _port(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text)
    return host or "localhost", port


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise UsageError(f"invalid port '{text}'") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"invalid port {port}")
    return port


def run(args: argparse.Namespace) -> int:
    opener: DiskOpener
    if args.repo is None:
        for option, given in (("--overlay", args.overlay), ("--cache-size", args.cache_size)):
            if given is not None:
                raise UsageError(f"{option} needs --repo (it applies to serving a repository snapshot)")
        if not os.path.exists(args.image):
            raise UsageError(f"image '{args.image}' does not exist")
        opener = _ImageOpener(args.image, read_only=args.read_only)
    else:
        opener = _snapshot_opener(args)
    if args.socket:
        args.socket = os.path.abspath(args.socket)
    if args.qmp:
        args.qmp = os.path.abspath(args.qmp)
    return asyncio.run(serve_disk(args, opener))


class DiskOpener(Protocol):
    """Adds the node ``disk`` to the daemon's graph: what the export serves."""

    #: For the "serving ..." line.
    description: str
    writable: bool

    async def open(self, daemon: Daemon) -> None: ...

    async def close(self) -> None:
        """Stop what :meth:`open` started (called when serving ends)."""


class _ImageOpener:
    def __init__(self, image: str, *, read_only: bool) -> None:
        self.image = image
        self.description = f"'{image}'{' read-only' if read_only else ''}"
        self.writable = not read_only

    async def close(self) -> None:
        pass

    async def open(self, daemon: Daemon) -> None:
        driver = "host_device" if stat.S_ISBLK(os.stat(self.image).st_mode) else "file"
        # The file node itself: a raw image needs no format layer, and every layer costs per request.
        # discard=unmap: TRIM and WRITE_ZEROES without NO_HOLE punch holes, so a sparse image copied into
        # the export (nbdcopy, qemu-img convert -n) stays sparse on our side too.
        await daemon.blockdev_add(
            {
                "driver": driver,
                "node-name": "disk",
                "filename": self.image,
                "read-only": not self.writable,
                "discard": "unmap",
            }
        )


async def serve_disk(args: argparse.Namespace, opener: DiskOpener) -> int:
    """Serve the node ``opener`` adds over NBD (``args``: serve's address, TLS, QMP and export options)
    until SIGINT, SIGTERM or QMP ``quit``; print its URI first."""
    daemon = Daemon()
    try:
        ssl_ctx = (
            server_context(args.tls_creds, verify_peer=not args.no_verify_peer) if args.tls_creds else None
        )
    except TLSError as err:
        raise UsageError(str(err)) from None
    server = NBDServer(daemon.graph, tls_creds=ssl_ctx)
    stop = asyncio.Event()
    qmp = QMPServer(daemon, on_quit=stop.set) if args.qmp else None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await opener.open(daemon)
        contexts = {ALLOCATION_DEPTH: allocation_depth} if args.allocation_depth else {}
        server.add_export(args.name, "disk", writable=opener.writable, contexts=contexts)
        if args.socket:
            await server.listen_unix(args.socket)
            address = NBDAddress(export=args.name, socket=args.socket, tls=ssl_ctx is not None)
        else:
            host, port = _parse_bind(args.bind or f"localhost:{NBD_DEFAULT_PORT}")
            host, port = await server.listen_tcp(host, port)
            address = NBDAddress(export=args.name, host=host, port=port, tls=ssl_ctx is not None)
        if qmp is not None:
            await qmp.listen_unix(args.qmp)
            sys.stderr.write(f"cowbackup: QMP monitor on '{args.qmp}'; the disk is node 'disk'\n")
        print(address.to_uri(), flush=True)
        sys.stderr.write(f"cowbackup: serving {opener.description}; Ctrl-C stops\n")
        await stop.wait()
    finally:
        try:
            await opener.close()
            if qmp is not None:
                await qmp.close()
        finally:
            await server.close()
            await daemon.close()
    return EXIT_OK


# -- serving a repository snapshot ------------------------------------------------------------------

#: How an overlay names the snapshot it belongs to, as its qcow2 backing file name.  Not a file QEMU
#: can open: the overlay is only meaningful over this snapshot, through ``cowbackup serve``.
OVERLAY_MARKER = "cowbackup-snapshot:{repository}/{snapshot}/{disk}"


def _snapshot_opener(args: argparse.Namespace) -> DiskOpener:
    """Open the repository, resolve SNAP[:DISK] (clear errors, exit 2), check the overlay's options."""
    if args.overlay is not None:
        args.overlay = os.path.abspath(args.overlay)
        if os.path.isdir(args.overlay):
            raise UsageError(f"--overlay '{args.overlay}' is a directory")
        if not os.path.isdir(os.path.dirname(args.overlay)):
            raise UsageError(f"--overlay '{args.overlay}': its directory does not exist")
    cache_bytes = DEFAULT_CACHE_BYTES if args.cache_size is None else args.cache_size
    # Nothing is written to the repository: no sync level applies.
    repo = Repository.open(open_store(args.repo, "none"), lambda: read_passphrase(args))
    snap, disk = resolve_disk(repo, args.image)
    damage = repo.damage().get(snap.id)
    if damage is not None:
        sys.stderr.write(
            f"cowbackup: warning: verify recorded snapshot {snap.id[:8]} as damaged; "
            "reads of its bad ranges fail with EIO\n"
        )
    return _SnapshotOpener(repo, snap.id, disk, cache_bytes, args.overlay, read_only=args.read_only)


class _SnapshotOpener:
    """The snapshot as node ``disk``; with an overlay, the graph is::

        export -> disk (qcow2, FILE) --backing--> snapshot

    (The NBD server reports block status through the backing chain, so ranges the overlay leaves to the
    snapshot show as the snapshot's data, holes or zeros.)
    """

    def __init__(
        self,
        repo: Repository,
        snapshot_id: str,
        disk: DiskRecord,
        cache_bytes: int,
        overlay: str | None,
        *,
        read_only: bool,
    ) -> None:
        self.repo = repo
        self.snapshot_id = snapshot_id
        self.disk = disk
        self.cache_bytes = cache_bytes
        self.overlay = overlay
        #: Decided before the event loop runs (no blocking calls on it).
        self.overlay_exists = overlay is not None and os.path.exists(overlay)
        self.writable = overlay is not None and not read_only
        where = f"snapshot {snapshot_id[:8]}:{disk.name}"
        self.description = (
            f"{where} read-only"
            if overlay is None
            else f"{where} with overlay '{overlay}'{' read-only' if read_only else ''}"
        )
        self.marker = OVERLAY_MARKER.format(repository=repo.config.id, snapshot=snapshot_id, disk=disk.name)

    async def close(self) -> None:
        pass

    async def open(self, daemon: Daemon) -> None:
        name = "snapshot" if self.overlay is not None else "disk"
        node = SnapshotNode(name, self.repo, self.snapshot_id, self.disk, cache_bytes=self.cache_bytes)
        try:
            daemon.graph.add(node)
        except BaseException:
            await node.close()
            raise
        if self.overlay is None:
            return
        created = False
        if self.overlay_exists:
            await self._check_overlay(daemon, self.overlay)
        else:
            await qcow2.create(self.overlay, self.disk.size, backing_file=self.marker)
            created = True
        try:
            await daemon.blockdev_add(
                {
                    "driver": "qcow2",
                    "node-name": "disk",
                    # locking: a second serve of the same overlay fails instead of corrupting it.
                    "file": {"driver": "file", "filename": self.overlay, "locking": "on"},
                    "backing": "snapshot",
                    "read-only": not self.writable,
                }
            )
        except BaseException:
            if created:
                os.unlink(self.overlay)
            raise

    async def _check_overlay(self, daemon: Daemon, path: str) -> None:
        """Refuse an existing FILE unless it is an overlay made for this snapshot's disk.

        Its header is read through a read-only open without a backing node: nothing is written to a
        file that turns out not to be ours.
        """
        try:
            probe = await daemon.blockdev_add(
                {
                    "driver": "qcow2",
                    "node-name": "overlay-probe",
                    "file": {"driver": "file", "filename": path, "locking": "on"},
                    "backing": None,
                    "read-only": True,
                }
            )
        except BlockError as err:
            raise UsageError(f"--overlay '{path}' cannot be used: {err}") from None
        try:
            backing = probe.hdr.backing_file if isinstance(probe, qcow2.Qcow2Node) else None
            size = probe.size
        finally:
            await daemon.blockdev_del("overlay-probe")
        if backing == self.marker and size == self.disk.size:
            return
        if backing is None or not backing.startswith(OVERLAY_MARKER.split("{", 1)[0]):
            raise UsageError(
                f"--overlay '{path}' exists and is not a cowbackup overlay "
                f"(backing file {backing!r}); name a new file or remove it"
            )
        raise UsageError(
            f"--overlay '{path}' was made for another snapshot ({backing.split(':', 1)[1]}), not "
            f"{self.repo.config.id}/{self.snapshot_id}/{self.disk.name}; name a new file or remove it"
        )


class InstantRestoreOpener:
    """The restore TARGET as node ``disk``, usable at once: an instant-restore filter over it copies the
    snapshot in behind the clients' backs (chunks they read first, the rest in the background)."""

    def __init__(
        self,
        repo: Repository,
        snapshot_id: str,
        disk: DiskRecord,
        target: dict[str, Any],
        *,
        target_reads_zero: bool,
        speed: int,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.repo = repo
        self.snapshot_id = snapshot_id
        self.disk = disk
        self.target = target
        self.target_reads_zero = target_reads_zero
        self.speed = speed
        self.cache_bytes = cache_bytes
        self.progress = progress or (lambda _done, _total: None)
        self.writable = True
        self.description = f"snapshot {snapshot_id[:8]}:{disk.name} restoring into the target"
        self._task: asyncio.Task[None] | None = None

    async def open(self, daemon: Daemon) -> None:
        source = SnapshotNode(
            "snapshot", self.repo, self.snapshot_id, self.disk, cache_bytes=self.cache_bytes
        )
        try:
            daemon.graph.add(source)
        except BaseException:
            await source.close()
            raise
        try:
            target = await daemon.blockdev_add({**self.target, "node-name": "target"})
        except BlockError as err:
            raise UsageError(str(err)) from None
        if target.read_only or target.size < self.disk.size:
            raise UsageError(f"the target must be writable and hold {self.disk.size} bytes")
        node = InstantRestoreNode(
            "disk", source, self.disk.chunk_size, target_reads_zero=self.target_reads_zero
        )
        daemon.graph.attach(node, "file", target)
        node.refresh_limits()
        daemon.graph.add(node)
        self._task = asyncio.create_task(self._restore(node))

    async def _restore(self, node: InstantRestoreNode) -> None:
        done = 0
        total = node.size

        def progress(n: int) -> None:
            nonlocal done
            done += n
            self.progress(done, total)

        started = time.monotonic()
        try:
            await restore_in_background(node, speed=self.speed, progress=progress)
            await node.flush()
        except Exception as err:  # the disk stays served: reads of what is missing still fetch it
            sys.stderr.write(f"cowbackup: background restore stopped: {err}\n")
            return
        sys.stderr.write(
            f"cowbackup: restore complete in {time.monotonic() - started:.1f} s: the target holds the "
            "snapshot (with the clients' writes); still serving it until Ctrl-C\n"
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
