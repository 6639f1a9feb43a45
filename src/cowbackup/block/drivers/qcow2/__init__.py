"""``qcow2``: QEMU's copy-on-write image format (``docs/interop/qcow2.txt``), versions 2 and 3.

Options:

=================  ========================================================================================
``file``           the image file: a node name or an inline node definition (required)
``backing``        a node name or inline definition to use as the backing file, or null for none; when
                   absent the backing file named in the header is opened read-only (relative to the
                   image's directory), with the format from the header's backing format extension, or
                   probed (qcow2 magic, else raw)
``read-only``      open read-only (no refcounts are loaded, nothing is ever written)
``discard``        ``ignore`` (default): discards sent to the node are dropped -- they succeed, change
                   nothing and mark no dirty bitmap, as in QEMU; ``unmap``: the whole clusters of a
                   discard are deallocated (or zero-flagged over a backing file, see ``zeroing``) and the
                   node's bitmaps marked.  Freed host clusters are not discarded in the image file
                   (QEMU's ``pass-discard-request``, on by default with ``unmap``, punches them there:
                   what the image reads is the same)
``l2-cache-size``  bytes of L2 tables kept in memory (default 32 MiB, as QEMU's maximum default)
``compress``       write every whole cluster compressed (like QEMU's ``compress`` filter over qcow2)
others             every node's options (:mod:`cowbackup.block.drivers`).  Inline children inherit them as
                   in QEMU (bdrv_inherited_options): ``read-only``, ``auto-read-only``, ``force-share``,
                   ``cache.*`` unless set; a backing file is read-only by default; ``discard`` defaults to
                   ``unmap``.  ``cache.*`` does nothing on the qcow2 node itself.
=================  ========================================================================================

Other QEMU qcow2 options (``lazy-refcounts``, ``pass-discard-*``, ``overlap-check``, ``cache-size``, ...)
are refused as unexpected.

Opening refuses: encryption, external data files, extended L2 entries, unknown incompatible features.  A
read-write open also refuses images with the corrupt bit (QEMU's rule), with the dirty bit (an image
written with lazy refcounts and not closed: repair it with ``qemu-img check -r all`` first -- we do not
rebuild refcounts), and with internal snapshots (read-only access works).  Metadata found inconsistent
later makes further writes fail with EIO; the file is not modified to mark it.
"""

from __future__ import annotations

import contextvars
import os

from cowbackup.block.drivers import open_child
from cowbackup.block.drivers import open_node as open_any
from cowbackup.block.drivers.qcow2 import bitmap_registry  # noqa: F401  (registers the bitmap store)
from cowbackup.block.drivers.qcow2.bitmaps import StoredBitmap
from cowbackup.block.drivers.qcow2.create import create, create_image
from cowbackup.block.drivers.qcow2.format import (
    HEADER_V2,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    MAX_CLUSTER_BITS,
    QCOW_MAGIC,
    Header,
    InvalidImage,
    parse_header,
)
from cowbackup.block.drivers.qcow2.metadata import CorruptImage, Metadata
from cowbackup.block.drivers.qcow2.node import Qcow2Node
from cowbackup.block.errors import BlockError
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode
from cowbackup.block.options import BaseOptions, Options, inherit

__all__ = [
    "CorruptImage",
    "InvalidImage",
    "Qcow2Node",
    "StoredBitmap",
    "create",
    "create_image",
    "open_node",
    "probe_format",
]

DEFAULT_L2_CACHE = 32 * 1024 * 1024
#: Longest backing chain opened from headers (a loop of backing files would never end otherwise).
MAX_CHAIN = 64
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("qcow2_backing_depth", default=0)


async def probe_format(node: BlockNode) -> str:
    """``qcow2`` when the node starts with the qcow2 magic, else ``raw`` (qemu-img's probing, reduced)."""
    if node.size < 4:
        return "raw"
    magic = bytearray(4)
    await node.read(0, magic)
    return "qcow2" if int.from_bytes(magic, "big") == QCOW_MAGIC else "raw"


