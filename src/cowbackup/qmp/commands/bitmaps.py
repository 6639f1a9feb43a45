"""Dirty-bitmap commands (qapi/block-core.json; QEMU's block/monitor/bitmap-qmp-cmds.c).

``block-dirty-bitmap-add``, ``-remove``, ``-clear``, ``-enable``, ``-disable``, ``-merge`` and
``x-debug-block-dirty-bitmap-sha256``. The checks run in QEMU's order with QEMU's messages (all
``GenericError``)::

    add       name non-empty -> node exists -> granularity (power of 2, >= 512) -> persistent
              storable -> name unique -> name <= 1023 bytes
    others    node exists ("Node 'x' not found") -> bitmap exists ("Dirty bitmap 'x' not found")
              -> state: remove refuses busy/readonly; clear and merge's target refuse
              busy/readonly/inconsistent; enable, disable and merge's sources refuse busy/inconsistent

The ``*_prepare`` functions do the work and return an :class:`Undo`, so that ``transaction`` runs the
same code and can roll an action back (QEMU's block-dirty-bitmap-* transaction actions); a plain
command commits at once. Adding or removing a persistent bitmap then writes the node's store (the
qcow2 image, a raw image's sidecar): a plain command before it commits, so that a storage error
refuses it; a transaction after every action committed (:func:`store_all`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cowbackup.block.dirty_bitmaps import (
    MIN_GRANULARITY,
    BitmapCheck,
    BitmapError,
    NodeBitmaps,
    default_granularity,
    lookup_bitmap,
)
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode
from cowbackup.qmp.commands import (
    QMPContext,
    QMPError,
    arg_bool,
    arg_list,
    arg_str,
    command,
    no_extra,
)

log = logging.getLogger(__name__)

UINT32_MAX = 2**32 - 1


def _nothing() -> None:
    return None


@dataclass
class Undo:
    """How to finish a prepared bitmap action: ``commit`` makes it final, ``abort`` undoes it.

    Both are synchronous, so that a transaction changes every bitmap in one step of the event loop.
    ``store``: the bitmaps of the node whose persistent bitmaps must then be written to their store
    (``NodeBitmaps.save``, I/O that yields), or None.
    """

    commit: Callable[[], None] = _nothing
    abort: Callable[[], None] = _nothing
    store: NodeBitmaps | None = None


# ---------------------------------------------------------------------------------------- arguments


@dataclass(frozen=True)
class BitmapAddArgs:
    """QEMU's BlockDirtyBitmapAdd."""

    node: str
    name: str
    granularity: int | None = None
    persistent: bool = False
    disabled: bool = False


@dataclass(frozen=True)
class BitmapRef:
    """QEMU's BlockDirtyBitmap: a bitmap named on a node."""

    node: str
    name: str


@dataclass(frozen=True)
class BitmapMergeArgs:
    """QEMU's BlockDirtyBitmapMerge; a source given as a plain name is on ``node``."""

    node: str
    target: str
    bitmaps: tuple[BitmapRef, ...]


def _arg_uint32(args: dict[str, Any], key: str, prefix: str) -> int | None:
    """An optional uint32 member, with QEMU's words: a non-number "expects uint64" (QEMU reads a
    uint64, then narrows it), a number outside 0..2**32-1 -- negative ones too -- "expects uint32_t"."""
    if key not in args:
        return None
    value = args[key]
    name = f"{prefix}.{key}" if prefix else key
    if isinstance(value, bool) or not isinstance(value, int):
        raise QMPError(f"Parameter '{name}' expects uint64")
    if not 0 <= value <= UINT32_MAX:
        raise QMPError(f"Parameter '{name}' expects uint32_t")
    return value


def parse_add(args: dict[str, Any], prefix: str = "") -> BitmapAddArgs:
    """Check block-dirty-bitmap-add's arguments (members in schema order, then unknown ones)."""
    node = arg_str(args, "node", prefix=prefix)
    name = arg_str(args, "name", prefix=prefix)
    granularity = _arg_uint32(args, "granularity", prefix)
    persistent = arg_bool(args, "persistent", False, prefix=prefix)
    disabled = arg_bool(args, "disabled", False, prefix=prefix)
    no_extra(args, ("node", "name", "granularity", "persistent", "disabled"), prefix=prefix)
    return BitmapAddArgs(node, name, granularity, persistent, disabled)


