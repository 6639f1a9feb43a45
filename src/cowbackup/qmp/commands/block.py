"""Block-graph commands (qapi/block-core.json): blockdev-add, blockdev-del, query-named-block-nodes."""

from __future__ import annotations

from typing import Any

from cowbackup.block.node import BlockNode
from cowbackup.qmp.commands import QMPContext, QMPError, arg_bool, arg_str, command, no_extra


@command("blockdev-add")
async def blockdev_add(ctx: QMPContext, args: dict[str, Any]) -> Any:
    """The arguments are the node's options (BlockdevOptions); the drivers validate them."""
    arg_str(args, "driver")
    await ctx.daemon.blockdev_add(args)
    return {}


@command("blockdev-del")
async def blockdev_del(ctx: QMPContext, args: dict[str, Any]) -> Any:
    name = arg_str(args, "node-name")
    no_extra(args, {"node-name"})
    if ctx.daemon.graph.find(name) is None:
        raise QMPError(f"Failed to find node with node-name='{name}'")
    await ctx.daemon.blockdev_del(name)
    return {}


def block_device_info(node: BlockNode) -> dict[str, Any]:
    """QEMU's BlockDeviceInfo for one node, with the fields we can fill truthfully.

    Throttling (``bps``, ``iops``...) and ``write_threshold`` do not exist here: they are 0, as QEMU
    reports them when unset. ``dirty-bitmaps`` lists the node's bitmaps, newest first, anonymous ones
    (a frozen bitmap's successor) without a name. ``cache`` is the node's ``cache.direct`` and
    ``cache.no-flush`` (given or inherited), always writeback, as QEMU reports them.
    """
    described = node.describe()
    filename = str(described.get("file", node.node_name))
    info: dict[str, Any] = {
        "node-name": node.node_name,
        "drv": node.driver_name,
        "file": filename,
        "ro": node.read_only,
        "image": {
            "filename": filename,
            "format": node.driver_name,
            "virtual-size": node.size,
            "dirty-flag": False,
        },
        "backing_file_depth": 0,
        "encrypted": False,
        "detect_zeroes": node.detect_zeroes,
        "cache": {"writeback": True, "direct": node.cache_direct, "no-flush": node.cache_no_flush},
        "write_threshold": 0,
        "bps": 0,
        "bps_rd": 0,
        "bps_wr": 0,
        "iops": 0,
        "iops_rd": 0,
        "iops_wr": 0,
    }
    if len(node.dirty_bitmaps):
        # QEMU leaves the member out when the node has no bitmap.
        info["dirty-bitmaps"] = node.dirty_bitmaps.info()
    return info


@command("query-named-block-nodes")
async def query_named_block_nodes(ctx: QMPContext, args: dict[str, Any]) -> Any:
    """Every named node, newest first as QEMU lists them. ``flat`` is accepted (we never nest)."""
    arg_bool(args, "flat", False)
    no_extra(args, {"flat"})
    return [block_device_info(node) for node in reversed(ctx.daemon.graph.nodes.values())]


@command("query-block")
async def query_block(ctx: QMPContext, args: dict[str, Any]) -> Any:
    """The guest devices' block backends: a storage daemon has none (qemu-storage-daemon says ``[]``
    too; its exports' backends are anonymous).  Nodes are in ``query-named-block-nodes``."""
    no_extra(args, ())
    return []
