"""The NBD server: listening sockets, the exports they serve, and the connections to them.

An :class:`Export` maps an export name to a node of the block graph through a
:class:`~cowbackup.block.graph.Root` edge, so when a backup inserts its copy-before-write filter above the
node, the export's writes pass through the filter at once.  One :class:`NBDServer` serves any number of
exports on any number of Unix and TCP sockets to up to ``max_connections`` clients (QEMU's default 100;
more are refused at accept).

Shutdown (:meth:`NBDServer.close`) stops listening, stops every connection from taking new requests, lets
the requests in flight finish and answers them, then closes the sockets.

``CAN_MULTI_CONN`` is advertised for every export: all connections reach the same node, with no cache of
their own, and a flush on any connection flushes the node -- the consistency the flag promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

from cowbackup.block.errors import BlockError
from cowbackup.block.graph import BlockGraph, Root
from cowbackup.block.node import BlockNode
from cowbackup.nbd.connection import ServerConnection
from cowbackup.nbd.constants import (
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_CACHE,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
)
from cowbackup.nbd.exports import DEFAULT_MAX_PAYLOAD, ExportInfo
from cowbackup.nbd.handlers import ContextStatus, base_allocation
from cowbackup.nbd.meta import MetaContextRegistry, exact_names
from cowbackup.nbd.server import TLSMode

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


@dataclass(eq=False)
class Export:
    """One export: a name, the node behind it (through ``root``), and its connections.

    ``contexts`` maps metadata context names beyond ``base:allocation`` to their block-status function
    (``qemu:dirty-bitmap:NAME`` and the like plug in here).
    """

    name: str
    root: Root
    writable: bool = False
    description: str = ""
    contexts: dict[str, ContextStatus] = field(default_factory=dict)
    connections: set[ServerConnection] = field(default_factory=set)

    @property
    def node(self) -> BlockNode:
        return self.root.node

    def info(self) -> ExportInfo:
        node = self.node
        flags = NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_CACHE
        if self.writable:
            flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO
        else:
            flags |= NBD_FLAG_READ_ONLY
        registry = MetaContextRegistry.base()
        qemu_names = [n for n in self.contexts if n.startswith("qemu:")]
        if qemu_names:
            registry.register("qemu", exact_names(lambda: qemu_names))
        preferred = max(4096, node.limits.cluster_size, node.limits.request_alignment)
        return ExportInfo(
            name=self.name,
            size=node.size,
            flags=flags,
            description=self.description,
            min_block_size=1,
            preferred_block_size=preferred,
            max_block_size=DEFAULT_MAX_PAYLOAD,
            meta_contexts=registry,
        )

    def context_status(self, name: str) -> ContextStatus:
        if name == "base:allocation":
            return base_allocation
        return self.contexts[name]


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by an earlier run; never anything that is not a socket."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


class NBDServer:
    """Serves the exports of one block graph over NBD.  Create and use it inside the event loop."""

    def __init__(
        self,
        graph: BlockGraph,
        *,
        tls_creds: ssl.SSLContext | None = None,
        tls_mode: TLSMode | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        self.graph = graph
        self.ssl_context = tls_creds
        #: With credentials TLS is required (as qemu-storage-daemon with tls-creds); without, it is off.
        self.tls_mode: TLSMode = tls_mode or ("required" if tls_creds is not None else "off")
        if self.tls_mode != "off" and tls_creds is None:
            raise BlockError("TLS needs credentials")
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.exports: dict[str, Export] = {}
        self._servers: list[asyncio.Server] = []
        self._connections: dict[ServerConnection, asyncio.Task[None]] = {}
        self._unix_paths: list[str] = []
        self.addresses: list[str] = []

    # ------------------------------------------------------------------ exports

    def add_export(
        self,
        name: str,
        node_name: str,
        *,
        writable: bool = False,
        description: str = "",
        contexts: Mapping[str, ContextStatus] | None = None,
    ) -> Export:
        """Export node ``node_name`` as ``name``.  BlockError if the name is taken or the node unknown.

        ``contexts``: metadata contexts offered next to ``base:allocation`` (see
        :mod:`cowbackup.nbd.contexts`), by name.
        """
        if name in self.exports:
            raise BlockError(f"Block export id '{name}' is already in use")
        node = self.graph.get(node_name)
        if writable and node.read_only:
            raise BlockError(f"Cannot export node '{node_name}' writable: it is read-only")
        root = Root(f"export '{name}'")
        self.graph.attach(root, "root", node)
        export = Export(name, root, writable=writable, description=description, contexts=dict(contexts or {}))
        try:
            export.info()  # validates name and description as NBD strings
        except ValueError as err:
            if root.child is not None:
                self.graph.detach(root.child)
            raise BlockError(str(err)) from None
        self.exports[name] = export
        return export

    async def remove_export(self, name: str, *, hard: bool = False) -> None:
        """Remove an export.  With connections open it is refused, unless ``hard`` drops them."""
        export = self.exports.get(name)
        if export is None:
            raise BlockError(f"Export '{name}' is not found")
        if export.connections and not hard:
            raise BlockError(f"export '{name}' still in use")
        del self.exports[name]
        await self._stop_connections(list(export.connections))
        if export.root.child is not None:
            self.graph.detach(export.root.child)

    def lookup_info(self, name: str) -> ExportInfo | None:
        export = self.exports.get(name)
        return export.info() if export is not None else None

    def list_infos(self) -> list[ExportInfo]:
        return [export.info() for export in self.exports.values()]

    # ------------------------------------------------------------------ sockets

    async def listen_unix(self, path: str) -> str:
        """Listen on a Unix socket (replacing a stale socket file) and return its path."""
        _remove_stale_socket(path)
        server = await asyncio.start_unix_server(self._accept, path=path)
        self._servers.append(server)
        self._unix_paths.append(path)
        self.addresses.append(path)
        return path

    async def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        """Listen on TCP; port 0 picks a free one.  Returns the bound (host, port)."""
        server = await asyncio.start_server(self._accept, host=host, port=port, reuse_address=True)
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        self.addresses.append(f"{bound[0]}:{bound[1]}")
        return str(bound[0]), int(bound[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or "unix"
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        if len(self._connections) >= self.max_connections:
            log.warning("refusing connection from %s: %d connections open", peer_text, self.max_connections)
            writer.close()
            return
        conn = ServerConnection(self, reader, writer, peer_text)
        task = asyncio.current_task()
        assert task is not None
        self._connections[conn] = task
        try:
            await conn.run()
        finally:
            self._connections.pop(conn, None)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def _stop_connections(self, conns: list[ServerConnection]) -> None:
        tasks = []
        for conn in conns:
            task = self._connections.get(conn)
            if task is not None:
                tasks.append(task)
                if conn.stop():
                    task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def close(self) -> None:
        """Stop listening, finish the requests in flight, close every connection and export."""
        for server in self._servers:
            server.close()
        await self._stop_connections(list(self._connections))
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unix_paths.clear()
        for name in list(self.exports):
            await self.remove_export(name, hard=True)
