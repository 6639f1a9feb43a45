"""Persistent dirty bitmaps of raw images, in a sidecar file next to the image (beyond QEMU, which
stores bitmaps only in qcow2 images).

A ``file`` node on ``/path/disk.img``, and a ``raw`` node directly above such a node, keep their
persistent bitmaps in ``/path/disk.img.cowbackup-bitmaps``, one section ("layer") per driver, so that
bitmaps on the raw node and on its file node do not mix. The format is JSON (UTF-8)::

    {
      "format": "cowbackup-dirty-bitmaps",
      "version": 1,
      "layers": {
        "file": {
          "image-size": 4194304,          # the node's size when the bitmaps were stored
          "in-use": false,                # true while a daemon has the image open for writing
          "bitmaps": [                    # newest first
            {"name": "b0", "granularity": 65536, "enabled": true, "inconsistent": false,
             "data": "<base64 of zlib of the bits>"}
          ]
        }
      }
    }

``data`` is :meth:`~cowbackup.block.bitmap.DirtyBitmap.serialize` (granule ``i`` = bit ``i % 8`` of byte
``i // 8``, QEMU's qcow2 bit order) compressed with zlib, then base64.

The life of a layer, as QEMU handles qcow2's ``in-use`` flag::

    open (writable)   load every bitmap; a layer found "in-use" was not closed cleanly (crash, SIGKILL):
                      its bitmaps load as *inconsistent* -- only block-dirty-bitmap-remove works on them,
                      a backup refuses them -- and the layer is rewritten "in-use"
    open (read-only)  load; the bitmaps are read-only; the file is not touched
    add / remove      of a persistent bitmap: the layer is rewritten (still "in-use")
    close             the layer is rewritten with the current bits and "in-use": false

Rewrites of one sidecar run one at a time, in the I/O thread pool. Every write goes to a temporary file
in the same directory, is fsynced, renamed over the sidecar, and the directory is fsynced: a crash leaves
the old sidecar or the new one, never a torn one. A layer with no bitmap left is dropped; a sidecar with
no layer left is deleted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import tempfile
import weakref
import zlib
from typing import Any

from cowbackup.block.bitmap import DirtyBitmap
from cowbackup.block.dirty_bitmaps import BitmapError, BitmapOwner, register_bitmap_store
from cowbackup.block.node import BlockNode
from cowbackup.block.threadpool import run_blocking

log = logging.getLogger(__name__)

SUFFIX = ".cowbackup-bitmaps"
FORMAT = "cowbackup-dirty-bitmaps"
VERSION = 1

#: One lock per sidecar path while some node uses it (event loop only).
_LOCKS: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


def image_path(node: BlockNode) -> str | None:
    """The image file whose sidecar holds ``node``'s bitmaps, or None if the node cannot store any."""
    if node.driver_name == "file":
        return str(node.describe()["file"])
    if node.driver_name == "raw":
        child = node.children.get("file")
        if child is not None and child.node.driver_name == "file":
            return str(child.node.describe()["file"])
    return None


class SidecarStore:
    """The :class:`~cowbackup.block.dirty_bitmaps.BitmapStore` of one node: its layer of the sidecar.

    Reading, writing, fsync and rename run in the I/O thread pool; the bits are serialized on the event
    loop first, so the worker never touches state the loop owns.
    """

    def __init__(self, node: BlockNode, image: str) -> None:
        self.node = node
        self.path = image + SUFFIX
        self.layer = node.driver_name

    def check_new(self, name: str, granularity: int) -> None:
        if self.node.read_only:
            raise BitmapError(
                f"Can't store persistent bitmaps to {self.node.node_name}: the node is read-only"
            )

    async def remove(self, name: str) -> None:
        await self._save(in_use=True, without=name)

    async def load(self) -> None:
        """Create the layer's bitmaps on the node (see the module docstring); mark the layer in use.

        Raises BitmapError naming the sidecar if it cannot be read or is malformed.
        """
        doc = await run_blocking(_read, self.path)
        layer = doc.get("layers", {}).get(self.layer) if doc is not None else None
        if layer is None:
            return
        try:
            crashed = bool(layer["in-use"]) or layer["image-size"] != self.node.size
            entries = list(layer["bitmaps"])
            for entry in reversed(entries):  # stored newest first; create oldest first
                bm = self.node.dirty_bitmaps.create(str(entry["name"]), int(entry["granularity"]))
                raw = zlib.decompress(base64.b64decode(entry["data"], validate=True))
                bm.bits = DirtyBitmap.deserialize(self.node.size, bm.granularity, raw)
                bm.persistent = True
                bm.disabled = not entry["enabled"]
                bm.inconsistent = crashed or bool(entry["inconsistent"])
                bm.readonly = self.node.read_only
        except (KeyError, TypeError, ValueError, zlib.error, binascii.Error) as err:
            raise BitmapError(f"Malformed persistent bitmaps in '{self.path}': {err!r}") from err
        if crashed:
            log.warning(
                "%s: bitmaps of '%s' were not stored cleanly; they are inconsistent", self.path, self.layer
            )
        if not self.node.read_only:
            await self.save(in_use=True)

    async def save(self, in_use: bool) -> None:
        await self._save(in_use)

    async def _save_now(self, in_use: bool, without: str | None) -> None:
        entries = [
            {
                "name": bm.name,
                "granularity": bm.granularity,
                "enabled": bm.enabled,
                "inconsistent": bm.inconsistent,
                "data": base64.b64encode(zlib.compress(bm.bits.serialize())).decode("ascii"),
            }
            for bm in self.node.dirty_bitmaps
            if bm.persistent and bm.name is not None and bm.name != without
        ]
        layer = {"image-size": self.node.size, "in-use": in_use, "bitmaps": entries} if entries else None
        await run_blocking(_rewrite_layer, self.path, self.layer, layer)

    async def _save(self, in_use: bool, without: str | None = None) -> None:
        """Rewrite the layer with the node's persistent bitmaps (all but ``without``).

        Rewrites of one sidecar (its layers belong to different nodes) run one at a time, each taking
        its bits when its turn comes, so the file always ends up with the newest state of every layer.
        Raises BitmapError naming the sidecar if it cannot be read or written.
        """
        lock = _LOCKS.get(self.path)
        if lock is None:
            lock = _LOCKS[self.path] = asyncio.Lock()
        async with lock:
            await self._save_now(in_use, without)


def _rewrite_layer(path: str, name: str, layer: dict[str, Any] | None) -> None:
    """Replace (or, ``layer`` None, drop) one layer of the sidecar at ``path``; blocking.

    Raises BitmapError naming the sidecar if it cannot be read or written.
    """
    doc = _read(path) or {"format": FORMAT, "version": VERSION, "layers": {}}
    layers: dict[str, Any] = doc.setdefault("layers", {})
    if layer is not None:
        layers[name] = layer
    else:
        layers.pop(name, None)
    try:
        if layers:
            _write_atomic(path, doc)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                _fsync_dir(os.path.dirname(path))
    except OSError as err:
        raise BitmapError(f"Cannot store persistent bitmaps in '{path}': {err}") from err


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise BitmapError(f"Cannot read persistent bitmaps from '{path}': {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise BitmapError(f"'{path}' is not a version {VERSION} {FORMAT} file")
    return doc


def _write_atomic(path: str, doc: dict[str, Any]) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(doc, indent=1).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _store_of(node: BitmapOwner) -> SidecarStore | None:
    if not isinstance(node, BlockNode):
        return None
    image = image_path(node)
    return SidecarStore(node, image) if image is not None else None


register_bitmap_store("file", _store_of)
register_bitmap_store("raw", _store_of)
