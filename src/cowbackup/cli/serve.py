"""``cowbackup serve IMAGE``: serve a disk over NBD until Ctrl-C.

Prints the NBD URI to connect to (``nbd+unix:///NAME?socket=PATH`` or ``nbd://HOST:PORT/NAME``), so
``qemu-io``, ``qemu-img``, ``nbdinfo``, ``nbdcopy`` or the kernel's ``nbd-client`` can use it at once.
Writable unless ``--read-only``; discards and zero writes that allow it deallocate (``discard=unmap``), so
the image keeps its holes.  ``--tls-creds DIR`` (QEMU's x509 layout) makes TLS mandatory.
``--qmp PATH`` also opens a QMP monitor on PATH, where the disk is the node ``disk``: back it up while it is
served with ``cowbackup backup --qmp PATH disk TARGET``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import stat
import sys
from typing import Any

from cowbackup.cli.errors import EXIT_OK, UsageError
from cowbackup.daemon import Daemon
from cowbackup.nbd.contexts import ALLOCATION_DEPTH, allocation_depth
from cowbackup.nbd.listener import NBDServer
from cowbackup.nbd.tls import TLSError, server_context
from cowbackup.nbd.uri import NBD_DEFAULT_PORT, NBDAddress
from cowbackup.qmp.server import QMPServer


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a disk image over NBD", description=__doc__)
    p.add_argument("image", metavar="IMAGE", help="raw image file or block device")
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
    if not os.path.exists(args.image):
        raise UsageError(f"image '{args.image}' does not exist")
    if args.socket:
        args.socket = os.path.abspath(args.socket)
    if args.qmp:
        args.qmp = os.path.abspath(args.qmp)
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    daemon = Daemon()
    driver = "host_device" if stat.S_ISBLK(os.stat(args.image).st_mode) else "file"
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
        # The file node itself: a raw image needs no format layer, and every layer costs per request.
        # discard=unmap: TRIM and WRITE_ZEROES without NO_HOLE punch holes, so a sparse image copied into
        # the export (nbdcopy, qemu-img convert -n) stays sparse on our side too.
        await daemon.blockdev_add(
            {
                "driver": driver,
                "node-name": "disk",
                "filename": args.image,
                "read-only": args.read_only,
                "discard": "unmap",
            }
        )
        contexts = {ALLOCATION_DEPTH: allocation_depth} if args.allocation_depth else {}
        server.add_export(args.name, "disk", writable=not args.read_only, contexts=contexts)
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
        sys.stderr.write(
            f"cowbackup: serving '{args.image}'{' read-only' if args.read_only else ''}; Ctrl-C stops\n"
        )
        await stop.wait()
    finally:
        try:
            if qmp is not None:
                await qmp.close()
        finally:
            await server.close()
            await daemon.close()
    return EXIT_OK
