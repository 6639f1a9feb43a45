"""Driver registry: maps QEMU driver names to the coroutine that opens a node of that driver.

Every driver module has ``async def open_node(graph, node_name, opts) -> BlockNode``: it consumes the
options it knows from ``opts`` (an :class:`~cowbackup.block.options.Options`); :func:`open_node` below then
refuses any left over.  Children given by name are looked up in the graph; children given inline as
objects are opened first and marked implicit, so they disappear with their parent (as in QEMU).
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cowbackup.block.errors import BlockError
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode
from cowbackup.block.options import Options

Opener = Callable[[BlockGraph, str, Options], Awaitable[BlockNode]]

#: driver name -> module (imported on first use) that defines ``open_node``.
DRIVER_MODULES: dict[str, str] = {
    "file": "cowbackup.block.drivers.file",
    "host_device": "cowbackup.block.drivers.file",
    "raw": "cowbackup.block.drivers.raw",
    "qcow2": "cowbackup.block.drivers.qcow2",
    "null-co": "cowbackup.block.drivers.null",
    "memory": "cowbackup.block.drivers.memory",
    "nbd": "cowbackup.block.drivers.nbd",
    "fault-inject": "cowbackup.block.filters.fault",
    "copy-before-write": "cowbackup.block.filters.cbw",
    "snapshot-access": "cowbackup.block.filters.snapshot_access",
}

_DETECT_ZEROES = ("off", "on", "unmap")


def register_driver(driver: str, module_name: str) -> None:
    """Make ``driver`` open with ``module_name``'s ``open_node``: how a layer above the block layer (the
    repository's target node) offers a driver without the block layer importing it."""
    DRIVER_MODULES.setdefault(driver, module_name)


def _opener(driver: str) -> Opener:
    module_name = DRIVER_MODULES.get(driver)
    if module_name is None:
        raise BlockError(f"Parameter 'driver' does not accept value '{driver}'")
    module = importlib.import_module(module_name)
    opener: Opener = module.open_node
    return opener


async def open_node(graph: BlockGraph, options: Mapping[str, Any], *, implicit: bool = False) -> BlockNode:
    """Open a node from ``blockdev-add``-style options and add it to ``graph``.

    Raises BlockError with QEMU's wording for missing, unknown or invalid options.
    """
    opts = Options(options)
    driver = opts.get_str("driver")
    name = opts.get_str("node-name", None)
    if name is None:
        if not implicit:
            raise BlockError("node-name is required")
        name = graph.auto_name()
    else:
        graph.check_node_name(name)
        if graph.find(name) is not None:
            raise BlockError(f"Duplicate nodes with node-name='{name}'")
    # Common options of every node (QEMU's BlockdevOptionsBase).  "read-only" is left for the driver to
    # consume too (a file opens O_RDONLY); the node is marked read-only here either way.
    read_only = Options({"read-only": opts.peek("read-only", False)}).get_bool("read-only")
    opts.get_bool("auto-read-only", False)
    opts.get_bool("force-share", False)
    detect_zeroes = opts.get_enum("detect-zeroes", _DETECT_ZEROES, "off")
    node = await _opener(driver)(graph, name, opts)
    try:
        opts.discard("read-only")
        opts.finish()
    except BlockError:
        await graph.abandon(node)
        raise
    node.read_only = node.read_only or read_only
    node.detect_zeroes = detect_zeroes
    node.implicit = implicit
    graph.add(node)
    return node


async def open_child(graph: BlockGraph, opts: Options, key: str, default: Any = ...) -> BlockNode | None:
    """Resolve the child option ``key`` (node name or inline object) to a node.

    Returns None when the option is absent and ``default`` is None; raises BlockError when it is required.
    """
    ref = opts.get_ref(key, default) if default is not ... else opts.get_ref(key)
    if ref is None:
        return None
    if isinstance(ref, str):
        return graph.get(ref)
    return await open_node(graph, ref, implicit=True)