def parse_ref(args: dict[str, Any], prefix: str = "") -> BitmapRef:
    """Check a BlockDirtyBitmap argument object (``node``, ``name``)."""
    ref = BitmapRef(arg_str(args, "node", prefix=prefix), arg_str(args, "name", prefix=prefix))
    no_extra(args, ("node", "name"), prefix=prefix)
    return ref


def parse_merge(args: dict[str, Any], prefix: str = "") -> BitmapMergeArgs:
    """Check block-dirty-bitmap-merge's arguments; ``bitmaps`` items are names or ``{node, name}``."""
    node = arg_str(args, "node", prefix=prefix)
    target = arg_str(args, "target", prefix=prefix)
    items = arg_list(args, "bitmaps", prefix=prefix)
    sources: list[BitmapRef] = []
    for n, item in enumerate(items):
        path = f"{prefix}.bitmaps[{n}]" if prefix else f"bitmaps[{n}]"
        if isinstance(item, str):
            sources.append(BitmapRef(node, item))
        elif isinstance(item, dict):
            sources.append(parse_ref(item, path))
        else:
            # QEMU 7.2's input visitor names an alternate inside a list 'null'.
            raise QMPError("Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr")
    no_extra(args, ("node", "target", "bitmaps"), prefix=prefix)
    return BitmapMergeArgs(node, target, tuple(sources))


# ---------------------------------------------------------------------------------------- operations


def add_prepare(graph: BlockGraph, a: BitmapAddArgs) -> Undo:
    """Create the bitmap; abort releases it."""
    if not a.name:
        raise BitmapError("Bitmap name cannot be empty")
    node: BlockNode = graph.get(a.node)
    if a.granularity is None:
        granularity = default_granularity(node)
    else:
        granularity = a.granularity
        if granularity < MIN_GRANULARITY or granularity & (granularity - 1):
            raise BitmapError("Granularity must be power of 2 and at least 512")
    if a.persistent:
        node.dirty_bitmaps.can_store_new(a.name, granularity)
    bm = node.dirty_bitmaps.create(a.name, granularity)
    if a.disabled:
        bm.disable()
    bm.persistent = a.persistent

    def abort() -> None:
        if bm.attached and bm.successor is None:
            bm.owner.release(bm)

    # Stored at once, marked in use: a crash from now on leaves it inconsistent, not lost.
    return Undo(abort=abort, store=bm.owner if a.persistent else None)


def remove_prepare(graph: BlockGraph, ref: BitmapRef) -> Undo:
    """Mark the bitmap busy (so nothing else takes it) until commit releases it or abort frees it.

    A persistent bitmap leaves its store after the commit (``store``); the plain command removes it
    from the store before it commits instead, as QEMU does, so that a storage error refuses it.
    """
    bm = lookup_bitmap(graph, ref.node, ref.name)
    bm.check(BitmapCheck.BUSY | BitmapCheck.RO)
    bm.busy = True

    def commit() -> None:
        bm.busy = False
        bm.owner.release(bm)

    def abort() -> None:
        bm.busy = False

    return Undo(commit=commit, abort=abort, store=bm.owner if bm.persistent else None)


def clear_prepare(graph: BlockGraph, ref: BitmapRef) -> Undo:
    """Clear every bit; abort restores them."""
    bm = lookup_bitmap(graph, ref.node, ref.name)
    bm.check(BitmapCheck.DEFAULT)
    old = bm.clear()
    return Undo(abort=lambda: bm.restore(old))


def enable_prepare(graph: BlockGraph, ref: BitmapRef, enable: bool) -> Undo:
    """Start (``enable``) or stop recording; abort puts the previous state back."""
    bm = lookup_bitmap(graph, ref.node, ref.name)
    bm.check(BitmapCheck.ALLOW_RO)
    was_disabled = bm.disabled
    bm.disabled = not enable

    def abort() -> None:
        bm.disabled = was_disabled

    return Undo(abort=abort)