async def _load_header(file: BlockNode, read_only: bool) -> Header:
    """Read and check the header; refuse a read-write open of images we must not write."""
    fsize = file.size
    head = bytearray(min(fsize, HEADER_V2.size))
    await file.read(0, head)
    if len(head) >= HEADER_V2.size and int.from_bytes(head[:4], "big") == QCOW_MAGIC:
        bits = int.from_bytes(head[20:24], "big")
        if bits <= MAX_CLUSTER_BITS:
            head = bytearray(min(fsize, 1 << bits))
            await file.read(0, head)
    hdr = parse_header(bytes(head), fsize)
    if not read_only:
        if hdr.incompatible_features & INCOMPAT_CORRUPT:
            raise InvalidImage("qcow2: image is corrupt; cannot be opened read/write")
        if hdr.incompatible_features & INCOMPAT_DIRTY:
            raise InvalidImage(
                "qcow2: image has the dirty bit set (written with lazy refcounts and not closed); "
                "repair it with 'qemu-img check -r all' or open it read-only"
            )
        if hdr.nb_snapshots:
            raise InvalidImage("qcow2: images with internal snapshots can only be opened read-only")
    return hdr


async def _open_backing_from_header(graph: BlockGraph, node: Qcow2Node, base: BaseOptions) -> BlockNode:
    hdr = node.hdr
    assert hdr.backing_file is not None
    path = hdr.backing_file
    if not os.path.isabs(path):
        image = node.file.describe().get("file")
        if isinstance(image, str):
            path = os.path.join(os.path.dirname(image), path)
    if _depth.get() >= MAX_CHAIN:
        raise InvalidImage(f"qcow2: backing chain longer than {MAX_CHAIN} images (a loop?) at '{path}'")
    fmt = hdr.backing_format
    if fmt is not None and fmt not in ("raw", "qcow2"):
        raise InvalidImage(f"qcow2: backing format '{fmt}' of '{path}' is not supported")
    token = _depth.set(_depth.get() + 1)
    try:
        # Opened as QEMU opens the backing child (and its file child): read-only, cache options inherited.
        file_opts = inherit(base, {"driver": "file", "filename": path}, cow=True)
        file = await open_any(graph, file_opts, implicit=True)
        try:
            if fmt is None:
                fmt = await probe_format(file)
            return await open_any(
                graph, inherit(base, {"driver": fmt, "file": file.node_name}, cow=True), implicit=True
            )
        except BaseException:
            if not file.parents:
                await graph.remove(file.node_name)
            raise
    except BlockError as err:
        raise BlockError(f"Could not open backing file: {err}") from err
    finally:
        _depth.reset(token)


async def open_node(graph: BlockGraph, node_name: str, opts: Options) -> BlockNode:
    """Open a ``qcow2`` node (options in the module docstring).  BlockError (InvalidImage) for bad images."""
    read_only = opts.base.read_only
    has_backing = opts.has("backing")
    backing_ref = opts.raw("backing", None)
    if backing_ref is not None and not isinstance(backing_ref, str | dict):
        raise BlockError("Invalid parameter type for 'backing', expected: BlockdevRef or null")
    cache_bytes = opts.get_int("l2-cache-size", DEFAULT_L2_CACHE, minimum=0)
    compress = opts.get_bool("compress", False)
    file = await open_child(graph, opts, "file")
    assert file is not None
    try:
        hdr = await _load_header(file, read_only)
    except BaseException:
        if file.implicit and not file.parents:
            await graph.remove(file.node_name)
        raise
    meta_holder: list[Qcow2Node] = []
    meta = Metadata(hdr, lambda: meta_holder[0].file, max(2, cache_bytes // hdr.cluster_size))
    node = Qcow2Node(node_name, hdr, meta, read_only=read_only, compress=compress)
    meta_holder.append(node)
    graph.attach(node, "file", file)
    try:
        await meta.load_l1()
        if not read_only:
            await meta.load_refcounts()
        await node.bitmap_store.load()
        backing: BlockNode | None = None
        if has_backing:
            if isinstance(backing_ref, str):
                backing = graph.get(backing_ref)
            elif isinstance(backing_ref, dict):
                backing = await open_any(graph, inherit(opts.base, backing_ref, cow=True), implicit=True)
        elif hdr.backing_file:
            backing = await _open_backing_from_header(graph, node, opts.base)
        if backing is not None:
            graph.attach(node, "backing", backing)
    except BaseException:
        await graph.abandon(node)
        raise
    return node
