"""Monitor control commands (qapi/control.json, qapi/misc.json): negotiation, version, commands, quit."""

from __future__ import annotations

from typing import Any

from cowbackup.qmp.commands import COMMANDS, QMPContext, QMPError, arg_list, command, no_extra

# QMPCapability: the only capability QEMU offers.
_CAPABILITIES = ("oob",)


@command("qmp_capabilities", allow_before_caps=True)
async def qmp_capabilities(ctx: QMPContext, args: dict[str, Any]) -> Any:
    """Leave capability negotiation mode, enabling the listed capabilities (``enable``: ["oob"])."""
    no_extra(args, {"enable"})
    enable = arg_list(args, "enable", [])
    for cap in enable:
        if not isinstance(cap, str):
            raise QMPError("Invalid parameter type for 'enable[0]', expected: string")
        if cap not in _CAPABILITIES:
            # QEMU's exact (odd) message: the list element has no name in the input visitor.
            raise QMPError(f"Parameter 'null' does not accept value '{cap}'")
    session = ctx.session
    if getattr(session, "negotiated", True):
        raise QMPError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
    session.negotiate("oob" in enable)  # type: ignore[attr-defined]
    return {}


@command("query-version", allow_oob=False)
async def query_version(ctx: QMPContext, args: dict[str, Any]) -> Any:
    from cowbackup.qmp.server import version_info  # the server owns the version it announces

    no_extra(args, ())
    return version_info()


@command("query-commands")
async def query_commands(ctx: QMPContext, args: dict[str, Any]) -> Any:
    no_extra(args, ())
    return [{"name": name} for name in COMMANDS]


@command("quit")
async def quit_(ctx: QMPContext, args: dict[str, Any]) -> Any:
    """Stop the daemon: the reply is sent first, then the server's shutdown is requested."""
    no_extra(args, ())
    shutdown = getattr(ctx.server, "request_shutdown", None)
    after_reply = getattr(ctx.session, "after_reply", None)
    if shutdown is None:
        raise QMPError("quit is not supported by this monitor")
    if after_reply is not None:
        after_reply(shutdown)
    else:
        shutdown()
    return {}
