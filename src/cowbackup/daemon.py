"""The composition root: one event loop owning the block graph, the jobs and the NBD server.

Everything a daemon session touches hangs off one :class:`Daemon`; the one-shot CLI runs an in-process
daemon through the same calls a QMP client makes, so both paths exercise the same engine.

Block exports follow QEMU's two levels: one NBD server (``nbd-server-start`` / ``nbd-server-stop``) and
any number of exports on it (``block-export-add`` / ``block-export-del``), each known by its ``id``; the
NBD export name defaults to the node name.  Every export that goes away -- deleted, or dropped by
``nbd-server-stop`` or :meth:`Daemon.close` -- emits ``BLOCK_EXPORT_DELETED {"id": ...}``.

Option dictionaries may come from QMP (typed JSON) or the command line (every value a string): both are
read through :class:`~cowbackup.block.options.Options`, so the messages are QEMU's either way.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import cowbackup.block.bitmap_sidecar  # noqa: F401  (registers the raw/file bitmap store)
from cowbackup.block.dirty_bitmaps import NodeDirtyBitmap, load_persistent_bitmaps
from cowbackup.block.drivers import open_node, register_driver
from cowbackup.block.errors import BlockError
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode
from cowbackup.block.options import Options
from cowbackup.ids import is_wellformed_id
from cowbackup.jobs.backup import BackupJob, BackupParams, backup_job_create
from cowbackup.jobs.events import Event
from cowbackup.jobs.job import JobManager, JobTxn
from cowbackup.nbd.contexts import ALLOCATION_DEPTH, allocation_depth, bitmap_contexts, export_bitmaps
from cowbackup.nbd.listener import NBDServer
from cowbackup.nbd.tls import TLSError, server_context
from cowbackup.repo import target_node

log = logging.getLogger(__name__)

# The repository's backup target is a driver of the daemon, not of the block layer below it.
register_driver(target_node.RepoTargetNode.driver_name, target_node.__name__)

BLOCK_EXPORT_DELETED = "BLOCK_EXPORT_DELETED"


#: nbd-server-start's max-connections 0 means unlimited (QEMU); our listener wants a number.
_UNLIMITED_CONNECTIONS = 1 << 32


@dataclass(eq=False)
class BlockExport:
    """One block export as QMP sees it; the NBD export itself lives in the NBD server under ``name``."""

    id: str
    node_name: str
    name: str
    #: The bitmaps offered as ``qemu:dirty-bitmap:`` contexts; busy until the export is gone.
    bitmaps: list[NodeDirtyBitmap] = field(default_factory=list)
    shutting_down: bool = False

    def info(self) -> dict[str, Any]:
        """The ``query-block-exports`` entry (QEMU's BlockExportInfo)."""
        return {
            "type": "nbd",
            "id": self.id,
            "node-name": self.node_name,
            "shutting-down": self.shutting_down,
        }


class Daemon:
    """Graph + jobs.  Create it inside a running event loop; call :meth:`close` to shut it down."""

    def __init__(self) -> None:
        self.graph = BlockGraph()
        self.jobs = JobManager()
        #: The NBD server of nbd-server-start, None while none runs.  Owned by the event loop.
        self.nbd: NBDServer | None = None
        #: Block exports by id, in creation order.
        self.exports: dict[str, BlockExport] = {}

    async def blockdev_add(self, options: Mapping[str, Any]) -> BlockNode:
        """``blockdev-add``: open a node (and its inline children) and add it to the graph; load the
        persistent dirty bitmaps of every node it created (their store: the qcow2 image, a raw image's
        sidecar); closing a node stores them."""
        node = await open_node(self.graph, options)
        try:
            for each in list(self.graph.nodes.values()):
                await load_persistent_bitmaps(each)
        except BlockError:
            await self.graph.remove(node.node_name)
            raise
        return node

    async def blockdev_del(self, node_name: str) -> None:
        """``blockdev-del``: close and remove the node (and unused inline children); closing stores
        their persistent bitmaps as closed cleanly."""
        await self.graph.remove(node_name)

    def blockdev_backup(self, params: BackupParams, txn: JobTxn | None = None) -> BackupJob:
        """``blockdev-backup``: validate, take the snapshot and start the job."""
        job = backup_job_create(self.graph, self.jobs, params, txn)
        job.start()
        return job

    # ------------------------------------------------------------------ NBD server and block exports

    async def nbd_server_start(
        self, addr: Mapping[str, Any], tls_creds: str | None = None, max_connections: int = 0
    ) -> None:
        """``nbd-server-start``: listen for NBD clients on ``addr`` (a QEMU SocketAddress).

        ``addr`` is ``{"type": "unix", "path": P}`` or ``{"type": "inet", "host": H, "port": N}``
        (``port`` a number or a service name).  ``tls_creds`` is the id of a ``tls-creds-x509`` object
        with ``endpoint=server`` (or, ours, a credentials directory), and makes TLS mandatory.
        ``max_connections`` 0 means unlimited.  BlockError with QEMU's message when a server already runs
        or the address is unusable; nothing is left listening on failure.
        """
        if self.nbd is not None:
            raise BlockError("NBD server already running")
        where = _socket_address(addr)
        if max_connections < 0 or max_connections >= 1 << 32:
            raise BlockError("Parameter 'max-connections' expects uint32_t")
        try:
            ssl_ctx = None
            if tls_creds is not None:
                creds = self.graph.objects.tls_creds(tls_creds, "server")
                ssl_ctx = server_context(creds.dir, verify_peer=creds.verify_peer)
        except TLSError as err:
            raise BlockError(str(err)) from None
        server = NBDServer(
            self.graph, tls_creds=ssl_ctx, max_connections=max_connections or _UNLIMITED_CONNECTIONS
        )
        try:
            if where[0] == "unix":
                await server.listen_unix(where[1])
            else:
                await server.listen_tcp(where[1], _port_number(where[1], where[2]))
        except OSError as err:
            await server.close()
            raise BlockError(f"Failed to bind socket to {_describe(where)}: {err.strerror or err}") from None
        self.nbd = server
        log.info("NBD server listening on %s", _describe(where))

    async def nbd_server_stop(self) -> None:
        """``nbd-server-stop``: drop every NBD export (their clients too), then stop listening."""
        if self.nbd is None:
            raise BlockError("NBD server not running")
        for export_id in list(self.exports):
            await self.block_export_del(export_id, mode="hard")
        server, self.nbd = self.nbd, None
        await server.close()

    async def block_export_add(self, options: Mapping[str, Any]) -> BlockExport:
        """``block-export-add`` for ``type: nbd``: export a node on the running NBD server.

        Options (QEMU's BlockExportOptions): ``type`` (``nbd``), ``id``, ``node-name``, ``writable``
        (default off), ``name`` (the NBD export name, default the node name), ``description``,
        ``bitmaps`` (names, or ``{node, name}``, offered as ``qemu:dirty-bitmap:NAME`` contexts and busy
        while exported), ``allocation-depth`` (offer ``qemu:allocation-depth``).  Anything else is
        refused.  BlockError with QEMU's messages, checked in QEMU's order.
        """
        opts = Options(options)
        opts.get_enum("type", ("nbd",))
        export_id = opts.get_str("id")
        node_name = opts.get_str("node-name")
        writable = opts.get_bool("writable", False)
        name = opts.get_str("name", None)
        description = opts.get_str("description", "")
        bitmap_items = opts.raw("bitmaps", [])
        if not isinstance(bitmap_items, list):
            raise BlockError("Invalid parameter type for 'bitmaps', expected: array")
        depth = opts.get_bool("allocation-depth", False)
        opts.finish()
        if not is_wellformed_id(export_id):
            raise BlockError("Invalid block export id")
        if export_id in self.exports:
            raise BlockError(f"Block export id '{export_id}' is already in use")
        if self.graph.find(node_name) is None:
            raise BlockError(f"Cannot find device='' nor node-name='{node_name}'")
        if self.nbd is None:
            raise BlockError("NBD server not running")
        if name is None:
            name = node_name
        if name in self.nbd.exports:
            raise BlockError(f"NBD server already has export named '{name}'")
        bitmaps = export_bitmaps(self.graph, self.graph.get(node_name), bitmap_items, writable=writable)
        contexts = bitmap_contexts(bitmaps)
        if depth:
            contexts[ALLOCATION_DEPTH] = allocation_depth
        self.nbd.add_export(name, node_name, writable=writable, description=description, contexts=contexts)
        for bm in bitmaps:
            bm.busy = True
        export = BlockExport(export_id, node_name, name, bitmaps=bitmaps)
        self.exports[export_id] = export
        log.info("export '%s': node '%s' as NBD export '%s'", export_id, node_name, name)
        return export

    async def block_export_del(self, export_id: str, mode: Literal["safe", "hard"] = "safe") -> None:
        """``block-export-del``: remove an export.

        ``safe`` refuses while clients are connected; ``hard`` disconnects them.  Emits
        ``BLOCK_EXPORT_DELETED`` once the export is gone.
        """
        export = self.exports.get(export_id)
        if export is None:
            raise BlockError(f"Export '{export_id}' is not found")
        if export.shutting_down:
            raise BlockError(f"Export '{export_id}' is already shutting down")
        assert self.nbd is not None  # exports exist only while the server runs
        nbd_export = self.nbd.exports.get(export.name)
        if mode == "safe" and nbd_export is not None and nbd_export.connections:
            raise BlockError(f"export '{export_id}' still in use")
        export.shutting_down = True
        try:
            if nbd_export is not None:
                await self.nbd.remove_export(export.name, hard=True)
        finally:
            del self.exports[export_id]
            for bm in export.bitmaps:
                bm.busy = False
            self.jobs.events.emit(Event(BLOCK_EXPORT_DELETED, {"id": export_id}))

    def query_block_exports(self) -> list[dict[str, Any]]:
        """``query-block-exports``: every export, in creation order."""
        return [export.info() for export in self.exports.values()]

    async def close(self) -> None:
        """Stop the NBD server (dropping its exports), cancel every job, then flush and close every node.

        Safe to call twice.
        """
        try:
            if self.nbd is not None:
                await self.nbd_server_stop()
        finally:
            await self.jobs.cancel_all()
            await self.graph.close_all()


# ---------------------------------------------------------------------------------- socket addresses

_Where = tuple[Literal["unix"], str, None] | tuple[Literal["inet"], str, str]


def _socket_address(addr: Mapping[str, Any]) -> _Where:
    """Check a QEMU SocketAddress (``unix`` or ``inet``) and return ``(type, path or host, port)``."""
    if not isinstance(addr, Mapping):
        raise BlockError("Invalid parameter type for 'addr', expected: object")
    opts = Options(addr, prefix="addr.")
    kind = opts.get_str("type")
    if kind == "unix":
        path = opts.get_str("path")
        opts.finish()
        return ("unix", path, None)
    if kind == "inet":
        host = opts.get_str("host")
        port = opts.raw("port")
        if isinstance(port, bool) or not isinstance(port, str | int):
            raise BlockError("Invalid parameter type for 'addr.port', expected: string")
        opts.finish()
        return ("inet", host, str(port))
    # QEMU names the member without its path here.
    raise BlockError(f"Parameter 'type' does not accept value '{kind}'")


def _port_number(host: str, port: str) -> int:
    if port.isdigit():
        number = int(port)
        if number <= 65535:
            return number
    try:
        return socket.getservbyname(port, "tcp")
    except OSError:
        raise BlockError(
            f"address resolution failed for {host}:{port}: Servname not supported for ai_socktype"
        ) from None


def _describe(where: _Where) -> str:
    return where[1] if where[0] == "unix" else f"{where[1]}:{where[2]}"
