"""User-created object commands (qapi/qom.json): ``object-add`` and ``object-del``.

Only ``qom-type: tls-creds-x509`` exists (:mod:`cowbackup.block.objects`); its properties are typed here
as QMP types them, the rest is the registry's, whose BlockError becomes ``GenericError``.
"""

from __future__ import annotations

from typing import Any

from cowbackup.qmp.commands import QMPContext, arg_bool, arg_str, command, no_extra


@command("object-add")
async def object_add(ctx: QMPContext, args: dict[str, Any]) -> Any:
    for key in ("qom-type", "id", "dir", "endpoint", "priority", "passwordid"):
        arg_str(args, key, None)
    for key in ("verify-peer", "sanity-check", "loaded"):
        arg_bool(args, key, None)
    ctx.daemon.graph.objects.add(args)
    return {}


@command("object-del")
async def object_del(ctx: QMPContext, args: dict[str, Any]) -> Any:
    object_id = arg_str(args, "id")
    no_extra(args, {"id"})
    ctx.daemon.graph.objects.delete(object_id)
    return {}
