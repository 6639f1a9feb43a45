"""NBD server and block export commands (QEMU's qapi/block-export.json).

``nbd-server-start``, ``nbd-server-stop``, ``block-export-add``, ``block-export-del`` and
``query-block-exports``.  Handlers check the JSON types (QMP is typed, unlike the command line) and leave
the rest to :class:`~cowbackup.daemon.Daemon`, whose ``BlockError`` becomes ``GenericError``.

``tls-creds`` names a ``tls-creds-x509`` object (:mod:`cowbackup.block.objects`), as in QEMU, or a
credentials directory.  Differences from QEMU, all refusals rather than silent changes: ``tls-authz``,
export types other than ``nbd`` and export options beyond those
:meth:`~cowbackup.daemon.Daemon.block_export_add` lists are refused.
"""

from __future__ import annotations

from typing import Any

from cowbackup.qmp.commands import (
    QMPContext,
    arg_bool,
    arg_enum,
    arg_int,
    arg_obj,
    arg_str,
    command,
    no_extra,
)

_EXPORT_STR_MEMBERS = ("id", "node-name", "name", "description")


@command("nbd-server-start")
async def nbd_server_start(ctx: QMPContext, args: dict[str, Any]) -> Any:
    addr = arg_obj(args, "addr")
    arg_str(addr, "type", prefix="addr")
    if isinstance(addr.get("data"), dict) and set(addr) == {"type", "data"}:
        # QEMU's QMP form (SocketAddressLegacy: {"type", "data": {...}}); the flat form is qsd's
        # --nbd-server's, which we accept here too.
        addr = {"type": addr["type"], **addr["data"]}
    for key in ("path", "host", "port"):  # QEMU's InetSocketAddress port is a string
        arg_str(addr, key, None, prefix="addr")
    tls_creds = arg_str(args, "tls-creds", None)
    max_connections = arg_int(args, "max-connections", 0)
    no_extra(args, {"addr", "tls-creds", "max-connections"})
    await ctx.daemon.nbd_server_start(addr, tls_creds, max_connections)
    return {}


@command("nbd-server-stop")
async def nbd_server_stop(ctx: QMPContext, args: dict[str, Any]) -> Any:
    no_extra(args, set())
    await ctx.daemon.nbd_server_stop()
    return {}


@command("block-export-add")
async def block_export_add(ctx: QMPContext, args: dict[str, Any]) -> Any:
    arg_str(args, "type")
    for key in _EXPORT_STR_MEMBERS:
        arg_str(args, key, None)
    arg_bool(args, "writable", False)
    await ctx.daemon.block_export_add(args)
    return {}


@command("block-export-del")
async def block_export_del(ctx: QMPContext, args: dict[str, Any]) -> Any:
    export_id = arg_str(args, "id")
    mode = arg_enum(args, "mode", ("safe", "hard"), "safe")
    no_extra(args, {"id", "mode"})
    await ctx.daemon.block_export_del(export_id, mode)
    return {}


@command("query-block-exports")
async def query_block_exports(ctx: QMPContext, args: dict[str, Any]) -> Any:
    no_extra(args, set())
    return ctx.daemon.query_block_exports()
