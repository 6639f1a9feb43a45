"""``nbd``: an export of a remote NBD server (QEMU's block/nbd.c), over one :class:`NBDClient` connection.

Options (QEMU's ``BlockdevOptionsNbd``):

================  ==========================================================================================
``server``        where the server listens, a QEMU ``SocketAddress``: ``{"type": "unix", "path": P}`` or
                  ``{"type": "inet", "host": H, "port": N}`` (the port may be a string, as QEMU sends it).
                  Required.  The ``fd`` and ``vsock`` types and the ``inet`` extras (``numeric``, ``to``,
                  ``ipv4``, ``ipv6``, ``keep-alive``, ...) and ``unix`` extras (``abstract``, ``tight``)
                  are refused.
``export``        the export name (default ``""``, the default export)
``tls-creds``     the id of a ``tls-creds-x509`` object with ``endpoint=client``
                  (:mod:`cowbackup.block.objects`), as in QEMU; or, ours, a directory of x509
                  credentials laid out the same way (``ca-cert.pem``, and ``client-cert.pem`` /
                  ``client-key.pem`` when the server verifies clients).  Turns TLS on.
``tls-hostname``  the name the server's certificate must carry (default: ``server.host`` for ``inet``;
                  no name check for ``unix``), as in QEMU
``read-only``     open read-only.  A read-only export makes the node read-only too (QEMU would refuse to
                  open it read-write unless ``auto-read-only``; cowbackup behaves as with
                  ``auto-read-only``): writes then fail with EPERM.
================  ==========================================================================================

QEMU's ``reconnect-delay``, ``open-timeout`` and ``x-dirty-bitmap`` are not supported (the registry refuses
them as unexpected): a lost connection fails every request with EIO, and there is no reconnection.

Requests map onto NBD commands as QEMU's client maps them:

* the node's size is the export's; ``request_alignment`` is the server's minimum block size,
  ``max_transfer`` and ``max_zeroes`` its maximum block size (at most 32 MiB), ``max_discard`` 2 GiB;
* write-zeroes is NBD_CMD_WRITE_ZEROES when advertised, with NBD_CMD_FLAG_NO_HOLE unless ``MAY_UNMAP`` and
  NBD_CMD_FLAG_FAST_ZERO for ``NO_FALLBACK``; without it, the generic fallback writes zero buffers;
* discard, on a node opened with ``discard=unmap`` (by default it is dropped, as every node drops it), is
  NBD_CMD_TRIM when advertised (else nothing: discard is advisory); flush is NBD_CMD_FLUSH;
* ``FUA`` becomes NBD_CMD_FLAG_FUA when advertised, else a flush after the write;
* block status asks ``base:allocation``: a hole that reads as zeros is ``ZERO``, a hole with unspecified
  contents is neither ``DATA`` nor ``ZERO`` (it is read when copied), anything else is ``DATA``; without
  the context everything is data.  So a backup from an NBD source skips the source's holes.

``known_zero_init`` is False: nobody can tell what a remote export held before we opened it.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from typing import Any

from cowbackup.block.align import align_down, align_up
from cowbackup.block.errors import BlockError
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode, Extent, RequestFlags, Status
from cowbackup.block.options import Options
from cowbackup.nbd.client_conn import ConnectError, NBDClient
from cowbackup.nbd.constants import NBD_STATE_HOLE, NBD_STATE_ZERO
from cowbackup.nbd.uri import NBDAddress, URIError, parse_uri

log = logging.getLogger(__name__)

#: Longest discard handed to the driver (QEMU: INT_MAX aligned down; ours is a power of two).
MAX_DISCARD = 1 << 31
#: Longest read, write or write-zeroes handed to the driver, whatever the server allows.
MAX_TRANSFER = 32 * 1024 * 1024

_UNSUPPORTED = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})


def _status(state: int) -> Status:
    """``base:allocation`` flags -> block status (see the module docstring)."""
    if state & NBD_STATE_HOLE:
        # A hole whose contents are unspecified is still this layer's: read it, never skip it.
        return Status.ZERO if state & NBD_STATE_ZERO else Status.ALLOCATED
    return Status.DATA | Status.ALLOCATED | (Status.ZERO if state & NBD_STATE_ZERO else Status(0))


class NBDNode(BlockNode):
    """A node backed by one NBD connection (``client``, owned by the node and closed with it)."""

    driver_name = "nbd"
    #: A remote export may hold anything: the copy engine must write zeros to it.
    known_zero_init = False

    def __init__(self, node_name: str, client: NBDClient, *, read_only: bool = False) -> None:
        super().__init__(node_name, read_only=read_only or client.read_only)
        self.client = client
        self._size = client.size
        align = client.min_block_size
        self.limits.request_alignment = align
        self.limits.max_transfer = align_down(min(client.max_request, MAX_TRANSFER), align) or align
        self.limits.max_zeroes = self.limits.max_transfer
        self.limits.max_discard = align_down(MAX_DISCARD, align) or align

    def describe(self) -> dict[str, object]:
        return {"file": self.client.name}

    async def _do_read(self, offset: int, buf: memoryview) -> None:
        await self.client.read(offset, buf)

    async def _do_write(self, offset: int, data: memoryview, flags: RequestFlags) -> None:
        fua = bool(flags & RequestFlags.FUA)
        await self.client.write(offset, data, fua=fua and self.client.can_fua)
        if fua and not self.client.can_fua:
            await self._do_flush()

    async def _do_write_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        client = self.client
        no_fallback = bool(flags & RequestFlags.NO_FALLBACK)
        if not client.can_zero or (no_fallback and not client.can_fast_zero):
            await super()._do_write_zeroes(offset, length, flags)  # ENOTSUP under NO_FALLBACK
            return
        fua = bool(flags & RequestFlags.FUA)
        try:
            await client.write_zeroes(
                offset,
                length,
                fua=fua and client.can_fua,
                no_hole=not flags & RequestFlags.MAY_UNMAP,
                fast=no_fallback,
            )
        except OSError as err:
            if no_fallback or err.errno not in _UNSUPPORTED:
                raise
            # The server advertised write-zeroes but cannot do it here: write zero buffers instead.
            await super()._do_write_zeroes(offset, length, flags)
            return
        if fua and not client.can_fua:
            await self._do_flush()

    async def _do_discard(self, offset: int, length: int) -> None:
        if self.client.can_trim:
            await self.client.trim(offset, length)

    async def _do_flush(self) -> None:
        if self.client.can_flush:
            await self.client.flush()

    async def _do_block_status(self, offset: int, length: int) -> Extent:
        """One BLOCK_STATUS query; equal extents of the answer are merged::

        asked           |offset ................................. offset+length|
        answer     |hole,zero |hole,zero  |data         |hole,zero  ...
        returned        |ZERO (merged)    |                                      -> ends at the first change
        """
        client = self.client
        if not client.can_block_status:
            return Extent(offset, length, Status.DATA | Status.ALLOCATED)
        align = self.limits.request_alignment
        start = align_down(offset, align)
        # A conforming server's size is a multiple of its minimum block size; if not, the partial last
        # block cannot be asked about and counts as data.
        span = align_down(min(align_up(offset + length, align), self._size) - start, align)
        if span <= offset - start:
            return Extent(offset, length, Status.DATA | Status.ALLOCATED)
        extents = await client.block_status(start, span)
        pos = start
        first: Status | None = None
        stop = offset
        for ext_length, state in extents:
            flags = _status(state)
            if pos + ext_length <= offset:
                pos += ext_length
                continue
            if first is None:
                first = flags
            elif flags != first:
                break
            pos += ext_length
            stop = pos
        if first is None:
            # The answer ended before ``offset`` (a server answering less than one block): unknown.
            return Extent(
                offset, min(length, align_up(offset + 1, align) - offset), Status.DATA | Status.ALLOCATED
            )
        return Extent(offset, min(stop, offset + length) - offset, first)

    async def _do_close(self) -> None:
        await self.client.close()


# ---------------------------------------------------------------------- options


def _server_address(opts: Options, export: str) -> NBDAddress:
    """The ``server`` option (QEMU's SocketAddress) as an address; BlockError with QEMU's wording."""
    if not opts.has("server"):
        raise BlockError("Parameter 'server' is missing")
    server = opts.get_dict("server")
    kind = server.get_enum("type", ("inet", "unix", "fd", "vsock"))
    if kind == "unix":
        path = server.get_str("path")
        server.finish()
        return NBDAddress(export=export, socket=path)
    if kind != "inet":
        raise BlockError(f"server.type={kind} is not supported; use 'unix' or 'inet'")
    host = server.get_str("host")
    port_value = server.raw("port")
    if isinstance(port_value, int) and not isinstance(port_value, bool):
        port = port_value
    elif isinstance(port_value, str) and port_value.isdigit():
        port = int(port_value)
    else:
        raise BlockError(f"Parameter 'server.port' expects a port number, not '{port_value}'")
    if not 0 < port < 65536:
        raise BlockError(f"Parameter 'server.port' expects a port number, not '{port}'")
    server.finish()
    return NBDAddress(export=export, host=host, port=port)


async def open_node(graph: BlockGraph, node_name: str, opts: Options) -> BlockNode:
    """Connect and open an ``nbd`` node (options in the module docstring).

    BlockError ``Could not connect to '...': reason`` when the server is unreachable, the export unknown,
    TLS required or refused, or the handshake fails.
    """
    export = opts.get_str("export", "")
    tls_ref: str | None = opts.get_str("tls-creds", None)
    tls_hostname: str | None = opts.get_str("tls-hostname", None)
    read_only = opts.base.read_only
    address = _server_address(opts, export)  # QEMU checks the server before the credentials
    if tls_ref is not None:
        creds = graph.objects.tls_creds(tls_ref, "client")
        address = dataclasses.replace(
            address, tls=True, tls_certificates=creds.dir, tls_verify_peer=creds.verify_peer
        )
    try:
        client = await NBDClient.connect(address, tls_hostname=tls_hostname)
    except ConnectError as err:
        raise BlockError(str(err)) from err
    return NBDNode(node_name, client, read_only=read_only)


def nbd_options_from_uri(uri: str) -> dict[str, Any]:
    """``blockdev-add`` options for the NBD URI ``uri`` (``nbd://``, ``nbds://``, ``nbd+unix://``, ...).

    ``?tls-certificates=DIR`` becomes ``tls-creds``; an ``nbds`` URI needs it (cowbackup has no default
    credentials directory).  Raises BlockError for an invalid URI.
    """
    try:
        address = parse_uri(uri)
    except URIError as err:
        raise BlockError(str(err)) from err
    options: dict[str, Any] = {"driver": "nbd", "server": address.server_options(), "export": address.export}
    if address.tls_certificates:
        # A directory: absolute, so that a relative one is never taken for an object id.
        options["tls-creds"] = os.path.abspath(address.tls_certificates)
    elif address.tls:
        raise BlockError(f"'{uri}': TLS needs a credentials directory: add ?tls-certificates=DIR")
    return options
