"""The ``snapshot-access`` driver: the point-in-time view of a copy-before-write filter, as a node.

``blockdev-add driver=snapshot-access node-name=snap file=CBW`` gives a node that reads what the disk
under the filter held when the filter was opened, while the disk goes on changing (pull-mode backup,
"fleecing")::

    export 'snap' (read-only) ──> snap ──file──> cbw ──file──> disk   <── guest writes (through cbw)
                                                  └──target──> scratch  (old data, saved before a write)

Every request is handed to the filter's snapshot API (:mod:`cowbackup.block.filters.cbw`):

* ``read``: the view; EACCES where the snapshot has nothing to read (outside the filter's ``bitmap``,
  after a discard here, or once ``on-cbw-error=break-snapshot`` gave the snapshot up);
* ``block_status``: the view's status (the scratch target's where old data was saved, the disk's
  elsewhere), EACCES as reads;
* ``discard``: the reader is done with those clusters: they are freed in the scratch target, become
  unreadable, and later guest writes there copy nothing;
* ``write`` and ``write_zeroes``: ENOTSUP -- the view cannot change.  The node itself is not read-only
  (as in QEMU), so it can be exported ``writable`` for the sake of NBD_CMD_TRIM.

Like QEMU, the node opens over any node; only a copy-before-write filter answers its requests, anything
else fails them with ENOTSUP.  Options: ``file`` (required) and the options every node has
(:mod:`cowbackup.block.drivers`), among them ``discard``: as in QEMU, discards reach the snapshot only
with ``discard=unmap``; by default (``ignore``) they succeed, do nothing and mark no dirty bitmap.
"""

from __future__ import annotations

import errno

from cowbackup.block.drivers import open_child
from cowbackup.block.errors import RequestError
from cowbackup.block.filters.cbw import CopyBeforeWriteNode
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode, Extent, Limits, RequestFlags
from cowbackup.block.options import Options


class SnapshotAccessNode(BlockNode):
    """Reads, block status and discards go to the snapshot API of the ``file`` child (see the module
    docstring).  The generic request path has checked every range against the size before a hook runs."""

    driver_name = "snapshot-access"

    def __init__(self, node_name: str, *, unmap: bool = False) -> None:
        super().__init__(node_name)
        #: ``discard=unmap``: discards free the snapshot's clusters; otherwise the generic layer drops
        #: them (the registry sets it from the option).
        self.discard_unmap = unmap

    @property
    def size(self) -> int:
        return self._file.size

    @property
    def _file(self) -> BlockNode:
        return self.children["file"].node

    def _cbw(self) -> CopyBeforeWriteNode:
        node = self._file
        if not isinstance(node, CopyBeforeWriteNode):
            raise RequestError(errno.ENOTSUP, f"node '{node.node_name}' does not provide snapshot access")
        return node

    def describe(self) -> dict[str, object]:
        return {"file": self._file.node_name}

    def refresh_limits(self) -> None:
        """Byte-granular requests of at most the child's transfer size (the filter splits further)."""
        child = self._file
        self._size = child.size
        self.limits = Limits(
            request_alignment=1,
            max_transfer=child.limits.max_transfer,
            max_discard=child.limits.max_discard,
            cluster_size=child.limits.cluster_size,
        )

    async def _do_read(self, offset: int, buf: memoryview) -> None:
        await self._cbw().snapshot_read(offset, buf)

    async def _do_block_status(self, offset: int, length: int) -> Extent:
        return await self._cbw().snapshot_block_status(offset, length)

    async def _do_discard(self, offset: int, length: int) -> None:
        await self._cbw().snapshot_discard(offset, length)

    async def _do_write(self, offset: int, data: memoryview, flags: RequestFlags) -> None:
        raise RequestError(errno.ENOTSUP, "snapshot-access nodes cannot be written")

    async def _do_write_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        raise RequestError(errno.ENOTSUP, "snapshot-access nodes cannot be written")


async def open_node(graph: BlockGraph, node_name: str, opts: Options) -> SnapshotAccessNode:
    """``blockdev-add driver=snapshot-access node-name=NAME file=CBW [discard=ignore|unmap]``."""
    child = await open_child(graph, opts, "file")
    assert child is not None
    node = SnapshotAccessNode(node_name, unmap=opts.base.discard_unmap)
    graph.attach(node, "file", child)
    node.refresh_limits()
    return node
