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

Every write goes to a temporary file in the same directory, is fsynced, renamed over the sidecar, and the
directory is fsynced: a crash leaves the old sidecar or the new one, never a torn one. A layer with no
bitmap left is dropped; a sidecar with no layer left is deleted.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import tempfile
import zlib
from typing import TYPE_CHECKING, Any

from cowbackup.block.bitmap import DirtyBitmap
from cowbackup.block.dirty_bitmaps import BitmapError, register_bitmap_store

if TYPE_CHECKING:
    from cowbackup.block.node import BlockNode

log = logging.getLogger(__name__)

SUFFIX = ".cowbackup-bitmaps"
FORMAT = "cowbackup-dirty-bitmaps"
VERSION = 1


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
    """The :class:`~cowbackup.block.dirty_bitmaps.BitmapStore` of one node: its layer of the sidecar."""

    def __init__(self, node: BlockNode, image: str) -> None:
        self.node = node
        self.path = image + SUFFIX
        self.layer = node.driver_name

    def check_new(self, name: str, granularity: int) -> None:
        if self.node.read_only:
            raise BitmapError(
                f"Can't store persistent bitmaps to {self.node.node_name}: the node is read-only"
            )

    def remove(self, name: str) -> None:
        self.save(in_use=True, without=name)

    def load(self) -> None:
        """Create the layer's bitmaps on the node (see the module docstring); mark the layer in use.

        Raises BitmapError naming the sidecar if it cannot be read or is malformed.
        """
        doc = _read(self.path)
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
            self.save(in_use=True)

    def save(self, in_use: bool, without: str | None = None) -> None:
        """Rewrite the layer with the node's persistent bitmaps (all but ``without``).

        Raises BitmapError naming the sidecar if it cannot be read or written.
        """
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
        doc = _read(self.path) or {"format": FORMAT, "version": VERSION, "layers": {}}
        layers: dict[str, Any] = doc.setdefault("layers", {})
        if entries:
            layers[self.layer] = {"image-size": self.node.size, "in-use": in_use, "bitmaps": entries}
        else:
            layers.pop(self.layer, None)
        try:
            if layers:
                _write_atomic(self.path, doc)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                    _fsync_dir(os.path.dirname(self.path))
        except OSError as err:
            raise BitmapError(f"Cannot store persistent bitmaps in '{self.path}': {err}") from err


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


def _store_of(node: BlockNode) -> SidecarStore | None:
    image = image_path(node)
    return SidecarStore(node, image) if image is not None else None


def load_persistent_bitmaps(node: BlockNode) -> None:
    """Load ``node``'s stored bitmaps (once per node). Raises BitmapError on a malformed sidecar."""
    if node.dirty_bitmaps.store_opened:
        return
    node.dirty_bitmaps.store_opened = True
    store = _store_of(node)
    if store is not None:
        store.load()


def store_persistent_bitmaps(node: BlockNode) -> None:
    """Store ``node``'s persistent bitmaps as closed cleanly (the node is closed or closing).

    Errors are logged, not raised: the node is going away either way, and the sidecar then still says
    "in-use", so the bitmaps come back inconsistent instead of wrong.
    """
    store = _store_of(node)
    if store is None or node.read_only or not node.dirty_bitmaps.store_opened:
        return
    try:
        store.save(in_use=False)
    except BitmapError as err:
        log.error("could not store the persistent bitmaps of '%s': %s", node.node_name, err)


register_bitmap_store("file", _store_of)
register_bitmap_store("raw", _store_of)