def merge_prepare(graph: BlockGraph, a: BitmapMergeArgs) -> Undo:
    """OR every source into the target; on any error the target is unchanged. Abort restores it.

    As QEMU, the sources are first merged into a scratch bitmap of the target's granularity, so a
    failing source leaves the target as it was.
    """
    dst = lookup_bitmap(graph, a.node, a.target)
    dst.check(BitmapCheck.DEFAULT)
    scratch = dst.owner.create(None, dst.granularity)
    try:
        for ref in a.bitmaps:
            if ref.node == a.node:
                src = dst.owner.find(ref.name)
                if src is None:
                    raise BitmapError(f"Dirty bitmap '{ref.name}' not found")
            else:
                src = lookup_bitmap(graph, ref.node, ref.name)
            src.check(BitmapCheck.ALLOW_RO)
            scratch.merge_from(src)
        dst.check(BitmapCheck.DEFAULT)
        old = dst.merge_from(scratch)
    finally:
        dst.owner.release(scratch)
    return Undo(abort=lambda: dst.restore(old))


# ---------------------------------------------------------------------------------------- commands


async def _commit(undo: Undo) -> dict[str, Any]:
    """Finish a plain command's action: store first (a storage error undoes the action and is the
    command's error), then commit. Not for remove, whose store step needs the commit first."""
    if undo.store is not None:
        try:
            await undo.store.save()
        except BaseException:
            undo.abort()
            raise
    undo.commit()
    return {}


async def store_all(undos: list[Undo]) -> None:
    """Run the ``store`` step of committed actions (a transaction's), each node's store once.

    Errors are logged, not raised: the actions are committed, and a store that failed still says "in
    use" (a crash makes its bitmaps inconsistent, never wrong); the next clean close stores them.
    """
    done: list[NodeBitmaps] = []
    for undo in undos:
        if undo.store is None or any(undo.store is seen for seen in done):
            continue
        done.append(undo.store)
        try:
            await undo.store.save()
        except BitmapError as err:
            log.error("could not store the persistent bitmaps of '%s': %s", undo.store.node.node_name, err)


@command("block-dirty-bitmap-add")
async def block_dirty_bitmap_add(ctx: QMPContext, args: dict[str, Any]) -> Any:
    return await _commit(add_prepare(ctx.daemon.graph, parse_add(args)))


@command("block-dirty-bitmap-remove")
async def block_dirty_bitmap_remove(ctx: QMPContext, args: dict[str, Any]) -> Any:
    ref = parse_ref(args)
    graph = ctx.daemon.graph
    undo = remove_prepare(graph, ref)
    bm = lookup_bitmap(graph, ref.node, ref.name)
    if bm.persistent:
        # Out of the store first (QEMU's order): if that fails, the bitmap stays as it was.
        try:
            await bm.owner.remove_stored(ref.name)
        except BaseException:
            undo.abort()
            raise
    undo.commit()
    return {}


@command("block-dirty-bitmap-clear")
async def block_dirty_bitmap_clear(ctx: QMPContext, args: dict[str, Any]) -> Any:
    return await _commit(clear_prepare(ctx.daemon.graph, parse_ref(args)))


@command("block-dirty-bitmap-enable")
async def block_dirty_bitmap_enable(ctx: QMPContext, args: dict[str, Any]) -> Any:
    return await _commit(enable_prepare(ctx.daemon.graph, parse_ref(args), True))


@command("block-dirty-bitmap-disable")
async def block_dirty_bitmap_disable(ctx: QMPContext, args: dict[str, Any]) -> Any:
    return await _commit(enable_prepare(ctx.daemon.graph, parse_ref(args), False))


@command("block-dirty-bitmap-merge")
async def block_dirty_bitmap_merge(ctx: QMPContext, args: dict[str, Any]) -> Any:
    return await _commit(merge_prepare(ctx.daemon.graph, parse_merge(args)))


@command("x-debug-block-dirty-bitmap-sha256")
async def x_debug_block_dirty_bitmap_sha256(ctx: QMPContext, args: dict[str, Any]) -> Any:
    ref = parse_ref(args)
    return {"sha256": lookup_bitmap(ctx.daemon.graph, ref.node, ref.name).sha256()}
