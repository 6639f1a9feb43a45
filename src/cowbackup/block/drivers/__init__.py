"""Driver registry: maps QEMU driver names to the coroutine that opens a node of that driver.

Every driver module has ``async def open_node(graph, node_name, opts) -> BlockNode``: it consumes the
options it knows from ``opts`` (an :class:`~cowbackup.block.options.Options`); :func:`open_node` below then
refuses any left over.  Children given by name are looked up in the graph; children given inline as
objects are opened first and marked implicit, so they disappear with their parent (as in QEMU).

The options every node has, whatever its driver (QEMU's BlockdevOptionsBase), are taken out here before
the driver runs, and handed to it as ``opts.base`` (:class:`~cowbackup.block.options.BaseOptions`):

==================  =====================================================================================
``read-only``       the node refuses writes (a ``file`` opens ``O_RDONLY``, a qcow2 never writes its image)
``auto-read-only``  a ``file`` that cannot be opened read-write (EACCES, EPERM, EROFS) opens read-only
``force-share``     accepted on read-only nodes (refused otherwise, as QEMU); no effect: we take no
                    QEMU-style image locks to share
``discard``         ``ignore`` (default): a discard sent to the node succeeds at once and changes nothing,
                    nor marks a dirty bitmap; ``unmap``: the driver executes it (block/io.c's
                    bdrv_co_pdiscard).  Inline children default to ``unmap``: their parent filters first.
``cache.direct``    ``O_DIRECT`` for a ``file``; other drivers pass it on to their inline children
``cache.no-flush``  flush does nothing on a ``file``; other drivers pass it on to their inline children
``detect-zeroes``   ``off`` (default), ``on``, ``unmap`` (needs ``discard=unmap``): all-zero writes become
                    write-zeroes, with ``unmap`` allowed to deallocate
==================  =====================================================================================

An inline child inherits ``cache.*``, ``force-share``, ``read-only`` and ``auto-read-only`` from its
parent unless it sets them (a backing file is read-only by default), and ``discard`` defaults to
``unmap`` for it (QEMU's bdrv_inherited_options).  A child given by name keeps its own options.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cowbackup.block.errors import BlockError
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode
from cowbackup.block.options import Options, inherit, parse_base

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
    # The options of every node (QEMU's BlockdevOptionsBase), taken out and checked before the driver
    # sees the rest; drivers read them from ``opts.base``.
    base = opts.base = parse_base(opts)
    node = await _opener(driver)(graph, name, opts)
    try:
        opts.finish()
    except BlockError:
        await graph.abandon(node)
        raise
    node.read_only = node.read_only or base.read_only
    node.detect_zeroes = base.detect_zeroes
    if node.discard_option_applies:
        node.discard_unmap = base.discard_unmap
    node.cache_direct = base.cache_direct
    node.cache_no_flush = base.cache_no_flush
    node.implicit = implicit
    graph.add(node)
    return node


async def open_child(
    graph: BlockGraph, opts: Options, key: str, default: Any = ..., *, cow: bool = False
) -> BlockNode | None:
    """Resolve the child option ``key`` (node name or inline object) to a node.

    Returns None when the option is absent and ``default`` is None; raises BlockError when it is required.
    An inline child inherits the parent's options as in QEMU (:func:`~cowbackup.block.options.inherit`);
    ``cow`` for a backing file.
    """
    ref = opts.get_ref(key, default) if default is not ... else opts.get_ref(key)
    if ref is None:
        return None
    if isinstance(ref, str):
        return graph.get(ref)
    return await open_node(graph, inherit(opts.base, ref, cow=cow), implicit=True)
